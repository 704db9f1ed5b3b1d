"""A dynamic batcher: a queueing policy wrapped around `run(list of items) -> list of results`.

Knows nothing of models or gRPC. Items carry a batching key (for images: their shape); a batch
holds items of one key only. The knobs are named as in Triton's dynamic batcher:

- `max_batch_size`: most items per call of `run`;
- `max_queue_delay`: once an item is queued, how long (seconds) to wait for more items of its key
  before running a partial batch; a full batch runs at once;
- `max_queue_size`: most items waiting (not yet running); `submit` beyond it raises QueueFullError
  immediately rather than letting callers pile up.

`run` is called on one dedicated worker thread, never concurrently and never on the event loop.
Among keys whose batch is ready (full, or its oldest item has waited `max_queue_delay`), the key
holding the oldest item goes first. Cancelled items leave the queue at once; items whose deadline
passed are dropped before `run` sees them. `close()` stops admissions and finishes admitted work.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class QueueFullError(RuntimeError):
    """The queue cannot take the submitted items now; the caller should retry later."""


class BatcherClosedError(RuntimeError):
    """The batcher is draining or stopped and admits nothing new."""


class DeadlineExpiredError(TimeoutError):
    """The item's deadline passed while it waited, so it was dropped before running."""


class BatchFailedError(RuntimeError):
    """`run` raised (or returned the wrong number of results) for the batch holding this item."""


@dataclass(frozen=True)
class BatchingPolicy:
    """The batcher's knobs (Triton names); max_queue_delay is in seconds."""

    max_batch_size: int = 8
    max_queue_delay: float = 0.005
    max_queue_size: int = 64

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_size < 1 or self.max_queue_delay < 0:
            raise ValueError(f"invalid batching policy {self}")


class BatchObserver(Protocol):
    """Receives what a monitoring system wants to know; called on the event loop thread."""

    def queue_depth(self, depth: int) -> None:
        """The number of queued items changed."""

    def batch_done(self, size: int, queue_waits: Sequence[float], run_seconds: float,
                   failed: bool) -> None:
        """A batch of `size` items ran for run_seconds after each item waited queue_waits[i]."""


class _Entry(Generic[ItemT, ResultT]):
    """One queued item with its caller's future."""

    __slots__ = ("deadline", "enqueued", "future", "item", "key", "queued")

    def __init__(self, key: Hashable, item: ItemT, future: asyncio.Future[ResultT],
                 enqueued: float, deadline: float | None) -> None:
        self.key = key
        self.item = item
        self.future = future
        self.enqueued = enqueued
        self.deadline = deadline
        self.queued = True


class DynamicBatcher(Generic[ItemT, ResultT]):
    """Forms batches of same-key items and runs them on one worker thread (see module docstring)."""

    def __init__(
        self,
        run: Callable[[list[ItemT]], Sequence[ResultT]],
        policy: BatchingPolicy,
        observer: BatchObserver | None = None,
        thread_name: str = "batcher",
        on_stopped: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._run = run
        self._on_stopped = on_stopped
        self.policy = policy
        self._observer = observer
        self._thread_name = thread_name
        self._queues: dict[Hashable, collections.deque[_Entry[ItemT, ResultT]]] = {}
        self._depth = 0
        self._closing = False
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def depth(self) -> int:
        """Items queued and not yet running."""
        return self._depth

    @property
    def accepting(self) -> bool:
        """True while submit() admits work (never once the scheduler has stopped)."""
        return self._task is not None and not self._closing and not self._task.done()

    def start(self) -> None:
        """Start the scheduler on the running event loop and the worker thread."""
        if self._task is not None:
            raise RuntimeError("the batcher is already started")
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._thread_name)
        self._task = self._loop.create_task(self._schedule(), name=f"{self._thread_name}-scheduler")
        self._task.add_done_callback(self._scheduler_ended)

    def _scheduler_ended(self, task: asyncio.Task[None]) -> None:
        """Say loudly if the scheduler died: from then on submit() refuses all work."""
        if not task.cancelled() and task.exception() is not None:
            log.critical("the batch scheduler stopped: %r; no batch will run again and every "
                         "submit is refused; restart the process", task.exception())
            if self._on_stopped is not None:
                self._on_stopped(task.exception())

    def submit(
        self, items: Sequence[tuple[Hashable, ItemT]], timeout: float | None = None
    ) -> list[asyncio.Future[ResultT]]:
        """Queue (key, item) pairs all together or none; return one future per item, in order.

        Raises QueueFullError when they do not all fit, BatcherClosedError when draining. With
        `timeout` (seconds), items still queued after it are dropped with DeadlineExpiredError.
        Cancelling a returned future removes its item from the queue.
        """
        if not self.accepting:
            raise BatcherClosedError("the batcher is not accepting work (stopped or draining)")
        if self._depth + len(items) > self.policy.max_queue_size:
            raise QueueFullError(
                f"the queue holds {self._depth} of {self.policy.max_queue_size} items and cannot "
                f"take {len(items)} more; retry later")
        assert self._loop is not None
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        futures = []
        wake = self._depth == 0
        for key, item in items:
            future: asyncio.Future[ResultT] = self._loop.create_future()
            entry = _Entry(key, item, future, now, deadline)
            future.add_done_callback(lambda _f, e=entry: self._forget(e))
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = collections.deque()
            queue.append(entry)
            wake = wake or len(queue) == self.policy.max_batch_size
            futures.append(future)
        self._set_depth(self._depth + len(items))
        if wake:
            self._wake_scheduler()
        return futures

    async def close(self) -> None:
        """Stop admitting, run everything already admitted (without waiting delays), stop."""
        self._closing = True
        self._wake_scheduler()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _set_depth(self, depth: int) -> None:
        """Record the queue depth and tell the observer."""
        self._depth = depth
        if self._observer is not None:
            self._observer.queue_depth(depth)

    def _forget(self, entry: _Entry[ItemT, ResultT]) -> None:
        """Done-callback: a future finished while queued (cancelled), so its place frees now."""
        if not entry.queued:
            return
        entry.queued = False
        queue = self._queues.get(entry.key)
        if queue is not None:
            queue.remove(entry)
            if not queue:
                del self._queues[entry.key]
        self._set_depth(self._depth - 1)

    def _wake_scheduler(self) -> None:
        """Resolve the future the scheduler sleeps on, if it sleeps."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _sleep(self, timeout: float | None) -> None:
        """Sleep until woken by submit/close or until timeout seconds pass."""
        assert self._loop is not None
        self._wake = self._loop.create_future()
        timer = None
        if timeout is not None:
            timer = self._loop.call_later(timeout, self._wake_scheduler)
        try:
            await self._wake
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()

    def _next_key(self, now: float) -> tuple[Hashable | None, float | None]:
        """The key to run now (oldest among ready keys), or None and the wait until one is ready."""
        best_key, best_time = None, None
        soonest = None
        for key, queue in self._queues.items():
            oldest = queue[0].enqueued
            ready_at = oldest + self.policy.max_queue_delay
            if self._closing or len(queue) >= self.policy.max_batch_size or ready_at <= now:
                if best_time is None or oldest < best_time:
                    best_key, best_time = key, oldest
            elif soonest is None or ready_at < soonest:
                soonest = ready_at
        if best_key is not None:
            return best_key, None
        return None, None if soonest is None else soonest - now

    def _take(self, key: Hashable, now: float) -> list[_Entry[ItemT, ResultT]]:
        """Pop up to max_batch_size live entries of `key`; fail the expired ones."""
        queue = self._queues[key]
        batch: list[_Entry[ItemT, ResultT]] = []
        taken = 0
        while queue and len(batch) < self.policy.max_batch_size:
            entry = queue.popleft()
            entry.queued = False
            taken += 1
            if entry.future.done():
                continue  # cancelled in this loop turn: its _forget callback has not run yet
            if entry.deadline is not None and entry.deadline <= now:
                entry.future.set_exception(DeadlineExpiredError(
                    f"dropped after waiting {now - entry.enqueued:.3f} s in the queue: the "
                    "deadline passed before the model was free"))
            else:
                batch.append(entry)
        if not queue:
            del self._queues[key]
        self._set_depth(self._depth - taken)
        return batch

    async def _schedule(self) -> None:
        """Wait for a ready key, run its batch, repeat; return once closed and empty."""
        while True:
            now = time.monotonic()
            key, wait = self._next_key(now)
            if key is None:
                if self._closing and not self._queues:
                    return
                await self._sleep(wait)
                continue
            batch = self._take(key, now)
            if batch:
                await self._execute(batch)

    async def _execute(self, batch: list[_Entry[ItemT, ResultT]]) -> None:
        """Run one batch on the worker thread and hand each caller its result (or the error)."""
        assert self._loop is not None and self._executor is not None
        items = [entry.item for entry in batch]
        start = time.monotonic()
        waits = [start - entry.enqueued for entry in batch]
        failure: str | None = None
        cause: Exception | None = None
        results: Sequence[ResultT] = ()
        try:
            results = await self._loop.run_in_executor(self._executor, self._run, items)
            if len(results) != len(items):
                failure = f"run returned {len(results)} results for a batch of {len(items)}"
        except Exception as exc:
            failure, cause = f"{type(exc).__name__}: {exc}", exc
        elapsed = time.monotonic() - start
        for i, entry in enumerate(batch):
            if entry.future.done():
                continue  # cancelled while running
            if failure is None:
                entry.future.set_result(results[i])
            else:
                error = BatchFailedError(failure)
                error.__cause__ = cause
                entry.future.set_exception(error)
        if self._observer is not None:
            self._observer.batch_done(len(batch), waits, elapsed, failure is not None)
