#!/usr/bin/env bash
# Install what the app needs (only what changed) and start it.
#   ./start.sh                   http://0.0.0.0:8000
#   PORT=9000 ./start.sh         another port (HOST works the same way)
#   ./start.sh --workers 4       extra arguments go to uvicorn
#   PYTHON=python3.12 ./start.sh pick the interpreter that creates .venv (3.11 or newer)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
VENV_PY=.venv/bin/python
STAMP=.venv/requirements.installed.txt

if [ ! -x "$VENV_PY" ]; then
    echo "start.sh: creating the virtual environment in .venv with $PYTHON"
    if ! "$PYTHON" -m venv .venv; then
        rm -rf .venv
        echo "start.sh: could not create .venv. Install Python 3.11+ with venv support" >&2
        echo "          (Debian/Ubuntu: apt-get install python3-venv), or set PYTHON=/path/to/python3." >&2
        exit 1
    fi
fi

if ! "$VENV_PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "start.sh: the app needs Python 3.11 or newer; .venv has $("$VENV_PY" -V 2>&1)." >&2
    echo "          Remove .venv and run again with PYTHON=/path/to/python3.11 ./start.sh" >&2
    exit 1
fi

# Install only when requirements.txt differs from the copy saved by the last successful install.
if ! cmp -s requirements.txt "$STAMP"; then
    echo "start.sh: installing requirements.txt into .venv"
    "$VENV_PY" -m pip install --disable-pip-version-check -q -r requirements.txt
    cp requirements.txt "$STAMP"
fi

if [ ! -f .env ]; then
    cp .env.example .env
    chmod 600 .env
    echo "start.sh: created .env from .env.example. Set BITRIX_CLIENT_ID, BITRIX_CLIENT_SECRET,"
    echo "          APP_BASE_URL (and BITRIX_PORTAL_URL) in .env, then restart. See README.md."
fi

# --no-access-log: the app logs every request itself (with a request id) and never a query string.
# PORT stays in the environment: the app checks it against APP_BASE_URL.
export HOST="${HOST:-0.0.0.0}" PORT="${PORT:-8000}"
exec "$VENV_PY" -m uvicorn main:app --host "$HOST" --port "$PORT" --no-access-log "$@"
