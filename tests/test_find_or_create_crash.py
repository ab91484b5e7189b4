"""Find or create stays exactly once across `kill -9` of the real app process in the middle of a pass."""

import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.fake_portal import FakePortal
from tests.processes import AppProcess, app_env, free_port

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
PERSON = {"last_name": "Ivanov", "first_name": "Ivan", "phone": "+79991234567", "email": "ivan@example.com"}
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


def post(url: str, body: str) -> httpx.Response:
    return httpx.post(url, content=body.encode(), headers=FORM, timeout=10)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def crash_and_resume(tmp_path: Path, portal: FakePortal, properties: dict[str, str], after: int) -> str:
    """One robot call; the app dies once `after` replies got through and the next request ran."""
    port = free_port()
    env = app_env(portal, f"http://127.0.0.1:{port}", JOB_LEASE_SECONDS="1")
    log = tmp_path / "app.log"
    app = AppProcess(tmp_path, env, port, log)
    try:
        assert post(f"{app.url}/install", portal.install_event_body()).status_code == 200
        requests = portal.stats["rest_requests"]
        portal.hold(replies=True, after=after)
        token, body = portal.robot_call_body(properties)
        assert post(f"{app.url}/robot", body).status_code == 200
        wait_until(
            lambda: portal.stats["rest_requests"] >= requests + after + 1, "the request the app dies in"
        )
        app.kill_9()
        portal.release()
        app = AppProcess(tmp_path, env, port, log)
        portal.wait_for_answers(1, timeout=30)
    finally:
        app.stop()
    return token


def test_reuse_killed_while_searching_returns_the_same_contact(tmp_path: Path, portal: FakePortal) -> None:
    existing = portal.add_contact({"LAST_NAME": "Ivanov", "PHONE": [{"VALUE": "8 999 123 45 67"}]})

    token = crash_and_resume(tmp_path, portal, {**PERSON, "duplicates": "reuse"}, after=0)

    values = portal.answers[token]["return_values"]
    assert (int(values["contact_id"]), values["duplicate"]) == (existing, "Y")
    assert len(portal.contacts) == 1


def test_reuse_killed_after_creating_returns_the_contact_it_created(
    tmp_path: Path, portal: FakePortal
) -> None:
    # The search (nobody) is answered; the portal creates the contact but the app dies before it hears.
    token = crash_and_resume(tmp_path, portal, {**PERSON, "duplicates": "reuse"}, after=1)

    [contact] = portal.contacts
    values = portal.answers[token]["return_values"]
    assert (int(values["contact_id"]), values["duplicate"]) == (contact["ID"], "N")


def test_update_killed_after_filling_returns_the_same_contact_filled_once(
    tmp_path: Path, portal: FakePortal
) -> None:
    existing = portal.add_contact({"LAST_NAME": "Ivanov", "PHONE": [{"VALUE": "8 999 123 45 67"}]})

    # Search and read are answered; the fill runs but its reply never reaches the app.
    token = crash_and_resume(tmp_path, portal, {**PERSON, "duplicates": "update"}, after=2)

    [contact] = portal.contacts
    values = portal.answers[token]["return_values"]
    assert (int(values["contact_id"]), values["duplicate"]) == (existing, "Y")
    assert contact["EMAIL"] == [{"VALUE": "ivan@example.com", "VALUE_TYPE": "WORK"}]
    assert contact["NAME"] == "Ivan"
