"""No acknowledged robot call is lost: `kill -9` of the real app process, then a restart."""

import json
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fake_portal import FakePortal
from tests.processes import AppProcess, app_env, free_port

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


def post(url: str, body: str) -> httpx.Response:
    return httpx.post(url, content=body.encode(), headers=FORM, timeout=10)


def test_kill_9_with_pending_jobs_then_restart_answers_every_workflow_once(
    tmp_path: Path, portal: FakePortal
) -> None:
    port = free_port()
    env = app_env(portal, f"http://127.0.0.1:{port}", JOB_LEASE_SECONDS="1")
    log = tmp_path / "app.log"
    app = AppProcess(tmp_path, env, port, log)
    try:
        assert post(f"{app.url}/install", portal.install_event_body()).status_code == 200
        # The portal creates the contacts but its reply stalls: the app dies not knowing their ids.
        portal.hold(replies=True)
        tokens = []
        for i in range(40):
            token, body = portal.robot_call_body({"first_name": f"Ivan{i}", "phone": "+79991234567"})
            assert post(f"{app.url}/robot", body).status_code == 200
            tokens.append(token)
        deadline = time.monotonic() + 10
        while not portal.contacts and time.monotonic() < deadline:
            time.sleep(0.05)
        assert portal.contacts, "the first batch never reached the portal"
        app.kill_9()
        portal.release()
        app = AppProcess(tmp_path, env, port, log)
        portal.wait_for_answers(len(tokens), timeout=30)
    finally:
        app.stop()

    assert sorted(portal.answers) == sorted(tokens)
    assert all(a["return_values"]["error"] == "" for a in portal.answers.values())
    assert len(portal.contacts) == len(tokens)
    assert len({c["ORIGIN_ID"] for c in portal.contacts}) == len(tokens)
    answered_ids = sorted(int(a["return_values"]["contact_id"]) for a in portal.answers.values())
    assert answered_ids == sorted(c["ID"] for c in portal.contacts)
    secrets = {portal.config.client_secret, portal.application_token, *tokens}
    stored = json.loads((tmp_path / "tokens.json").read_text())["portals"][portal.config.member_id]
    secrets |= {stored["access_token"], stored["refresh_token"]}
    logged = log.read_text()
    assert [s for s in secrets if s in logged] == []


def _install_again(url: str, portal: FakePortal) -> None:
    """As an administrator would, installing again in a moment while the portal is busy.

    While the workers use most of the portal's rate limit, an install's proof is refused rather
    than queued (robot work comes first): 429 `too_many_installs` from this process's guard, or
    502 naming QUERY_LIMIT_EXCEEDED when the three processes together overran the portal's
    bucket. Each failed this test now and then (2 runs in 5, and once in CI).
    """
    deadline = time.monotonic() + 20
    while True:
        reply = post(f"{url}/install", portal.install_event_body())
        busy = reply.status_code == 429 or "QUERY_LIMIT_EXCEEDED" in reply.text
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert reply.status_code == 200, reply.text


def test_several_worker_processes_answer_every_call_once(tmp_path: Path, portal: FakePortal) -> None:
    port = free_port()
    app = AppProcess(
        tmp_path, app_env(portal, f"http://127.0.0.1:{port}"), port, tmp_path / "app.log", workers=3
    )
    try:
        assert post(f"{app.url}/install", portal.install_event_body()).status_code == 200
        tokens = []
        for i in range(60):
            token, body = portal.robot_call_body({"first_name": f"Ivan{i}"})
            assert post(f"{app.url}/robot", body).status_code == 200
            tokens.append(token)
            if i == 30:  # a second install while calls are being worked on must not lose a token
                _install_again(app.url, portal)
        portal.wait_for_answers(len(tokens), timeout=30)
    finally:
        app.stop()

    assert sorted(portal.answers) == sorted(tokens)
    assert len(portal.contacts) == len(tokens)
    assert json.loads((tmp_path / "tokens.json").read_text())["portals"][portal.config.member_id]
