"""One place index in memory: descriptors in faiss, ids, timestamps, positions and metadata.

Rows are kept in the order places were added (a replaced place moves to the end, as the newest),
so "the last N added" are the last N rows. Exact search is faiss IndexFlatIP: on unit vectors the
inner product is the cosine similarity and the answer is what brute force gives. HNSW
(IndexHNSWFlat, inner product) is the approximate option. Every method takes the index's lock:
a query sees a place completely or not at all.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field

import faiss
import numpy as np

from netvlad_server.places.limits import ModelIdentity

HNSW_M = 32  # neighbours per node of the HNSW graph
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 64  # at least k is used
_ROW_OVERHEAD = 120  # bytes per place besides its descriptor and strings (Python objects, arrays)


@dataclass(frozen=True)
class IndexMeta:
    """What an index is: its name, descriptor length, search method and model identity."""

    name: str
    dims: int
    method: str  # exact or hnsw
    model: ModelIdentity

    def to_json(self) -> str:
        """The index.json text stored next to the index's files."""
        return json.dumps({"name": self.name, "dims": self.dims, "method": self.method,
                           "model": vars(self.model)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IndexMeta:
        """Read index.json (raises ValueError/KeyError/TypeError when it is not one)."""
        data = json.loads(text)
        return cls(name=str(data["name"]), dims=int(data["dims"]), method=str(data["method"]),
                   model=ModelIdentity(**data["model"]))


@dataclass
class PlaceRows:
    """Places as columns: ids, (n, dims) float32 unit vectors, timestamps and positions (NaN =
    unset), metadata dicts."""

    ids: list[str]
    vectors: np.ndarray
    timestamps: np.ndarray  # float64 (n,)
    positions: np.ndarray  # float64 (n, 3)
    metadata: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def empty(cls, dims: int) -> PlaceRows:
        """No places."""
        return cls([], np.empty((0, dims), np.float32), np.empty(0), np.empty((0, 3)), [])

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Found:
    """One match: the place's row data and its similarity to the query."""

    id: str
    similarity: float
    timestamp: float  # NaN = unset
    position: tuple[float, float, float] | None
    metadata: dict[str, str]


def _new_faiss(dims: int, method: str) -> faiss.Index:
    if method == "hnsw":
        index = faiss.IndexHNSWFlat(dims, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    return faiss.IndexFlatIP(dims)


def _strings_bytes(place_id: str, metadata: dict[str, str]) -> int:
    return len(place_id) + sum(len(k) + len(v) for k, v in metadata.items())


class PlaceIndex:
    """The places of one index, searchable; safe for concurrent readers and one writer.

    Descriptors live only in faiss (no second copy); the other columns grow by doubling, so an
    add costs in proportion to the places added, not to the index size.
    """

    def __init__(self, meta: IndexMeta, rows: PlaceRows | None = None) -> None:
        self.meta = meta
        self.lock = threading.Lock()
        self._faiss = _new_faiss(meta.dims, meta.method)
        self._ids: list[str] = []
        self._metadata: list[dict[str, str]] = []
        self._timestamps = np.empty(16)
        self._positions = np.empty((16, 3))
        self._row_of: dict[str, int] = {}
        self._string_bytes = 0
        if rows is not None and len(rows):
            self._append(rows)

    @property
    def size(self) -> int:
        """Places held."""
        return len(self._ids)

    @property
    def nbytes(self) -> int:
        """Memory taken (an estimate beyond the descriptors, which dominate)."""
        per_place = self.bytes_per_place(self.meta.dims, self.meta.method)
        return self.size * per_place + self._string_bytes

    @staticmethod
    def bytes_per_place(dims: int, method: str) -> int:
        """Memory one place takes, strings aside: its descriptor, search links, columns."""
        graph = int(2 * HNSW_M * 4 * 1.07) + 16 if method == "hnsw" else 0
        return dims * 4 + graph + 8 + 24 + _ROW_OVERHEAD

    def add(self, rows: PlaceRows) -> list[str]:
        """Add places (present ids are replaced, moving to the end); returns the replaced ids."""
        with self.lock:
            replaced = [place_id for place_id in rows.ids if place_id in self._row_of]
            if replaced:
                self._delete([self._row_of[place_id] for place_id in replaced])
            self._append(rows)
            return replaced

    def remove(self, ids: list[str]) -> tuple[int, list[str]]:
        """Remove places by id; returns (how many were removed, the ids not present)."""
        with self.lock:
            present = list(dict.fromkeys(i for i in ids if i in self._row_of))
            missing = [i for i in ids if i not in self._row_of]
            if present:
                self._delete([self._row_of[place_id] for place_id in present])
            return len(present), missing

    def rows(self) -> PlaceRows:
        """A consistent copy of every place, in the order added (for snapshots and export)."""
        with self.lock:
            count = self.size
            return PlaceRows(list(self._ids), self._vectors().copy(),
                             self._timestamps[:count].copy(), self._positions[:count].copy(),
                             [dict(m) for m in self._metadata])

    def search(self, vector: np.ndarray, k: int, min_similarity: float | None = None,
               timestamp: float = math.nan, within_seconds: float = 0.0,
               exclude_last: int = 0) -> list[Found]:
        """The k most similar places (best first), skipping places within `within_seconds` of
        `timestamp` and the `exclude_last` newest, and those below min_similarity."""
        with self.lock:
            count = self.size
            excluded = np.zeros(count, bool)
            if exclude_last:
                excluded[max(count - exclude_last, 0):] = True
            if within_seconds > 0 and not math.isnan(timestamp):
                excluded |= np.abs(self._timestamps[:count] - timestamp) <= within_seconds
            wanted = min(count, k + int(excluded.sum()))
            if wanted == 0:
                return []
            query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
            if self.meta.method == "hnsw":
                params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, wanted))
                similarities, rows = self._faiss.search(query, wanted, params=params)
            else:
                similarities, rows = self._faiss.search(query, wanted)
            found: list[Found] = []
            for row, similarity in zip(rows[0].tolist(), similarities[0].tolist(), strict=True):
                if row < 0 or excluded[row]:
                    continue
                if min_similarity is not None and similarity < min_similarity:
                    break
                found.append(self._found(row, similarity))
                if len(found) == k:
                    break
            return found

    def _found(self, row: int, similarity: float) -> Found:
        position = self._positions[row]
        return Found(self._ids[row], similarity, float(self._timestamps[row]),
                     None if np.isnan(position[0]) else tuple(position.tolist()),
                     dict(self._metadata[row]))

    def _vectors(self) -> np.ndarray:
        """A view of the descriptors inside faiss, (size, dims); valid until the next change."""
        flat = self._faiss if self.meta.method == "exact" else faiss.downcast_index(
            self._faiss.storage)
        count, dims = self.size, self.meta.dims
        if count == 0:
            return np.empty((0, dims), np.float32)
        return faiss.rev_swig_ptr(flat.get_xb(), count * dims).reshape(count, dims)

    def _append(self, rows: PlaceRows) -> None:
        """Append rows whose ids are not present; the caller holds the lock or owns the index."""
        start, added = self.size, len(rows)
        if start + added > len(self._timestamps):
            capacity = max(2 * len(self._timestamps), start + added)
            self._timestamps = np.resize(self._timestamps, capacity)
            self._positions = np.resize(self._positions, (capacity, 3))
        self._faiss.add(np.ascontiguousarray(rows.vectors, dtype=np.float32))
        self._timestamps[start:start + added] = rows.timestamps
        self._positions[start:start + added] = rows.positions
        self._ids.extend(rows.ids)
        self._metadata.extend(rows.metadata)
        for offset, place_id in enumerate(rows.ids):
            self._row_of[place_id] = start + offset
        self._string_bytes += sum(_strings_bytes(i, m)
                                  for i, m in zip(rows.ids, rows.metadata, strict=True))

    def _delete(self, doomed: list[int]) -> None:
        """Delete rows, keeping the others' order; the caller holds the lock."""
        count = self.size
        keep = np.ones(count, bool)
        keep[doomed] = False
        self._string_bytes -= sum(_strings_bytes(self._ids[i], self._metadata[i]) for i in doomed)
        kept = int(keep.sum())
        self._timestamps[:kept] = self._timestamps[:count][keep]
        self._positions[:kept] = self._positions[:count][keep]
        self._ids = [place_id for place_id, k in zip(self._ids, keep, strict=True) if k]
        self._metadata = [m for m, k in zip(self._metadata, keep, strict=True) if k]
        if self.meta.method == "hnsw":  # HNSW cannot delete: rebuild from the kept vectors
            vectors = self._vectors_of(count)[keep]
            self._faiss = _new_faiss(self.meta.dims, self.meta.method)
            if kept:
                self._faiss.add(vectors)
        else:
            self._faiss.remove_ids(faiss.IDSelectorBatch(np.asarray(doomed, dtype=np.int64)))
        self._row_of = {place_id: row for row, place_id in enumerate(self._ids)}

    def _vectors_of(self, count: int) -> np.ndarray:
        """A copy of the first `count` descriptors held by faiss."""
        return self._faiss.reconstruct_n(0, count) if count else np.empty((0, self.meta.dims),
                                                                           np.float32)
