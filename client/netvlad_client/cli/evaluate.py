"""`netvlad-client evaluate`: the KITTI-style place-recognition test as a command.

This module is the command line: its option table, the EvaluateConfig built from the flags, and
the entry point. One run (describe or read, order, pair, compare, write, report) is
`evaluate_run`; the maths lives in `netvlad_client.evaluation` (docs/EVALUATION.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from netvlad_client.cli.bulk import on_error_option
from netvlad_client.cli.common import (
    client_config,
    concurrency_option,
    dims_setting,
    progress_option,
)
from netvlad_client.cli.evaluate_run import (
    DEFAULT_CLOSURE_PRECISION,
    DEFAULT_TIME_TOLERANCE,
    GROUND_TRUTH,
    EvaluateConfig,
    execute,
)
from netvlad_client.cli.evaluation_common import register_command, run_command
from netvlad_client.evaluation import (
    DEFAULT_DIMS,
    DEFAULT_RADIUS,
    DEFAULT_SUPPRESSION,
    PLOT_PLANES,
    EvaluationError,
    EvaluationSettings,
)
from netvlad_client.options import Option, choice, positive_int

DEFAULT_OUT = Path("evaluation")


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
           default=DEFAULT_DIMS, convert=dims_setting, env="NETVLAD_EVAL_DIMS", metavar="N",
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
    register_command(
        subparsers,
        "evaluate",
        "place-recognition precision-recall test of a sequence (KITTI style)",
        "Describe a sequence of images through the server (or read saved descriptors), match "
        "every frame to its nearest frame outside a temporal suppression band, and score the "
        "matches against ground-truth positions: precision-recall curve, AUC, recall@N and "
        "confusion matrices.",
        OPTIONS,
        run,
    )


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    """Validate the parsed flags into one EvaluateConfig."""
    if args.descriptors is None and args.images is None:
        raise EvaluationError(
            "nothing to evaluate: give --images DIR (described through the server) or "
            "--descriptors FILE (saved earlier)"
        )
    settings = EvaluationSettings(
        dims=args.dims or None,  # 0: every dimension
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


def run(args: argparse.Namespace) -> int:
    """Entry point of the subcommand: 0 on success, EXIT_ERROR with a one-line message."""
    return run_command("evaluate", lambda: execute(config_from_args(args)))
