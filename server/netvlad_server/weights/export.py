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


def check_export_path(path: str | os.PathLike) -> Path:
    """Refuse an export destination that cannot be written, before any weights are read."""
    target = Path(path)
    if target.suffix != ".npz" or target.is_dir():
        raise WeightsError(f"{str(target)!r}: the export must be a file whose name ends in .npz")
    parent = target.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise WeightsError(f"the output directory {parent} {what}; create it first")
    return target


def _umask() -> int:
    """The process's file-creation mask (read by setting it and putting it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_export(weights: NetVLADWeights, path: str | os.PathLike) -> None:
    """Write `weights` to `path` (.npz) atomically: a temporary file renamed into place.

    The file gets the permissions any new file of this user gets (0666 less the umask): the
    temporary file's private 0600 must not survive the rename, or a server running as another
    user could not read the export.
    """
    target = check_export_path(path)
    entries = {FORMAT_KEY: np.array(FORMAT_VALUE), LABEL_KEY: np.array(weights.name)}
    entries.update(weights.tensors)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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
