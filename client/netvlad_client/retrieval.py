"""Retrieval recall@N on the place-recognition benchmarks (Pittsburgh, Tokyo 24/7).

A benchmark is a database of images and a set of queries, each with a position (UTM easting,
northing). Every query's descriptor is searched among the database descriptors (faiss, exact
inner product of unit vectors, i.e. cosine); the query is correct at N when any of its N nearest
database images lies within the positive radius of the query's position (25 m on Pittsburgh and
Tokyo 24/7). recall@N is the share of ALL queries correct at N, as the NetVLAD paper counts it;
queries with no database image within the radius can never be correct and are counted apart.

Inputs are Relja Arandjelović's MATLAB ``dbStruct`` files (``pitts30k_test.mat``,
``tokyo247.mat``, ...) or two plain CSV files ``path,easting,northing``. faiss, scipy (for .mat
files) and matplotlib (figures) come with the ``eval`` extra and are imported only when needed,
so the thin client imports without them. docs/EVALUATION.md says how to run it.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from netvlad_client.evaluation import EvaluationError

DEFAULT_RADIUS = 25.0
DEFAULT_RECALL_NS = (1, 5, 10, 20)
DEFAULT_EXAMPLES = 8
EXAMPLE_TOP = 5
EXTRA_HINT = "pip install 'netvlad-service[eval]'"
# Query x database position distances computed per block of queries (entries per block).
_BLOCK = 1 << 22
REQUIRED_FIELDS = ("dbImageFns", "utmDb", "qImageFns", "utmQ")


class RetrievalError(EvaluationError):
    """A bad input to the retrieval evaluation; the message says what is wrong and what to do."""


def require(module: str, purpose: str) -> Any:
    """Import an optional dependency of the ``eval`` extra, or say which extra provides it."""
    package = {"faiss": "faiss-cpu"}.get(module, module)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RetrievalError(
            f"{purpose} needs {package}, which is not installed: {EXTRA_HINT} "
            f"(or pip install {package})"
        ) from exc


@dataclass(frozen=True)
class ImageSet:
    """Images (paths relative to ``root``) with one position (easting, northing) each."""

    paths: list[str]
    positions: np.ndarray  # (N, 2) float64
    root: Path

    def files(self) -> list[Path]:
        """The image files (absolute paths in the list are kept as they are)."""
        return [self.root / p for p in self.paths]

    def missing(self) -> list[Path]:
        """The image files that do not exist."""
        return [f for f in self.files() if not f.is_file()]


@dataclass(frozen=True)
class Benchmark:
    """A retrieval benchmark: database and queries, and the positive radius in metres."""

    name: str
    database: ImageSet
    queries: ImageSet
    radius: float
    source: str  # where it was read from, for messages


def check_missing_images(images: ImageSet, what: str, flag: str) -> None:
    """Raise, naming a few missing files and the root flag, unless every image file exists."""
    missing = images.missing()
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise RetrievalError(
            f"{len(missing)} of the {len(images.paths)} {what} images do not exist under "
            f"{images.root} ({shown}{more}); point {flag} at the folder the image paths are "
            f"relative to"
        )


def _positions(values: np.ndarray, count: int, field: str, source: str) -> np.ndarray:
    """A 2 x N MATLAB matrix of easting; northing as (N, 2) finite float64."""
    a = np.asarray(values)
    if not np.issubdtype(a.dtype, np.number) or a.ndim != 2 or a.shape[0] != 2:
        hint = " (it looks transposed: N x 2)" if a.ndim == 2 and a.shape[1] == 2 else ""
        raise RetrievalError(
            f"{source}: {field} must be a 2 x N numeric matrix (easting; northing per column), "
            f"got shape {a.shape} of {a.dtype}{hint}"
        )
    if a.shape[1] != count:
        raise RetrievalError(
            f"{source}: {field} has {a.shape[1]} positions but there are {count} image names; "
            f"they must list the same images"
        )
    p = a.T.astype(np.float64)
    bad = ~np.isfinite(p).all(axis=1)
    if bad.any():
        raise RetrievalError(
            f"{source}: {field} column {int(np.flatnonzero(bad)[0]) + 1} holds NaN or infinity"
        )
    return np.ascontiguousarray(p)


def _names(values: Any, field: str, source: str) -> list[str]:
    """Image names from a MATLAB cell array of strings (or a char matrix, one name a row)."""
    a = np.asarray(values)
    if a.dtype.kind == "U":  # a char matrix: one name per row, padded with spaces
        names = ["".join(row).strip() for row in a.reshape(a.shape[0], -1)] if a.size else []
    elif a.dtype == object:
        names = []
        for i, cell in enumerate(a.ravel(order="F"), start=1):
            text = np.asarray(cell)
            if text.dtype.kind == "U" and text.size == 0:  # MATLAB's '' is an empty char array
                names.append("")
                continue
            if text.dtype.kind != "U" or text.size != 1:
                raise RetrievalError(
                    f"{source}: {field} entry {i} is not a string (got {text.dtype}, shape "
                    f"{text.shape}); expected a cell array of image paths"
                )
            names.append(str(text.item()).strip())
    else:
        raise RetrievalError(
            f"{source}: {field} must be a cell array of image paths; got {a.dtype} {a.shape}"
        )
    empty = [i for i, n in enumerate(names, start=1) if not n]
    if empty:
        raise RetrievalError(f"{source}: {field} entry {empty[0]} is an empty image path")
    return names


def _scalar(values: Any, field: str, source: str) -> float:
    """A MATLAB 1 x 1 number."""
    a = np.asarray(values)
    if a.size != 1 or not np.issubdtype(a.dtype, np.number):
        raise RetrievalError(f"{source}: {field} must be a single number; got {a.dtype} {a.shape}")
    value = float(a.ravel()[0])
    if not math.isfinite(value):
        raise RetrievalError(f"{source}: {field} is not a finite number ({value})")
    return value


def _struct_fields(path: Path) -> dict[str, Any]:
    """The fields of the ``dbStruct`` variable (or of the file itself when it has no dbStruct)."""
    sio = require("scipy.io", f"reading the MATLAB file {path}")
    if not path.is_file():
        raise RetrievalError(f"dbStruct file {path} does not exist")
    try:
        data = sio.loadmat(path)
    except NotImplementedError as exc:  # MATLAB v7.3 files are HDF5
        raise RetrievalError(
            f"{path} is a MATLAB v7.3 (HDF5) file; save it with -v7 or convert it to the two "
            f"CSV files (path,easting,northing): {exc}"
        ) from exc
    except (ValueError, TypeError, OSError) as exc:
        raise RetrievalError(f"{path} is not a readable MATLAB .mat file: {exc}") from exc
    if "dbStruct" in data:
        struct = np.asarray(data["dbStruct"])
        if struct.dtype.names is None or struct.size != 1:
            raise RetrievalError(
                f"{path}: the dbStruct variable is not a MATLAB struct (got {struct.dtype}, "
                f"shape {struct.shape})"
            )
        record = struct.ravel()[0]
        return {name: record[name] for name in struct.dtype.names}
    fields = {k: v for k, v in data.items() if not k.startswith("__")}
    if not any(name in fields for name in REQUIRED_FIELDS):
        raise RetrievalError(
            f"{path}: no dbStruct variable in the file (it holds: "
            f"{', '.join(sorted(fields)) or 'nothing'}); expected Relja Arandjelović's dbStruct "
            f"with fields {', '.join(REQUIRED_FIELDS)}"
        )
    return fields


def read_dbstruct(
    path: str | Path, db_root: str | Path | None = None, query_root: str | Path | None = None
) -> Benchmark:
    """A benchmark from a MATLAB ``dbStruct`` file (``pitts30k_test.mat``, ``tokyo247.mat``).

    Fields used: ``dbImageFns``, ``utmDb`` (2 x N), ``qImageFns``, ``utmQ`` (2 x M), and if present
    ``numImages``, ``numQueries`` (checked against the lists), ``posDistThr`` (the radius; else
    the root of ``posDistSqThr``; else 25 m) and ``whichSet``. Database paths are relative to
    ``db_root`` (default: the file's folder), query paths to ``query_root`` (default: db_root).
    """
    p = Path(path)
    fields = _struct_fields(p)
    source = f"dbStruct file {p}"
    missing = [name for name in REQUIRED_FIELDS if name not in fields]
    if missing:
        raise RetrievalError(
            f"{source} lacks the field(s) {', '.join(missing)} (it has: "
            f"{', '.join(fields) or 'none'}); a dbStruct needs {', '.join(REQUIRED_FIELDS)}"
        )
    db_names = _names(fields["dbImageFns"], "dbImageFns", source)
    q_names = _names(fields["qImageFns"], "qImageFns", source)
    for name, field, count in (
        ("database images", "dbImageFns", len(db_names)),
        ("queries", "qImageFns", len(q_names)),
    ):
        if count == 0:
            raise RetrievalError(f"{source}: {field} is empty; a benchmark needs {name}")
    for count_field, names_field, count in (
        ("numImages", "dbImageFns", len(db_names)),
        ("numQueries", "qImageFns", len(q_names)),
    ):
        if count_field in fields:
            declared = _scalar(fields[count_field], count_field, source)
            if declared != count:
                raise RetrievalError(
                    f"{source}: {count_field} says {declared:g} but {names_field} lists {count} "
                    f"images; the file is inconsistent (truncated or edited?)"
                )
    db_positions = _positions(fields["utmDb"], len(db_names), "utmDb", source)
    q_positions = _positions(fields["utmQ"], len(q_names), "utmQ", source)
    radius = DEFAULT_RADIUS
    if "posDistThr" in fields:
        radius = _scalar(fields["posDistThr"], "posDistThr", source)
        if "posDistSqThr" in fields:
            squared = _scalar(fields["posDistSqThr"], "posDistSqThr", source)
            if not math.isclose(squared, radius**2, rel_tol=1e-6):
                raise RetrievalError(
                    f"{source}: posDistSqThr {squared:g} is not posDistThr^2 ({radius:g}^2); "
                    f"fix the file or give the radius with --radius"
                )
    elif "posDistSqThr" in fields:
        radius = math.sqrt(max(0.0, _scalar(fields["posDistSqThr"], "posDistSqThr", source)))
    if radius <= 0:
        raise RetrievalError(f"{source}: the positive radius (posDistThr) must be positive")
    which = fields.get("whichSet")
    which_text = str(np.asarray(which).ravel()[0]) if which is not None and np.size(which) else ""
    root = Path(db_root) if db_root is not None else p.parent
    return Benchmark(
        name=f"{p.stem}" + (f" ({which_text})" if which_text and which_text not in p.stem else ""),
        database=ImageSet(db_names, db_positions, root),
        queries=ImageSet(q_names, q_positions, Path(query_root) if query_root else root),
        radius=radius,
        source=source,
    )


def _is_number(text: str) -> bool:
    """Whether text parses as a float."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_position_csv(path: str | Path, root: str | Path | None = None) -> ImageSet:
    """Images and positions from a CSV of ``path,easting,northing`` rows (optional header).

    Paths are relative to ``root`` (default: the CSV file's folder); blank lines and lines
    starting with '#' are skipped.
    """
    p = Path(path)
    try:
        with p.open(newline="") as handle:
            lines = list(csv.reader(handle))
    except OSError as exc:
        raise RetrievalError(f"cannot read CSV file {p}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise RetrievalError(f"CSV file {p} is not a text CSV file: {exc}") from exc
    paths: list[str] = []
    positions: list[tuple[float, float]] = []
    first = True
    for lineno, row in enumerate(lines, start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        header = first and len(cells) == 3 and not (_is_number(cells[1]) or _is_number(cells[2]))
        first = False
        if header:
            continue
        if len(cells) != 3:
            raise RetrievalError(
                f"CSV file {p} line {lineno}: expected 3 fields (path,easting,northing), got "
                f"{len(cells)}: {','.join(row)[:80]!r}"
            )
        name, east, north = cells
        if not name:
            raise RetrievalError(f"CSV file {p} line {lineno}: the image path is empty")
        try:
            e, n = float(east), float(north)
        except ValueError:
            raise RetrievalError(
                f"CSV file {p} line {lineno}: easting and northing must be numbers, got "
                f"{east!r} and {north!r}"
            ) from None
        if not (math.isfinite(e) and math.isfinite(n)):
            raise RetrievalError(f"CSV file {p} line {lineno}: the position is not finite")
        paths.append(name)
        positions.append((e, n))
    if not paths:
        raise RetrievalError(f"CSV file {p} lists no images (expected path,easting,northing rows)")
    return ImageSet(paths, np.array(positions, dtype=np.float64), Path(root) if root else p.parent)


def read_csv_benchmark(
    database: str | Path,
    queries: str | Path,
    db_root: str | Path | None = None,
    query_root: str | Path | None = None,
    radius: float = DEFAULT_RADIUS,
) -> Benchmark:
    """A benchmark from two CSV files; each one's paths are relative to its root or folder."""
    return Benchmark(
        name=Path(queries).stem,
        database=read_position_csv(database, db_root),
        queries=read_position_csv(queries, query_root or db_root),
        radius=radius,
        source=f"CSV files {database} and {queries}",
    )


def prepare_descriptors(values: np.ndarray, dims: int | None, what: str) -> np.ndarray:
    """The first ``dims`` values of each row (None = all), scaled to unit length, as float32."""
    x = np.asarray(values)
    if x.ndim != 2 or 0 in x.shape:
        raise RetrievalError(f"{what}: expected a non-empty (images x dims) matrix; got {x.shape}")
    if dims is not None:
        if dims < 1 or dims > x.shape[1]:
            raise RetrievalError(
                f"--dims {dims} is outside 1..{x.shape[1]}, the dimensions of the {what}; pass "
                f"--dims {x.shape[1]} or 0 for all"
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


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure without pyplot (no GUI backend, no global state)."""
    require("matplotlib", "drawing the figures (or pass --no-plots)")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_recall_curve(result: RetrievalResult, path: str | Path) -> Path:
    """recall@N against N (1..K) as a PNG, the requested N marked and labelled."""
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot()
    curve = result.recall_curve() * 100
    ns = np.arange(1, len(curve) + 1)
    ax.plot(ns, curve, "o-", markersize=3, linewidth=1.5)
    for n, r in result.recall_at.items():
        if n <= len(curve):
            ax.annotate(f"@{n}: {100 * r:.1f}", (n, 100 * r), textcoords="offset points",
                        xytext=(4, -12), fontsize=8)
    ax.set_xlabel("N (database images retrieved)")
    ax.set_ylabel("recall@N (%)")
    ax.set_xlim(0.5, len(curve) + 2.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(max(0.0, float(curve.min()) - 5), 100.5)
    ax.grid(True, alpha=0.3)
    ax.set_title(
        f"{result.benchmark.name}: {len(result.benchmark.queries.paths)} queries, "
        f"{result.dims} dims, {result.radius:g} m"
    )
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out


def choose_examples(result: RetrievalResult, count: int = DEFAULT_EXAMPLES) -> list[int]:
    """Queries to show, in order: up to half of them wrong at rank 1, the rest spread evenly."""
    m = len(result.benchmark.queries.paths)
    count = max(0, min(count, m))
    failures = np.flatnonzero(~result.correct[:, 0])
    take = min(len(failures), count // 2)
    chosen = {int(failures[i]) for i in np.linspace(0, len(failures) - 1, take).round().astype(int)}
    for i in np.linspace(0, m - 1, count).round().astype(int):
        if len(chosen) >= count:
            break
        chosen.add(int(i))
    extra = (i for i in range(m) if i not in chosen)
    while len(chosen) < count:
        chosen.add(next(extra))
    return sorted(chosen)


def _show(ax: Any, image_path: Path, colour: str | None, title: str) -> None:
    """One image in a frame of `colour` (None: a neutral frame) with a small title."""
    from matplotlib.image import imread

    try:
        pixels = imread(image_path)
    except (OSError, ValueError, SyntaxError) as exc:
        raise RetrievalError(f"cannot read the image {image_path} for the figure: {exc}") from exc
    ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour or "black")
        spine.set_linewidth(5 if colour else 1)
    ax.set_title(title, fontsize=7)


def plot_examples(
    result: RetrievalResult,
    path: str | Path,
    queries: Sequence[int] | None = None,
    top: int = EXAMPLE_TOP,
) -> Path:
    """For each chosen query: the query image, then its top retrieved database images, each
    framed green (within the radius of the query) or red."""
    chosen = list(queries) if queries is not None else choose_examples(result)
    if not chosen:
        raise RetrievalError("no queries to show in the example figure")
    top = min(top, result.retrieved.shape[1])
    b = result.benchmark
    fig = _figure(1.9 * (top + 1), 0.5 + 1.8 * len(chosen))
    grid = fig.subplots(len(chosen), top + 1, squeeze=False)
    db_files, q_files = b.database.files(), b.queries.files()
    for row, qi in enumerate(chosen):
        _show(grid[row][0], q_files[qi], None, f"query {qi}")
        for r in range(top):
            j = int(result.retrieved[qi, r])
            ok = bool(result.correct[qi, r])
            _show(
                grid[row][r + 1],
                db_files[j],
                "#1a9641" if ok else "#d7191c",
                f"#{r + 1} db {j}, {result.retrieved_distance[qi, r]:.0f} m",
            )
    fig.suptitle(
        f"{b.name}: query, then top {top} (green: within {result.radius:g} m, red: not)",
        fontsize=9,
    )
    out = Path(path)
    fig.savefig(out, dpi=100)
    return out
