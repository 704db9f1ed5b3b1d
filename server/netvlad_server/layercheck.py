"""compare-layers: every layer of the TF network against MatConvNet's saved outputs.

The thresholds are those of docs/NETWORK.md ("How the maths is checked").

Inputs are a structed NetVLAD .mat and a stats .mat saved from MATLAB's vl_simplenn on one image:
  input  H x W x 3, the image as vl_simplenn received it (mean colour already subtracted);
  outs   a cell with every layer's output in file order (res(2:end).x); a cell with one entry
         more (res(1:end).x, as netvlad_tf's get_example_stats.m saves) is read as the input
         followed by the layer outputs, and `input` may then be absent.
Accepted layouts, per layer, as MatConvNet stores them for one image: VGG layers and preL2
H x W x C; vlad_core and the intra-normalisation 1 x K x D (MATLAB's layout, index [0, k, d])
or a D*K vector in D-major order (index d*K + k); postL2, WPCA and finalL2 vectors. Singleton
dimensions may be squeezed away (scipy's squeeze_me); any other shape is refused rather than
reordered, so a transposed D x K matrix is an error, not a silent re-interpretation.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from netvlad_server.weights import NetVLADWeights, WeightsError, read_matconvnet

LAYER_MAX_ABS = 0.018  # every layer
FINAL_MAX_ABS = 0.00031  # the final descriptor
FINAL_L2 = 0.0053  # L2 norm of the final descriptor's difference
# The limits above are the reference port's, for float32 arithmetic. A reduced precision rounds
# every convolution's inputs to `u` relative accuracy (its unit roundoff: bfloat16 keeps 8
# significant bits, float16 11), so its error scales with the size of the activations: conv1_1
# of a real image reaches several hundred, where bfloat16's rounding alone is about 1.7. For such
# a precision a layer is judged relative to its largest reference value: within
# RELATIVE_ROUNDOFFS * u of it (the absolute float32 limits stay as a floor). Measured on the
# full-size network, bfloat16 stays within 2.4 u on every layer and float16 within 2.5 u, while a
# kernel 5% off moves its layer by 0.05 relative, 12.8 bfloat16 units: 6 u passes the first with
# room and still catches the second.
RELATIVE_ROUNDOFFS = 6.0
UNIT_ROUNDOFF = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}
_VLAD_LAYERS = frozenset({"vlad_core", "intranorm"})  # our names for the two D x K outputs


class StatsError(ValueError):
    """A stats .mat that cannot be compared: missing variables, wrong count or unknown layout."""


@dataclass(frozen=True)
class LayerResult:
    """One row of the comparison table."""

    index: int  # 1-based position in net.layers
    name: str  # the .mat's layer name
    type: str
    shape: tuple[int, ...]  # the stats array's shape as read
    max_abs: float
    threshold: float

    @property
    def ok(self) -> bool:
        """Whether this layer is within its threshold."""
        return self.max_abs < self.threshold


def relative_limit(precision: str) -> float:
    """The error allowed per unit of a layer's largest reference value (0 for float32)."""
    return RELATIVE_ROUNDOFFS * UNIT_ROUNDOFF[precision]


def layer_threshold(precision: str, absolute: float, reference: np.ndarray) -> float:
    """A layer's limit: the float32 one, widened in proportion to the values for lower precision."""
    largest = float(np.max(np.abs(reference))) if reference.size else 0.0
    return max(absolute, relative_limit(precision) * largest)


@dataclass(frozen=True)
class Report:
    """All layer rows plus the final vector's L2 difference."""

    rows: list[LayerResult]
    final_l2: float
    final_l2_threshold: float = FINAL_L2

    @property
    def failed(self) -> list[LayerResult]:
        """Rows past their threshold, in layer order."""
        return [row for row in self.rows if not row.ok]

    @property
    def ok(self) -> bool:
        """Whether every layer, the final vector and its L2 difference are within threshold."""
        return not self.failed and self.final_l2 < self.final_l2_threshold

    def table(self) -> str:
        """The comparison as a fixed-width text table with a verdict line."""
        lines = [f"{'#':>3}  {'layer':<16} {'type':<10} {'shape':<16} {'max abs err':>12} "
                 f"{'threshold':>10}  ok"]
        for row in self.rows:
            shape = "x".join(str(d) for d in row.shape) or "scalar"
            lines.append(
                f"{row.index:>3}  {row.name:<16} {row.type:<10} {shape:<16} {row.max_abs:>12.3g} "
                f"{row.threshold:>10.3g}  {'ok' if row.ok else 'FAIL'}"
            )
        l2_ok = self.final_l2 < self.final_l2_threshold
        lines.append(f"L2 norm of the final difference: {self.final_l2:.3g} "
                     f"(threshold {self.final_l2_threshold:.3g}) {'ok' if l2_ok else 'FAIL'}")
        failed = self.failed
        if failed:
            lines.append(f"FAILED: first mismatch at {failed[0].name} (layer {failed[0].index}); "
                         f"{len(failed)} of {len(self.rows)} layers past their threshold")
        elif not l2_ok:
            lines.append("FAILED: the final vector's L2 difference is past its threshold")
        else:
            lines.append(f"PASSED: all {len(self.rows)} layers within the thresholds")
        return "\n".join(lines)


def to_matconvnet(name: str, array: np.ndarray) -> np.ndarray:
    """One image's layer output from our layout (network/reference, no batch) to MatConvNet's."""
    if name in _VLAD_LAYERS:  # [D, K] -> 1 x K x D
        return array.T[np.newaxis]
    if array.ndim == 1:  # vectors are 1 x 1 x N
        return array.reshape(1, 1, -1)
    return array


def _align(index: int, name: str, theirs: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """Return our MatConvNet-layout output shaped like `theirs`, or refuse an unknown layout."""
    theirs_sq, ours_sq = np.squeeze(theirs), np.squeeze(ours)
    if theirs_sq.shape == ours_sq.shape:
        return ours_sq.reshape(theirs.shape)
    if name in _VLAD_LAYERS and theirs_sq.ndim == 1 and theirs_sq.size == ours.size:
        return ours_sq.ravel(order="F").reshape(theirs.shape)  # 1xKxD column-major = D-major
    accepted = "1 x K x D or a D*K vector (D-major)" if name in _VLAD_LAYERS else "H x W x C"
    raise StatsError(
        f"layer {index} ({name}): stats shape {list(theirs.shape)} does not match the network's "
        f"{list(ours.shape)} (MatConvNet layout); expected {accepted}, singleton dims optional"
    )


def read_stats(path: str | Path, layer_count: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Read (input image, per-layer outputs) from a stats .mat, per the module's layout rules."""
    import scipy.io

    try:
        contents = scipy.io.loadmat(path, squeeze_me=True)
    except (ValueError, TypeError, OSError, NotImplementedError,
            scipy.io.matlab.MatReadError) as exc:
        raise StatsError(f"{path}: not a readable MATLAB v5/v7 .mat file ({exc})") from exc
    if "outs" not in contents:
        found = ", ".join(k for k in contents if not k.startswith("__")) or "none"
        raise StatsError(f"{path}: no variable 'outs' (found: {found}); expected vl_simplenn "
                         "outputs saved as save(file, 'input', 'outs')")
    try:
        outs = [np.asarray(x, np.float32) for x in np.asarray(contents["outs"]).reshape(-1)]
    except (TypeError, ValueError) as exc:
        raise StatsError(f"{path}: 'outs' must be a cell of numeric arrays ({exc})") from exc
    if len(outs) == layer_count + 1:
        image, outs = outs[0], outs[1:]  # res(1).x is the input itself
        image = np.asarray(contents.get("input", image), dtype=np.float32)
    elif len(outs) == layer_count and "input" in contents:
        image = np.asarray(contents["input"], dtype=np.float32)
    else:
        raise StatsError(
            f"{path}: 'outs' holds {len(outs)} arrays; the network has {layer_count} layers, so "
            f"expected {layer_count} (with 'input') or {layer_count + 1} (input first)"
        )
    if image.ndim == 2:
        image = image[..., np.newaxis]
    return image, outs


def compare_layers(
    net_path: str | Path, stats_path: str | Path, precision: str = "float32"
) -> Report:
    """Run the TF network on the stats image and compare every layer with MATLAB's output."""
    from netvlad_server.network import NetVLADNetwork, layer_plan  # TensorFlow only when used

    tensors, mat_layers = read_matconvnet(net_path)
    try:
        weights = NetVLADWeights(tensors=tensors, source=str(net_path), format="matconvnet")
    except WeightsError as exc:
        raise WeightsError(f"{net_path}: {exc}") from None
    plan = layer_plan()
    image, outs = read_stats(stats_path, len(plan))
    ours = NetVLADNetwork(weights, precision=precision).layer_outputs(image, subtract_mean=False)
    rows = []
    for i, (layer, (name, out), theirs) in enumerate(
        zip(mat_layers, ours, outs, strict=True), start=1
    ):
        mine = _align(i, name, theirs, to_matconvnet(name, out[0]))
        error = float(np.max(np.abs(mine.astype(np.float64) - theirs)))
        absolute = FINAL_MAX_ABS if i == len(plan) else LAYER_MAX_ABS
        threshold = layer_threshold(precision, absolute, theirs)
        rows.append(LayerResult(i, layer.name, layer.type, theirs.shape, error, threshold))
    final = np.ravel(ours[-1][1][0]).astype(np.float64) - np.ravel(outs[-1])
    # The final vector has unit length, so its relative limit is an absolute one.
    l2_limit = max(FINAL_L2, relative_limit(precision))
    return Report(rows=rows, final_l2=float(np.linalg.norm(final)), final_l2_threshold=l2_limit)


def _run(args: argparse.Namespace) -> int:
    """Print the comparison table; exit 0 if within thresholds, 1 if not, 2 if unusable input."""
    from netvlad_server.network import PRECISIONS, ImageShapeError

    if args.precision not in PRECISIONS:
        print(f"error: --precision must be one of {', '.join(PRECISIONS)}; got "
              f"{args.precision!r}", file=sys.stderr)
        return 2
    try:
        report = compare_layers(args.net, args.stats, precision=args.precision)
    except (StatsError, WeightsError, ImageShapeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"network: {args.net} ({args.precision})\nstats:   {args.stats}")
    print(report.table())
    return 0 if report.ok else 1


def register_compare_layers(subparsers: argparse._SubParsersAction) -> None:
    """Add `compare-layers NET.mat STATS.mat`."""
    parser = subparsers.add_parser(
        "compare-layers",
        help="compare every layer with MATLAB's vl_simplenn outputs (example_stats.mat)",
        description=(
            "Run the network from a structed MatConvNet .mat on the image saved in STATS.mat and "
            f"compare each layer with the saved outputs: max abs error < {LAYER_MAX_ABS:g} on "
            f"every layer, < {FINAL_MAX_ABS:g} on the final vector, L2 norm of the final "
            f"difference < {FINAL_L2:g}. With --precision bfloat16 or float16 each limit "
            f"widens to {RELATIVE_ROUNDOFFS:g} units of that precision's rounding relative to "
            "the layer's largest value, since rounding errors grow with the activations. "
            "Exit 0 pass, 1 past a threshold, 2 unusable input."
        ),
    )
    parser.add_argument("net", metavar="NET.mat",
                        help="structed MatConvNet NetVLAD model (net_class2struct.m output)")
    parser.add_argument("stats", metavar="STATS.mat",
                        help="vl_simplenn outputs: 'input' (mean-subtracted) and 'outs'")
    parser.add_argument("--precision", default="float32",
                        help="float32 (default), bfloat16 or float16 for the VGG convolutions")
    parser.set_defaults(handler=_run)
