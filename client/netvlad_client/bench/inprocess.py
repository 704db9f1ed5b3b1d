"""The parts of netvlad-bench that run server code in this process, imported only when used.

The test scene, the server's own image decoder (to time decoding and to give the raw network the
pixels the server sees) and the network itself (the raw phase) come from the `server` extra;
without it each names what to install instead of failing on a bare ImportError.
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from netvlad_client._proto import netvlad_pb2 as pb

SERVER_EXTRA = "pip install 'netvlad-service[server]'"


class BenchError(RuntimeError):
    """A run that cannot go on; the message says what is missing or wrong and what to do."""


def server_module(name: str, purpose: str) -> ModuleType:
    """Import a module of the server side (netvlad_server, OpenCV) or say which extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise BenchError(f"netvlad-bench {purpose}, which needs the server package "
                         f"({exc.name or name} is not installed): {SERVER_EXTRA}") from exc


def scene_image(height: int, width: int) -> np.ndarray:
    """The photo-like RGB image every request carries (the server's warm-up scene)."""
    runtime = server_module("netvlad_server.runtime", "draws its test image")
    return runtime.synthetic_scene(height, width)


def cpu_model() -> str:
    """The CPU model name, for the results' machine section."""
    return server_module("netvlad_server.runtime", "names the CPU").cpu_model()


def image_message(image: np.ndarray, encoding: str) -> pb.Image:
    """The image as it travels: an encoded JPEG (quality 90) or PNG, or raw RGB pixels."""
    if encoding == "raw":
        height, width, channels = image.shape
        return pb.Image(raw=pb.RawImage(data=image.tobytes(), height=height, width=width,
                                        channels=channels))
    cv2 = server_module("cv2", f"encodes {encoding} images with OpenCV")
    ext, params = (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]) if encoding == "jpeg" else (".png", [])
    ok, data = cv2.imencode(ext, np.ascontiguousarray(image[:, :, ::-1]), params)
    if not ok:
        raise BenchError(f"OpenCV could not encode a {encoding} image")
    return pb.Image(encoded=data.tobytes())


def server_pixels(message: pb.Image) -> np.ndarray:
    """The uint8 [H, W, C] array the server's model sees for this image (same decoder)."""
    if message.WhichOneof("source") == "raw":
        raw = message.raw
        return np.frombuffer(raw.data, np.uint8).reshape(raw.height, raw.width, raw.channels)
    images = server_module("netvlad_server.images", "decodes images as the server does")
    return images.decode_encoded(message.encoded, images.ImageLimits(1 << 40))


def decode_cpu_seconds(message: pb.Image, repeats: int = 20) -> float:
    """Median CPU seconds the server's decoding (same function) takes for this image."""
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        server_pixels(message)
        times.append(time.thread_time() - start)
    return statistics.median(times)


def configure_threads(intra_op_threads: int, inter_op_threads: int) -> None:
    """Give this process's TensorFlow the thread settings the servers were started with."""
    runtime = server_module("netvlad_server.runtime", "runs the raw phase (use --skip raw)")
    runtime.configure_tensorflow(intra_op_threads, inter_op_threads)


def raw_phase(model: str, precision: str, xla: bool, repeats: int, image: np.ndarray,
              batch_sizes: Sequence[int], server_descriptor: Sequence[float] | None,
              ) -> dict[str, Any]:
    """The network called directly: each batch size formed in `precision`, and float32 batch 1."""
    network = server_module("netvlad_server.network", "runs the raw phase (use --skip raw)")
    weights_module = server_module("netvlad_server.weights", "runs the raw phase")

    def timed(net: Any, batch: np.ndarray) -> dict[str, float]:
        net(batch)  # warm-up: tracing and oneDNN primitive creation for this shape
        runs = []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            net(batch)
            runs.append((time.perf_counter() - wall, time.process_time() - cpu))
        wall_s = statistics.median(r[0] for r in runs)
        cpu_s = statistics.median(r[1] for r in runs)
        size = len(batch)
        return {"seconds": wall_s, "seconds_per_image": wall_s / size,
                "images_per_second": size / wall_s, "cpu_seconds_per_image": cpu_s / size}

    weights = weights_module.load_weights(model)
    net = network.NetVLADNetwork(weights, precision=precision, xla=xla)
    sizes = sorted({1, *batch_sizes})
    out: dict[str, Any] = {"precision": precision, "by_batch": {
        size: timed(net, np.repeat(image[None], size, axis=0)) for size in sizes}}
    if precision != "float32" or xla:
        del net
        net = network.NetVLADNetwork(weights, precision="float32")
        out["float32_batch_1"] = timed(net, image[None])
    else:
        out["float32_batch_1"] = out["by_batch"][1]
    if server_descriptor is not None and len(server_descriptor) == net.output_dims:
        reference = net(image[None])[0]
        out["cosine_server_vs_float32"] = float(np.dot(reference, server_descriptor))
    return out
