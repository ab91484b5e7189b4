"""App factory: lifespan (shared client, stores, job worker), logging, error mapping."""

import asyncio
import gc
import logging
import os
import random
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config import Settings, get_settings
from dependencies import AppState
from repositories.storage_error import StorageError
from repositories.token_store import TokenKeyMismatch, TokenStore, TokenStoreError
from router import router
from services import metrics, pages
from services.backend import open_backend
from services.bitrix_client import BitrixClient, BitrixError
from services.body_guard import (
    BodyGuardMiddleware,
    BodyLimits,
    raise_file_limit,
    return_large_buffers_to_the_system,
)
from services.errors import AppError, ErrorCode
from services.handler_check import handler_warnings, log_handler_warnings
from services.languages import PortalLanguages
from services.observability import configure_logging, register_secret, request_id_var
from services.page_headers import PageHeadersMiddleware
from services.processing import ProcessingService
from services.rate_limit import PortalRateLimiter
from services.retry import RetryPolicy
from services.robot_registration import RobotRegistration
from services.token_upkeep import TokenUpkeep
from services.worker import JOB_RETRY, JobWorker

logger = logging.getLogger(__name__)
_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}
_QUIET_PATHS = frozenset({"/robot", "/health", "/metrics"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _settings(app: FastAPI) -> Settings:
    # The lifespan cannot use Depends; honour a test's override of get_settings all the same.
    provider = app.dependency_overrides.get(get_settings, get_settings)
    settings: Settings = provider()
    return settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[AppState]:
    """Build the shared HTTP client, stores and job worker; close them on shutdown."""
    settings = _settings(app)
    configure_logging(settings.log_level)
    register_secret(*settings.secret_values())
    raise_file_limit()
    return_large_buffers_to_the_system()
    _report_settings(settings)
    timeout = httpx.Timeout(settings.http_timeout_seconds, connect=5.0)
    # Tests route portal and authorization-server hosts to 127.0.0.1 through `app.state.bitrix_transport`.
    transport: httpx.AsyncBaseTransport | None = getattr(app.state, "bitrix_transport", None)
    headers = {"User-Agent": "bitrix24-contact-robot/1.0"}
    async with (
        httpx.AsyncClient(timeout=timeout, headers=headers, transport=transport) as http,
        open_backend(settings) as backend,
    ):
        tokens, journal = backend.tokens, backend.journal
        await _remember_stored_secrets(tokens)
        policy = RetryPolicy()
        limiter = PortalRateLimiter(settings.rate_limit_burst, settings.rate_limit_per_second)
        bitrix = BitrixClient(http, tokens, settings, limiter, policy)
        languages = PortalLanguages(tokens, settings.default_language)
        worker = JobWorker(journal, bitrix, settings, JOB_RETRY, backend.leadership, language_of=languages.of)
        robots = RobotRegistration(settings, tokens, bitrix, policy)
        # At start and every hour, by the one process that leads the job worker.
        worker.while_leading(robots.keep_registered)
        service = ProcessingService(
            settings, tokens, bitrix, journal, backend.states, worker.wake, robots, backend.cluster_status
        )
        task = asyncio.create_task(worker.run(), name="job-worker")
        upkeep = asyncio.create_task(TokenUpkeep(tokens, bitrix, settings).run(), name="token-upkeep")
        _freeze_startup_objects()
        try:
            yield AppState(service=service, body_limits=BodyLimits(settings.body_timeout_seconds))
        finally:
            for background in (task, upkeep):
                background.cancel()
                with suppress(asyncio.CancelledError):
                    await background
            await robots.close()
        logger.info("Shut down")


# Container allocations (net of frees) between young collections; CPython's default is 700.
GC_THRESHOLDS = (50_000, 20, 20)


def _freeze_startup_objects() -> None:
    """Keep what the start-up built out of every later garbage collection, and collect less often.

    The modules, models and routes built at start live as long as the process, yet each full
    collection walked all of them again: a tenth of a robot call's CPU under load (perf, cpu-clock
    samples in gc_collect_main). `gc.freeze()` moves them to the permanent generation (Python docs).
    After that, under load the collector still ran every ~6 calls and walked the calls in flight and
    the worker's jobs each time: 1,692 young, 154 middle and 14 full collections took 0.72 s over
    10,707 acknowledged calls, 70 us a call (gc.callbacks in the app under `bench/run.py --only
    ack`). Almost everything a call allocates is freed by reference counting; only cycles wait for
    the collector, so collecting every 50,000 allocations instead of 700 costs little memory.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _report_settings(settings: Settings) -> None:
    missing = settings.missing()
    if missing:
        logger.warning(
            "Settings missing: %s. /health and the status page work, but installs and OAuth are refused "
            "until you set them in .env (see .env.example) and restart.",
            ", ".join(missing),
        )
    if settings.database_url is None:
        storage = f"token file {settings.token_file}; job journal {settings.job_db_file}"
    else:
        storage = f"PostgreSQL at {_safe_host(settings.database_url.get_secret_value())}"
    logger.info(
        "Robot handler %s; portal %s; %s; tokens %s",
        settings.robot_handler_url,
        settings.bitrix_portal_url or "any Bitrix24 cloud portal",
        storage,
        "encrypted" if settings.token_encryption_key else "not encrypted (TOKEN_ENCRYPTION_KEY unset)",
    )
    # PORT is set by start.sh/start.bat; under a bare `uvicorn` the port is unknown and not checked.
    port = os.environ.get("PORT", "")
    listen_port = int(port) if port.isdigit() else None
    log_handler_warnings(settings.robot_handler_url, handler_warnings(settings.app_base_url, listen_port))
    base = settings.app_base_url
    here = f" (on this machine: http://127.0.0.1:{listen_port}/app)" if listen_port else ""
    logger.info(
        "Open the status page: %s/app%s, or the app in the portal. The portal's local app form: "
        "handler path %s/app, initial installation path %s/install",
        base,
        here,
        base,
        base,
    )


def _safe_host(url: str) -> str:
    """The database's host, port and name, without the user's password."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'local socket'}:{parts.port or 5432}{parts.path}"


async def _remember_stored_secrets(tokens: TokenStore) -> None:
    try:
        for record in await tokens.list():
            register_secret(record.access_token, record.refresh_token, record.application_token)
    except TokenKeyMismatch as exc:
        # Starting would answer every call with an error, and risk writing beside unreadable tokens.
        logger.critical("%s", exc)
        raise
    except TokenStoreError as exc:
        logger.error("%s", exc)


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's `X-Request-ID` when it is sane, else a fresh one."""
    for name, value in headers:
        if name == b"x-request-id":
            incoming = value.decode("latin-1")
            if _REQUEST_ID.match(incoming):
                return incoming
            break
    # Only correlates log lines, so no secret: the PRNG spares a system call per request (and
    # with it a release of the GIL that the journal's thread would take).
    return f"{random.getrandbits(48):012x}"


class RequestContextMiddleware:
    """Gives every request an id (also in the `X-Request-ID` reply header) and logs its outcome."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope["headers"])
        token = request_id_var.set(request_id)
        started, status = time.perf_counter(), 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = (time.perf_counter() - started) * 1000
            # Robot calls are logged once, by the service ("accepted as job N"); /health is polled.
            quiet = scope["path"] in _QUIET_PATHS and status < 400
            level = logging.DEBUG if quiet else logging.INFO
            logger.log(level, "%s %s -> %d in %.1f ms", scope["method"], scope["path"], status, elapsed)
            if scope["path"] == "/robot" and status == 200:
                metrics.ACK_SECONDS.observe(elapsed / 1000)
            request_id_var.reset(token)


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def _error_response(
    request: Request, status: int, code: str, detail: str, *, close: bool = False
) -> Response:
    headers = {"Connection": "close"} if close else None
    if _wants_html(request):
        page = pages.message_page("Request refused", detail, ok=False)
        return HTMLResponse(page, status_code=status, headers=headers)
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def register_exception_handlers(app: FastAPI) -> None:
    """The one place where errors become HTTP replies `{"error": code, "detail": text}`."""

    async def app_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AppError)
        logger.warning("Refused %s %s: %s (%s)", request.method, request.url.path, exc.message, exc.code)
        return _error_response(request, exc.status_code, exc.code, exc.message, close=exc.close_connection)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        return _error_response(request, 400, ErrorCode.BAD_REQUEST, detail)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.HTTP_ERROR)
        return _error_response(request, exc.status_code, code, str(exc.detail))

    async def upstream_error(request: Request, exc: Exception) -> Response:
        logger.error("Bitrix24 failure on %s: %s", request.url.path, exc)
        return _error_response(request, 502, ErrorCode.UPSTREAM_UNAVAILABLE, str(exc))

    async def storage_error(request: Request, exc: Exception) -> Response:
        logger.error("%s", exc)
        return _error_response(request, 503, ErrorCode.STORAGE_ERROR, str(exc))

    async def database_error(request: Request, exc: Exception) -> Response:
        # The driver's text names hosts and tables: it goes to the log, not to the caller.
        logger.error("Database failure on %s %s: %s", request.method, request.url.path, exc)
        detail = "The database (DATABASE_URL) is unavailable; nothing was stored. Try again."
        return _error_response(request, 503, ErrorCode.STORAGE_ERROR, detail)

    handlers: dict[Any, Any] = {
        AppError: app_error,
        RequestValidationError: validation_error,
        StarletteHTTPException: http_error,
        BitrixError: upstream_error,
        TokenStoreError: storage_error,
        StorageError: storage_error,
        psycopg.Error: database_error,
    }
    for exc_class, handler in handlers.items():
        app.add_exception_handler(exc_class, handler)


def create_app() -> FastAPI:
    """The FastAPI app, with routes, error handlers and request logging."""
    app = FastAPI(title="Bitrix24 contact robot", version="1.0.0", lifespan=lifespan)
    app.include_router(router)
    register_exception_handlers(app)
    app.add_middleware(BodyGuardMiddleware)
    app.add_middleware(PageHeadersMiddleware)
    app.add_middleware(RequestContextMiddleware)
    return app


app = create_app()
