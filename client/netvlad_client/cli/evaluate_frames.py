"""Which frames `netvlad-client evaluate` compares, in which order, with which ground truth.

Frames are ordered by the natural order of their names (or the timestamps in them), paired
with the ground truth (one position per frame, or the nearest sample in time), paired with the
rows of saved descriptor files (by name where the file carries names), and frames without a
descriptor are left out with their ground truth. Anything ambiguous is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from netvlad_client.evaluation import (
    NS_PER_S,
    EvaluationError,
    GroundTruth,
    check_counts,
    frame_name,
    match_times,
    missing_rows,
    natural_order,
    shown_names,
    time_order,
)
from netvlad_client.formats import DescriptorFile


@dataclass(frozen=True)
class Frames:
    """The sequence in evaluation order, and which of its frames the ground truth covers."""

    count: int  # frames given: images, or rows of the main descriptor file
    source: str  # what gave them, for messages ("--images DIR")
    names: list[str] | None  # frame names in evaluation order; None when nothing names them
    order: np.ndarray  # for each frame in evaluation order, its index as given
    rule: str  # how the order was decided, for people
    keep: np.ndarray  # evaluation-order indices of the frames with ground truth
    positions: np.ndarray  # the ground-truth position of each kept frame
    without_truth: list[str]  # frames left out: no ground-truth sample within the tolerance

    @property
    def kept_names(self) -> list[str] | None:
        """Names of the evaluated frames."""
        return None if self.names is None else [self.names[i] for i in self.keep]


def _seconds(ns: int) -> str:
    """Nanoseconds as seconds for messages."""
    return f"{ns / NS_PER_S:.6f}"


def pair_frames(
    names: list[str] | None,
    count: int,
    source: str,
    truth: np.ndarray | GroundTruth,
    truth_source: str,
    time_tolerance: float,
) -> Frames:
    """Order the frames and pair them with the ground truth, refusing anything ambiguous.

    ``names`` (None: the frames carry none) and ``count`` are the frames as given by
    ``source``; ``truth`` is one position per frame, or a trajectory matched by time within
    ``time_tolerance`` seconds; ``truth_source`` names it in messages.
    """
    if isinstance(truth, GroundTruth):
        if names is None:
            raise EvaluationError(
                f"{truth_source} is matched to frames by the timestamps in their names, but "
                f"{source} carries no names; give --images DIR as well (rows in the order this "
                f"command prints), or save the descriptors as .npz or .json"
            )
        order, times = time_order(names, source)
        ordered = [names[i] for i in order]
        nearest = match_times(times, truth, round(time_tolerance * NS_PER_S))
        keep = np.flatnonzero(nearest >= 0)
        if len(keep) < 2:
            raise EvaluationError(
                f"only {len(keep)} of the {count} frames of {source} have a ground-truth sample "
                f"within {time_tolerance:g} s in {truth_source}: the frames span "
                f"{_seconds(times[0])} to {_seconds(times[-1])} s, the ground truth "
                f"{_seconds(truth.times_ns[0])} to {_seconds(truth.times_ns[-1])} s. Check "
                f"that the names and the ground truth share one clock, or raise --time-tolerance"
            )
        return Frames(count, source, ordered, order, "by the timestamps in the names", keep,
                      truth.positions[nearest[keep]],
                      [ordered[i] for i in np.flatnonzero(nearest < 0)])
    if names is None:
        order, rule = np.arange(count), "as stored (the file carries no names)"
    else:
        order = natural_order(names, source)
        text = sorted(range(count), key=lambda i: frame_name(names[i]))
        rule = "natural order of the names (digit runs as numbers)" + (
            "" if order.tolist() == text else ", which differs from plain text order"
        )
        names = [names[i] for i in order]
    check_counts((truth_source, len(truth)), (source, count))
    return Frames(count, source, names, order, rule, np.arange(count), truth, [])


def descriptor_rows(loaded: DescriptorFile, flag: str, frames: Frames) -> np.ndarray:
    """The rows of a descriptor file for every frame, in evaluation order.

    A file with names is matched to the frames by name (the full name, else the file name);
    a file without names must hold the frames in evaluation order.
    """
    source = f"{flag} {loaded.path}"
    check_counts((frames.source, frames.count), (source, len(loaded.values)))
    if loaded.names is None or frames.names is None:
        return loaded.values
    for key in (str, frame_name):
        row_of = {key(name): row for row, name in enumerate(loaded.names)}
        if len(row_of) == len(loaded.names) and all(key(n) in row_of for n in frames.names):
            return loaded.values[[row_of[key(name)] for name in frames.names]]
    known = {frame_name(m) for m in loaded.names}
    missing = [frame_name(n) for n in frames.names if frame_name(n) not in known]
    why = f"no row is named like {shown_names(missing)}" if missing else "its names repeat"
    raise EvaluationError(
        f"{source}: {why}; its rows cannot be paired with the frames of {frames.source} (a "
        f"file with names must name each frame once, as `describe` writes them)"
    )


def without_descriptors(
    frames: Frames, values: Sequence[np.ndarray], why: str
) -> tuple[Frames, str | None]:
    """The frames less those without a descriptor (a row of NaN only) in any of ``values``,
    and a note naming how many and which were left out, with ``why`` (None: none were)."""
    missing = np.zeros(len(frames.keep), dtype=bool)
    for rows in values:
        missing |= missing_rows(rows[frames.keep])
    if not missing.any():
        return frames, None
    names = frames.kept_names
    left = [frame_name(names[i]) if names else f"#{frames.keep[i]}"
            for i in np.flatnonzero(missing)]
    note = f"left out {len(left)} frames {why}, with their ground truth: {shown_names(left)}"
    return replace(frames, keep=frames.keep[~missing], positions=frames.positions[~missing]), note


def order_note(frames: Frames, time_tolerance: float | None) -> str:
    """The line saying which frame order was used (and, for ground truth matched by time
    within ``time_tolerance`` seconds, what was left out)."""
    names = frames.names
    span = f": {frame_name(names[0])} ... {frame_name(names[-1])}" if names else ""
    note = f"frame order of {frames.source}: {frames.rule}{span}"
    if time_tolerance is not None:
        note += (f"; {len(frames.keep)} of {frames.count} frames have ground truth within "
                 f"{time_tolerance:g} s")
        if frames.without_truth:
            shown = shown_names([frame_name(n) for n in frames.without_truth])
            note += (f"; left out {len(frames.without_truth)} without: {shown} (listed in "
                     f"summary.json)")
    return note
