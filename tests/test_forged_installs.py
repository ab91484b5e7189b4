"""A flood of forged installs never delays robot work: proofs have their own small budget.

A real uvicorn process, installed on the fake portal; 40 threads post installs with random
tokens (bounded: 60 s or 3,000 requests) while genuine robot calls are made. The workflows must
get their answers while the flood is still going on.
"""

import secrets
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.fake_portal import FakePortal
from tests.processes import AppProcess, app_env, free_port
from tests.test_install_trust import replaced

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ATTACKERS = 40
MAX_FORGED = 3000
MAX_SECONDS = 60.0


class Flood:
    """Forged installs from `ATTACKERS` threads until stopped, or the count or time bound is hit."""

    def __init__(self, app: AppProcess, template: str) -> None:
        self.app, self.template = app, template
        self.stop = threading.Event()
        self.statuses: Counter[int] = Counter()
        self.sent = 0
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + MAX_SECONDS
        self._threads = [threading.Thread(target=self._attack) for _ in range(ATTACKERS)]

    def __enter__(self) -> "Flood":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)

    @property
    def exhausted(self) -> bool:
        return self.sent >= MAX_FORGED or time.monotonic() > self._deadline

    def _attack(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set() and not self.exhausted:
                body = replaced(self.template, "auth[access_token]", secrets.token_hex(16))
                body = replaced(body, "auth[refresh_token]", secrets.token_hex(16))
                try:
                    status = client.post(self.app.url + "/install", content=body, headers=FORM).status_code
                except httpx.HTTPError:
                    status = 0
                with self._lock:
                    self.sent += 1
                    self.statuses[status] += 1


def test_forged_installs_do_not_delay_robot_calls(tmp_path: Path, portal: FakePortal) -> None:
    port = free_port()
    app = AppProcess(tmp_path, app_env(portal, f"http://127.0.0.1:{port}"), port, tmp_path / "app.log")
    try:
        assert httpx.post(app.url + "/install", content=portal.install_event_body(), headers=FORM).is_success
        template = portal.install_event_body()
        with Flood(app, template) as flood:
            while flood.sent < 200 and not flood.exhausted:  # the flood is well under way
                time.sleep(0.05)
            tokens = []
            for index in range(5):
                token, body = portal.robot_call_body({"first_name": f"Anna {index}"})
                reply = httpx.post(app.url + "/robot", content=body, headers=FORM, timeout=30)
                assert reply.status_code == 200, reply.text
                tokens.append(token)
            while not all(token in portal.answers for token in tokens) and not flood.exhausted:
                time.sleep(0.05)
            answered_during_flood = not flood.exhausted
    finally:
        app.stop()

    assert answered_during_flood, f"answers came only after the flood ({flood.sent} forged installs)"
    assert all(portal.answers[token]["return_values"]["error"] == "" for token in tokens)
    assert set(flood.statuses) <= {403, 429}, flood.statuses
