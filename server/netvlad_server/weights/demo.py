"""Deterministic random weights with the real names and shapes, for trying the software offline."""

from __future__ import annotations

import numpy as np

from .schema import CONV_LAYERS, NetVLADWeights

# Released model: VGG16 channels, K = 64 clusters of D = 512, whitened to 4096 dims.
_FULL_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_SIZES = {
    "full": {"channels": _FULL_CHANNELS, "clusters": 64, "outputs": 4096},
    "tiny": {"channels": (8,) * len(CONV_LAYERS), "clusters": 4, "outputs": 32},
}
_SOURCES = {"full": "demo", "tiny": "tiny-demo"}
MEAN_RGB = (123.68, 116.779, 103.939)  # ImageNet mean colour, what VGG16 models subtract


def demo_weights(size: str = "full", seed: int = 0) -> NetVLADWeights:
    """Random weights scaled to keep activations finite; their descriptors mean nothing."""
    if size not in _SIZES:
        raise ValueError(f"demo weights size must be one of {sorted(_SIZES)}, got {size!r}")
    spec = _SIZES[size]
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        """float32 N(0, std^2) drawn directly in float32 (fast for the 134 M-value WPCA)."""
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(std)
        return values

    tensors: dict[str, np.ndarray] = {"average_rgb": np.array(MEAN_RGB, dtype=np.float32)}
    channels_in = 3
    for layer, channels_out in zip(CONV_LAYERS, spec["channels"], strict=True):
        # He initialisation keeps the ReLU activations' scale steady through 13 layers.
        tensors[f"{layer}/kernel"] = normal(
            (3, 3, channels_in, channels_out), np.sqrt(2.0 / (9 * channels_in))
        )
        tensors[f"{layer}/bias"] = normal((channels_out,), 0.01)
        channels_in = channels_out

    dim, clusters, outputs = channels_in, spec["clusters"], spec["outputs"]
    centres = normal((dim, clusters), 1.0)  # D x K
    centres /= np.linalg.norm(centres, axis=0, keepdims=True)  # unit centres, like the features
    # Logits alpha * <x, c_k> with alpha = sqrt(D) have unit spread for unit-norm features x.
    tensors["assignment/kernel"] = (np.sqrt(dim) * centres).astype(np.float32)[None, None]
    tensors["cluster_centers"] = (-centres)[None, None, None]  # stored negated, as in the release
    tensors["WPCA/kernel"] = normal((1, 1, dim * clusters, outputs), 1.0 / np.sqrt(outputs))
    tensors["WPCA/bias"] = normal((outputs,), 0.01 / np.sqrt(outputs))
    label = (
        f"DEMO WEIGHTS ({size}, seed {seed}): random values, the descriptors are meaningless; "
        "load real weights for place recognition"
    )
    return NetVLADWeights(tensors=tensors, source=_SOURCES[size], format="demo", label=label)
