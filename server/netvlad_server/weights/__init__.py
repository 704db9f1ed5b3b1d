"""Reading NetVLAD weights from every format users have into one validated set of tensors."""

from .demo import demo_weights
from .export import check_export_path, save_export
from .loader import load_weights
from .matconvnet import MatLayer, read_matconvnet
from .schema import (
    CONV_LAYERS,
    POOL_AFTER,
    SCOPE,
    TENSOR_NAMES,
    NetVLADWeights,
    WeightsError,
    check_tensors,
)

__all__ = [
    "CONV_LAYERS",
    "POOL_AFTER",
    "SCOPE",
    "TENSOR_NAMES",
    "MatLayer",
    "NetVLADWeights",
    "WeightsError",
    "check_export_path",
    "check_tensors",
    "demo_weights",
    "load_weights",
    "read_matconvnet",
    "save_export",
]
