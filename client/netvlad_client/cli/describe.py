"""`netvlad-client describe`: images and folders in, one (N, D) float32 file out in input order.

Without --out (or with --out -) the descriptors go to standard output: JSON lines by default, or
--format csv|npy|npz|bin for a pipe. There, rows leave in input order as soon as they are ready
(npz, and npy with --on-error skip, whose header needs the final count, at the end), and a
reader that stops early (`| head`) stops the run at the first write it refuses.

Beside an output file that carries no names (.npy, .csv, .bin), OUT.paths.txt lists the image
of each row; with --on-error skip, OUT.skipped.tsv lists the images left out and why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from netvlad_client import NetVLADInputError
from netvlad_client.cli.bulk import (
    BulkSettings,
    OutputClosed,
    checkpoint_for,
    describe_rows,
    on_error_option,
    write_skipped,
)
from netvlad_client.cli.common import (
    IMAGE_EXTENSIONS,
    client_from_args,
    concurrency_option,
    dims_setting,
    image_files,
    progress_option,
    resize_setting,
    say,
)
from netvlad_client.formats import (
    FORMATS,
    NAMES,
    RowStream,
    atomic_write,
    format_of,
    silence_closed_stdout,
    write_descriptors,
    write_stream,
)
from netvlad_client.options import Option, add_options, choice, positive_int
from netvlad_client.rowstore import Checkpoint, RowFile, remove_stale_temporaries

OPTIONS: tuple[Option, ...] = (
    Option(("--out", "-o"), f"output file: {' '.join('.' + name for name in NAMES)} "
           "(default, or '-': standard output)"),
    Option(("--format",), "output format (default: from --out; json on standard output)",
           convert=choice(NAMES), choices=NAMES),
    Option(("--dims",), "keep the first N dimensions, re-normalised; 0 or 'all' for every one",
           convert=dims_setting, shown_default="all"),
    Option(("--resize",), "'keep', or N (or fit:N) to fit the longest side to N px",
           convert=resize_setting, shown_default="the server's policy"),
    Option(("--batch-size",), "images per request", convert=positive_int,
           shown_default="the server's max batch size"),
    concurrency_option("requests in flight at once"),
    Option(("--resume",), "checkpoint finished requests in OUT.partial/ and reuse them when run "
           "again after an interruption", default=False, kind="switch"),
    Option(("--recursive", "-r"), "also take images from sub-folders", default=False,
           kind="switch"),
    on_error_option(),
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
    """The output file (None: standard output) and its format, or NetVLADInputError.

    Everything that would stop the write at the end is refused here, before any work.
    """
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
    if out.is_dir():
        raise NetVLADInputError(f"--out {out} is a directory; name a file to write, e.g. "
                                f"--out {out / 'descriptors.npy'}")
    fmt = format_of(out, args.format, missing="npy")
    named = out.suffix.lower().lstrip(".")
    if named in FORMATS and named != fmt:
        say(f"note: writing {fmt} (--format) into {out}, whose name says {named}")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise NetVLADInputError(f"--out {out}: {parent} is a file, not a directory")
    if not parent.exists():
        raise NetVLADInputError(f"the output directory {parent} does not exist")
    return out, fmt


def sidecar(out: Path, kind: str) -> Path:
    """A file written beside the output: OUT.paths.txt, OUT.skipped.tsv."""
    return out.with_name(f"{out.name}.{kind}")


def run(args: argparse.Namespace) -> int:
    """Describe the images into the output; the exit status."""
    out, fmt = _destination(args)
    names = [str(path) for path in image_files(args.images, recursive=args.recursive)]
    positions: dict[str, int] = {}
    for position, name in enumerate(names):
        positions.setdefault(name, position)
    skip = args.on_error == "skip"
    with client_from_args(args) as client:
        info = client.info()
        dims = args.dims or info.output_dims
        if dims > info.output_dims:
            raise NetVLADInputError(
                f"--dims {dims} is more than the model's {info.output_dims} output dimensions"
            )
        if out is not None:
            stale = remove_stale_temporaries(out)
            if stale:
                say(f"note: removed {len(stale)} temporary file(s) of a run that was killed: "
                    + ", ".join(str(path) for path in stale))
        checkpoint = checkpoint_for(out, info, dims, args.resize) if out is not None else None
        if not args.resume and checkpoint is not None:
            if checkpoint.directory.exists():
                say(f"note: {checkpoint.directory} holds work of an interrupted run; pass "
                    "--resume to reuse it")
            checkpoint = None
        unique = list(positions)
        # Rows go straight into the output file when it is .npy/.bin and every name is distinct.
        in_place = (out is not None and fmt in RowFile.IN_PLACE_FORMATS
                    and len(unique) == len(names))
        rows = RowFile(unique, dims, output=out if in_place else None, fmt=fmt,
                       scratch_dir=out.parent if out is not None else None)
        settings = BulkSettings(
            batch_size=args.batch_size, concurrency=args.concurrency, resize=args.resize,
            progress=args.progress, resume_hint="pass --resume to keep finished work across runs",
            on_error=args.on_error,
        )
        streamed = (_StdoutRows(rows, names, fmt, skip)
                    if out is None and FORMATS[fmt].streams and not (skip and fmt == "npy")
                    else None)
        shape = f"{len(names)} x {dims}"
        try:
            if streamed is not None:
                streamed.start()
            stopped = describe_rows(client, info, rows, settings, checkpoint,
                                    positions=positions,
                                    on_rows=streamed.advance if streamed is not None else None)
            if stopped is not None:
                return stopped
            if streamed is not None:
                streamed.finish()
                _summary(rows, streamed.written, "standard output", fmt, out)
                return 0
            return _write_output(rows, names, positions, out, fmt, checkpoint)
        except OutputClosed:
            say(f"netvlad-client: standard output was closed by its reader before all {shape} "
                f"descriptors ({fmt}) were written")
            return 0
        finally:
            rows.discard()


def _summary(rows: RowFile, written: int, where: str, fmt: str, out: Path | None) -> None:
    """The last line of a run: what was written where, what was left out."""
    text = f"wrote {written} x {rows.dims} descriptors to {where} ({fmt})"
    if rows.skipped:
        text += f"; skipped {len(rows.skipped)} of {len(rows.names)} images"
        if out is not None:
            text += f", listed in {sidecar(out, 'skipped.tsv')}"
    if out is not None and not FORMATS[fmt].named:
        text += f"; the image of each row is in {sidecar(out, 'paths.txt')}"
    say(text)


def _write_output(rows: RowFile, names: list[str], positions: dict[str, int], out: Path | None,
                  fmt: str, checkpoint: Checkpoint | None) -> int:
    """Write the filled rows in input order (to `out` or standard output); the exit status.

    Skipped images have no row; the sidecars say which image each row is and what was skipped.
    """
    kept = [name for name in names if name not in rows.skipped]
    if kept == rows.names:
        descriptors = rows.rows  # input order already; memory-mapped, not copied
    else:  # skipped images leave gaps; a file named twice gets its row twice
        # A copy (fancy indexing): the in-place file may share the temporary name of the write.
        descriptors = rows.rows[[rows.index(name) for name in kept]]
    if out is None:
        if not write_stdout(fmt, descriptors, kept):
            say(f"netvlad-client: standard output was closed by its reader before all "
                f"{len(names)} x {rows.dims} descriptors ({fmt}) were written")
            return 0
        _summary(rows, len(kept), "standard output", fmt, None)
        return 0
    if not FORMATS[fmt].named:
        text = "".join(f"{name}\n" for name in kept).encode()
        atomic_write(sidecar(out, "paths.txt"), lambda handle: handle.write(text))
    write_skipped(sidecar(out, "skipped.tsv"), rows.skipped, positions)
    if rows.in_place and descriptors is rows.rows:
        del descriptors
        rows.finish(out)
    else:
        write_descriptors(out, fmt, descriptors, kept)
    if checkpoint is not None:
        checkpoint.remove()
    _summary(rows, len(kept), str(out), fmt, out)
    return 0


class _StdoutRows:
    """Streams rows to standard output in input order as they are filled.

    `advance()` (after each request) writes every row from the last one written up to the
    first still missing; a reader gone away raises OutputClosed at once, so no more requests
    start. Skipped images are left out (json names each row; csv and bin have no names).
    """

    def __init__(self, rows: RowFile, names: list[str], fmt: str, skip: bool) -> None:
        self.rows, self.order, self.fmt = rows, names, fmt
        self.count = None if skip else len(names)
        self.cursor = 0
        self._stream: RowStream | None = None

    @property
    def written(self) -> int:
        """Rows written so far."""
        return self._stream.written if self._stream is not None else 0

    def start(self) -> None:
        """Write the format's header (if any), so a closed output is found before any work."""
        self._guard(lambda out: setattr(self, "_stream",
                                        RowStream(out, self.fmt, self.count, self.rows.dims)))

    def advance(self) -> None:
        """Write the rows that are ready, in order."""
        start = self.cursor
        while self.cursor < len(self.order) and self.rows.settled(self.order[self.cursor]):
            self.cursor += 1
        block = [name for name in self.order[start:self.cursor] if name not in self.rows.skipped]
        if block:
            values = self.rows.rows[[self.rows.index(name) for name in block]]
            assert self._stream is not None
            stream = self._stream
            self._guard(lambda _out: stream.write(values, block))

    def finish(self) -> None:
        """End the output (json's closing bracket)."""
        assert self._stream is not None
        stream = self._stream
        self._guard(lambda _out: stream.close())

    @staticmethod
    def _guard(write: Callable[[BinaryIO], None]) -> None:
        """Run a write to standard output and flush; a closed pipe raises OutputClosed."""
        out = sys.stdout.buffer
        try:
            write(out)
            out.flush()
        except BrokenPipeError:
            silence_closed_stdout()
            raise OutputClosed from None


def write_stdout(fmt: str, descriptors: np.ndarray, names: Sequence[str]) -> bool:
    """Descriptors to standard output in one go (npz, and npy with --on-error skip); False
    when the reader stopped early (`| head`)."""
    stream = sys.stdout.buffer
    try:
        write_stream(stream, fmt, descriptors, names)
        stream.flush()
    except BrokenPipeError:
        silence_closed_stdout()
        return False
    return True
