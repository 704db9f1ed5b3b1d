"""`netvlad-client evaluate`: the KITTI-style place-recognition test as a command.

Describes a sequence of images through a running server (through the same bulk path as
`describe`) or reads saved descriptors (through the format registry), puts the frames in order
(natural order of their names, or the timestamps in them), pairs them with the ground truth
(KITTI poses, plain positions, or a TUM / EuRoC trajectory matched by time), compares them
(docs/EVALUATION.md) and writes the PR curve, the trajectory with its loop closures, both
confusion matrices, the per-frame match list and a JSON summary, all before the report is
printed: what lands on disk never depends on who reads standard output. The maths lives in
`netvlad_client.evaluation`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from netvlad_client import ClientConfig, NetVLADClient
from netvlad_client.cli.bulk import BulkSettings, describe_rows, on_error_option, write_skipped
from netvlad_client.cli.common import (
    EXIT_ERROR,
    client_config,
    concurrency_option,
    image_files,
    progress_option,
)
from netvlad_client.cli.evaluate_report import Closures, print_report, write_matches, write_plots
from netvlad_client.evaluation import (
    DEFAULT_DIMS,
    DEFAULT_RADIUS,
    DEFAULT_SUPPRESSION,
    NS_PER_S,
    PLOT_PLANES,
    EvaluationError,
    EvaluationSettings,
    GroundTruth,
    check_counts,
    evaluate,
    frame_name,
    match_times,
    natural_order,
    read_descriptors,
    read_euroc_groundtruth,
    read_kitti_poses,
    read_positions,
    read_tum_trajectory,
    require_matplotlib,
    time_order,
)
from netvlad_client.formats import DescriptorFile
from netvlad_client.options import Option, add_options, choice, positive_int
from netvlad_client.rowstore import RowFile

DEFAULT_OUT = Path("evaluation")
SAVED_DESCRIPTORS = "descriptors.npy"
MATCHES = "matches.csv"
DEFAULT_TIME_TOLERANCE = 0.02  # seconds, as TUM's associate.py pairs streams
DEFAULT_CLOSURE_PRECISION = 0.9
# --flag: (kind in summary.json and messages, reader); the timed kinds are matched by time.
GROUND_TRUTH = {
    "poses": "kitti-poses",
    "positions": "positions",
    "tum": "tum",
    "euroc": "euroc",
}
TIMED = ("tum", "euroc")
_SHOWN = 5


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything one `evaluate` run needs, built once from flags and environment."""

    client: ClientConfig | None  # None when saved descriptors are evaluated
    positions: Path
    positions_kind: str  # "kitti-poses" | "positions" | "tum" | "euroc"
    images: Path | None
    descriptors: Path | None
    compare: Path | None
    label: str | None
    compare_label: str | None
    bin_dims: int | None
    settings: EvaluationSettings
    out: Path
    plots: bool
    max_plot_frames: int
    concurrency: int
    progress: str  # auto | always | never
    time_tolerance: float = DEFAULT_TIME_TOLERANCE  # seconds
    closure_precision: float = DEFAULT_CLOSURE_PRECISION
    plot_plane: str = "auto"  # auto | xy | xz | yz
    on_error: str = "fail"  # fail | skip: an image the server refuses (--on-error)

    @property
    def timed(self) -> bool:
        """Whether the ground truth is matched to frames by the timestamps in their names."""
        return self.positions_kind in TIMED

    @property
    def plane(self) -> str:
        """The trajectory plot's plane: x-z for KITTI's camera frame (y points down), else x-y."""
        if self.plot_plane != "auto":
            return self.plot_plane
        return "xz" if self.positions_kind == "kitti-poses" else "xy"


def _dims(text: str) -> int | None:
    """--dims: a positive count, or 0 / 'all' for every dimension."""
    if text.strip().lower() in ("0", "all"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive count, 0 or 'all'; got {text}")
    return value


def _tolerance(text: str) -> float:
    """--time-tolerance: seconds, >= 0."""
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0; got {text}")
    return value


def _precision(text: str) -> float:
    """--closure-precision: a precision in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a precision above 0 and at most 1; got {text}")
    return value


INPUTS = "inputs"
MATHS = "evaluation (the KITTI test's definition)"
OUTPUTS = "outputs"
OPTIONS: tuple[Option, ...] = (
    Option(("--images",), "image folder: DIR/image_0/* (KITTI layout) or DIR/*, in natural "
           "order of the names (frame 9 before 10), or by the timestamps in the names with "
           "--tum/--euroc; described through the server unless --descriptors is given",
           convert=Path, metavar="DIR", group=INPUTS),
    on_error_option(group=INPUTS),
    Option(("--poses",), "KITTI poses file (12 numbers a row, translation at 3, 7, 11), one "
           "row per frame", convert=Path, metavar="FILE", group=INPUTS, one_of="positions"),
    Option(("--positions",), "plain position file: x y z per row (spaces or commas), one row "
           "per frame", convert=Path, metavar="FILE", group=INPUTS, one_of="positions"),
    Option(("--tum",), "TUM RGB-D trajectory ('timestamp tx ty tz qx qy qz qw', seconds), "
           "matched to frames by the timestamp in their names", convert=Path, metavar="FILE",
           group=INPUTS, one_of="positions"),
    Option(("--euroc",), "EuRoC ground-truth CSV (state_groundtruth_estimate0/data.csv: "
           "timestamp [ns], x, y, z, ...), matched to frames by the timestamp in their names",
           convert=Path, metavar="FILE", group=INPUTS, one_of="positions"),
    Option(("--time-tolerance",), "with --tum/--euroc: a frame takes the nearest ground-truth "
           "sample at most this far in time; frames without one are left out and named",
           default=DEFAULT_TIME_TOLERANCE, convert=_tolerance, metavar="SECONDS",
           group=INPUTS),
    Option(("--descriptors",), "saved descriptors (.npy/.npz/.csv/.json/.bin as `describe "
           "--out` writes them); skips the server. Rows of a file with names are matched to "
           "--images by name, others are taken in frame order", convert=Path, metavar="FILE",
           group=INPUTS),
    Option(("--compare",), "a second descriptor file drawn on the same PR plot", convert=Path,
           metavar="FILE", group=INPUTS),
    Option(("--label",), "legend name of the main descriptors", metavar="NAME",
           shown_default="file name", group=INPUTS),
    Option(("--compare-label",), "legend name of --compare", metavar="NAME",
           shown_default="file name", group=INPUTS),
    Option(("--dims-of-bin",), "dimensions per descriptor in a raw .bin file",
           convert=positive_int, dest="bin_dims", metavar="D",
           shown_default="inferred from the number of frames", group=INPUTS),
    Option(("--dims",), "use the first N descriptor dimensions; 0 or 'all' for every one",
           default=DEFAULT_DIMS, convert=_dims, env="NETVLAD_EVAL_DIMS", metavar="N",
           group=MATHS),
    Option(("--renormalize",), "L2-normalise the truncated descriptors (what the server's dims "
           "option returns); off: raw truncation, as the reference KITTI test", default=False,
           kind="bool", env="NETVLAD_EVAL_RENORMALIZE", group=MATHS),
    Option(("--radius",), "a match is true when positions are closer than this, in position "
           "units", default=DEFAULT_RADIUS, convert=float, env="NETVLAD_EVAL_RADIUS",
           metavar="METRES", shown_default=f"{DEFAULT_RADIUS:g}", group=MATHS),
    Option(("--suppression",), "odd width of the band around the diagonal never matched: 501 "
           "ignores frames fewer than 251 apart", default=DEFAULT_SUPPRESSION, convert=int,
           env="NETVLAD_EVAL_SUPPRESSION", metavar="FRAMES", group=MATHS),
    Option(("--out",), "folder for the PNGs, summary.json, matches.csv and described "
           "descriptors", default=DEFAULT_OUT, convert=Path, env="NETVLAD_EVAL_OUT",
           metavar="DIR", group=OUTPUTS),
    Option(("--closure-precision",), "accept loop closures down to this precision (the "
           "largest recall that keeps it): drawn on trajectory.png, marked in matches.csv",
           default=DEFAULT_CLOSURE_PRECISION, convert=_precision, metavar="P", group=OUTPUTS),
    Option(("--plot-plane",), "plane of trajectory.png; auto: x-z for --poses (KITTI's camera "
           "frame, y down), x-y otherwise", default="auto",
           convert=choice(("auto", *PLOT_PLANES)), choices=("auto", *PLOT_PLANES),
           group=OUTPUTS),
    Option(("--no-plots",), "skip the PNG figures", default=True, kind="off", dest="plots",
           group=OUTPUTS),
    Option(("--max-plot-frames",), "confusion matrices show every ceil(N / this)-th frame",
           default=1000, convert=positive_int, metavar="N", group=OUTPUTS),
    progress_option("progress bar on stderr while describing (auto: on a terminal)", OUTPUTS),
    concurrency_option("requests in flight while describing", OUTPUTS, metavar="N"),
)


def register(subparsers: Any) -> None:
    """Add the `evaluate` subcommand to the netvlad-client parser; it runs `run(args)`."""
    parser = subparsers.add_parser(
        "evaluate",
        help="place-recognition precision-recall test of a sequence (KITTI style)",
        description=(
            "Describe a sequence of images through the server (or read saved descriptors), "
            "match every frame to its nearest frame outside a temporal suppression band, and "
            "score the matches against ground-truth positions: precision-recall curve, AUC, "
            "recall@N and confusion matrices."
        ),
    )
    add_options(parser, OPTIONS)
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    """Validate the parsed flags into one EvaluateConfig."""
    if args.descriptors is None and args.images is None:
        raise EvaluationError(
            "nothing to evaluate: give --images DIR (described through the server) or "
            "--descriptors FILE (saved earlier)"
        )
    settings = EvaluationSettings(
        dims=args.dims,
        renormalize=args.renormalize,
        radius=args.radius,
        suppression=args.suppression,
    )
    flag = next(key for key in GROUND_TRUTH if getattr(args, key) is not None)
    return EvaluateConfig(
        client=client_config(args, priority="bulk") if args.descriptors is None else None,
        positions=getattr(args, flag),
        positions_kind=GROUND_TRUTH[flag],
        images=args.images,
        descriptors=args.descriptors,
        compare=args.compare,
        label=args.label,
        compare_label=args.compare_label,
        bin_dims=args.bin_dims,
        settings=settings,
        out=args.out,
        plots=args.plots,
        max_plot_frames=args.max_plot_frames,
        concurrency=args.concurrency,
        progress=args.progress,
        time_tolerance=args.time_tolerance,
        closure_precision=args.closure_precision,
        plot_plane=args.plot_plane,
        on_error=args.on_error,
    )


def find_images(directory: Path) -> list[Path]:
    """Images of a sequence: DIR/image_0/* (KITTI) when present, else DIR/* (text order; the
    frame order is decided afterwards from the names)."""
    if not directory.is_dir():
        raise EvaluationError(
            f"--images {directory}: not a folder (expected DIR/image_0/*.png or DIR/*.png)"
        )
    kitti = directory / "image_0"
    return image_files([kitti if kitti.is_dir() else directory])


def _load_truth(config: EvaluateConfig) -> np.ndarray | GroundTruth:
    """Positions, one per frame (KITTI poses, plain positions), or a timed trajectory."""
    readers = {
        "kitti-poses": read_kitti_poses,
        "positions": read_positions,
        "tum": read_tum_trajectory,
        "euroc": read_euroc_groundtruth,
    }
    return readers[config.positions_kind](config.positions)


def _positions_name(config: EvaluateConfig) -> str:
    """How error messages name the ground-truth source."""
    flag = next(k for k, kind in GROUND_TRUTH.items() if kind == config.positions_kind)
    return f"--{flag} {config.positions}"


def _check_dims(config: EvaluateConfig, available: int, source: str) -> None:
    """--dims must not ask for more dimensions than the descriptors have."""
    dims = config.settings.dims
    if dims is not None and dims > available:
        raise EvaluationError(
            f"--dims {dims} asks for more dimensions than the {available} of {source}; pass "
            f"--dims {available} or --dims all"
        )


def _check_plotting(config: EvaluateConfig) -> None:
    """Refuse at once, not after describing a whole sequence, when the figures cannot be drawn."""
    if config.plots:
        require_matplotlib(instead="pass --no-plots to write only summary.json")


class _Stopped(Exception):
    """Describing stopped early (error or interrupt); the message is out, `status` is the exit."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


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


def _frames(
    config: EvaluateConfig,
    images: list[Path] | None,
    main: DescriptorFile | None,
    truth: np.ndarray | GroundTruth,
) -> Frames:
    """Order the frames and pair them with the ground truth, refusing anything ambiguous."""
    if images is not None:
        names: list[str] | None = [str(path) for path in images]
        source, count = f"--images {config.images}", len(images)
    else:
        assert main is not None  # config_from_args made sure
        names = main.names
        source, count = f"--descriptors {config.descriptors}", len(main.values)
    if isinstance(truth, GroundTruth):
        if names is None:
            raise EvaluationError(
                f"{_positions_name(config)} is matched to frames by the timestamps in their "
                f"names, but {source} carries no names; give --images DIR as well (rows in the "
                f"order this command prints), or save the descriptors as .npz or .json"
            )
        order, times = time_order(names, source)
        ordered = [names[i] for i in order]
        tolerance_ns = round(config.time_tolerance * NS_PER_S)
        nearest = match_times(times, truth, tolerance_ns)
        keep = np.flatnonzero(nearest >= 0)
        if len(keep) < 2:
            raise EvaluationError(
                f"only {len(keep)} of the {count} frames of {source} have a ground-truth sample "
                f"within {config.time_tolerance:g} s in {_positions_name(config)}: the frames "
                f"span {_seconds(times[0])} to {_seconds(times[-1])} s, the ground truth "
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
    check_counts((_positions_name(config), len(truth)), (source, count))
    return Frames(count, source, names, order, rule, np.arange(count), truth, [])


def _seconds(ns: int) -> str:
    """Nanoseconds as seconds for messages."""
    return f"{ns / NS_PER_S:.6f}"


def _rows(loaded: DescriptorFile, flag: str, frames: Frames) -> np.ndarray:
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
    missing = [frame_name(n) for n in frames.names if frame_name(n) not in
               {frame_name(m) for m in loaded.names}]
    why = (f"no row is named like {', '.join(missing[:_SHOWN])}"
           + (f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else "")
           if missing else "its names repeat")
    raise EvaluationError(
        f"{source}: {why}; its rows cannot be paired with the frames of {frames.source} (a "
        f"file with names must name each frame once, as `describe` writes them)"
    )


def _describe(config: EvaluateConfig, images: Sequence[Path], stderr: TextIO) -> np.ndarray:
    """Describe the images (in evaluation order) through the server into OUT/descriptors.npy."""
    assert config.client is not None  # config_from_args made sure
    saved = config.out / SAVED_DESCRIPTORS
    with NetVLADClient.from_config(config.client) as client:
        info = client.info()
        # Before describing anything: a wrong --dims would otherwise show only at the end.
        _check_dims(config, info.output_dims, "the server's model")
        _note(stderr, f"describing {len(images)} images through {config.client.target}")
        config.out.mkdir(parents=True, exist_ok=True)
        rows = RowFile([str(path) for path in images], info.output_dims, output=saved, fmt="npy")
        try:
            settings = BulkSettings(concurrency=config.concurrency, progress=config.progress,
                                    on_error=config.on_error)
            stopped = describe_rows(client, info, rows, settings, stream=stderr)
            if stopped is not None:
                raise _Stopped(stopped)
            if rows.skipped:  # no descriptor: NaN rows, left out of the evaluation
                rows.rows[[rows.index(name) for name in rows.skipped]] = np.nan
            write_skipped(saved.with_name(saved.name + ".skipped.tsv"), rows.skipped,
                          {name: i for i, name in enumerate(rows.names)})
            rows.finish(saved)
        finally:
            rows.discard()
    _note(stderr, f"saved the descriptors to {saved} (reuse with --descriptors)")
    return np.load(saved)


def _without_descriptors(frames: Frames, values: np.ndarray, stderr: TextIO) -> Frames:
    """The frames less those whose descriptor is NaN (an image --on-error skip left out)."""
    missing = ~np.isfinite(values[frames.keep]).all(axis=1)
    if not missing.any():
        return frames
    names = frames.kept_names
    left = [frame_name(names[i]) if names else f"#{frames.keep[i]}"
            for i in np.flatnonzero(missing)]
    shown = ", ".join(left[:_SHOWN]) + (f" and {len(left) - _SHOWN} more"
                                        if len(left) > _SHOWN else "")
    _note(stderr, f"left out {len(left)} frames whose image was skipped (--on-error skip), "
                  f"with their ground truth: {shown}")
    return replace(frames, keep=frames.keep[~missing], positions=frames.positions[~missing])


def _order_note(frames: Frames, config: EvaluateConfig) -> str:
    """The line saying which frame order was used (and what was left out)."""
    names = frames.names
    span = f": {frame_name(names[0])} ... {frame_name(names[-1])}" if names else ""
    note = f"frame order of {frames.source}: {frames.rule}{span}"
    if config.timed:
        note += (f"; {len(frames.keep)} of {frames.count} frames have ground truth within "
                 f"{config.time_tolerance:g} s")
        if frames.without_truth:
            shown = ", ".join(frame_name(n) for n in frames.without_truth[:_SHOWN])
            more = len(frames.without_truth) - _SHOWN
            note += (f"; left out {len(frames.without_truth)} without: {shown}"
                     + (f" and {more} more" if more > 0 else "") + " (listed in summary.json)")
    return note


def _silence(stream: TextIO) -> None:
    """Point a stream whose reader went away at /dev/null: later writes and the flush at exit
    then pass quietly, as `describe` ends on a closed pipe."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _emit(stream: TextIO, text: str) -> bool:
    """Write and flush text; False (and the stream silenced) when its reader went away."""
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        _silence(stream)
        return False
    return True


def _note(stderr: TextIO, line: str) -> None:
    """A progress line on stderr that never stops the run."""
    _emit(stderr, line + "\n")


def execute(
    config: EvaluateConfig,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> dict[str, Any]:
    """Run one evaluation end to end; returns the JSON summary it also writes.

    Every file is written before the report is printed, and a closed stdout (`| head -1`) ends
    the printing quietly: the results on disk never depend on who reads them.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    _check_plotting(config)
    truth = _load_truth(config)
    images = find_images(config.images) if config.images is not None else None
    frame_count = len(images) if images is not None else (
        None if isinstance(truth, GroundTruth) else len(truth))

    def read(path: Path) -> DescriptorFile:
        return read_descriptors(path, bin_dims=config.bin_dims, bin_count=frame_count)

    main = read(config.descriptors) if config.descriptors is not None else None
    frames = _frames(config, images, main, truth)
    other = None
    if config.compare is not None:  # checked before anything is described
        other = _rows(read(config.compare), "--compare", frames)
    if main is not None:
        _check_dims(config, main.values.shape[-1], f"--descriptors {config.descriptors}")
    _note(stderr, _order_note(frames, config))
    if main is not None:
        values = _rows(main, "--descriptors", frames)
        label, saved = config.label or main.path.stem, None
    else:
        assert images is not None
        values = _describe(config, [images[i] for i in frames.order], stderr)
        label, saved = config.label or "server", str(config.out / SAVED_DESCRIPTORS)
    frames = _without_descriptors(frames, values, stderr)
    descriptors = values[frames.keep]
    curves = [(label, evaluate(descriptors, frames.positions, config.settings))]
    if other is not None:
        assert config.compare is not None
        curves.append((config.compare_label or config.compare.stem,
                       evaluate(other[frames.keep], frames.positions, config.settings)))
    closures = Closures.of(curves[0][1], config.closure_precision)

    config.out.mkdir(parents=True, exist_ok=True)
    files = (
        write_plots(config.out, config.settings, config.max_plot_frames, curves, descriptors,
                    frames.positions, closures, config.plane)
        if config.plots
        else {}
    )
    files["matches"] = str(write_matches(config.out / MATCHES, curves[0][1], frames.kept_names,
                                         frames.positions, closures))
    if saved:
        files["descriptors"] = saved
    summary = {
        "positions": {"file": str(config.positions), "kind": config.positions_kind},
        "images": str(config.images) if config.images else None,
        "target": config.client.target if config.client else None,
        "settings": {k: v for k, v in asdict(config.settings).items() if k != "recall_ns"},
        "frames": {
            "given": frames.count,
            "evaluated": len(frames.keep),
            "order": frames.rule,
            "first": frames.names[0] if frames.names else None,
            "last": frames.names[-1] if frames.names else None,
            "time_tolerance": config.time_tolerance if config.timed else None,
            "without_ground_truth": frames.without_truth,
        },
        "results": [{"label": name, **ev.summary()} for name, ev in curves],
        "loop_closures": closures.summary(),
        "files": files,
    }
    summary_path = config.out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")

    report = io.StringIO()
    for i, (name, ev) in enumerate(curves):
        print_report(name, ev, i == 0, report, closures if i == 0 else None)
    _emit(stdout, report.getvalue())
    _note(stderr, f"wrote {', '.join([*files.values(), str(summary_path)])}")
    return summary


def run(args: argparse.Namespace) -> int:
    """Entry point of the subcommand: 0 on success, EXIT_ERROR with a one-line message.

    Server errors (NetVLADError) go up to `netvlad-client`'s own handler.
    """
    try:
        execute(config_from_args(args))
    except _Stopped as stopped:
        return stopped.status
    except (EvaluationError, OSError) as exc:
        print(f"netvlad-client evaluate: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0
