"""Slow and large bodies cost bounded time, descriptors and memory; genuine calls get through.

Real uvicorn processes, attacked over raw sockets on 127.0.0.1, with a bounded number of
connections; BODY_TIMEOUT_SECONDS is shortened so the tests do not wait the default 10 s.
"""

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.body_guard import LARGE_BODY_SLOTS
from tests.fake_portal import FakePortal
from tests.processes import AppProcess, app_env, free_port

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
RESET = b"(connection reset)"


def start_app(tmp_path: Path, portal: FakePortal, file_limit: int | None = None, **env: str) -> AppProcess:
    port = free_port()
    settings = app_env(portal, f"http://127.0.0.1:{port}", **env)
    app = AppProcess(tmp_path, settings, port, tmp_path / "app.log", file_limit=file_limit)
    reply = httpx.post(app.url + "/install", content=portal.install_event_body(), headers=FORM, timeout=30)
    assert reply.status_code == 200, reply.text
    return app


@pytest.fixture
def app(tmp_path: Path, portal: FakePortal) -> Iterator[AppProcess]:
    running = start_app(tmp_path, portal, BODY_TIMEOUT_SECONDS="2")
    yield running
    running.stop()


def genuine_calls(app: AppProcess, portal: FakePortal, count: int) -> list[int]:
    """Statuses of `count` real robot calls, each on a fresh connection."""
    statuses = []
    for index in range(count):
        _, body = portal.robot_call_body({"first_name": f"Anna {index}"})
        with httpx.Client(timeout=30) as client:
            statuses.append(client.post(app.url + "/robot", content=body, headers=FORM).status_code)
    return statuses


def open_slow_body(app: AppProcess, declared: int, sent: bytes = b"event_token=") -> socket.socket:
    """A POST whose headers arrive at once and whose body stops after `sent`."""
    host, port = app.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST /robot HTTP/1.1\r\nHost: {host}\r\nContent-Type: {FORM['Content-Type']}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + sent)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (30 s at most per read).

    A server that closes with part of a large body unread makes the kernel reset the connection,
    which may drop the reply before it is read: that is closed too, shown as RESET.
    """
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except ConnectionResetError:
        return reply or RESET
    return reply


def test_a_body_not_delivered_in_time_gets_408_and_a_closed_connection(
    app: AppProcess, portal: FakePortal
) -> None:
    with open_slow_body(app, 1000) as sock:
        statuses = genuine_calls(app, portal, 3)
        reply = read_until_closed(sock)

    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request_timeout" in reply
    assert statuses == [200, 200, 200]


def test_many_slow_and_large_bodies_do_not_starve_genuine_calls(app: AppProcess, portal: FakePortal) -> None:
    stop, lock = threading.Event(), threading.Lock()
    attackers: list[tuple[socket.socket, bool]] = []

    def attack() -> None:
        # Keeps about 150 slow bodies and more large ones than there are slots open, 600 at most.
        large = b"x=" + b"a" * (200 * 1024)
        for number in range(600):
            if stop.is_set():
                return
            try:
                declared, sent = (1_000_000, large) if number % 10 == 0 else (5000, b"event_token=")
                sock = open_slow_body(app, declared, sent)
            except OSError:
                continue
            with lock:
                attackers.append((sock, declared > 5000))

    thread = threading.Thread(target=attack)
    thread.start()
    try:
        statuses = genuine_calls(app, portal, 10)
    finally:
        stop.set()
        thread.join(60)
    with lock:
        opened = list(attackers)
    replies = [(read_until_closed(sock), large) for sock, large in opened]
    for sock, _ in opened:
        sock.close()

    assert statuses == [200] * 10
    assert sum(large for _, large in opened) > LARGE_BODY_SLOTS
    # Every attacker was answered 408 and closed; a large one may see the close as a reset.
    refused = {reply[:12] for reply, large in replies if not (large and reply == RESET)}
    assert refused == {b"HTTP/1.1 408"}, refused


def test_slow_clients_beyond_the_default_file_limit_do_not_lock_genuine_calls_out(
    tmp_path: Path, portal: FakePortal
) -> None:
    # Started with a soft limit of 256 open files, as many systems start with 1,024; the app
    # lifts it to the hard limit, so 300 held connections leave room for genuine calls.
    app = start_app(tmp_path, portal, file_limit=256, BODY_TIMEOUT_SECONDS="30")
    held: list[socket.socket] = []
    try:
        for _ in range(300):
            held.append(open_slow_body(app, 5000))
        statuses = genuine_calls(app, portal, 3)
    finally:
        for sock in held:
            sock.close()
        app.stop()

    assert statuses == [200, 200, 200]
