"""The body guard's deadline, in process: a late body times out, anyone else's cancel stands."""

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest

from services.body_guard import BodyGuardMiddleware, BodyLimits
from services.errors import RequestTimeout

Message = dict[str, Any]
pytestmark = pytest.mark.anyio


def scope(limits: BodyLimits, length: int = 10) -> dict[str, Any]:
    headers = [(b"content-length", str(length).encode())]
    return {"type": "http", "headers": headers, "state": {"body_limits": limits}}


async def run_app(limits: BodyLimits, receive: Any, reads: int = 1) -> list[Message]:
    """What an app that reads `reads` messages of its body gets; RequestTimeout propagates."""
    got: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for _ in range(reads):
            got.append(await receive())

    async def send(message: MutableMapping[str, Any]) -> None:
        pass

    await BodyGuardMiddleware(app)(scope(limits), receive, send)
    return got


async def test_a_body_that_arrives_in_time_is_passed_on() -> None:
    async def receive() -> Message:
        await asyncio.sleep(0.01)
        return {"type": "http.request", "body": b"a=1", "more_body": False}

    assert await run_app(BodyLimits(1.0), receive) == [
        {"type": "http.request", "body": b"a=1", "more_body": False}
    ]


async def test_a_body_still_waited_for_at_the_deadline_times_out() -> None:
    async def receive() -> Message:
        await asyncio.sleep(30)
        raise AssertionError("not reached")

    started = asyncio.get_running_loop().time()
    with pytest.raises(RequestTimeout, match=r"within 0\.2 seconds"):
        await run_app(BodyLimits(0.2), receive)
    assert asyncio.get_running_loop().time() - started < 2


async def test_the_deadline_counts_from_the_start_and_across_chunks() -> None:
    # Each chunk comes quickly, but all of them together take longer than the deadline.
    async def receive() -> Message:
        await asyncio.sleep(0.08)
        return {"type": "http.request", "body": b"x", "more_body": True}

    with pytest.raises(RequestTimeout):
        await run_app(BodyLimits(0.2), receive, reads=10)


async def test_a_cancel_from_elsewhere_is_not_turned_into_a_timeout() -> None:
    async def receive() -> Message:
        await asyncio.sleep(30)
        raise AssertionError("not reached")

    task = asyncio.create_task(run_app(BodyLimits(5.0), receive))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_after_the_body_a_wait_for_the_disconnect_has_no_deadline() -> None:
    messages = iter([{"type": "http.request", "body": b"a=1", "more_body": False}])

    async def receive() -> Message:
        message = next(messages, None)
        if message is None:
            await asyncio.sleep(0.4)  # longer than the deadline: the client disconnects later
            return {"type": "http.disconnect"}
        return message

    got = await run_app(BodyLimits(0.1), receive, reads=2)
    assert got[-1] == {"type": "http.disconnect"}
