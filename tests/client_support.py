"""Client and CLI test support: a demo-tiny server subprocess, image files, the reference network.

The subprocess is the shared harness's ServerProcess (netvlad_client/bench/harness.py) with the
test defaults: tiny weights, float32, a 32x32 warm-up.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from netvlad_client.bench import harness

TINY_FLAGS = ("--model", "demo-tiny", "--warmup-sizes", "32x32", "--precision", "float32")


class ServerProcess(harness.ServerProcess):
    """`netvlad-server --model demo-tiny` on 127.0.0.1:port with /metrics on metrics_port."""

    def __init__(self, port: int, metrics_port: int, log: Path, *extra: str) -> None:
        """Later flags in `extra` win over the demo-tiny defaults."""
        super().__init__(log, *TINY_FLAGS, *extra, port=port, metrics_port=metrics_port,
                         env={"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})


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


def run_cli(server: harness.ServerProcess, *args: str) -> int:
    """netvlad-client --target SERVER ARGS, in this process; its exit status."""
    from netvlad_client.cli import main

    return main(["--target", server.target, *args])


def one_line_error(capsys, *words: str) -> str:
    """The CLI's stderr after a failure: one line, no traceback, holding every word."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err
