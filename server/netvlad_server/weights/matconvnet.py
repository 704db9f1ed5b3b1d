"""Reading a structed MatConvNet NetVLAD model (net_class2struct.m output) into the 31 tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .schema import CONV_LAYERS, POOL_AFTER, WeightsError

_KNOWN_TYPES = frozenset({"conv", "relu", "pool", "normalize", "custom"})
_CUSTOM_NAMES = frozenset({"vlad_core", "postL2", "finalL2"})
_NORM_KAPPA_MAX = 1e-6  # MatConvNet's normalize is an L2 normalisation only for a tiny kappa


@dataclass(frozen=True)
class MatLayer:
    """One entry of `net.layers`, in file order, for layer-by-layer comparisons."""

    name: str
    type: str


def _expected_layers() -> list[tuple[str, str | None]]:
    """The released model's layer sequence as (type, name); None where any name is accepted."""
    sequence: list[tuple[str, str | None]] = []
    for conv in CONV_LAYERS:
        sequence.append(("conv", conv))
        if conv != CONV_LAYERS[-1]:  # conv5_3 feeds the descriptor without a ReLU
            sequence.append(("relu", None))
        if conv in POOL_AFTER:
            sequence.append(("pool", None))
    sequence += [
        ("normalize", None),  # preL2
        ("custom", "vlad_core"),
        ("normalize", None),  # intra-normalisation
        ("custom", "postL2"),
        ("conv", "WPCA"),
        ("custom", "finalL2"),
    ]
    return sequence


def _numbers(value: object) -> np.ndarray:
    """A MATLAB numeric field (scalar or vector after squeeze_me) as a flat float array."""
    return np.asarray(value, dtype=np.float64).reshape(-1)


def _cell(value: object) -> list:
    """A MATLAB cell array after squeeze_me (object array, or a lone squeezed item) as a list."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return list(value.reshape(-1))
    return [] if value is None else [value]


def _text(value: object) -> str:
    """A MATLAB char field as str (empty strings load as empty arrays)."""
    return value if isinstance(value, str) else ""


class _Reader:
    """Walks `net.layers` once, checking settings and collecting tensors and problems."""

    def __init__(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self.problems: list[str] = []

    def problem(self, index: int, layer: object, text: str) -> None:
        """Record a problem naming the layer by position, name and type."""
        name, kind = _text(getattr(layer, "name", "")), _text(getattr(layer, "type", ""))
        self.problems.append(f"layer {index + 1} '{name}' ({kind}): {text}")

    def setting(
        self, index: int, layer: object, field: str, default: float, allowed: float
    ) -> None:
        """Require every value of a numeric setting (absent = default) to equal `allowed`."""
        raw = getattr(layer, field, None)
        if raw is None or (isinstance(raw, np.ndarray) and raw.size == 0):
            values = np.array([default])
        else:
            try:
                values = _numbers(raw)
            except (TypeError, ValueError):
                self.problem(index, layer, f"{field} is not numeric ({raw!r})")
                return
        if not np.all(values == allowed):
            shown = values.tolist() if values.size > 1 else values.item()
            self.problem(index, layer, f"{field} = {shown}, expected {allowed:g}; not supported")

    def conv(self, index: int, layer: object, prefix: str, pad: int) -> None:
        """Check a conv layer (stride 1, given padding) and take its kernel and bias."""
        self.setting(index, layer, "pad", 0, pad)
        self.setting(index, layer, "stride", 1, 1)
        self.setting(index, layer, "dilate", 1, 1)
        weights = _cell(getattr(layer, "weights", None))
        if len(weights) != 2:
            self.problem(index, layer, f"expected weights {{kernel, bias}}, found {len(weights)}")
            return
        kernel, bias = (np.asarray(w) for w in weights)
        if prefix == "WPCA" and kernel.ndim == 2:
            kernel = kernel[None, None]  # squeezed [D*K, P] back to [1, 1, D*K, P]
        self.tensors[f"{prefix}/kernel"] = kernel
        self.tensors[f"{prefix}/bias"] = bias.reshape(-1)

    def pool(self, index: int, layer: object) -> None:
        """Require the VGG pooling: 2x2 max, stride 2, no padding."""
        method = _text(getattr(layer, "method", "max")) or "max"
        if method != "max":
            self.problem(index, layer, f"method = '{method}', expected 'max'; not supported")
        self.setting(index, layer, "pool", 2, 2)
        self.setting(index, layer, "stride", 1, 2)
        self.setting(index, layer, "pad", 0, 0)

    def normalize(self, index: int, layer: object) -> None:
        """Require a normalize layer that divides by the L2 norm over all channels."""
        try:
            param = _numbers(getattr(layer, "param", None))
        except (TypeError, ValueError):
            param = np.array([])
        if param.size != 4:
            self.problem(index, layer, "param must be [N kappa alpha beta]")
            return
        window, kappa, alpha, beta = param.tolist()
        dim = self.tensors.get("conv5_3/kernel")
        channels = int(dim.shape[-1]) if dim is not None and dim.ndim == 4 else 1
        is_l2 = alpha == 1 and beta == 0.5 and 0 <= kappa <= _NORM_KAPPA_MAX
        if not is_l2 or window < 2 * channels - 1:
            self.problem(
                index,
                layer,
                f"param = [{window:g} {kappa:g} {alpha:g} {beta:g}] is not an L2 normalisation "
                f"over {channels} channels (expected [N>={2 * channels - 1} kappa<=1e-6 1 0.5])",
            )

    def vlad_core(self, index: int, layer: object) -> None:
        """Take the D x K assignment weights and negated centres of the VLAD core."""
        weights = _cell(getattr(layer, "weights", None))
        if len(weights) != 2:
            self.problem(
                index, layer, f"expected weights {{assignment, centres}}, found {len(weights)}"
            )
            return
        assignment, centres = (np.asarray(w) for w in weights)  # D x K each
        if assignment.ndim != 2 or centres.shape != assignment.shape:
            self.problem(
                index,
                layer,
                f"expected two D x K matrices, got {list(assignment.shape)} and "
                f"{list(centres.shape)}",
            )
            return
        clusters = getattr(layer, "K", None)
        if clusters is not None and _numbers(clusters).tolist() != [assignment.shape[1]]:
            self.problem(index, layer, f"K = {clusters} but the weights hold {assignment.shape[1]}")
        dim, count = assignment.shape
        self.tensors["assignment/kernel"] = assignment.reshape(1, 1, dim, count)
        self.tensors["cluster_centers"] = centres.reshape(1, 1, 1, dim, count)  # already negated


def _load_net(path: Path) -> object:
    """Load `net` from a structed .mat, turning scipy's failures into specific errors."""
    import scipy.io  # a server dependency; loaded only when a .mat is read

    if not path.is_file():
        what = "is a directory" if path.is_dir() else "no such file"
        raise WeightsError(
            f"{path}: {what}; expected a structed MatConvNet NetVLAD model (net_class2struct.m "
            "output)"
        )
    try:
        contents = scipy.io.loadmat(path, struct_as_record=False, squeeze_me=True)
    except NotImplementedError as exc:
        raise WeightsError(
            f"{path}: MATLAB v7.3 (HDF5) .mat files are not supported; in MATLAB, save the "
            "structed net with save(file, 'net', '-v7')"
        ) from exc
    except (ValueError, TypeError, OSError, EOFError, scipy.io.matlab.MatReadError) as exc:
        raise WeightsError(
            f"{path}: not a readable MATLAB .mat file ({exc}); expected a structed MatConvNet "
            "NetVLAD model (net_class2struct.m output)"
        ) from exc
    net = contents.get("net")
    if net is None:
        found = ", ".join(k for k in contents if not k.startswith("__")) or "none"
        raise WeightsError(
            f"{path}: no variable 'net' (found: {found}); expected a structed MatConvNet "
            "NetVLAD model (net_class2struct.m output)"
        )
    if not hasattr(net, "layers"):
        raise WeightsError(
            f"{path}: 'net' has no plain 'layers' field; MATLAB class objects cannot be read, "
            "convert the model with net_class2struct.m first"
        )
    return net


def read_matconvnet(path: str | Path) -> tuple[dict[str, np.ndarray], list[MatLayer]]:
    """Read a structed MatConvNet .mat: the tensors (unchecked) and the layers in file order."""
    path = Path(path)
    net = _load_net(path)
    raw_layers = _cell(net.layers)
    reader = _Reader()
    layers: list[MatLayer] = []
    for index, layer in enumerate(raw_layers):
        if not hasattr(layer, "type"):
            raise WeightsError(
                f"{path}: layer {index + 1} is not a plain struct with a 'type'; MATLAB class "
                "objects cannot be read, convert the model with net_class2struct.m first"
            )
        layers.append(MatLayer(name=_text(getattr(layer, "name", "")), type=_text(layer.type)))

    expected = _expected_layers()
    conv_layers = iter(CONV_LAYERS)
    for index, (layer, info) in enumerate(zip(raw_layers, layers, strict=True)):
        if info.type not in _KNOWN_TYPES:
            reader.problem(index, layer, "unknown layer type; not part of the NetVLAD model")
            continue
        if info.type == "custom" and info.name not in _CUSTOM_NAMES:
            reader.problem(index, layer, "unknown custom layer; expected vlad_core/postL2/finalL2")
            continue
        if index >= len(expected):
            reader.problem(index, layer, "unexpected layer after finalL2")
            continue
        want_type, want_name = expected[index]
        if info.type != want_type or (want_name is not None and info.name != want_name):
            want = f"{want_type} '{want_name}'" if want_name else want_type
            reader.problem(index, layer, f"expected a {want} layer at this position")
            break  # the rest of the list no longer lines up with the model
        if info.type == "conv":
            name = "WPCA" if info.name == "WPCA" else next(conv_layers)
            reader.conv(index, layer, name, pad=0 if name == "WPCA" else 1)
        elif info.type == "relu":
            reader.setting(index, layer, "leak", 0, 0)
        elif info.type == "pool":
            reader.pool(index, layer)
        elif info.type == "normalize":
            reader.normalize(index, layer)
        elif info.name == "vlad_core":
            reader.vlad_core(index, layer)
    else:
        if len(raw_layers) < len(expected):
            missing = ", ".join(f"{t} {n or ''}".strip() for t, n in expected[len(raw_layers) :])
            reader.problems.append(f"the layer list ends early; missing: {missing}")

    try:
        average = np.asarray(net.meta.normalization.averageImage)
    except AttributeError:
        reader.problems.append("no net.meta.normalization.averageImage (the mean colour)")
    else:
        reader.tensors["average_rgb"] = average.reshape(-1) if average.size == 3 else average
    if reader.problems:
        raise WeightsError(
            f"{path}: cannot read this MatConvNet model:\n  - " + "\n  - ".join(reader.problems)
        )
    return reader.tensors, layers
