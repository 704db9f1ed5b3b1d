"""A retrieval benchmark: database and query images with positions, read from two CSV files."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from netvlad_client.formats import is_number
from netvlad_client.retrieval.errors import RetrievalError

DEFAULT_RADIUS = 25.0


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
        header = first and len(cells) == 3 and not (is_number(cells[1]) or is_number(cells[2]))
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
