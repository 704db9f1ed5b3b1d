"""All place indexes of the server and the one thread that changes them (group commit).

Every change (create, drop, add, remove) is a job for the commit thread, in arrival order. Adds
and removes waiting together form one group: their records are appended to the logs, each
touched log is fsync'ed once, then the changes are applied in memory and the callers answered.
So an answered change is on disk, concurrent adds share one fsync, and queries (which run
anywhere, under each index's lock) see a place completely or not at all.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from netvlad_server.places.engine import IndexMeta, PlaceIndex, PlaceRows
from netvlad_server.places.limits import PlaceError, PlaceLimits
from netvlad_server.places.store import (
    IndexStore,
    StoreError,
    create_index_dir,
    drop_index_dir,
    encode_add,
    encode_remove,
    index_dirs,
    open_index_dir,
)

log = logging.getLogger(__name__)
_GROUP = 512  # most changes sharing one fsync
Observer = Callable[[str, "PlaceIndex | None"], None]  # (name, index or None when dropped)


@dataclass
class _Job:
    kind: str  # "log": grouped add/remove; "control": create/drop, run alone
    stage: Callable[[int], tuple[bytes, int]] | None  # (bytes pending) -> (record, bytes more)
    apply: Callable[[], Any]
    name: str
    future: Future


class Catalog:
    """The indexes by name (and those that failed to load), changed only by the commit thread."""

    def __init__(self, root: Path | None, limits: PlaceLimits, compact_bytes: int,
                 observer: Observer | None = None) -> None:
        self.root = root
        self.limits = limits
        self.compact_bytes = compact_bytes
        self.indexes: dict[str, PlaceIndex] = {}
        self.broken: dict[str, str] = {}  # name -> why it did not load
        self._stores: dict[str, IndexStore] = {}
        self._observer = observer or (lambda name, index: None)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="places-commit", daemon=True)

    @property
    def durable(self) -> bool:
        """True when changes are written to --index-dir."""
        return self.root is not None

    @property
    def total_bytes(self) -> int:
        """Memory of every index together."""
        return sum(index.nbytes for index in list(self.indexes.values()))

    def open(self) -> None:
        """Load every index under root (a damaged one is refused, the others load); start."""
        if self.root is not None and self.root.exists() and not self.root.is_dir():
            raise OSError(f"--index-dir {self.root} is not a directory; name a directory (it "
                          "is created when the first index is) or 'off' for in-memory indexes")
        for directory in index_dirs(self.root) if self.root is not None else []:
            try:
                index, store = open_index_dir(directory)
                if index.meta.name != directory.name:
                    store.close()
                    raise StoreError(f"{directory}/index.json names the index "
                                     f"{index.meta.name!r}; rename the directory to match")
            except (StoreError, OSError) as exc:
                log.error("place index %s not loaded: %s", directory.name, exc)
                self.broken[directory.name] = str(exc)
                continue
            self.indexes[index.meta.name], self._stores[index.meta.name] = index, store
            self._observer(index.meta.name, index)
            log.info("place index %s loaded: %d places, %d dims, %s search", index.meta.name,
                     index.size, index.meta.dims, index.meta.method)
        self._thread.start()

    def close(self) -> None:
        """Finish the changes already submitted, stop the commit thread, close the logs."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        for store in self._stores.values():
            store.close()

    def get(self, name: str) -> PlaceIndex:
        """The index called name: NOT_FOUND if there is none, FAILED_PRECONDITION if broken."""
        index = self.indexes.get(name)
        if index is not None:
            return index
        if name in self.broken:
            raise PlaceError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"index {name!r} failed to load at start-up: {self.broken[name]}")
        raise PlaceError(grpc.StatusCode.NOT_FOUND,
                         f"no index named {name!r}; create it first (CreateIndex) or see "
                         "ListIndexes for the existing ones")

    # ---------------------------------------------------------------- changes (commit thread)

    def create(self, meta: IndexMeta, exist_ok: bool) -> Future:
        """Create an index (result: the PlaceIndex)."""

        def run() -> PlaceIndex:
            existing = self.indexes.get(meta.name)
            if existing is not None or meta.name in self.broken:
                if existing is not None and exist_ok and (existing.meta.dims, existing.meta.method
                                                          ) == (meta.dims, meta.method):
                    return existing
                raise PlaceError(grpc.StatusCode.ALREADY_EXISTS,
                                 f"index {meta.name!r} already exists" + (
                                     f" with {existing.meta.dims} dims and {existing.meta.method}"
                                     " search" if existing is not None else " (broken)") +
                                 "; choose another name, or drop it first")
            if len(self.indexes) + len(self.broken) >= self.limits.max_indexes:
                raise PlaceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"the server holds {self.limits.max_indexes} indexes, its limit "
                                 "(--max-indexes); drop one or raise the limit")
            if self.root is not None:
                self._stores[meta.name] = create_index_dir(self.root, meta)
            index = self.indexes[meta.name] = PlaceIndex(meta)
            self._observer(meta.name, index)
            return index

        return self._submit(_Job("control", None, run, meta.name, Future()))

    def drop(self, name: str) -> Future:
        """Drop an index, broken ones included (result: the places it held)."""

        def run() -> int:
            index = self.indexes.pop(name, None)
            if index is None and self.broken.pop(name, None) is None:
                self.get(name)
            store = self._stores.pop(name, None)
            if store is not None:
                store.close()
            if self.root is not None:
                drop_index_dir(self.root, name)
            self._observer(name, None)
            return index.size if index is not None else 0

        return self._submit(_Job("control", None, run, name, Future()))

    def add(self, name: str, rows: PlaceRows) -> Future:
        """Add places (result: (replaced ids, size after))."""
        index = self.get(name)
        need = index.bytes_per_place(index.meta.dims, index.meta.method) * len(rows) + sum(
            len(i) + sum(len(k) + len(v) for k, v in m.items())
            for i, m in zip(rows.ids, rows.metadata, strict=True))

        def stage(pending: int) -> tuple[bytes, int]:
            if self.indexes.get(name) is not index:
                self.get(name)  # dropped meanwhile
            total = self.total_bytes + pending
            if total + need > self.limits.max_total_bytes:
                raise PlaceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"adding {len(rows)} places ({need} bytes) would take the place "
                                 f"indexes to {total + need} bytes, over the limit of "
                                 f"{self.limits.max_total_bytes} (--max-index-bytes); nothing "
                                 "was added: remove places, drop an index or raise the limit")
            return encode_add(rows), need

        def apply() -> tuple[list[str], int]:
            replaced = index.add(rows)
            return replaced, index.size

        return self._submit(_Job("log", stage, apply, name, Future()))

    def remove(self, name: str, ids: list[str]) -> Future:
        """Remove places (result: (removed count, missing ids, size after))."""
        index = self.get(name)

        def stage(pending: int) -> tuple[bytes, int]:
            if self.indexes.get(name) is not index:
                self.get(name)
            return encode_remove(ids), 0

        def apply() -> tuple[int, list[str], int]:
            removed, missing = index.remove(ids)
            return removed, missing, index.size

        return self._submit(_Job("log", stage, apply, name, Future()))

    def _submit(self, job: _Job) -> Future:
        if not self._thread.is_alive():
            raise PlaceError(grpc.StatusCode.UNAVAILABLE, "the place index is not running (the "
                             "server is loading or shutting down); retry shortly")
        self._jobs.put(job)
        return job.future

    def _run(self) -> None:
        waiting: collections.deque[_Job | None] = collections.deque()
        while True:
            if not waiting:
                waiting.append(self._jobs.get())
            while True:
                try:
                    waiting.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            job = waiting.popleft()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            if job.kind == "control":
                self._finish(job, job.apply)
                continue
            group = [job]
            while (waiting and waiting[0] is not None and waiting[0].kind == "log"
                   and len(group) < _GROUP):
                follower = waiting.popleft()
                if follower.future.set_running_or_notify_cancel():
                    group.append(follower)
            self._commit(group)

    @staticmethod
    def _finish(job: _Job, call: Callable[[], Any]) -> None:
        try:
            job.future.set_result(call())
        except PlaceError as exc:
            job.future.set_exception(exc)
        except Exception as exc:
            log.exception("place index %s: change failed", job.name)
            job.future.set_exception(PlaceError(
                grpc.StatusCode.INTERNAL, f"index {job.name!r}: the change failed "
                f"({type(exc).__name__}: {exc}); nothing was changed"))

    def _commit(self, group: list[_Job]) -> None:
        """Log every change of the group, fsync each touched log once, apply, answer."""
        staged: list[_Job] = []
        offsets: dict[str, int] = {}
        pending = 0
        try:
            for job in group:
                assert job.stage is not None
                try:
                    record, more = job.stage(pending)
                except PlaceError as exc:
                    job.future.set_exception(exc)
                    continue
                except OSError:
                    raise
                except Exception as exc:
                    log.exception("place index %s: cannot log the change", job.name)
                    job.future.set_exception(PlaceError(
                        grpc.StatusCode.INTERNAL, f"index {job.name!r}: the change cannot be "
                        f"logged ({type(exc).__name__}: {exc}); nothing was changed"))
                    continue
                store = self._stores.get(job.name)
                if store is not None:
                    offset = store.append(record)
                    offsets.setdefault(job.name, offset)
                pending += more
                staged.append(job)
            for name in offsets:
                self._stores[name].sync()
        except OSError as exc:
            log.error("place indexes: writing the log failed: %s", exc)
            for name, offset in offsets.items():
                try:
                    self._stores[name].truncate(offset)
                except OSError:
                    log.exception("place index %s: could not cut the failed records", name)
            for job in group:
                if not job.future.done():
                    job.future.set_exception(PlaceError(
                        grpc.StatusCode.UNAVAILABLE, f"the change could not be written to "
                        f"--index-dir ({exc}); nothing was changed"))
            return
        for job in staged:
            self._finish(job, job.apply)
        for name in {job.name for job in staged}:
            index = self.indexes.get(name)
            if index is not None:
                self._observer(name, index)
            store = self._stores.get(name)
            if index is not None and store is not None and store.log_bytes >= max(
                    self.compact_bytes, store.snapshot_bytes):
                try:
                    store.compact(index)
                except OSError:
                    log.exception("place index %s: compaction failed; the log keeps growing "
                                  "and holds every change", name)
