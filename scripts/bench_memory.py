"""Where the full-size server's memory goes, its start-up time, and the speed cost of the fixes.

Usage: python scripts/bench_memory.py [--baseline-commit REV] [--variants JSON]
       [--output docs/bench_memory.json]

Three parts, each in fresh processes so resident sizes are the process's own:
1. Stages: a worker process loads the weights, builds the network, runs the precision check,
   drops the loaded arrays, warms up, releases library pages as the server does and runs batches
   of 8 at 480x640, reading its resident size (RSS, and its anonymous and file parts) after each
   stage; once with this tree's network and memory settings as the server
   runs them (system allocator, MemoryKeeper), once with network.py from --baseline-commit and
   TensorFlow's default allocator (the code before the memory work).
2. Same speed, same descriptors: the old worker and one worker per --variants entry (this tree
   under other environment variables, e.g. LD_PRELOAD of jemalloc and its MALLOC_CONF) stay
   alive and take turns on the same synthetic images in a rotating order, so the shared
   machine's load hits all alike; descriptors are compared bit for bit, and each variant's RSS
   is read after the timed calls and once idle. Wall time and CPU time per call are both recorded:
   on a shared machine CPU time is the steadier measure of the work a call costs.
3. Many sizes: --sizes distinct image sizes run twice through a fresh worker per setting in
   --sweep-settings (environment variables such as ONEDNN_PRIMITIVE_CACHE_CAPACITY), to show
   where RSS stops growing.
4. Start-up: `python -m netvlad_server --model demo` from process start to SERVING, its parts
   from the server's log, its RSS once SERVING, after requests of 8 images at 480x640, and
   once the server has been idle long enough for the keeper to trim.
"""

from __future__ import annotations

import argparse
import base64
import gc
import importlib.util
import itertools
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "client"))  # the shared server harness, without an install

from netvlad_client.bench import harness  # noqa: E402

TIMED = ((240, 320, 1), (480, 640, 1), (480, 640, 8))
CHECK_SIZE = (480, 640)  # the server checks bfloat16 at its first warm-up size (default 480x640)
_REPLY = "@@"  # worker replies are lines starting with this; TensorFlow may print other lines
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ \S+: (.*)$")
MIB = 2**20


def rss_mib() -> dict[str, float]:
    """This process's resident size: all of it, its anonymous (heap) part and its file pages
    (libraries; shared with any other process mapping the same files), in MiB."""
    status = harness.proc_status()
    return {"rss_mib": round(status["VmRSS"] / MIB, 1),
            "anon_mib": round(status.get("RssAnon", 0) / MIB, 1),
            "file_mib": round(status.get("RssFile", 0) / MIB, 1)}


def _cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used: less load-dependent than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _faults() -> int:
    """Minor page faults so far (fresh pages mapped in and zeroed by the kernel)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _reply(**fields: object) -> None:
    """One JSON reply line to the parent."""
    print(_REPLY + json.dumps(fields), flush=True)


def _load_network_class(source: str | None) -> type:
    """NetVLADNetwork from this tree, or from a network.py file of another commit."""
    if source is None:
        from netvlad_server.network import NetVLADNetwork

        return NetVLADNetwork
    spec = importlib.util.spec_from_file_location("baseline_network", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.NetVLADNetwork


def worker(model: str, network_source: str | None, new_environment: bool,
           release_libraries: bool = True) -> None:
    """Run the server's loading steps stage by stage, then answer timing commands on stdin."""
    started = time.perf_counter()
    stages: list[dict[str, object]] = []

    def stage(name: str, since: float) -> float:
        now = time.perf_counter()
        gc.collect()
        stages.append({"stage": name, "seconds": round(now - since, 2), **rss_mib()})
        return now

    from netvlad_server import runtime

    if new_environment:
        runtime.prefer_returning_memory()
    else:
        os.environ.pop("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", None)
    t = stage("python and numpy", started)
    import tensorflow as tf
    from netvlad_server.config import ServerConfig

    defaults = ServerConfig.__dataclass_fields__  # the server's thread settings, not TF's own
    runtime.configure_tensorflow(defaults["intra_op_threads"].default,
                                 defaults["inter_op_threads"].default)
    tf.constant(1.0).numpy()
    t = stage("TensorFlow imported, first operation", t)
    from netvlad_server.weights import load_weights

    weights = load_weights(model)
    t = stage("weights loaded (NumPy arrays)", t)
    network_class = _load_network_class(network_source)
    precision = runtime.resolve_precision("auto", runtime.detect_hardware())
    network = network_class(weights, precision=precision)
    t = stage(f"network built ({precision})", t)
    cosine = (runtime.agreement_with_float32(network, CHECK_SIZE)
              if precision != "float32" else 1.0)
    t = stage(f"precision check at {CHECK_SIZE[0]}x{CHECK_SIZE[1]} (cosine {cosine:.6f})", t)
    if hasattr(network, "drop_float32_weights"):
        network.drop_float32_weights()
    del weights
    t = stage("loaded arrays dropped (what load_model returns)", t)
    network(np.zeros((1, 480, 640, 3), np.uint8))
    t = stage("warm-up 480x640, batch 1", t)
    if new_environment:
        runtime.release_free_memory()
        t = stage("free heap pages returned (after warm-up)", t)
        if release_libraries:  # then one more forward pass, as warm_up does
            advised = runtime.release_library_pages()
            network(np.zeros((1, 480, 640, 3), np.uint8))
            runtime.release_free_memory()
            t = stage(f"library pages released ({advised >> 20} MiB advised), one pass back", t)
        network = runtime.MemoryKeeper(network)  # as load_model wraps it
    for round_ in (1, 2):
        network(np.zeros((8, 480, 640, 3), np.uint8))
        t = stage(f"batch of 8 at 480x640 (#{round_})", t)
    _reply(stages=stages)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "exit":
            return
        if command["op"] == "run":
            images = np.stack([runtime.synthetic_scene(command["height"], command["width"], seed)
                               for seed in range(command["batch"])])
            cpu, faults, start = _cpu_seconds(), _faults(), time.perf_counter()
            desc = network(images)
            seconds = time.perf_counter() - start
            _reply(seconds=seconds, cpu_seconds=_cpu_seconds() - cpu,
                   page_faults=_faults() - faults,
                   descriptors=base64.b64encode(desc.tobytes()).decode(), **rss_mib())
        elif command["op"] == "sweep":
            trace = []
            for i, (height, width) in enumerate(command["sizes"], 1):
                network(np.zeros((1, height, width, 3), np.uint8))
                if i % command["every"] == 0:
                    trace.append({"sizes_run": i, **rss_mib()})
            _reply(trace=trace)
        elif command["op"] == "trim":
            runtime.release_free_memory()
            _reply(**rss_mib())
        elif command["op"] == "rss":
            _reply(allocator=runtime.heap_allocator(), **rss_mib())


class Worker:
    """A worker process of this script, spoken to in JSON lines."""

    def __init__(self, name: str, model: str, network_source: str | None,
                 new_environment: bool, settings: dict[str, str] | None = None,
                 release_libraries: bool = True) -> None:
        command = [sys.executable, __file__, "--worker", "--model", model]
        if network_source:
            command += ["--network-source", network_source]
        if new_environment:
            command.append("--new-environment")
        if not release_libraries:
            command.append("--keep-library-pages")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
               **(settings or {})}
        self.name = name
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env)
        self.stages = self.read()["stages"]

    def read(self) -> dict:
        """The next reply; an error naming the worker if it died."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
        raise RuntimeError(f"the {self.name} worker exited ({self.process.wait()}); see stderr")

    def ask(self, **command: object) -> dict:
        """Send one command and wait for its reply."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        """Let the worker exit."""
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=120)


def distinct_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    """`count` distinct (height, width) pairs with sides 48..320 in steps of 8."""
    rng = np.random.default_rng(seed)
    sides = np.arange(48, 321, 8)
    pairs = {(int(h), int(w)) for h, w in rng.choice(sides, (count * 3, 2))}
    chosen = sorted(pairs)
    rng.shuffle(chosen)
    if len(chosen) < count:
        raise ValueError(f"only {len(chosen)} distinct sizes available, {count} wanted")
    return chosen[:count]


def compare_speed(old: Worker, variants: dict[str, Worker],
                  repeats: int) -> list[dict[str, object]]:
    """Alternate old and each variant on each timed shape (the order rotates every round);
    medians, ratios to old, descriptor agreement, one row per shape and variant."""
    workers = {"old": old, **variants}
    rows = []
    for height, width, batch in TIMED:
        times: dict[str, list[float]] = {k: [] for k in workers}
        cpu: dict[str, list[float]] = {k: [] for k in workers}
        faults: dict[str, list[int]] = {k: [] for k in workers}
        outputs: dict[str, np.ndarray] = {}
        order = list(workers)
        for rep in range(repeats + 1):  # the first round only warms this shape up
            turn = order[rep % len(order):] + order[:rep % len(order)]
            for label in turn if rep % 2 else reversed(turn):
                answer = workers[label].ask(op="run", height=height, width=width, batch=batch)
                outputs[label] = np.frombuffer(base64.b64decode(answer["descriptors"]),
                                               np.float32)
                if rep:
                    times[label].append(answer["seconds"])
                    cpu[label].append(answer["cpu_seconds"])
                    faults[label].append(answer["page_faults"])
        old_s, old_cpu = float(np.median(times["old"])), float(np.median(cpu["old"]))
        for label in variants:
            new_s, new_cpu = float(np.median(times[label])), float(np.median(cpu[label]))
            rows.append({"variant": label, "size": f"{height}x{width}", "batch": batch,
                         "old_median_s": round(old_s, 3), "new_median_s": round(new_s, 3),
                         "new_over_old": round(new_s / old_s, 3),
                         "old_median_cpu_s": round(old_cpu, 3),
                         "new_median_cpu_s": round(new_cpu, 3),
                         "new_over_old_cpu": round(new_cpu / old_cpu, 3),
                         "median_page_faults": {k: int(np.median(faults[k]))
                                                for k in ("old", label)},
                         "rss_mib_after": answer_rss(workers[label]),
                         "descriptors_bit_identical": bool(np.array_equal(outputs["old"],
                                                                          outputs[label])),
                         "max_abs_difference": float(np.max(np.abs(outputs["old"]
                                                                   - outputs[label])))})
            print(f"  {rows[-1]}", flush=True)
    return rows


def answer_rss(worker: Worker) -> float:
    """The worker's resident size now, in MiB, without running anything."""
    return worker.ask(op="rss")["rss_mib"]


def idle_rss(variants: dict[str, Worker], seconds: float) -> dict[str, dict[str, float]]:
    """RSS of each variant after `seconds` without a batch, then after the keeper's trim."""
    time.sleep(seconds)
    return {label: {f"rss_mib_idle_{seconds:g}s": w.ask(op="rss")["rss_mib"],
                    "rss_mib_after_trim": w.ask(op="trim")["rss_mib"]}
            for label, w in variants.items()}


def _log_times(log: Path) -> list[tuple[float, str]]:
    """(epoch seconds, message) of each timestamped line of a server log."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        match = _LOG_TIME.match(line)
        if match:
            stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((stamp, match[2]))
    return out


def _first(lines: list[tuple[float, str]], prefix: str) -> float:
    """Time of the first log message starting with `prefix`."""
    for stamp, message in lines:
        if message.startswith(prefix):
            return stamp
    raise ValueError(f"no log line starting with {prefix!r}")


def startup(model: str, requests: int, workdir: Path, run: int) -> dict[str, object]:
    """Start a real server, time it to SERVING, then RSS after requests of 8 at 480x640 and
    once it has been idle for longer than the keeper waits."""
    from netvlad_client import NetVLADClient
    from netvlad_server.runtime import IDLE_TRIM_SECONDS

    log = workdir / f"server-{run}.log"
    began = time.time()
    server = harness.ServerProcess(log, "--model", model, "--log-level", "INFO", metrics_port=0,
                                   env={"CUDA_VISIBLE_DEVICES": ""})
    try:
        server.wait_serving(timeout=600)
        serving = time.time()
        rss_serving = server.rss_bytes() / MIB
        images = [np.asarray(np.random.default_rng(i).integers(0, 256, (480, 640, 3)), np.uint8)
                  for i in range(8)]
        peak = rss_serving
        with NetVLADClient(server.target) as client:
            for _ in range(requests):
                client.describe(images, batch_size=8, timeout=300)
                peak = max(peak, server.rss_bytes() / MIB)
        time.sleep(2.0)
        rss_after = server.rss_bytes() / MIB
        time.sleep(IDLE_TRIM_SECONDS)
        rss_idle = server.rss_bytes() / MIB
    finally:
        server.stop()
    lines = _log_times(log)
    points = {"process start": began,
              "logging up (Python, gRPC, config)": _first(lines, "loading weights"),
              "TensorFlow imported and set up": _first(lines, "TensorFlow threads"),
              "weights read": _first(lines, "weights read"),
              "network built and precision checked": _first(lines, "loaded "),
              "warm-up done": _first(lines, "warm-up"),
              "library pages released, one pass back": _first(lines, "library pages"),
              "SERVING (log)": _first(lines, "SERVING"),
              "SERVING seen by a health check": serving}
    names = list(points)
    parts = {name: round(points[name] - points[previous], 2)
             for previous, name in itertools.pairwise(names)}
    return {"run": run, "seconds_to_serving": round(serving - began, 2), "parts_s": parts,
            "rss_mib_serving": round(rss_serving, 1),
            "rss_mib_peak_during_requests": round(peak, 1),
            f"rss_mib_2s_after_{requests}_requests_of_8_at_480x640": round(rss_after, 1),
            f"rss_mib_idle_{IDLE_TRIM_SECONDS + 2:g}s_after_them": round(rss_idle, 1)}


def stages_and_speed(args: argparse.Namespace, workdir: Path,
                     result: dict[str, object]) -> None:
    """Parts 1 and 2: loading stages of both workers, alternated timing, the idle trim's cost."""
    variants: dict[str, Worker] = {}
    result["stages_new"] = {}
    old = None
    try:
        # This tree's workers start first: library pages another process maps too stay
        # resident whatever this process advises, so their stages are read before the
        # baseline worker maps TensorFlow as well.
        for name, settings in json.loads(args.variants).items():
            print(f"stages, this tree, {name} ...", flush=True)
            variants[name] = Worker(name, args.model, None, new_environment=True,
                                    settings=settings)
            result["stages_new"][name] = {"environment": settings,
                                          "allocator": variants[name].ask(op="rss")["allocator"],
                                          "stages": variants[name].stages}
        if args.baseline_commit:
            source = workdir / "baseline_network.py"
            source.write_bytes(subprocess.run(
                ["git", "-C", str(ROOT), "show",
                 f"{args.baseline_commit}:server/netvlad_server/network.py"],
                check=True, capture_output=True).stdout)
            print(f"stages, baseline network of {args.baseline_commit} ...", flush=True)
            old = Worker("baseline", args.model, str(source),
                         new_environment=args.baseline_as_server,
                         settings=json.loads(args.baseline_settings), release_libraries=False)
            result["baseline_commit"] = args.baseline_commit
            result["baseline_as_server"] = args.baseline_as_server
            result["stages_baseline"] = old.stages
        if old is not None:
            print("alternated timing ...", flush=True)
            result["speed_and_descriptors"] = compare_speed(old, variants, args.repeats)
            old.close()
        print(f"idle {args.idle_seconds:g} s ...", flush=True)
        result["idle"] = idle_rss(variants, args.idle_seconds)
        print(f"  {result['idle']}", flush=True)
    finally:
        for w in variants.values():
            w.close()
        if old is not None:
            old.close()


def sweep(model: str, sizes: int, settings: dict[str, str]) -> dict[str, object]:
    """Part 3: two passes of `sizes` distinct sizes in a fresh server-like worker."""
    new = Worker("sweep", model, None, new_environment=True, settings=settings)
    try:
        start = new.ask(op="trim")["rss_mib"]
        passes = []
        for seed in (1, 2):
            began = time.perf_counter()
            trace = new.ask(op="sweep", sizes=distinct_sizes(sizes, seed),
                            every=max(1, sizes // 10))["trace"]
            passes.append({"pass": seed, "seconds": round(time.perf_counter() - began, 1),
                           "trace": trace})
        after = new.ask(op="run", height=480, width=640, batch=8)
        return {"rss_mib_before": start, "passes": passes,
                "growth_mib_pass_1": round(passes[0]["trace"][-1]["rss_mib"] - start, 1),
                "growth_mib_pass_2": round(passes[1]["trace"][-1]["rss_mib"]
                                           - passes[0]["trace"][-1]["rss_mib"], 1),
                "rss_mib_after_next_batch_of_8": after["rss_mib"]}
    finally:
        new.close()


def main() -> int:
    """Parse flags; run as a worker, or run the four parts and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="weights to load (default: demo)")
    parser.add_argument("--baseline-commit", default=None,
                        help="compare against network.py of this commit (e.g. 2f5a32c)")
    parser.add_argument("--baseline-as-server", action="store_true",
                        help="run the baseline network as the server ran it before library "
                             "pages were released: system allocator, MemoryKeeper, pages kept")
    parser.add_argument("--baseline-settings", default="{}",
                        help="JSON: environment variables of the baseline worker (e.g. the "
                             "variants' LD_PRELOAD and MALLOC_CONF)")
    parser.add_argument("--repeats", type=int, default=5, help="alternated timing rounds")
    parser.add_argument("--sizes", type=int, default=200, help="distinct sizes per sweep pass")
    parser.add_argument("--variants", default='{"server defaults": {}}',
                        help="JSON: name -> environment variables (e.g. LD_PRELOAD, MALLOC_CONF) "
                             "of this tree's workers, each timed against the baseline")
    parser.add_argument("--idle-seconds", type=float, default=15.0,
                        help="idle time before the variants' idle RSS is read")
    parser.add_argument("--sweep-settings", default='{"server defaults": {}}',
                        help="JSON: name -> environment variables, one many-sizes worker each")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to skip: stages,sweep,startup")
    parser.add_argument("--startups", type=int, default=2, help="server start-ups to time")
    parser.add_argument("--requests", type=int, default=3,
                        help="requests of 8 images at 480x640 after each start-up")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "bench_memory.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--network-source", help=argparse.SUPPRESS)
    parser.add_argument("--new-environment", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep-library-pages", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.network_source, args.new_environment,
               not args.keep_library_pages)
        return 0
    skip = set(filter(None, args.skip.split(",")))
    result: dict[str, object] = {"model": args.model, "cpu": os.cpu_count(),
                                 "load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as temp:
        workdir = Path(temp)
        if "stages" not in skip:
            stages_and_speed(args, workdir, result)
        if "sweep" not in skip:
            result["distinct_sizes"] = {"sizes_per_pass": args.sizes, "settings": {}}
            for name, settings in json.loads(args.sweep_settings).items():
                print(f"{args.sizes} distinct sizes, twice, {name} ...", flush=True)
                result["distinct_sizes"]["settings"][name] = {
                    "environment": settings, **sweep(args.model, args.sizes, settings)}
        if "startup" not in skip:
            result["startups"] = []
            for run in range(1, args.startups + 1):
                print(f"start-up {run} ...", flush=True)
                result["startups"].append(startup(args.model, args.requests, workdir, run))
                print(f"  {result['startups'][-1]}", flush=True)
    result["load_average_after"] = os.getloadavg()[0]
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
