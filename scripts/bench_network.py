"""Benchmark the raw network: time per image and images/s by batch size, against a one-by-one loop.

Full-size network on demo weights (random values: the speed is the real model's, the descriptors
mean nothing). For each image size and precision, times `network(batch)` at each batch size and,
in the same run, a plain loop calling the network on one image at a time over the largest batch.
Prints a markdown table and writes the numbers as JSON.

    python scripts/bench_network.py --json docs/bench_network.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from netvlad_server.runtime import cpu_model


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="480x640,240x320", help="HxW list (default %(default)s)")
    parser.add_argument("--batches", default="1,4,8", help="batch sizes (default %(default)s)")
    parser.add_argument("--precisions", default="float32,bfloat16",
                        help="float32, bfloat16, float16 list (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per point after one warm-up; the median is kept")
    parser.add_argument("--json", default="docs/bench_network.json", help="where to write JSON")
    return parser.parse_args()


def median_seconds(call, repeats: int) -> float:
    """Median wall time of `call()` over `repeats` runs, after one untimed warm-up run."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_size(net, images: np.ndarray, batches: list[int], repeats: int) -> list[dict]:
    """Rows for one network and image size: the one-by-one loop, then each batch size."""
    point = {"precision": net.precision, "height": images.shape[1], "width": images.shape[2]}
    loop = median_seconds(lambda: [net(image) for image in images], repeats)
    loop_rate = len(images) / loop
    rows = [{**point, "mode": f"loop of {len(images)} x batch 1", "batch": 1,
             "seconds_per_image": loop / len(images), "images_per_second": loop_rate,
             "speedup_vs_loop": 1.0}]
    for batch in batches:
        seconds = median_seconds(lambda b=images[:batch]: net(b), repeats)
        rows.append({**point, "mode": "batched call", "batch": batch, "seconds_per_call": seconds,
                     "seconds_per_image": seconds / batch, "images_per_second": batch / seconds,
                     "speedup_vs_loop": batch / seconds / loop_rate})
        print(f"{net.precision} {point['height']}x{point['width']} batch {batch}: "
              f"{seconds:.3f} s per call", flush=True)
    return rows


def main() -> None:
    """Run every point, print the table, write the JSON."""
    args = parse_args()
    import tensorflow as tf
    from netvlad_server.network import NetVLADNetwork
    from netvlad_server.weights import demo_weights

    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    weights = demo_weights("full", seed=0)
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    results = []
    for precision in args.precisions.split(","):
        net = NetVLADNetwork(weights, precision=precision)
        for height, width in sizes:
            images = rng.integers(0, 256, (max(batches), height, width, 3), dtype=np.uint8)
            results += bench_size(net, images, batches, args.repeats)
    float32_loop = {
        (r["height"], r["width"]): r["images_per_second"]
        for r in results if r["precision"] == "float32" and r["mode"] != "batched call"
    }
    for r in results:
        baseline = float32_loop.get((r["height"], r["width"]))
        r["speedup_vs_float32_loop"] = r["images_per_second"] / baseline if baseline else None
    machine = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "tensorflow": tf.__version__,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "repeats": args.repeats, "weights": "demo full-size (4096-D), random values",
    }
    print()
    print("| image | precision | how | batch | per image (ms) | images/s | vs loop, same precision "
          "| vs float32 loop |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        vs_float32 = r["speedup_vs_float32_loop"]
        print(f"| {r['height']}x{r['width']} | {r['precision']} | {r['mode']} | {r['batch']} | "
              f"{1000 * r['seconds_per_image']:.0f} | {r['images_per_second']:.2f} | "
              f"{r['speedup_vs_loop']:.2f}x | {f'{vs_float32:.2f}x' if vs_float32 else '-'} |")
    print(f"\n{machine}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
