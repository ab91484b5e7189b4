"""The command line: python -m tests.fake_portal --port 8100."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence
from types import FrameType

from tests.fake_portal.server import FakePortal
from tests.fake_portal.state import FakePortalConfig

# --------------------------------------------------------------------------------------------
# CLI: python -m tests.fake_portal --port 8100
# --------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = FakePortalConfig()
    parser = argparse.ArgumentParser(description="Fake Bitrix24 portal + OAuth server")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--client-id", default=defaults.client_id)
    parser.add_argument("--client-secret", default=defaults.client_secret)
    parser.add_argument("--member-id", default=defaults.member_id)
    parser.add_argument("--rate-burst", type=int, default=defaults.rate_burst)
    parser.add_argument("--rate-drain", type=float, default=defaults.rate_drain)
    parser.add_argument("--no-rate-limit", action="store_true")
    parser.add_argument("--access-ttl", type=float, default=defaults.access_ttl)
    parser.add_argument("--code-ttl", type=float, default=defaults.code_ttl)
    parser.add_argument("--refresh-ttl", type=float, default=defaults.refresh_ttl)
    parser.add_argument("--lenient-refresh", action="store_true", help="old refresh tokens live on")
    parser.add_argument("--redirect-uri", default=defaults.redirect_uri)
    parser.add_argument("--language", default=defaults.language, help="LANGUAGE_ID and LANG: en, ru, ...")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    config = FakePortalConfig(
        client_id=args.client_id,
        client_secret=args.client_secret,
        member_id=args.member_id,
        access_ttl=args.access_ttl,
        code_ttl=args.code_ttl,
        refresh_ttl=args.refresh_ttl,
        strict_refresh=not args.lenient_refresh,
        rate_burst=None if args.no_rate_limit else args.rate_burst,
        rate_drain=args.rate_drain,
        redirect_uri=args.redirect_uri,
        language=args.language,
    )
    portal = FakePortal(config)
    portal.start(port=args.port)
    stopping = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    print(f"FAKE_PORTAL_READY {portal.url}", flush=True)
    try:
        while not stopping.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        portal.stop()
    return 0
