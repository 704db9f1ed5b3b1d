"""int8 against float32: served speed, memory and retrieval fidelity, all in one run.

Speed (per --sizes): a float32 server and an int8 server run side by side on loopback, with
their phases interleaved (8-caller load, one-caller latency, each in turn), then the plain
float32 network one image at a time in this process (the reference implementation's way of
working). Ratios: int8 served images/s over the plain float32 rate; int8 one-caller latency
over the float32 server's; each server's peak resident memory (VmHWM) after its phases.

Fidelity: a two-lap drive along generated streets (scripts/make_samples.py's generator; the
second lap shifted by half a frame step and darker), described by float32, bfloat16 and int8
with the built-in calibration and with a scene-matched one (frames of other streets from the
same generator). The demo model's random descriptors are nearly parallel, so as in
bench_precision.py a PCA whitening fitted on other scenes' float32 descriptors spreads them
out before evaluation (netvlad_client.evaluation: AUC, recall@1/5) and nearest neighbours.

    python scripts/bench_int8.py --json docs/bench_int8.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from make_samples import H, street
from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client.bench.harness import ServerProcess, proc_status
from netvlad_client.bench.inprocess import image_message, scene_image
from netvlad_client.bench.load import Endpoint, load_phase
from netvlad_client.evaluation import EvaluationSettings, evaluate
from netvlad_server.calibration import CalibrationSet, calibration_set
from netvlad_server.int8 import Int8Network, calibrated_features_model, measure_agreement
from netvlad_server.int8 import scene_pairs as check_pairs
from netvlad_server.network import NetVLADNetwork
from netvlad_server.tflite import FEATURES_LAYER, convert
from netvlad_server.weights import load_weights


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="weights (default %(default)s)")
    parser.add_argument("--sizes", default="240x320,480x640", help="HxW list for the speed part")
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48, help="timed requests per load phase")
    parser.add_argument("--single-requests", type=int, default=12)
    parser.add_argument("--raw-repeats", type=int, default=5, help="plain float32 calls (median)")
    parser.add_argument("--frames", type=int, default=30, help="frames per lap of the drive")
    parser.add_argument("--train-scenes", type=int, default=120, help="scenes the whitening fits")
    parser.add_argument("--whitened-dims", type=int, default=64, help="below --train-scenes")
    parser.add_argument("--skip", default="", help="comma-separated: speed, fidelity")
    parser.add_argument("--json", default="docs/bench_int8.json", help="where to write JSON")
    return parser.parse_args()


def server_phases(model: str, size: tuple[int, int], args: argparse.Namespace,
                  log_dir: Path) -> dict:
    """float32 and int8 servers side by side, phases interleaved; peak RSS of each."""
    height, width = size
    message = image_message(scene_image(height, width), "jpeg")
    request = pb.DescribeImagesRequest(images=[message]).SerializeToString()
    servers = {precision: ServerProcess(
        log_dir / f"{precision}-{height}x{width}.log", "--model", model, "--precision",
        precision, "--warmup-sizes", f"{height}x{width}", "--max-queue-size", "64")
        for precision in ("float32", "int8")}
    out: dict = {precision: {} for precision in servers}
    try:
        endpoints = {}
        for precision, server in servers.items():
            server.wait_serving(timeout=1800.0)
            endpoints[precision] = Endpoint(server.target, server.metrics_url, server.pid)
        for phase, callers, count in (("load", args.callers, args.requests),
                                      ("single", 1, args.single_requests)):
            for precision, endpoint in endpoints.items():
                print(f"{height}x{width} {precision} {phase} ...", flush=True)
                result = load_phase(endpoint, request, 1, callers, count)
                out[precision][phase] = {k: result[k] for k in (
                    "callers", "requests", "images_per_second", "latency", "mean_batch_size")}
        for precision, server in servers.items():
            status = proc_status(server.pid)
            out[precision]["rss_mib"] = status["VmRSS"] / 2**20
            out[precision]["peak_rss_mib"] = status["VmHWM"] / 2**20
    finally:
        for server in servers.values():
            server.stop()
    return out


def plain_float32(network: NetVLADNetwork, size: tuple[int, int], repeats: int) -> float:
    """Median seconds of one float32 forward of one image (after a warm-up call)."""
    image = scene_image(*size)[np.newaxis]
    network(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        network(image)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(args: argparse.Namespace, network: NetVLADNetwork) -> dict:
    """The speed part for every size, with the target ratios."""
    out = {}
    log_dir = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    for text in args.sizes.split(","):
        size = tuple(int(v) for v in text.split("x"))
        served = server_phases(args.model, size, args, log_dir)
        plain = plain_float32(network, size, args.raw_repeats)
        int8, float32 = served["int8"], served["float32"]
        out[text] = {"servers": served, "plain_float32_seconds_per_image": plain, "ratios": {
            "int8_8_callers_over_plain_float32": int8["load"]["images_per_second"] * plain,
            "float32_8_callers_over_plain_float32":
                float32["load"]["images_per_second"] * plain,
            "int8_single_latency_over_float32": int8["single"]["latency"]["p50_ms"]
            / float32["single"]["latency"]["p50_ms"],
            "int8_peak_rss_over_float32": int8["peak_rss_mib"] / float32["peak_rss_mib"]}}
        print(json.dumps(out[text]["ratios"], indent=1), flush=True)
    return out


def frame(panorama: np.ndarray, left: int, size: tuple[int, int]) -> np.ndarray:
    """A 4:3 view of the panorama starting at column `left`, resized to size."""
    crop = panorama[:, left:left + H * 4 // 3]
    return cv2.resize(crop, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def drive(frames: int, size: tuple[int, int], seed: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Two laps of `frames` views along one long street: (images, positions in metres)."""
    step = 48  # pixels per metre of travel
    panorama = np.concatenate([street(seed + i) for i in range(frames * step // 900 + 2)], axis=1)
    images, positions = [], []
    for lap, (offset, gain) in enumerate(((0, 1.0), (step // 2, 0.8))):
        for i in range(frames):
            view = frame(panorama, i * step + offset, size).astype(np.float32) * gain
            images.append(np.clip(view, 0, 255).astype(np.uint8))
            positions.append((i + offset / step, 0.3 * lap))
    return np.stack(images), np.array(positions)


def fitted_whitening(descriptors: np.ndarray, dims: int):
    """A PCA whitening fitted on float32 descriptors: rows -> unit rows of `dims` values."""
    mean = descriptors.mean(axis=0)
    _, singular, vt = np.linalg.svd(descriptors - mean, full_matrices=False)
    scale = vt[:dims].T / singular[:dims]

    def whiten(rows: np.ndarray) -> np.ndarray:
        out = (rows - mean) @ scale
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    return whiten


def in_chunks(describe, images: np.ndarray, chunk: int = 4) -> np.ndarray:
    """describe() over the images a few at a time (bounded memory)."""
    return np.concatenate([describe(images[i:i + chunk]) for i in range(0, len(images), chunk)])


def fidelity(args: argparse.Namespace, weights, network: NetVLADNetwork) -> dict:
    """Retrieval of float32, bfloat16 and int8 (two calibrations) on the two-lap drive."""
    size = (240, 320)
    images, positions = drive(args.frames, size)
    train = np.stack([frame(street(900 + i), 40 * (i % 5), size)
                      for i in range(args.train_scenes)])
    whiten = fitted_whitening(in_chunks(network, train), args.whitened_dims)
    matched = CalibrationSet(tuple(train[:16]), "scenes", "matched")
    variants = {"float32": network, "bfloat16": NetVLADNetwork(weights, "bfloat16")}
    content, _, _ = calibrated_features_model(weights, network, args.model, None)
    variants["int8 built-in calibration"] = Int8Network(content, network)
    variants["int8 scene-matched calibration"] = Int8Network(convert(
        network, "int8", matched, last=FEATURES_LAYER), network)
    settings = EvaluationSettings(radius=0.75, suppression=11, recall_ns=(1, 5))
    reference = None
    out = {"frames": len(images), "size": "240x320", "settings": {
        "radius_m": settings.radius, "suppression_frames": settings.suppression,
        "whitened_dims": args.whitened_dims, "train_scenes": args.train_scenes}, "variants": {}}
    for name, variant in variants.items():
        raw = in_chunks(variant, images)
        result = evaluate(whiten(raw), positions, settings)
        nearest = result.neighbours[:, 0]
        if reference is None:
            reference = (raw, nearest)
        cosine = np.sum(raw * reference[0], axis=1)
        out["variants"][name] = {
            "cosine_min": float(cosine.min()), "cosine_median": float(np.median(cosine)),
            "nn_changes": int(np.sum(nearest != reference[1])), "auc": result.auc,
            "recall_at_1": result.recall_at[1], "recall_at_5": result.recall_at[5]}
        print(name, json.dumps(out["variants"][name]), flush=True)
    check = measure_agreement(variants["int8 built-in calibration"], check_pairs())
    out["startup_check"] = {**vars(check), "passed": check.passed,
                            "informative": check.informative}
    return out


def main() -> int:
    """Run the parts not skipped and write the JSON."""
    args = parse_args()
    skip = set(filter(None, args.skip.split(",")))
    weights = load_weights(args.model)
    network = NetVLADNetwork(weights, "float32")
    calibration_set(None)
    calibrated_features_model(weights, network, args.model, None)  # servers then read the cache
    results = {"command": " ".join(["python", *sys.argv]), "cpu_count": os.cpu_count(),
               "load_average_before": os.getloadavg()}
    if "fidelity" not in skip:
        results["fidelity"] = fidelity(args, weights, network)
    if "speed" not in skip:
        results["speed"] = speed(args, network)
    results["load_average_after"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
