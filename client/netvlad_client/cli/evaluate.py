"""`netvlad-client evaluate`: the KITTI-style place-recognition test as a command.

Describes a sequence of images through a running server (through the same bulk path as
`describe`) or reads saved descriptors (through the format registry), compares them with the
ground-truth positions (docs/EVALUATION.md) and writes the PR curve, both confusion matrices and
a JSON summary. The maths lives in `netvlad_client.evaluation`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from netvlad_client import ClientConfig, NetVLADClient
from netvlad_client.cli.bulk import BulkSettings, describe_rows
from netvlad_client.cli.common import (
    EXIT_ERROR,
    client_config,
    concurrency_option,
    image_files,
    progress_option,
)
from netvlad_client.cli.evaluate_report import print_report, write_plots
from netvlad_client.evaluation import (
    DEFAULT_DIMS,
    DEFAULT_RADIUS,
    DEFAULT_SUPPRESSION,
    EvaluationError,
    EvaluationSettings,
    check_counts,
    evaluate,
    read_descriptors,
    read_kitti_poses,
    read_positions,
    require_matplotlib,
)
from netvlad_client.options import Option, add_options, positive_int
from netvlad_client.rowstore import RowFile

DEFAULT_OUT = Path("evaluation")
SAVED_DESCRIPTORS = "descriptors.npy"


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything one `evaluate` run needs, built once from flags and environment."""

    client: ClientConfig | None  # None when saved descriptors are evaluated
    positions: Path
    positions_kind: str  # "kitti-poses" | "positions"
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


def _dims(text: str) -> int | None:
    """--dims: a positive count, or 0 / 'all' for every dimension."""
    if text.strip().lower() in ("0", "all"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive count, 0 or 'all'; got {text}")
    return value


INPUTS = "inputs"
MATHS = "evaluation (the KITTI test's definition)"
OUTPUTS = "outputs"
OPTIONS: tuple[Option, ...] = (
    Option(("--images",), "image folder: DIR/image_0/*.png (KITTI layout) or DIR/*.png, sorted "
           "by name; described through the server unless --descriptors is given", convert=Path,
           metavar="DIR", group=INPUTS),
    Option(("--poses",), "KITTI poses file (12 numbers a row, translation at 3, 7, 11)",
           convert=Path, metavar="FILE", group=INPUTS, one_of="positions"),
    Option(("--positions",), "plain position file: x y z per row (spaces or commas)",
           convert=Path, metavar="FILE", group=INPUTS, one_of="positions"),
    Option(("--descriptors",), "saved descriptors (.npy/.npz/.csv/.json/.bin as `describe "
           "--out` writes them); skips the server", convert=Path, metavar="FILE", group=INPUTS),
    Option(("--compare",), "a second descriptor file drawn on the same PR plot", convert=Path,
           metavar="FILE", group=INPUTS),
    Option(("--label",), "legend name of the main descriptors", metavar="NAME",
           shown_default="file name", group=INPUTS),
    Option(("--compare-label",), "legend name of --compare", metavar="NAME",
           shown_default="file name", group=INPUTS),
    Option(("--dims-of-bin",), "dimensions per descriptor in a raw .bin file",
           convert=positive_int, dest="bin_dims", metavar="D",
           shown_default="inferred from the number of positions", group=INPUTS),
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
    Option(("--out",), "folder for the PNGs, summary.json and described descriptors",
           default=DEFAULT_OUT, convert=Path, env="NETVLAD_EVAL_OUT", metavar="DIR",
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
    kitti = args.poses is not None
    return EvaluateConfig(
        client=client_config(args) if args.descriptors is None else None,
        positions=args.poses if kitti else args.positions,
        positions_kind="kitti-poses" if kitti else "positions",
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
    )


def find_images(directory: Path) -> list[Path]:
    """Images of a sequence sorted by name: DIR/image_0/* (KITTI) when present, else DIR/*."""
    if not directory.is_dir():
        raise EvaluationError(
            f"--images {directory}: not a folder (expected DIR/image_0/*.png or DIR/*.png)"
        )
    kitti = directory / "image_0"
    return image_files([kitti if kitti.is_dir() else directory])


def _load_positions(config: EvaluateConfig) -> np.ndarray:
    """Positions from the KITTI poses or plain positions file."""
    if config.positions_kind == "kitti-poses":
        return read_kitti_poses(config.positions)
    return read_positions(config.positions)


def _positions_name(config: EvaluateConfig) -> str:
    """How error messages name the positions source."""
    flag = "--poses" if config.positions_kind == "kitti-poses" else "--positions"
    return f"{flag} {config.positions}"


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


def _load_main(
    config: EvaluateConfig, positions: np.ndarray, stderr: TextIO
) -> tuple[np.ndarray, str, str | None]:
    """The main descriptors, their legend label and where they were saved (if described)."""
    images = find_images(config.images) if config.images is not None else None
    if images is not None:
        check_counts(
            (_positions_name(config), len(positions)), (f"--images {config.images}", len(images))
        )
    if config.descriptors is not None:
        loaded = read_descriptors(
            config.descriptors, bin_dims=config.bin_dims, bin_count=len(positions)
        )
        check_counts(
            (_positions_name(config), len(positions)),
            (f"--descriptors {config.descriptors}", len(loaded.values)),
        )
        if images is not None:
            check_counts(
                (f"--images {config.images}", len(images)),
                (f"--descriptors {config.descriptors}", len(loaded.values)),
            )
        _check_dims(config, loaded.values.shape[-1], f"--descriptors {config.descriptors}")
        return loaded.values, config.label or config.descriptors.stem, None
    assert config.client is not None and images is not None  # config_from_args made sure
    saved = config.out / SAVED_DESCRIPTORS
    with NetVLADClient.from_config(config.client) as client:
        info = client.info()
        # Before describing anything: a wrong --dims would otherwise show only at the end.
        _check_dims(config, info.output_dims, "the server's model")
        print(f"describing {len(images)} images through {config.client.target}", file=stderr)
        config.out.mkdir(parents=True, exist_ok=True)
        rows = RowFile([str(path) for path in images], info.output_dims, output=saved, fmt="npy")
        try:
            settings = BulkSettings(concurrency=config.concurrency, progress=config.progress)
            stopped = describe_rows(client, info, rows, settings, stream=stderr)
            if stopped is not None:
                raise _Stopped(stopped)
            rows.finish(saved)
        finally:
            rows.discard()
    values = np.load(saved)
    print(f"saved the descriptors to {saved} (reuse with --descriptors)", file=stderr)
    return values, config.label or "server", str(saved)


def execute(
    config: EvaluateConfig,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> dict[str, Any]:
    """Run one evaluation end to end; returns the JSON summary it also writes."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    _check_plotting(config)
    positions = _load_positions(config)
    descriptors, label, saved = _load_main(config, positions, stderr)
    curves = [(label, evaluate(descriptors, positions, config.settings))]
    if config.compare is not None:
        other = read_descriptors(config.compare, bin_dims=config.bin_dims, bin_count=len(positions))
        check_counts(
            (_positions_name(config), len(positions)),
            (f"--compare {config.compare}", len(other.values)),
        )
        curves.append(
            (
                config.compare_label or config.compare.stem,
                evaluate(other.values, positions, config.settings),
            )
        )
    for i, (name, ev) in enumerate(curves):
        print_report(name, ev, i == 0, stdout)
    config.out.mkdir(parents=True, exist_ok=True)
    files = (
        write_plots(config.out, config.settings, config.max_plot_frames, curves, descriptors,
                    positions)
        if config.plots
        else {}
    )
    if saved:
        files["descriptors"] = saved
    summary = {
        "positions": {"file": str(config.positions), "kind": config.positions_kind},
        "images": str(config.images) if config.images else None,
        "target": config.client.target if config.client else None,
        "settings": {k: v for k, v in asdict(config.settings).items() if k != "recall_ns"},
        "results": [{"label": name, **ev.summary()} for name, ev in curves],
        "files": files,
    }
    summary_path = config.out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {', '.join([*files.values(), str(summary_path)])}", file=stderr)
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
