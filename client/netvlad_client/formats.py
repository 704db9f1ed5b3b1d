"""Descriptor file formats: one registry `FORMATS = {name: DescriptorFormat(read, write)}`.

`netvlad-client describe` writes through it, `evaluate` reads saved files through it, and the
resume checkpoint stores its chunks as its .npz. Every file is written to a temporary name,
fsynced and renamed into place, so a reader (or a killed run) sees either the old file or the
complete new one, never a torn one.

* npy: the bare (N, D) float32 array.
* npz: `descriptors` (N, D) and `names` (N,) arrays.
* csv: one row of comma-separated decimals per image (9 significant digits round-trip float32);
  read back also with a header row and/or a leading name column.
* json: a list of `{"name", "descriptor"}` records, one line per image; read back also as a list
  of rows, `{"descriptors": [...], "names": [...]}` or records with `values`/`id`/`path`.
* bin: raw row-major little-endian float32, no header (MATLAB: `fread(f, [D, N], 'float32')'`);
  its shape comes from the caller (the dimensions, or the number of rows).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np

from netvlad_client import NetVLADInputError

Read = tuple[np.ndarray, "list[str] | None"]  # values, names (None when the format has none)
_BLOCK_ROWS = 1024  # rows serialised at a time: a large array is never copied whole


class DescriptorFileError(NetVLADInputError):
    """A descriptor file that cannot be read or written; the message names the file and why."""


@dataclass(frozen=True)
class DescriptorFormat:
    """How one format is read and written.

    read(path, dims, count): the values and names; `dims`/`count` give a headerless format its
    shape. write(handle, descriptors, names): serialise (N, D) float32 rows in input order.
    """

    name: str
    read: Callable[[Path, int | None, int | None], Read]
    write: Callable[[BinaryIO, np.ndarray, Sequence[str]], None]
    binary: bool  # refused on a terminal
    bare_rows: bool  # the file is exactly the (N, D) array: it can be filled in place
    streams: bool  # RowStream writes it row block by row block, as rows arrive in order
    named: bool  # the file carries the image names (else a sidecar list of paths does)


def is_number(text: str) -> bool:
    """Whether text parses as a float (a header cell does not): the text readers share it."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _text_row(row: np.ndarray) -> str:
    """One descriptor as comma-separated decimals; 9 significant digits round-trip float32."""
    return ",".join(f"{value:.9g}" for value in row.tolist())


def _write_whole(fmt: str) -> Callable[[BinaryIO, np.ndarray, Sequence[str]], None]:
    """The whole-file writer of a streamable format: one RowStream over every row."""

    def write(handle: BinaryIO, descriptors: np.ndarray, names: Sequence[str]) -> None:
        stream = RowStream(handle, fmt, len(descriptors), int(descriptors.shape[1]))
        for start in range(0, len(descriptors), _BLOCK_ROWS):
            stream.write(descriptors[start : start + _BLOCK_ROWS],
                         names[start : start + _BLOCK_ROWS])
        stream.close()

    return write


def _read_npy(path: Path, _dims: int | None, _count: int | None) -> Read:
    return np.load(path, allow_pickle=False), None


def _write_npz(handle: BinaryIO, descriptors: np.ndarray, names: Sequence[str]) -> None:
    np.savez(handle, descriptors=descriptors, names=np.array(list(names), dtype=str))


def _read_npz(path: Path, _dims: int | None, _count: int | None) -> Read:
    with np.load(path, allow_pickle=False) as archive:
        if "descriptors" not in archive.files:
            raise DescriptorFileError(
                f"descriptor file {path}: no 'descriptors' array in it (it holds: "
                f"{', '.join(archive.files) or 'nothing'})"
            )
        names = [str(n) for n in archive["names"]] if "names" in archive.files else None
        return archive["descriptors"], names


def _read_csv(path: Path, _dims: int | None, _count: int | None) -> Read:
    with path.open(newline="") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows:
        raise DescriptorFileError(f"descriptor file {path} is empty")
    if not all(is_number(c) for c in rows[0][1:]):
        rows = rows[1:]  # a header row
    if not rows:
        raise DescriptorFileError(f"descriptor file {path} holds a header but no descriptors")
    named = not is_number(rows[0][0])
    names = [r[0] for r in rows] if named else None
    start = 1 if named else 0
    width = len(rows[0]) - start
    for lineno, r in enumerate(rows, start=1):
        if len(r) - start != width:
            raise DescriptorFileError(
                f"descriptor file {path} data row {lineno}: {len(r) - start} values, expected "
                f"{width}"
            )
    return np.array([[float(c) for c in r[start:]] for r in rows], dtype=np.float64), names


def _read_json(path: Path, _dims: int | None, _count: int | None) -> Read:
    data = json.loads(path.read_text())
    names: list[str] | None = None
    if isinstance(data, dict):
        if "descriptors" not in data:
            raise DescriptorFileError(
                f"descriptor file {path}: JSON object without a 'descriptors' list "
                f"(keys: {', '.join(map(str, data)) or 'none'})"
            )
        if data.get("names") is not None:
            names = [str(n) for n in data["names"]]
        data = data["descriptors"]
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        key = next((k for k in ("values", "descriptor") if k in data[0]), None)
        if key is None:
            raise DescriptorFileError(
                f"descriptor file {path}: records need a 'values' or 'descriptor' list"
            )
        name_key = next((k for k in ("id", "name", "path") if k in data[0]), None)
        names = [str(r[name_key]) for r in data] if name_key else None
        data = [r[key] for r in data]
    return np.array(data, dtype=np.float64), names


def _read_bin(path: Path, dims: int | None, count: int | None) -> Read:
    size = path.stat().st_size
    if size % 4:
        raise DescriptorFileError(
            f"descriptor file {path}: {size} bytes is not a whole number of float32 values"
        )
    total = size // 4
    if dims is None:
        if count is None:
            raise DescriptorFileError(
                f"descriptor file {path}: a raw .bin file does not record its shape; give the "
                f"number of dimensions (--dims-of-bin) or the positions"
            )
        if count < 1 or total % count:
            raise DescriptorFileError(
                f"descriptor file {path}: {total} float32 values do not split into {count} "
                f"descriptors (one per position); check the files or give --dims-of-bin"
            )
        dims = total // count
    elif dims < 1 or total % dims:
        raise DescriptorFileError(
            f"descriptor file {path}: {total} float32 values are not a whole number of "
            f"{dims}-dimensional descriptors"
        )
    return np.fromfile(path, dtype="<f4").reshape(-1, dims), None


FORMATS: dict[str, DescriptorFormat] = {
    f.name: f
    for f in (
        DescriptorFormat("npy", _read_npy, _write_whole("npy"), binary=True, bare_rows=True,
                         streams=True, named=False),
        DescriptorFormat("npz", _read_npz, _write_npz, binary=True, bare_rows=False,
                         streams=False, named=True),
        DescriptorFormat("csv", _read_csv, _write_whole("csv"), binary=False, bare_rows=False,
                         streams=True, named=False),
        DescriptorFormat("json", _read_json, _write_whole("json"), binary=False,
                         bare_rows=False, streams=True, named=True),
        DescriptorFormat("bin", _read_bin, _write_whole("bin"), binary=True, bare_rows=True,
                         streams=True, named=False),
    )
}
NAMES = tuple(FORMATS)


def get_format(name: str) -> DescriptorFormat:
    """The registry entry of `name`; DescriptorFileError naming the known ones otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise DescriptorFileError(
            f"unknown descriptor format {name!r}; use one of {', '.join(NAMES)}"
        ) from None


def format_of(path: Path, requested: str | None = None, *, missing: str | None = None) -> str:
    """The format of a file: `requested` when given, else its extension.

    A file without an extension is `missing` when that is given (the writer's choice of .npy);
    otherwise, and for an unknown extension, DescriptorFileError says what is expected.
    """
    if requested:
        return get_format(requested).name
    suffix = path.suffix.lower().lstrip(".")
    if not suffix and missing is not None:
        return missing
    if suffix in FORMATS:
        return suffix
    known = ", ".join(f".{name}" for name in NAMES)
    if missing is not None:  # choosing the format to write
        raise DescriptorFileError(f"cannot tell the output format from '{path.suffix}' in "
                                  f"{path}; use one of {known} or pass --format")
    raise DescriptorFileError(f"descriptor file {path}: unknown format "
                              f"{path.suffix.lower() or '(no suffix)'}; expected one of {known}")


# ------------------------------------------------------------------------------------ writing


def fsync_directory(directory: Path) -> None:
    """Make a rename in directory durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through write(handle) to a temporary name, fsync, rename into place."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)


def write_descriptors(path: Path, fmt: str, descriptors: np.ndarray, names: Sequence[str]) -> None:
    """Write (N, D) float32 descriptors in input order to path as `fmt`, atomically."""
    writer = get_format(fmt).write
    rows = np.asarray(descriptors, dtype=np.float32)
    atomic_write(path, lambda handle: writer(handle, rows, names))


def write_stream(handle: BinaryIO, fmt: str, descriptors: np.ndarray,
                 names: Sequence[str]) -> None:
    """Write (N, D) float32 descriptors in input order to an open binary stream (e.g. a pipe)."""
    get_format(fmt).write(handle, np.asarray(descriptors, dtype=np.float32), names)


class RowStream:
    """Writes one descriptor file to an open binary stream a block of rows at a time.

    For the formats that can be written front to back without knowing what follows (npy, csv,
    json, bin), so that output leaves as soon as rows are ready and a reader that went away
    (`| head`) is noticed at the first write. An .npy header states the row count up front:
    exactly `count` rows must then be written.
    """

    def __init__(self, handle: BinaryIO, fmt: str, count: int | None, dims: int) -> None:
        self.fmt = get_format(fmt).name
        if not FORMATS[self.fmt].streams:
            raise ValueError(f"the {self.fmt} format cannot be written row by row")
        if self.fmt == "npy" and count is None:
            raise ValueError("an .npy stream needs its row count up front")
        self._handle, self._count, self._dims = handle, count, dims
        self.written = 0
        if self.fmt == "npy":
            header = {"descr": "<f4", "fortran_order": False, "shape": (count, dims)}
            np.lib.format.write_array_header_1_0(handle, header)
        elif self.fmt == "json":
            handle.write(b"[\n")

    def write(self, rows: np.ndarray, names: Sequence[str]) -> None:
        """Append rows (and, for json, their names) in order."""
        rows = np.ascontiguousarray(rows, dtype="<f4")
        if rows.ndim != 2 or rows.shape[1] != self._dims:
            raise ValueError(f"expected rows of {self._dims} values, got shape {rows.shape}")
        if self.fmt in ("npy", "bin"):
            self._handle.write(rows.tobytes())
        elif self.fmt == "csv":
            self._handle.write("".join(f"{_text_row(row)}\n" for row in rows).encode())
        else:
            entries = [f'{{"name": {json.dumps(name)}, "descriptor": [{_text_row(row)}]}}'
                       for name, row in zip(names, rows, strict=True)]
            if entries:
                lead = ",\n" if self.written else ""
                self._handle.write((lead + ",\n".join(entries)).encode())
        self.written += len(rows)

    def close(self) -> None:
        """End the file (json's closing bracket); checks an .npy got the rows it announced."""
        if self.fmt == "json":
            self._handle.write(b"\n]\n" if self.written else b"]\n")
        if self.fmt == "npy" and self.written != self._count:
            raise ValueError(f"an .npy stream announced {self._count} rows but got "
                             f"{self.written}")


def silence_closed_stdout(stream: TextIO | None = None) -> None:
    """After a reader closed our standard output (`| head`), or ``stream``: point it at
    /dev/null, so later writes and Python's flush at exit pass quietly instead of reporting the
    broken pipe again. A stream without a file descriptor is left as it is."""
    import sys

    try:
        fd = (stream or sys.stdout).fileno()
    except (OSError, ValueError, AttributeError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


# ------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class DescriptorFile:
    """Descriptors read from a file, with the image names when the format carries them."""

    path: Path
    values: np.ndarray  # N x D, as stored (float32 for the binary formats)
    names: list[str] | None


def read_descriptors(
    path: str | Path, *, fmt: str | None = None, dims: int | None = None,
    count: int | None = None,
) -> DescriptorFile:
    """Read a descriptor file (format by `fmt` or the extension) as a 2-D array.

    `dims` or `count` (the number of rows) give a raw .bin file its shape.
    """
    p = Path(path)
    name = format_of(p, fmt)
    if not p.is_file():
        raise DescriptorFileError(f"descriptor file {p} does not exist")
    try:
        values, names = FORMATS[name].read(p, dims, count)
    except DescriptorFileError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise DescriptorFileError(f"descriptor file {p}: cannot read it as .{name}: {exc}") from exc
    values = np.asarray(values)
    if names is not None and len(names) != len(values):
        raise DescriptorFileError(
            f"descriptor file {p}: {len(names)} names for {len(values)} descriptors"
        )
    return DescriptorFile(p, values, names)
