"""Find-or-create splits what a pass of up to 100 jobs needs into batches of at most 50 commands."""

from collections.abc import Mapping
from typing import Any, cast

import pytest

from services import find_or_create
from services.bitrix_client import BatchResult, BitrixClient
from services.contact_matching import Wanted

pytestmark = pytest.mark.anyio


class _Portal:
    """Answers each findbycomm command with 40 contacts of its own, and every read with nothing."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []  # the methods of each batch request, in order

    async def batch(
        self,
        member_id: str,
        commands: Mapping[str, tuple[str, Mapping[str, Any]]],
        *,
        idempotent: bool = True,
    ) -> BatchResult:
        assert len(commands) <= find_or_create.BATCH_LIMIT
        self.batches.append([method for method, _ in commands.values()])
        outcome = BatchResult()
        for number, (key, (method, _)) in enumerate(commands.items()):
            found = {"CONTACT": list(range(number * 40 + 1, number * 40 + 41))}
            outcome.results[key] = found if method == "crm.duplicate.findbycomm" else []
        return outcome


def _wanted(count: int) -> list[Wanted]:
    return [
        Wanted(i, "reuse", {"PHONE": [{"VALUE": f"+7999100{i:04d}"}], "EMAIL": [{"VALUE": f"p{i}@x.ru"}]})
        for i in range(count)
    ]


async def test_a_read_of_more_than_fifty_pages_goes_in_several_batches() -> None:
    portal = _Portal()

    decided = await find_or_create.plan(cast(BitrixClient, portal), "member", _wanted(100), "RU")

    # 100 phones and 100 e-mails: 10 findbycomm commands in one batch; 400 contacts found, read 50
    # a command: 8 read commands, which fit one batch.
    assert [len(b) for b in portal.batches] == [10, 8]
    assert decided.error is None
    assert all(d.action == "create" for d in decided.decisions.values())  # none read back: nobody matched


async def test_commands_beyond_fifty_are_sent_together_in_further_batches() -> None:
    portal = _Portal()
    commands = {f"c{i}": ("crm.contact.list", {"filter": {"@ID": [i]}}) for i in range(120)}

    results = await find_or_create._run(cast(BitrixClient, portal), "member", commands)

    assert sorted(len(b) for b in portal.batches) == [20, 50, 50]
    assert set(results) == set(commands)
