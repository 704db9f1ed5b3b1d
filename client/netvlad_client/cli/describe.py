"""`netvlad-client describe`: images and folders in, one (N, D) float32 file out in input order.

Without --out (or with --out -) the descriptors go to standard output: JSON lines by default, or
--format csv|npy|npz|bin for a pipe.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from netvlad_client import NetVLADInputError
from netvlad_client.cli.bulk import BulkSettings, checkpoint_for, describe_rows
from netvlad_client.cli.common import (
    IMAGE_EXTENSIONS,
    client_from_args,
    concurrency_option,
    image_files,
    progress_option,
    resize_setting,
)
from netvlad_client.formats import (
    FORMATS,
    NAMES,
    format_of,
    silence_closed_stdout,
    write_descriptors,
    write_stream,
)
from netvlad_client.options import Option, add_options, choice, positive_int
from netvlad_client.rowstore import Checkpoint, RowFile

OPTIONS: tuple[Option, ...] = (
    Option(("--out", "-o"), f"output file: {' '.join('.' + name for name in NAMES)} "
           "(default, or '-': standard output)"),
    Option(("--format",), "output format (default: from --out; json on standard output)",
           convert=choice(NAMES), choices=NAMES),
    Option(("--dims",), "keep the first N dimensions, re-normalised", convert=positive_int,
           shown_default="all"),
    Option(("--resize",), "'keep', or N (or fit:N) to fit the longest side to N px",
           convert=resize_setting, shown_default="the server's policy"),
    Option(("--batch-size",), "images per request", convert=positive_int,
           shown_default="the server's max batch size"),
    concurrency_option("requests in flight at once"),
    Option(("--resume",), "checkpoint finished requests in OUT.partial/ and reuse them when run "
           "again after an interruption", default=False, kind="switch"),
    Option(("--recursive", "-r"), "also take images from sub-folders", default=False,
           kind="switch"),
    progress_option("progress bar on stderr (auto: on a terminal, for many files)"),
)


def register(subparsers: Any) -> None:
    """Add `describe IMG|DIR... [options]`."""
    parser = subparsers.add_parser(
        "describe", help="describe images and folders into one descriptor file",
        description=f"Describe images (files, or folders of {' '.join(IMAGE_EXTENSIONS)} files, "
                    "sorted) and write an (N, D) float32 array in input order.",
    )
    parser.add_argument("images", nargs="+", metavar="IMG|DIR", help="image files and folders")
    add_options(parser, OPTIONS)
    parser.set_defaults(func=run)


def _destination(args: argparse.Namespace) -> tuple[Path | None, str]:
    """The output file (None: standard output) and its format, or NetVLADInputError."""
    if args.out in (None, "-"):
        if args.resume:
            raise NetVLADInputError("--resume keeps its work next to the output file; pass "
                                    "--out FILE with it")
        fmt = args.format or "json"
        if FORMATS[fmt].binary and sys.stdout.isatty():
            raise NetVLADInputError(f"will not write binary .{fmt} to a terminal; pass --out "
                                    "FILE or redirect standard output")
        return None, fmt
    out = Path(args.out)
    fmt = format_of(out, args.format, missing="npy")
    named = out.suffix.lower().lstrip(".")
    if named in FORMATS and named != fmt:
        print(f"note: writing {fmt} (--format) into {out}, whose name says {named}",
              file=sys.stderr)
    if not out.parent.is_dir():
        raise NetVLADInputError(f"the output directory {out.parent} does not exist")
    return out, fmt


def run(args: argparse.Namespace) -> int:
    """Describe the images into the output; the exit status."""
    out, fmt = _destination(args)
    names = [str(path) for path in image_files(args.images, recursive=args.recursive)]
    with client_from_args(args) as client:
        info = client.info()
        dims = args.dims or info.output_dims
        if dims > info.output_dims:
            raise NetVLADInputError(
                f"--dims {dims} is more than the model's {info.output_dims} output dimensions"
            )
        checkpoint = checkpoint_for(out, info, dims, args.resize) if out is not None else None
        if not args.resume and checkpoint is not None:
            if checkpoint.directory.exists():
                print(f"note: {checkpoint.directory} holds work of an interrupted run; pass "
                      "--resume to reuse it", file=sys.stderr)
            checkpoint = None
        unique = list(dict.fromkeys(names))
        # Rows go straight into the output file when it is .npy/.bin and every name is distinct.
        in_place = (out is not None and fmt in RowFile.IN_PLACE_FORMATS
                    and len(unique) == len(names))
        rows = RowFile(unique, dims, output=out if in_place else None, fmt=fmt,
                       scratch_dir=out.parent if out is not None else None)
        settings = BulkSettings(
            batch_size=args.batch_size, concurrency=args.concurrency, resize=args.resize,
            progress=args.progress, resume_hint="pass --resume to keep finished work across runs",
        )
        try:
            stopped = describe_rows(client, info, rows, settings, checkpoint)
            if stopped is not None:
                return stopped
            return _write_output(rows, names, out, fmt, checkpoint)
        finally:
            rows.discard()


def _write_output(rows: RowFile, names: list[str], out: Path | None, fmt: str,
                  checkpoint: Checkpoint | None) -> int:
    """Write the filled rows in input order (to `out` or standard output); the exit status."""
    if len(names) == len(rows.names):
        descriptors = rows.rows  # input order already; memory-mapped, not copied
    else:  # a file named twice gets its row twice
        descriptors = rows.rows[[rows.index(name) for name in names]]
    shape = f"{descriptors.shape[0]} x {descriptors.shape[1]}"
    if out is None:
        if not write_stdout(fmt, descriptors, names):
            print(f"netvlad-client: standard output was closed by its reader before all {shape} "
                  f"descriptors ({fmt}) were written", file=sys.stderr)
            return 0
        where = "standard output"
    else:
        if rows.in_place:
            del descriptors
            rows.finish(out)
        else:
            write_descriptors(out, fmt, descriptors, names)
        where = str(out)
    if checkpoint is not None:
        checkpoint.remove()
    print(f"wrote {shape} descriptors to {where} ({fmt})", file=sys.stderr)
    return 0


class _StreamWriter:
    """write() and flush() only: NumPy then writes .npy through it rather than straight to the
    file descriptor, so a closed pipe surfaces as BrokenPipeError, not a short-write OSError."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write(self, data: bytes) -> int:
        return self._stream.write(data)

    def flush(self) -> None:
        self._stream.flush()


def write_stdout(fmt: str, descriptors: np.ndarray, names: Sequence[str]) -> bool:
    """Descriptors to standard output; False when the reader stopped early (`| head`)."""
    stream = sys.stdout.buffer
    try:
        write_stream(_StreamWriter(stream) if fmt == "npy" else stream, fmt, descriptors, names)
        stream.flush()
    except BrokenPipeError:
        silence_closed_stdout()
        return False
    return True
