"""The KITTI-style test (docs/EVALUATION.md): precision-recall curve, AUC and recall@N.

Definitions (the netvlad_tf / MATLAB KITTI test, made precise):

* Descriptors: the first ``dims`` values of each row. By default they are used as they are (raw
  truncation, what the reference KITTI test did); ``renormalize=True`` rescales each truncated row
  to unit L2 norm (MATLAB's ``cropToDim``, what the server's ``dims`` option returns).
* Suppression band of odd width ``w = 2h + 1``: frames ``i`` and ``j`` are never matched when
  ``|i - j| <= h`` (the diagonal included). ``w = 501`` suppresses pairs closer than 251 frames.
* Best match of frame ``i``: the non-suppressed frame with the smallest squared Euclidean
  descriptor distance. Float32 matrix products only shortlist candidates; the shortlist is ranked
  by float64 distances of the given values (as scipy's ``pdist`` computes them: float64 inputs
  stay float64), and among equal distances the lowest frame index wins.
* Ground truth of frame ``i``: the smallest position distance to any non-suppressed frame; the
  frame "has a true revisit" when that distance is below ``radius`` (strictly).
* Frames are accepted in increasing match distance (stable sort: equal distances keep frame
  order). An accepted match is a true positive when the two positions are closer than ``radius``.
  Recall's denominator is the number of frames with a true revisit. Frames with no candidate at
  all (sequence shorter than the band) take no part.
* AUC (the reference's, netvlad_tf's ``precision_recall.evaluate`` and MATLAB's
  ``evaluate_pr.m``): sum over accepted matches i = 2..n of (recall[i] - recall[i-1]) x
  precision[i]; the first accepted match adds no area. ``auc_from_zero`` also counts that first
  step (recall starting from 0), so a perfect ranking scores exactly 1 there and 1 - 1/P in the
  reference's figure, P the number of frames with a true revisit.
* recall@N: among frames with a true revisit, the fraction whose N nearest non-suppressed frames
  (by descriptor distance, ties by lowest index) include a true positive. recall@1 equals the
  final recall of the precision-recall curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from netvlad_client.evaluation.descriptors import select_dims
from netvlad_client.evaluation.neighbours import (
    BLOCK_ELEMENTS,
    nearest_matches,
    nearest_position_distances,
    pair_sqdist,
)
from netvlad_client.evaluation.settings import (
    DEFAULT_RECALL_LEVELS,
    EvaluationError,
    EvaluationSettings,
    check_counts,
    check_positions,
)


@dataclass(frozen=True)
class Evaluation:
    """Everything the evaluation computes for one descriptor set, per frame and as a curve."""

    settings: EvaluationSettings
    neighbours: np.ndarray  # N x k frame indices of the k nearest matches, -1 = none
    neighbour_distance: np.ndarray  # N x k squared descriptor distances, inf = none
    neighbour_is_true: np.ndarray  # N x k: position closer than radius
    gt_distance: np.ndarray  # N: nearest non-suppressed position distance, inf = none
    order: np.ndarray  # M: frames (with a candidate) in acceptance order
    precision: np.ndarray  # M: after accepting order[:m+1]
    recall: np.ndarray  # M
    auc: float  # the reference's: the first accepted match adds no area
    auc_from_zero: float  # recall starting from 0: the first step counted too
    recall_at: dict[int, float]

    @property
    def match(self) -> np.ndarray:
        """Best match per frame (-1 when the frame has no candidate)."""
        return self.neighbours[:, 0]

    @property
    def match_distance(self) -> np.ndarray:
        """Squared descriptor distance to the best match (inf when none)."""
        return self.neighbour_distance[:, 0]

    @property
    def true_positive(self) -> np.ndarray:
        """Whether each frame's best match is within the radius."""
        return self.neighbour_is_true[:, 0]

    @property
    def has_revisit(self) -> np.ndarray:
        """Frames whose ground-truth nearest non-suppressed frame is within the radius."""
        return self.gt_distance < self.settings.radius

    @property
    def num_frames(self) -> int:
        """Frames in the sequence."""
        return len(self.gt_distance)

    @property
    def num_positives(self) -> int:
        """Recall's denominator: frames with a true revisit."""
        return int(np.count_nonzero(self.has_revisit))

    def precision_at_recall(
        self, levels: Sequence[float] = DEFAULT_RECALL_LEVELS
    ) -> dict[float, float | None]:
        """Precision at the first point where recall reaches each level (None if it never does)."""
        out: dict[float, float | None] = {}
        for level in levels:
            hit = np.flatnonzero(self.recall >= level - 1e-12)
            out[level] = float(self.precision[hit[0]]) if hit.size else None
        return out

    def summary(self, levels: Sequence[float] = DEFAULT_RECALL_LEVELS) -> dict[str, Any]:
        """Scalars of the evaluation, JSON-ready."""
        s = self.settings
        return {
            "auc": self.auc,
            "auc_from_zero": self.auc_from_zero,
            "frames": self.num_frames,
            "frames_with_candidate": len(self.order),
            "frames_with_true_revisit": self.num_positives,
            "true_positive_matches": int(np.count_nonzero(self.true_positive)),
            "max_recall": float(self.recall[-1]),
            "precision_at_recall": {
                f"{lv:g}": p for lv, p in self.precision_at_recall(levels).items()
            },
            "recall_at": {str(n): r for n, r in self.recall_at.items()},
            "settings": {
                "dims": s.dims,
                "renormalize": s.renormalize,
                "radius": s.radius,
                "suppression": s.suppression,
            },
        }


def evaluate(
    descriptors: np.ndarray,
    positions: np.ndarray,
    settings: EvaluationSettings | None = None,
    *,
    block_elements: int = BLOCK_ELEMENTS,
) -> Evaluation:
    """Run the whole KITTI-style evaluation of one descriptor set against positions."""
    s = settings or EvaluationSettings()
    x = select_dims(descriptors, s.dims, s.renormalize)
    p = check_positions(positions)
    check_counts(("positions", len(p)), ("descriptors", len(x)))
    n = len(x)
    neighbours, distances = nearest_matches(
        x, s.suppression, max(s.recall_ns), block_elements=block_elements
    )
    gt = np.sqrt(nearest_position_distances(p, s.suppression, block_elements=block_elements))
    r2 = s.radius**2
    valid = neighbours >= 0
    rows = np.broadcast_to(np.arange(n)[:, None], neighbours.shape)
    pair_d2 = np.full(neighbours.shape, np.inf)
    pair_d2[valid] = pair_sqdist(p, rows[valid], neighbours[valid], block_elements)
    is_true = pair_d2 < r2

    queries = np.flatnonzero(valid[:, 0])
    if queries.size == 0:
        raise EvaluationError(
            f"a suppression band of {s.suppression} frames leaves none of the {n} frames a "
            f"match candidate; use a smaller suppression (at most {2 * n - 3})"
        )
    positives = int(np.count_nonzero(gt < s.radius))
    if positives == 0:
        raise EvaluationError(
            f"no frame has a true revisit: no two frames outside the suppression band "
            f"({s.suppression}) are closer than radius {s.radius:g}; recall is undefined. "
            f"Check the positions, or use a larger radius or a smaller suppression"
        )
    order = queries[np.argsort(distances[queries, 0], kind="stable")]
    precision, recall = precision_recall(is_true[order, 0], positives)
    recall_at = {
        int(m): float(np.count_nonzero(is_true[:, :m].any(axis=1)) / positives) for m in s.recall_ns
    }
    return Evaluation(
        settings=s,
        neighbours=neighbours,
        neighbour_distance=distances,
        neighbour_is_true=is_true,
        gt_distance=gt,
        order=order,
        precision=precision,
        recall=recall,
        auc=reference_auc(precision, recall),
        auc_from_zero=auc_from_zero(precision, recall),
        recall_at=recall_at,
    )


def precision_recall(accepted_true: np.ndarray, positives: int) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after each accepted match (given in acceptance order).

    ``accepted_true[i]`` says whether the i-th accepted match is a true positive; ``positives``
    is recall's denominator (the frames with a true revisit).
    """
    if positives < 1:
        raise EvaluationError(f"recall needs at least one true revisit; got {positives}")
    tp_cum = np.cumsum(np.asarray(accepted_true, dtype=bool))
    return tp_cum / np.arange(1, len(tp_cum) + 1), tp_cum / positives


def reference_auc(precision: np.ndarray, recall: np.ndarray) -> float:
    """The reference's area: sum over i = 2..n of (recall[i] - recall[i-1]) x precision[i].

    What netvlad_tf's ``precision_recall.evaluate`` and MATLAB's ``evaluate_pr.m`` ("const
    interpolation") compute: the first accepted match adds no area.
    """
    return float(np.sum(np.diff(recall) * precision[1:]))


def auc_from_zero(precision: np.ndarray, recall: np.ndarray) -> float:
    """The area with recall starting from 0: the reference's plus recall[1] x precision[1].

    A perfect ranking scores exactly 1 here (1 - 1/P in the reference's figure).
    """
    return reference_auc(precision, recall) + float(recall[0] * precision[0])


def accepted_at_precision(ev: Evaluation, min_precision: float) -> np.ndarray:
    """Frames whose matches are accepted as loop closures at the largest recall that keeps
    precision >= min_precision: the longest prefix of the acceptance order that does."""
    ok = np.flatnonzero(ev.precision >= min_precision - 1e-12)
    return ev.order[: int(ok[-1]) + 1] if ok.size else ev.order[:0]


@dataclass(frozen=True)
class ConfusionMatrices:
    """Subsampled distance matrices for plotting; the suppression band is NaN."""

    frames: np.ndarray  # the frame index of each row/column
    descriptor: np.ndarray  # squared descriptor distances (float32)
    position: np.ndarray  # position distances (float32)


def confusion_matrices(
    descriptors: np.ndarray,
    positions: np.ndarray,
    settings: EvaluationSettings | None = None,
    max_frames: int = 1000,
) -> ConfusionMatrices:
    """Descriptor and position distance matrices of every ceil(N / max_frames)-th frame."""
    s = settings or EvaluationSettings()
    x = select_dims(descriptors, s.dims, s.renormalize)
    p = check_positions(positions)
    check_counts(("positions", len(p)), ("descriptors", len(x)))
    step = max(1, math.ceil(len(x) / max(1, max_frames)))
    frames = np.arange(0, len(x), step)
    xs = x[frames].astype(np.float64)
    sq = np.einsum("ij,ij->i", xs, xs)
    desc = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (xs @ xs.T), 0.0)
    ps = p[frames]
    pos = np.sqrt(((ps[:, None, :] - ps[None, :, :]) ** 2).sum(axis=2))
    band = np.abs(frames[:, None] - frames[None, :]) <= s.half_width
    desc[band] = np.nan
    pos[band] = np.nan
    return ConfusionMatrices(frames, desc.astype(np.float32), pos.astype(np.float32))
