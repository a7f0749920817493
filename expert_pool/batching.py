"""Server-side batching: requests from many callers to one expert are merged into one compute call.

Each hosted expert has one :class:`BatchQueue`. Requests wait in it while the expert is busy; when it frees up,
the oldest request's kind (forward or backward) is taken together with every other queued request of the same
kind, up to ``max_batch_rows`` rows, and run as ONE call on the server's thread pool: one matrix multiply
instead of many, and for backward ONE optimizer step per processed batch (hivemind's ``TaskPool`` semantics).
With ``max_wait_s > 0`` the queue additionally waits that long for more rows before running a batch that is not
full; the default 0 adds no latency and batches whatever arrived while the previous batch ran. An optional
``after_backward()`` runs on the thread pool after a backward batch's results were handed to its callers and
before the next batch of the same expert starts (the server applies the optimizer step there, off the callers'
critical path).

Only one batch per expert runs at a time, so the thread pool never has two threads blocked on one expert's lock.
This module does not validate requests (the server does before queueing).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Union

import torch

logger = logging.getLogger(__name__)

Verb = Literal["forward", "backward", "backward_saved"]
Output = Union[torch.Tensor, tuple[torch.Tensor, ...]]  # rows aligned with the batch's input rows


@dataclass
class _Task:
    verb: Verb
    tensors: tuple[torch.Tensor, ...]  # forward: (x,); backward: (x, grad_out); backward_saved: (x, pre, grad_out)
    future: asyncio.Future
    rows: int = field(init=False)

    def __post_init__(self):
        self.rows = int(self.tensors[0].shape[0])


class BatchQueue:
    """Queue of pending calls to one expert, drained in batches on a thread pool.

    :param compute: ``compute(verb, tensors)`` runs one batch synchronously (``ExpertBackend.forward`` /
      ``backward`` on concatenated rows) and returns the output rows: a tensor, or a tuple of tensors whose rows
      all match the inputs' (each caller then gets its own rows of each)
    :param executor: the server's thread pool
    :param max_batch_rows: at most this many rows per batch (a single larger request runs alone)
    :param max_wait_s: how long to wait for more rows before running a non-full batch
    :param after_backward: runs after each backward batch's results are delivered, before the next batch
    """

    def __init__(
        self,
        compute: Callable[[Verb, tuple[torch.Tensor, ...]], Output],
        executor: concurrent.futures.Executor,
        max_batch_rows: int,
        max_wait_s: float = 0.0,
        after_backward: Optional[Callable[[], None]] = None,
    ):
        self.compute, self.executor, self.after_backward = compute, executor, after_backward
        self.max_batch_rows, self.max_wait_s = max_batch_rows, max_wait_s
        self._pending: collections.deque[_Task] = collections.deque()
        self._running = False
        self.batches = 0  # batches run so far (for tests and stats)

    async def submit(self, verb: Verb, tensors: tuple[torch.Tensor, ...]) -> Output:
        """Queue one validated call and wait for its output rows (of each output, if compute returns a tuple)."""
        task = _Task(verb, tensors, asyncio.get_running_loop().create_future())
        self._pending.append(task)
        if not self._running:
            self._running = True
            asyncio.create_task(self._drain())
        return await task.future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                if self.max_wait_s > 0 and sum(t.rows for t in self._pending) < self.max_batch_rows:
                    await asyncio.sleep(self.max_wait_s)
                batch = self._take_batch()
                if not batch:
                    continue
                verb = batch[0].verb
                try:
                    outputs = await loop.run_in_executor(self.executor, self._run_batch, verb, batch)
                except Exception as e:
                    for task in batch:
                        if not task.future.done():
                            task.future.set_exception(e)
                    continue
                for task, output in zip(batch, outputs):
                    if not task.future.done():
                        task.future.set_result(output)
                if verb != "forward" and self.after_backward is not None:
                    await asyncio.sleep(0)  # let the callers' coroutines send their answers first
                    try:
                        await loop.run_in_executor(self.executor, self.after_backward)
                    except Exception:  # e.g. the optimizer step failed: log it, keep serving
                        logger.warning("finishing a backward batch failed", exc_info=True)
        finally:
            self._running = False

    def _take_batch(self) -> list[_Task]:
        """The oldest live task plus later live tasks of the same verb, up to max_batch_rows rows."""
        while self._pending and self._pending[0].future.done():  # caller gave up (cancelled) before we ran it
            self._pending.popleft()
        if not self._pending:
            return []
        first = self._pending.popleft()
        batch, rows, kept = [first], first.rows, collections.deque()
        while self._pending:
            task = self._pending.popleft()
            if task.future.done():
                continue
            if task.verb == first.verb and rows + task.rows <= self.max_batch_rows:
                batch.append(task)
                rows += task.rows
            else:
                kept.append(task)
        self._pending.extendleft(reversed(kept))
        return batch

    def _run_batch(self, verb: Verb, batch: list[_Task]) -> list[Output]:
        self.batches += 1
        if len(batch) == 1:
            return [self.compute(verb, batch[0].tensors)]
        merged = tuple(torch.cat(parts) for parts in zip(*(task.tensors for task in batch)))
        output = self.compute(verb, merged)
        rows = [task.rows for task in batch]
        if isinstance(output, torch.Tensor):
            return list(output.split(rows))
        return list(zip(*(part.split(rows) for part in output)))
