"""Where described rows live while a bulk run fills them, and across runs (resume).

`RowFile` holds the (N, D) result in a memory-mapped file, so a folder of any size needs memory
only for the requests in flight. `Checkpoint` keeps each finished request as a chunk file (the
.npz of the format registry) next to the output, so an interrupted run can be finished later.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from netvlad_client import NetVLADInputError
from netvlad_client.formats import FORMATS, atomic_write, fsync_directory, read_descriptors

CHECKPOINT_VERSION = 1
SCRATCH_PREFIX = ".netvlad-rows-"


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove what a killed run (`kill -9`, power loss) left next to `out`; the paths removed.

    Only files that are provably ours go: the temporary output `.NAME.tmp-PID` (of `RowFile`
    and `atomic_write`) and the scratch rows `.netvlad-rows-PID-*.f32`, each of a PID that is
    no longer running. A live process's files, and anything named otherwise, stay.
    """
    patterns = (re.compile(rf"\.{re.escape(out.name)}\.tmp-(\d+)"),
                re.compile(rf"{re.escape(SCRATCH_PREFIX)}(\d+)-\w+\.f32"))
    removed = []
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return removed
    for entry in entries:
        for pattern in patterns:
            found = pattern.fullmatch(entry.name)
            if found and int(found[1]) != os.getpid() and not _pid_alive(int(found[1])) \
                    and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return removed


class RowFile:
    """The (N, D) float32 result, row i for image i, filled in as answers arrive.

    The rows live in a memory-mapped file rather than in RAM, so describing a folder of any
    size needs memory only for the requests in flight. For .npy and .bin output that file is the
    output itself, written under a temporary name and renamed into place by `finish`; for the
    other formats (and standard output) it is a scratch file that `discard` removes.
    """

    IN_PLACE_FORMATS = tuple(name for name, f in FORMATS.items() if f.bare_rows)

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
        self.skipped: dict[str, str] = {}  # name -> why it was left out (--on-error skip)
        shape = (len(self.names), dims)
        self._dims = dims
        self.in_place = output is not None
        if output is not None:
            if fmt not in self.IN_PLACE_FORMATS:
                raise ValueError(f"only {self.IN_PLACE_FORMATS} are filled in place, not {fmt}")
            self.path = output.with_name(f".{output.name}.tmp-{os.getpid()}")
        else:
            handle, scratch = tempfile.mkstemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-",
                                               suffix=".f32", dir=scratch_dir)
            os.close(handle)
            self.path = Path(scratch)
        if not self.names:  # nothing to map: an empty file cannot be memory-mapped
            self.rows = np.empty(shape, dtype=np.float32)
            if self.in_place:
                atomic_write(self.path, lambda h: FORMATS[fmt].write(h, self.rows, self.names))
        elif fmt == "npy" and self.in_place:
            self.rows = np.lib.format.open_memmap(self.path, mode="w+", dtype="<f4", shape=shape)
        else:
            self.rows = np.memmap(self.path, dtype="<f4", mode="w+", shape=shape)

    @property
    def dims(self) -> int:
        """Values per row."""
        return self._dims

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

    def settled(self, name: str) -> bool:
        """Whether `name` needs no more work: its row is filled or it was skipped."""
        return name in self.skipped or self.filled(name)

    def skip(self, name: str, reason: str) -> None:
        """Leave `name` out of the result (its row stays unfilled), saying why."""
        self.skipped[name] = reason

    def kept(self) -> list[int]:
        """The rows of the images not skipped, in order."""
        return [i for i, name in enumerate(self.names) if name not in self.skipped]

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
        fsync_directory(out.parent)

    def discard(self) -> None:
        """Remove the file unless `finish` has renamed it into place."""
        self.path.unlink(missing_ok=True)


class Checkpoint:
    """Finished chunks of a resumable run, kept in a directory next to the output.

    Layout: `manifest.json` (what the descriptors were made with), one `chunk-NNNNNN.npz` per
    finished request holding `names` and `descriptors`, and with --on-error skip one
    `skipped-NNNNNN.json` ({name: reason}) per request that left images out. A file exists
    only once it is complete and fsynced, so a killed run loses at most the requests that were
    in flight.
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
        for stale in self.directory.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a run killed while writing
        for record in (*self.directory.glob("chunk-*.npz"),
                       *self.directory.glob("skipped-*.json")):
            self._next = max(self._next, int(record.stem.split("-")[1]) + 1)

    def saved(self) -> Iterator[tuple[list[str], np.ndarray]]:
        """The finished chunks, one at a time: (names, descriptors)."""
        for chunk in sorted(self.directory.glob("chunk-*.npz")):
            saved = read_descriptors(chunk, fmt="npz")
            yield saved.names or [], saved.values

    def skipped(self) -> dict[str, str]:
        """The images earlier runs skipped (--on-error skip): name -> reason."""
        found: dict[str, str] = {}
        for record in sorted(self.directory.glob("skipped-*.json")):
            found.update(json.loads(record.read_text()))
        return found

    def save_skipped(self, skipped: Mapping[str, str]) -> None:
        """Remember durably that these images were skipped, and why."""
        path = self.directory / f"skipped-{self._next:06d}.json"
        self._next += 1
        text = json.dumps(dict(skipped), indent=1).encode()
        atomic_write(path, lambda handle: handle.write(text))

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
        rows = np.asarray(descriptors, dtype=np.float32)
        atomic_write(path, lambda handle: FORMATS["npz"].write(handle, rows, names))
        return path

    def remove(self) -> None:
        """Delete the checkpoint once the final file is in place."""
        shutil.rmtree(self.directory, ignore_errors=True)
