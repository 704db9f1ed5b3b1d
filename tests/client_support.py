"""Client and CLI test support: a real server subprocess, image files, the reference network."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from functools import cache
from pathlib import Path

import numpy as np
from netvlad_client import NetVLADClient, NetVLADError

_LAUNCH = "import sys; from netvlad_server.main import main; sys.exit(main(sys.argv[1:]))"


class ServerProcess:
    """`netvlad-server --model demo-tiny` on 127.0.0.1:port with /metrics on metrics_port."""

    def __init__(self, port: int, metrics_port: int, log: Path, *extra: str,
                 as_module: bool = False):
        """Later flags in `extra` win over the defaults; as_module: `python -m netvlad_server`."""
        self.port = port
        self.metrics_port = metrics_port
        self.target = f"127.0.0.1:{port}"
        self.log = log
        args = [
            "--model", "demo-tiny", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
            "--warmup-sizes", "32x32", "--precision", "float32", *extra,
        ]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        launch = ["-m", "netvlad_server"] if as_module else ["-c", _LAUNCH]
        with open(log, "wb") as handle:
            self.process = subprocess.Popen(
                [sys.executable, *launch, *args], stdout=handle, stderr=subprocess.STDOUT, env=env,
            )

    def wait_serving(self, timeout: float = 180.0) -> ServerProcess:
        """Block until the health service says SERVING; fail with the log if the server died."""
        deadline = time.monotonic() + timeout
        with NetVLADClient(self.target, retries=0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    code = self.process.returncode
                    raise RuntimeError(f"server exited with {code}:\n{self.tail()}")
                try:
                    if client.health(timeout=2.0) == "SERVING":
                        return self
                except NetVLADError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"server not SERVING after {timeout} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        """The end of the server's log, for failure messages."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def metric(self, name: str, quiet: float = 0.1, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`, once it stopped changing.

        The server counts a call when its handler ends, which may be just after the client
        got the answer: the value is read again every `quiet` seconds until two reads agree.
        """
        value = self._scrape(name, labels)
        while True:
            time.sleep(quiet)
            value, previous = self._scrape(name, labels), value
            if value == previous:
                return value

    def _scrape(self, name: str, labels: dict[str, str]) -> float:
        """One read of /metrics: the sum of the matching samples."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as response:
            text = response.read().decode()
        total = 0.0
        for match in re.finditer(rf"^{name}(?:{{(.*?)}})? (\S+)$", text, flags=re.M):
            found = dict(re.findall(r'(\w+)="([^"]*)"', match[1] or ""))
            if all(found.get(key) == value for key, value in labels.items()):
                total += float(match[2])
        return total

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again."""
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def random_image(seed: int, height: int = 40, width: int = 56, channels: int = 3) -> np.ndarray:
    """Deterministic uint8 pixels, H x W (channels 1 gives a 2-D gray image) or H x W x 3."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Write gray (H x W) or RGB (H x W x 3) pixels as a lossless PNG file."""
    import cv2

    bgr = pixels if pixels.ndim == 2 else np.ascontiguousarray(pixels[:, :, ::-1])
    if not cv2.imwrite(str(path), bgr):
        raise OSError(f"could not write {path}")
    return path


@cache
def _network():
    """The demo-tiny network, built once per test process."""
    from netvlad_server.network import NetVLADNetwork
    from netvlad_server.weights import load_weights

    return NetVLADNetwork(load_weights("demo-tiny"))


def reference(pixels: np.ndarray, dims: int | None = None) -> np.ndarray:
    """What a direct NetVLADNetwork call gives for one image: a (D,) float32 row."""
    batch = pixels[None, :, :, None] if pixels.ndim == 2 else pixels[None]
    return _network()(batch, dims=dims)[0]
