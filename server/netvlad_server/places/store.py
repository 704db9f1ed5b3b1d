"""Durability of place indexes: an append-only log per index, compacted into snapshots.

Layout under --index-dir, one directory per index:

    NAME/index.json            what the index is (IndexMeta), written once at creation
    NAME/snapshot-GGGGGGGG.npz  every place as of generation G (absent for generation 0)
    NAME/log-GGGGGGGG.wal       adds and removes after that snapshot, in order

A log record is `<u32 payload length><u32 crc32 of payload><payload>`; the payload is b"A"
(add: u32 JSON length, JSON [[id, timestamp, position, metadata], ...], then the float32
descriptors) or b"R" (remove: JSON list of ids). Records are fsync'ed before the caller is
answered. A compaction writes snapshot G+1 (temporary file, fsync, rename, directory fsync),
starts an empty log G+1 and deletes generation G. At start-up the newest snapshot is read and
its log replayed: a torn last record (short or failing its CRC, with nothing after it) is cut
off with a warning; any other damage refuses that index with a clear error, leaving its files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import time
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
from netvlad_client.formats import atomic_write, fsync_directory

from netvlad_server.places.engine import IndexMeta, PlaceIndex, PlaceRows

log = logging.getLogger(__name__)
_HEADER = struct.Struct("<II")
_SNAPSHOT_ARRAYS = ("vectors", "timestamps", "positions", "records", "meta")


class StoreError(Exception):
    """An index directory that cannot be loaded; the message says which file and why."""


def _json_number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def encode_add(rows: PlaceRows) -> bytes:
    """The payload of an add record."""
    items = [[place_id, _json_number(ts), None if np.isnan(pos[0]) else pos.tolist(), meta]
             for place_id, ts, pos, meta in zip(rows.ids, rows.timestamps, rows.positions,
                                                rows.metadata, strict=True)]
    text = json.dumps(items, separators=(",", ":"), allow_nan=False).encode()
    vectors = np.ascontiguousarray(rows.vectors, dtype="<f4").tobytes()
    return b"A" + struct.pack("<I", len(text)) + text + vectors


def encode_remove(ids: list[str]) -> bytes:
    """The payload of a remove record."""
    return b"R" + json.dumps(ids, separators=(",", ":")).encode()


def _rows_from_items(items: list, vectors: np.ndarray) -> PlaceRows:
    timestamps = np.array([np.nan if ts is None else ts for _, ts, _, _ in items], np.float64)
    positions = np.array([[np.nan] * 3 if pos is None else pos for _, _, pos, _ in items],
                         np.float64).reshape(-1, 3)
    return PlaceRows([str(i) for i, _, _, _ in items], vectors, timestamps, positions,
                     [dict(meta) for _, _, _, meta in items])


def apply_record(index: PlaceIndex, payload: bytes) -> None:
    """Replay one log record into an index."""
    kind, body = payload[:1], payload[1:]
    if kind == b"A":
        (length,) = struct.unpack_from("<I", body)
        items = json.loads(body[4:4 + length])
        vectors = np.frombuffer(body[4 + length:], dtype="<f4").astype(np.float32)
        index.add(_rows_from_items(items, vectors.reshape(len(items), index.meta.dims)))
    elif kind == b"R":
        index.remove(json.loads(body))
    else:
        raise ValueError(f"unknown record kind {kind!r}")


def frame(payload: bytes) -> bytes:
    """A log record: length, CRC and payload."""
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in _SNAPSHOT_ARRAYS:
        digest.update(name.encode() + np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def write_snapshot(path: Path, meta: IndexMeta, rows: PlaceRows) -> None:
    """Write every place to path atomically (temporary file, fsync, rename, directory fsync)."""
    records = json.dumps({"ids": rows.ids, "metadata": rows.metadata}).encode()
    arrays = {"vectors": np.asarray(rows.vectors, "<f4"), "timestamps": rows.timestamps,
              "positions": rows.positions, "records": np.frombuffer(records, np.uint8),
              "meta": np.frombuffer(meta.to_json().encode(), np.uint8)}
    arrays["checksum"] = np.array(_checksum(arrays))
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def read_snapshot(path: Path, meta: IndexMeta) -> PlaceRows:
    """Read a snapshot, refusing (StoreError) anything damaged or not this index's."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in (*_SNAPSHOT_ARRAYS, "checksum")}
        if str(arrays["checksum"]) != _checksum(arrays):
            raise ValueError("its checksum does not match its contents")
        if IndexMeta.from_json(arrays["meta"].tobytes().decode()) != meta:
            raise ValueError("it belongs to another index (its index.json differs)")
        records = json.loads(arrays["records"].tobytes())
        vectors = arrays["vectors"].astype(np.float32).reshape(-1, meta.dims)
        return PlaceRows(records["ids"], vectors, arrays["timestamps"].astype(np.float64),
                         arrays["positions"].astype(np.float64).reshape(-1, 3),
                         records["metadata"])
    except Exception as exc:
        raise StoreError(f"snapshot {path} is damaged ({type(exc).__name__}: {exc}); the index "
                         "is not loaded and its files are left as they are: restore the "
                         "directory from a backup, or move it away to drop the index") from None


def _generation(path: Path) -> int:
    return int(path.stem.split("-", 1)[1])


class IndexStore:
    """The files of one index: the open log, its size, and compaction into a new snapshot."""

    def __init__(self, directory: Path, generation: int, log_file: BinaryIO,
                 snapshot_bytes: int) -> None:
        self.directory = directory
        self.generation = generation
        self.log = log_file
        self.snapshot_bytes = snapshot_bytes

    @property
    def log_bytes(self) -> int:
        """Bytes in the current log."""
        return self.log.tell()

    def append(self, payload: bytes) -> int:
        """Write a record (not yet durable: call sync); returns the log offset before it."""
        offset = self.log.tell()
        self.log.write(frame(payload))
        return offset

    def sync(self) -> None:
        """Make every appended record durable."""
        self.log.flush()
        os.fsync(self.log.fileno())

    def truncate(self, offset: int) -> None:
        """Cut the log back to offset (records that failed to become durable)."""
        self.log.flush()
        self.log.truncate(offset)
        self.log.seek(offset)

    def compact(self, index: PlaceIndex) -> None:
        """Snapshot the index as generation G+1, start its empty log, delete generation G."""
        started = time.perf_counter()
        new = self.generation + 1
        snapshot = self.directory / f"snapshot-{new:08d}.npz"
        write_snapshot(snapshot, index.meta, index.rows())
        try:
            log_file = _open_log(self.directory / f"log-{new:08d}.wal")
            fsync_directory(self.directory)
        except OSError:  # generation G stays in force: the new snapshot must not outlive this
            snapshot.unlink(missing_ok=True)
            fsync_directory(self.directory)
            raise
        self.log.close()
        old = self.generation
        self.log, self.generation = log_file, new
        self.snapshot_bytes = snapshot.stat().st_size
        for stale in (f"snapshot-{old:08d}.npz", f"log-{old:08d}.wal"):
            (self.directory / stale).unlink(missing_ok=True)
        fsync_directory(self.directory)
        log.info("place index %s: snapshot %d written (%d places, %.0f MB) in %.2f s",
                 index.meta.name, new, index.size, self.snapshot_bytes / 1e6,
                 time.perf_counter() - started)

    def close(self) -> None:
        """Close the log file."""
        self.log.close()


def _open_log(path: Path) -> BinaryIO:
    handle = open(path, "a+b")  # noqa: SIM115 - kept open for appends
    handle.seek(0, os.SEEK_END)
    os.fsync(handle.fileno())
    return handle


def create_index_dir(root: Path, meta: IndexMeta) -> IndexStore:
    """Create NAME/ with index.json and an empty log, atomically (built aside, renamed)."""
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{meta.name}.creating"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    atomic_write(staging / "index.json", lambda handle: handle.write(meta.to_json().encode()))
    _open_log(staging / "log-00000000.wal").close()
    fsync_directory(staging)
    os.rename(staging, root / meta.name)
    fsync_directory(root)
    directory = root / meta.name
    return IndexStore(directory, 0, _open_log(directory / "log-00000000.wal"), 0)


def drop_index_dir(root: Path, name: str) -> None:
    """Delete NAME/ (renamed aside first, so a crash never leaves half an index under NAME)."""
    doomed = root / f".{name}.dropped-{os.getpid()}-{time.time_ns()}"
    os.rename(root / name, doomed)
    fsync_directory(root)
    shutil.rmtree(doomed, ignore_errors=True)


def replay_log(path: Path, index: PlaceIndex) -> tuple[int, int]:
    """Apply every whole record of a log; cut a torn last one. Returns (records, good bytes)."""
    data = path.read_bytes()
    offset = records = 0
    while offset < len(data):
        if offset + _HEADER.size > len(data):
            break
        length, crc = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + length
        payload = data[offset + _HEADER.size:end]
        if end > len(data) or length == 0 or zlib.crc32(payload) != crc:
            if end < len(data) and any(data[offset:]):  # zeros: a torn, pre-allocated tail
                raise StoreError(
                    f"log {path} has a damaged record at byte {offset} followed by more data "
                    "(not a torn last write); the index is not loaded and its files are left "
                    "as they are: restore the directory from a backup or move it away")
            break
        try:
            apply_record(index, payload)
        except Exception as exc:
            raise StoreError(f"log {path}: record at byte {offset} cannot be applied "
                             f"({type(exc).__name__}: {exc}); the index is not loaded") from None
        offset, records = end, records + 1
    if offset < len(data):
        log.warning("place index %s: dropped a torn record at the end of %s (%d bytes after "
                    "byte %d): a write the server never acknowledged", index.meta.name, path,
                    len(data) - offset, offset)
        with open(path, "r+b") as handle:
            handle.truncate(offset)
            os.fsync(handle.fileno())
    return records, offset


def open_index_dir(directory: Path) -> tuple[PlaceIndex, IndexStore]:
    """Load one index: its newest snapshot, then its log replayed (raises StoreError)."""
    try:
        meta = IndexMeta.from_json((directory / "index.json").read_text())
    except Exception as exc:
        raise StoreError(f"{directory / 'index.json'} cannot be read ({type(exc).__name__}: "
                         f"{exc}); the index is not loaded") from None
    snapshots = sorted(directory.glob("snapshot-*.npz"), key=_generation)
    generation = _generation(snapshots[-1]) if snapshots else 0
    rows = read_snapshot(snapshots[-1], meta) if snapshots else None
    index = PlaceIndex(meta, rows)
    log_path = directory / f"log-{generation:08d}.wal"
    if log_path.exists():
        replay_log(log_path, index)
    for stale in [*directory.glob("snapshot-*.npz"), *directory.glob("log-*.wal")]:
        if _generation(stale) < generation:
            stale.unlink()
    for temporary in directory.glob(".*.tmp-*"):
        temporary.unlink()
    store = IndexStore(directory, generation, _open_log(log_path),
                       snapshots[-1].stat().st_size if snapshots else 0)
    return index, store


def index_dirs(root: Path) -> list[Path]:
    """The index directories under root; leftovers of interrupted creations/drops are removed."""
    if not root.exists():
        return []
    for leftover in [*root.glob(".*.creating"), *root.glob(".*.dropped-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    return sorted(path for path in root.iterdir()
                  if path.is_dir() and not path.name.startswith("."))
