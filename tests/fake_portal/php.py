"""PHP query-string conventions: bracket keys parsed and built as the portal does."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote_plus

_BRACKET_RE = re.compile(r"\[([^\]]*)\]")


# --------------------------------------------------------------------------------------------
# PHP query-string conventions (wire doc 1.2, 3.2, 6.3)
# --------------------------------------------------------------------------------------------


def parse_php_query(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Rebuild PHP bracket keys (``a[b][0]=x``) into nested dicts; 0..n-keyed nodes become lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        _assign(root, _split_key(key), value)
    listified: dict[str, Any] = {key: _listify(value) for key, value in root.items()}
    return listified


def _split_key(key: str) -> list[str]:
    head, bracket, rest = key.partition("[")
    if not bracket or not head:
        return [key]
    return [head, *_BRACKET_RE.findall("[" + rest)]


def _assign(node: dict[str, Any], path: list[str], value: str) -> None:
    *parents, last = path
    for part in parents:
        key = part or _next_index(node)  # PHP: `a[]` appends
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[last or _next_index(node)] = value


def _next_index(node: Mapping[str, Any]) -> str:
    numbers = [int(key) for key in node if key.isdigit()]
    return str(max(numbers) + 1 if numbers else 0)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    items = {key: _listify(value) for key, value in node.items()}
    if items and set(items) == {str(index) for index in range(len(items))}:
        return [items[str(index)] for index in range(len(items))]
    return items


def build_php_query(data: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> str:
    """Encode like PHP ``http_build_query``: brackets as %5B/%5D, ``+`` for spaces, no nulls."""
    pairs: list[tuple[str, str]] = []
    items = data.items() if isinstance(data, Mapping) else data
    for key, value in items:
        _flatten(str(key), value, pairs)
    return "&".join(f"{_php_urlencode(key)}={_php_urlencode(value)}" for key, value in pairs)


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if value is None:
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}[{key}]", item, out)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _flatten(f"{prefix}[{index}]", item, out)
    elif isinstance(value, bool):
        out.append((prefix, "1" if value else "0"))  # PHP casts booleans this way
    else:
        out.append((prefix, str(value)))


def _php_urlencode(text: str) -> str:
    # PHP's urlencode() also escapes "~", which quote_plus leaves alone.
    return quote_plus(text, safe="").replace("~", "%7E")


def php_array(entries: Mapping[str, Any]) -> Any:
    """PHP ``json_encode`` of an array: a list when empty or 0..n-keyed, else an object."""
    if list(entries) == [str(index) for index in range(len(entries))]:
        return list(entries.values())
    return dict(entries)
