"""The benchmark: `python bench/run.py` (see the README)."""
