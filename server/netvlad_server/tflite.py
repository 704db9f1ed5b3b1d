"""`.tflite` models of the network: TensorFlow's converter writes them, LiteRT runs them.

Two uses (docs/INT8.md): the server's int8 path converts the convolutions only (images to
conv5_3) and runs them with LiteRT; `netvlad-models export` converts the whole network (images to
the final descriptor) into one file for a robot's own CPU. Either way the input is RGB pixels
0..255 with the mean subtraction inside the model. In an int8 export the layers after conv5_3
(normalisations, NetVLAD, whitening) stay float32: they are a small share of the time and most
of the rounding error would come from them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from netvlad_server.calibration import CalibrationError, CalibrationSet, calibration_set
from netvlad_server.config import NETWORK_MIN_SIDE as MIN_SIDE

if TYPE_CHECKING:
    from netvlad_server.network import NetVLADNetwork

EXPORT_PRECISIONS = ("float32", "float16", "int8")
FEATURES_LAYER = "conv5_3"  # the int8 server model's output
OUTPUT_LAYER = "finalL2"
# Operator types after conv5_3 that an int8 export keeps in float32.
FLOAT_TAIL_OPS = ("L2_NORMALIZATION", "FULLY_CONNECTED", "BATCH_MATMUL", "SOFTMAX", "SUM", "MUL",
                  "RSQRT", "SQRT", "MAXIMUM", "DIV", "ADD", "RESHAPE", "SQUARE", "MEAN",
                  "TRANSPOSE", "STRIDED_SLICE")
LITERT_MISSING = ("int8 and .tflite models run with LiteRT, which is not installed: "
                  "pip install 'netvlad-service[int8]' (the ai-edge-litert package)")


def default_threads() -> int:
    """The cores this process may use: LiteRT's own default is a single thread."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def interpreter_class() -> type:
    """LiteRT's Interpreter (ai-edge-litert), or a RuntimeError saying how to install it."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise RuntimeError(LITERT_MISSING) from exc
    return Interpreter


def parse_size(text: str) -> tuple[int, int]:
    """HEIGHTxWIDTH, both sides at least the network's minimum."""
    height, sep, width = text.strip().lower().partition("x")
    if not (sep and height.isdigit() and width.isdigit()):
        raise argparse.ArgumentTypeError(f"size {text!r}: expected HEIGHTxWIDTH, e.g. 480x640")
    size = (int(height), int(width))
    if min(size) < MIN_SIDE:
        raise argparse.ArgumentTypeError(
            f"size {text!r}: both sides must be at least {MIN_SIDE} pixels (four 2x2 poolings "
            "must leave one pixel)")
    return size


def _samples(calibration: CalibrationSet, size: tuple[int, int] | None) -> Any:
    """The converter's representative dataset: each image alone, resized to `size` if fixed."""
    import cv2

    def generate() -> Any:
        for image in calibration.images:
            if size is not None and image.shape[:2] != size:
                image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
            yield [image[np.newaxis]]

    return generate


def convert(network: NetVLADNetwork, precision: str, calibration: CalibrationSet | None = None,
            size: tuple[int, int] | None = None, last: str = OUTPUT_LAYER) -> bytes:
    """A .tflite model of `network` (float32) from uint8 images [1, H, W, 3] to layer `last`.

    size None leaves H and W open (the runner resizes the input); int8 needs `calibration`.
    """
    import tensorflow as tf

    if precision not in EXPORT_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(EXPORT_PRECISIONS)}; "
                         f"got {precision!r}")
    if precision == "int8" and calibration is None:
        raise ValueError("int8 conversion needs calibration images")
    height, width = size or (None, None)
    layer = network.layer_function(last)
    function = tf.function(lambda x: layer(tf.cast(x, tf.float32)), input_signature=[
        tf.TensorSpec([1, height, width, 3], tf.uint8, name="image")])

    def converter() -> tf.lite.TFLiteConverter:
        made = tf.lite.TFLiteConverter.from_concrete_functions(
            [function.get_concrete_function()], network)
        if precision != "float32":
            made.optimizations = [tf.lite.Optimize.DEFAULT]
        if precision == "float16":
            made.target_spec.supported_types = [tf.float16]
        if precision == "int8":
            made.representative_dataset = _samples(calibration, size)
        return made

    if precision != "int8" or last == FEATURES_LAYER:
        return converter().convert()
    one = CalibrationSet(calibration.images[:1], calibration.source, calibration.digest)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter(), debug_dataset=_samples(one, size),
        debug_options=tf.lite.experimental.QuantizationDebugOptions(
            denylisted_ops=list(FLOAT_TAIL_OPS)))
    return debugger.get_nondebug_quantized_model()


class TFLiteRunner:
    """One LiteRT interpreter of a .tflite model, re-prepared when the input shape changes."""

    def __init__(self, content: bytes, threads: int | None = None) -> None:
        """threads None: one per core this process may use."""
        self._interpreter = interpreter_class()(model_content=content,
                                                num_threads=threads or default_threads())
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self._shape: tuple[int, ...] | None = None

    @property
    def input_dtype(self) -> type:
        """The pixel type the model takes (uint8 for the models this module writes)."""
        return self._input["dtype"]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Run one input [1, H, W, 3]; returns a copy of the output."""
        shape = tuple(image.shape)
        if shape != self._shape:
            self._interpreter.resize_tensor_input(self._input["index"], list(shape))
            self._interpreter.allocate_tensors()
            self._shape = shape
        self._interpreter.set_tensor(self._input["index"], image.astype(self.input_dtype))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output["index"]).copy()


def export(model: str, destination: Path, precision: str, calibration: str | None,
           size: tuple[int, int] | None) -> tuple[int, int]:
    """Write the whole network of `model` as a .tflite file; (bytes, output dims)."""
    from netvlad_server.network import NetVLADNetwork
    from netvlad_server.weights import load_weights

    calibrated = calibration_set(calibration) if precision == "int8" else None
    network = NetVLADNetwork(load_weights(model), "float32")
    content = convert(network, precision, calibrated, size)
    runner = TFLiteRunner(content)  # refuse to write a file LiteRT cannot run
    probe = (size or (64, 64)) + (3,)
    runner(np.zeros((1, *probe), np.uint8))
    temporary = destination.with_name(f".{destination.name}.tmp")
    temporary.write_bytes(content)
    temporary.replace(destination)
    return len(content), network.output_dims


def _export(args: argparse.Namespace) -> int:
    """`export`: check the destination, convert, write."""
    destination = Path(args.dst)
    if destination.suffix.lower() != ".tflite":
        print(f"error: {args.dst}: the file name must end in .tflite", file=sys.stderr)
        return 1
    if not destination.parent.is_dir():
        print(f"error: {args.dst}: folder {destination.parent} does not exist", file=sys.stderr)
        return 1
    if destination.exists() and not args.force:
        print(f"error: {args.dst} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    if args.calibration and args.precision != "int8":
        print("error: --calibration is for --precision int8 only", file=sys.stderr)
        return 1
    try:
        nbytes, dims = export(args.src, destination, args.precision, args.calibration, args.size)
    except (CalibrationError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    shape = "1xHxWx3 (any H, W)" if args.size is None else f"1x{args.size[0]}x{args.size[1]}x3"
    shown = f"{nbytes / 1e6:.1f} MB" if nbytes >= 100_000 else f"{nbytes / 1e3:.1f} kB"
    print(f"wrote {args.dst} ({shown}, {args.precision}): uint8 RGB {shape} in, "
          f"float32 1x{dims} descriptor out (docs/INT8.md)")
    return 0


def register_export(subparsers: argparse._SubParsersAction) -> None:
    """Add `export SRC DST --format tflite --precision P [--calibration DIR] [--size HxW]`."""
    from netvlad_client.options import Option, add_options, choice

    parser = subparsers.add_parser(
        "export", help="write the network as a .tflite file for LiteRT (robots, phones)",
        description="Convert SRC (any weights `inspect` accepts) into one .tflite file: uint8 RGB "
                    "in, the unit-length descriptor out, mean subtraction inside (docs/INT8.md).")
    parser.add_argument("src", help="weights to read (any format `inspect` accepts, or demo)")
    parser.add_argument("dst", help="the .tflite file to write")
    add_options(parser, (
        Option(("--format",), "file format to write", default="tflite",
               convert=choice(("tflite",)), choices=("tflite",)),
        Option(("--precision",), "precision of the convolutions (int8: calibrated, layers after "
               "conv5_3 stay float32; float16: weights stored in half precision)",
               default="float32", convert=choice(EXPORT_PRECISIONS, str.lower),
               choices=EXPORT_PRECISIONS),
        Option(("--calibration",), "folder of images like those the model will see, for int8 "
               "(default: the built-in generated scenes)", default=None, metavar="DIR"),
        Option(("--size",), "fixed input size HEIGHTxWIDTH (default: any size; the runner "
               "resizes the input)", default=None, convert=parse_size, metavar="HxW"),
        Option(("--force",), "overwrite DST if it exists", default=False, kind="switch"),
    ))
    parser.set_defaults(handler=_export)
