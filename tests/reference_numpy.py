"""Independent plain-NumPy NetVLAD forward pass (docs/NETWORK.md), the tests' ground truth.

Written step by step from the forward-pass table with no TensorFlow and none of network.py's
tricks: convolutions as a sum over kernel taps of shifted-image matrix products, the VLAD core as
a loop over clusters, the flatten as an explicit index loop. float64 by default.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

CONVS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
         "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
POOLED = ("conv1_2", "conv2_2", "conv3_3", "conv4_3")
NO_RELU_AFTER = ("conv5_3",)


def conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Stride-1 'same' convolution of x [H,W,Cin] with kernel [kh,kw,Cin,Cout], plus bias."""
    kh, kw, cin, cout = kernel.shape
    height, width, _ = x.shape
    top, left = (kh - 1) // 2, (kw - 1) // 2
    padded = np.zeros((height + kh - 1, width + kw - 1, cin), x.dtype)
    padded[top:top + height, left:left + width] = x
    out = np.zeros((height * width, cout), x.dtype) + bias
    for dy in range(kh):
        for dx in range(kw):
            window = padded[dy:dy + height, dx:dx + width].reshape(height * width, cin)
            out += window @ kernel[dy, dx]
    return out.reshape(height, width, cout)


def max_pool_2x2(x: np.ndarray) -> np.ndarray:
    """2x2 stride-2 'valid' max-pooling of [H,W,C]; an odd last row or column is dropped."""
    height, width, channels = x.shape
    h2, w2 = height // 2, width // 2
    blocks = x[:2 * h2, :2 * w2].reshape(h2, 2, w2, 2, channels)
    return blocks.max(axis=(1, 3))


def flatten_vlad(v: np.ndarray) -> np.ndarray:
    """Flatten V [D,K] D-major: V[d,k] goes to index d*K + k."""
    dims, clusters = v.shape
    flat = np.empty(dims * clusters, v.dtype)
    for d in range(dims):
        for k in range(clusters):
            flat[d * clusters + k] = v[d, k]
    return flat


def _l2_max(x: np.ndarray) -> np.ndarray:
    """x / sqrt(max(sum x^2, 1e-12)) over the last axis."""
    return x / np.sqrt(np.maximum((x * x).sum(axis=-1, keepdims=True), 1e-12))


def _l2_plus(x: np.ndarray, axis: int) -> np.ndarray:
    """x / sqrt(sum x^2 + 1e-12) over axis."""
    return x / np.sqrt((x * x).sum(axis=axis, keepdims=True) + 1e-12)


def image_layers(
    tensors: Mapping[str, np.ndarray],
    image: np.ndarray,
    subtract_mean: bool = True,
    dtype: type = np.float64,
) -> list[tuple[str, np.ndarray]]:
    """(name, output) of every layer for one image [H,W,C], in MatConvNet order.

    Layouts: VGG layers and preL2 [H,W,C]; vlad_core and intranorm [D,K]; the rest vectors.
    """
    w = {name: np.asarray(value, dtype) for name, value in tensors.items()}
    x = np.asarray(image, dtype)
    if x.shape[-1] == 1:
        x = np.concatenate([x, x, x], axis=-1)
    if subtract_mean:
        x = x - w["average_rgb"].reshape(3)
    out: list[tuple[str, np.ndarray]] = []
    for name in CONVS:
        suffix = name[len("conv"):]
        x = conv_same(x, w[f"{name}/kernel"], w[f"{name}/bias"])
        out.append((name, x))
        if name not in NO_RELU_AFTER:
            x = np.maximum(x, 0)
            out.append((f"relu{suffix}", x))
        if name in POOLED:
            x = max_pool_2x2(x)
            out.append((f"pool{suffix[0]}", x))

    x = _l2_max(x)
    out.append(("preL2", x))
    dims = x.shape[-1]
    feats = x.reshape(-1, dims)  # [N, D]
    logits = feats @ w["assignment/kernel"].reshape(dims, -1)  # [N, K]
    clusters = logits.shape[1]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    assign = exp / exp.sum(axis=1, keepdims=True)
    centers = w["cluster_centers"].reshape(dims, clusters)  # stored negated
    vlad = np.zeros((dims, clusters), dtype)
    for k in range(clusters):
        vlad[:, k] = (assign[:, k:k + 1] * (feats + centers[:, k])).sum(axis=0)
    out.append(("vlad_core", vlad))
    vlad = _l2_plus(vlad, axis=0)
    out.append(("intranorm", vlad))
    flat = _l2_plus(flatten_vlad(vlad), axis=0)
    out.append(("postL2", flat))
    wpca = w["WPCA/kernel"].reshape(dims * clusters, -1)
    y = flat @ wpca + w["WPCA/bias"]
    out.append(("WPCA", y))
    out.append(("finalL2", _l2_max(y)))
    return out


def describe(
    tensors: Mapping[str, np.ndarray], images: np.ndarray, dtype: type = np.float64
) -> np.ndarray:
    """Descriptors [B, P] for images [B,H,W,C] (or one [H,W,C]), one image at a time."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[np.newaxis]
    return np.stack([image_layers(tensors, image, dtype=dtype)[-1][1] for image in images])
