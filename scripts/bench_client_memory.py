"""Peak memory of `netvlad-client describe` on a large folder, against a running server.

Writes `--images` small random PNGs (16 x 16, so the server's time goes to the 4096-D whitening,
not to convolutions) to a temporary folder, then runs `netvlad-client describe` in this process
while a thread samples /proc/self/status every 20 ms. Prints the peak anonymous RSS (heap: what
the process really holds) and the peak file-backed RSS (pages of memory-mapped files, which the
kernel can write back and drop under pressure).

`--client-src DIR` imports `netvlad_client` from another checkout's `client/` folder, to compare
two versions in the same conditions (e.g. `git worktree add /tmp/old <commit>`).

Usage: python scripts/bench_client_memory.py --target 127.0.0.1:50051 [--images 10000]
           [--format npy] [--client-src DIR] [-- extra describe options]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _write_images(directory: Path, count: int) -> None:
    import cv2

    rng = np.random.default_rng(0)
    for i in range(count):
        cv2.imwrite(str(directory / f"{i:06d}.png"), rng.integers(0, 256, (16, 16, 3), np.uint8))


class _PeakMemory:
    """Samples RssAnon and RssFile of this process until stopped; keeps the maxima in MiB."""

    def __init__(self, interval: float = 0.02) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/status") as status:
                for line in status:
                    key, _, value = line.partition(":")
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(value.split()[0]) // 1024)
            self._stop.wait(self._interval)

    def __enter__(self) -> _PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(2 * self._interval)
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    """Describe a generated folder once and print the peaks as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of a running netvlad-server")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--format", default="npy", help="output format (default npy)")
    parser.add_argument("--client-src", help="import netvlad_client from this folder instead")
    parser.add_argument("extra", nargs="*", help="more `describe` options, after --")
    args = parser.parse_args(argv)
    if args.client_src:
        sys.path.insert(0, str(Path(args.client_src).resolve()))
    from netvlad_client import cli

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "images"
        folder.mkdir()
        _write_images(folder, args.images)
        out = Path(scratch) / f"descriptors.{args.format}"
        command = ["--target", args.target, "describe", str(folder), "--out", str(out),
                   "--progress", "never", *args.extra]
        start = time.perf_counter()
        with _PeakMemory() as memory:
            code = cli.main(command)
        seconds = time.perf_counter() - start
        size = out.stat().st_size if out.exists() else 0
    print(json.dumps({
        "client": cli.__file__, "images": args.images, "format": args.format, "exit": code,
        "seconds": round(seconds, 1), "output_mib": round(size / 2**20, 1),
        "peak_anonymous_rss_mib": memory.peak["RssAnon"],
        "peak_file_rss_mib": memory.peak["RssFile"],
    }))
    return code


if __name__ == "__main__":
    sys.exit(main())
