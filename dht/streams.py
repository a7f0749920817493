"""Ending a p2p stream handler without losing its last messages.

hivemind closes a handler's side of a stream as soon as the handler returns. If the caller is still writing (its
end-of-stream marker) or has not read our last messages yet, the stream reset that follows can make the daemons
drop those messages: seen under load with the expert pool's 5 MiB answers (1 call in 120) and with averaging's
final "done". Handlers therefore end with :func:`drain` (read what the caller still sends, up to its
end-of-stream) and, when the caller closes only after reading the answer, :func:`linger` (stay open until it does;
hivemind then cancels the handler). The expert pool and averaging both use these.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Optional

DEFAULT_TIMEOUT_S = 5.0


async def drain(requests: AsyncIterator, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Read and drop what the caller still sends until its end-of-stream, at most ``timeout`` seconds; errors of
    a broken stream are ignored (there is nothing left to answer)."""

    async def until_end() -> None:
        async for _ in requests:
            pass

    with contextlib.suppress(Exception):
        await asyncio.wait_for(until_end(), timeout)


async def linger(requests: Optional[AsyncIterator] = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """:func:`drain` the caller's stream (if the handler has one), then keep our side open for ``timeout`` seconds
    or until the caller closes the stream and hivemind cancels this handler, whichever comes first."""
    if requests is not None:
        await drain(requests, timeout)
    await asyncio.sleep(timeout)
