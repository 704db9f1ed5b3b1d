"""Descriptor files the CLI writes (.npy .npz .csv .json .bin) and the resume checkpoint.

Every file is written to a temporary name, fsynced and renamed into place, so a reader (or a
run that is killed) sees either the old file or the complete new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from netvlad_client.client import NetVLADInputError

FORMATS = ("npy", "npz", "csv", "json", "bin")
BINARY_FORMATS = ("npy", "npz", "bin")
CHECKPOINT_VERSION = 1


def output_format(path: Path, requested: str | None) -> str:
    """The format to write: --format when given, else the extension (none means .npy)."""
    if requested:
        return requested
    suffix = path.suffix.lower().lstrip(".")
    if not suffix:
        return "npy"
    if suffix not in FORMATS:
        raise NetVLADInputError(
            f"cannot tell the output format from '{path.suffix}' in {path}; use one of "
            + ", ".join(f".{name}" for name in FORMATS)
            + " or pass --format"
        )
    return suffix


def _fsync_directory(directory: Path) -> None:
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
    _fsync_directory(path.parent)


def _text_row(row: np.ndarray) -> str:
    """One descriptor as comma-separated decimals; 9 significant digits round-trip float32."""
    return ",".join(f"{value:.9g}" for value in row.tolist())


def _write_json(handle: BinaryIO, descriptors: np.ndarray, names: Sequence[str]) -> None:
    """A JSON list of {"name", "descriptor"} objects, one line per image."""
    handle.write(b"[\n")
    for index, (name, row) in enumerate(zip(names, descriptors, strict=True)):
        separator = ",\n" if index + 1 < len(names) else "\n"
        entry = f'{{"name": {json.dumps(name)}, "descriptor": [{_text_row(row)}]}}{separator}'
        handle.write(entry.encode())
    handle.write(b"]\n")


def _write(handle: BinaryIO, fmt: str, descriptors: np.ndarray, names: Sequence[str]) -> None:
    """Serialise an (N, D) float32 array (and the names, where the format has room) to handle."""
    if fmt == "npy":
        np.save(handle, descriptors)
    elif fmt == "npz":
        np.savez(handle, descriptors=descriptors, names=np.array(list(names), dtype=str))
    elif fmt == "csv":
        handle.writelines(f"{_text_row(row)}\n".encode() for row in descriptors)
    elif fmt == "json":
        _write_json(handle, descriptors, names)
    elif fmt == "bin":
        # Row-major (N, D) little-endian float32: MATLAB's fread(f, [D, N], 'float32')' reads it.
        handle.write(np.ascontiguousarray(descriptors, dtype="<f4").tobytes())
    else:
        raise NetVLADInputError(f"unknown output format {fmt!r}; use one of {', '.join(FORMATS)}")


def write_descriptors(path: Path, fmt: str, descriptors: np.ndarray, names: Sequence[str]) -> None:
    """Write descriptors (N, D) float32 in input order to path, atomically."""
    descriptors = np.asarray(descriptors, dtype=np.float32)
    atomic_write(path, lambda handle: _write(handle, fmt, descriptors, names))


def write_stream(handle: BinaryIO, fmt: str, descriptors: np.ndarray,
                 names: Sequence[str]) -> None:
    """Write descriptors (N, D) float32 in input order to an open binary stream (e.g. a pipe)."""
    _write(handle, fmt, np.asarray(descriptors, dtype=np.float32), names)


class RowFile:
    """The (N, D) float32 result, row i for image i, filled in as answers arrive.

    The rows live in a memory-mapped file rather than in RAM, so describing a folder of any
    size needs memory only for the requests in flight. For .npy and .bin output that file is the
    output itself, written under a temporary name and renamed into place by `finish`; for the
    other formats (and standard output) it is a scratch file that `discard` removes.
    """

    IN_PLACE_FORMATS = ("npy", "bin")  # formats whose file is the bare (N, D) array

    def __init__(self, names: Sequence[str], dims: int, *, output: Path | None = None,
                 fmt: str = "bin", scratch_dir: Path | None = None) -> None:
        """Rows for `names` (distinct); with `output`, filled in place as that `fmt` file (one
        of IN_PLACE_FORMATS), else in a scratch file in `scratch_dir` (default: the system's
        temporary directory)."""
        if len(set(names)) != len(names):
            raise ValueError("RowFile needs distinct names")
        self.names = list(names)
        self._position = {name: i for i, name in enumerate(self.names)}
        self._done = np.zeros(len(self.names), dtype=bool)
        shape = (len(self.names), dims)
        self.in_place = output is not None
        if output is not None:
            if fmt not in self.IN_PLACE_FORMATS:
                raise ValueError(f"only {self.IN_PLACE_FORMATS} are filled in place, not {fmt}")
            self.path = output.with_name(f".{output.name}.tmp-{os.getpid()}")
        else:
            import tempfile

            handle, scratch = tempfile.mkstemp(prefix=".netvlad-rows-", suffix=".f32",
                                               dir=scratch_dir)
            os.close(handle)
            self.path = Path(scratch)
        if not self.names:  # nothing to map: an empty file cannot be memory-mapped
            self.rows = np.empty(shape, dtype=np.float32)
            if self.in_place:
                atomic_write(self.path, lambda h: _write(h, fmt, self.rows, self.names))
        elif fmt == "npy" and self.in_place:
            self.rows = np.lib.format.open_memmap(self.path, mode="w+", dtype="<f4", shape=shape)
        else:
            self.rows = np.memmap(self.path, dtype="<f4", mode="w+", shape=shape)

    @property
    def dims(self) -> int:
        return int(self.rows.shape[1])

    def __contains__(self, name: object) -> bool:
        """Whether `name` is one of the images (filled or not)."""
        return name in self._position

    def index(self, name: str) -> int:
        """The row of `name`."""
        return self._position[name]

    def filled(self, name: str) -> bool:
        """Whether the row of `name` holds its descriptor yet."""
        return bool(self._done[self._position[name]])

    def count(self) -> int:
        """How many rows are filled."""
        return int(self._done.sum())

    def put(self, names: Sequence[str], rows: np.ndarray) -> None:
        """Store the descriptors of `names` (one row each, in that order)."""
        where = [self._position[name] for name in names]
        self.rows[where] = rows
        self._done[where] = True

    def finish(self, out: Path) -> None:
        """Make the in-place file durable and rename it to `out` (only for .npy and .bin)."""
        assert self.in_place
        if isinstance(self.rows, np.memmap):
            self.rows.flush()
            with open(self.path, "rb+") as handle:
                os.fsync(handle.fileno())
        del self.rows
        os.replace(self.path, out)
        _fsync_directory(out.parent)

    def discard(self) -> None:
        """Remove the file unless `finish` has renamed it into place."""
        self.path.unlink(missing_ok=True)


def silence_closed_stdout() -> None:
    """After a reader closed our standard output (`| head`): point it at /dev/null, so Python's
    flush at exit does not report the broken pipe a second time."""
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


class Checkpoint:
    """Finished chunks of a resumable run, kept in a directory next to the output.

    Layout: `manifest.json` (what the descriptors were made with) and one
    `chunk-NNNNNN.npz` per finished request holding `names` and `descriptors`. A chunk file
    exists only once it is complete and fsynced, so a killed run loses at most the requests
    that were in flight.
    """

    def __init__(self, directory: Path, manifest: Mapping[str, Any]):
        self.directory = directory
        self.manifest = {"checkpoint_version": CHECKPOINT_VERSION, **manifest}
        self._next = 0

    def open(self) -> None:
        """Create the directory, or check that it belongs to this run; `saved()` then reads it."""
        manifest_path = self.directory / "manifest.json"
        if self.directory.exists() and not manifest_path.exists() and any(self.directory.iterdir()):
            raise NetVLADInputError(
                f"{self.directory} exists but is not a checkpoint of this tool (no manifest.json); "
                "move it away or choose another --out"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        if manifest_path.exists():
            self._check_manifest(json.loads(manifest_path.read_text()))
        else:
            text = json.dumps(self.manifest, indent=2, sort_keys=True).encode()
            atomic_write(manifest_path, lambda handle: handle.write(text))
        for stale in self.directory.glob(".chunk-*.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a run killed while writing
        for chunk in self.directory.glob("chunk-*.npz"):
            self._next = max(self._next, int(chunk.stem.split("-")[1]) + 1)

    def saved(self) -> Iterator[tuple[list[str], np.ndarray]]:
        """The finished chunks, one at a time: (names, descriptors)."""
        for chunk in sorted(self.directory.glob("chunk-*.npz")):
            with np.load(chunk, allow_pickle=False) as data:
                yield data["names"].tolist(), data["descriptors"]

    def _check_manifest(self, found: Mapping[str, Any]) -> None:
        """Refuse to mix descriptors made with another model or other options."""
        differences = [
            f"{key} {found.get(key)!r} (now {value!r})"
            for key, value in self.manifest.items()
            if found.get(key) != value
        ]
        if differences:
            raise NetVLADInputError(
                f"{self.directory} holds descriptors made with " + ", ".join(differences)
                + "; rerun with the same model and options, or delete it to start afresh"
            )

    def save(self, names: Sequence[str], descriptors: np.ndarray) -> Path:
        """Store one finished chunk durably; returns its path."""
        path = self.directory / f"chunk-{self._next:06d}.npz"
        self._next += 1
        names_array = np.array(list(names), dtype=str)
        rows = np.asarray(descriptors, dtype=np.float32)
        atomic_write(path, lambda handle: np.savez(handle, names=names_array, descriptors=rows))
        return path

    def remove(self) -> None:
        """Delete the checkpoint once the final file is in place."""
        shutil.rmtree(self.directory, ignore_errors=True)
