"""The dynamic batcher on its own, around plain Python functions (no model, no gRPC)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence

import pytest
from netvlad_server.batching import (
    BatcherClosedError,
    BatchFailedError,
    BatchingPolicy,
    DeadlineExpiredError,
    DynamicBatcher,
    PriorityClass,
    QueueFullError,
)


class Recorder:
    """A run function that records each batch, its thread, and can be held at a gate."""

    def __init__(self, fail_on: object = None) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.threads: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.active = 0
        self.max_active = 0
        self.fail_on = fail_on
        self._lock = threading.Lock()

    def __call__(self, items: list[tuple[str, int]]) -> list[int]:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.threads.add(threading.get_ident())
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(list(items))
        with self._lock:
            self.active -= 1
        if any(key == self.fail_on for key, _ in items):
            raise RuntimeError(f"cannot run key {self.fail_on}")
        return [value * 10 for _, value in items]

    @property
    def values_run(self) -> list[int]:
        return [value for batch in self.batches for _, value in batch]


class Observer:
    """Collects what the batcher reports to monitoring."""

    def __init__(self) -> None:
        self.depths: list[int] = []
        self.class_depths: list[dict[str, int]] = []
        self.classes: list[str] = []
        self.sizes: list[int] = []
        self.failed: list[bool] = []

    def queue_depth(self, depths: Mapping[str, int]) -> None:
        self.depths.append(sum(depths.values()))
        self.class_depths.append(dict(depths))

    def batch_done(self, class_name: str, size: int, queue_waits: Sequence[float],
                   run_seconds: float, failed: bool) -> None:
        assert len(queue_waits) == size and run_seconds >= 0
        self.classes.append(class_name)
        self.sizes.append(size)
        self.failed.append(failed)


def make(run: Recorder, observer: Observer | None = None, **policy: float) -> DynamicBatcher:
    """A started batcher (call inside a running loop)."""
    batcher = DynamicBatcher(run, BatchingPolicy(**policy), observer=observer)
    batcher.start()
    return batcher


def submit(batcher: DynamicBatcher, key: str, *values: int, timeout: float | None = None):
    """Submit values under one key."""
    return batcher.submit([(key, (key, value)) for value in values], timeout=timeout)


async def wait_entered(run: Recorder) -> None:
    """Wait (without blocking the loop) until the run function has been entered."""
    for _ in range(500):
        if run.entered.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("run was never called")


def test_each_caller_gets_its_own_result_in_batches_of_one_key():
    async def scenario():
        run, observer = Recorder(), Observer()
        batcher = make(run, observer, max_batch_size=4, max_queue_delay=0.2, max_queue_size=64)
        futures = [submit(batcher, "a" if i % 2 else "b", i)[0] for i in range(8)]
        results = await asyncio.wait_for(asyncio.gather(*futures), 10)
        await batcher.close()
        return run, observer, results

    run, observer, results = asyncio.run(scenario())
    assert results == [i * 10 for i in range(8)]
    assert sorted(len(batch) for batch in run.batches) == [4, 4]
    for batch in run.batches:
        assert len({key for key, _ in batch}) == 1, f"keys mixed in {batch}"
    assert observer.sizes == [4, 4] and observer.failed == [False, False]
    assert observer.depths[-1] == 0 and observer.classes == ["default", "default"]


def test_batches_never_exceed_max_batch_size():
    async def scenario():
        run = Recorder()
        batcher = make(run, max_batch_size=4, max_queue_delay=0.05, max_queue_size=64)
        results = await asyncio.gather(*submit(batcher, "k", *range(10)))
        await batcher.close()
        return run, results

    run, results = asyncio.run(scenario())
    assert results == [v * 10 for v in range(10)]
    assert [len(batch) for batch in run.batches] == [4, 4, 2]


def test_a_partial_batch_waits_for_later_items_within_the_delay():
    async def scenario():
        run = Recorder()
        batcher = make(run, max_batch_size=8, max_queue_delay=1.0, max_queue_size=64)
        first = submit(batcher, "k", 1)
        await asyncio.sleep(0.05)
        second = submit(batcher, "k", 2)
        await asyncio.gather(*first, *second)
        await batcher.close()
        return run

    assert [len(batch) for batch in asyncio.run(scenario()).batches] == [2]


def test_a_full_batch_runs_without_waiting_for_the_delay():
    async def scenario():
        run = Recorder()
        batcher = make(run, max_batch_size=3, max_queue_delay=60.0, max_queue_size=64)
        results = await asyncio.wait_for(asyncio.gather(*submit(batcher, "k", 1, 2, 3)), 10)
        await batcher.close()
        return results

    assert asyncio.run(scenario()) == [10, 20, 30]


def test_the_oldest_ready_key_runs_first():
    async def scenario():
        run = Recorder()
        batcher = make(run, max_batch_size=2, max_queue_delay=0.0, max_queue_size=64)
        run.gate.clear()
        busy = submit(batcher, "x", 0)
        await wait_entered(run)
        older = submit(batcher, "b", 1)
        newer = submit(batcher, "a", 2, 3)  # a full batch, but younger than b's item
        run.gate.set()
        await asyncio.gather(*busy, *older, *newer)
        await batcher.close()
        return run

    run = asyncio.run(scenario())
    assert [[key for key, _ in batch] for batch in run.batches] == [["x"], ["b"], ["a", "a"]]


def test_run_happens_on_one_worker_thread_never_concurrently_nor_on_the_loop():
    async def scenario():
        run = Recorder()
        batcher = make(run, max_batch_size=2, max_queue_delay=0.0, max_queue_size=64)
        futures = [f for i in range(12) for f in submit(batcher, f"k{i % 3}", i)]
        await asyncio.gather(*futures)
        await batcher.close()
        return run, threading.get_ident()

    run, loop_thread = asyncio.run(scenario())
    assert len(run.threads) == 1 and loop_thread not in run.threads
    assert run.max_active == 1


def test_a_full_queue_refuses_at_once_and_all_or_nothing():
    async def scenario():
        run = Recorder()
        batcher = make(run, max_batch_size=1, max_queue_delay=0.0, max_queue_size=3)
        run.gate.clear()
        running = submit(batcher, "k", 0)
        await wait_entered(run)  # item 0 left the queue and runs
        queued = submit(batcher, "k", 1, 2)
        with pytest.raises(QueueFullError, match="holds 2 of 3"):
            submit(batcher, "k", 3, 4)  # two do not fit in the one free place
        assert batcher.depth == 2
        last = submit(batcher, "k", 5)
        with pytest.raises(QueueFullError):
            submit(batcher, "k", 6)
        run.gate.set()
        results = await asyncio.gather(*running, *queued, *last)
        await batcher.close()
        return run, results

    run, results = asyncio.run(scenario())
    assert results == [0, 10, 20, 50]
    assert run.values_run == [0, 1, 2, 5]


def test_cancelled_items_free_their_place_and_never_run():
    async def scenario():
        run, observer = Recorder(), Observer()
        batcher = make(run, observer, max_batch_size=4, max_queue_delay=0.0, max_queue_size=4)
        run.gate.clear()
        running = submit(batcher, "k", 0)
        await wait_entered(run)
        doomed = submit(batcher, "k", 1, 2, 3, 4)
        assert batcher.depth == 4
        for future in doomed[:3]:
            future.cancel()
        await asyncio.sleep(0)  # done-callbacks run on the next loop iteration
        assert batcher.depth == 1
        kept = submit(batcher, "k", 5, 6, 7)  # the freed places are usable again
        run.gate.set()
        results = await asyncio.gather(*running, doomed[3], *kept)
        await batcher.close()
        return run, results

    run, results = asyncio.run(scenario())
    assert results == [0, 40, 50, 60, 70]
    assert sorted(run.values_run) == [0, 4, 5, 6, 7]


def test_items_past_their_deadline_are_dropped_before_running():
    async def scenario():
        run = Recorder()
        batcher = make(run, max_batch_size=4, max_queue_delay=0.0, max_queue_size=8)
        run.gate.clear()
        running = submit(batcher, "k", 0)
        await wait_entered(run)
        expiring = submit(batcher, "k", 1, timeout=0.05)
        patient = submit(batcher, "k", 2, timeout=30.0)
        await asyncio.sleep(0.2)
        run.gate.set()
        with pytest.raises(DeadlineExpiredError, match="deadline passed"):
            await expiring[0]
        results = await asyncio.gather(*running, *patient)
        await batcher.close()
        return run, results

    run, results = asyncio.run(scenario())
    assert results == [0, 20]
    assert run.values_run == [0, 2]


def test_a_failing_run_fails_only_its_batch_and_the_batcher_goes_on():
    async def scenario():
        run, observer = Recorder(fail_on="bad"), Observer()
        batcher = make(run, observer, max_batch_size=4, max_queue_delay=0.05, max_queue_size=16)
        bad = submit(batcher, "bad", 1, 2)
        good = submit(batcher, "good", 3, 4)
        outcomes = await asyncio.gather(*bad, *good, return_exceptions=True)
        after = await asyncio.gather(*submit(batcher, "good", 5))
        await batcher.close()
        return observer, outcomes, after

    observer, outcomes, after = asyncio.run(scenario())
    for outcome in outcomes[:2]:
        assert isinstance(outcome, BatchFailedError)
        assert "cannot run key bad" in str(outcome)
        assert isinstance(outcome.__cause__, RuntimeError)
    assert outcomes[2:] == [30, 40]
    assert after == [50]
    assert sorted(observer.failed) == [False, False, True]


def test_a_dead_scheduler_is_reported_and_refuses_later_work():
    class BrokenObserver(Observer):
        def batch_done(self, *args: object) -> None:
            raise RuntimeError("monitoring broke")

    async def scenario():
        stopped: list[BaseException] = []
        batcher = DynamicBatcher(Recorder(), BatchingPolicy(max_queue_delay=0.0),
                                 observer=BrokenObserver(), on_stopped=stopped.append)
        batcher.start()
        first = await asyncio.gather(*submit(batcher, "a", 1))
        for _ in range(100):
            if stopped:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(BatcherClosedError):
            submit(batcher, "a", 2)
        return first, stopped, batcher.accepting

    first, stopped, accepting = asyncio.run(scenario())
    assert first == [10]
    assert len(stopped) == 1 and "monitoring broke" in str(stopped[0])
    assert not accepting


def test_a_run_returning_the_wrong_number_of_results_fails_the_batch():
    async def scenario():
        batcher = DynamicBatcher(lambda items: items[:-1], BatchingPolicy(2, 0.0, 4))
        batcher.start()
        outcomes = await asyncio.gather(*batcher.submit([("k", 1), ("k", 2)]),
                                        return_exceptions=True)
        await batcher.close()
        return outcomes

    for outcome in asyncio.run(scenario()):
        assert isinstance(outcome, BatchFailedError)
        assert "1 results for a batch of 2" in str(outcome)


def test_close_finishes_admitted_work_without_waiting_delays_then_refuses():
    async def scenario():
        run = Recorder()
        batcher = make(run, max_batch_size=8, max_queue_delay=60.0, max_queue_size=16)
        futures = submit(batcher, "a", 1, 2) + submit(batcher, "b", 3)
        await asyncio.wait_for(batcher.close(), 10)
        assert all(future.done() for future in futures)
        with pytest.raises(BatcherClosedError):
            submit(batcher, "a", 4)
        return [future.result() for future in futures]

    assert asyncio.run(scenario()) == [10, 20, 30]


def test_submit_before_start_is_refused_and_bad_policies_rejected():
    batcher = DynamicBatcher(lambda items: items, BatchingPolicy())
    with pytest.raises(BatcherClosedError):
        batcher.submit([("k", 1)])
    with pytest.raises(ValueError, match="invalid batching policy"):
        BatchingPolicy(max_batch_size=0)


def two_classes(run: Recorder, observer: Observer | None = None, **policy: object
                ) -> DynamicBatcher:
    """A started batcher with classes "hi" (ahead) and "lo", 4 places each unless given."""
    sizes = policy.pop("sizes", (4, 4))
    steps = policy.pop("steps", None)
    classes = (PriorityClass("hi", sizes[0]), PriorityClass("lo", sizes[1]))
    batcher = DynamicBatcher(run, BatchingPolicy(classes=classes, **policy), observer=observer,
                             run_in_steps=steps)
    batcher.start()
    return batcher


def submit_in(batcher: DynamicBatcher, priority: str, key: str, *values: int,
              timeout: float | None = None):
    """Submit values under one key in one class."""
    return batcher.submit([(key, (key, value)) for value in values], timeout=timeout,
                          priority=priority)


def test_a_higher_class_runs_ahead_of_older_lower_class_work():
    async def scenario():
        run = Recorder()
        batcher = two_classes(run, max_batch_size=2, max_queue_delay=0.0)
        run.gate.clear()
        busy = submit_in(batcher, "lo", "x", 0)
        await wait_entered(run)
        low = submit_in(batcher, "lo", "a", 1, 2) + submit_in(batcher, "lo", "b", 3)
        high = submit_in(batcher, "hi", "c", 4) + submit_in(batcher, "hi", "a", 5, 6)
        run.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*busy, *low, *high), 10)
        await batcher.close()
        return run, results

    run, results = asyncio.run(scenario())
    assert results == [0, 10, 20, 30, 40, 50, 60]
    # Within a class the oldest ready key first; keys and classes never share a batch.
    assert [[v for _, v in batch] for batch in run.batches] == [[0], [4], [5, 6], [1, 2], [3]]


def test_each_class_has_its_own_budget():
    async def scenario():
        run = Recorder()
        batcher = two_classes(run, max_batch_size=1, max_queue_delay=0.0, sizes=(2, 3))
        run.gate.clear()
        busy = submit_in(batcher, "lo", "k", 0)
        await wait_entered(run)
        low = submit_in(batcher, "lo", "k", 1, 2, 3)
        with pytest.raises(QueueFullError, match="the lo queue holds 3 of 3 items"):
            submit_in(batcher, "lo", "k", 4)
        high = submit_in(batcher, "hi", "k", 5, 6)  # the full lo queue refuses nothing of hi
        with pytest.raises(QueueFullError, match="the hi queue holds 2 of 2 items"):
            submit_in(batcher, "hi", "k", 7)
        assert batcher.depths == {"hi": 2, "lo": 3} and batcher.depth == 5
        with pytest.raises(ValueError, match="class 'mid'; the batcher has hi, lo"):
            submit_in(batcher, "mid", "k", 8)
        run.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*busy, *low, *high), 10)
        await batcher.close()
        return run, results

    run, results = asyncio.run(scenario())
    assert results == [0, 10, 20, 30, 50, 60]
    assert run.values_run == [0, 5, 6, 1, 2, 3]


def test_a_waiting_lower_class_runs_after_max_skips_higher_batches():
    async def scenario():
        run = Recorder()
        batcher = two_classes(run, max_batch_size=1, max_queue_delay=0.0, max_skips=2,
                              sizes=(8, 8))
        run.gate.clear()
        busy = submit_in(batcher, "hi", "k", 0)
        await wait_entered(run)
        low = submit_in(batcher, "lo", "k", 100, 101)
        high = submit_in(batcher, "hi", "k", 1, 2, 3, 4, 5, 6)
        run.gate.set()
        await asyncio.wait_for(asyncio.gather(*busy, *low, *high), 10)
        await batcher.close()
        return run

    # While lo has a ready batch, at most two hi batches run in a row.
    assert asyncio.run(scenario()).values_run == [0, 1, 2, 100, 3, 4, 101, 5, 6]


def test_a_higher_partial_batch_does_not_wait_out_the_delay_while_lower_work_is_ready():
    async def scenario():
        run = Recorder()
        batcher = two_classes(run, max_batch_size=2, max_queue_delay=60.0)
        run.gate.clear()
        busy = submit_in(batcher, "lo", "k", 0, 1)  # a full batch runs at once
        await wait_entered(run)
        low = submit_in(batcher, "lo", "k", 2, 3)  # full: ready
        high = submit_in(batcher, "hi", "k", 4)  # partial: would wait 60 s on an idle model
        run.gate.set()
        await asyncio.wait_for(asyncio.gather(*busy, *low, *high), 10)
        await batcher.close()
        return run

    assert [[v for _, v in batch] for batch in asyncio.run(scenario()).batches] == [
        [0, 1], [4], [2, 3]]


def test_deadlines_cancellation_and_observer_per_class():
    async def scenario():
        run, observer = Recorder(), Observer()
        batcher = two_classes(run, observer, max_batch_size=4, max_queue_delay=0.0)
        run.gate.clear()
        busy = submit_in(batcher, "hi", "k", 0)
        await wait_entered(run)
        expiring = [submit_in(batcher, name, "k", value, timeout=0.05)[0]
                    for name, value in (("hi", 1), ("lo", 2))]
        cancelled = [submit_in(batcher, name, "k", value)[0] for name, value in (("hi", 3),
                                                                                ("lo", 4))]
        kept = submit_in(batcher, "lo", "k", 5)
        for future in cancelled:
            future.cancel()
        await asyncio.sleep(0.2)
        assert batcher.depths == {"hi": 1, "lo": 2}  # cancelled items left, expired wait
        run.gate.set()
        for future in expiring:
            with pytest.raises(DeadlineExpiredError):
                await asyncio.wait_for(future, 10)
        results = await asyncio.wait_for(asyncio.gather(*busy, *kept), 10)
        await batcher.close()
        return run, observer, results

    run, observer, results = asyncio.run(scenario())
    assert results == [0, 50] and run.values_run == [0, 5]
    assert observer.classes == ["hi", "lo"] and observer.sizes == [1, 1]
    assert {"hi": 2, "lo": 3} in observer.class_depths
    assert observer.class_depths[-1] == {"hi": 0, "lo": 0}


def test_bad_priority_classes_are_rejected():
    with pytest.raises(ValueError, match="distinct names"):
        BatchingPolicy(classes=(PriorityClass("a", 1), PriorityClass("a", 2)))
    with pytest.raises(ValueError, match="queue budgets of at least 1"):
        BatchingPolicy(classes=(PriorityClass("a", 0),))
    with pytest.raises(ValueError, match="max_skips"):
        BatchingPolicy(max_skips=-1)
    assert BatchingPolicy(max_queue_size=5).priority_classes == (PriorityClass("default", 5),)


def test_lower_class_batches_shrink_while_a_higher_class_is_active():
    async def scenario(high_first: bool, wait_after_high: float):
        run = Recorder()
        batcher = two_classes(run, max_batch_size=4, max_queue_delay=0.0, sizes=(8, 8),
                              mixed_batch_size=2, mixed_window=0.5)
        high = []
        if high_first:
            high = submit_in(batcher, "hi", "k", 100)
            await asyncio.wait_for(asyncio.gather(*high), 10)
            await asyncio.sleep(wait_after_high)
        run.gate.clear()
        run.entered.clear()
        busy = submit_in(batcher, "lo", "k", 0)
        await wait_entered(run)
        low = submit_in(batcher, "lo", "k", *range(1, 9))
        run.gate.set()
        await asyncio.wait_for(asyncio.gather(*busy, *low), 10)
        await batcher.close()
        return [[v for _, v in batch] for batch in run.batches]

    full = [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert asyncio.run(scenario(False, 0.0)) == full  # lo alone: max_batch_size
    # hi submitted within mixed_window: lo batches hold mixed_batch_size items at most ...
    assert asyncio.run(scenario(True, 0.0)) == [[100], [0], [1, 2], [3, 4], [5, 6], [7, 8]]
    # ... and once hi has been quiet for mixed_window, lo's full batches are back.
    assert asyncio.run(scenario(True, 0.7)) == [[100], *full]
    with pytest.raises(ValueError, match="mixed_batch_size, mixed_window and linger must be"):
        BatchingPolicy(mixed_batch_size=-1)


def test_after_a_higher_batch_lower_work_lingers_for_the_next_higher_request():
    async def scenario(linger: float):
        run = Recorder()
        batcher = two_classes(run, max_batch_size=2, max_queue_delay=0.0, linger=linger)
        run.gate.clear()
        low = submit_in(batcher, "lo", "k", 1, 2)  # runs at once: nothing of hi has run yet
        await wait_entered(run)
        first = submit_in(batcher, "hi", "k", 100)
        more_low = submit_in(batcher, "lo", "k", 3, 4)
        run.gate.set()
        await asyncio.wait_for(asyncio.gather(*first), 10)
        await asyncio.sleep(0.05)  # a caller's turnaround: answer out, next request in
        second = submit_in(batcher, "hi", "k", 101)
        await asyncio.wait_for(asyncio.gather(*low, *more_low, *second), 10)
        await batcher.close()
        return run.values_run

    # Without linger the ready lo batch starts the moment hi's batch ends, and hi's next
    # request waits behind it; lingering 0.5 s (cut short by the request) keeps the model for it.
    assert asyncio.run(scenario(0.0)) == [1, 2, 100, 3, 4, 101]
    assert asyncio.run(scenario(0.5)) == [1, 2, 100, 101, 3, 4]


class StepRecorder(Recorder):
    """Recorder with stepped batches: each step is recorded (and gated) as a batch."""

    def __init__(self, fail_on: object = None) -> None:
        super().__init__(fail_on)
        self.finished: list[list[int]] = []  # the batches completed after their last step

    def steps(self, items: list[tuple[str, int]], step: int):
        for start in range(0, len(items), step):
            if start:
                yield
            self(items[start:start + step])
        self.finished.append([value for _, value in items])
        return [value * 10 for _, value in items]


def test_a_stepped_lower_batch_lets_higher_work_run_between_its_steps():
    async def scenario():
        run = StepRecorder()
        observer = Observer()
        batcher = two_classes(run, observer, max_batch_size=4, max_queue_delay=0.0,
                              mixed_batch_size=1, steps=run.steps)
        run.gate.clear()
        low = submit_in(batcher, "lo", "k", 1, 2, 3, 4)
        await wait_entered(run)  # the batch's first step holds the model
        high = submit_in(batcher, "hi", "k", 100, 101)
        run.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*low, *high), 10)
        await batcher.close()
        return run, observer, results

    run, observer, results = asyncio.run(scenario())
    assert results == [10, 20, 30, 40, 1000, 1010]
    # hi waited for one step of lo's batch, not for the whole batch; lo's batch stayed whole
    # (4 items, completed once) and was not shrunk to the step size.
    assert [[v for _, v in batch] for batch in run.batches] == [[1], [100, 101], [2], [3], [4]]
    assert run.finished == [[1, 2, 3, 4]]
    assert observer.classes == ["hi", "lo"] and observer.sizes == [2, 4]


def test_a_paused_batch_takes_a_step_after_at_most_max_skips_higher_batches():
    async def scenario():
        run = StepRecorder()
        batcher = two_classes(run, max_batch_size=3, max_queue_delay=0.0, max_skips=2,
                              mixed_batch_size=1, sizes=(8, 8), steps=run.steps)
        run.gate.clear()
        low = submit_in(batcher, "lo", "k", 1, 2, 3)
        await wait_entered(run)
        high = [f for key in "abcdef" for f in submit_in(batcher, "hi", key, ord(key))]
        run.gate.set()
        await asyncio.wait_for(asyncio.gather(*low, *high), 10)
        await batcher.close()
        return run

    # Each key of hi is a batch of its own; the started lo batch never waits for more than two.
    a, b, c, d, e, f = (ord(key) for key in "abcdef")
    assert asyncio.run(scenario()).values_run == [1, a, b, 2, c, d, 3, e, f]


def test_a_failing_step_fails_its_batch_only():
    async def scenario():
        run = StepRecorder(fail_on="bad")
        batcher = two_classes(run, max_batch_size=4, max_queue_delay=0.0, mixed_batch_size=2,
                              steps=run.steps)
        bad = submit_in(batcher, "lo", "bad", 1, 2, 3)
        outcome = await asyncio.gather(*bad, return_exceptions=True)
        good = await asyncio.wait_for(asyncio.gather(*submit_in(batcher, "lo", "k", 4, 5, 6)),
                                      10)
        await batcher.close()
        return run, outcome, good

    run, outcome, good = asyncio.run(scenario())
    assert all(isinstance(error, BatchFailedError) and "cannot run key bad" in str(error)
               for error in outcome)
    assert good == [40, 50, 60] and run.finished == [[4, 5, 6]]


def test_a_paused_batch_lingers_for_the_next_higher_request():
    async def scenario(linger: float):
        run = StepRecorder()
        batcher = two_classes(run, max_batch_size=3, max_queue_delay=0.0, mixed_batch_size=1,
                              linger=linger, steps=run.steps)
        run.gate.clear()
        low = submit_in(batcher, "lo", "k", 1, 2, 3)
        await wait_entered(run)
        first = submit_in(batcher, "hi", "k", 100)
        run.gate.set()
        await asyncio.wait_for(asyncio.gather(*first), 10)
        await asyncio.sleep(0.05)  # a caller's turnaround: answer out, next request in
        second = submit_in(batcher, "hi", "k", 101)
        await asyncio.wait_for(asyncio.gather(*low, *second), 10)
        await batcher.close()
        return run.values_run

    # Without linger the paused batch finishes its steps in the turnaround; with it, the next
    # higher request (cutting the 0.5 s short) goes before the paused batch's next step.
    assert asyncio.run(scenario(0.0)) == [1, 100, 2, 3, 101]
    assert asyncio.run(scenario(0.5)) == [1, 100, 101, 2, 3]
