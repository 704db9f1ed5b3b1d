"""Time and peak traced memory of `netvlad_client.evaluation.evaluate` on a long sequence.

Random 4096-D descriptors (the first 128 used, as in the KITTI test) on a looping trajectory, so
every frame has a revisit. Prints one line per repeat: seconds and the tracemalloc peak, next to
the size of the one N x N float64 matrix the blockwise code never builds.

Usage: python scripts/bench_evaluation.py [--frames 5000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc

import numpy as np
from netvlad_client.evaluation import EvaluationSettings, evaluate


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation `--repeats` times, timed, then once under tracemalloc."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    n = args.frames
    rng = np.random.default_rng(0)
    descriptors = rng.standard_normal((n, 4096)).astype(np.float32)
    angle = 2 * np.pi * np.arange(n) / 1000  # a 3.1 km loop every 1000 frames
    positions = np.column_stack([500 * np.cos(angle), np.zeros(n), 500 * np.sin(angle)])
    settings = EvaluationSettings(dims=128)
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = evaluate(descriptors, positions, settings)
        print(f"{n} frames: {time.perf_counter() - start:.2f} s (AUC {result.auc:.4f})")
    tracemalloc.start()
    evaluate(descriptors, positions, settings)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    matrix = n * n * 8 / 1e6
    print(f"peak traced memory {peak / 1e6:.0f} MB; one {n} x {n} float64 matrix: {matrix:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
