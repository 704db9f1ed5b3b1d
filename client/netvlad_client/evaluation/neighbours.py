"""Nearest non-suppressed frames by descriptor and by position, in bounded memory.

Distances are computed in row blocks so that memory stays bounded (a few tens of MB) however
long the sequence is: no N x N matrix is ever held.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from netvlad_client.evaluation.settings import check_positions, half_width

# Distance-matrix entries held per row block: 2 M entries = 8 MB as float32 (peak ~ 5x that).
BLOCK_ELEMENTS = 1 << 21
_EPS32 = float(np.finfo(np.float32).eps)


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


def pair_sqdist(x: np.ndarray, a: np.ndarray, b: np.ndarray, block_elements: int) -> np.ndarray:
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
        exact = pair_sqdist(exact_values, rows, cols, block_elements)
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
