"""The attack scenario of bench/run.py: genuine robot calls per second under each attack, as a
ratio to the same app, in the same run, without it.

Attacks (each from threads of this process, to 127.0.0.1 only, bounded by the measuring time):

* expensive bodies - 2 clients posting the costliest bodies the parser still reads: 1 MB values,
  1,000 fields of long names, keys using the whole bracket budget;
* slow bodies      - 500 connections that send their headers and then stall inside the body;
* large bodies     - 400 connections, each sending 1 MB less one byte (memory: RSS peak and after);
* forged installs  - 40 clients posting ONAPPINSTALL with random tokens.

The portal is held as in the ack scenario, so genuine calls are verified and journaled only.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

if TYPE_CHECKING:  # bench.run imports this module; only its types are needed here
    from bench.harness import Bench, Server

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SLOW_CONNECTIONS = 500
LARGE_CONNECTIONS = 400
INSTALL_ATTACKERS = 40
ONE_MB = 1024 * 1024


class Attack:
    """Threads that run `one(stop)` in a loop until stopped; statuses counted."""

    def __init__(self, threads: int, one: Callable[[threading.Event], int | None]) -> None:
        self.stop = threading.Event()
        self.statuses: Counter[int] = Counter()
        self._one = one
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                status = self._one(self.stop)
            except OSError:
                status = 0
                time.sleep(0.01)
            if status is not None:
                with self._lock:
                    self.statuses[status] += 1

    @contextlib.contextmanager
    def running(self) -> Iterator[Attack]:
        for thread in self._threads:
            thread.start()
        time.sleep(1.0)  # under way before the measurement starts
        try:
            yield self
        finally:
            self.stop.set()
            for thread in self._threads:
                thread.join(30)


def _expensive_bodies() -> list[bytes]:
    value = b"a=" + b"x" * (ONE_MB - 16)
    names = "&".join(f"{'n' * 500}{i:03d}=v" for i in range(999)).encode()
    deep = "&".join("a" + "[]" * 63 + "=x" for _ in range(16)).encode()
    return [value, names, deep]


def expensive_attack(server: Server) -> Attack:
    bodies = _expensive_bodies()
    clients: dict[int, httpx.Client] = {}

    def one(stop: threading.Event) -> int:
        client = clients.setdefault(threading.get_ident(), httpx.Client(timeout=30))
        body = bodies[secrets.randbelow(len(bodies))]
        return client.post(server.url + "/robot", content=body, headers=FORM).status_code

    return Attack(2, one)


def _open_body(server: Server, declared: int, sent: bytes) -> socket.socket:
    """A POST of `declared` bytes of which only `sent` go out, as far as the server reads them."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = f"POST /robot HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {FORM['Content-Type']}\r\n"
    sock.sendall(f"{head}Content-Length: {declared}\r\n\r\n".encode())
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        view = memoryview(sent)
        while view:
            view = view[sock.send(view) :]
    sock.setblocking(True)
    return sock


def _holder(server: Server, connections: int, declared: int, sent: bytes) -> Attack:
    """Keeps `connections` bodies open; one closed by the server (408) is opened again."""

    def one(stop: threading.Event) -> int:
        held = []
        for _ in range(connections):
            if stop.is_set():
                break
            held.append(_open_body(server, declared, sent))
        replies = 0
        for sock in held:
            with sock:
                sock.settimeout(30)
                with contextlib.suppress(OSError):
                    if not stop.is_set() and sock.recv(64).startswith(b"HTTP/1.1 408"):
                        replies += 1
        return 408 if replies else 0

    return Attack(1, one)


def slow_attack(server: Server) -> Attack:
    return _holder(server, SLOW_CONNECTIONS, 5000, b"event_token=")


def large_attack(server: Server) -> Attack:
    return _holder(server, LARGE_CONNECTIONS, ONE_MB, b"a=" + b"x" * (ONE_MB - 3))


def forged_install_attack(server: Server, template: str) -> Attack:
    clients: dict[int, httpx.Client] = {}

    def one(stop: threading.Event) -> int:
        client = clients.setdefault(threading.get_ident(), httpx.Client(timeout=30))
        body = template
        for key in ("auth[access_token]", "auth[refresh_token]"):
            name = quote(key, safe="")
            body = "&".join(
                f"{name}={secrets.token_hex(16)}" if part.startswith(name + "=") else part
                for part in body.split("&")
            )
        return client.post(server.url + "/install", content=body, headers=FORM).status_code

    return Attack(INSTALL_ATTACKERS, one)


def _genuine_rate(bench: Bench, server: Server, template: str, tag: str) -> float:
    path, marker = bench.template_file(tag, template)
    source = ["--template", str(path), "--marker", marker, "--duration", str(bench.plan.ack_seconds)]
    result = bench.load(server, source, bench.plan.ack_warmup // 4, tag)
    if result["ok"] != result["requests"]:
        print(f"  {tag}: {result['requests'] - result['ok']} genuine calls failed: {result['statuses']}")
    return float(result["rate"])  # 2xx replies per second


def _rss_mb(server: Server) -> float:
    return server.memory_kb().get("VmRSS", 0) / 1024


def scenario_attack(bench: Bench) -> dict[str, Any]:
    portal = bench.portal
    portal.release()
    server = bench.start_app("attack")
    install_template = portal.install_body()
    try:
        portal.hold()
        template = portal.robot_body(bench.indices(1))[1]
        attacks: dict[str, Callable[[], Attack]] = {
            "expensive bodies": lambda: expensive_attack(server),
            "slow bodies": lambda: slow_attack(server),
            "large bodies": lambda: large_attack(server),
            "forged installs": lambda: forged_install_attack(server, install_template),
        }
        baselines = [_genuine_rate(bench, server, template, "attack-none-0")]
        outcome: dict[str, Any] = {}
        for number, (name, make) in enumerate(attacks.items()):
            rss_before = _rss_mb(server)
            with make().running() as attack:
                rate = _genuine_rate(bench, server, template, f"attack-{number}")
                rss_during = _rss_mb(server)
            time.sleep(2.0)
            outcome[name] = {
                "rate": rate,
                "attack_statuses": dict(attack.statuses),
                "rss_mb": [rss_before, rss_during, _rss_mb(server)],
            }
            print(f"  {name}: genuine {rate:.0f}/s, attack replies {dict(attack.statuses)}", flush=True)
        baselines.append(_genuine_rate(bench, server, template, "attack-none-1"))
    finally:
        server.stop()
        portal.release()
    baseline = statistics.mean(baselines)
    for data in outcome.values():
        data["ratio"] = data["rate"] / baseline if baseline else 0.0
    return {"baseline_rate": baseline, "baselines": baselines, "attacks": outcome}


def attack_rows(data: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    baselines = _pair(data["baselines"])
    rows = [("5 attack", "genuine calls/s without an attack (before, after)", baselines, "", "")]
    for name, result in data["attacks"].items():
        before, during, after = result["rss_mb"]
        rows.append(
            (
                "5 attack",
                f"{name}: genuine calls/s, ratio to none (RSS MB before / during / after)",
                f"{result['rate']:.0f}, **{result['ratio']:.2f}** "
                f"({before:.0f} / {during:.0f} / {after:.0f})",
                "",
                "",
            )
        )
    return rows


def _pair(values: list[float]) -> str:
    return ", ".join(f"{value:.0f}" for value in values)
