"""netvlad-bench's mixed-load phase: one interactive caller against bulk callers, in one run.

Each round measures three things on the same server, one after another, so that the machine's
other work falls on all of them alike (the round's second and third parts swap places every
round):

- idle: the interactive caller alone (single-image DescribeImages, PRIORITY_INTERACTIVE);
- bulk alone: `bulk_callers` callers each keeping one `bulk_images`-image PRIORITY_BULK request
  in flight;
- mixed: both at once.

The interactive caller starts a request on average every `interval` seconds (each gap drawn
uniformly from 0.5 to 1.5 times it, so its arrivals do not lock onto the bulk batches' rhythm;
a request that would start before the previous answer starts right after it); `interval` 0
sends back to back. Its latency is measured here, end to end. Bulk throughput is read from the
server: its bulk images computed (`netvlad_class_queue_wait_seconds_count{class="bulk"}`)
between two batch ends, divided by the time between them, so a window holds whole batches.
With several servers (one per `--priority-servers` flag set) the rounds alternate between
them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client.bench.harness import metrics_samples, read_metrics
from netvlad_client.bench.inprocess import BenchError
from netvlad_client.bench.load import DESCRIBE, Endpoint, latency_summary

BULK_DONE = "netvlad_class_queue_wait_seconds_count"
EDGE_POLL_SECONDS = 0.02


@dataclass(frozen=True)
class MixedLoad:
    """The shape of the mixed-load phase (see the module docstring)."""

    rounds: int = 3
    seconds: float = 20.0  # length of each bulk-alone and mixed window
    idle_requests: int = 8  # interactive requests per round on the idle server
    interval: float = 1.0  # mean seconds between interactive requests; 0: back to back
    bulk_callers: int = 4
    bulk_images: int = 16
    seed: int = 13


@dataclass
class _Tally:
    """What one server's rounds collected."""

    idle: list[float] = field(default_factory=list)
    mixed: list[float] = field(default_factory=list)
    bulk_alone: list[tuple[float, float]] = field(default_factory=list)  # (images, seconds)
    bulk_mixed: list[tuple[float, float]] = field(default_factory=list)
    refused: int = 0
    batch_seconds: float = 1.0  # a bulk batch's duration, estimated from the windows


def _metric(url: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    return sum(value for sample, found, value in metrics_samples(read_metrics(url))
               if sample == name and labels.items() <= found.items())


def _counts(url: str) -> tuple[float, float]:
    """(bulk images computed, model calls made) so far, from one read of /metrics."""
    samples = metrics_samples(read_metrics(url))
    bulk = sum(value for name, labels, value in samples
               if name == BULK_DONE and labels.get("class") == "bulk")
    calls = sum(value for name, _, value in samples if name == "netvlad_inference_seconds_count")
    return bulk, calls


async def _batch_end(url: str, timeout: float) -> tuple[float, float, float] | None:
    """Wait until a bulk batch finishes: (when, bulk images, model calls), None on timeout."""
    start = await asyncio.to_thread(_counts, url)
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        await asyncio.sleep(EDGE_POLL_SECONDS)
        now = await asyncio.to_thread(_counts, url)
        if now[0] != start[0]:
            return time.perf_counter(), *now
    return None


async def _window(url: str, seconds: float, batch_seconds: float) -> tuple[float, float, float]:
    """(bulk images, seconds, model calls) between the first batch end and the first one after
    `seconds`."""
    timeout = max(30.0, 4 * batch_seconds)
    first = await _batch_end(url, timeout)
    if first is not None:
        await asyncio.sleep(max(0.0, seconds - batch_seconds / 2))
        last = await _batch_end(url, timeout)
        if last is not None:
            return last[1] - first[1], last[0] - first[0], last[2] - first[2]
    raise BenchError(f"no bulk batch finished within {timeout:.0f} s: the server at {url} "
                     "is not computing the bulk requests (is it overloaded or paused?)")


class _Round:
    """The callers of one server: the bulk callers and the interactive caller."""

    def __init__(self, channel: grpc.aio.Channel, interactive: bytes, bulk: bytes,
                 shape: MixedLoad, tally: _Tally, rng: random.Random) -> None:
        self._call = channel.unary_unary(DESCRIBE)
        self._interactive = interactive
        self._bulk = bulk
        self._shape = shape
        self._tally = tally
        self._rng = rng

    async def bulk_caller(self) -> None:
        """Keep one bulk request in flight until cancelled; a refusal is counted and retried."""
        while True:
            try:
                await self._call(self._bulk, timeout=600)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise BenchError(f"a bulk request failed: {exc.code().name}: "
                                     f"{exc.details()}") from exc
                self._tally.refused += 1
                await asyncio.sleep(0.05)

    async def interactive_caller(self, into: list[float], count: int | None,
                                 stop: asyncio.Event | None) -> None:
        """Paced interactive requests: `count` of them, or until `stop` is set.

        The request in flight when `stop` is set finishes and is counted; no new one starts.
        """
        interval = self._shape.interval
        next_start = time.perf_counter()
        last = None if count is None else len(into) + count
        while last is None or len(into) < last:
            pause = max(0.0, next_start - time.perf_counter())
            if stop is None:
                await asyncio.sleep(pause)
            elif stop.is_set():
                return
            else:
                try:
                    await asyncio.wait_for(stop.wait(), pause)
                    return
                except TimeoutError:
                    pass
            began = time.perf_counter()
            try:
                await self._call(self._interactive, timeout=600)
            except grpc.aio.AioRpcError as exc:
                raise BenchError(f"an interactive request failed: {exc.code().name}: "
                                 f"{exc.details()}") from exc
            into.append(time.perf_counter() - began)
            next_start = began + interval * self._rng.uniform(0.5, 1.5)


async def _one_round(server: Endpoint, interactive: bytes, bulk: bytes, shape: MixedLoad,
                     tally: _Tally, mixed_first: bool, rng: random.Random) -> None:
    """Idle, then bulk alone and mixed (in either order) on one server."""
    url = server.metrics_url
    async with grpc.aio.insecure_channel(server.target, options=[
            ("grpc.max_receive_message_length", 256 << 20),
            ("grpc.max_send_message_length", 256 << 20)]) as channel:
        callers = _Round(channel, interactive, bulk, shape, tally, rng)
        await callers.interactive_caller(tally.idle, shape.idle_requests, None)
        bulk_tasks = [asyncio.create_task(callers.bulk_caller())
                      for _ in range(shape.bulk_callers)]
        try:
            await _window(url, 0.0, tally.batch_seconds)  # the queue fills; a batch ends
            for part in (("mixed", "bulk") if mixed_first else ("bulk", "mixed")):
                if part == "bulk":
                    images, seconds, calls = await _window(url, shape.seconds,
                                                           tally.batch_seconds)
                    tally.bulk_alone.append((images, seconds))
                    tally.batch_seconds = seconds / max(1.0, calls)
                    continue
                stop = asyncio.Event()
                caller = asyncio.create_task(callers.interactive_caller(tally.mixed, None, stop))
                try:
                    images, seconds, _ = await _window(url, shape.seconds, tally.batch_seconds)
                    tally.bulk_mixed.append((images, seconds))
                finally:
                    stop.set()
                    await caller
        finally:
            for task in bulk_tasks:
                task.cancel()
            outcomes = await asyncio.gather(*bulk_tasks, return_exceptions=True)
            failed = next((o for o in outcomes if isinstance(o, BenchError)), None)
            if failed is not None:
                raise failed  # the cause of whatever else went wrong in the round
    await _drained(url, tally.batch_seconds)


async def _drained(url: str, batch_seconds: float) -> None:
    """Wait until no bulk image is queued and the batch that may be running has ended."""
    deadline = time.perf_counter() + max(30.0, 4 * batch_seconds)
    while await asyncio.to_thread(_metric, url, "netvlad_class_queue_depth", **{"class": "bulk"}):
        if time.perf_counter() > deadline:
            raise BenchError(f"the bulk queue of the server at {url} did not empty after its "
                             "callers were cancelled")
        await asyncio.sleep(EDGE_POLL_SECONDS)
    await _batch_end(url, 1.5 * batch_seconds)


def _summarise(tally: _Tally) -> dict[str, Any]:
    """Latencies, throughputs and the three ratios with their targets."""
    idle, mixed = latency_summary(tally.idle), latency_summary(tally.mixed)
    alone = sum(i for i, _ in tally.bulk_alone) / sum(s for _, s in tally.bulk_alone)
    together = sum(i for i, _ in tally.bulk_mixed) / sum(s for _, s in tally.bulk_mixed)
    ratios = {
        "interactive_p50_vs_idle": (mixed["p50_ms"] / idle["p50_ms"], 3.0, "<="),
        "interactive_p99_vs_idle": (mixed["p99_ms"] / idle["p50_ms"], 5.0, "<="),
        "bulk_mixed_vs_alone": (together / alone, 0.85, ">="),
    }
    return {
        "idle": {"requests": len(tally.idle), "latency": idle,
                 "latencies_ms": [1000 * s for s in tally.idle]},
        "mixed": {"requests": len(tally.mixed), "latency": mixed,
                  "latencies_ms": [1000 * s for s in tally.mixed]},
        "bulk_alone_images_per_second": alone,
        "bulk_mixed_images_per_second": together,
        "bulk_windows": {"alone": tally.bulk_alone, "mixed": tally.bulk_mixed},
        "bulk_refused": tally.refused,
        "targets": {name: {"value": value, "target": f"{op} {bound:g}",
                           "met": value <= bound if op == "<=" else value >= bound}
                    for name, (value, bound, op) in ratios.items()},
    }


def priority_phase(servers: Sequence[Endpoint], image: pb.Image, shape: MixedLoad,
                   labels: Sequence[str]) -> dict[str, Any]:
    """The rounds on every server, alternating between them; results by label."""
    interactive = pb.DescribeImagesRequest(
        images=[image], priority=pb.PRIORITY_INTERACTIVE).SerializeToString()
    bulk = pb.DescribeImagesRequest(images=[image] * shape.bulk_images,
                                    priority=pb.PRIORITY_BULK).SerializeToString()
    tallies = [_Tally() for _ in servers]
    rng = random.Random(shape.seed)

    async def rounds() -> None:
        for number in range(shape.rounds):
            for server, tally in zip(servers, tallies, strict=True):
                await _one_round(server, interactive, bulk, shape, tally, number % 2 == 1, rng)

    started = time.perf_counter()
    asyncio.run(rounds())
    return {"shape": vars(shape) | {"interactive_request_images": 1},
            "wall_seconds": time.perf_counter() - started,
            "servers": {label: _summarise(tally)
                        for label, tally in zip(labels, tallies, strict=True)}}
