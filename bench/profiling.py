"""Scenario profile: where the acknowledgement time goes (pyinstrument, via bench/profile_ack.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from typing import Any

from bench.harness import PROJECT, RESULTS, Bench, BenchError, _clean_env

# --------------------------------------------------------------------------------------------
# Scenario 4: profile of the acknowledgement path
# --------------------------------------------------------------------------------------------


def scenario_profile(bench: Bench) -> dict[str, Any]:
    if importlib.util.find_spec("pyinstrument") is None:
        message = "skipped: pyinstrument is not installed (pip install -r bench/requirements.txt)"
        print(f"  profile {message}", flush=True)
        return {"skipped": message}
    bench.portal.release()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = bench.workdir / "profile.json"
    workdir = bench.workdir / "profile"
    workdir.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "bench.profile_ack", "--portal-url", bench.portal.url]
    command += ["--calls", str(bench.plan.profile_calls), "--concurrency", str(bench.plan.concurrency)]
    command += ["--workdir", str(workdir), "--out", str(out), "--report-dir", str(RESULTS)]
    process = bench.processes.start(command, cwd=PROJECT, env=_clean_env(), log=bench.workdir / "profile.log")
    try:
        process.wait(300)
    except subprocess.TimeoutExpired as exc:
        raise BenchError("the profile did not finish in time") from exc
    finally:
        bench.processes.stop(process)
        bench.portal.release()
    if process.returncode != 0 or not out.exists():
        raise BenchError(f"the profile failed ({process.returncode}); see {bench.workdir}/profile.log")
    result: dict[str, Any] = json.loads(out.read_text())
    return result
