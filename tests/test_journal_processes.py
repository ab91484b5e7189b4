"""Several processes add the same robot calls to one SQLite journal: each is stored and created once.

uvicorn --workers N runs N processes on one journal file, and the portal may deliver a call
again to another worker while the first still holds it. Within one process a second
SqliteDatabase on the same file is refused, so only real processes can race each other here.
"""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.processes import PROJECT

# Each process adds 30 groups of 5, 40 or 100 calls whose tokens overlap with the other processes'
# (and repeat inside a group): redeliveries racing first deliveries, across chunks of one group.
ADDER = """
import asyncio, json, random, sys, time
from pathlib import Path
from repositories.job_journal import NewJob, SqliteJobJournal
from repositories.sqlite_db import SqliteDatabase

async def main(path, seed):
    db = SqliteDatabase(Path(path))
    journal = SqliteJobJournal(db)
    rng = random.Random(seed)
    out = []
    for number in range(30):
        tokens = [f"r{number}-{rng.randrange(120)}" for _ in range(rng.choice([5, 40, 100]))]
        jobs = [NewJob(token, "m", "w", "d", time.time() + 600, {}) for token in tokens]
        results = await asyncio.gather(*(journal.add(job) for job in jobs))
        out += [(token, job_id, created) for token, (job_id, created) in zip(tokens, results)]
    db.close()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_processes_racing_on_one_journal_store_and_create_each_call_once(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    sqlite3.connect(path).close()
    command = [sys.executable, "-c", ADDER, str(path)]
    adders = [
        subprocess.Popen([*command, str(seed)], cwd=PROJECT, stdout=subprocess.PIPE, text=True)
        for seed in range(3)
    ]
    outputs = [adder.communicate(timeout=120)[0] for adder in adders]
    assert [adder.returncode for adder in adders] == [0, 0, 0]

    created: dict[str, int] = {}
    ids: dict[str, set[int]] = {}
    for output in outputs:
        for token, job_id, new in json.loads(output):
            created[token] = created.get(token, 0) + int(new)
            ids.setdefault(token, set()).add(job_id)
    with sqlite3.connect(path) as db:
        stored = dict(db.execute("SELECT event_token, id FROM jobs").fetchall())
    assert stored.keys() == created.keys()
    assert {token: count for token, count in created.items() if count != 1} == {}
    assert all(job_ids == {stored[token]} for token, job_ids in ids.items())
