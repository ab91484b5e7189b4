"""`python -m repositories.migrate_to_postgres` moves a real embedded installation into PostgreSQL."""

import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
from cryptography.fernet import Fernet

from tests.fake_portal import FakePortal
from tests.pg_server import TestPostgres
from tests.processes import AppProcess, app_env, free_port

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def migrate(workdir: Path, env: dict[str, str]) -> str:
    command = [sys.executable, "-m", "repositories.migrate_to_postgres"]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_embedded_installation_moves_to_postgresql_without_losing_a_call(
    tmp_path: Path, portal: FakePortal, pg_server: TestPostgres
) -> None:
    key = Fernet.generate_key().decode()
    old, new = tmp_path / "embedded", tmp_path / "postgres"
    old.mkdir()
    new.mkdir()
    port = free_port()
    env = app_env(portal, f"http://127.0.0.1:{port}", TOKEN_ENCRYPTION_KEY=key)
    app = AppProcess(old, env, port, tmp_path / "embedded.log")
    try:
        body = portal.install_event_body().encode()
        assert httpx.post(f"{app.url}/install", content=body, headers=FORM).status_code == 200
        portal.hold()  # the portal stalls: the calls stay unfinished in jobs.sqlite3
        tokens = []
        for i in range(8):
            token, call = portal.robot_call_body({"first_name": f"Moved{i}"})
            assert httpx.post(f"{app.url}/robot", content=call.encode(), headers=FORM).status_code == 200
            tokens.append(token)
    finally:
        app.kill_9()
    files = {name: (old / name).read_bytes() for name in ("tokens.json", "jobs.sqlite3")}

    url = pg_server.new_database()
    env_pg = {**env, "DATABASE_URL": url}
    first = migrate(old, env_pg)
    assert "Copied 1 portal(s)" in first
    assert "8 unfinished job(s)" in first
    second = migrate(old, env_pg)  # twice is harmless
    assert "Copied 0 portal(s)" in second
    assert "0 unfinished job(s)" in second
    assert "(8 already there)" in second
    assert {name: (old / name).read_bytes() for name in files} == files

    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (8,)
        stored = conn.execute("SELECT record::text FROM portal_tokens").fetchone()
    assert stored is not None
    assert portal.application_token not in stored[0]  # still encrypted

    portal.release()
    portal.expire_access_tokens()  # the copied refresh token must work too
    app = AppProcess(new, env_pg, port, tmp_path / "postgres.log")
    try:
        portal.wait_for_answers(len(tokens), timeout=30)
    finally:
        app.stop()
    answers = portal.answers
    assert all(answers[token]["return_values"]["error"] == "" for token in tokens)
    assert len(portal.contacts) == len({c["ORIGIN_ID"] for c in portal.contacts}) == len(tokens)
    assert sorted(p.name for p in new.iterdir()) == []
