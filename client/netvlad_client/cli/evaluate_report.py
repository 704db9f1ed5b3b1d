"""What `netvlad-client evaluate` shows and writes: the printed report, the figures and the
per-frame match list."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from netvlad_client.evaluation import (
    DEFAULT_RECALL_LEVELS,
    Evaluation,
    EvaluationSettings,
    accepted_at_precision,
    confusion_figure,
    confusion_matrices,
    plot_pr_curves,
    save_figure,
    trajectory_figure,
)

MATCH_COLUMNS = (
    "frame", "name", "match", "match_name", "squared_distance", "acceptance_rank", "accepted",
    "true_positive", "has_true_revisit", "position_distance",
    "x", "y", "z", "match_x", "match_y", "match_z",
)


@dataclass(frozen=True)
class Closures:
    """The loop closures accepted at a chosen precision: the longest prefix of the acceptance
    order whose precision stays at or above it (the largest recall at that precision)."""

    min_precision: float
    frames: np.ndarray  # accepted frames, in acceptance order
    true: int
    false: int
    recall: float
    max_distance: float | None  # the largest accepted squared descriptor distance

    @classmethod
    def of(cls, ev: Evaluation, min_precision: float) -> Closures:
        """Accept ev's matches down to min_precision."""
        frames = accepted_at_precision(ev, min_precision)
        true = int(np.count_nonzero(ev.true_positive[frames]))
        return cls(
            min_precision=min_precision,
            frames=frames,
            true=true,
            false=len(frames) - true,
            recall=float(ev.recall[len(frames) - 1]) if len(frames) else 0.0,
            max_distance=float(ev.match_distance[frames[-1]]) if len(frames) else None,
        )

    def describe(self) -> str:
        """One line for people: how many closures, how many true, what recall."""
        at = f"precision >= {self.min_precision:g}"
        if not len(self.frames):
            return f"loop closures at {at}: none (no prefix of the matches reaches it)"
        return (
            f"loop closures at {at}: {len(self.frames)} accepted ({self.true} true, "
            f"{self.false} false), recall {self.recall:.4f}, squared descriptor distance <= "
            f"{self.max_distance:.6g}"
        )

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers."""
        return {
            "min_precision": self.min_precision,
            "accepted": len(self.frames),
            "true": self.true,
            "false": self.false,
            "recall": self.recall,
            "max_squared_distance": self.max_distance,
        }


def print_report(
    label: str, ev: Evaluation, primary: bool, stdout: TextIO, closures: Closures | None = None
) -> None:
    """Print one evaluation: AUC line, precision at recall levels, recall@N, loop closures."""
    s = ev.settings
    dims = "all dims" if s.dims is None else f"first {s.dims} dims"
    norm = "re-normalised" if s.renormalize else "raw"
    print(
        f"[{label}] {ev.num_frames} frames, {dims} ({norm}), radius {s.radius:g}, "
        f"suppression {s.suppression}; {ev.num_positives} frames have a true revisit",
        file=stdout,
    )
    print(f"AUC: {ev.auc:.10f}" if primary else f"AUC ({label}): {ev.auc:.10f}", file=stdout)
    which = "" if primary else f" ({label})"
    print(f"AUC from recall 0{which}, first match counted too: {ev.auc_from_zero:.10f}",
          file=stdout)
    for level, precision in ev.precision_at_recall(DEFAULT_RECALL_LEVELS).items():
        shown = f"{precision:.4f}" if precision is not None else "n/a (not reached)"
        print(f"  precision at recall {level:.1f}: {shown}", file=stdout)
    print("  " + "  ".join(f"recall@{n}: {r:.4f}" for n, r in ev.recall_at.items()), file=stdout)
    if closures is not None:
        print(f"  {closures.describe()}", file=stdout)


def write_matches(
    path: Path,
    ev: Evaluation,
    names: Sequence[str] | None,
    positions: np.ndarray,
    closures: Closures,
) -> Path:
    """One CSV row per frame: its best match, distance, verdicts and both positions."""
    n = ev.num_frames
    rank = np.full(n, -1)
    rank[ev.order] = np.arange(len(ev.order))
    accepted = np.zeros(n, dtype=bool)
    accepted[closures.frames] = True

    def number(value: float) -> str:
        return f"{value:.9g}"

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MATCH_COLUMNS)
        for i in range(n):
            j = int(ev.match[i])
            here = [number(v) for v in positions[i]]
            name = names[i] if names is not None else ""
            if j < 0:
                writer.writerow([i, name, "", "", "", "", 0, 0, int(ev.has_revisit[i]), "",
                                 *here, "", "", ""])
                continue
            writer.writerow([
                i, name, j, names[j] if names is not None else "",
                number(ev.match_distance[i]), int(rank[i]), int(accepted[i]),
                int(ev.true_positive[i]), int(ev.has_revisit[i]),
                number(float(np.linalg.norm(positions[i] - positions[j]))),
                *here, *(number(v) for v in positions[j]),
            ])
    return path


def write_plots(
    out: Path,
    settings: EvaluationSettings,
    max_plot_frames: int,
    curves: list[tuple[str, Evaluation]],
    descriptors: np.ndarray,
    positions: np.ndarray,
    closures: Closures,
    plane: str,
) -> dict[str, str]:
    """Write the PR curve, the trajectory with its loop closures and both confusion matrices
    into `out`; their paths by name."""
    pr = plot_pr_curves(curves, out / "pr_curve.png")
    label, ev = curves[0]
    if len(closures.frames):
        verdict = (f"{len(closures.frames)} accepted: {closures.true} true (green), "
                   f"{closures.false} false (red), recall {closures.recall:.3f}")
    else:
        verdict = "none accepted: no prefix of the matches reaches that precision"
    title = (f"Loop closures of {label} at precision >= {closures.min_precision:g} "
             f"({plane[0]}-{plane[1]} plane): {verdict}")
    trajectory = save_figure(
        trajectory_figure(positions, ev.match, closures.frames, ev.true_positive, plane, title),
        out / "trajectory.png",
    )
    cm = confusion_matrices(descriptors, positions, settings, max_plot_frames)
    step = int(cm.frames[1] - cm.frames[0]) if len(cm.frames) > 1 else 1
    every = "" if step == 1 else f", every {step}th frame"
    band = f"suppressed band of {settings.suppression} blank{every}"
    desc = save_figure(
        confusion_figure(cm.descriptor, cm.frames, f"Descriptor distances ({label}, {band})",
                         "squared descriptor distance"),
        out / "confusion_descriptors.png",
    )
    pos = save_figure(
        confusion_figure(cm.position, cm.frames, f"Position distances ({band})",
                         "position distance"),
        out / "confusion_positions.png",
    )
    return {
        "pr_curve": str(pr),
        "trajectory": str(trajectory),
        "confusion_descriptors": str(desc),
        "confusion_positions": str(pos),
    }
