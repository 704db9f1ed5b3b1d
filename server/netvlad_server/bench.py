"""`netvlad-bench`: load-test netvlad-server and compare it with the raw model, all in one run.

Phases (server phases start their own `python -m netvlad_server`, or drive --target):

1. load: N concurrent callers send --requests copies of one fixed image (JPEG, PNG or raw
   pixels): throughput, latency p50/p95/p99, the batch sizes the server formed (the
   netvlad_batch_size histogram on /metrics), server CPU seconds per request, and the CPU per
   request spent outside the model: the event-loop thread (the main thread: every request's
   Python), gRPC's I/O threads (event_engine, grpc_*), plus decoding, timed here with the
   server's own decoder;
2. single: one caller, --single-requests requests: latency;
3. memory: --rss-requests requests while the server's VmRSS (/proc/PID/status) is sampled;
4. baseline: the same server with --max-batch-size 1 (no batching) under the same N callers;
5. raw: the network called directly in this process, no gRPC: the time of every batch size the
   server formed (the ceiling), batch 1 in the server's precision (the latency reference) and
   float32 batch 1 (the one-image-at-a-time reference) with its cosine to the server's answer.

Everything is printed and written as JSON; a PNG plot summarises it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client._proto import netvlad_pb2_grpc as pb_grpc

from netvlad_server.config import ConfigError, parse_sizes
from netvlad_server.runtime import cpu_model, synthetic_scene

DESCRIBE = "/netvlad.v1.DescriptorService/DescribeImages"
PHASES = ("load", "single", "memory", "baseline", "raw")
ENCODINGS = ("jpeg", "png", "raw")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_GRPC_THREADS = ("event_engine", "grpc")  # name prefixes of gRPC core's own threads


@dataclass
class BenchSettings:
    """What to measure and how; built from the command line."""

    target: str = ""  # host:port of a running server; "" starts one
    metrics_url: str = ""
    server_pid: int = 0
    model: str = "demo"
    precision: str = "auto"
    xla: bool = False
    max_batch_size: int = 8
    max_queue_delay_ms: float = 5.0
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    server_args: list[str] = field(default_factory=list)
    height: int = 240
    width: int = 320
    encoding: str = "jpeg"
    callers: int = 8
    requests: int = 64
    single_requests: int = 16
    rss_requests: int = 2000
    baseline_requests: int = 0  # 0: as many as --requests
    raw_repeats: int = 3
    skip: frozenset[str] = frozenset()
    out: str = "bench.json"
    plot: str = "bench.png"
    log_dir: str = ""


def parse_args(argv: Sequence[str] | None = None) -> BenchSettings:
    """Build BenchSettings from the command line."""
    parser = argparse.ArgumentParser(
        prog="netvlad-bench", description=__doc__.splitlines()[0],
        epilog="Example: netvlad-bench --size 480x640 --callers 8 --requests 64 "
               "--out bench.json --plot bench.png")
    add = parser.add_argument
    add("--target", default="", help="host:port of a running server (default: start one)")
    add("--metrics-url", default="", help="its /metrics URL (default http://HOST:9090/metrics)")
    add("--server-pid", type=int, default=0, help="its process id, for RSS and CPU (optional)")
    add("--model", default="demo", help="weights for started servers and the raw model")
    add("--precision", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    add("--xla", action="store_true", help="start servers and the raw model with XLA")
    add("--max-batch-size", type=int, default=8)
    add("--max-queue-delay-ms", type=float, default=5.0)
    add("--intra-op-threads", type=int, default=0, help="for servers and the raw model")
    add("--inter-op-threads", type=int, default=1, help="for servers and the raw model")
    add("--server-args", default="", help="more netvlad-server flags, one shell-quoted string")
    add("--size", default="240x320", help="image HEIGHTxWIDTH (default %(default)s)")
    add("--encoding", default="jpeg", choices=ENCODINGS, help="how images travel")
    add("--callers", type=int, default=8, help="concurrent callers in the load phases")
    add("--requests", type=int, default=64, help="timed requests in the load phase")
    add("--single-requests", type=int, default=16, help="requests of the one-caller phase")
    add("--rss-requests", type=int, default=2000, help="requests of the memory phase")
    add("--baseline-requests", type=int, default=0, help="0: as many as --requests")
    add("--raw-repeats", type=int, default=3, help="timed raw calls per batch size (median)")
    add("--skip", default="", help=f"comma-separated phases to leave out: {', '.join(PHASES)}")
    add("--out", default="bench.json", help="JSON results file")
    add("--plot", default="bench.png", help="PNG plot file ('' for none)")
    add("--log-dir", default="", help="where started servers write their logs (default: temp)")
    args = parser.parse_args(argv)
    try:
        sizes = parse_sizes(args.size)
    except ConfigError as exc:
        parser.error(f"--size: {exc}")
    skip = frozenset(filter(None, (p.strip() for p in args.skip.split(","))))
    if len(sizes) != 1:
        parser.error(f"--size takes one HEIGHTxWIDTH, e.g. 480x640; got {args.size!r}")
    if skip - set(PHASES):
        parser.error(f"--skip: unknown phase(s) {', '.join(sorted(skip - set(PHASES)))}; "
                     f"the phases are {', '.join(PHASES)}")
    for name in ("callers", "requests", "single_requests", "rss_requests", "raw_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1 (use --skip to leave a "
                         f"phase out); got {getattr(args, name)}")
    values = {k: v for k, v in vars(args).items() if k not in ("size", "skip", "server_args")}
    return BenchSettings(**values, height=sizes[0][0], width=sizes[0][1], skip=skip,
                         server_args=shlex.split(args.server_args))


def image_message(image: np.ndarray, encoding: str) -> pb.Image:
    """The image as it travels: an encoded JPEG (quality 90) or PNG, or raw RGB pixels."""
    import cv2

    if encoding == "raw":
        height, width, channels = image.shape
        return pb.Image(raw=pb.RawImage(data=image.tobytes(), height=height, width=width,
                                        channels=channels))
    ext, params = (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]) if encoding == "jpeg" else (".png", [])
    ok, data = cv2.imencode(ext, np.ascontiguousarray(image[:, :, ::-1]), params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {encoding} image")
    return pb.Image(encoded=data.tobytes())


def server_pixels(message: pb.Image) -> np.ndarray:
    """The uint8 [H, W, C] array the server's model sees for this image (same decoder)."""
    from netvlad_server.images import ImageLimits, decode_encoded

    if message.WhichOneof("source") == "raw":
        raw = message.raw
        return np.frombuffer(raw.data, np.uint8).reshape(raw.height, raw.width, raw.channels)
    return decode_encoded(message.encoded, ImageLimits(1 << 40))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_stats(pid: int) -> dict[str, float]:
    """RSS (MiB, from /proc/PID/status) and CPU seconds (user + system, /proc/PID/stat)."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = next(int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("VmRSS:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return {"rss_mib": rss_kib / 1024, "cpu_seconds": cpu_ticks / _CLK_TCK}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the process's main thread (the asyncio event loop) and gRPC I/O threads."""
    out = {"event_loop": 0.0, "grpc_io": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        seconds = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        if task.name == str(pid):
            out["event_loop"] += seconds
        elif name.startswith(_GRPC_THREADS):
            out["grpc_io"] += seconds
    return out


def decode_cpu_seconds(message: pb.Image, repeats: int = 20) -> float:
    """Median CPU seconds the server's decoding (same function) takes for this image."""
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        server_pixels(message)
        times.append(time.thread_time() - start)
    return statistics.median(times)


def scrape(metrics_url: str) -> dict[str, Any]:
    """The batch-size histogram (images per model call -> calls) and model time from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    cumulative: dict[float, float] = {}
    out: dict[str, Any] = {"inference_seconds": 0.0, "batches": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "netvlad_batch_size_bucket" and sample.labels["le"] != "+Inf":
                cumulative[float(sample.labels["le"])] = sample.value
            elif sample.name == "netvlad_inference_seconds_sum":
                out["inference_seconds"] = sample.value
            elif sample.name == "netvlad_inference_seconds_count":
                out["batches"] = sample.value
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


class Server:
    """A server under test: one started here (`python -m netvlad_server`) or one given."""

    def __init__(self, target: str, metrics_url: str, pid: int = 0,
                 process: subprocess.Popen | None = None, log: Path | None = None) -> None:
        self.target = target
        self.metrics_url = metrics_url
        self.pid = pid
        self.process = process
        self.log = log

    @classmethod
    def start(cls, settings: BenchSettings, log: Path, *overrides: str) -> Server:
        """Start a server on free loopback ports with the settings' flags (overrides last)."""
        port, metrics_port = free_port(), free_port()
        args = [sys.executable, "-m", "netvlad_server", "--model", settings.model,
                "--host", "127.0.0.1", "--port", str(port), "--metrics-host", "127.0.0.1",
                "--metrics-port", str(metrics_port), "--precision", settings.precision,
                "--xla" if settings.xla else "--no-xla",
                "--max-batch-size", str(settings.max_batch_size),
                "--max-queue-delay-ms", str(settings.max_queue_delay_ms),
                "--intra-op-threads", str(settings.intra_op_threads),
                "--inter-op-threads", str(settings.inter_op_threads),
                "--warmup-sizes", f"{settings.height}x{settings.width}",
                "--max-queue-size", str(max(64, 4 * settings.callers)),
                *settings.server_args, *overrides]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        with open(log, "wb") as handle:
            process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env)
        return cls(f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics",
                   process.pid, process, log)

    def wait_serving(self, timeout: float = 600.0) -> None:
        """Block until the health service says SERVING; raise with the log if the server died."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.process.returncode}; "
                                       f"its log {self.log}:\n{self.tail()}")
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"the server at {self.target} was not SERVING after {timeout:.0f} s")

    def model_info(self) -> dict[str, Any]:
        """GetModelInfo as a plain dict."""
        from google.protobuf.json_format import MessageToDict

        with grpc.insecure_channel(self.target) as channel:
            info = pb_grpc.DescriptorServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(),
                                                                       timeout=30)
        return MessageToDict(info, preserving_proto_field_name=True)

    def stats(self) -> dict[str, float] | None:
        """RSS and CPU seconds of the server process, when its pid is known."""
        return process_stats(self.pid) if self.pid else None

    def tail(self, lines: int = 30) -> str:
        """The end of a started server's log."""
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM a started server and wait for it (SIGKILL after 60 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


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


def load_phase(server: Server, request: bytes, images_per_request: int, callers: int,
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


def memory_phase(server: Server, request: bytes, callers: int, count: int) -> dict[str, Any]:
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


def raw_phase(settings: BenchSettings, precision: str, image: np.ndarray,
              batch_sizes: Sequence[int], server_descriptor: Sequence[float] | None,
              ) -> dict[str, Any]:
    """The network called directly: each batch size formed in `precision`, and float32 batch 1."""
    from netvlad_server.network import NetVLADNetwork
    from netvlad_server.weights import load_weights

    def timed(net: NetVLADNetwork, batch: np.ndarray) -> dict[str, float]:
        net(batch)  # warm-up: tracing and oneDNN primitive creation for this shape
        runs = []
        for _ in range(settings.raw_repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            net(batch)
            runs.append((time.perf_counter() - wall, time.process_time() - cpu))
        wall_s = statistics.median(r[0] for r in runs)
        cpu_s = statistics.median(r[1] for r in runs)
        size = len(batch)
        return {"seconds": wall_s, "seconds_per_image": wall_s / size,
                "images_per_second": size / wall_s, "cpu_seconds_per_image": cpu_s / size}

    weights = load_weights(settings.model)
    net = NetVLADNetwork(weights, precision=precision, xla=settings.xla)
    sizes = sorted({1, *batch_sizes})
    out: dict[str, Any] = {"precision": precision, "by_batch": {
        size: timed(net, np.repeat(image[None], size, axis=0)) for size in sizes}}
    if precision != "float32" or settings.xla:
        del net
        net = NetVLADNetwork(weights, precision="float32")
        out["float32_batch_1"] = timed(net, image[None])
    else:
        out["float32_batch_1"] = out["by_batch"][1]
    if server_descriptor is not None and len(server_descriptor) == net.output_dims:
        reference = net(image[None])[0]
        out["cosine_server_vs_float32"] = float(np.dot(reference, server_descriptor))
    return out


def ceiling(raw: dict[str, Any], sizes: dict[int, int]) -> float:
    """Images/s of the raw model running exactly the batches the server formed, back to back."""
    images = sum(size * calls for size, calls in sizes.items())
    seconds = sum(raw["by_batch"][size]["seconds"] * calls for size, calls in sizes.items())
    return images / seconds


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """The ratios the targets are stated in, each with its target and whether it is met."""
    load, raw = results.get("load"), results.get("raw")
    single, base = results.get("single"), results.get("baseline")
    out: dict[str, Any] = {}
    if load and raw:
        value = load["images_per_second"] / ceiling(raw, load["batch_sizes"])
        out["server_vs_raw_at_formed_batches"] = {"value": value, "target": ">= 0.90",
                                                  "met": value >= 0.90}
        value = load["images_per_second"] / raw["float32_batch_1"]["images_per_second"]
        cosine = raw.get("cosine_server_vs_float32")
        out["server_vs_float32_one_at_a_time"] = {
            "value": value, "cosine_vs_float32": cosine, "target": ">= 5 with cosine >= 0.9999",
            "met": value >= 5 and cosine is not None and cosine >= 0.9999}
    if single and raw:
        value = single["latency"]["p50_ms"] / (1000 * raw["by_batch"][1]["seconds"])
        out["single_caller_median_vs_raw_batch_1"] = {"value": value, "target": "<= 1.10",
                                                      "met": value <= 1.10}
    if load and base:
        out["server_vs_no_batching"] = {"value": load["images_per_second"]
                                        / base["images_per_second"]}
    if results.get("memory"):
        memory = results["memory"]
        out["rss_growth_mib"] = {"value": memory["rss_end_mib"] - memory["rss_start_mib"],
                                 "requests": memory["requests"]}
    if results.get("overhead"):
        out["cpu_ms_per_request_outside_model"] = {
            "value": 1000 * results["overhead"]["total_cpu_seconds_per_request"]}
    return out


def plot(results: dict[str, Any], path: str) -> None:
    """Four panels: throughput against the references, latencies, batch sizes, RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    fig.suptitle(f"netvlad-bench: {settings['height']}x{settings['width']} {settings['encoding']}, "
                 f"{results.get('precision', '?')}, {settings['callers']} callers, "
                 f"model {settings['model']}")
    bars: dict[str, float] = {}
    raw, load = results.get("raw"), results.get("load")
    if raw:
        bars["float32\none at a time\n(raw)"] = raw["float32_batch_1"]["images_per_second"]
        bars[f"{raw['precision']}\nbatch 1 (raw)"] = raw["by_batch"][1]["images_per_second"]
    if results.get("baseline"):
        bars["server\nno batching"] = results["baseline"]["images_per_second"]
    if load:
        bars[f"server\n{settings['callers']} callers"] = load["images_per_second"]
        if raw:
            bars["raw at formed\nbatches (ceiling)"] = ceiling(raw, load["batch_sizes"])
    ax = axes[0][0]
    ax.bar(list(bars), list(bars.values()), color="tab:blue")
    ax.set_ylabel("images / s")
    ax.set_title("throughput")
    ax.tick_params(axis="x", labelsize=8)
    ax = axes[0][1]
    for name, label in (("load", f"{settings['callers']} callers"), ("single", "1 caller")):
        if results.get(name):
            ms = np.sort(results[name]["latencies_ms"])
            ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=label)
    if raw:
        ax.axvline(1000 * raw["by_batch"][1]["seconds"], color="k", linestyle=":",
                   label="raw batch-1 forward")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("latency distribution")
    ax.legend()
    ax = axes[1][0]
    if load:
        sizes = load["batch_sizes"]
        ax.bar([str(s) for s in sizes], list(sizes.values()), color="tab:green")
    ax.set_xlabel("images per model call")
    ax.set_ylabel("model calls")
    ax.set_title("batch sizes formed (netvlad_batch_size)")
    ax = axes[1][1]
    if results.get("memory"):
        samples = np.array(results["memory"]["samples"])
        ax.plot(samples[:, 0], samples[:, 1], color="tab:red")
        ax.set_ylim(0, samples[:, 1].max() * 1.15)
    else:
        ax.text(0.5, 0.5, "not measured in this run", ha="center", transform=ax.transAxes)
    ax.set_xlabel("requests answered")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title("server memory")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(settings: BenchSettings) -> dict[str, Any]:
    """Every phase not skipped; returns the results dict (also what the JSON holds)."""
    image = synthetic_scene(settings.height, settings.width)
    message = image_message(image, settings.encoding)
    pixels = server_pixels(message)
    request = pb.DescribeImagesRequest(images=[message]).SerializeToString()
    log_dir = Path(settings.log_dir or tempfile.mkdtemp(prefix="netvlad-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "settings": {k: sorted(v) if isinstance(v, frozenset) else v
                     for k, v in vars(settings).items()},
        "image_bytes": len(message.encoded) or len(message.raw.data),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "load_average_before": os.getloadavg()}}
    skip = settings.skip

    def started(log_name: str, *overrides: str) -> Server:
        server = Server.start(settings, log_dir / log_name, *overrides)
        print(f"started a server ({' '.join(overrides) or 'as configured'}), log {server.log}",
              flush=True)
        server.wait_serving()
        return server

    def phase(name: str) -> bool:
        if name in skip:
            return False
        print(f"phase {name} ...", flush=True)
        return True

    if settings.target:
        metrics = settings.metrics_url or f"http://{settings.target.rsplit(':', 1)[0]}:9090/metrics"
        main = Server(settings.target, metrics, settings.server_pid)
        main.wait_serving()
    else:
        main = started("server.log")
    try:
        info = main.model_info()
        results["model_info"] = info
        results["precision"] = info.get("precision", "float32")
        results["server_start"] = main.stats()
        if phase("load"):
            results["load"] = load_phase(main, request, 1, settings.callers, settings.requests)
        if phase("single"):
            results["single"] = load_phase(main, request, 1, 1, settings.single_requests)
        if main.pid and phase("memory"):
            results["memory"] = memory_phase(main, request, settings.callers,
                                             settings.rss_requests)
    finally:
        if not settings.target:
            main.stop()
    if phase("baseline"):
        baseline = started("baseline.log", "--max-batch-size", "1")
        try:
            results["baseline"] = load_phase(baseline, request, 1, settings.callers,
                                             settings.baseline_requests or settings.requests)
        finally:
            baseline.stop()
    load = results.get("load", {})
    if "event_loop_cpu_seconds_per_request" in load:
        decode = decode_cpu_seconds(message)
        results["overhead"] = {
            "event_loop_cpu_seconds_per_request": load["event_loop_cpu_seconds_per_request"],
            "grpc_io_cpu_seconds_per_request": load["grpc_io_cpu_seconds_per_request"],
            "decode_cpu_seconds_per_image": decode,
            "total_cpu_seconds_per_request": load["event_loop_cpu_seconds_per_request"]
            + load["grpc_io_cpu_seconds_per_request"] + decode}
    _configure_raw_threads(settings)
    if phase("raw"):
        formed = results.get("load", {}).get("batch_sizes", {})
        descriptor = results.get("load", {}).get("descriptor")
        results["raw"] = raw_phase(settings, results["precision"], pixels, list(formed),
                                   descriptor)
    results["machine"]["load_average_after"] = os.getloadavg()
    results["summary"] = summarise(results)
    return results


def _configure_raw_threads(settings: BenchSettings) -> None:
    """Give this process's TensorFlow the thread settings the servers were started with."""
    from netvlad_server.runtime import configure_tensorflow

    configure_tensorflow(settings.intra_op_threads, settings.inter_op_threads)


def report(results: dict[str, Any]) -> str:
    """The human-readable summary printed at the end."""
    lines = [f"precision {results.get('precision')}, image {results['image_bytes']} bytes"]
    for name in ("load", "single", "baseline"):
        part = results.get(name)
        if part:
            lat = part["latency"]
            cpu = part.get("server_cpu_seconds_per_request")
            lines.append(
                f"{name:9s} {part['callers']} caller(s), {part['requests']} requests: "
                f"{part['images_per_second']:.2f} images/s, latency p50 {lat['p50_ms']:.1f} ms "
                f"p95 {lat['p95_ms']:.1f} p99 {lat['p99_ms']:.1f}, batches {part['batch_sizes']}"
                + (f", server CPU {1000 * cpu:.1f} ms/request" if cpu is not None else ""))
    if results.get("memory"):
        m = results["memory"]
        lines.append(f"memory    {m['requests']} requests: RSS {m['rss_start_mib']:.0f} -> "
                     f"{m['rss_end_mib']:.0f} MiB (max {m['rss_max_mib']:.0f}), second half "
                     f"{m['growth_second_half_mib_per_1000_requests']:+.1f} MiB per 1000 requests")
    if results.get("overhead"):
        o = {k: 1000 * v for k, v in results["overhead"].items()}
        lines.append(f"overhead  server CPU per request outside the model: "
                     f"{o['total_cpu_seconds_per_request']:.2f} ms (event loop "
                     f"{o['event_loop_cpu_seconds_per_request']:.2f}, gRPC I/O "
                     f"{o['grpc_io_cpu_seconds_per_request']:.2f}, decoding "
                     f"{o['decode_cpu_seconds_per_image']:.2f})")
    if results.get("raw"):
        r = results["raw"]
        for size, row in r["by_batch"].items():
            lines.append(f"raw       {r['precision']} batch {size}: {row['seconds']:.3f} s per "
                         f"call, {row['images_per_second']:.2f} images/s")
        lines.append(f"raw       float32 batch 1: "
                     f"{r['float32_batch_1']['images_per_second']:.2f} images/s")
    for name, value in results["summary"].items():
        lines.append(f"summary   {name}: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of netvlad-bench."""
    settings = parse_args(argv)
    if settings.plot and importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plot (pip install 'netvlad-service[plot]')")
        settings.plot = ""
    results = run(settings)
    print(report(results))
    Path(settings.out).parent.mkdir(parents=True, exist_ok=True)
    Path(settings.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {settings.out}")
    if settings.plot:
        plot(results, settings.plot)
        print(f"wrote {settings.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
