"""Process faults: other processes reading the journal, `kill -9`, a respawned worker, a restart.

Each test runs the real app (uvicorn) and real readers (the sqlite3 command line and Python's
backup API, as the README's backup line does), then kills the app and checks that every call it
acknowledged is answered, once.
"""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fake_portal import FakePortal
from tests.processes import AppProcess, app_env, free_port

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL and /proc are Linux")
PYTHON_BACKUP = "import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))"


def post(url: str, body: str) -> httpx.Response:
    return httpx.post(url, content=body.encode(), headers=FORM, timeout=10)


def read_and_back_up(workdir: Path, round_no: int) -> None:
    """What an operator does while the app runs: a backup, a look with the sqlite3 shell."""
    journal = workdir / "jobs.sqlite3"
    target = workdir / f"backup-{round_no}.sqlite3"
    subprocess.run([sys.executable, "-c", PYTHON_BACKUP, str(journal), str(target)], check=True, timeout=30)
    if shutil.which("sqlite3"):
        subprocess.run(["sqlite3", str(journal), "SELECT COUNT(*) FROM jobs;"], check=True, timeout=30)
        subprocess.run(["sqlite3", str(journal), f".backup '{target}'"], check=True, timeout=30)


def children(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return set()
    return {int(part) for part in text.split()}


def workers(pid: int) -> set[int]:
    """uvicorn's worker processes (multiprocessing's resource tracker is a child too)."""
    found = set()
    for child in children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(child)
        except FileNotFoundError:
            continue
    return found


def wait_for(check: "object", timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill_all(app: AppProcess) -> None:
    """`kill -9` of the whole app: every worker process, then the supervisor."""
    for child in children(app.process.pid):
        os.kill(child, signal.SIGKILL)
    app.kill_9()


def journal_rows(workdir: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(workdir / "jobs.sqlite3") as db:
        return db.execute("SELECT id, event_token FROM jobs").fetchall()


def assert_each_answered_once(portal: FakePortal, tokens: list[str], workdir: Path) -> None:
    assert sorted(portal.answers) == sorted(tokens)
    assert all(answer["return_values"]["error"] == "" for answer in portal.answers.values())
    assert len(portal.contacts) == len(tokens)
    rows = journal_rows(workdir)
    assert sorted(token for _, token in rows) == sorted(tokens)
    assert len({job_id for job_id, _ in rows}) == len(tokens)


def test_backups_and_sqlite3_reads_during_calls_lose_nothing_after_kill_9(
    tmp_path: Path, portal: FakePortal
) -> None:
    port = free_port()
    env = app_env(portal, f"http://127.0.0.1:{port}")
    app = AppProcess(tmp_path, env, port, tmp_path / "app.log")
    tokens: list[str] = []
    try:
        assert post(f"{app.url}/install", portal.install_event_body()).status_code == 200
        portal.hold()  # the jobs stay pending: only the journal holds them when the app dies
        for i in range(10):
            token, body = portal.robot_call_body({"first_name": f"Ivan{i}"})
            assert post(f"{app.url}/robot", body).status_code == 200
            tokens.append(token)
            read_and_back_up(tmp_path, i)
        kill_all(app)
        portal.release()
        app = AppProcess(tmp_path, env, port, tmp_path / "app.log")
        portal.wait_for_answers(len(tokens), timeout=60)
    finally:
        app.stop()

    assert_each_answered_once(portal, tokens, tmp_path)


def test_a_respawned_worker_and_backups_lose_nothing(tmp_path: Path, portal: FakePortal) -> None:
    port = free_port()
    env = app_env(portal, f"http://127.0.0.1:{port}")
    app = AppProcess(tmp_path, env, port, tmp_path / "app.log", workers=2)
    tokens: list[str] = []
    try:
        assert post(f"{app.url}/install", portal.install_event_body()).status_code == 200
        portal.hold()
        for i in range(10):
            if i == 4:  # one worker dies; uvicorn starts another in its place
                before = workers(app.process.pid)
                assert len(before) == 2
                os.kill(min(before), signal.SIGKILL)
                wait_for(lambda: len(workers(app.process.pid) - before) == 1, 30, "a respawned worker")  # noqa: B023
                time.sleep(1.0)  # let the new worker open the journal
            token, body = portal.robot_call_body({"first_name": f"Ivan{i}"})
            assert post(f"{app.url}/robot", body).status_code == 200
            tokens.append(token)
            read_and_back_up(tmp_path, i)
        kill_all(app)
        portal.release()
        app = AppProcess(tmp_path, env, port, tmp_path / "app.log")
        portal.wait_for_answers(len(tokens), timeout=60)
    finally:
        app.stop()

    assert_each_answered_once(portal, tokens, tmp_path)


def test_restart_after_kill_9_resumes_claimed_jobs_without_waiting_out_the_lease(
    tmp_path: Path, portal: FakePortal
) -> None:
    port = free_port()
    # A lease far longer than the wait below: only reclaiming at once can pass.
    env = app_env(portal, f"http://127.0.0.1:{port}", JOB_LEASE_SECONDS="600")
    app = AppProcess(tmp_path, env, port, tmp_path / "app.log")
    tokens: list[str] = []
    try:
        assert post(f"{app.url}/install", portal.install_event_body()).status_code == 200
        portal.hold()
        for i in range(5):
            token, body = portal.robot_call_body({"first_name": f"Ivan{i}"})
            assert post(f"{app.url}/robot", body).status_code == 200
            tokens.append(token)
        wait_for(lambda: portal.stats["held_requests"] > 0, 30, "the worker's request in flight")
        kill_all(app)
        portal.release()
        app = AppProcess(tmp_path, env, port, tmp_path / "app.log")
        portal.wait_for_answers(len(tokens), timeout=30)
    finally:
        app.stop()

    assert_each_answered_once(portal, tokens, tmp_path)
