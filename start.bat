@echo off
rem Install what the app needs (only what changed) and start it.
rem   start.bat                  http://0.0.0.0:8000
rem   set PORT=9000, then start.bat: another port (HOST works the same way)
rem   start.bat --workers 4      extra arguments go to uvicorn
rem   set PYTHON=C:\Python312\python.exe, then start.bat: the Python that creates .venv (3.11+);
rem                              a path with spaces goes in quotes: set PYTHON="C:\Program Files\..."
rem PowerShell: .\start.bat (it does not run scripts from the current folder without .\).
setlocal
cd /d "%~dp0"

rem Double-clicked in Explorer, the script runs under "cmd /c" and its window closes when it ends:
rem then an error waits for a key, so that the message can be read.
rem (Quotes are removed first: a folder such as "Program Files (x86)" must not break the test.)
set "PAUSE_ON_ERROR="
set "CMDLINE=%CMDCMDLINE:"=%"
if /i not "%CMDLINE: /c =%"=="%CMDLINE%" set "PAUSE_ON_ERROR=1"

set "VENV_PY=.venv\Scripts\python.exe"
set "STAMP=.venv\requirements.installed.txt"

if exist "%VENV_PY%" goto :venv_ready
if defined PYTHON goto :create_venv
rem The py launcher comes with python.org's installer; without it, python.exe from PATH.
set "PYTHON=python"
where py >nul 2>&1
if not errorlevel 1 set "PYTHON=py -3"

:create_venv
echo start.bat: creating the virtual environment in .venv with %PYTHON%
rem Its error output is not hidden: if this fails, its own message says why.
%PYTHON% -m venv .venv
if exist "%VENV_PY%" goto :venv_ready
if exist .venv rmdir /s /q .venv
echo start.bat: could not create .venv with %PYTHON% (the reason is above). 1>&2
echo           Install Python 3.11 or newer from python.org with the "py launcher" or 1>&2
echo           "Add python.exe to PATH" option ticked, or set PYTHON to your python.exe. 1>&2
goto :fail

:venv_ready
"%VENV_PY%" -c "import sys; sys.exit(sys.version_info < (3, 11))"
if not errorlevel 1 goto :version_ok
echo start.bat: the app needs Python 3.11 or newer. Delete the .venv folder, then run start.bat 1>&2
echo           again with a newer Python (set PYTHON=C:\path\to\python.exe). 1>&2
goto :fail

:version_ok
rem Install only when requirements.txt differs from the copy saved by the last successful install.
fc /b requirements.txt "%STAMP%" >nul 2>&1
if not errorlevel 1 goto :installed
echo start.bat: installing requirements.txt into .venv
"%VENV_PY%" -m pip install --disable-pip-version-check -q -r requirements.txt
if errorlevel 1 goto :fail
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
rem PORT stays in the environment: the app checks it against APP_BASE_URL.
"%VENV_PY%" -m uvicorn main:app --host %HOST% --port %PORT% --no-access-log %*
if errorlevel 1 goto :fail
exit /b 0

:fail
if defined PAUSE_ON_ERROR pause
exit /b 1
