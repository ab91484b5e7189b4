"""The app with the journal at `synchronous=NORMAL` (before durable commits): the `durable` baseline.

NORMAL in WAL mode skips the fsync at each commit, so a power cut may take acknowledged calls; the
app itself runs FULL. Only the benchmark starts this module.
"""

import repositories.sqlite_db as sqlite_db

sqlite_db.SYNCHRONOUS = "NORMAL"

from main import app  # noqa: E402

__all__ = ["app"]
