"""Relja Arandjelović's MATLAB ``dbStruct`` files (``pitts30k_test.mat``, ``tokyo247.mat``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from netvlad_client.retrieval.benchmark import DEFAULT_RADIUS, Benchmark, ImageSet
from netvlad_client.retrieval.errors import RetrievalError, require

REQUIRED_FIELDS = ("dbImageFns", "utmDb", "qImageFns", "utmQ")


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
