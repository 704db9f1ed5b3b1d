"""Ground-truth readers: KITTI poses and plain positions (one row per frame), TUM and EuRoC
trajectories (timestamped, matched to frames by time)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from netvlad_client.evaluation.frames import NANOSECOND_DIGITS, seconds_to_ns
from netvlad_client.evaluation.settings import EvaluationError, check_positions
from netvlad_client.formats import is_number

_SPLIT = re.compile(r"[,\s]+")


def _data_lines(path: Path, what: str) -> list[tuple[int, str, list[str]]]:
    """(line number, text, fields) of each line that is neither blank nor a '#' comment."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise EvaluationError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    lines = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            lines.append((lineno, stripped, [f for f in _SPLIT.split(stripped) if f]))
    return lines


def _number_rows(path: Path, what: str) -> list[tuple[int, list[float]]]:
    """(line number, numbers) of each data line; '#' comments, blanks and one header skipped."""
    rows: list[tuple[int, list[float]]] = []
    for lineno, stripped, fields in _data_lines(path, what):
        try:
            rows.append((lineno, [float(f) for f in fields]))
        except ValueError:
            if rows or any(is_number(f) for f in fields):
                raise EvaluationError(
                    f"{what} {path} line {lineno}: not a list of numbers: {stripped[:80]!r}"
                ) from None
    if not rows:
        raise EvaluationError(f"{what} {path} holds no rows of numbers")
    return rows


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


@dataclass(frozen=True)
class GroundTruth:
    """Timestamped positions of a trajectory (TUM or EuRoC ground truth), sorted by time."""

    times_ns: np.ndarray  # int64 nanoseconds, ascending
    positions: np.ndarray  # (N, 3) float64


def _read_timed(
    path: str | Path,
    what: str,
    problem: Callable[[list[str]], str | None],
    to_ns: Callable[[str], int],
    expected: str,
) -> GroundTruth:
    """A trajectory of 'timestamp x y z ...' rows, sorted by time.

    ``problem`` says what is wrong with a row's fields (None: nothing), ``to_ns`` reads its
    timestamp, ``expected`` names the row's values when they do not parse.
    """
    p = Path(path)
    lines = _data_lines(p, what)
    if not lines:
        raise EvaluationError(f"{what} {p} holds no data rows")
    times, positions = [], []
    for lineno, _, fields in lines:
        wrong = problem(fields)
        if wrong is not None:
            raise EvaluationError(f"{what} {p} line {lineno}: {wrong}")
        try:
            times.append(to_ns(fields[0]))
            positions.append([float(f) for f in fields[1:4]])
        except ValueError:
            raise EvaluationError(
                f"{what} {p} line {lineno}: expected {expected}; got {' '.join(fields)[:80]!r}"
            ) from None
    t = np.array(times, dtype=np.int64)
    xyz = check_positions(np.array(positions), f"{what} {p}")
    order = np.argsort(t, kind="stable")
    return GroundTruth(t[order], xyz[order])


def _tum_problem(fields: list[str]) -> str | None:
    """What is wrong with the fields of a TUM row, if anything."""
    if len(fields) == 8:
        return None
    hint = {12: " (a KITTI poses file? use --poses)",
            3: " (a plain position file? use --positions)"}.get(len(fields), "")
    if len(fields) >= 4 and len(fields[0]) >= NANOSECOND_DIGITS:
        hint = " (EuRoC ground truth in nanoseconds? use --euroc)"
    return f"expected 8 values (timestamp tx ty tz qx qy qz qw), got {len(fields)}{hint}"


def _euroc_problem(fields: list[str]) -> str | None:
    """What is wrong with the fields of a EuRoC row, if anything."""
    if len(fields) < 4:
        return (f"expected a timestamp in nanoseconds and x, y, z (at least 4 values), got "
                f"{len(fields)}")
    if not fields[0].isdigit():
        hint = " (seconds? a TUM trajectory is read with --tum)" if "." in fields[0] else ""
        return f"the timestamp {fields[0]!r} is not a whole number of nanoseconds{hint}"
    return None


def read_tum_trajectory(path: str | Path) -> GroundTruth:
    """TUM RGB-D ground truth: 'timestamp tx ty tz qx qy qz qw' a row, seconds, '#' comments."""
    return _read_timed(path, "TUM trajectory", _tum_problem, seconds_to_ns,
                       "a timestamp in seconds and numbers")


def read_euroc_groundtruth(path: str | Path) -> GroundTruth:
    """EuRoC ground truth CSV (state_groundtruth_estimate0/data.csv, or leica0/vicon0):
    '#timestamp [ns], p_RS_R_x [m], p_RS_R_y [m], p_RS_R_z [m], ...' a row."""
    return _read_timed(path, "EuRoC ground truth", _euroc_problem, int,
                       "a timestamp in nanoseconds and numbers x, y, z")


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
