@echo off
rem Install what the app needs (only what changed) and start it.
rem   start.bat                  http://0.0.0.0:8000
rem   set PORT=9000, then start.bat: another port (HOST works the same way)
rem   start.bat --workers 4      extra arguments go to uvicorn
setlocal
cd /d "%~dp0"

set "VENV_PY=.venv\Scripts\python.exe"
set "STAMP=.venv\requirements.installed.txt"

if exist "%VENV_PY%" goto :venv_ready
echo start.bat: creating the virtual environment in .venv
py -3 -m venv .venv 2>nul
if not exist "%VENV_PY%" python -m venv .venv
if exist "%VENV_PY%" goto :venv_ready
if exist .venv rmdir /s /q .venv
echo start.bat: could not create .venv. Install Python 3.11 or newer from python.org, 1>&2
echo           with the "py launcher" or "Add python.exe to PATH" option ticked. 1>&2
exit /b 1

:venv_ready
"%VENV_PY%" -c "import sys; sys.exit(sys.version_info < (3, 11))"
if not errorlevel 1 goto :version_ok
echo start.bat: the app needs Python 3.11 or newer. Delete .venv and install a newer Python. 1>&2
exit /b 1

:version_ok
rem Install only when requirements.txt differs from the copy saved by the last successful install.
fc /b requirements.txt "%STAMP%" >nul 2>&1
if not errorlevel 1 goto :installed
echo start.bat: installing requirements.txt into .venv
"%VENV_PY%" -m pip install --disable-pip-version-check -q -r requirements.txt
if errorlevel 1 exit /b 1
copy /y requirements.txt "%STAMP%" >nul

:installed
if exist .env goto :run
copy .env.example .env >nul
echo start.bat: created .env from .env.example. Set BITRIX_CLIENT_ID, BITRIX_CLIENT_SECRET,
echo           APP_BASE_URL and BITRIX_PORTAL_URL in .env, then restart. See README.md.

:run
if not defined HOST set "HOST=0.0.0.0"
if not defined PORT set "PORT=8000"
rem --no-access-log: the app logs every request itself (with a request id) and never a query string.
"%VENV_PY%" -m uvicorn main:app --host %HOST% --port %PORT% --no-access-log %*
exit /b %errorlevel%
