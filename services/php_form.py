"""PHP's form decoding (`parse_str`, `$_POST`), in one pass and with a bounded cost.

The portal builds its bodies with PHP (`http_build_query`), so the app reads them the way PHP
would: php-src `main/php_variables.c`, `add_post_var` (split on `&`, then on the first `=`,
`php_url_decode` both halves) and `php_register_variable_ex` (the bracket rules below).

The body is not authenticated yet when it is parsed, so nothing here may cost more than a few
milliseconds, whatever the body. Before any parsing, one scan in C each refuses more than
`MAX_FIELDS` fields (PHP's `max_input_vars`), more than `MAX_ESCAPES` escapes and malformed ones;
while parsing, keys over `MAX_KEY_BYTES` and more than `MAX_INDEXES` bracket levels in all are
refused. A body without an escaped `&` or `=` (a portal's usual one) is decoded in one C pass and
then split; key parses are cached.
"""

import codecs
import re
from collections.abc import Iterable
from functools import lru_cache
from itertools import repeat
from typing import Any

from services.errors import BadRequest, PayloadTooLarge

MAX_FIELDS = 1000  # PHP's `max_input_vars` default, which the portal itself runs with
MAX_NESTING = 64  # PHP's `max_input_nesting_level`: a deeper key drops its whole variable, as in PHP
MAX_KEY_BYTES = 512  # the longest key a portal sends is `properties[<property code>][<index>]`
MAX_INDEXES = 1024  # bracket levels in all keys together: a robot call has about 40
MAX_ESCAPES = 65536  # `%XX` in the whole body: a robot call's inputs are names, a phone, an e-mail

# PHP's `isspace()` (C locale): one of these right after `[` is skipped when looking for `]`.
_SPACE = frozenset(" \t\n\v\f\r")
# `ZEND_HANDLE_NUMERIC_STR`: keys spelled as a canonical decimal integer are integer keys.
_INT_KEY = re.compile(r"0|-?[1-9][0-9]{0,18}")
_LONG = (-(2**63), 2**63 - 1)
_NUMERIC = frozenset("-0123456789")  # how an index that may be an integer key starts
_BAD_ESCAPE = "The form has a '%' that is not followed by two hex digits."


class _Array(dict[str, Any]):
    """A PHP array while it is built: string keys, and PHP's next free integer key for `[]`."""

    __slots__ = ("budget", "nested", "next_index")

    def __init__(self, budget: int = 0) -> None:
        super().__init__()
        self.next_index = _LONG[0]  # PHP 8.3: no integer key yet
        self.budget = budget  # on the root only: bracket levels the rest of the body may use
        self.nested = False  # whether an array was ever put in it: only then has `_listify` to look

    def put(self, key: str | None, value: Any) -> None:
        if key is None:  # `a[]=x` appends at the next free integer key
            index = 0 if self.next_index == _LONG[0] else self.next_index
            key = str(index)
            self.next_index = index + 1
        elif key[:1] in _NUMERIC:
            number = _integer(key)
            if number is not None and number >= self.next_index:
                self.next_index = number + 1
        self[key] = value

    def child(self, key: str | None) -> "_Array":
        """The array at `key`, made (or made of a scalar) as PHP does for `a[key][...]`."""
        node = self.get(key) if key is not None else None
        if not isinstance(node, _Array):
            node = _Array()
            self.put(key, node)
            self.nested = True
        return node


@lru_cache(maxsize=2048)
def _integer(key: str) -> int | None:
    """The key as PHP's integer key, if it is one (`ZEND_HANDLE_NUMERIC_STR`); cached like `_key`."""
    if _INT_KEY.fullmatch(key):
        number = int(key)
        if _LONG[0] <= number <= _LONG[1]:
            return number
    return None


def parse_php_form(body: bytes | str) -> dict[str, Any]:
    """The form as PHP's `$_POST` holds it: nested dicts, and lists where the keys are 0..n-1.

    Raises:
        PayloadTooLarge: more than `MAX_FIELDS` fields, or a key longer than `MAX_KEY_BYTES`.
    """
    raw = body.encode("utf-8") if isinstance(body, str) else body
    _check_size(raw)
    root = _Array(MAX_INDEXES)
    for key, _, value in _fields(raw):
        path = _key(key)  # refuses a key longer than MAX_KEY_BYTES
        if path is None:
            continue
        name, indexes, index, number = path
        if index is not None:
            # One index, `auth[domain]` or `document_id[0]`: nearly all of a portal's keys, so
            # `_register` and `_Array.put` are inlined here for speed.
            root.budget -= 1
            node = root.get(name)
            if node.__class__ is not _Array:
                node = root.child(name)
            if number is not None and number >= node.next_index:
                node.next_index = number + 1
            node[index] = value
        elif not indexes:
            root[name] = value  # a plain name: never appended to at the top level
        else:
            _register(root, name, indexes, value)
    if root.budget < 0:
        raise PayloadTooLarge(f"The form's keys nest more than {MAX_INDEXES} bracket levels in all.")
    # The top level stays a mapping even for `0=a&1=b`: callers look keys up in it.
    return {key: _listify(value) if value.__class__ is _Array else value for key, value in root.items()}


def _fields(raw: bytes) -> Iterable[tuple[str, str, str]]:
    """The decoded (name, `=`, value) triples, split on `&` and then on the first `=`, as PHP does."""
    if b"%26" in raw or b"%3D" in raw or b"%3d" in raw:
        # An escaped `&` or `=`: split first, then decode each half.
        pairs = (pair.partition(b"=") for pair in raw.split(b"&") if pair)
        return [(_decode(key), "=", _decode(value)) for key, _, value in pairs]
    # No escaped separator (a portal's usual body): decoding first splits the same, in one C pass.
    # An empty piece (`a=1&&b=2`) has an empty name, which `_key` skips as PHP skips the piece.
    return map(str.partition, _decode(raw).split("&"), repeat("="))


def _check_size(raw: bytes) -> None:
    """Refuse what no portal sends, before any parsing: each check is one scan in C."""
    if raw.count(b"&") >= MAX_FIELDS:
        raise PayloadTooLarge(f"The form has more than {MAX_FIELDS} fields (PHP's max_input_vars).")
    if raw.count(b"%") > MAX_ESCAPES:
        raise PayloadTooLarge(f"The form has more than {MAX_ESCAPES} percent-escapes.")


def _decode(raw: bytes) -> str:
    """`php_url_decode`: `+` is a space and `%XX` a byte; then UTF-8, as the portal sends it.

    Raises:
        BadRequest: a `%` without two hex digits. PHP keeps it as it is, but `urlencode()` never
            writes one, so no portal does.
    """
    if b"+" in raw:
        raw = raw.replace(b"+", b" ")
    if b"%" in raw:
        # `%XX` -> `\xXX`, decoded by the C codec: an order of magnitude faster than a loop over
        # the escapes. Backslashes are doubled first so that only our escapes are escapes, and
        # so the codec's only possible complaint is an `\x` without two hex digits.
        try:
            raw = codecs.escape_decode(raw.replace(b"\\", b"\\\\").replace(b"%", b"\\x"))[0]
        except ValueError:
            raise BadRequest(_BAD_ESCAPE) from None
    return raw.decode("utf-8", "replace")


def _register(root: _Array, name: str, indexes: tuple[str | None, ...], value: str) -> None:
    """`php_register_variable_ex` for a key with brackets, such as `document_id[0]`."""
    if indexes is _TOO_DEEP:  # nested beyond PHP's limit: PHP drops the whole variable
        root.pop(name, None)
        return
    root.budget -= len(indexes)
    if root.budget < 0:
        raise PayloadTooLarge(f"The form's keys nest more than {MAX_INDEXES} bracket levels in all.")
    node = root.child(name)
    for index in indexes[:-1]:
        node = node.child(index)
    node.put(indexes[-1], value)


_TOO_DEEP: tuple[str | None, ...] = (None,) * (MAX_NESTING + 1)


@lru_cache(maxsize=2048)
def _key(key: str) -> tuple[str, tuple[str | None, ...], str | None, int | None] | None:
    """The variable name and bracket indexes of a decoded key, as PHP reads them; None to skip it.

    For a key with one non-empty index (`auth[domain]`, `document_id[0]`), the third item is that
    index and the fourth its number if it is an integer key; otherwise both are None.
    Cached: a portal sends the same few dozen keys in every call. Bounded, so any key costs at
    most one parse of at most `MAX_KEY_BYTES`; a longer one is refused (and never cached).
    """
    if len(key) > MAX_KEY_BYTES:
        raise PayloadTooLarge(f"A form field name is longer than {MAX_KEY_BYTES} bytes.")
    path = _brackets(key)
    if path is None:
        return None
    name, indexes = path
    only = indexes[0] if len(indexes) == 1 else None
    if not only:
        return name, indexes, None, None
    return name, indexes, only, _integer(only) if only[0] in _NUMERIC else None


def _brackets(key: str) -> tuple[str, tuple[str | None, ...]] | None:
    """The variable name and bracket indexes of a key; None when PHP skips the key."""
    if "\0" in key:  # PHP reads the name as a C string
        key = key[: key.index("\0")]
    key = key.lstrip(" ")
    bracket = key.find("[")
    name = key if bracket < 0 else key[:bracket]
    if " " in name or "." in name:
        name = name.replace(" ", "_").replace(".", "_")
    if not name:
        return None
    if bracket < 0:
        return name, ()
    parsed = _indexes(key, bracket)
    if parsed is None:
        return name, _TOO_DEEP
    indexes, unterminated = parsed
    if unterminated is not None and not indexes:  # `a[b` is the plain name `a_b`
        return name + "_" + unterminated, ()
    return name, tuple(indexes)


def _indexes(key: str, bracket: int) -> tuple[list[str | None], str | None] | None:
    """The bracket indexes of `key` (None for `[]`), the tail after an unclosed `[`, or None
    when the key is nested deeper than PHP allows."""
    indexes: list[str | None] = []
    position, size = bracket, len(key)
    while True:
        if len(indexes) >= MAX_NESTING:
            return None
        start = position + 1
        probe = start + 1 if start < size and key[start] in _SPACE else start
        if probe < size and key[probe] == "]":
            indexes.append(None)
            close = probe
        else:
            close = key.find("]", probe)
            if close < 0:  # not an index: `[` becomes `_`, so do ` ` `.` `[` after it
                tail = key[start:].replace(" ", "_").replace(".", "_").replace("[", "_")
                return indexes, tail
            indexes.append(key[start:close])
        # Anything after `]` but another `[` ends the key (`a[b]c` is `a[b]`).
        if close + 1 >= size or key[close + 1] != "[":
            return indexes, None
        position = close + 1


def _listify(node: Any) -> Any:
    """An array whose keys are exactly 0..n-1 becomes a list, in index order; others stay dicts.

    Done in place: the arrays were built for this result and are not shared.
    """
    if not isinstance(node, _Array):
        return node
    if node.nested:
        for key, value in node.items():
            if isinstance(value, _Array):
                node[key] = _listify(value)
    size = len(node)
    # The next free index is n exactly when the largest integer key is n-1; only then can the
    # n distinct keys be 0..n-1, which the check below confirms.
    if size and node.next_index == size:
        keys, in_order = _index_keys(size)
        if node.keys() == keys:
            return [node[key] for key in in_order]
    return node


@lru_cache(maxsize=64)
def _index_keys(size: int) -> tuple[frozenset[str], tuple[str, ...]]:
    """The keys "0".."size-1", as a set to compare with and in order."""
    in_order = tuple(str(index) for index in range(size))
    return frozenset(in_order), in_order
