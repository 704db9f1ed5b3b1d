"""The load generator of netvlad-bench and the server-side numbers read around it.

Callers send one fixed, already serialised request as bytes (no client-side protobuf work in the
timed loop); the batch sizes the server formed and its model time come from its /metrics page,
its CPU and RSS from /proc when its process id is known.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client._proto import netvlad_pb2_grpc as pb_grpc
from netvlad_client.bench.harness import (
    metrics_samples,
    process_stats,
    read_metrics,
    thread_cpu,
)

DESCRIBE = "/netvlad.v1.DescriptorService/DescribeImages"


@dataclass
class Endpoint:
    """A server under test as the phases see it: where to call, where /metrics is, its pid."""

    target: str
    metrics_url: str
    pid: int = 0  # 0: unknown (a --target server without --server-pid): no RSS or CPU

    def stats(self) -> dict[str, float] | None:
        """RSS and CPU seconds of the server process, when its pid is known."""
        return process_stats(self.pid) if self.pid else None


def model_info(target: str) -> dict[str, Any]:
    """GetModelInfo as a plain dict."""
    from google.protobuf.json_format import MessageToDict

    with grpc.insecure_channel(target) as channel:
        info = pb_grpc.DescriptorServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(),
                                                                   timeout=30)
    return MessageToDict(info, preserving_proto_field_name=True)


def scrape(metrics_url: str) -> dict[str, Any]:
    """The batch-size histogram (images per model call -> calls) and model time from /metrics."""
    cumulative: dict[float, float] = {}
    out: dict[str, Any] = {"inference_seconds": 0.0, "batches": 0.0}
    for name, labels, value in metrics_samples(read_metrics(metrics_url)):
        if name == "netvlad_batch_size_bucket" and labels["le"] != "+Inf":
            cumulative[float(labels["le"])] = value
        elif name == "netvlad_inference_seconds_sum":
            out["inference_seconds"] = value
        elif name == "netvlad_inference_seconds_count":
            out["batches"] = value
    counts, below = {}, 0.0
    for bound in sorted(cumulative):
        counts[bound] = cumulative[bound] - below
        below = cumulative[bound]
    out["batch_sizes"] = counts
    return out


def settled_scrape(metrics_url: str, quiet: float = 0.05) -> dict[str, Any]:
    """scrape() once two reads agree: a batch is counted just after its callers get answers."""
    now = scrape(metrics_url)
    while True:
        time.sleep(quiet)
        now, before = scrape(metrics_url), now
        if now == before:
            return now


def batch_sizes_between(before: dict[str, Any], after: dict[str, Any]) -> dict[int, int]:
    """Model calls per batch size between two scrapes (bucket bounds are the sizes up to 16)."""
    diff = {int(size): round(after["batch_sizes"][size] - before["batch_sizes"].get(size, 0))
            for size in after["batch_sizes"]}
    return {size: count for size, count in sorted(diff.items()) if count}


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Median, p95, p99, mean and max of latencies, in milliseconds."""
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "max_ms": float(ms.max())}


async def _drive(target: str, request: bytes, callers: int, count: int,
                 on_answer: Callable[[int], None] | None) -> tuple[list[float], float, bytes]:
    """`count` calls from `callers` concurrent callers; (latencies, wall seconds, one answer)."""
    latencies: list[float] = []
    answers: list[bytes] = []
    issued = 0
    async with grpc.aio.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20)]) as channel:
        call = channel.unary_unary(DESCRIBE)  # bytes in, bytes out: no client-side (de)coding

        async def caller() -> None:
            nonlocal issued
            while issued < count:
                issued += 1
                start = time.perf_counter()
                answer = await call(request, timeout=600)
                latencies.append(time.perf_counter() - start)
                if not answers:
                    answers.append(answer)
                if on_answer is not None:
                    on_answer(len(latencies))

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(min(callers, count))))
        wall = time.perf_counter() - start
    return latencies, wall, answers[0]


def drive(target: str, request: bytes, callers: int, count: int,
          on_answer: Callable[[int], None] | None = None) -> tuple[list[float], float, bytes]:
    """Synchronous wrapper of the load generator (a fresh event loop per phase)."""
    return asyncio.run(_drive(target, request, callers, count, on_answer))


def load_phase(server: Endpoint, request: bytes, images_per_request: int, callers: int,
               count: int) -> dict[str, Any]:
    """Warm up with 2 rounds of callers, then time `count` requests; metrics diffed around them."""
    drive(server.target, request, callers, 2 * callers)
    before, stats_before = settled_scrape(server.metrics_url), server.stats()
    threads_before = thread_cpu(server.pid) if server.pid else None
    latencies, wall, answer = drive(server.target, request, callers, count)
    threads_after = thread_cpu(server.pid) if server.pid else None
    after, stats_after = settled_scrape(server.metrics_url), server.stats()
    sizes = batch_sizes_between(before, after)
    images = count * images_per_request
    result: dict[str, Any] = {
        "callers": callers, "requests": count, "images": images, "wall_seconds": wall,
        "images_per_second": images / wall, "latency": latency_summary(latencies),
        "batch_sizes": sizes,
        "mean_batch_size": sum(s * n for s, n in sizes.items()) / max(1, sum(sizes.values())),
        "model_seconds": after["inference_seconds"] - before["inference_seconds"],
        "latencies_ms": [1000 * s for s in latencies],
        "descriptor": list(pb.DescribeImagesResponse.FromString(answer).descriptors[0].values),
    }
    result["model_busy_fraction"] = result["model_seconds"] / wall
    if stats_before and stats_after and threads_before and threads_after:
        cpu = stats_after["cpu_seconds"] - stats_before["cpu_seconds"]
        result.update(server_cpu_seconds=cpu, server_cpu_seconds_per_request=cpu / count,
                      rss_mib=stats_after["rss_mib"], **{
                          f"{name}_cpu_seconds_per_request":
                              (threads_after[name] - threads_before[name]) / count
                          for name in threads_after})
    return result


def memory_phase(server: Endpoint, request: bytes, callers: int, count: int) -> dict[str, Any]:
    """`count` requests with the server's RSS sampled every ~1% of them."""
    every = max(1, count // 100)
    samples: list[tuple[int, float]] = [(0, process_stats(server.pid)["rss_mib"])]

    def sample(done: int) -> None:
        if done % every == 0 or done == count:
            samples.append((done, process_stats(server.pid)["rss_mib"]))

    _, wall, _ = drive(server.target, request, callers, count, sample)
    done = np.array([s[0] for s in samples], float)
    rss = np.array([s[1] for s in samples])
    half = done >= done[-1] / 2
    slope = float(np.polyfit(done[half], rss[half], 1)[0]) if half.sum() > 1 else 0.0
    return {"requests": count, "wall_seconds": wall, "samples": samples,
            "rss_start_mib": float(rss[0]), "rss_end_mib": float(rss[-1]),
            "rss_max_mib": float(rss.max()),
            "growth_second_half_mib_per_1000_requests": slope * 1000}
