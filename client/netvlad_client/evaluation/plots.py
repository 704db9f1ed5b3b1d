"""The evaluation's figures: PR curves, confusion matrices, the trajectory with its closures.

matplotlib is imported only inside these functions, so the evaluation runs without it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from netvlad_client.evaluation.prcurve import Evaluation
from netvlad_client.evaluation.settings import EvaluationError, check_positions

_TITLE_CHARACTERS = 60  # a title line of a 6-inch figure


def require_matplotlib(instead: str = "skip the figures") -> None:
    """Raise EvaluationError, saying what to do `instead`, when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise EvaluationError(
            f"plotting needs matplotlib: pip install 'netvlad-service[plot]' (or {instead})"
        ) from exc


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure without pyplot (no GUI backend, no global state)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_pr_curves(
    curves: Sequence[tuple[str, Evaluation]], path: str | Path, title: str | None = None
) -> Path:
    """Draw precision against recall for one or more labelled evaluations into a PNG."""
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot()
    for label, ev in curves:
        ax.plot(
            np.concatenate([[0.0], ev.recall]),
            np.concatenate([[ev.precision[0]], ev.precision]),
            label=f"{label} (AUC {ev.auc:.4f})",
            linewidth=1.5,
        )
    s = curves[0][1].settings
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(True, alpha=0.3)
    dims = "all dims" if s.dims is None else f"first {s.dims} dims"
    ax.set_title(
        title or f"Place recognition PR ({dims}, radius {s.radius:g}, suppression {s.suppression})"
    )
    ax.legend(loc="lower left")
    return save_figure(fig, path)


def confusion_figure(
    matrix: np.ndarray, frames: np.ndarray, title: str, colour_label: str
) -> Any:
    """One subsampled distance matrix (NaN band left blank) as a Figure.

    The title is the figure's, wrapped to the figure's width, so however long it is it sits
    above the picture and its colour bar instead of running into the bar.
    """
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot()
    last = float(frames[-1]) if len(frames) else 0.0
    image = ax.imshow(
        np.ma.masked_invalid(matrix),
        extent=(0.0, last, last, 0.0),
        interpolation="nearest",
        cmap="viridis",
    )
    fig.colorbar(image, ax=ax, label=colour_label)
    ax.set_xlabel("frame")
    ax.set_ylabel("frame")
    fig.suptitle(textwrap.fill(title, width=_TITLE_CHARACTERS))
    return fig


PLOT_PLANES = ("xy", "xz", "yz")
_CLOSURE_COLOURS = {True: "#1a9641", False: "#d7191c"}  # green: true, red: false


def trajectory_figure(
    positions: np.ndarray,
    match: np.ndarray,
    accepted: np.ndarray,
    is_true: np.ndarray,
    plane: str,
    title: str,
) -> Any:
    """The trajectory seen from above with the accepted loop closures drawn as lines.

    ``accepted`` lists frames whose best match ``match[frame]`` is accepted; ``is_true`` says
    per frame whether that match is a true positive (green line and dot) or not (red, drawn on
    top so that a few false closures among many true ones still show).
    """
    if plane not in PLOT_PLANES:
        raise EvaluationError(f"plot plane must be one of {', '.join(PLOT_PLANES)}; got {plane!r}")
    from matplotlib.collections import LineCollection

    a, b = ("xyz".index(plane[0]), "xyz".index(plane[1]))
    p = check_positions(positions)[:, [a, b]]
    fig = _figure(6.5, 6.0)
    ax = fig.add_subplot()
    ax.plot(p[:, 0], p[:, 1], color="0.55", linewidth=1.0, label="trajectory", zorder=1)
    ax.plot(*p[0], marker="o", color="black", linestyle="none", label="start", zorder=3)
    for verdict in (True, False):
        frames = accepted[is_true[accepted] == verdict]
        kind = "true" if verdict else "false"
        segments = np.stack([p[frames], p[match[frames]]], axis=1) if frames.size else []
        ax.add_collection(
            LineCollection(
                segments,
                colors=_CLOSURE_COLOURS[verdict],
                linewidths=1.2,
                alpha=0.8,
                label=f"{kind} loop closures ({frames.size})",
                zorder=2 if verdict else 3,
            )
        )
        # A dot where each closure was found: a revisit on exactly the same path draws a line
        # of no length, and the dot still shows it.
        ax.scatter(p[frames, 0], p[frames, 1], s=7, color=_CLOSURE_COLOURS[verdict],
                   zorder=2 if verdict else 3, linewidths=0)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel(f"{plane[0]} (position units)")
    ax.set_ylabel(f"{plane[1]} (position units)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.suptitle(textwrap.fill(title, width=_TITLE_CHARACTERS + 6))
    return fig


def save_figure(figure: Any, path: str | Path) -> Path:
    """Write a figure of this module as a PNG; its path."""
    out = Path(path)
    figure.savefig(out, dpi=110)
    return out
