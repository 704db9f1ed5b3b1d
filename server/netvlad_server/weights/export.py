"""The project's own weight format: one uncompressed .npz with a format marker and 31 tensors."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .schema import NetVLADWeights, WeightsError

FORMAT_KEY = "__netvlad_format__"
FORMAT_VALUE = "netvlad-service-weights/1"
LABEL_KEY = "__label__"  # keeps the demo warning (or the original name) through a conversion


def save_export(weights: NetVLADWeights, path: str | os.PathLike) -> None:
    """Write `weights` to `path` (.npz) atomically: a temporary file renamed into place."""
    target = Path(path)
    if target.suffix != ".npz":
        raise WeightsError(f"the export file name must end in .npz; got {str(target)!r}")
    entries = {FORMAT_KEY: np.array(FORMAT_VALUE), LABEL_KEY: np.array(weights.name)}
    entries.update(weights.tensors)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **entries)  # uncompressed: loading is a plain read
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def read_export(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """Read the tensors and label of an export, refusing .npz files that are not one."""
    expected = "expected a netvlad-service export written by `netvlad-models convert SRC DST.npz`"
    if not zipfile.is_zipfile(path):
        raise WeightsError(
            f"{path}: not a readable .npz file (not a zip archive, or cut short); {expected}"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise WeightsError(f"{path}: not a readable .npz file ({exc}); {expected}") from exc
    with archive:
        names = set(archive.files)
        marker = str(archive[FORMAT_KEY]) if FORMAT_KEY in names else None
        if marker != FORMAT_VALUE:
            found = "no format marker" if marker is None else f"format {marker!r}"
            raise WeightsError(f"{path}: not a netvlad-service export ({found}); {expected}")
        label = str(archive[LABEL_KEY]) if LABEL_KEY in names else ""
        try:
            tensors = {
                name: archive[name] for name in archive.files if name not in (FORMAT_KEY, LABEL_KEY)
            }
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise WeightsError(
                f"{path}: the export is damaged or truncated ({exc}); convert the source again"
            ) from exc
    return tensors, label
