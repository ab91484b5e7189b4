"""The naive baseline for the burst scenario: one REST request per command, no batching.

For every robot call in `--bodies` (one form body per line): `crm.contact.add`, then
`bizproc.event.send` with the new contact's id, one request after the other over one keep-alive
connection, with the portal token the app stored at install (`--token-file`). A request refused
with 503 `QUERY_LIMIT_EXCEEDED` is retried after an exponential back-off (50 ms doubling to 2 s,
reset after a success), as the Bitrix24 docs advise.

    python -m bench.naive --token-file tokens.json --bodies calls.txt --out naive.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx

FIRST_DELAY, MAX_DELAY = 0.05, 2.0
MAX_ATTEMPTS = 200  # per request: a bound, far above what the bucket ever needs


class Naive:
    """One stream of single REST calls with back-off on the rate limit."""

    def __init__(self, client: httpx.Client, endpoint: str, token: str, deadline: float) -> None:
        self.client, self.endpoint, self.token, self.deadline = client, endpoint, token, deadline
        self.requests = 0
        self.rate_limited = 0
        self._delay = FIRST_DELAY

    def call(self, method: str, params: dict[str, Any]) -> Any:
        for _ in range(MAX_ATTEMPTS):
            if time.monotonic() > self.deadline:
                raise TimeoutError("the naive run's time limit was reached")
            self.requests += 1
            reply = self.client.post(f"{self.endpoint}{method}", json={**params, "auth": self.token})
            data = reply.json()
            if reply.status_code == 503 and data.get("error") == "QUERY_LIMIT_EXCEEDED":
                self.rate_limited += 1
                time.sleep(self._delay)
                self._delay = min(self._delay * 2, MAX_DELAY)
                continue
            self._delay = FIRST_DELAY
            if reply.status_code != 200 or "error" in data:
                raise RuntimeError(f"{method}: {reply.status_code} {data}")
            return data["result"]
        raise RuntimeError(f"{method}: still rate limited after {MAX_ATTEMPTS} attempts")


def contact_fields(form: dict[str, str]) -> dict[str, Any]:
    """The robot's inputs as CRM fields, taken as they come (no validation: this is the baseline)."""
    fields: dict[str, Any] = {
        "LAST_NAME": form.get("properties[last_name]", ""),
        "NAME": form.get("properties[first_name]", ""),
        "SECOND_NAME": form.get("properties[second_name]", ""),
    }
    if form.get("properties[phone]"):
        fields["PHONE"] = [{"VALUE": form["properties[phone]"], "VALUE_TYPE": "WORK"}]
    if form.get("properties[email]"):
        fields["EMAIL"] = [{"VALUE": form["properties[email]"], "VALUE_TYPE": "WORK"}]
    return fields


def run(args: argparse.Namespace) -> dict[str, Any]:
    stored = json.loads(Path(args.token_file).read_text())
    record = next(iter(stored["portals"].values()))
    if urlsplit(record["client_endpoint"]).hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit("the naive client only talks to the fake portal on this machine")
    bodies = [line for line in Path(args.bodies).read_text().splitlines() if line]
    deadline = time.monotonic() + args.time_limit
    answered = 0
    with httpx.Client(timeout=30.0) as client:
        naive = Naive(client, record["client_endpoint"], record["access_token"], deadline)
        started = time.perf_counter()
        for body in bodies:
            form = dict(parse_qsl(body, keep_blank_values=True))
            contact_id = int(naive.call("crm.contact.add", {"fields": contact_fields(form)}))
            answer = {
                "event_token": form["event_token"],
                "return_values": {"contact_id": contact_id, "error": ""},
                "log_message": f"Contact {contact_id} created",
            }
            naive.call("bizproc.event.send", answer)
            answered += 1
        wall = time.perf_counter() - started
    return {
        "calls": len(bodies),
        "answered": answered,
        "wall_s": wall,
        "requests": naive.requests,
        "rate_limited": naive.rate_limited,
    }


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--token-file", required=True, help="the app's tokens.json after install")
    parser.add_argument("--bodies", required=True, help="robot call bodies, one per line")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    parser.add_argument("--time-limit", type=float, default=150.0, help="seconds for the whole run")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    Path(args.out).write_text(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
