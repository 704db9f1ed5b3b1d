"""Measure the place index and write docs/bench_places.json (tables in docs/BENCHMARKS.md).

Four parts, all in one run so that every number shares the machine's state:

* **grid**: query latency p50/p99 with 1 and 8 callers, in-process on the server's own engine
  (`PlaceIndex`), for 4096/512/256/128 dims, exact and HNSW, at 10k, 100k and 1M places, next
  to a NumPy brute-force baseline (matrix-vector product + argpartition) on the same rows;
  memory per place (faiss structure as serialised; the engine's formula); recall@10 of HNSW
  against exact search. The places are clustered like keyframes of routes (each place near others),
  queries are noisy revisits of stored places. Cells too slow to build here are skipped and
  listed (`skipped`), to be read from the formula in docs/BENCHMARKS.md.
* **quality**: recall@1/5 and AUC of a synthetic two-lap drive described by the server's
  network (demo weights, full size) at each dims setting against 4096.
* **durable**: a real `netvlad-server` (demo weights, full size, --index-dir on): add throughput
  with 1 and 4 callers, gRPC query latency, then `kill -9` during a stream of adds at 100k
  places, a restart, and the time to load the indexes again (every acknowledged place checked).
* **threads**: exact search with faiss on 1 and on 2 OpenMP threads per query, with 1 and 8
  callers, against NumPy (does faiss's own parallelism help when the cores are shared?).
* **machine**: cores, load average, versions.

Usage (OpenBLAS as the NumPy baseline runs best here: its own kernel, one thread per caller):
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 \
        python scripts/bench_places.py [--out docs/bench_places.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
from netvlad_client import NetVLADClient
from netvlad_client.bench.harness import ServerProcess
from netvlad_client.evaluation import EvaluationSettings, evaluate
from netvlad_client.places import Place
from netvlad_server.places.engine import IndexMeta, PlaceIndex, PlaceRows
from netvlad_server.places.limits import ModelIdentity
from netvlad_server.places.store import open_index_dir

ROOT = Path(__file__).resolve().parent.parent
DIMS = (4096, 512, 256, 128)
K = 10
IDENTITY = ModelIdentity("0" * 64, "float32", 4096, "bench")
CLUSTER = 20  # places per cluster (a stretch of route seen from nearby keyframes)
SPREAD = 0.35  # noise of a place around its cluster centre, relative to the centre's length


def unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in place."""
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def clustered(count: int, dims: int, seed: int) -> np.ndarray:
    """`count` unit float32 rows in clusters of CLUSTER around random centres."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, dims), np.float32)
    step = 50_000
    for start in range(0, count, step):
        stop = min(count, start + step)
        centres = rng.standard_normal(((stop - start) // CLUSTER + 1, dims), dtype=np.float32)
        unit(centres)
        block = np.repeat(centres, CLUSTER, axis=0)[: stop - start]
        block += rng.standard_normal(block.shape, dtype=np.float32) * np.float32(
            SPREAD / math.sqrt(dims))
        out[start:stop] = unit(block)
    return out


def revisits(rows: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Queries: stored places seen again with as much noise as a place has around its centre."""
    rng = np.random.default_rng(seed)
    picked = rows[rng.integers(0, len(rows), count)].copy()
    picked += rng.standard_normal(picked.shape, dtype=np.float32) * np.float32(
        SPREAD / math.sqrt(rows.shape[1]))
    return unit(picked)


def brute_force(rows: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """The NumPy baseline: similarities of every row, the k best in order."""
    similarities = rows @ query
    top = np.argpartition(-similarities, k)[:k]
    return top[np.argsort(-similarities[top])]


def timed(call: Callable[[np.ndarray], object], queries: np.ndarray, callers: int,
          budget_s: float) -> dict:
    """Latencies of call(query) from `callers` threads at once, until each thread ran at least
    5 queries and the budget is spent (or it ran every query)."""
    latencies: list[list[float]] = [[] for _ in range(callers)]
    start_at = time.perf_counter()

    def caller(slot: int) -> None:
        for i in range(slot, len(queries), callers):
            began = time.perf_counter()
            call(queries[i])
            latencies[slot].append(time.perf_counter() - began)
            if len(latencies[slot]) >= 5 and time.perf_counter() - start_at > budget_s:
                return

    threads = [threading.Thread(target=caller, args=(slot,)) for slot in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start_at
    flat = np.array([value for values in latencies for value in values]) * 1000
    return {"p50_ms": round(float(np.percentile(flat, 50)), 3),
            "p99_ms": round(float(np.percentile(flat, 99)), 3),
            "queries": int(flat.size), "qps": round(flat.size / wall, 1)}


def engine_rows(vectors: np.ndarray, offset: int) -> PlaceRows:
    """PlaceRows of descriptors with ids, timestamps and positions as a robot sends them."""
    count = len(vectors)
    stamps = np.arange(offset, offset + count, dtype=np.float64) * 0.1
    positions = np.zeros((count, 3))
    positions[:, 0] = stamps
    return PlaceRows([f"kf{offset + i}" for i in range(count)], vectors, stamps, positions,
                     [{} for _ in range(count)])


def grid(sizes: tuple[int, ...], hnsw_limit: dict[int, int], budget_s: float,
         queries_count: int) -> dict:
    """The latency / memory / recall grid; see the module docstring."""
    cells: list[dict] = []
    skipped: list[str] = []
    builds: list[dict] = []
    for dims in DIMS:
        dim_sizes = [n for n in sizes if n * dims * 4 <= 2 * 2**30]  # at most 2 GiB of rows
        skipped += [f"{dims} dims x {n} places (exact and hnsw): more than 2 GiB of rows; "
                    "extrapolated" for n in sizes if n not in dim_sizes]
        if not dim_sizes:
            continue
        rows = clustered(max(dim_sizes), dims, seed=dims)
        queries = revisits(rows[: min(dim_sizes)], queries_count, seed=1)
        for method in ("exact", "hnsw"):
            index = PlaceIndex(IndexMeta(f"bench-{dims}-{method}", dims, method, IDENTITY))
            filled = 0
            for size in dim_sizes:
                if method == "hnsw" and size > hnsw_limit.get(dims, 0):
                    skipped.append(f"{dims} dims x {size} places hnsw: building the graph takes "
                                   "too long here (build rate in `builds`)")
                    continue
                began = time.perf_counter()
                for start in range(filled, size, 50_000):
                    stop = min(size, start + 50_000)
                    index.add(engine_rows(rows[start:stop], start))
                added = size - filled
                builds.append({"dims": dims, "method": method, "places": added,
                               "seconds": round(time.perf_counter() - began, 2),
                               "places_per_s": round(added / (time.perf_counter() - began))})
                filled = size
                cell = {"dims": dims, "places": size, "method": method,
                        "bytes_per_place_formula": PlaceIndex.bytes_per_place(dims, method)}
                if size <= 100_000:  # serialising copies the whole search structure
                    cell["faiss_bytes_per_place"] = round(
                        len(faiss.serialize_index(index._faiss)) / size)
                local = revisits(rows[:size], queries_count, seed=size)
                for callers in (1, 8):
                    cell[f"callers_{callers}"] = timed(
                        lambda q, index=index: index.search(q, K), local, callers, budget_s)
                if method == "exact":
                    view = rows[:size]
                    for callers in (1, 8):
                        cell[f"numpy_callers_{callers}"] = timed(
                            lambda q, view=view: brute_force(view, q, K), local, callers,
                            budget_s)
                    agree = [
                        [f.id for f in index.search(q, K)] ==
                        [f"kf{i}" for i in brute_force(view, q, K)] for q in local[:50]]
                    cell["equals_numpy"] = float(np.mean(agree))
                else:
                    exact = PlaceIndex(IndexMeta("exact", dims, "exact", IDENTITY),
                                       engine_rows(rows[:size], 0))
                    hits = [len({f.id for f in index.search(q, K)} &
                                {f.id for f in exact.search(q, K)}) / K for q in local[:200]]
                    cell["recall_at_10_vs_exact"] = round(float(np.mean(hits)), 4)
                    del exact
                cells.append(cell)
                print(json.dumps(cell), flush=True)
            del index
        del rows, queries
    return {"cells": cells, "skipped": skipped, "builds": builds, "k": K,
            "data": f"clusters of {CLUSTER} unit vectors, noise {SPREAD}; queries are noisy "
                    "revisits of stored places"}


def threads(budget_s: float, cases: tuple[tuple[int, int], ...]) -> list[dict]:
    """Exact search with faiss using 1 and 2 OpenMP threads per query, against NumPy."""
    rows_out = []
    default = faiss.omp_get_max_threads()
    try:
        for dims, size in cases:
            rows = clustered(size, dims, seed=dims + 7)
            index = PlaceIndex(IndexMeta("threads", dims, "exact", IDENTITY),
                               engine_rows(rows, 0))
            queries = revisits(rows, 400, seed=3)
            for omp in (1, 2):
                faiss.omp_set_num_threads(omp)
                for callers in (1, 8):
                    rows_out.append({"dims": dims, "places": size, "faiss_threads": omp,
                                     "callers": callers, **timed(
                                         lambda q, index=index: index.search(q, K), queries,
                                         callers, budget_s)})
                    print(json.dumps(rows_out[-1]), flush=True)
            for callers in (1, 8):
                rows_out.append({"dims": dims, "places": size, "numpy": True, "callers": callers,
                                 **timed(lambda q, rows=rows: brute_force(rows, q, K), queries,
                                         callers, budget_s)})
                print(json.dumps(rows_out[-1]), flush=True)
    finally:
        faiss.omp_set_num_threads(default)
    return rows_out


# --------------------------------------------------------------------------------- quality

def street_scene(seed: int, width: int, height: int) -> np.ndarray:
    """A procedural street panorama (sky, buildings with windows, road), RGB uint8."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.uint8)
    img[: height // 2] = (np.linspace(235, 150, height // 2)[:, None, None]
                          * np.array([0.75, 0.85, 1.0])).astype(np.uint8)
    img[height // 2:] = (90, 90, 95)
    x = 0
    while x < width:
        bw, bh = int(rng.integers(40, 110)), int(rng.integers(50, int(height * 0.6)))
        colour = [int(c) for c in rng.integers(50, 210, 3)]
        top = height * 3 // 4 - bh
        cv2.rectangle(img, (x, top), (x + bw, height * 3 // 4), colour, -1)
        for wy in range(top + 8, height * 3 // 4 - 12, 18):
            for wx in range(x + 6, x + bw - 10, 16):
                shade = int(rng.integers(20, 250))
                cv2.rectangle(img, (wx, wy), (wx + 8, wy + 10), (shade, shade, 60), -1)
        x += bw + int(rng.integers(0, 20))
    return img


def drive_frames(frames_per_lap: int, size: tuple[int, int]) -> tuple[list[np.ndarray],
                                                                       np.ndarray]:
    """Two laps along one street: lap 2 is shifted half a step, darker and slightly zoomed.

    A frame is a window of the panorama; its position (metres) is where the window starts.
    """
    import cv2

    height, width = size
    step = 12
    panorama = street_scene(7, frames_per_lap * step + width, height)
    frames, positions = [], []
    for lap in range(2):
        for i in range(frames_per_lap):
            x = i * step + (step // 2 if lap else 0)
            view = panorama[:, x: x + width]
            if lap:
                view = cv2.resize(view[4:-4, 5:-5], (width, height))
                view = np.clip(view.astype(np.float32) * 0.8 + 10, 0, 255).astype(np.uint8)
            frames.append(view)
            positions.append((x / step, 0.0, 0.0))
    return frames, np.array(positions)


def quality(frames_per_lap: int) -> dict:
    """Recall@1/5 and AUC at each dims against 4096, on the drive described by the network."""
    from netvlad_server.network import NetVLADNetwork
    from netvlad_server.weights import load_weights

    network = NetVLADNetwork(load_weights("demo"))
    frames, positions = drive_frames(frames_per_lap, (120, 160))
    began = time.perf_counter()
    descriptors = np.concatenate([network(np.stack(frames[i:i + 8]))
                                  for i in range(0, len(frames), 8)])
    described = time.perf_counter() - began
    rows = []
    for dims in DIMS:
        settings = EvaluationSettings(dims=dims, renormalize=True, radius=1.0, suppression=21,
                                      recall_ns=(1, 5))
        result = evaluate(descriptors, positions, settings)
        rows.append({"dims": dims, "recall_at_1": round(result.recall_at[1], 4),
                     "recall_at_5": round(result.recall_at[5], 4),
                     "auc": round(result.auc, 4)})
        print(json.dumps(rows[-1]), flush=True)
    return {"frames": len(frames), "image": "120x160", "describe_seconds": round(described, 1),
            "weights": "demo (random, full size)", "rows": rows,
            "settings": "revisit radius 1 frame step, suppression 21 frames"}


# --------------------------------------------------------------------------------- durable

def place_batch(vectors: np.ndarray, offset: int) -> list[Place]:
    """Places with descriptors, timestamps and positions."""
    return [Place(f"kf{offset + i}", descriptor=row, timestamp=(offset + i) * 0.1,
                  position=((offset + i) * 0.1, 0.0, 0.0)) for i, row in enumerate(vectors)]


def add_rate(target: str, index: str, vectors: np.ndarray, callers: int) -> float:
    """Places per second added with `callers` clients at once, 256 places per request."""
    chunks = [(start, vectors[start:start + 256]) for start in range(0, len(vectors), 256)]
    began = time.perf_counter()

    def caller(slot: int) -> None:
        with NetVLADClient(target, timeout=120) as client:
            for start, chunk in chunks[slot::callers]:
                client.add_places(index, place_batch(chunk, start), batch_size=256)

    threads = [threading.Thread(target=caller, args=(slot,)) for slot in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(vectors) / (time.perf_counter() - began)


def durable(work: Path, recovery_places: int, rate_places: int) -> dict:
    """Add throughput, gRPC query latency, kill -9 and recovery with a real server."""
    flags = ("--model", "demo", "--warmup-sizes", "none", "--index-dir", str(work / "idx"),
             "--max-places-per-request", "256", "--max-index-bytes", str(8 * 2**30))
    server = ServerProcess(work / "server.log", *flags).wait_serving(600)
    out: dict = {"add": [], "grpc_query": []}
    try:
        with NetVLADClient(server.target, timeout=120) as client:
            for dims in (4096, 256):
                vectors = clustered(rate_places, dims, seed=dims + 1)
                for callers in (1, 4):
                    name = f"rate-{dims}-{callers}"
                    client.create_index(name, dims)
                    rate = add_rate(server.target, name, vectors, callers)
                    out["add"].append({"dims": dims, "callers": callers,
                                       "places_per_s": round(rate)})
                    print(json.dumps(out["add"][-1]), flush=True)
                    client.drop_index(name)
            client.create_index("recovery", 256)
            vectors = clustered(recovery_places, 256, seed=5)
            acknowledged = 0
            for start in range(0, recovery_places - 2048, 256):
                client.add_places("recovery", place_batch(vectors[start:start + 256], start),
                                  batch_size=256)
                acknowledged = start + 256
            queries = revisits(vectors[:acknowledged], 400, seed=9)
            for callers in (1, 8):
                out["grpc_query"].append({"dims": 256, "places": acknowledged,
                                          "callers": callers, **timed(
                                              lambda q: client.query_places("recovery",
                                                                            descriptor=q, k=K),
                                              queries, callers, 5.0)})
                print(json.dumps(out["grpc_query"][-1]), flush=True)
        # The rest is added by a stream of requests during which the server is killed.
        stop = threading.Event()
        acked = [acknowledged]

        def adder() -> None:
            with NetVLADClient(server.target, timeout=30, retries=0) as client:
                for start in range(acknowledged, recovery_places, 256):
                    if stop.is_set():
                        return
                    try:
                        client.add_places("recovery", place_batch(
                            vectors[start:start + 256], start), batch_size=256)
                    except Exception:
                        return
                    acked[0] = min(start + 256, recovery_places)

        thread = threading.Thread(target=adder)
        thread.start()
        time.sleep(0.3)
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait()
        stop.set()
        thread.join()
        directory = work / "idx" / "recovery"
        log_bytes = sum(p.stat().st_size for p in directory.iterdir())
        began = time.perf_counter()
        index, store = open_index_dir(directory)
        loaded = time.perf_counter() - began
        store.close()
        assert index.size >= acked[0], (index.size, acked[0])
        ids = index.rows().ids
        assert ids == [f"kf{i}" for i in range(len(ids))], "invented or reordered places"
        began = time.perf_counter()
        server = ServerProcess(work / "server2.log", *flags).wait_serving(600)
        restart = time.perf_counter() - began
        with NetVLADClient(server.target) as client:
            size = next(i.size for i in client.list_indexes() if i.name == "recovery")
        out["recovery"] = {"dims": 256, "places": index.size, "acknowledged": acked[0],
                           "files_bytes": log_bytes, "load_seconds": round(loaded, 2),
                           "restart_to_serving_seconds": round(restart, 1),
                           "places_after_restart": size}
        print(json.dumps(out["recovery"]), flush=True)
    finally:
        server.process.terminate()
        server.process.wait(60)
    return out


def _ms(cell: dict, key: str) -> str:
    """'p50 / p99' of one timing, or a dash."""
    value = cell.get(key)
    return f"{value['p50_ms']:.2f} / {value['p99_ms']:.1f}" if value else "-"


def tables(result: dict) -> str:
    """The Markdown tables of docs/BENCHMARKS.md from a result file."""
    lines = ["| dims | places | method | 1 caller p50 / p99 ms | 8 callers p50 / p99 ms | "
             "NumPy 1 caller | NumPy 8 callers | recall@10 vs exact | bytes per place: faiss / "
             "engine |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cell in result.get("grid", {}).get("cells", []):
        recall = cell.get("recall_at_10_vs_exact")
        lines.append(
            f"| {cell['dims']} | {cell['places']:,} | {cell['method']} | "
            f"{_ms(cell, 'callers_1')} | {_ms(cell, 'callers_8')} | "
            f"{_ms(cell, 'numpy_callers_1')} | {_ms(cell, 'numpy_callers_8')} | "
            f"{'-' if recall is None else f'{recall:.3f}'} | "
            f"{cell.get('faiss_bytes_per_place', '-')} / {cell['bytes_per_place_formula']} |")
    lines += ["", "| dims | recall@1 | recall@5 | AUC |", "|---|---|---|---|"]
    lines += [f"| {row['dims']} | {row['recall_at_1']:.3f} | {row['recall_at_5']:.3f} | "
              f"{row['auc']:.3f} |" for row in result.get("quality", {}).get("rows", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every part and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_places.json"))
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--parts", default="grid,threads,quality,durable")
    parser.add_argument("--tables", metavar="RESULT.json",
                        help="print the Markdown tables of a result file and exit")
    args = parser.parse_args(argv)
    if args.tables:
        print(tables(json.loads(Path(args.tables).read_text())), end="")
        return 0
    parts = set(args.parts.split(","))
    quick = args.quick
    result: dict = {"machine": {"cores": os.cpu_count(), "load_average": os.getloadavg(),
                                "python": platform.python_version(),
                                "faiss": faiss.__version__, "numpy": np.__version__,
                                "faiss_threads": faiss.omp_get_max_threads(),
                                "openblas_env": {k: v for k, v in os.environ.items()
                                                 if k.startswith("OPENBLAS")}},
                    "command": "python scripts/bench_places.py" + (" --quick" if quick else "")}
    began = time.perf_counter()
    if "grid" in parts:
        sizes = (2_000, 20_000) if quick else (10_000, 100_000, 1_000_000)
        hnsw = {d: 2_000 for d in DIMS} if quick else {4096: 10_000, 512: 10_000,
                                                        256: 100_000, 128: 100_000}
        result["grid"] = grid(sizes, hnsw, 0.5 if quick else 2.0, 400)
    if "threads" in parts:
        result["threads"] = threads(0.5 if quick else 3.0, ((256, 2_000), (4096, 1_000)) if quick
                                    else ((256, 100_000), (4096, 10_000)))
    if "quality" in parts:
        result["quality"] = quality(20 if quick else 100)
    if "durable" in parts:
        work = Path(tempfile.mkdtemp(prefix="bench-places-"))
        try:
            result["durable"] = durable(work, 6_000 if quick else 100_000,
                                        1_024 if quick else 10_240)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - began)
    result["machine"]["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
