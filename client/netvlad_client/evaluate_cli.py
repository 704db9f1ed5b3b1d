"""`netvlad-client evaluate`: the KITTI-style place-recognition test as a command.

Describes a sequence of images through a running server (or reads saved descriptors), compares
them with the ground-truth positions (SPEC.md section 3) and writes the PR curve, both confusion
matrices and a JSON summary. The maths lives in `netvlad_client.evaluation`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from netvlad_client.cli import (
    EXIT_ERROR,
    Progress,
    _positive_int,
    client_config,
    env_default,
    image_files,
)
from netvlad_client.client import ClientConfig, NetVLADClient, describe_concurrently
from netvlad_client.evaluation import (
    DEFAULT_DIMS,
    DEFAULT_RADIUS,
    DEFAULT_RECALL_LEVELS,
    DEFAULT_SUPPRESSION,
    Evaluation,
    EvaluationError,
    EvaluationSettings,
    check_counts,
    confusion_matrices,
    evaluate,
    plot_confusion,
    plot_pr_curves,
    read_descriptors,
    read_kitti_poses,
    read_positions,
    require_matplotlib,
)

DEFAULT_OUT = "evaluation"
DEFAULT_CONCURRENCY = 2
IMAGES_PER_CHUNK = 16  # images per describe call: the progress step


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


def _env(name: str, default: str) -> str:
    """The NETVLAD_EVAL_* environment fallback of a flag."""
    return os.environ.get(f"NETVLAD_EVAL_{name}", default)


def _dims(text: str) -> int | None:
    """--dims: a positive count, or 0 / 'all' for every dimension."""
    if text.strip().lower() in ("0", "all"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive count, 0 or 'all'; got {text}")
    return value


def _env_option(
    group: Any, name: str, convert: Any, default: object, metavar: str, help_text: str
) -> None:
    """Add --NAME whose default is NETVLAD_EVAL_NAME (checked after parsing) or `default`."""
    env = f"NETVLAD_EVAL_{name.upper()}"
    group.add_argument(
        f"--{name}",
        type=convert,
        default=env_default(env, convert, convert(str(default))),
        metavar=metavar,
        help=f"{help_text} (default {default}, env {env})",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the evaluate subcommand."""
    src = parser.add_argument_group("inputs")
    src.add_argument(
        "--images",
        type=Path,
        metavar="DIR",
        help="image folder: DIR/image_0/*.png (KITTI layout) or DIR/*.png, sorted by name; "
        "described through the server unless --descriptors is given",
    )
    where = src.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--poses",
        type=Path,
        metavar="FILE",
        help="KITTI poses file (12 numbers a row, translation at 3, 7, 11)",
    )
    where.add_argument(
        "--positions",
        type=Path,
        metavar="FILE",
        help="plain position file: x y z per row (spaces or commas)",
    )
    src.add_argument(
        "--descriptors",
        type=Path,
        metavar="FILE",
        help="saved descriptors (.npy/.npz/.csv/.json/.bin as `describe --out` writes them); "
        "skips the server",
    )
    src.add_argument(
        "--compare",
        type=Path,
        metavar="FILE",
        help="a second descriptor file drawn on the same PR plot",
    )
    src.add_argument(
        "--label", metavar="NAME", help="legend name of the main descriptors (default: file name)"
    )
    src.add_argument(
        "--compare-label", metavar="NAME", help="legend name of --compare (default: file name)"
    )
    src.add_argument(
        "--dims-of-bin",
        type=_positive_int,
        dest="bin_dims",
        metavar="D",
        help="dimensions per descriptor in a raw .bin file (default: inferred from the "
        "number of positions)",
    )
    maths = parser.add_argument_group("evaluation (the KITTI test's definition)")
    _env_option(
        maths,
        "dims",
        _dims,
        DEFAULT_DIMS,
        "N",
        "use the first N descriptor dimensions; 0 or 'all' for every one",
    )
    maths.add_argument(
        "--renormalize",
        action=argparse.BooleanOptionalAction,
        default=_env("RENORMALIZE", "0").strip().lower() in ("1", "true", "yes", "on"),
        help="L2-normalise the truncated descriptors (what the server's dims option returns); "
        "default off: raw truncation, as the reference KITTI test (env NETVLAD_EVAL_RENORMALIZE)",
    )
    _env_option(
        maths,
        "radius",
        float,
        f"{DEFAULT_RADIUS:g}",
        "METRES",
        "a match is true when positions are closer than this, in position units",
    )
    _env_option(
        maths,
        "suppression",
        int,
        DEFAULT_SUPPRESSION,
        "FRAMES",
        "odd width of the band around the diagonal never matched: 501 ignores frames "
        "fewer than 251 apart",
    )
    outputs = parser.add_argument_group("outputs")
    _env_option(
        outputs,
        "out",
        Path,
        DEFAULT_OUT,
        "DIR",
        "folder for the PNGs, summary.json and described descriptors",
    )
    outputs.add_argument(
        "--no-plots", dest="plots", action="store_false", help="skip the PNG figures"
    )
    outputs.add_argument(
        "--max-plot-frames",
        type=_positive_int,
        metavar="N",
        default=1000,
        help="confusion matrices show every ceil(N / this)-th frame (default 1000)",
    )
    outputs.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on stderr while describing (auto: on a terminal)",
    )
    outputs.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        default=DEFAULT_CONCURRENCY,
        help=f"requests in flight while describing (default {DEFAULT_CONCURRENCY})",
    )


def register(subparsers: Any) -> argparse.ArgumentParser:
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
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


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


def describe_images(
    client: NetVLADClient,
    images: Sequence[Path],
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: Progress | None = None,
) -> np.ndarray:
    """Describe image files through the server; (N, D) float32 in file order."""
    chunks = [images[i : i + IMAGES_PER_CHUNK] for i in range(0, len(images), IMAGES_PER_CHUNK)]
    parts: list[np.ndarray] = [np.empty((0, 0), np.float32)] * len(chunks)
    for index, rows in describe_concurrently(client, chunks, concurrency):
        parts[index] = rows
        if progress is not None:
            progress.advance(len(rows))
    if progress is not None:
        progress.close()
    return np.concatenate(parts, axis=0)


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
    assert config.client is not None  # config_from_args builds it when describing
    enabled = config.progress == "always" or (config.progress == "auto" and stderr.isatty())
    with NetVLADClient.from_config(config.client) as client:
        # Before describing anything: a wrong --dims would otherwise show only at the end.
        _check_dims(config, client.info().output_dims, "the server's model")
        print(f"describing {len(images)} images through {config.client.target}", file=stderr)
        values = describe_images(
            client,
            images,
            concurrency=config.concurrency,
            progress=Progress(len(images), enabled, stderr),
        )
    check_counts((f"--images {config.images}", len(images)), ("server answer", len(values)))
    config.out.mkdir(parents=True, exist_ok=True)
    saved = config.out / "descriptors.npy"
    np.save(saved, np.asarray(values, dtype=np.float32))
    print(f"saved the descriptors to {saved} (reuse with --descriptors)", file=stderr)
    return values, config.label or "server", str(saved)


def _report(label: str, ev: Evaluation, primary: bool, stdout: TextIO) -> None:
    """Print one evaluation: AUC line, precision at recall levels, recall@N."""
    s = ev.settings
    dims = "all dims" if s.dims is None else f"first {s.dims} dims"
    norm = "re-normalised" if s.renormalize else "raw"
    print(
        f"[{label}] {ev.num_frames} frames, {dims} ({norm}), radius {s.radius:g}, "
        f"suppression {s.suppression}; {ev.num_positives} frames have a true revisit",
        file=stdout,
    )
    print(f"AUC: {ev.auc:.6f}" if primary else f"AUC ({label}): {ev.auc:.6f}", file=stdout)
    for level, precision in ev.precision_at_recall(DEFAULT_RECALL_LEVELS).items():
        shown = f"{precision:.4f}" if precision is not None else "n/a (not reached)"
        print(f"  precision at recall {level:.1f}: {shown}", file=stdout)
    print("  " + "  ".join(f"recall@{n}: {r:.4f}" for n, r in ev.recall_at.items()), file=stdout)


def _plots(
    config: EvaluateConfig,
    curves: list[tuple[str, Evaluation]],
    descriptors: np.ndarray,
    positions: np.ndarray,
) -> dict[str, str]:
    """Write the PR curve and both confusion matrices; returns their paths by name."""
    out = config.out
    pr = plot_pr_curves(curves, out / "pr_curve.png")
    cm = confusion_matrices(descriptors, positions, config.settings, config.max_plot_frames)
    step = int(cm.frames[1] - cm.frames[0]) if len(cm.frames) > 1 else 1
    every = "" if step == 1 else f", every {step}th frame"
    band = f"suppressed band of {config.settings.suppression} blank{every}"
    desc = plot_confusion(
        cm.descriptor,
        cm.frames,
        f"Descriptor distances ({curves[0][0]}, {band})",
        "squared descriptor distance",
        out / "confusion_descriptors.png",
    )
    pos = plot_confusion(
        cm.position,
        cm.frames,
        f"Position distances ({band})",
        "position distance",
        out / "confusion_positions.png",
    )
    return {
        "pr_curve": str(pr),
        "confusion_descriptors": str(desc),
        "confusion_positions": str(pos),
    }


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
        _report(name, ev, i == 0, stdout)
    config.out.mkdir(parents=True, exist_ok=True)
    files = _plots(config, curves, descriptors, positions) if config.plots else {}
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
    except (EvaluationError, OSError) as exc:
        print(f"netvlad-client evaluate: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0
