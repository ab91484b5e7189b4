"""Dispatch of REST calls: rate limit, auth, the method table and batch with its references."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from tests.fake_portal.methods import _AUTOMATION_METHODS, _METHODS
from tests.fake_portal.methods_app import _Call
from tests.fake_portal.php import parse_php_query, php_array
from tests.fake_portal.state import PortalError, _ListResult, _State

MAX_BATCH = 50  # batch commands (wire doc 4.3)

# The core's batch reference (`CRestUtil::processBatchElement`, rest/classes/general/rest_util.php):
# `$` + one of the batch's result arrays, case-insensitive, then any non-space text as the path.
_BATCH_REF_RE = re.compile(r"\$(result|next|total|time|error)([^\s]*)", re.IGNORECASE)
_BATCH_KEY_RE = re.compile(r"\$()([^\s]*)", re.IGNORECASE)  # keys: `$keysCache` is '' for them
_PATH_RE = re.compile(r"\[([^\]]+)\]")


# --------------------------------------------------------------------------------------------
# Dispatch: rate limit, auth, batch
# --------------------------------------------------------------------------------------------


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _time_block(start: float, finish: float, operating: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The reply's `time` (wire doc 3.3); cloud portals add the method's `operating` figures (limits.md)."""
    return {
        "start": start,
        "finish": finish,
        "duration": finish - start,
        "processing": finish - start,
        "date_start": _iso(start),
        "date_finish": _iso(finish),
        **(operating or {}),
    }


def _method_name(raw: str) -> str:
    name = raw.strip("/").lower()  # Bitrix method names are case-insensitive
    return name[: -len(".json")] if name.endswith(".json") else name


def _lower_keys(params: Mapping[str, Any]) -> dict[str, Any]:
    return {key.lower(): value for key, value in params.items()}


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "y", "yes")


@dataclass
class _BatchOutcome:
    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    nexts: dict[str, Any] = field(default_factory=dict)
    times: dict[str, Any] = field(default_factory=dict)

    def add(self, cmd_id: str, result: Any, started: float, operating: Mapping[str, Any]) -> None:
        if isinstance(result, _ListResult):
            self.totals[cmd_id] = result.total
            if result.next is not None:
                self.nexts[cmd_id] = result.next
            result = result.items
        self.results[cmd_id] = result
        self.times[cmd_id] = _time_block(started, time.time(), operating)

    def references(self) -> dict[str, Any]:
        """What `$result[...]` and friends look into: the core's `$arResult` (CRestProvider::methodsBatch)."""
        return {
            "result": self.results,
            "next": self.nexts,
            "total": self.totals,
            "time": self.times,
            "error": self.errors,
        }

    def to_php(self) -> dict[str, Any]:
        return {
            "result": php_array(self.results),
            "result_error": php_array(self.errors),
            "result_total": php_array(self.totals),
            "result_next": php_array(self.nexts),
            "result_time": php_array(self.times),
        }


def _resolve_path(references: Mapping[str, Any], name: str, path: str) -> Any:
    """Walk `[a][b]...` from the named array; stop (keeping the node reached) at a missing key."""
    node: Any = references.get(name)  # case-sensitive: `$RESULT[...]` finds no array
    for key in _PATH_RE.findall(path):
        if isinstance(node, dict) and key in node and node[key] is not None:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node) and node[int(key)] is not None:
            node = node[int(key)]
        else:
            break  # PHP: `isset($r[$key])` failed
    return node


def _substitute_value(value: str, references: Mapping[str, Any], pattern: re.Pattern[str]) -> Any:
    """`CRestUtil::processBatchElement`: a reference that is the whole value becomes what it points to
    (any type, even an array or null); inside longer text it is replaced only by a string."""
    for match in list(pattern.finditer(value)):
        name, path = match.group(1), match.group(2)
        if not _PATH_RE.search(path):
            continue
        target = _resolve_path(references, name, path)
        if match.group(0) == value:
            return target
        if isinstance(target, str):
            value = value.replace(match.group(0), target)
    return value


def _substitute(value: Any, references: Mapping[str, Any]) -> Any:
    """`CRestUtil::processBatchStructure` over every key and value of a command's parameters.

    Every value (not just the documented `$result[cmd][field]`) is scanned, case-insensitively, for
    `$result`, `$next`, `$total`, `$time` and `$error`; there is no escape. Keys are scanned too,
    with an empty list of names, so a key holding `$[...]` resolves to nothing (wire doc 4.3).
    """
    if not isinstance(value, dict | list):
        return _substitute_value(value, references, _BATCH_REF_RE) if isinstance(value, str) else value
    items = value.items() if isinstance(value, dict) else enumerate(value)
    rebuilt: dict[Any, Any] = {}
    for key, item in items:
        new_key = _substitute_value(key, references, _BATCH_KEY_RE) if isinstance(key, str) else key
        rebuilt["" if new_key is None else new_key] = _substitute(item, references)
    if isinstance(value, list):
        return list(rebuilt.values())
    return rebuilt


def _batch_commands(cmd: Any) -> dict[str, str]:
    if isinstance(cmd, dict):
        return {str(key): str(value) for key, value in cmd.items()}
    if isinstance(cmd, list):
        return {str(index): str(value) for index, value in enumerate(cmd)}
    return {}


class _Dispatcher:
    """Runs one REST HTTP request; the caller holds ``state.lock``."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def serve(self, method: str, params: dict[str, Any]) -> Any:
        state = self.state
        state.stats["rest_requests"] += 1
        if not state.bucket.allow():  # counted per HTTP request, before auth (wire doc 4.1)
            state.stats["rate_limited"] += 1
            raise PortalError(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        if "/" in method:  # webhook URL form; this portal has no webhooks (wire doc 9)
            raise PortalError(401, "NO_AUTH_FOUND", "Wrong authorization data")
        token = params.get("auth")
        user_id = state.user_for(token if isinstance(token, str) else None)
        if method == "batch":
            return self.batch(user_id, params)
        return self.call(method, user_id, params)

    def call(self, method: str, user_id: int, params: dict[str, Any]) -> Any:
        self.state.stats["rest_commands"] += 1
        self.state.count_method(method)
        failure = self.state.take_failure(method)
        if failure is not None:
            raise failure
        handler = _METHODS.get(method)
        if handler is None or (method in _AUTOMATION_METHODS and not self.state.config.automation_rules):
            raise PortalError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        self.state.check_operating(method)  # before the call, per method (limits.md)
        started = time.time()
        try:
            return handler(_Call(self.state, user_id, params))
        finally:
            self.state.charge_operating(method, time.time() - started)

    def batch(self, user_id: int, params: dict[str, Any]) -> Any:
        self.state.stats["batches"] += 1
        self.state.count_method("batch")
        failure = self.state.take_failure("batch")
        if failure is not None:
            raise failure
        commands = _batch_commands(params.get("cmd"))
        if len(commands) > MAX_BATCH:
            raise PortalError(400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded")
        halt = _truthy(params.get("halt"))
        outcome = _BatchOutcome()
        for cmd_id, command in commands.items():
            if not self.run_command(user_id, cmd_id, command, outcome) and halt:
                break
        return outcome.to_php()

    def run_command(self, user_id: int, cmd_id: str, command: str, outcome: _BatchOutcome) -> bool:
        raw_method, _, query = command.partition("?")
        method = _method_name(raw_method)
        started = time.time()
        try:
            if method == "batch":
                raise PortalError(
                    405, "ERROR_BATCH_METHOD_NOT_ALLOWED", "Method is not allowed for batch usage"
                )
            parsed = parse_php_query(parse_qsl(query, keep_blank_values=True))
            params = _lower_keys(_substitute(parsed, outcome.references()))
            result = self.call(method, user_id, params)
            # Each nested call counts against its own method; the outer batch does not (limits.md).
            outcome.add(cmd_id, result, started, self.state.operating_figures(method))
        except PortalError as exc:
            self.state.note_error(f"batch[{cmd_id}] {method}", exc)
            outcome.errors[cmd_id] = exc.body()
            return False
        return True
