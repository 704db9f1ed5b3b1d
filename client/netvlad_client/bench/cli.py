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
5. priority: mixed load, one server per --priority-servers flag set (alternating between
   them): an interactive caller's latency when the server is idle and while --bulk-callers keep
   --bulk-images-image bulk requests in flight, and bulk throughput alone and with the
   interactive caller, in interleaved windows (see bench/priority.py);
6. raw: the network called directly in this process, no gRPC: the time of every batch size the
   server formed (the ceiling), batch 1 in the server's precision (the latency reference) and
   float32 batch 1 (the one-image-at-a-time reference) with its cosine to the server's answer.

Everything is printed and written as JSON; a PNG plot summarises it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client.bench import inprocess
from netvlad_client.bench.harness import ServerProcess, ServerStartError, wait_serving
from netvlad_client.bench.inprocess import BenchError
from netvlad_client.bench.load import Endpoint, load_phase, memory_phase, model_info
from netvlad_client.bench.priority import MixedLoad, priority_phase
from netvlad_client.bench.results import plot, report, summarise

AS_CONFIGURED = "as configured"  # the priority phase's label of a server without extra flags
PHASES = ("load", "single", "memory", "baseline", "priority", "raw")
ENCODINGS = ("jpeg", "png", "raw")


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
    priority_servers: list[str] = field(default_factory=list)  # flag sets; empty: as configured
    priority_rounds: int = 3
    priority_seconds: float = 20.0
    priority_idle_requests: int = 8
    interactive_interval: float = 1.0
    bulk_callers: int = 4
    bulk_images: int = 16
    skip: frozenset[str] = frozenset()
    out: str = "bench.json"
    plot: str = "bench.png"
    log_dir: str = ""
    argv: list[str] = field(default_factory=list)  # the command line, for the results


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
    add("--priority-servers", action="append", default=[], metavar="FLAGS",
        help="repeatable: netvlad-server flags (one shell-quoted string, after the others) of "
             "one server of the priority phase, e.g. --priority-servers='--max-batch-size 4' "
             "(default: one server as configured; with --target: that server)")
    add("--priority-rounds", type=int, default=3,
        help="rounds of idle, bulk-alone and mixed windows per server (priority phase)")
    add("--priority-seconds", type=float, default=20.0,
        help="length of each bulk-alone and mixed window, seconds (priority phase)")
    add("--priority-idle-requests", type=int, default=8,
        help="interactive requests per round on the idle server (priority phase)")
    add("--interactive-interval", type=float, default=1.0,
        help="mean seconds between the interactive caller's requests; 0: back to back")
    add("--bulk-callers", type=int, default=4, help="bulk callers of the priority phase")
    add("--bulk-images", type=int, default=16, help="images per bulk request (priority phase)")
    add("--skip", default="", help=f"comma-separated phases to leave out: {', '.join(PHASES)}")
    add("--out", default="bench.json", help="JSON results file")
    add("--plot", default="bench.png", help="PNG plot file ('' for none)")
    add("--log-dir", default="", help="where started servers write their logs (default: temp)")
    args = parser.parse_args(argv)
    config = inprocess.server_module("netvlad_server.config", "reads --size")
    try:
        sizes = config.parse_sizes(args.size)
    except config.ConfigError as exc:
        parser.error(f"--size: {exc}")
    skip = frozenset(filter(None, (p.strip() for p in args.skip.split(","))))
    if len(sizes) != 1:
        parser.error(f"--size takes one HEIGHTxWIDTH, e.g. 480x640; got {args.size!r}")
    if skip - set(PHASES):
        parser.error(f"--skip: unknown phase(s) {', '.join(sorted(skip - set(PHASES)))}; "
                     f"the phases are {', '.join(PHASES)}")
    flag_sets = [" ".join(shlex.split(flags)) for flags in args.priority_servers]
    if len(set(flag_sets)) != len(flag_sets):
        parser.error(f"--priority-servers: each flag set once; got {args.priority_servers!r}")
    if flag_sets and args.target:
        parser.error("--priority-servers starts one server per flag set; with --target the "
                     "priority phase measures that server as it is configured")
    if args.priority_seconds <= 0 or args.interactive_interval < 0:
        parser.error("--priority-seconds must be above 0 and --interactive-interval at least 0; "
                     f"got {args.priority_seconds} and {args.interactive_interval}")
    for name in ("callers", "requests", "single_requests", "rss_requests", "raw_repeats",
                 "priority_rounds", "priority_idle_requests", "bulk_callers", "bulk_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1 (use --skip to leave a "
                         f"phase out); got {getattr(args, name)}")
    values = {k: v for k, v in vars(args).items()
              if k not in ("size", "skip", "server_args", "priority_servers")}
    return BenchSettings(**values, height=sizes[0][0], width=sizes[0][1], skip=skip,
                         server_args=shlex.split(args.server_args),
                         priority_servers=flag_sets,
                         argv=list(sys.argv[1:] if argv is None else argv))


def start_server(settings: BenchSettings, log: Path, *overrides: str) -> ServerProcess:
    """A server on free loopback ports with the settings' flags (overrides last), SERVING."""
    if importlib.util.find_spec("netvlad_server") is None:
        raise BenchError("netvlad-bench starts its own servers, which needs the server package: "
                         f"{inprocess.SERVER_EXTRA}, or drive a running one with --target "
                         "(and --skip baseline,raw)")
    server = ServerProcess(
        log, "--model", settings.model, "--precision", settings.precision,
        "--xla" if settings.xla else "--no-xla",
        "--max-batch-size", str(settings.max_batch_size),
        "--max-queue-delay-ms", str(settings.max_queue_delay_ms),
        "--intra-op-threads", str(settings.intra_op_threads),
        "--inter-op-threads", str(settings.inter_op_threads),
        "--warmup-sizes", f"{settings.height}x{settings.width}",
        "--max-queue-size", str(max(64, 4 * settings.callers,
                                    settings.bulk_callers * settings.bulk_images)),
        *settings.server_args, *overrides)
    print(f"started a server ({' '.join(overrides) or 'as configured'}), log {server.log}",
          flush=True)
    try:
        return server.wait_serving(timeout=600.0)
    except ServerStartError:
        server.stop()
        raise


def run(settings: BenchSettings) -> dict[str, Any]:
    """Every phase not skipped; returns the results dict (also what the JSON holds)."""
    image = inprocess.scene_image(settings.height, settings.width)
    message = inprocess.image_message(image, settings.encoding)
    pixels = inprocess.server_pixels(message)
    request = pb.DescribeImagesRequest(images=[message]).SerializeToString()
    log_dir = Path(settings.log_dir or tempfile.mkdtemp(prefix="netvlad-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": shlex.join(["netvlad-bench", *settings.argv]),
        "settings": {k: sorted(v) if isinstance(v, frozenset) else v
                     for k, v in vars(settings).items()},
        "image_bytes": len(message.encoded) or len(message.raw.data),
        "machine": {"cpu": inprocess.cpu_model(), "cores": os.cpu_count(),
                    "load_average_before": os.getloadavg()}}
    skip = settings.skip

    def phase(name: str) -> bool:
        if name in skip:
            return False
        print(f"phase {name} ...", flush=True)
        return True

    started: ServerProcess | None = None
    main: Endpoint | None = None
    if settings.target:
        metrics = settings.metrics_url or f"http://{settings.target.rsplit(':', 1)[0]}:9090/metrics"
        main = Endpoint(settings.target, metrics, settings.server_pid)
        wait_serving(settings.target, timeout=600.0)
    elif not {"load", "single", "memory"} <= skip:
        started = start_server(settings, log_dir / "server.log")
        main = Endpoint(started.target, started.metrics_url, started.pid)
    try:
        if main is not None:
            describe_server(results, main)
            if phase("load"):
                results["load"] = load_phase(main, request, 1, settings.callers,
                                             settings.requests)
            if phase("single"):
                results["single"] = load_phase(main, request, 1, 1, settings.single_requests)
            if main.pid and phase("memory"):
                results["memory"] = memory_phase(main, request, settings.callers,
                                                 settings.rss_requests)
            if settings.target and phase("priority"):
                results["priority"] = priority_phase([main], message, mixed_load(settings),
                                                     [AS_CONFIGURED])
    finally:
        if started is not None:
            started.stop()
    if phase("baseline"):
        with start_server(settings, log_dir / "baseline.log", "--max-batch-size", "1") as base:
            endpoint = Endpoint(base.target, base.metrics_url, base.pid)
            describe_server(results, endpoint)
            results["baseline"] = load_phase(endpoint, request, 1, settings.callers,
                                             settings.baseline_requests or settings.requests)
    if not settings.target and phase("priority"):
        results["priority"] = priority_servers(settings, message, log_dir, results)
    load = results.get("load", {})
    if "event_loop_cpu_seconds_per_request" in load:
        decode = inprocess.decode_cpu_seconds(message)
        results["overhead"] = {
            "event_loop_cpu_seconds_per_request": load["event_loop_cpu_seconds_per_request"],
            "grpc_io_cpu_seconds_per_request": load["grpc_io_cpu_seconds_per_request"],
            "decode_cpu_seconds_per_image": decode,
            "total_cpu_seconds_per_request": load["event_loop_cpu_seconds_per_request"]
            + load["grpc_io_cpu_seconds_per_request"] + decode}
    if phase("raw"):
        if "precision" not in results:
            raise BenchError("the raw phase runs in the precision a server chose; leave at least "
                             "one server phase in (load, single, memory, baseline or priority)")
        inprocess.configure_threads(settings.intra_op_threads, settings.inter_op_threads)
        results["raw"] = inprocess.raw_phase(
            settings.model, results["precision"], settings.xla, settings.raw_repeats, pixels,
            list(load.get("batch_sizes", {})), load.get("descriptor"))
    results["machine"]["load_average_after"] = os.getloadavg()
    results["summary"] = summarise(results)
    return results


def mixed_load(settings: BenchSettings) -> MixedLoad:
    """The priority phase's shape from the settings."""
    return MixedLoad(rounds=settings.priority_rounds, seconds=settings.priority_seconds,
                     idle_requests=settings.priority_idle_requests,
                     interval=settings.interactive_interval, bulk_callers=settings.bulk_callers,
                     bulk_images=settings.bulk_images)


def describe_server(results: dict[str, Any], server: Endpoint) -> dict[str, Any]:
    """GetModelInfo of a server; the first server asked also fills the run's model fields."""
    info = model_info(server.target)
    if "model_info" not in results:
        results.update(model_info=info, precision=info.get("precision", "float32"),
                       server_start=server.stats())
    return info


def priority_servers(settings: BenchSettings, message: pb.Image, log_dir: Path,
                     results: dict[str, Any]) -> dict[str, Any]:
    """The priority phase on one started server per --priority-servers flag set, all at once."""
    flag_sets = settings.priority_servers or [""]
    servers: list[ServerProcess] = []
    try:
        for number, flags in enumerate(flag_sets, 1):
            servers.append(start_server(settings, log_dir / f"priority-{number}.log",
                                        *shlex.split(flags)))
        endpoints = [Endpoint(s.target, s.metrics_url, s.pid) for s in servers]
        describe_server(results, endpoints[0])
        return priority_phase(endpoints, message, mixed_load(settings),
                              [flags or AS_CONFIGURED for flags in flag_sets])
    finally:
        for server in servers:
            server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of netvlad-bench: 0 when every phase ran, 2 when the run could not go on."""
    try:
        settings = parse_args(argv)
        if settings.plot and importlib.util.find_spec("matplotlib") is None:
            print("matplotlib is not installed: no plot (pip install 'netvlad-service[plot]')")
            settings.plot = ""
        results = run(settings)
    except (BenchError, ServerStartError) as exc:
        print(f"netvlad-bench: error: {exc}", file=sys.stderr)
        return 2
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
