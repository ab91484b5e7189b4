"""MethodLimits on its own: blocks, the probe, pacing, per portal and per method."""

from services.method_limits import (
    DEFAULT_LIMIT_SECONDS,
    MAX_PACE_SECONDS,
    NEXT_BUCKET_SECONDS,
    PROBE_WAIT_SECONDS,
    MethodLimits,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_block_is_per_portal_and_method_and_lifts_at_the_last_reset_time() -> None:
    clock = Clock()
    limits = MethodLimits(clock)
    limits.observe("p1", "crm.contact.add", {"operating": 10.0, "operating_reset_at": clock.now + 120})

    until = limits.block("p1", "CRM.CONTACT.ADD")

    assert until == clock.now + 120
    assert limits.check("p1", "crm.contact.add") is not None
    assert limits.check("p2", "crm.contact.add") is None  # another portal
    assert limits.check("p1", "bizproc.event.send") is None  # another method
    assert limits.blocked_methods("p1") == {"crm.contact.add": clock.now + 120}


def test_after_the_reset_one_probe_then_the_others_wait_for_it() -> None:
    clock = Clock()
    limits = MethodLimits(clock)
    limits.block("p", "m")  # no figures seen: the next bucket
    clock.now += NEXT_BUCKET_SECONDS

    assert limits.check("p", "m") is None  # the probe
    held = limits.check("p", "m")
    assert held is not None
    assert held.until == clock.now + PROBE_WAIT_SECONDS
    limits.settle("p", "m")  # the probe got no answer: the next call may probe
    assert limits.check("p", "m") is None
    limits.observe("p", "m", None)  # it answered: free again
    assert limits.check("p", "m") is None
    assert limits.blocked_methods("p") == {}


def test_pace_grows_from_eighty_percent_of_the_limit_and_stops_at_the_reset() -> None:
    clock = Clock()
    limits = MethodLimits(clock)
    reset_at = clock.now + 300

    def pace_at(operating: float) -> float:
        limits.observe("p", "m", {"operating": operating, "operating_reset_at": reset_at})
        return limits.pace("p", "m")

    assert pace_at(0.5 * DEFAULT_LIMIT_SECONDS) == 0.0
    assert 0 < pace_at(0.9 * DEFAULT_LIMIT_SECONDS) < MAX_PACE_SECONDS
    assert pace_at(1.2 * DEFAULT_LIMIT_SECONDS) == MAX_PACE_SECONDS
    clock.now = reset_at
    assert limits.pace("p", "m") == 0.0


def test_a_block_teaches_a_lower_limit() -> None:
    clock = Clock()
    limits = MethodLimits(clock)
    limits.observe("p", "a", {"operating": 100.0, "operating_reset_at": clock.now + 60})
    limits.block("p", "a")

    limits.observe("p", "b", {"operating": 90.0, "operating_reset_at": clock.now + 60})

    assert limits.pace("p", "b") > 0  # 90 of a learned 100 is near the limit


def test_odd_time_blocks_are_ignored() -> None:
    limits = MethodLimits(Clock())
    blocks: list[object] = [None, [], {"operating": "x", "operating_reset_at": True}, {}]
    for block in blocks:
        limits.observe("p", "m", block)
    assert limits.pace("p", "m") == 0.0
