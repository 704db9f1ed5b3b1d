"""A dynamic batcher: a queueing policy wrapped around `run(list of items) -> list of results`.

Knows nothing of models or gRPC. Items carry a batching key (for images: their shape); a batch
holds items of one key only. The knobs are named as in Triton's dynamic batcher:

- `max_batch_size`: most items per call of `run`;
- `max_queue_delay`: once an item is queued, how long (seconds) to wait for more items of its key
  before running a partial batch; a full batch runs at once;
- `max_queue_size`: most items waiting (not yet running) in one priority class; `submit` beyond
  it raises QueueFullError immediately rather than letting callers pile up.

Priority classes (`BatchingPolicy.classes`, highest first; one class unless configured) are data
on the submitted work: each submit names its class. Each class has its own queue budget, so a
full low class never refuses work of another class. A batch holds items of one key and one class.

`run` is called on one dedicated worker thread, never concurrently and never on the event loop,
and a batch that started always finishes. When the worker is free, the next batch is chosen so:

1. Starvation guard: a class that has a ready batch (full, or its oldest item has waited
   `max_queue_delay`, or the batcher is closing) and was passed over `max_skips` times in a row
   runs now. So while a lower class has a ready batch, at most `max_skips` batches of higher
   classes run before one of its batches does: it gets at least 1 / (max_skips + 1) of the
   batches however busy the higher classes are.
2. Otherwise the highest class holding any item goes. Its ready key holding the oldest item
   runs; if none of its keys is ready yet but a lower class has a ready batch, its oldest key
   runs at once as a partial batch (waiting out the delay would leave the model idle or hand
   it to the lower class for a whole batch); if nothing anywhere is ready, the scheduler sleeps
   until the first key becomes ready.

Passing over a class that has a ready batch counts as one skip for it; running one of its
batches, or having nothing queued, resets its count.

What bounds a higher class's wait is the work already running when it arrives, most often a
lower class's batch. `mixed_batch_size` bounds that work in one of two ways:

- *Stepped batches* (when the batcher is given `run_in_steps`): a lower class's batch keeps up to
  `max_batch_size` items but is computed in steps of at most `mixed_batch_size` items. Between
  two steps, queued work of a higher class runs first: up to `max(1, max_skips)` of its batches
  (lingering between them as below), then the paused batch takes its next step, so a started
  batch always finishes. A step is never interrupted, and nothing is computed twice: the model
  keeps the finished steps' partial results and completes the batch after its last step (the
  network runs its convolutions per step and its whitening, a per-call cost, once per batch).
- Otherwise, a lower class's batches hold at most `mixed_batch_size` items while a higher class
  is active (work submitted to it within the last `mixed_window` seconds), and `max_batch_size`
  items otherwise.

Either way, a higher class's work finds at most `mixed_batch_size` items' computation in its way.

A caller that sends its next request as soon as it has an answer would still find a lower
class's batch started in the instant between the two. So, with `linger` set, once a batch of a
higher class finishes the scheduler waits up to `linger` seconds for more of that class's work
before it starts a lower class's batch (the starvation guard is not delayed).

Cancelled items leave the queue at once; items whose deadline passed are dropped before `run`
sees them. `close()` stops admissions and finishes admitted work.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Generator, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
# A stepped batch: each next() computes one step; the generator returns the batch's results.
Steps = Generator[None, None, Sequence[ResultT]]


class QueueFullError(RuntimeError):
    """The queue cannot take the submitted items now; the caller should retry later."""


class BatcherClosedError(RuntimeError):
    """The batcher is draining or stopped and admits nothing new."""


class DeadlineExpiredError(TimeoutError):
    """The item's deadline passed while it waited, so it was dropped before running."""


class BatchFailedError(RuntimeError):
    """`run` raised (or returned the wrong number of results) for the batch holding this item."""


@dataclass(frozen=True)
class PriorityClass:
    """One priority class: its name (what submit and the observer call it) and queue budget."""

    name: str
    max_queue_size: int


@dataclass(frozen=True)
class BatchingPolicy:
    """The batcher's knobs (Triton names); max_queue_delay is in seconds.

    `classes` lists the priority classes, highest first; empty means one class named "default"
    with `max_queue_size` as its budget. `max_skips` is the starvation guard's bound;
    `mixed_batch_size` (0: off) limits lower classes' batches while a higher class had work
    within `mixed_window` seconds; `linger` (seconds, 0: off) holds lower classes back that long
    after a higher class's batch (see the module docstring).
    """

    max_batch_size: int = 8
    max_queue_delay: float = 0.005
    max_queue_size: int = 64
    classes: tuple[PriorityClass, ...] = ()
    max_skips: int = 4
    mixed_batch_size: int = 0
    mixed_window: float = 10.0
    linger: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_size < 1 or self.max_queue_delay < 0:
            raise ValueError(f"invalid batching policy {self}")
        if self.max_skips < 0:
            raise ValueError(f"invalid batching policy {self}: max_skips must be at least 0")
        if self.mixed_batch_size < 0 or self.mixed_window < 0 or self.linger < 0:
            raise ValueError(f"invalid batching policy {self}: mixed_batch_size, mixed_window "
                             "and linger must be at least 0")
        names = [cls.name for cls in self.classes]
        if len(set(names)) != len(names) or any(cls.max_queue_size < 1 for cls in self.classes):
            raise ValueError(f"invalid batching policy {self}: priority classes need distinct "
                             "names and queue budgets of at least 1")

    @property
    def priority_classes(self) -> tuple[PriorityClass, ...]:
        """The classes in force, highest first."""
        return self.classes or (PriorityClass("default", self.max_queue_size),)


class BatchObserver(Protocol):
    """Receives what a monitoring system wants to know; called on the event loop thread."""

    def queue_depth(self, depths: Mapping[str, int]) -> None:
        """The number of queued items changed; depths holds every class's count."""

    def batch_done(self, class_name: str, size: int, queue_waits: Sequence[float],
                   run_seconds: float, failed: bool) -> None:
        """A batch of `size` items of one class ran for run_seconds after each waited
        queue_waits[i]."""


class _Class(Generic[ItemT, ResultT]):
    """The queues of one priority class: per-key deques, its depth, skip count, last submit."""

    __slots__ = ("depth", "last_done", "last_submit", "limit", "name", "queues", "rank", "skips")

    def __init__(self, name: str, limit: int, rank: int) -> None:
        self.name = name
        self.limit = limit
        self.rank = rank  # 0 for the highest class
        self.queues: dict[Hashable, collections.deque[_Entry[ItemT, ResultT]]] = {}
        self.depth = 0
        self.skips = 0
        self.last_submit = float("-inf")
        self.last_done = float("-inf")  # when its last batch finished

    def oldest_key(self) -> Hashable:
        """The key whose queue holds this class's oldest item (the class must hold items)."""
        return min(self.queues, key=lambda key: self.queues[key][0].enqueued)


class _Entry(Generic[ItemT, ResultT]):
    """One queued item with its caller's future and its class."""

    __slots__ = ("cls", "deadline", "enqueued", "future", "item", "key", "queued")

    def __init__(self, cls: _Class[ItemT, ResultT], key: Hashable, item: ItemT,
                 future: asyncio.Future[ResultT], enqueued: float, deadline: float | None) -> None:
        self.cls = cls
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
        run_in_steps: Callable[[list[ItemT], int], Steps[ResultT]] | None = None,
    ) -> None:
        self._run = run
        # (items, step size) -> Steps; used for lower classes' batches when mixed_batch_size
        # is set (module docstring).
        self._run_in_steps = run_in_steps if policy.mixed_batch_size else None
        self._on_stopped = on_stopped
        self.policy = policy
        self._observer = observer
        self._thread_name = thread_name
        self._classes: list[_Class[ItemT, ResultT]] = [
            _Class(cls.name, cls.max_queue_size, rank)
            for rank, cls in enumerate(policy.priority_classes)]
        self._by_name = {cls.name: cls for cls in self._classes}
        self._depth = 0
        self._closing = False
        self._wake: asyncio.Future[None] | None = None
        self._lingering = False  # asleep for a higher class's next work (see `linger`)
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def depth(self) -> int:
        """Items queued and not yet running, all classes together."""
        return self._depth

    @property
    def depths(self) -> dict[str, int]:
        """Items queued and not yet running, by class."""
        return {cls.name: cls.depth for cls in self._classes}

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
        self, items: Sequence[tuple[Hashable, ItemT]], timeout: float | None = None,
        priority: str | None = None,
    ) -> list[asyncio.Future[ResultT]]:
        """Queue (key, item) pairs all together or none; return one future per item, in order.

        `priority` names the class the items queue in (None: the highest class). Raises
        QueueFullError when they do not all fit in that class's budget, BatcherClosedError when
        draining, ValueError for an unknown class. With `timeout` (seconds), items still queued
        after it are dropped with DeadlineExpiredError. Cancelling a returned future removes
        its item from the queue.
        """
        cls = self._classes[0] if priority is None else self._by_name.get(priority)
        if cls is None:
            raise ValueError(f"unknown priority class {priority!r}; the batcher has "
                             f"{', '.join(self._by_name)}")
        if not self.accepting:
            raise BatcherClosedError("the batcher is not accepting work (stopped or draining)")
        if cls.depth + len(items) > cls.limit:
            queue_name = f"the {cls.name} queue" if len(self._classes) > 1 else "the queue"
            raise QueueFullError(
                f"{queue_name} holds {cls.depth} of {cls.limit} items and cannot take "
                f"{len(items)} more; retry later")
        assert self._loop is not None
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        futures = []
        wake = self._depth == 0
        cls.last_submit = now
        batch_size = self._batch_size(cls, now)
        for key, item in items:
            future: asyncio.Future[ResultT] = self._loop.create_future()
            entry = _Entry(cls, key, item, future, now, deadline)
            future.add_done_callback(lambda _f, e=entry: self._forget(e))
            queue = cls.queues.get(key)
            if queue is None:
                queue = cls.queues[key] = collections.deque()
            queue.append(entry)
            wake = wake or self._lingering or len(queue) == batch_size
            futures.append(future)
        self._add_depth(cls, len(items))
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

    def _add_depth(self, cls: _Class[ItemT, ResultT], change: int) -> None:
        """Record a change of one class's queue depth and tell the observer."""
        cls.depth += change
        self._depth += change
        if self._observer is not None:
            self._observer.queue_depth(self.depths)

    def _forget(self, entry: _Entry[ItemT, ResultT]) -> None:
        """Done-callback: a future finished while queued (cancelled), so its place frees now."""
        if not entry.queued:
            return
        entry.queued = False
        queues = entry.cls.queues
        queue = queues.get(entry.key)
        if queue is not None:
            queue.remove(entry)
            if not queue:
                del queues[entry.key]
        self._add_depth(entry.cls, -1)

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

    def _batch_size(self, cls: _Class[ItemT, ResultT], now: float) -> int:
        """Most items in a batch of `cls` now: mixed_batch_size while a higher class is active."""
        policy = self.policy
        if policy.mixed_batch_size and self._run_in_steps is None and any(
                higher.last_submit >= now - policy.mixed_window
                for higher in self._classes[:cls.rank]):
            return min(policy.mixed_batch_size, policy.max_batch_size)
        return policy.max_batch_size

    def _ready_key(self, cls: _Class[ItemT, ResultT], now: float) -> tuple[Hashable | None,
                                                                          float | None]:
        """The class's ready key holding the oldest item (or None), and when the next is ready."""
        best_key, best_time = None, None
        soonest = None
        batch_size = self._batch_size(cls, now)
        for key, queue in cls.queues.items():
            oldest = queue[0].enqueued
            ready_at = oldest + self.policy.max_queue_delay
            if self._closing or len(queue) >= batch_size or ready_at <= now:
                if best_time is None or oldest < best_time:
                    best_key, best_time = key, oldest
            elif soonest is None or ready_at < soonest:
                soonest = ready_at
        return best_key, soonest

    def _next_batch(
        self, now: float
    ) -> tuple[_Class[ItemT, ResultT] | None, Hashable | None, float | None]:
        """(class, key) to run now by the rules of the module docstring, or the wait until one."""
        ready: list[Hashable | None] = []
        soonest = None
        for cls in self._classes:
            key, ready_at = self._ready_key(cls, now)
            ready.append(key)
            if ready_at is not None and (soonest is None or ready_at < soonest):
                soonest = ready_at
            if not cls.queues:
                cls.skips = 0
        chosen = next((i for i, cls in enumerate(self._classes)
                       if ready[i] is not None and cls.skips >= self.policy.max_skips), None)
        if chosen is None:
            chosen = next((i for i, cls in enumerate(self._classes) if cls.queues), None)
            if chosen is None:
                return None, None, None
            if ready[chosen] is None:
                if all(key is None for key in ready[chosen + 1:]):
                    return None, None, None if soonest is None else soonest - now
                ready[chosen] = self._classes[chosen].oldest_key()
            lingered = self._linger_end(chosen)
            if lingered > now and not self._closing:
                self._lingering = True
                return None, None, lingered - now
        for i, cls in enumerate(self._classes):
            if i == chosen:
                cls.skips = 0
            elif i > chosen and ready[i] is not None:
                cls.skips += 1
        return self._classes[chosen], ready[chosen], None

    def _linger_end(self, rank: int) -> float:
        """Until when classes from `rank` down are held back for the classes above (linger)."""
        return max((cls.last_done for cls in self._classes[:rank]),
                   default=float("-inf")) + self.policy.linger

    def _take(self, cls: _Class[ItemT, ResultT], key: Hashable,
              now: float) -> list[_Entry[ItemT, ResultT]]:
        """Pop up to a batch's worth of live entries of `key` in `cls`; fail the expired ones."""
        queue = cls.queues[key]
        batch: list[_Entry[ItemT, ResultT]] = []
        taken = 0
        batch_size = self._batch_size(cls, now)
        while queue and len(batch) < batch_size:
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
            del cls.queues[key]
        self._add_depth(cls, -taken)
        return batch

    async def _schedule(self) -> None:
        """Wait for a batch to choose, run it, repeat; return once closed and empty."""
        while True:
            now = time.monotonic()
            self._lingering = False  # set again by _next_batch while it still lingers
            cls, key, wait = self._next_batch(now)
            if cls is None:
                if self._closing and not self._depth:
                    return
                await self._sleep(wait)
                continue
            batch = self._take(cls, key, now)
            if batch:
                await self._execute(cls, batch)
                cls.last_done = time.monotonic()

    async def _execute(self, cls: _Class[ItemT, ResultT],
                       batch: list[_Entry[ItemT, ResultT]]) -> None:
        """Run one batch on the worker thread and hand each caller its result (or the error)."""
        assert self._loop is not None and self._executor is not None
        items = [entry.item for entry in batch]
        start = time.monotonic()
        waits = [start - entry.enqueued for entry in batch]
        failure: str | None = None
        cause: Exception | None = None
        results: Sequence[ResultT] = ()
        computing = 0.0  # seconds of the batch's own steps, without work run between them
        try:
            step = self.policy.mixed_batch_size
            if self._run_in_steps is not None and cls.rank > 0 and len(items) > step:
                results, computing = await self._stepped(cls, items, step)
            else:
                results = await self._loop.run_in_executor(self._executor, self._run, items)
                computing = time.monotonic() - start
            if len(results) != len(items):
                failure = f"run returned {len(results)} results for a batch of {len(items)}"
        except Exception as exc:
            failure, cause = f"{type(exc).__name__}: {exc}", exc
        elapsed = computing or time.monotonic() - start
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
            self._observer.batch_done(cls.name, len(batch), waits, elapsed, failure is not None)

    async def _stepped(self, cls: _Class[ItemT, ResultT], items: list[ItemT],
                       step: int) -> tuple[Sequence[ResultT], float]:
        """Compute a lower class's batch step by step, higher classes' work going in between.

        Returns the results and the seconds its own steps took.
        """
        assert self._loop is not None and self._executor is not None and self._run_in_steps
        steps = self._run_in_steps(items, step)
        computing = 0.0
        while True:
            began = time.monotonic()
            done, results = await self._loop.run_in_executor(self._executor, _advance, steps)
            computing += time.monotonic() - began
            if done:
                return results, computing
            await self._between_steps(cls)

    async def _between_steps(self, paused: _Class[ItemT, ResultT]) -> None:
        """Run up to max(1, max_skips) batches of classes above `paused`, lingering between."""
        higher = self._classes[:paused.rank]
        for _ in range(max(1, self.policy.max_skips)):
            now = time.monotonic()
            cls = next((c for c in higher if c.queues), None)
            if cls is None:
                lingered = self._linger_end(paused.rank)
                if lingered <= now or self._closing:
                    return
                self._lingering = True
                try:
                    await self._sleep(lingered - now)
                finally:
                    self._lingering = False
                if not any(c.queues for c in higher):
                    return
                continue
            key, _ = self._ready_key(cls, now)
            if key is None:  # the model is free now: waiting out the delay would idle it
                key = cls.oldest_key()
            batch = self._take(cls, key, now)
            if batch:
                await self._execute(cls, batch)
                cls.last_done = time.monotonic()


def _advance(steps: Steps[ResultT]) -> tuple[bool, Sequence[ResultT]]:
    """Compute one step: (False, ()) while more remain, (True, results) after the last."""
    try:
        next(steps)
    except StopIteration as finished:
        return True, finished.value
    return False, ()
