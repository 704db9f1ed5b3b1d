"""`netvlad-models`: inspect and convert NetVLAD weight files (more subcommands plug in below)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from netvlad_client import __version__
from netvlad_client.formats import silence_closed_stdout
from netvlad_client.options import Option, add_options, parse_args

from netvlad_server.weights import (
    SCOPE,
    TENSOR_NAMES,
    NetVLADWeights,
    WeightsError,
    check_export_path,
    load_weights,
    save_export,
)

# Each entry "module:function" names a register(subparsers) function that adds one subcommand
# and sets `handler=<callable taking the parsed args, returning an exit code>` as its default.
# Add a subcommand by adding one line here.
SUBCOMMANDS: tuple[str, ...] = (
    "netvlad_server.models_cli:register_inspect",
    "netvlad_server.models_cli:register_convert",
    "netvlad_server.fetch:register_fetch",
    "netvlad_server.layercheck:register_compare_layers",
    "netvlad_server.tflite:register_export",
)

_FORMAT_NAMES = {
    "tf1-checkpoint": "TensorFlow 1 name-based checkpoint (netvlad_tf)",
    "matconvnet": "structed MatConvNet .mat",
    "npz": "netvlad-service export (.npz)",
    "demo": "demo weights (random, meaningless)",
}


def _size(nbytes: int) -> str:
    """Bytes as MB, or kB for the tiny test models."""
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 100_000 else f"{nbytes / 1e3:.1f} kB"


def describe(weights: NetVLADWeights) -> str:
    """A human-readable report: format, every tensor with its scoped name, and the architecture."""
    lines = [
        f"source:  {weights.source}",
        f"name:    {weights.name}",
        f"format:  {_FORMAT_NAMES.get(weights.format, weights.format)}",
        f"tensors: {len(weights.tensors)}",
    ]
    width = max(len(f"{SCOPE}/{name}") for name in weights.tensors)
    for name in TENSOR_NAMES:
        tensor = weights.tensors[name]
        shape = "[" + ", ".join(str(d) for d in tensor.shape) + "]"
        lines.append(f"  {f'{SCOPE}/{name}':<{width}}  {shape:<22} {tensor.dtype}")
    channels = weights.conv_channels
    lines += [
        "architecture:",
        f"  VGG16 conv channels:  {' '.join(str(c) for c in channels)}",
        f"  cluster dim D:        {weights.cluster_dim}",
        f"  clusters K:           {weights.num_clusters}",
        f"  VLAD dim D*K:         {weights.vlad_dim}",
        f"  output dims (WPCA):   {weights.output_dims}",
        f"  parameters:           {weights.parameter_count:,} ({_size(weights.nbytes)} as float32)",
    ]
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    """Print what a weight file holds."""
    print(describe(load_weights(args.path)))
    return 0


def register_inspect(subparsers: argparse._SubParsersAction) -> None:
    """Add `inspect PATH`."""
    parser = subparsers.add_parser(
        "inspect",
        help="show the format, tensors and architecture of a weight file",
        description="Load and validate a weight file, then list its tensors and architecture.",
    )
    parser.add_argument(
        "path", help="checkpoint prefix, its directory, the official .zip, a .mat, a .npz or demo"
    )
    parser.set_defaults(handler=_inspect)


def _convert(args: argparse.Namespace) -> int:
    """Convert any readable weights to the project's .npz export."""
    destination = check_export_path(args.dst)
    if destination.exists() and not args.force:
        print(f"error: {args.dst} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    weights = load_weights(args.src)
    save_export(weights, destination)
    size = _size(destination.stat().st_size)
    print(f"wrote {args.dst} ({size}, {weights.output_dims}-D output) from {args.src}")
    return 0


CONVERT_OPTIONS: tuple[Option, ...] = (
    Option(("--force",), "overwrite DST if it exists", default=False, kind="switch"),
)


def register_convert(subparsers: argparse._SubParsersAction) -> None:
    """Add `convert SRC DST`."""
    parser = subparsers.add_parser(
        "convert",
        help="convert a checkpoint, zip or .mat to the single-file .npz export",
        description="Read SRC (any supported format), validate it and write DST (.npz) atomically.",
    )
    parser.add_argument("src", help="weights to read (any format `inspect` accepts)")
    parser.add_argument("dst", help="the .npz file to write")
    add_options(parser, CONVERT_OPTIONS)
    parser.set_defaults(handler=_convert)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="netvlad-models", description="Inspect, convert and check NetVLAD weight files."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in SUBCOMMANDS:
        module, _, function = entry.partition(":")
        getattr(importlib.import_module(module), function)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; weight and file problems print as `error: ...` with exit code 1."""
    args = parse_args(build_parser(), argv)
    try:
        return int(args.handler(args))
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error of ours
        silence_closed_stdout()
        return 0
    except (WeightsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
