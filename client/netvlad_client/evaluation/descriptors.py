"""Descriptors as the evaluation takes them: checked, truncated to ``dims``, read from files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from netvlad_client.evaluation.settings import EvaluationError
from netvlad_client.formats import DescriptorFile, DescriptorFileError
from netvlad_client.formats import read_descriptors as _read_file


def select_dims(descriptors: np.ndarray, dims: int | None, renormalize: bool) -> np.ndarray:
    """The first ``dims`` columns, optionally re-normalised to unit length.

    Contiguous float64 when the input is float64 (so distances use the values as given, as the
    reference's ``pdist`` does), float32 otherwise.
    """
    x = np.asarray(descriptors)
    if dims is not None and x.ndim == 2:
        if dims > x.shape[1]:
            raise EvaluationError(
                f"asked for the first {dims} descriptor dimensions but the descriptors have "
                f"only {x.shape[1]}; pass dims <= {x.shape[1]}"
            )
        x = x[:, :dims]
    x = check_descriptors(x)
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    x = np.ascontiguousarray(x, dtype=dtype)
    if renormalize:
        norms = np.sqrt(np.maximum(np.einsum("ij,ij->i", x, x, dtype=np.float64), 1e-12))
        x = (x / norms[:, None]).astype(dtype)
    return x


def missing_rows(descriptors: np.ndarray) -> np.ndarray:
    """Rows that are NaN in every value: frames without a descriptor (`--on-error skip`)."""
    return np.isnan(np.asarray(descriptors, dtype=np.float64)).all(axis=1)


def check_descriptors(
    descriptors: np.ndarray, source: str = "descriptors", *, allow_missing: bool = False
) -> np.ndarray:
    """A 2-D finite real array of descriptors, one row per frame.

    With ``allow_missing`` a row of NaN only (a frame without a descriptor) passes; a row with
    some NaN or any infinity never does.
    """
    x = np.asarray(descriptors)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise EvaluationError(
            f"{source}: expected a non-empty (frames x dims) matrix; got shape {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise EvaluationError(f"{source}: expected real numbers; got dtype {x.dtype}")
    bad = ~np.isfinite(x).all(axis=1)
    if allow_missing:
        bad &= ~missing_rows(x)
    if bad.any():
        missing = (" (a frame without a descriptor is a row of NaN only, as `evaluate "
                   "--on-error skip` writes it)" if allow_missing else "")
        raise EvaluationError(
            f"{source}: row {int(np.flatnonzero(bad)[0])} (0-based) holds NaN or infinity; "
            f"{int(bad.sum())} row(s) in all{missing}"
        )
    return x


def read_descriptors(
    path: str | Path,
    *,
    bin_dims: int | None = None,
    bin_count: int | None = None,
    allow_missing: bool = False,
) -> DescriptorFile:
    """Read a descriptor file written by ``netvlad-client describe --out`` (by its suffix).

    The formats are those of `netvlad_client.formats` (the registry `describe` writes with);
    ``.bin`` is raw float32 whose dims come from ``bin_dims``, or from ``bin_count`` (the number
    of frames) when only that is known. The values are checked as the evaluation needs them;
    ``allow_missing`` lets rows of NaN only through (frames without a descriptor, see
    `missing_rows`).
    """
    try:
        loaded = _read_file(path, dims=bin_dims, count=bin_count)
    except DescriptorFileError as exc:
        raise EvaluationError(str(exc)) from None
    values = check_descriptors(
        loaded.values, f"descriptor file {loaded.path}", allow_missing=allow_missing
    )
    return DescriptorFile(loaded.path, values.astype(np.float32, copy=False), loaded.names)
