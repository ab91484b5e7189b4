"""Bodies that arrive slowly or large cost a bounded time and bounded memory.

Every request body must be delivered within `BODY_TIMEOUT_SECONDS` of the request's start, or the
request gets 408 and its connection is closed. Bodies over `LARGE_BODY_BYTES` are read only while
holding one of `LARGE_BODY_SLOTS` slots, so at most that many of them (1 MB each at most) are
buffered at a time; the others wait, unread, in the kernel's socket buffer (uvicorn stops reading
a connection whose app does not consume its body), until the deadline. A portal's own calls are a
few KB and never wait for a slot.
"""

import asyncio
import ctypes
import ctypes.util
import logging
import sys
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.errors import RequestTimeout

logger = logging.getLogger(__name__)

LARGE_BODY_BYTES = 64 * 1024
LARGE_BODY_SLOTS = 8
_M_MMAP_THRESHOLD = -3  # glibc mallopt() parameter


TRIM_DELAY_SECONDS = 1.0


class BodyLimits:
    """The deadline and the slots for large bodies; one per app, made in the lifespan."""

    def __init__(self, timeout_seconds: float, large_slots: int = LARGE_BODY_SLOTS) -> None:
        # Made in the lifespan, on the app's loop. Kept: on Python 3.11 every get_running_loop()
        # is a getpid() system call (CPython checks for a fork), and each request needs the loop.
        self.loop = asyncio.get_running_loop()
        self.timeout_seconds = timeout_seconds
        self.large = asyncio.Semaphore(large_slots)
        self._large_requests = 0
        self._trim: asyncio.TimerHandle | None = None

    def large_started(self) -> None:
        self._large_requests += 1

    def large_ended(self) -> None:
        """When the last large body is gone, give its memory back to the system (once, shortly)."""
        self._large_requests -= 1
        if self._large_requests == 0 and self._trim is None and _LIBC is not None:
            self._trim = self.loop.call_later(TRIM_DELAY_SECONDS, self._trim_now)

    def _trim_now(self) -> None:
        self._trim = None
        if self._large_requests == 0 and _LIBC is not None:
            # glibc keeps freed heap pages (uvicorn's 64 KB buffers, our bodies) for reuse;
            # malloc_trim(0) hands the free ones back, so RSS falls after a burst of large bodies.
            _LIBC.malloc_trim(0)


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class _GuardedBody:
    """One request's `receive`, with the deadline and, for a large body, a slot.

    One timer per request, armed at the first `receive()`: cheaper than an `asyncio.timeout_at`
    around every `receive()`, which cost as much as the rest of this middleware together. When it
    fires, a `receive()` still waiting is cancelled and raises `RequestTimeout`, as is any later one.
    """

    def __init__(self, receive: Receive, limits: BodyLimits, deadline: float, large: bool) -> None:
        self._receive, self._limits, self._deadline, self._large = receive, limits, deadline, large
        self._slot_held = False
        self._done = False
        self._timer: asyncio.TimerHandle | None = None
        self._waiting: asyncio.Task[Any] | None = None  # the task inside `receive()`, if any
        self._expired = False
        if large:
            limits.large_started()

    async def receive(self) -> Message:
        if self._done:  # after the body: a disconnect, which may take as long as it takes
            return await self._receive()
        if self._expired:
            raise self._timeout()
        if self._timer is None:
            self._timer = self._limits.loop.call_at(self._deadline, self._expire)
        task = self._waiting = asyncio.current_task(self._limits.loop)
        assert task is not None
        cancelling = task.cancelling()
        try:
            if self._large and not self._slot_held:
                await self._limits.large.acquire()
                self._slot_held = True
            message = await self._receive()
        except asyncio.CancelledError:
            # As asyncio.timeout does: our own cancel becomes the timeout; anyone else's stands.
            if self._expired and task.uncancel() <= cancelling:
                raise self._timeout() from None
            raise
        finally:
            self._waiting = None
        self._done = message["type"] != "http.request" or not message.get("more_body", False)
        if self._done:
            self._timer.cancel()
        return message

    def _expire(self) -> None:
        self._expired = True
        if self._waiting is not None:
            self._waiting.cancel()

    def _timeout(self) -> RequestTimeout:
        seconds = self._limits.timeout_seconds
        return RequestTimeout(f"The request body was not delivered within {seconds:g} seconds.")

    def release(self) -> None:
        """Called when the request ends: its body (parsed or not) is no longer held."""
        if self._timer is not None:
            self._timer.cancel()
        if self._slot_held:
            self._slot_held = False
            self._limits.large.release()
        if self._large:
            self._limits.large_ended()


class BodyGuardMiddleware:
    """Puts the deadline on every `receive()` of a request body, and a slot on large bodies."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limits: BodyLimits | None = scope.get("state", {}).get("body_limits")
        declared = _declared_length(scope) if scope["type"] == "http" else 0
        if limits is None or declared == 0:
            await self.app(scope, receive, send)
            return
        deadline = limits.loop.time() + limits.timeout_seconds
        # No Content-Length (chunked): the size is unknown, so it counts as large.
        body = _GuardedBody(receive, limits, deadline, declared is None or declared > LARGE_BODY_BYTES)
        try:
            # A timeout's 408 carries `Connection: close` (main._error_response).
            await self.app(scope, body.receive, send)
        finally:
            body.release()


def raise_file_limit() -> None:
    """Lift the soft limit on open files to the hard one, so slow clients cannot use up the
    descriptors genuine calls need (the default soft limit is often 1,024)."""
    if sys.platform == "win32":
        return
    import resource  # POSIX only

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logger.warning("Could not raise the open-files limit from %d: %s", soft, exc)


def _glibc() -> Any:
    """glibc, for mallopt() and malloc_trim(); None elsewhere (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def return_large_buffers_to_the_system() -> None:
    """Have glibc map every allocation of 128 KB or more on its own, and unmap it when freed.

    By default glibc raises that threshold after the first large free, so 1 MB bodies end up in
    the heap, which it rarely gives back: RSS then stays at its peak after a burst of large
    bodies. With a fixed threshold the memory of a finished body goes back to the system.
    """
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
