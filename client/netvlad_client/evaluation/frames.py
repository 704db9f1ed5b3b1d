"""Frame order: natural order of frame names, and the timestamps names carry."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from netvlad_client.evaluation.settings import EvaluationError

_DIGITS = re.compile(r"(\d+)")
SHOWN_NAMES = 5  # names a message lists before "and N more"


def shown_names(names: Sequence[str], limit: int = SHOWN_NAMES) -> str:
    """A few names for a message ("a, b, c, d, e and 7 more")."""
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


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
