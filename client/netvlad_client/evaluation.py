"""Place-recognition evaluation (docs/EVALUATION.md): precision-recall curve, AUC and recall@N.

NumPy only, so it runs wherever the thin client runs; matplotlib is imported lazily inside the
plotting functions. Distances are computed in row blocks so that memory stays bounded (a few tens
of MB) however long the sequence is: no N x N matrix is ever held.

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

import itertools
import math
import re
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from netvlad_client.formats import DescriptorFile, DescriptorFileError
from netvlad_client.formats import read_descriptors as _read_file

DEFAULT_DIMS = 128
DEFAULT_RADIUS = 5.0
DEFAULT_SUPPRESSION = 501
DEFAULT_RECALL_NS = (1, 5, 10)
DEFAULT_RECALL_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Distance-matrix entries held per row block: 2 M entries = 8 MB as float32 (peak ~ 5x that).
BLOCK_ELEMENTS = 1 << 21
_EPS32 = float(np.finfo(np.float32).eps)
_TITLE_CHARACTERS = 60  # a title line of a 6-inch figure


class EvaluationError(ValueError):
    """A bad input to the evaluation; the message says what was wrong and what to do."""


@dataclass(frozen=True)
class EvaluationSettings:
    """The knobs of the evaluation, validated once so every step can trust them."""

    dims: int | None = None  # first n descriptor values; None = all
    renormalize: bool = False  # L2-normalise the truncated rows
    radius: float = DEFAULT_RADIUS  # metres (position units) for a true revisit
    suppression: int = DEFAULT_SUPPRESSION  # odd band width around the diagonal
    recall_ns: tuple[int, ...] = DEFAULT_RECALL_NS

    def __post_init__(self) -> None:
        """Reject values that would make the definitions meaningless."""
        if self.dims is not None and (isinstance(self.dims, bool) or self.dims < 1):
            raise EvaluationError(f"dims must be a positive number of dimensions; got {self.dims}")
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise EvaluationError(f"radius must be a positive distance; got {self.radius}")
        half_width(self.suppression)
        if not self.recall_ns or any(int(n) != n or n < 1 for n in self.recall_ns):
            raise EvaluationError(
                f"recall@N needs positive whole numbers N; got {list(self.recall_ns)}"
            )

    @property
    def half_width(self) -> int:
        """Frames i, j with |i - j| <= half_width are suppressed."""
        return half_width(self.suppression)


def half_width(suppression: int) -> int:
    """Half-width h of a suppression band of odd width 2h + 1 (1 = only the diagonal)."""
    if isinstance(suppression, bool) or int(suppression) != suppression or suppression < 1:
        raise EvaluationError(
            f"suppression must be a positive odd number of frames; got {suppression}"
        )
    if suppression % 2 == 0:
        raise EvaluationError(
            f"suppression must be odd (a band of 2h+1 frames centred on the diagonal); "
            f"got {suppression}: use {suppression - 1} or {suppression + 1}"
        )
    return (int(suppression) - 1) // 2


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


def check_descriptors(descriptors: np.ndarray, source: str = "descriptors") -> np.ndarray:
    """A 2-D finite real array of descriptors, one row per frame."""
    x = np.asarray(descriptors)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise EvaluationError(
            f"{source}: expected a non-empty (frames x dims) matrix; got shape {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise EvaluationError(f"{source}: expected real numbers; got dtype {x.dtype}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise EvaluationError(
            f"{source}: row {int(np.flatnonzero(bad)[0])} (0-based) holds NaN or infinity; "
            f"{int(bad.sum())} row(s) in all"
        )
    return x


def check_positions(positions: np.ndarray, source: str = "positions") -> np.ndarray:
    """An (N, 3) float64 array of finite positions; (N, 2) is padded with z = 0."""
    p = np.asarray(positions, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] not in (2, 3):
        raise EvaluationError(f"{source}: expected an (N x 3) array of positions; got {p.shape}")
    if not np.isfinite(p).all():
        row = int(np.flatnonzero(~np.isfinite(p).all(axis=1))[0])
        raise EvaluationError(f"{source}: position {row} (0-based) holds NaN or infinity")
    if p.shape[1] == 2:
        p = np.column_stack([p, np.zeros(len(p))])
    return np.ascontiguousarray(p)


def check_counts(*named: tuple[str, int]) -> None:
    """Raise unless every (description, count) pair has the same count, naming both sides."""
    first_name, first_count = named[0]
    for name, count in named[1:]:
        if count != first_count:
            raise EvaluationError(
                f"{name} has {count} frames but {first_name} has {first_count}; they must "
                f"describe the same frames in the same order"
            )


def _row_blocks(rows: int, cols: int, block_elements: int) -> Iterator[tuple[int, int]]:
    """Consecutive [start, stop) row ranges holding about ``block_elements`` entries each."""
    step = max(1, block_elements // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _fill_band(block: np.ndarray, row0: int, half: int, value: float) -> None:
    """Set entries (i, j) of a row block with |i - j| <= half (i = row0 + local row) to value."""
    n = block.shape[1]
    for local in range(block.shape[0]):
        i = row0 + local
        block[local, max(0, i - half) : min(n, i + half + 1)] = value


def _pair_sqdist(x: np.ndarray, a: np.ndarray, b: np.ndarray, block_elements: int) -> np.ndarray:
    """Squared Euclidean distances of rows a[m], b[m] in float64, chunked to bound memory."""
    out = np.empty(len(a), dtype=np.float64)
    step = max(1, block_elements // x.shape[1])
    for s in range(0, len(a), step):
        diff = x[a[s : s + step]].astype(np.float64)
        diff -= x[b[s : s + step]]
        np.square(diff, out=diff)
        out[s : s + step] = diff.sum(axis=1)
    return out


def nearest_matches(
    descriptors: np.ndarray,
    suppression: int,
    k: int = 1,
    *,
    block_elements: int = BLOCK_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Each frame's k nearest non-suppressed frames: (N, k) indices and squared distances.

    Rows are sorted by distance, equal distances by lowest index; missing entries (fewer than k
    candidates) are -1 and inf. A float32 matrix product per row block finds a shortlist that
    provably holds the exact k nearest (its error bound, which also covers rounding float64
    input to float32, is added to the k-th value), and the shortlist is ranked by float64
    distances of the given values, so identical descriptors tie exactly.
    """
    given = np.asarray(descriptors)
    exact_values = np.ascontiguousarray(
        given, dtype=np.float64 if given.dtype == np.float64 else np.float32
    )
    x = np.ascontiguousarray(given, dtype=np.float32)
    n, d = x.shape
    half = half_width(suppression)
    k = max(1, min(int(k), n))
    sq = np.einsum("ij,ij->i", x, x)
    # Worst-case rounding error of the float32 squared distance of row i to any row.
    tol = (2 * d + 8) * _EPS32 * (sq.astype(np.float64) + float(sq.max()))
    idx_out = np.full((n, k), -1, dtype=np.int64)
    dist_out = np.full((n, k), np.inf)
    for r0, r1 in _row_blocks(n, n, block_elements):
        g = x[r0:r1] @ x.T  # B x N float32
        g *= -2.0
        g += sq[None, :]
        g += sq[r0:r1, None]
        np.maximum(g, 0.0, out=g)
        _fill_band(g, r0, half, np.inf)
        kth = np.partition(g, k - 1, axis=1)[:, k - 1].astype(np.float64)
        limit = np.nextafter((kth + 2 * tol[r0:r1]).astype(np.float32), np.float32(np.inf))
        rows, cols = np.nonzero(g <= limit[:, None])
        finite = np.isfinite(g[rows, cols])
        rows, cols = rows[finite] + r0, cols[finite]
        exact = _pair_sqdist(exact_values, rows, cols, block_elements)
        order = np.lexsort((cols, exact, rows))
        rows, cols, exact = rows[order], cols[order], exact[order]
        starts = np.searchsorted(rows, np.arange(r0, r1))
        rank = np.arange(len(rows)) - starts[rows - r0]
        keep = rank < k
        idx_out[rows[keep], rank[keep]] = cols[keep]
        dist_out[rows[keep], rank[keep]] = exact[keep]
    return idx_out, dist_out


def nearest_position_distances(
    positions: np.ndarray, suppression: int, *, block_elements: int = BLOCK_ELEMENTS
) -> np.ndarray:
    """Ground truth: each frame's smallest squared position distance to a non-suppressed frame."""
    p = check_positions(positions)
    n = len(p)
    half = half_width(suppression)
    out = np.full(n, np.inf)
    # Two float64 temporaries per entry: a quarter of the entries keeps this pass the smaller.
    for r0, r1 in _row_blocks(n, n, max(1, block_elements // 4)):
        d2 = np.zeros((r1 - r0, n))
        for c in range(p.shape[1]):
            t = p[r0:r1, c, None] - p[None, :, c]
            np.square(t, out=t)
            d2 += t
        _fill_band(d2, r0, half, np.inf)
        out[r0:r1] = d2.min(axis=1)
    return out


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
    pair_d2[valid] = _pair_sqdist(p, rows[valid], neighbours[valid], block_elements)
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


# --------------------------------------------------------------------------- plotting


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
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out


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


def plot_confusion(
    matrix: np.ndarray, frames: np.ndarray, title: str, colour_label: str, path: str | Path
) -> Path:
    """Draw one subsampled distance matrix (NaN band left blank) into a PNG."""
    out = Path(path)
    confusion_figure(matrix, frames, title, colour_label).savefig(out, dpi=110)
    return out


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


def plot_trajectory(
    positions: np.ndarray,
    match: np.ndarray,
    accepted: np.ndarray,
    is_true: np.ndarray,
    plane: str,
    title: str,
    path: str | Path,
) -> Path:
    """Draw the trajectory with its accepted loop closures into a PNG (see trajectory_figure)."""
    out = Path(path)
    trajectory_figure(positions, match, accepted, is_true, plane, title).savefig(out, dpi=110)
    return out


# --------------------------------------------------------------------------- file readers

_SPLIT = re.compile(r"[,\s]+")


def _number_rows(path: Path, what: str) -> list[tuple[int, list[float]]]:
    """(line number, numbers) of each data line; '#' comments, blanks and one header skipped."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise EvaluationError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    rows: list[tuple[int, list[float]]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = [f for f in _SPLIT.split(stripped) if f]
        try:
            rows.append((lineno, [float(f) for f in fields]))
        except ValueError:
            if rows or any(_is_number(f) for f in fields):
                raise EvaluationError(
                    f"{what} {path} line {lineno}: not a list of numbers: {stripped[:80]!r}"
                ) from None
    if not rows:
        raise EvaluationError(f"{what} {path} holds no rows of numbers")
    return rows


def _is_number(text: str) -> bool:
    """Whether text parses as a float."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_kitti_poses(path: str | Path) -> np.ndarray:
    """Positions (N x 3) from a KITTI poses file: 12 numbers a row, translation at 3, 7, 11."""
    p = Path(path)
    rows = _number_rows(p, "poses file")
    for lineno, values in rows:
        if len(values) != 12:
            hint = " (a plain position file? use --positions)" if len(values) in (2, 3) else ""
            raise EvaluationError(
                f"poses file {p} line {lineno}: expected 12 numbers (a row-major 3x4 KITTI "
                f"pose), got {len(values)}{hint}"
            )
    poses = np.array([v for _, v in rows])
    return check_positions(poses[:, [3, 7, 11]], f"poses file {p}")


def read_positions(path: str | Path) -> np.ndarray:
    """Positions (N x 3) from a plain text file of x y z rows (whitespace or comma separated)."""
    p = Path(path)
    rows = _number_rows(p, "positions file")
    for lineno, values in rows:
        if len(values) not in (2, 3):
            hint = " (a KITTI poses file? use --poses)" if len(values) == 12 else ""
            raise EvaluationError(
                f"positions file {p} line {lineno}: expected 3 numbers (x y z) or 2 (x y), "
                f"got {len(values)}{hint}"
            )
    widths = {len(v) for _, v in rows}
    if len(widths) > 1:
        raise EvaluationError(f"positions file {p}: rows mix 2 and 3 numbers; use one width")
    return check_positions(np.array([v for _, v in rows]), f"positions file {p}")


def read_descriptors(
    path: str | Path, *, bin_dims: int | None = None, bin_count: int | None = None
) -> DescriptorFile:
    """Read a descriptor file written by ``netvlad-client describe --out`` (by its suffix).

    The formats are those of `netvlad_client.formats` (the registry `describe` writes with);
    ``.bin`` is raw float32 whose dims come from ``bin_dims``, or from ``bin_count`` (the number
    of frames) when only that is known. The values are checked as the evaluation needs them.
    """
    try:
        loaded = _read_file(path, dims=bin_dims, count=bin_count)
    except DescriptorFileError as exc:
        raise EvaluationError(str(exc)) from None
    values = check_descriptors(loaded.values, f"descriptor file {loaded.path}")
    return DescriptorFile(loaded.path, values.astype(np.float32, copy=False), loaded.names)


# --------------------------------------------------------------------------- frame order

_DIGITS = re.compile(r"(\d+)")
_SHOWN_NAMES = 5


def _shown(names: Sequence[str]) -> str:
    """A few names for an error message ("a, b, c and 7 more")."""
    more = len(names) - _SHOWN_NAMES
    return ", ".join(names[:_SHOWN_NAMES]) + (f" and {more} more" if more > 0 else "")


def frame_name(name: str) -> str:
    """The part of a frame's name that orders it: the file name without folders."""
    return Path(name).name


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key of a frame name as people number frames: digit runs compare as numbers.

    The extension is left out, so ``9.png`` comes before ``10.png`` and ``1.png`` collides
    with ``1.jpg`` (the same frame number twice).
    """
    stem = Path(frame_name(name)).stem
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(stem))


def name_pattern(name: str) -> str:
    """A frame name with every digit run replaced by '#': frames of one sequence share it."""
    return _DIGITS.sub("#", Path(frame_name(name)).stem)


def natural_order(names: Sequence[str], source: str = "frames") -> np.ndarray:
    """Indices that put frame names into natural order, refusing any ambiguous set of names.

    Ambiguous: two names that are the same frame number (``1.png`` and ``01.png``), or
    numbered names of different patterns (``left_1.png`` and ``right_1.png``: two sequences in
    one folder). Names without any digit keep their text order.
    """
    fix = ("keep one sequence's frames, numbered alike, in the folder (or give its descriptors "
           "in frame order in a file without names, such as .npy)")
    patterns: dict[str, str] = {}
    for name in names:
        patterns.setdefault(name_pattern(name), frame_name(name))
    if len(patterns) > 1 and any("#" in pattern for pattern in patterns):
        examples = ", ".join(f"{p!r} (e.g. {n})" for p, n in list(patterns.items())[:4])
        raise EvaluationError(
            f"{source}: the frame names follow {len(patterns)} different patterns ({examples}; "
            f"# stands for a number), so their order is ambiguous; {fix}"
        )
    keys = [natural_key(name) for name in names]
    order = sorted(range(len(names)), key=lambda i: keys[i])
    for a, b in itertools.pairwise(order):
        if keys[a] == keys[b]:
            raise EvaluationError(
                f"{source}: {frame_name(names[a])} and {frame_name(names[b])} carry the same "
                f"frame number, so their order is ambiguous; rename or remove one of them"
            )
    return np.array(order, dtype=np.int64)


# --------------------------------------------------------------------------- timestamps

NS_PER_S = 1_000_000_000
# Whole numbers with this many digits or more are nanoseconds (EuRoC: 1403636579763555584).
NANOSECOND_DIGITS = 19
_NAME_TIME = re.compile(r"(\d+)(?:\.(\d+))?$")


def seconds_to_ns(text: str) -> int:
    """Exact nanoseconds of a decimal number of seconds such as '1305031102.175304'."""
    whole, _, fraction = text.strip().partition(".")
    if not whole.isdigit() or (fraction and not fraction.isdigit()):
        raise ValueError(f"not a timestamp in seconds: {text!r}")
    return int(whole) * NS_PER_S + int((fraction or "0").ljust(9, "0")[:9])


def name_time_ns(name: str) -> int:
    """The timestamp a frame's file name carries, in nanoseconds.

    The name's stem ends in the timestamp: with a decimal point it is seconds (TUM:
    ``1305031102.175304.png``); a whole number of 19 or more digits is nanoseconds (EuRoC:
    ``1403636579763555584.png``); a shorter whole number is seconds.
    """
    stem = Path(frame_name(name)).stem
    found = _NAME_TIME.search(stem)
    if found is None:
        raise EvaluationError(
            f"frame {frame_name(name)}: its name carries no timestamp (expected names such as "
            f"1305031102.175304.png in seconds or 1403636579763555584.png in nanoseconds)"
        )
    whole, fraction = found.groups()
    if fraction is None and len(whole) >= NANOSECOND_DIGITS:
        return int(whole)
    return seconds_to_ns(found.group(0))


@dataclass(frozen=True)
class GroundTruth:
    """Timestamped positions of a trajectory (TUM or EuRoC ground truth), sorted by time."""

    times_ns: np.ndarray  # int64 nanoseconds, ascending
    positions: np.ndarray  # (N, 3) float64


def _fields(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each data line; blank and '#' lines skipped."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise EvaluationError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            rows.append((lineno, [f for f in _SPLIT.split(stripped) if f]))
    if not rows:
        raise EvaluationError(f"{what} {path} holds no data rows")
    return rows


def _ground_truth(
    path: Path, what: str, rows: list[tuple[int, int, list[float]]]
) -> GroundTruth:
    """Sorted GroundTruth from (line number, nanoseconds, [x, y, z]) rows."""
    times = np.array([t for _, t, _ in rows], dtype=np.int64)
    positions = check_positions(np.array([p for _, _, p in rows]), f"{what} {path}")
    order = np.argsort(times, kind="stable")
    return GroundTruth(times[order], positions[order])


def read_tum_trajectory(path: str | Path) -> GroundTruth:
    """TUM RGB-D ground truth: 'timestamp tx ty tz qx qy qz qw' a row, seconds, '#' comments."""
    p = Path(path)
    what = "TUM trajectory"
    rows = []
    for lineno, fields in _fields(p, what):
        if len(fields) != 8:
            hint = {12: " (a KITTI poses file? use --poses)",
                    3: " (a plain position file? use --positions)"}.get(len(fields), "")
            if len(fields) >= 4 and len(fields[0]) >= NANOSECOND_DIGITS:
                hint = " (EuRoC ground truth in nanoseconds? use --euroc)"
            raise EvaluationError(
                f"{what} {p} line {lineno}: expected 8 values (timestamp tx ty tz qx qy qz qw), "
                f"got {len(fields)}{hint}"
            )
        try:
            rows.append((lineno, seconds_to_ns(fields[0]), [float(f) for f in fields[1:4]]))
        except ValueError:
            raise EvaluationError(
                f"{what} {p} line {lineno}: expected a timestamp in seconds and numbers; got "
                f"{' '.join(fields)[:80]!r}"
            ) from None
    return _ground_truth(p, what, rows)


def read_euroc_groundtruth(path: str | Path) -> GroundTruth:
    """EuRoC ground truth CSV (state_groundtruth_estimate0/data.csv, or leica0/vicon0):
    '#timestamp [ns], p_RS_R_x [m], p_RS_R_y [m], p_RS_R_z [m], ...' a row."""
    p = Path(path)
    what = "EuRoC ground truth"
    rows = []
    for lineno, fields in _fields(p, what):
        if len(fields) < 4:
            raise EvaluationError(
                f"{what} {p} line {lineno}: expected a timestamp in nanoseconds and x, y, z "
                f"(at least 4 values), got {len(fields)}"
            )
        if not fields[0].isdigit():
            hint = " (seconds? a TUM trajectory is read with --tum)" if "." in fields[0] else ""
            raise EvaluationError(
                f"{what} {p} line {lineno}: the timestamp {fields[0]!r} is not a whole number "
                f"of nanoseconds{hint}"
            )
        try:
            rows.append((lineno, int(fields[0]), [float(f) for f in fields[1:4]]))
        except ValueError:
            raise EvaluationError(
                f"{what} {p} line {lineno}: x, y, z are not numbers: {fields[1:4]}"
            ) from None
    return _ground_truth(p, what, rows)


def match_times(frame_ns: np.ndarray, truth: GroundTruth, tolerance_ns: int) -> np.ndarray:
    """Index of each frame's nearest ground-truth sample in time, -1 when none is within the
    tolerance (equally near samples: the earlier one)."""
    t = np.asarray(frame_ns, dtype=np.int64)
    gt = truth.times_ns
    after = np.clip(np.searchsorted(gt, t), 0, len(gt) - 1)
    before = np.clip(after - 1, 0, len(gt) - 1)
    gap_after = np.abs(gt[after] - t)
    gap_before = np.abs(t - gt[before])
    nearest = np.where(gap_before <= gap_after, before, after)
    gap = np.minimum(gap_before, gap_after)
    return np.where(gap <= tolerance_ns, nearest, -1)


def time_order(names: Sequence[str], source: str = "frames") -> tuple[np.ndarray, np.ndarray]:
    """Indices putting frames in time order (by the timestamps in their names), and the sorted
    timestamps; two frames with the same timestamp are refused."""
    times = np.array([name_time_ns(name) for name in names], dtype=np.int64)
    order = np.argsort(times, kind="stable")
    same = np.flatnonzero(np.diff(times[order]) == 0)
    if same.size:
        a, b = order[same[0]], order[same[0] + 1]
        raise EvaluationError(
            f"{source}: {frame_name(names[a])} and {frame_name(names[b])} carry the same "
            f"timestamp, so their order is ambiguous; remove one of them"
        )
    return order, times[order]


def accepted_at_precision(ev: Evaluation, min_precision: float) -> np.ndarray:
    """Frames whose matches are accepted as loop closures at the largest recall that keeps
    precision >= min_precision: the longest prefix of the acceptance order that does."""
    ok = np.flatnonzero(ev.precision >= min_precision - 1e-12)
    return ev.order[: int(ok[-1]) + 1] if ok.size else ev.order[:0]
