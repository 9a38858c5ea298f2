"""`bounded(..., coarse=True)`: the bound every send's two writes run under, on timers shared
by tick. It must end a call that does not answer (never before its deadline, at most a tick
after), leave one that answers alone, and let an outside cancellation through as such."""

from __future__ import annotations

import asyncio
import time

import pytest

from dualwrite._calls import TICK_S, bounded
from dualwrite.errors import BackendTimeout


async def test_a_call_that_does_not_answer_ends_at_its_deadline_within_a_tick() -> None:
    started = time.monotonic()
    with pytest.raises(BackendTimeout, match=r"within 0\.1s"):
        await bounded(asyncio.sleep(10), 0.1, "test", coarse=True)
    elapsed = time.monotonic() - started
    # Never before its deadline; the upper side is the loop's lateness too, which a loaded
    # machine stretches: a hang is what this rules out, not a few milliseconds.
    assert 0.1 <= elapsed < 0.1 + TICK_S + 2.0


async def test_calls_that_answer_are_left_alone_and_share_their_ticks() -> None:
    loop = asyncio.get_running_loop()
    timers_before = len(loop._scheduled)  # type: ignore[attr-defined]
    answered = asyncio.Event()

    async def answer(number: int) -> int:
        await answered.wait()
        return number

    gathered = asyncio.gather(*(bounded(answer(i), 2.0, "test", coarse=True) for i in range(500)))
    await asyncio.sleep(0)
    # 500 calls started at once: a deadline timer or two, not 500.
    # (a few more may be the loop's own, on a loaded machine)
    assert len(loop._scheduled) - timers_before <= 10  # type: ignore[attr-defined]
    answered.set()
    assert await gathered == list(range(500))
    # A call that waits a while for its answer gets it: no bound ends meanwhile.
    assert await bounded(asyncio.sleep(0.05, "late"), 0.1, "test", coarse=True) == "late"


async def test_an_outside_cancellation_is_not_a_timeout() -> None:
    task = asyncio.create_task(bounded(asyncio.sleep(10), 5.0, "test", coarse=True))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_bound_that_ends_while_others_answer_ends_only_its_own_call() -> None:
    slow = asyncio.create_task(bounded(asyncio.sleep(10), 0.05, "slow", coarse=True))
    fast = [asyncio.create_task(bounded(asyncio.sleep(0.06), 0.5, "fast", coarse=True))]
    with pytest.raises(BackendTimeout):
        await slow
    assert await asyncio.gather(*fast) == [None]
