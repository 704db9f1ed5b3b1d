"""recall@N: every query searched among the database (faiss, exact cosine) and scored against
the positions; the per-query results as JSON and CSV."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from netvlad_client.retrieval.benchmark import Benchmark
from netvlad_client.retrieval.errors import RetrievalError, require

DEFAULT_RECALL_NS = (1, 5, 10, 20)
# Query x database position distances computed per block of queries (entries per block).
_BLOCK = 1 << 22


def prepare_descriptors(values: np.ndarray, dims: int | None, what: str) -> np.ndarray:
    """The first ``dims`` values of each row (None = all), scaled to unit length, as float32."""
    x = np.asarray(values)
    if x.ndim != 2 or 0 in x.shape:
        raise RetrievalError(f"{what}: expected a non-empty (images x dims) matrix; got {x.shape}")
    if dims is not None:
        if dims < 1 or dims > x.shape[1]:
            raise RetrievalError(
                f"--dims {dims} is outside 1..{x.shape[1]}, the dimensions of the {what}; pass "
                f"--dims {x.shape[1]} or --dims all"
            )
        x = x[:, :dims]
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise RetrievalError(f"{what}: expected real numbers; got dtype {x.dtype}")
    x = np.array(x, dtype=np.float32)  # a copy: scaled in place below
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise RetrievalError(f"{what}: row {row} (0-based) holds NaN or infinity")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    if np.any(norms == 0):
        row = int(np.flatnonzero(norms == 0)[0])
        raise RetrievalError(
            f"{what}: row {row} (0-based) is all zeros in its first {x.shape[1]} values and has "
            f"no direction to compare; use more --dims"
        )
    x /= norms[:, None].astype(np.float32)
    return x


def search(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k most similar database rows: (M, k) indices and inner products, best first.

    faiss ``IndexFlatIP``: an exact search; on unit vectors the inner product is the cosine, so
    the order is that of the Euclidean distance.
    """
    faiss = require("faiss", "the retrieval search")
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database, dtype=np.float32))
    scores, indices = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return indices.astype(np.int64), scores


def nearest_positive_distances(
    database: np.ndarray, queries: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """For each query: how many database positions are within ``radius`` (<=), and the nearest."""
    count = np.zeros(len(queries), dtype=np.int64)
    nearest = np.full(len(queries), np.inf)
    step = max(1, _BLOCK // max(1, len(database)))
    for start in range(0, len(queries), step):
        diff = queries[start : start + step, None, :] - database[None, :, :]
        d = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
        count[start : start + step] = np.count_nonzero(d <= radius, axis=1)
        nearest[start : start + step] = d.min(axis=1)
    return count, nearest


@dataclass(frozen=True)
class RetrievalResult:
    """recall@N of one benchmark and what each query retrieved."""

    benchmark: Benchmark
    dims: int  # descriptor values used
    radius: float
    recall_ns: tuple[int, ...]
    retrieved: np.ndarray  # (M, K) database indices, best first
    scores: np.ndarray  # (M, K) cosine similarities
    retrieved_distance: np.ndarray  # (M, K) metres from the query to each retrieved image
    positives: np.ndarray  # (M,) database images within the radius
    nearest_database: np.ndarray  # (M,) metres to the nearest database image

    @property
    def correct(self) -> np.ndarray:
        """(M, K): retrieved image within the radius of the query."""
        return self.retrieved_distance <= self.radius

    @property
    def first_correct_rank(self) -> np.ndarray:
        """(M,) 1-based rank of the first correct image among the K retrieved, 0 if none."""
        hit = self.correct
        return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0)

    def recall_curve(self) -> np.ndarray:
        """recall@N for N = 1..K, over all queries."""
        hits = np.cumsum(self.correct, axis=1) > 0
        return hits.mean(axis=0)

    @property
    def recall_at(self) -> dict[int, float]:
        """recall@N for the requested N."""
        curve = self.recall_curve()
        return {n: float(curve[min(n, len(curve)) - 1]) for n in self.recall_ns}

    @property
    def queries_without_positive(self) -> int:
        """Queries with no database image within the radius: never correct."""
        return int(np.count_nonzero(self.positives == 0))

    def summary(self) -> dict[str, Any]:
        """The scalars, JSON-ready."""
        b = self.benchmark
        return {
            "benchmark": b.name,
            "source": b.source,
            "database_images": len(b.database.paths),
            "queries": len(b.queries.paths),
            "queries_without_positive": self.queries_without_positive,
            "radius_m": self.radius,
            "dims": self.dims,
            "recall_at": {str(n): r for n, r in self.recall_at.items()},
            "recall_curve": [float(r) for r in self.recall_curve()],
        }

    def per_query(self) -> list[dict[str, Any]]:
        """One record per query: position, positives, the retrieved images and their verdicts."""
        b = self.benchmark
        ranks = self.first_correct_rank
        records = []
        for i, name in enumerate(b.queries.paths):
            east, north = b.queries.positions[i]
            records.append(
                {
                    "query": i,
                    "path": name,
                    "easting": float(east),
                    "northing": float(north),
                    "positives": int(self.positives[i]),
                    "nearest_database_m": float(self.nearest_database[i]),
                    "first_correct_rank": int(ranks[i]) or None,
                    "correct_at": {
                        str(n): bool(self.correct[i, :n].any()) for n in self.recall_ns
                    },
                    "retrieved": [
                        {
                            "database": int(j),
                            "path": b.database.paths[j],
                            "score": float(self.scores[i, r]),
                            "distance_m": float(self.retrieved_distance[i, r]),
                            "correct": bool(self.correct[i, r]),
                        }
                        for r, j in enumerate(self.retrieved[i])
                    ],
                }
            )
        return records


def evaluate_retrieval(
    benchmark: Benchmark,
    database_descriptors: np.ndarray,
    query_descriptors: np.ndarray,
    *,
    dims: int | None = None,
    radius: float | None = None,
    recall_ns: Sequence[int] = DEFAULT_RECALL_NS,
) -> RetrievalResult:
    """Search every query among the database and score it against the positions.

    ``dims``: use the first N values of each descriptor, re-normalised (None = all); ``radius``
    overrides the benchmark's positive radius.
    """
    ns = tuple(int(n) for n in recall_ns)
    if not ns or any(n < 1 for n in ns):
        raise RetrievalError(f"recall@N needs positive whole numbers N; got {list(recall_ns)}")
    r = benchmark.radius if radius is None else float(radius)
    if not (math.isfinite(r) and r > 0):
        raise RetrievalError(f"the positive radius must be a positive distance; got {r}")
    db, q = benchmark.database, benchmark.queries
    for what, values, images in (
        ("database descriptors", database_descriptors, db),
        ("query descriptors", query_descriptors, q),
    ):
        if len(values) != len(images.paths):
            raise RetrievalError(
                f"{len(values)} {what} for {len(images.paths)} images in {benchmark.source}; "
                f"they must describe the same images in the same order"
            )
    x_db = prepare_descriptors(database_descriptors, dims, "database descriptors")
    x_q = prepare_descriptors(query_descriptors, dims, "query descriptors")
    if x_db.shape[1] != x_q.shape[1]:
        raise RetrievalError(
            f"the database descriptors have {x_db.shape[1]} values and the queries "
            f"{x_q.shape[1]}; describe both with the same model and --dims"
        )
    k = min(max(ns), len(x_db))
    retrieved, scores = search(x_db, x_q, k)
    offsets = q.positions[:, None, :] - db.positions[retrieved]
    distance = np.sqrt(np.einsum("ijk,ijk->ij", offsets, offsets))
    positives, nearest = nearest_positive_distances(db.positions, q.positions, r)
    return RetrievalResult(
        benchmark=benchmark,
        dims=x_db.shape[1],
        radius=r,
        recall_ns=ns,
        retrieved=retrieved,
        scores=scores,
        retrieved_distance=distance,
        positives=positives,
        nearest_database=nearest,
    )


def write_per_query_json(result: RetrievalResult, path: str | Path) -> Path:
    """Every query's record (see ``RetrievalResult.per_query``) as one JSON document."""
    out = Path(path)
    out.write_text(json.dumps({**result.summary(), "per_query": result.per_query()}, indent=1))
    return out


def write_per_query_csv(result: RetrievalResult, path: str | Path) -> Path:
    """One CSV row per query: position, positives, first correct rank, correct@N, top ids."""
    out = Path(path)
    ns = result.recall_ns
    ranks = result.first_correct_rank
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "query",
                "path",
                "easting",
                "northing",
                "positives",
                "nearest_database_m",
                "first_correct_rank",
                *(f"correct_at_{n}" for n in ns),
                "top1_path",
                "top1_distance_m",
                "retrieved",
            ]
        )
        for i, name in enumerate(result.benchmark.queries.paths):
            east, north = result.benchmark.queries.positions[i]
            top = int(result.retrieved[i, 0])
            writer.writerow(
                [
                    i,
                    name,
                    f"{east:.3f}",
                    f"{north:.3f}",
                    int(result.positives[i]),
                    f"{result.nearest_database[i]:.3f}",
                    int(ranks[i]),
                    *(int(result.correct[i, :n].any()) for n in ns),
                    result.benchmark.database.paths[top],
                    f"{result.retrieved_distance[i, 0]:.3f}",
                    ";".join(str(int(j)) for j in result.retrieved[i]),
                ]
            )
    return out
