"""The one polling helper (spirtd.localcluster), sync and async."""

from __future__ import annotations

import asyncio

import pytest

from spirtd.localcluster import async_wait_for, wait_for


def test_wait_for_returns_once_true_and_names_what_it_waited_for() -> None:
    calls = [0]

    def third_time() -> bool:
        calls[0] += 1
        return calls[0] >= 3

    wait_for(third_time, 30, "the third call", interval=0.001)
    assert calls[0] == 3
    with pytest.raises(TimeoutError, match="waiting for never"):
        wait_for(lambda: False, 0.05, "never", interval=0.01)


async def test_async_wait_for_lets_the_loop_run_and_awaits_coroutines() -> None:
    done = asyncio.Event()
    # Set by another task: only a wait that yields to the loop can see it.
    asyncio.get_running_loop().call_soon(done.set)
    await async_wait_for(done.is_set, 30, "the event")

    async def answer() -> bool:
        await asyncio.sleep(0)
        return done.is_set()

    await async_wait_for(answer, 30, "the coroutine's answer")
    with pytest.raises(TimeoutError, match="waiting for never"):
        await async_wait_for(lambda: False, 0.05, "never")


async def test_async_wait_for_bounds_a_predicate_that_hangs() -> None:
    async def hangs() -> bool:
        await asyncio.Event().wait()
        return True

    with pytest.raises(TimeoutError, match="waiting for a hung check"):
        await async_wait_for(hangs, 0.1, "a hung check")
