"""dht/streams.py: how p2p handlers end (drain the caller's stream, linger until it closes)."""
from __future__ import annotations

import asyncio
import time

import pytest

from swarmtrain.dht.streams import drain, linger


async def _stream(items: int, delay: float = 0.0, then_hang: bool = False, fail: bool = False):
    for i in range(items):
        await asyncio.sleep(delay)
        yield i
    if fail:
        raise ConnectionResetError("stream reset")
    if then_hang:
        await asyncio.sleep(3600)


@pytest.mark.timeout(30)
def test_drain_reads_to_the_end_of_stream_and_returns_at_once():
    consumed = []

    async def source():
        async for item in _stream(5, delay=0.01):
            consumed.append(item)
            yield item

    start = time.monotonic()
    asyncio.run(drain(source(), timeout=10))
    assert consumed == [0, 1, 2, 3, 4] and time.monotonic() - start < 5


@pytest.mark.timeout(30)
def test_drain_gives_up_after_its_timeout_and_ignores_a_broken_stream():
    start = time.monotonic()
    asyncio.run(drain(_stream(1, then_hang=True), timeout=0.3))
    assert 0.25 < time.monotonic() - start < 5
    asyncio.run(drain(_stream(2, fail=True), timeout=5))  # no exception escapes


@pytest.mark.timeout(30)
def test_linger_stays_open_until_cancelled_or_its_timeout():
    async def cancelled_early() -> float:
        task = asyncio.create_task(linger(_stream(2), timeout=30))
        await asyncio.sleep(0.2)
        assert not task.done()  # the stream ended, but we still keep our side open
        task.cancel()  # what hivemind does when the caller closes the stream
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic()

    start = time.monotonic()
    assert asyncio.run(cancelled_early()) - start < 5
    start = time.monotonic()
    asyncio.run(linger(timeout=0.2))
    assert 0.15 < time.monotonic() - start < 5
