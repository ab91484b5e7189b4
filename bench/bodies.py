"""Robot-call bodies for the load: varied people, form-encoded with PHP bracket keys."""

from __future__ import annotations

import random
from collections.abc import Sequence
from urllib.parse import parse_qsl, quote_plus

_LAST = ("Иванов", "Петрова", "Smirnov", "Кузнецова", "O'Brien", "Попов", "Sokolova", "Лебедев")
_FIRST = ("Иван", "Мария", "Alexei", "Анна", "Sean", "Дмитрий", "Elena", "Ольга")
_MIDDLE = ("Иванович", "Петровна", "", "Сергеевна", "", "Андреевич", "Olegovna", "")


def properties(index: int) -> dict[str, str]:
    """Well-formed robot inputs, different for every call (the heavier path: a contact to make)."""
    pick = index % len(_LAST)
    number = f"{1_000_000 + index % 9_000_000:07d}"
    return {
        "last_name": _LAST[pick],
        "first_name": _FIRST[pick],
        "second_name": _MIDDLE[pick],
        "phone": f"+7 (999) {number[:3]}-{number[3:5]}-{number[5:]}",
        "email": f"client.{index}@example.com",
    }


def _php_encode(pairs: Sequence[tuple[str, str]]) -> str:
    def quote(text: str) -> str:
        return quote_plus(text, safe="").replace("~", "%7E")  # PHP's urlencode()

    return "&".join(f"{quote(key)}={quote(value)}" for key, value in pairs)


def template_bodies(template: str, count: int, offset: int) -> list[str]:
    """Copies of a real portal body with fresh workflow ids, event tokens and inputs.

    For the held-portal scenarios only: the portal never sees these tokens, the app accepts them
    as it would any call of the installed portal. Much faster than asking the fake for each.
    """
    rng = random.Random(offset)
    base = [(k, v) for k, v in parse_qsl(template, keep_blank_values=True) if not k.startswith("properties")]
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    bodies = []
    for index in range(offset, offset + count):
        workflow = f"{rng.getrandbits(56):014x}.{rng.randrange(10**8):08d}"
        activity = "A" + "_".join(f"{rng.randrange(10**5):05d}" for _ in range(4))
        salt = "".join(rng.choice(alphabet) for _ in range(32))
        token = f"{workflow}|{activity}|{salt}.{rng.getrandbits(256):064x}"
        pairs: list[tuple[str, str]] = []
        for key, value in base:
            replaced = {"workflow_id": workflow, "event_token": token}.get(key, value)
            pairs.append((key, replaced))
            if key == "event_token":  # the portal puts the inputs right after the token
                pairs += [(f"properties[{name}]", text) for name, text in properties(index).items()]
        bodies.append(_php_encode(pairs))
    return bodies
