"""What `netvlad-client evaluate` shows and draws: the printed report and the figures."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import numpy as np

from netvlad_client.evaluation import (
    DEFAULT_RECALL_LEVELS,
    Evaluation,
    EvaluationSettings,
    confusion_matrices,
    plot_confusion,
    plot_pr_curves,
)


def print_report(label: str, ev: Evaluation, primary: bool, stdout: TextIO) -> None:
    """Print one evaluation: AUC line, precision at recall levels, recall@N."""
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


def write_plots(
    out: Path,
    settings: EvaluationSettings,
    max_plot_frames: int,
    curves: list[tuple[str, Evaluation]],
    descriptors: np.ndarray,
    positions: np.ndarray,
) -> dict[str, str]:
    """Write the PR curve and both confusion matrices into `out`; their paths by name."""
    pr = plot_pr_curves(curves, out / "pr_curve.png")
    cm = confusion_matrices(descriptors, positions, settings, max_plot_frames)
    step = int(cm.frames[1] - cm.frames[0]) if len(cm.frames) > 1 else 1
    every = "" if step == 1 else f", every {step}th frame"
    band = f"suppressed band of {settings.suppression} blank{every}"
    desc = plot_confusion(
        cm.descriptor,
        cm.frames,
        f"Descriptor distances ({curves[0][0]}, {band})",
        "squared descriptor distance",
        out / "confusion_descriptors.png",
    )
    pos = plot_confusion(
        cm.position,
        cm.frames,
        f"Position distances ({band})",
        "position distance",
        out / "confusion_positions.png",
    )
    return {
        "pr_curve": str(pr),
        "confusion_descriptors": str(desc),
        "confusion_positions": str(pos),
    }
