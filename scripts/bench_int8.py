"""int8 against float32: served speed, memory and retrieval fidelity, all in one run.

Speed (per --sizes): a float32 server and an int8 server run side by side on loopback, with
their phases interleaved (8-caller load, one-caller latency, each in turn), then the plain
float32 network one image at a time in this process (the reference implementation's way of
working). Ratios: int8 served images/s over the plain float32 rate; int8 one-caller latency
over the float32 server's; each server's peak resident memory (VmHWM) after its phases.

Fidelity: four two-lap drives along generated streets (scripts/make_samples.py's generator;
the second lap shifted by half a frame step, in the same light, 5%, 10% and 20% darker), described
by float32, bfloat16 and int8 with the built-in calibration, with a scene-matched one (frames of
other streets from the same generator) and with conv5_3's mean error removed (an experiment).
The demo model's random descriptors are nearly parallel, so as in bench_precision.py a PCA
whitening spreads them out before evaluation (netvlad_client.evaluation: AUC, recall@1/5) and
nearest neighbours: each variant's own, fitted on its descriptors of other scenes (as a
database built with that server would be), and float32's applied to every variant (what mixing
precisions in one database does). Also int8's error on the start-up check's scene pairs against
float32's distances, and the check itself, timed.

    python scripts/bench_int8.py --json docs/bench_int8.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np
from bench_network import median_seconds
from make_samples import H, street
from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client.bench.harness import ServerProcess, proc_status
from netvlad_client.bench.inprocess import image_message, scene_image
from netvlad_client.bench.load import Endpoint, load_phase
from netvlad_client.evaluation import EvaluationSettings, evaluate
from netvlad_server.calibration import calibration_set
from netvlad_server.int8 import (
    Int8Network,
    Int8RefusedError,
    build_int8_network,
    calibrated_features_model,
)
from netvlad_server.int8 import scene_pairs as check_pairs
from netvlad_server.network import NetVLADNetwork
from netvlad_server.tflite import FEATURES_LAYER, TFLiteRunner, WhiteningRunner
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
                out[precision][phase] = {k: result.get(k) for k in (
                    "callers", "requests", "images_per_second", "latency", "mean_batch_size",
                    "batch_sizes", "model_busy_fraction", "server_cpu_seconds_per_request")}
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
    return median_seconds(lambda: network(image), repeats)


def stage_times(model: str, weights, size: tuple[int, int], whitening: WhiteningRunner,
                float_tail: NetVLADNetwork) -> dict:
    """Where an int8 image's time goes, in this process: the LiteRT convolutions of one image,
    the float32 NetVLAD layers, and the whitening in float32 TensorFlow against the server's
    LiteRT int8 one, at the batch sizes the server forms."""
    content, _, _ = calibrated_features_model(weights, float_tail, model, None)  # cached
    image = scene_image(*size)[np.newaxis]
    convolutions = TFLiteRunner(content)
    out = {"convolutions_per_image": median_seconds(lambda: convolutions(image), STAGE_REPEATS),
           "batches": {}}
    features = convolutions(image)
    for batch in (1, 4, 8):
        many = np.repeat(features, batch, axis=0)
        pooled = float_tail.pooled_from_features(many)
        out["batches"][batch] = {
            "netvlad_layers": median_seconds(partial(float_tail.pooled_from_features, many),
                                            STAGE_REPEATS),
            "whitening_float32": median_seconds(partial(float_tail.whiten, pooled), STAGE_REPEATS),
            "whitening_int8_litert": median_seconds(partial(whitening, pooled), STAGE_REPEATS)}
    return out


def speed(args: argparse.Namespace, weights, network: NetVLADNetwork) -> dict:
    """The speed part for every size, with the target ratios and a profile of the stages."""
    out = {}
    log_dir = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    whitening = WhiteningRunner(np.reshape(weights.tensors["WPCA/kernel"],
                                           [-1, network.output_dims]), weights.tensors["WPCA/bias"])
    for text in args.sizes.split(","):
        size = tuple(int(v) for v in text.split("x"))
        stages = stage_times(args.model, weights, size, whitening, network)
        print(text, json.dumps(stages), flush=True)
        served = server_phases(args.model, size, args, log_dir)
        plain = plain_float32(network, size, args.raw_repeats)
        int8, float32 = served["int8"], served["float32"]
        out[text] = {"servers": served, "plain_float32_seconds_per_image": plain,
                     "stages": stages, "ratios": {
            "int8_8_callers_over_plain_float32": int8["load"]["images_per_second"] * plain,
            "float32_8_callers_over_plain_float32":
                float32["load"]["images_per_second"] * plain,
            "int8_single_latency_over_float32": int8["single"]["latency"]["p50_ms"]
            / float32["single"]["latency"]["p50_ms"],
            "int8_peak_rss_over_float32": int8["peak_rss_mib"] / float32["peak_rss_mib"]}}
        print(json.dumps(out[text]["ratios"], indent=1), flush=True)
    return out


STAGE_REPEATS = 5  # timed calls per stage in the profile, after one untimed
SEQUENCES = (("same light", 1.0), ("5% darker", 0.95), ("10% darker", 0.9),
             ("20% darker", 0.8))  # lap 2's light


def frame(panorama: np.ndarray, left: int, size: tuple[int, int]) -> np.ndarray:
    """A 4:3 view of the panorama starting at column `left`, resized to size."""
    crop = panorama[:, left:left + H * 4 // 3]
    return cv2.resize(crop, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def drive(frames: int, size: tuple[int, int], gain: float,
          seed: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Two laps of `frames` views along one long street: (images, positions in metres).

    The second lap is shifted by half a frame step and its light scaled by `gain`.
    """
    step = 48  # pixels per metre of travel
    panorama = np.concatenate([street(seed + i) for i in range(frames * step // 900 + 2)], axis=1)
    images, positions = [], []
    for lap, (offset, lap_gain) in enumerate(((0, 1.0), (step // 2, gain))):
        for i in range(frames):
            view = frame(panorama, i * step + offset, size).astype(np.float32) * lap_gain
            images.append(np.clip(view, 0, 255).astype(np.uint8))
            positions.append((i + offset / step, 0.3 * lap))
    return np.stack(images), np.array(positions)


def fitted_whitening(descriptors: np.ndarray, dims: int):
    """A PCA whitening fitted on descriptors: rows -> unit rows of `dims` values."""
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


def float32_features(network: NetVLADNetwork, images: np.ndarray) -> np.ndarray:
    """float32 conv5_3 outputs [B, H/16, W/16, D], one image at a time."""
    import tensorflow as tf

    layer = tf.function(network.layer_function(FEATURES_LAYER))
    return np.concatenate([layer(tf.constant(image[np.newaxis], tf.float32)).numpy()
                           for image in images])


def offset_removed(int8: Int8Network, network: NetVLADNetwork,
                   calibration: np.ndarray) -> float:
    """Make `int8` subtract its mean conv5_3 error on the calibration images; the error's norm.

    conv5_3 has no ReLU, so this is what lowering that layer's bias by the error would do.
    """
    error = int8.features(calibration) - float32_features(network, calibration)
    correction = error.mean(axis=(0, 1, 2))
    plain = int8.features
    int8.features = lambda images: plain(images) - correction
    return float(np.linalg.norm(correction))


def scene_matched(weights, frames: np.ndarray, folder: Path) -> Int8Network | str:
    """The server's int8 network calibrated on `frames` (as --calibration DIR), or the refusal.

    Its cache goes to `folder`, not next to the weights, where it would replace the built-in
    calibration's.
    """
    images = folder / "calibration"
    images.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(frames):
        cv2.imwrite(str(images / f"{index:02d}.png"), image[:, :, ::-1])
    try:
        return build_int8_network(weights, str(folder), str(images))
    except Int8RefusedError as exc:
        return str(exc)


def error_structure(reference: np.ndarray, ours: np.ndarray) -> dict:
    """How int8's error on scene pairs (views 2i, 2i+1) compares with float32's distances.

    common_share: the part of the error energy shared by every image (one offset vector,
    which cancels when every descriptor compared has it); per_image: what is left.
    """
    error = ours - reference
    norms = np.linalg.norm(error, axis=1)
    residual = np.linalg.norm(error - error.mean(axis=0), axis=1)
    distance = np.linalg.norm(reference[:, None] - reference[None], axis=2)
    rows = np.arange(len(reference))
    same = distance[rows, rows ^ 1]
    np.fill_diagonal(distance, np.inf)
    distance[rows, rows ^ 1] = np.inf
    return {"error_median": float(np.median(norms)),
            "common_share": float(np.linalg.norm(error.mean(axis=0)) ** 2 / np.mean(norms ** 2)),
            "per_image_median": float(np.median(residual)),
            "per_image_max": float(residual.max()),
            "same_place_distance_median": float(np.median(same)),
            "same_place_distance_max": float(same.max()),
            "other_place_distance_min": float(distance.min(axis=1).min()),
            "nearest_other_place_distance_median": float(np.median(distance.min(axis=1)))}


def fidelity(args: argparse.Namespace, weights, network: NetVLADNetwork) -> dict:
    """Retrieval of float32, bfloat16 and int8 variants on four two-lap drives.

    The int8 variants are built as the server builds them (build_int8_network), start-up
    check included, so they run whatever the server runs after the convolutions.
    """
    size = (240, 320)
    both, positions = drive(args.frames, size, 1.0)
    first = both[:args.frames]
    second = {name: drive(args.frames, size, gain)[0][args.frames:] for name, gain in SEQUENCES}
    train = np.stack([frame(street(900 + i), 40 * (i % 5), size)
                      for i in range(args.train_scenes)])
    pairs = check_pairs()
    int8 = build_int8_network(weights, args.model)  # as the server builds it, check included
    corrected = build_int8_network(weights, args.model)
    correction_norm = offset_removed(corrected, network, np.stack(calibration_set(None).images))
    variants = {"float32": network, "bfloat16": NetVLADNetwork(weights, "bfloat16"),
                "int8 built-in calibration": int8}
    matched = scene_matched(weights, train[:16], Path(tempfile.mkdtemp(prefix="bench-int8-")))
    if isinstance(matched, str):
        print(f"scene-matched calibration: {matched}", flush=True)
    else:
        variants["int8 scene-matched calibration"] = matched
    variants["int8 built-in calibration, conv5_3 offset removed"] = corrected
    settings = EvaluationSettings(radius=0.75, suppression=11, recall_ns=(1, 5))
    out = {"frames": 2 * args.frames, "size": "240x320", "settings": {
        "radius_m": settings.radius, "suppression_frames": settings.suppression,
        "whitened_dims": args.whitened_dims, "train_scenes": args.train_scenes},
        "conv5_3_correction_norm": correction_norm,
        "scene_matched_refused": matched if isinstance(matched, str) else None, "sequences": {
            name: {"second_lap_gain": gain, "variants": {}} for name, gain in SEQUENCES},
        "check_pairs_error_structure": {}}
    described = {}
    for name, variant in variants.items():
        started = time.perf_counter()
        described[name] = {"train": in_chunks(variant, train), "first": in_chunks(variant, first),
                           "pairs": in_chunks(variant, pairs), **{
                               sequence: in_chunks(variant, images)
                               for sequence, images in second.items()}}
        print(f"{name}: described in {time.perf_counter() - started:.0f} s", flush=True)
    float32_whiten = fitted_whitening(described["float32"]["train"], args.whitened_dims)
    for name, rows in described.items():
        own_whiten = fitted_whitening(rows["train"], args.whitened_dims)
        if name != "float32":
            out["check_pairs_error_structure"][name] = error_structure(
                described["float32"]["pairs"], rows["pairs"])
        for sequence, _ in SEQUENCES:
            raw = np.concatenate([rows["first"], rows[sequence]])
            reference = np.concatenate([described["float32"]["first"],
                                        described["float32"][sequence]])
            result = evaluate(own_whiten(raw), positions, settings)
            reference_result = evaluate(float32_whiten(reference), positions, settings)
            mixed = evaluate(float32_whiten(raw), positions, settings)
            cosine = np.sum(raw * reference, axis=1)
            out["sequences"][sequence]["variants"][name] = entry = {
                "cosine_min": float(cosine.min()), "cosine_median": float(np.median(cosine)),
                "nn_changes": int(np.sum(result.neighbours[:, 0]
                                         != reference_result.neighbours[:, 0])),
                "auc": result.auc, "recall_at_1": result.recall_at[1],
                "recall_at_5": result.recall_at[5], "auc_float32_whitening": mixed.auc,
                "recall_at_1_float32_whitening": mixed.recall_at[1]}
            print(sequence, "|", name, json.dumps(entry), flush=True)
    out["startup_check"] = {}
    for name in ("int8 built-in calibration", "int8 scene-matched calibration"):
        variant = variants.get(name)
        if variant is not None:
            check = variant.agreement
            out["startup_check"][name] = {**vars(check), "passed": check.passed,
                                          "informative": check.informative,
                                          "seconds": variant.check_seconds}
            print(f"start-up check, {name}:", json.dumps(out["startup_check"][name]), flush=True)
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
        results["speed"] = speed(args, weights, network)
    results["load_average_after"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
