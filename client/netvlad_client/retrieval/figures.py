"""The retrieval figures: recall@N against N, and example queries beside what they retrieved."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from netvlad_client.retrieval.errors import RetrievalError, require
from netvlad_client.retrieval.recall import RetrievalResult

DEFAULT_EXAMPLES = 8
EXAMPLE_TOP = 5


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
