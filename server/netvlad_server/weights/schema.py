"""The 31 NetVLAD tensors: their names, the shape rules linking them, the validated container."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .fingerprint import weights_fingerprint

SCOPE = "vgg16_netvlad_pca"
CONV_LAYERS = (
    "conv1_1", "conv1_2",
    "conv2_1", "conv2_2",
    "conv3_1", "conv3_2", "conv3_3",
    "conv4_1", "conv4_2", "conv4_3",
    "conv5_1", "conv5_2", "conv5_3",
)  # fmt: skip
POOL_AFTER = frozenset({"conv1_2", "conv2_2", "conv3_3", "conv4_3"})
TENSOR_NAMES: tuple[str, ...] = (
    "average_rgb",
    *(f"{layer}/{part}" for layer in CONV_LAYERS for part in ("kernel", "bias")),
    "assignment/kernel",
    "cluster_centers",
    "WPCA/kernel",
    "WPCA/bias",
)

_FINITE_CHUNK = 1 << 22  # elements checked per step, so a 134 M-element WPCA needs no big mask


class WeightsError(ValueError):
    """A weight file or tensor set that cannot be used; the message lists every problem found."""


def _shape(dims: tuple[int | None, ...]) -> str:
    """Format an expected shape, writing sizes that any positive value satisfies as '?'."""
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _got(array: np.ndarray) -> str:
    """Format an actual shape the same way expected shapes are written."""
    return "[" + ", ".join(str(d) for d in array.shape) + "]"


class _Checker:
    """Walks the tensor chain once, inferring sizes from the tensors, collecting every problem."""

    def __init__(self, tensors: Mapping[str, object]) -> None:
        self.tensors = tensors
        self.problems: list[str] = []

    def array(self, name: str) -> np.ndarray | None:
        """The tensor if present and a numeric ndarray (type problems reported elsewhere)."""
        value = self.tensors.get(name)
        return value if isinstance(value, np.ndarray) else None

    def expect(self, name: str, dims: tuple[int | None, ...]) -> np.ndarray | None:
        """Report `name` unless its shape matches `dims` (None = any positive size); return it."""
        array = self.array(name)
        if array is None:
            return None
        matches = array.ndim == len(dims) and all(
            (want is None and got > 0) or got == want
            for want, got in zip(dims, array.shape, strict=True)
        )
        if not matches:
            self.problems.append(f"wrong shape: {name}: expected {_shape(dims)}, got {_got(array)}")
            return None
        return array

    def conv_chain(self) -> int | None:
        """Check the 13 VGG convolutions in order; return the last one's output channels (D)."""
        channels: int | None = 3
        for layer in CONV_LAYERS:
            kernel = self.expect(f"{layer}/kernel", (3, 3, channels, None))
            out = int(kernel.shape[3]) if kernel is not None else None
            if out is None:
                bias = self.array(f"{layer}/bias")
                out = int(bias.shape[0]) if bias is not None and bias.ndim == 1 else None
            self.expect(f"{layer}/bias", (out,))
            channels = out
        return channels

    def head(self, dim: int | None) -> None:
        """Check the NetVLAD assignment, centres and whitening tensors against D."""
        assignment = self.expect("assignment/kernel", (1, 1, dim, None))
        clusters = int(assignment.shape[3]) if assignment is not None else None
        if clusters is None:
            centres = self.array("cluster_centers")
            if centres is not None and centres.ndim == 5:
                clusters = int(centres.shape[4])
        self.expect("cluster_centers", (1, 1, 1, dim, clusters))
        vlad = dim * clusters if dim is not None and clusters is not None else None
        wpca = self.expect("WPCA/kernel", (1, 1, vlad, None))
        outputs = int(wpca.shape[3]) if wpca is not None else None
        self.expect("WPCA/bias", (outputs,))

    def types(self) -> None:
        """Report tensors that are not float32 ndarrays or that hold NaN or infinity."""
        for name in TENSOR_NAMES:
            if name not in self.tensors:
                continue
            value = self.tensors[name]
            if not isinstance(value, np.ndarray):
                kind = type(value).__name__
                self.problems.append(f"wrong type: {name}: expected a float32 array, got {kind}")
            elif value.dtype != np.float32:
                self.problems.append(f"wrong type: {name}: expected float32, got {value.dtype}")
            else:
                bad = _count_non_finite(value)
                if bad:
                    self.problems.append(f"non-finite values: {name}: {bad} NaN or infinite values")


def _count_non_finite(array: np.ndarray) -> int:
    """Count NaN/inf entries chunk by chunk to keep temporary masks small."""
    flat = array.reshape(-1)
    return sum(
        int(np.count_nonzero(~np.isfinite(flat[i : i + _FINITE_CHUNK])))
        for i in range(0, flat.size, _FINITE_CHUNK)
    )


def check_tensors(tensors: Mapping[str, np.ndarray]) -> None:
    """Raise one WeightsError listing every missing, unexpected, misshapen or mistyped tensor."""
    checker = _Checker(tensors)
    missing = [name for name in TENSOR_NAMES if name not in tensors]
    unexpected = sorted(name for name in tensors if name not in TENSOR_NAMES)
    if missing:
        checker.problems.append("missing tensors: " + ", ".join(missing))
    if unexpected:
        checker.problems.append("unexpected tensors: " + ", ".join(unexpected))
    checker.types()
    checker.head(checker.conv_chain())
    if checker.problems:
        count = len(checker.problems)
        raise WeightsError(
            f"{count} problem{'s' if count > 1 else ''} with the NetVLAD tensors "
            f"(names without the '{SCOPE}/' scope):\n  - " + "\n  - ".join(checker.problems)
        )


_SUFFIXES = (".zip", ".mat", ".npz", ".index", ".meta")


@dataclass(frozen=True, eq=False)
class NetVLADWeights:
    """The 31 validated float32 tensors of one NetVLAD model and where they came from."""

    tensors: dict[str, np.ndarray]
    source: str
    format: str
    label: str = ""  # human-readable name; demo weights carry a loud warning here

    def __post_init__(self) -> None:
        """Validate on construction so every NetVLADWeights in the program is usable."""
        check_tensors(self.tensors)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the tensors (weights/fingerprint.py), computed once for all who ask."""
        return weights_fingerprint(self.tensors)

    @property
    def conv_channels(self) -> tuple[int, ...]:
        """Output channels of each VGG convolution, conv1_1 to conv5_3."""
        return tuple(int(self.tensors[f"{layer}/kernel"].shape[3]) for layer in CONV_LAYERS)

    @property
    def cluster_dim(self) -> int:
        """D: the local feature size, conv5_3's output channels."""
        return int(self.tensors["conv5_3/kernel"].shape[3])

    @property
    def num_clusters(self) -> int:
        """K: the number of NetVLAD clusters."""
        return int(self.tensors["assignment/kernel"].shape[3])

    @property
    def vlad_dim(self) -> int:
        """D*K: the length of the flattened VLAD vector fed to the whitening."""
        return self.cluster_dim * self.num_clusters

    @property
    def output_dims(self) -> int:
        """The descriptor length after whitening PCA."""
        return int(self.tensors["WPCA/bias"].shape[0])

    @property
    def parameter_count(self) -> int:
        """Total number of weight values over all 31 tensors."""
        return sum(int(t.size) for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        """Memory held by the tensors, in bytes."""
        return sum(int(t.nbytes) for t in self.tensors.values())

    @property
    def name(self) -> str:
        """A short name for logs and metadata: the label, else the file name without extension."""
        if self.label:
            return self.label
        base = os.path.basename(os.path.normpath(self.source))
        for suffix in _SUFFIXES:
            base = base.removesuffix(suffix)
        return base or self.source
