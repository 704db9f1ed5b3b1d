"""`.tflite` models of the network: TensorFlow's converter writes them, LiteRT runs them.

Two uses (docs/INT8.md): the server's int8 path converts the convolutions only (images to
conv5_3) and runs them with LiteRT; `netvlad-models export` converts the whole network (images to
the final descriptor) into one file for a robot's own CPU. Either way the input is RGB pixels
0..255 with the mean subtraction inside the model. In an int8 export the layers after conv5_3
(normalisations, NetVLAD, whitening) stay float32: they are a small share of the time and most
of the rounding error would come from them.

The server's int8 path also runs the whitening (a D*K x P matrix) in LiteRT, as a model this
module writes directly (no converter): int8 weights in two levels, so that the result matches
float32's to about 1e-4 while reading half the float32 matrix's bytes (docs/INT8.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
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


WHITENING_LEVELS = 2  # int8 terms per weight: W ~ Q1 * s1 + Q2 * s2, per output column
WHITENING_BLOCK = 256  # output columns quantized at a time (bounds the temporary memory)


def whitening_levels(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights [2, P, N] and scales [2, P] of a float matrix [N, P]: two levels per column.

    The first level rounds each column to int8 with its own scale, the second rounds what the
    first left over, so Q1 * s1 + Q2 * s2 is within 1/64516 of the column's largest value.
    Built WHITENING_BLOCK columns at a time (bounded temporary memory).
    """
    inputs, outputs = matrix.shape
    weights = np.empty((WHITENING_LEVELS, outputs, inputs), np.int8)
    scales = np.empty((WHITENING_LEVELS, outputs), np.float32)
    for start in range(0, outputs, WHITENING_BLOCK):
        columns = slice(start, start + WHITENING_BLOCK)
        rest = np.array(matrix[:, columns], np.float32)
        for level in range(WHITENING_LEVELS):
            scale = np.abs(rest).max(axis=0) / 127
            scale[scale == 0] = 1.0
            rounded = np.clip(np.rint(rest / scale), -127, 127)
            rest -= rounded * scale
            weights[level, columns] = rounded.T
            scales[level, columns] = scale
    return weights, scales


def whitening_model(matrix: np.ndarray) -> bytes:
    """A .tflite model of the product x @ matrix in int8, two hybrid FULLY_CONNECTED operators.

    Inputs `rows` [2B, N] (split_rows: each row rounded as LiteRT rounds it, then the rest) and
    `rounded` [B, N] (the first half again); outputs `coarse` = rows @ level 1 [2B, P] and
    `fine` = rounded @ level 2 [B, P]. The sum of coarse's halves and fine is x @ matrix but
    for the rest's product with level 2 (about 1e-4 of it), left out. int8 weights per output
    column (whitening_levels), input rows quantized per row by the runtime. Written with
    LiteRT's flatbuffer schema: TensorFlow's converter needs minutes and gigabytes for a
    0.5 GB matrix.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    weights, scales = whitening_levels(matrix)
    levels, outputs, inputs = weights.shape
    builder = flatbuffers.Builder(weights.nbytes + 32 * outputs + (1 << 20))  # never regrown
    data = []
    for level in range(levels):  # written in place: no temporary copy
        builder.StartVector(1, weights[level].size, 16)
        builder.head -= weights[level].size
        builder.Bytes[builder.head:builder.head + weights[level].size] = \
            memoryview(weights[level]).cast("B")
        builder.vectorNumElems = weights[level].size
        data.append(builder.EndVector())
    del weights

    def tensor(name: str, kind: int, shape: list[int], buffer: int = 0,
               scale: np.ndarray | None = None) -> Any:
        made = schema.TensorT()
        made.name, made.type, made.buffer = name, kind, buffer
        made.shape = np.array(shape, np.int32)
        if buffer == 0:  # an activation: the batch axis is open
            made.shapeSignature = np.array([-1, *shape[1:]], np.int32)
        if scale is not None:
            made.quantization = schema.QuantizationParametersT()
            made.quantization.scale = scale
            made.quantization.zeroPoint = np.zeros(len(scale), np.int64)
            made.quantization.quantizedDimension = 0
        return made

    def fully_connected(source: int, weight: int, target: int) -> Any:
        operator = schema.OperatorT()
        operator.opcodeIndex = 0
        operator.inputs = np.array([source, weight, -1], np.int32)  # no bias: added afterwards
        operator.outputs = np.array([target], np.int32)
        operator.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
        operator.builtinOptions = schema.FullyConnectedOptionsT()
        operator.builtinOptions.asymmetricQuantizeInputs = True
        return operator

    float32, int8 = schema.TensorType.FLOAT32, schema.TensorType.INT8
    graph = schema.SubGraphT()
    graph.name = "whitening"
    graph.tensors = [tensor("rows", float32, [2, inputs]),
                     tensor("level1", int8, [outputs, inputs], 1, scales[0]),
                     tensor("coarse", float32, [2, outputs]),
                     tensor("rounded", float32, [1, inputs]),
                     tensor("level2", int8, [outputs, inputs], 2, scales[1]),
                     tensor("fine", float32, [1, outputs])]
    graph.inputs, graph.outputs = np.array([0, 3], np.int32), np.array([2, 5], np.int32)
    graph.operators = [fully_connected(0, 1, 2), fully_connected(3, 4, 5)]
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.FULLY_CONNECTED
    code.version = 12  # per-channel hybrid weights
    model = schema.ModelT()
    model.version, model.description = 3, "netvlad-service whitening"
    model.operatorCodes, model.subgraphs = [code], [graph]
    model.buffers = [schema.BufferT(), *(_Written(offset) for offset in data)]
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(memoryview(builder.Bytes)[builder.Head():])


class _Written:
    """A model buffer whose bytes are already in the flatbuffer builder (at `offset`)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def Pack(self, builder: Any) -> int:  # the name ModelT.Pack calls
        """The buffer table pointing at the written bytes."""
        from ai_edge_litert import schema_py_generated as schema

        schema.BufferStart(builder)
        schema.BufferAddData(builder, self.offset)
        return schema.BufferEnd(builder)


def split_rows(rows: np.ndarray) -> np.ndarray:
    """[2B, N]: each float32 row rounded to 255 levels as LiteRT quantizes it, then the rest.

    The runtime quantizes every input row to int8 between min(row, 0) and max(row, 0);
    given the rounded row it reproduces it exactly, and the rest is 1/255 of the row's range
    at most, so the sum of the two rows' products is the float row's to about 1e-4.
    """
    low = np.minimum(rows.min(axis=1, keepdims=True), 0.0)
    high = np.maximum(rows.max(axis=1, keepdims=True), 0.0)
    scale = 255.0 / np.where(high > low, high - low, 1.0)
    from_low, from_high = -128.0 - low * scale, 127.0 - high * scale
    zero = np.rint(np.clip(np.where(from_low + from_high > 0, from_low, from_high), -128, 127))
    rounded = ((np.clip(np.rint(rows * scale) + zero, -128, 127) - zero) / scale)
    rounded = rounded.astype(np.float32)
    return np.concatenate([rounded, rows - rounded])


class WhiteningRunner:
    """The whitening x @ W + b of float32 rows in int8 on LiteRT, float32's result to ~1e-4.

    Faster than float32 at small batches, where the float32 product only streams its matrix
    from memory (each int8 level is a quarter of the bytes); see docs/INT8.md. Until
    release_float32(), `float32` computes the exact product from the caller's matrix (a view,
    no copy) for the start-up check.
    """

    def __init__(self, matrix: np.ndarray, bias: np.ndarray, threads: int | None = None) -> None:
        """matrix [N, P] float32, bias [P]; threads None: one per core this process may use."""
        self._matrix: np.ndarray | None = matrix
        self.outputs = int(matrix.shape[1])
        self._bias = np.asarray(bias, np.float32).reshape(self.outputs)
        self._interpreter = interpreter_class()(model_content=whitening_model(matrix),
                                                num_threads=threads or default_threads())
        self._tensors = {detail["name"]: detail["index"] for detail in
                         self._interpreter.get_input_details()
                         + self._interpreter.get_output_details()}
        self._batch = 0
        self._lock = threading.Lock()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """x @ W + b for rows [B, N] (float32), as float32 [B, P]."""
        rows = np.asarray(rows, np.float32)
        batch, index = len(rows), self._tensors
        split = split_rows(rows)
        with self._lock:
            if batch != self._batch:
                self._interpreter.resize_tensor_input(index["rows"], list(split.shape))
                self._interpreter.resize_tensor_input(index["rounded"], list(rows.shape))
                self._interpreter.allocate_tensors()
                self._batch = batch
            self._interpreter.set_tensor(index["rows"], split)
            self._interpreter.set_tensor(index["rounded"], split[:batch])
            self._interpreter.invoke()
            coarse = self._interpreter.get_tensor(index["coarse"])
            fine = self._interpreter.get_tensor(index["fine"])
            return coarse[:batch] + coarse[batch:] + fine + self._bias

    def float32(self, rows: np.ndarray) -> np.ndarray:
        """x @ W + b in float32 (numpy): the yardstick of the start-up check."""
        if self._matrix is None:
            raise RuntimeError("WhiteningRunner.float32: the float32 matrix was released")
        return np.asarray(rows, np.float32) @ self._matrix.astype(np.float32, copy=False) + \
            self._bias

    def release_float32(self) -> None:
        """Drop the reference to the float32 matrix (serving never needs it)."""
        self._matrix = None


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
