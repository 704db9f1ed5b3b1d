"""The evaluation's settings, its error type and the input checks every step shares."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_DIMS = 128
DEFAULT_RADIUS = 5.0
DEFAULT_SUPPRESSION = 501
DEFAULT_RECALL_NS = (1, 5, 10)
DEFAULT_RECALL_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


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
