"""Runs the fake portal server: python -m tests.fake_portal --port 8100."""

from tests.fake_portal.cli import main

raise SystemExit(main())
