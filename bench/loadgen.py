"""A small, fast HTTP/1.1 load generator: raw asyncio streams, keep-alive, pre-built requests.

Runs as its own process so that it shares no GIL with the server it measures:

    python -m bench.loadgen --port 8000 --bodies bodies.txt --out result.json
    python -m bench.loadgen --port 8000 --template body.txt --marker WORKFLOW_ID --duration 4

With `--bodies`, every line (one form-encoded body) is POSTed once, in order. With `--template`,
one body is sent again and again, each time with a counter written into the last 8 digits of
`--marker` (the body's workflow id, so every call has its own event token), for `--count`
requests or `--duration` seconds. Requests go over `--concurrency` keep-alive connections, with
pre-built bytes; the first `--warmup` requests are sent before the clock starts. The result
(JSON) has the count, the elapsed time, status counts, latencies and the client's own CPU use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

HEADER_LIMIT = 64 * 1024
BODY_LIMIT = 8 * 1024 * 1024


class HttpError(Exception):
    """The server answered something this client cannot read, or closed the connection."""


@dataclass
class Outcome:
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    first_send: float = 0.0  # epoch seconds
    last_receive: float = 0.0
    sample_reply: str = ""


class Connection(asyncio.Protocol):
    """One keep-alive connection; reconnects when the server closed it.

    A protocol, not asyncio streams: per request it costs one future and one parse of the bytes
    received, not a `wait_for` task and timer plus the stream reader's own futures. The client's
    CPU counts against the servers when they share the machine's cores (scenario two), so it is kept
    lean; the same client measures every server, so comparisons stay fair.
    """

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self._sent_at = 0.0  # monotonic time the pending request went out
        self._needed = 0  # the buffer's length the pending response needs, when known

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.create_connection(lambda: self, self.host, self.port), self.timeout)

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.transport = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._buffer.clear()
        self._needed = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(HttpError("connection closed before a response"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        waiter = self._waiter
        # The server may send the head and the body in two writes: the head is parsed once.
        if waiter is None or waiter.done() or len(self._buffer) < self._needed:
            return
        try:
            parsed = parse_response(self._buffer)
        except HttpError as exc:
            self._fail(exc)
            return
        if isinstance(parsed, int):
            self._needed = parsed
            return
        status, body, keep_alive, used = parsed
        del self._buffer[:used]
        self._needed = 0
        waiter.set_result((status, body, keep_alive))

    def expire(self, now: float) -> None:
        """Called by the phase's watchdog: a request pending for longer than the timeout fails."""
        if self._waiter is not None and not self._waiter.done() and now - self._sent_at > self.timeout:
            self._fail(TimeoutError(f"no response within {self.timeout}s"))

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.transport is None:
            await self.open()
        assert self.transport is not None
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        self._sent_at = time.monotonic()
        self.transport.write(raw)
        status, body, keep_alive = await waiter
        if not keep_alive:
            await self.close()
        return status, body


def parse_response(buffer: bytearray) -> tuple[int, bytes, bool, int] | int:
    """(status, body, keep-alive, bytes used) of the response at the start of `buffer`; while it
    is incomplete, the length the buffer must reach first (0: not known yet)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > HEADER_LIMIT:
            raise HttpError("response headers too large")
        return 0
    head = bytes(buffer[:end]).lower()
    parts = head[: head.find(b"\r\n") if b"\r\n" in head else end].split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise HttpError(f"bad status line {parts!r}")
    headers = dict(_HEADERS.findall(head + b"\r\n"))
    start = end + 4
    if headers.get(b"transfer-encoding", b"").strip() == b"chunked":
        chunked = _read_chunked(buffer, start)
        if chunked is None:
            return 0
        body, used = chunked
    else:
        length = int(headers.get(b"content-length", b"0").strip() or 0)
        if length > BODY_LIMIT:
            raise HttpError("response body too large")
        if len(buffer) < start + length:
            return start + length
        body, used = bytes(buffer[start : start + length]), start + length
    keep_alive = headers.get(b"connection", b"").strip() != b"close"
    return int(parts[1]), body, keep_alive, used


# The three headers the client reads, found in the lowercased head by one pass of a regex.
_HEADERS = re.compile(rb"\r\n(content-length|transfer-encoding|connection)[ \t]*:([^\r]*)(?=\r\n)")


def _read_chunked(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """(body, end) of a chunked body that starts at `start`, or None while it is incomplete."""
    body = bytearray()
    for _ in range(100_000):  # bounded: a chunked body of more chunks than this is refused
        line_end = buffer.find(b"\r\n", start)
        if line_end < 0:
            return None
        size = int(bytes(buffer[start:line_end]).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            trailer_end = buffer.find(b"\r\n", line_end + 2)
            return None if trailer_end < 0 else (bytes(body), trailer_end + 2)
        if len(buffer) < line_end + 2 + size + 2:
            return None
        body += buffer[line_end + 2 : line_end + 2 + size]
        start = line_end + 2 + size + 2
        if len(body) > BODY_LIMIT:
            raise HttpError("response body too large")
    raise HttpError("too many chunks")


def request_head(host: str, port: int, path: str) -> str:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: Bitrix24 bench\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nAccept: */*\r\n"
    )


def build_requests(host: str, port: int, path: str, bodies: Sequence[bytes]) -> list[bytes]:
    head = request_head(host, port, path)
    return [f"{head}Content-Length: {len(body)}\r\n\r\n".encode("latin-1") + body for body in bodies]


class Source:
    """Where the requests come from: a fixed list, or a template stamped with a counter."""

    def __init__(
        self, requests: list[bytes] | None = None, template: bytes = b"", marker: bytes = b""
    ) -> None:
        self.requests = requests
        self.made = 0
        self._raw = bytearray(template)
        # Every call gets its own workflow id, so its own event token: the last 8 digits of the
        # template's workflow id (it appears in `workflow_id` and at the head of `event_token`)
        # are replaced by a counter. Same length, so the pre-built headers stay right.
        self._slots = [i + len(marker) - 8 for i in _find_all(bytes(self._raw), marker)] if marker else []
        if template and (not self._slots or not marker[-8:].isdigit()):
            raise SystemExit("the template must contain the marker, ending in 8 digits")

    def next(self) -> bytes | None:
        if self.requests is not None:
            if self.made >= len(self.requests):
                return None
            raw = self.requests[self.made]
        else:
            digits = b"%08d" % (self.made % 100_000_000)
            for slot in self._slots:
                self._raw[slot : slot + 8] = digits
            raw = bytes(self._raw)
        self.made += 1
        return raw


def _find_all(data: bytes, needle: bytes) -> list[int]:
    found: list[int] = []
    start = data.find(needle)
    while start >= 0 and len(found) < 100:
        found.append(start)
        start = data.find(needle, start + 1)
    return found


@dataclass
class Limit:
    """When a phase stops issuing requests: after `count` of them, or after `seconds`."""

    count: int | None
    seconds: float | None
    time_limit: float

    def open(self, issued: int, started: float) -> bool:
        now = time.monotonic()
        if now - started > self.time_limit:
            return False
        if self.count is not None and issued >= self.count:
            return False
        return self.seconds is None or now - started < self.seconds


async def _worker(
    connection: Connection, source: Source, limit: Limit, issued: list[int], started: float, outcome: Outcome
) -> None:
    while limit.open(issued[0], started):
        raw = source.next()
        if raw is None:
            return
        issued[0] += 1
        sent = time.perf_counter()
        if not outcome.first_send:
            outcome.first_send = time.time()
        try:
            status, body = await connection.request(raw)
        except (OSError, HttpError, TimeoutError) as exc:
            outcome.errors.append(f"{type(exc).__name__}: {exc}")
            await connection.close()
            continue
        outcome.latencies.append(time.perf_counter() - sent)
        outcome.statuses[status] += 1
        outcome.last_receive = time.time()
        if status >= 300 and not outcome.sample_reply:
            outcome.sample_reply = body[:300].decode("utf-8", "replace")


async def blast(connections: list[Connection], source: Source, limit: Limit) -> tuple[Outcome, float, int]:
    """Send requests over the connections until the limit; returns outcome, seconds, count sent."""
    outcome, issued = Outcome(), [0]
    started = time.monotonic()
    clock = time.perf_counter()
    watchdog = asyncio.ensure_future(_watch(connections))
    try:
        await asyncio.gather(*(_worker(c, source, limit, issued, started, outcome) for c in connections))
    finally:
        watchdog.cancel()
    elapsed = time.perf_counter() - clock
    if elapsed > limit.time_limit:
        outcome.errors.append(f"time limit of {limit.time_limit}s reached after {issued[0]} requests")
    return outcome, elapsed, issued[0]


async def _watch(connections: list[Connection]) -> None:
    """Fails the requests that waited too long: one timer for all, not one per request."""
    while True:
        await asyncio.sleep(0.5)
        now = time.monotonic()
        for connection in connections:
            connection.expire(now)


def _percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _source(args: argparse.Namespace) -> Source:
    if args.template:
        body = Path(args.template).read_bytes().strip()
        head = request_head(args.host, args.port, args.path)
        raw = f"{head}Content-Length: {len(body)}\r\n\r\n".encode("latin-1") + body
        return Source(template=raw, marker=args.marker.encode())
    bodies = [line for line in Path(args.bodies).read_bytes().split(b"\n") if line]
    return Source(requests=build_requests(args.host, args.port, args.path, bodies))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    source = _source(args)
    ports = [args.port, *args.also_port]  # several instances behind one generator: round robin
    connections = [
        Connection(args.host, ports[i % len(ports)], args.timeout) for i in range(args.concurrency)
    ]
    try:
        await asyncio.gather(*(c.open() for c in connections))
        cpu_all_started = time.process_time()
        warm_outcome = Outcome()
        if args.warmup:
            warm_outcome, _, _ = await blast(connections, source, Limit(args.warmup, None, args.time_limit))
        cpu_started = time.process_time()
        limit = Limit(args.count, args.duration, args.time_limit)
        outcome, elapsed, issued = await blast(connections, source, limit)
        cpu = time.process_time() - cpu_started
        cpu_all = time.process_time() - cpu_all_started
    finally:
        await asyncio.gather(*(c.close() for c in connections))
    ok = sum(count for status, count in outcome.statuses.items() if 200 <= status < 300)
    return {
        "requests": issued,
        "warmup": args.warmup,
        "warmup_ok": sum(n for s, n in warm_outcome.statuses.items() if 200 <= s < 300),
        "ok": ok,
        "statuses": {str(status): count for status, count in sorted(outcome.statuses.items())},
        "elapsed": elapsed,
        "rate": ok / elapsed if elapsed > 0 else 0.0,
        "first_send": outcome.first_send,
        "last_receive": outcome.last_receive,
        "latency_ms": {
            "p50": _percentile(outcome.latencies, 0.50) * 1000,
            "p90": _percentile(outcome.latencies, 0.90) * 1000,
            "p99": _percentile(outcome.latencies, 0.99) * 1000,
            "max": max(outcome.latencies, default=0.0) * 1000,
        },
        "errors": (warm_outcome.errors + outcome.errors)[:10],
        "error_count": len(warm_outcome.errors) + len(outcome.errors),
        "sample_reply": outcome.sample_reply or warm_outcome.sample_reply,
        "concurrency": args.concurrency,
        # Share of one core the client itself used: near 1.0 means the client, not the server, was
        # the limit, and the rate is a floor.
        "client_cpu": cpu / elapsed if elapsed > 0 else 0.0,
        # CPU seconds of the client for the warm-up and the timed requests together, to set
        # beside the servers' CPU per call (they are read from /proc over the same calls).
        "cpu_seconds": cpu_all,
    }


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--also-port", type=int, action="append", default=[], help="another instance")
    parser.add_argument("--path", default="/robot")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--bodies", help="file with one form body per line, each sent once, in order")
    what.add_argument("--template", help="one form body, sent again and again with a counter in it")
    parser.add_argument("--marker", default="", help="with --template: text ending in 8 digits to count in")
    parser.add_argument("--count", type=int, help="timed requests (default: every body, once)")
    parser.add_argument("--duration", type=float, help="seconds of timed requests")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=0, help="requests sent before the clock starts")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds for the whole run")
    parser.add_argument("--out", help="write the JSON result here (default: stdout)")
    return parser.parse_args(argv)


def _run_loop(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import uvloop  # optional: a faster event loop for the client when installed
    except ImportError:
        return asyncio.run(run(args))
    return uvloop.run(run(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the load generator only targets this machine (127.0.0.1)")
    result = _run_loop(args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
