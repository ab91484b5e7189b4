"""A fake Bitrix24 portal plus OAuth authorization server, served over real HTTP.

End-to-end tests and the benchmark talk to it exactly as the app talks to a cloud portal, so
every wire format here follows `/work/shared/bitrix24-wire.md` (sections cited inline).

Two ways to use it:

* in-process: ``with FakePortal(cfg) as portal: ...`` runs uvicorn in a daemon thread on a
  free 127.0.0.1 port; inspection properties are thread-safe snapshots.
* out-of-process: ``python -m tests.fake_portal --port 8100`` and drive it through the JSON
  control API under ``/_fake/`` (see ``_ControlApi``).

The portal never POSTs to the app by itself: tests ask it for the bodies it would send
(``install_event_body``, ``robot_call_body``, ...) and deliver them, which keeps timing explicit.
"""

from tests.fake_portal.batch import MAX_BATCH, _substitute
from tests.fake_portal.cli import main
from tests.fake_portal.methods_crm import PAGE_SIZE
from tests.fake_portal.php import build_php_query, parse_php_query, php_array
from tests.fake_portal.server import FakePortal
from tests.fake_portal.state import (
    OAUTH_DOMAIN,
    PORTAL_ERRORS,
    SCOPE,
    TIMEOUT_DURATIONS,
    VARIED,
    FakePortalConfig,
    PortalError,
)

__all__ = [
    "MAX_BATCH",
    "OAUTH_DOMAIN",
    "PAGE_SIZE",
    "PORTAL_ERRORS",
    "SCOPE",
    "TIMEOUT_DURATIONS",
    "VARIED",
    "FakePortal",
    "FakePortalConfig",
    "PortalError",
    "_substitute",
    "build_php_query",
    "main",
    "parse_php_query",
    "php_array",
]
