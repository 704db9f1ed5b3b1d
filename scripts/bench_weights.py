"""Time load_weights on full-size weights in every format (run: python scripts/bench_weights.py)."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The test helpers that write every weight format live in tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from netvlad_server.weights import demo_weights, load_weights, save_export
from weightfiles import (
    OFFICIAL_NAME,
    write_official_dir,
    write_official_zip,
    write_structed_mat,
)


def fresh_process_seconds(path: Path) -> float:
    """Wall time of a new Python process that imports the loader and loads `path`."""
    code = f"from netvlad_server.weights import load_weights; load_weights({str(path)!r})"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    """Write demo weights in each format to a temporary directory and time loading them."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="loads per format (median shown)")
    args = parser.parse_args()
    weights = demo_weights("full")
    with tempfile.TemporaryDirectory(prefix="netvlad-bench-") as temp:
        root = Path(temp)
        export = root / "export.npz"
        save_export(weights, export)
        paths = {
            "export .npz": export,
            "checkpoint directory": write_official_dir(weights.tensors, root),
            "official-style .zip": write_official_zip(weights.tensors, root / "ckpt.zip"),
            "structed .mat": write_structed_mat(weights.tensors, root / "net.mat"),
        }
        del weights
        load_weights(paths["export .npz"])  # warm the page cache and imports alike for all
        print(
            f"| format | file size | load_weights, median of {args.repeats} | vs export "
            "| new process: imports + load |"
        )
        print("|---|---|---|---|---|")
        baseline = None
        for kind, path in paths.items():
            files = [path] if path.is_file() else list(path.iterdir())
            size = sum(f.stat().st_size for f in files if f.name != f"{OFFICIAL_NAME}.meta")
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                loaded = load_weights(path)
                times.append(time.perf_counter() - start)
                del loaded
            median = statistics.median(times)
            baseline = baseline or median
            fresh = fresh_process_seconds(path)
            print(
                f"| {kind} | {size / 1e6:.0f} MB | {median:.2f} s | {median / baseline:.1f}x "
                f"| {fresh:.2f} s |"
            )


if __name__ == "__main__":
    main()
