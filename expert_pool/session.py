"""Client side of ``ExpertServer.rpc_session``: one long-lived stream per host, many expert calls on it.

Each call is still ONE request for ONE expert (its rows, its id); a session only saves opening a libp2p stream
per call (~1.3 ms of CPU across two daemons and two processes, vs ~0.13 ms for a message on an open stream).
Calls on a session are in flight concurrently and answered in any order; a response is matched to its call by
``metadata["id"]``.

A session that breaks (host died, stream reset) fails every call in flight on it with :class:`SessionError`
and is replaced by a fresh one on the next call. Everything here runs on the event loop of the p2p replica.
This module does not choose hosts, retry or time out calls: see ``swarmtrain.expert_pool.client.RemoteDispatcher``.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import AsyncIterator, Callable, Optional

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarmtrain.dht.budget import INTERACTIVE, UploadBudget
from swarmtrain.expert_pool.server import ExpertServer
from swarmtrain.expert_pool.wire import Call, iter_calls, pack_request

logger = logging.getLogger(__name__)


class SessionError(ConnectionError):
    """The session to a host broke: the host died, restarted, or closed the stream."""


class HostSession:
    """One open ``rpc_session`` stream to one host.

    The stream is driven directly (``call_binary_stream_handler`` + hivemind's protobuf framing) rather than
    through ``iterate_protobuf_handler``, whose reader waits for its writer to finish and would therefore not
    notice a dead host while no call is being written.

    :param p2p: this peer's p2p replica
    :param peer_id: the host's base58 peer id
    :param budget: this peer's upload budget (requests are interactive traffic)
    :param on_late: called with the seconds an answer took when it arrives after its call gave up

    ``last_heard`` is the time (``time.monotonic()``) the host last sent anything on this session: a call that
    times out while the host keeps answering others is a slow host, not a dead one.
    """

    def __init__(self, p2p: P2P, peer_id: str, budget: Optional[UploadBudget] = None,
                 on_late: Optional[Callable[[float], None]] = None):
        self.p2p, self.peer_id = p2p, peer_id
        self.budget = budget or UploadBudget(None)
        self.on_late = on_late
        self.last_heard = -float("inf")  # nothing heard yet: opening a stream proves nothing about a black hole
        self._pending: dict[int, asyncio.Future] = {}
        self._sent_at: dict[int, float] = {}  # calls in flight or given up, by id: when they were sent
        self._ids = itertools.count()
        self._write_lock = asyncio.Lock()
        self._writer: Optional[asyncio.StreamWriter] = None
        self._reader_task: Optional[asyncio.Task] = None
        self.closed = False
        self.error: Optional[str] = None

    async def open(self) -> None:
        """Open the stream (raises if the host cannot be reached)."""
        handle = ExpertServer._get_handle_name(None, "rpc_session")
        _, reader, self._writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(self.peer_id), handle)
        self._reader_task = asyncio.create_task(self._read_responses(reader))

    async def call(self, verb: str, uid: str, meta: dict, tensors: list[runtime_pb2.Tensor],
                   sent: Optional[list] = None) -> Call:
        """Send one request for expert ``uid`` and wait for its response (metadata and encoded tensors).

        The request's turn in the upload budget is waited for first (cancellable); its messages are then written
        by a task of their own that a cancelled call does not interrupt, so the stream never carries half a call.
        ``sent`` (if given) receives the time the request was fully written.
        """
        if self.closed:
            raise SessionError(f"session to {self.peer_id[-6:]} is closed: {self.error}")
        call_id = next(self._ids)
        messages = pack_request(uid, {**meta, "id": call_id, "verb": verb}, tensors)
        await self.budget.take(sum(message.ByteSize() for message in messages), INTERACTIVE)
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            await self._write_lock.acquire()  # whole calls in the order they got here; _write releases it
            write = asyncio.ensure_future(self._write(call_id, messages))
            write.add_done_callback(_consume)  # a write that fails after its caller gave up is not an error to log
            await asyncio.shield(write)
            if sent is not None:
                sent.append(time.monotonic())
            return await future
        except (ConnectionError, OSError) as e:
            self._fail_all(f"{type(e).__name__}: {e}")
            raise SessionError(f"session to {self.peer_id[-6:]} broke: {e}") from e
        finally:
            self._pending.pop(call_id, None)

    async def _write(self, call_id: int, messages: list) -> None:
        """Write one call's messages back to back; the caller holds the write lock, released here."""
        try:
            for message in messages:
                await P2P.send_protobuf(message, self._writer)
        finally:
            self._write_lock.release()
        self._sent_at[call_id] = time.monotonic()
        while len(self._sent_at) > 4096:  # answers that never came: forget the oldest
            self._sent_at.pop(next(iter(self._sent_at)))

    async def close(self) -> None:
        """End the stream; calls in flight fail with SessionError."""
        if self._writer is not None and not self.closed:
            try:
                await P2P.send_protobuf(P2P.END_OF_STREAM, self._writer)
            except Exception:  # already broken
                pass
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        self._fail_all("session closed by this peer")

    async def _read_responses(self, reader: asyncio.StreamReader) -> None:
        reason = "the host closed the session"
        try:
            async for response in iter_calls(self._receive(reader)):
                call_id = response.meta.get("id")
                sent_at = self._sent_at.pop(call_id, None) if isinstance(call_id, int) else None
                future = self._pending.get(call_id)
                if future is not None and not future.done():
                    future.set_result(response)
                elif sent_at is not None and self.on_late is not None:
                    self.on_late(time.monotonic() - sent_at)
        except asyncio.CancelledError:
            reason = "session closed by this peer"
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
        finally:
            self._fail_all(reason)
            self._writer.close()

    async def _receive(self, reader: asyncio.StreamReader) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        while True:
            try:
                response, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
            except asyncio.IncompleteReadError:
                return
            if error is not None:
                raise SessionError(f"the host's session handler failed: {error.message}")
            self.last_heard = time.monotonic()
            yield response

    def _fail_all(self, reason: str) -> None:
        if not self.closed:
            self.closed, self.error = True, reason
            logger.debug(f"expert session to {self.peer_id[-6:]} closed: {reason}")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(SessionError(f"session to {self.peer_id[-6:]} broke: {reason}"))


class SessionPool:
    """Open sessions of this peer, one per host, created on first use and replaced when broken."""

    def __init__(self, p2p: P2P, budget: Optional[UploadBudget] = None,
                 on_late: Optional[Callable[[str, float], None]] = None):
        self.p2p, self.budget, self.on_late = p2p, budget, on_late
        self._sessions: dict[str, HostSession] = {}
        self._opening: dict[str, asyncio.Future] = {}

    async def get(self, peer_id: str) -> HostSession:
        """The open session to ``peer_id`` (opening one if needed; concurrent callers share the opening)."""
        session = self._sessions.get(peer_id)
        if session is not None and not session.closed:
            return session
        opening = self._opening.get(peer_id)
        if opening is None:
            opening = asyncio.ensure_future(self._open(peer_id))
            self._opening[peer_id] = opening
        return await asyncio.shield(opening)

    def peek(self, peer_id: str) -> Optional[HostSession]:
        """The open session to ``peer_id`` if there is one (does not open one)."""
        session = self._sessions.get(peer_id)
        return session if session is not None and not session.closed else None

    async def discard(self, peer_id: str) -> None:
        """Close and forget the session to ``peer_id`` (after it failed a call)."""
        session = self._sessions.pop(peer_id, None)
        if session is not None:
            await session.close()

    async def close(self) -> None:
        """Close every session."""
        for peer_id in list(self._sessions):
            await self.discard(peer_id)

    async def _open(self, peer_id: str) -> HostSession:
        try:
            on_late = None if self.on_late is None else (lambda seconds: self.on_late(peer_id, seconds))
            session = HostSession(self.p2p, peer_id, self.budget, on_late)
            await session.open()
            self._sessions[peer_id] = session
            return session
        finally:
            self._opening.pop(peer_id, None)


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
