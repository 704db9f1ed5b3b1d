"""Compare precisions (and XLA) with float32: descriptor agreement, retrieval, speed, and WPCA.

Full-size network. Scenes: generated streets (scripts/make_samples.py), two views of each place
(the second shifted and darkened), described at --size.

1. Demo weights (random, 4096-D): for each variant, seconds per image at batch 1 and --batch in
   the same run as float32, and agreement with float32 on --places x 2 test scenes.
2. Fitted whitening: random convolutions give nearly parallel descriptors (pairwise cosine
   ~0.999), far from what a trained model gives, so the demo whitening is replaced by a
   PCA whitening fitted on --train-places x 2 other scenes (as the released model's was fitted on
   training images). Its descriptors are spread out and its small-variance directions amplify
   rounding errors, the case where low precision could hurt retrieval. Agreement again.
3. The whitening product (32768 x output dims) itself in bfloat16: accuracy and time.
4. The machine's arithmetic rate: a 4096^3 matrix product in each precision, multiply-adds/s.

Agreement: cosine of each descriptor with its float32 twin; each error as a fraction of the
distance from the image to its nearest other image (float32); how many nearest neighbours among
all test images change.

    python scripts/bench_precision.py --json docs/bench_precision.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import cv2
import numpy as np
from bench_network import median_seconds
from make_samples import street

VARIANTS = ("float32", "bfloat16", "float16", "float32+xla", "bfloat16+xla")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="240x320", help="HxW of the scenes (default %(default)s)")
    parser.add_argument("--places", type=int, default=25, help="test places, two views each")
    parser.add_argument("--train-places", type=int, default=60,
                        help="places (two views each) the whitening is fitted on")
    parser.add_argument("--whitened-dims", type=int, default=96, help="fitted whitening's dims")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="precisions, +xla for XLA; float32 first (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="batch size for the batched timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per point (median)")
    parser.add_argument("--json", default="docs/bench_precision.json", help="where to write JSON")
    return parser.parse_args()


def scenes(places: int, height: int, width: int, first_seed: int = 100) -> np.ndarray:
    """Two views per place, [2 * places, H, W, 3] uint8: view i at 2i, its second view at 2i+1."""
    views = []
    for place in range(places):
        pano = street(first_seed + place)
        first = pano[:, :640]
        second = np.clip(pano[:, 60:700] * 0.85 + 10, 0, 255).astype(np.uint8)
        views += [cv2.resize(v, (width, height), interpolation=cv2.INTER_AREA)
                  for v in (first, second)]
    return np.stack(views)


def nearest_others(desc: np.ndarray) -> np.ndarray:
    """Index of each row's nearest other row (largest cosine)."""
    sim = desc @ desc.T
    np.fill_diagonal(sim, -np.inf)
    return np.argmax(sim, axis=1)


def agreement(desc: np.ndarray, reference: np.ndarray) -> dict:
    """How close descriptors are to the float32 ones, and whether retrieval changes."""
    cosine = np.sum(desc * reference, axis=1)
    nearest = nearest_others(reference)
    gap = np.linalg.norm(reference - reference[nearest], axis=1)  # to the nearest other image
    error = np.linalg.norm(desc - reference, axis=1) / gap
    pairs = (reference @ reference.T)[np.triu_indices(len(desc), 1)]
    return {"cosine_min_vs_float32": float(cosine.min()),
            "cosine_median_vs_float32": float(np.median(cosine)),
            "error_over_nearest_gap_max": float(error.max()),
            "error_over_nearest_gap_median": float(np.median(error)),
            "nearest_changed_vs_float32": int(np.sum(nearest_others(desc) != nearest)),
            "float32_pairwise_cosine_median": float(np.median(pairs)),
            "second_view_found": int(np.sum(nearest[1::2] == np.arange(0, len(desc), 2)))}


def describe_all(net, images: np.ndarray, batch: int) -> np.ndarray:
    """Descriptors of all images, `batch` at a time."""
    return np.concatenate([net(images[i:i + batch]) for i in range(0, len(images), batch)])


def whitening_input(net, images: np.ndarray) -> np.ndarray:
    """The normalised VLAD vectors [N, D*K] (the whitening's input), one image at a time."""
    return np.concatenate([dict(net.layer_outputs(image))["postL2"] for image in images])


def fitted_whitening(weights, vlad: np.ndarray, dims: int):
    """`weights` with the whitening replaced by PCA whitening fitted on `vlad` rows, `dims` out."""
    mean = vlad.mean(axis=0)
    _, singular, components = np.linalg.svd(vlad - mean, full_matrices=False)
    scale = singular[:dims] / np.sqrt(len(vlad) - 1)  # standard deviation along each component
    kernel = (components[:dims].T / scale).astype(np.float32)  # [D*K, dims]
    tensors = {**weights.tensors, "WPCA/kernel": kernel[None, None],
               "WPCA/bias": (-mean @ kernel).astype(np.float32)}
    return dataclasses.replace(weights, tensors=tensors, label="demo, fitted whitening")


def whitening_in_bfloat16(net32, nets: dict, images: np.ndarray, reference: np.ndarray,
                          batch: int) -> dict:
    """The WPCA product in bfloat16 after each given network's convolutions: accuracy and time."""
    import tensorflow as tf

    wpca32, bias = net32._wpca, net32._wpca_bias
    wpca16 = tf.cast(wpca32, tf.bfloat16)
    out: dict = {}
    for name, net in nets.items():
        flat = whitening_input(net, images)
        y = (tf.cast(tf.matmul(tf.cast(flat, tf.bfloat16), wpca16), tf.float32) + bias).numpy()
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        out[f"convolutions {name}, whitening bfloat16"] = agreement(y, reference)
    timing = {}
    for size in (1, batch):
        x = tf.constant(np.resize(reference, (size, wpca32.shape[0])))  # any [size, D*K] input
        timing[f"batch {size}"] = {
            "float32_seconds": median_seconds(lambda x=x: tf.matmul(x, wpca32).numpy(), 5),
            "bfloat16_seconds": median_seconds(
                lambda x=x: tf.matmul(tf.cast(x, tf.bfloat16), wpca16).numpy(), 5)}
    out["timing"] = timing
    return out


def matmul_rates(size: int = 4096) -> dict[str, float]:
    """Multiply-adds per second of one large square matrix product in each precision (oneDNN)."""
    import tensorflow as tf

    a, b = tf.random.normal([size, size], seed=1), tf.random.normal([size, size], seed=2)
    rates = {}
    for dtype in (tf.float32, tf.bfloat16, tf.float16):
        x, y = tf.cast(a, dtype), tf.cast(b, dtype)
        seconds = median_seconds(lambda x=x, y=y: tf.matmul(x, y).numpy(), 5)
        rates[dtype.name] = size**3 / seconds
    return rates


def table(rows: list[dict], batch: int, count: int) -> str:
    """The markdown table of the demo-weights variants."""
    lines = [f"| variant | s/image batch 1 | vs float32 | s/image batch {batch} | vs float32 | "
             "cosine min | error / nearest gap, max | nearest changed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seconds_per_image_batch_1']:.3f} | "
            f"{r['speedup_vs_float32_batch_1']:.2f}x | {r['seconds_per_image_batch_n']:.3f} | "
            f"{r['speedup_vs_float32_batch_n']:.2f}x | {r['cosine_min_vs_float32']:.6f} | "
            f"{r['error_over_nearest_gap_max']:.3f} | {r['nearest_changed_vs_float32']} of "
            f"{count} |")
    return "\n".join(lines)


def main() -> None:
    """Run the three parts, print tables, write JSON."""
    args = parse_args()
    import tensorflow as tf
    from netvlad_server.network import NetVLADNetwork
    from netvlad_server.runtime import cpu_model
    from netvlad_server.weights import demo_weights

    height, width = (int(v) for v in args.size.split("x"))
    test = scenes(args.places, height, width)
    weights = demo_weights("full", seed=0)
    load_before = os.getloadavg()
    rates = matmul_rates()  # first, in a fresh process
    print("matrix product multiply-adds/s:", {k: f"{v / 1e9:.0f} G" for k, v in rates.items()})
    rows, nets = [], {}
    for variant in args.variants.split(","):
        precision, _, xla = variant.partition("+")
        net = NetVLADNetwork(weights, precision=precision, xla=xla == "xla")
        desc = describe_all(net, test, args.batch)
        one = median_seconds(lambda n=net: n(test[:1]), args.repeats)
        many = median_seconds(lambda n=net: n(test[:args.batch]), args.repeats)
        if not rows:
            reference = desc
        row = {"variant": variant, "seconds_per_image_batch_1": one,
               "seconds_per_image_batch_n": many / args.batch, "batch_n": args.batch,
               **agreement(desc, reference)}
        row["speedup_vs_float32_batch_1"] = rows[0]["seconds_per_image_batch_1"] / one if rows \
            else 1.0
        row["speedup_vs_float32_batch_n"] = (rows[0]["seconds_per_image_batch_n"] * args.batch
                                             / many if rows else 1.0)
        rows.append(row)
        print(row, flush=True)
        if not xla:
            nets[precision] = net
    load_mid = os.getloadavg()
    whitening = whitening_in_bfloat16(nets["float32"], {p: nets[p] for p in ("float32", "bfloat16")
                                                        if p in nets}, test, reference, args.batch)
    print("whitening in bfloat16:", whitening, flush=True)

    train = scenes(args.train_places, height, width, first_seed=1000)
    fitted = fitted_whitening(weights, whitening_input(nets["float32"], train),
                              args.whitened_dims)
    whitened: dict = {}
    for precision in [p for p in ("float32", "bfloat16", "float16") if p in nets]:
        desc = describe_all(NetVLADNetwork(fitted, precision=precision), test, args.batch)
        if precision == "float32":
            fitted_reference = desc
        whitened[precision] = agreement(desc, fitted_reference)
        print("fitted whitening", precision, whitened[precision], flush=True)

    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "tensorflow": tf.__version__,
               "load_average_before": load_before, "load_average_after_timing": load_mid,
               "load_average_after": os.getloadavg(),
               "test_images": f"{len(test)} generated scenes ({args.places} places x 2 views), "
                              f"{height}x{width}",
               "fitted_whitening": f"PCA whitening to {args.whitened_dims} dims fitted on "
                                   f"{len(train)} other scenes"}
    print()
    print(table(rows, args.batch, len(test)))
    print(f"\n{machine}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(
        {"machine": machine, "matmul_multiply_adds_per_second": rates, "demo_weights": rows,
         "fitted_whitening": whitened, "whitening_bfloat16": whitening}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
