"""One `netvlad-client evaluate` run, from its EvaluateConfig to the files and the report.

Describes a sequence of images through a running server (through the same bulk path as
`describe`) or reads saved descriptors (through the format registry), puts the frames in order
and pairs them with the ground truth (`evaluate_frames`), compares them (docs/EVALUATION.md)
and writes the PR curve, the trajectory with its loop closures, both confusion matrices, the
per-frame match list and a JSON summary (`evaluate_report`), all before the report is printed:
what lands on disk never depends on who reads standard output.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from netvlad_client import ClientConfig, NetVLADClient
from netvlad_client.cli.bulk import BulkSettings, describe_rows, write_skipped
from netvlad_client.cli.common import image_files
from netvlad_client.cli.evaluate_frames import (
    Frames,
    descriptor_rows,
    order_note,
    pair_frames,
    without_descriptors,
)
from netvlad_client.cli.evaluate_report import Closures, print_report, write_matches, write_plots
from netvlad_client.cli.evaluation_common import Stopped, check_dims, write_summary
from netvlad_client.evaluation import (
    EvaluationError,
    EvaluationSettings,
    GroundTruth,
    evaluate,
    read_descriptors,
    read_euroc_groundtruth,
    read_kitti_poses,
    read_positions,
    read_tum_trajectory,
    require_matplotlib,
)
from netvlad_client.formats import DescriptorFile, silence_closed_stdout
from netvlad_client.rowstore import RowFile

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
SKIPPED_WHY = "whose image was skipped (--on-error skip)"


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


def _check_plotting(config: EvaluateConfig) -> None:
    """Refuse at once, not after describing a whole sequence, when the figures cannot be drawn."""
    if config.plots:
        require_matplotlib(instead="pass --no-plots to write only summary.json")


def _frames(
    config: EvaluateConfig,
    images: list[Path] | None,
    main: DescriptorFile | None,
    truth: np.ndarray | GroundTruth,
) -> Frames:
    """The frames of --images or of --descriptors, ordered and paired with the ground truth."""
    if images is not None:
        names = [str(path) for path in images]
        return pair_frames(names, len(images), f"--images {config.images}", truth,
                           _positions_name(config), config.time_tolerance)
    assert main is not None  # config_from_args made sure
    return pair_frames(main.names, len(main.values), f"--descriptors {config.descriptors}",
                       truth, _positions_name(config), config.time_tolerance)


def _describe(config: EvaluateConfig, images: Sequence[Path], stderr: TextIO) -> np.ndarray:
    """Describe the images (in evaluation order) through the server into OUT/descriptors.npy."""
    assert config.client is not None  # config_from_args made sure
    saved = config.out / SAVED_DESCRIPTORS
    with NetVLADClient.from_config(config.client) as client:
        info = client.info()
        # Before describing anything: a wrong --dims would otherwise show only at the end.
        check_dims(config.settings.dims, info.output_dims, "the server's model")
        _note(stderr, f"describing {len(images)} images through {config.client.target}")
        config.out.mkdir(parents=True, exist_ok=True)
        rows = RowFile([str(path) for path in images], info.output_dims, output=saved, fmt="npy")
        try:
            settings = BulkSettings(concurrency=config.concurrency, progress=config.progress,
                                    on_error=config.on_error)
            stopped = describe_rows(client, info, rows, settings, stream=stderr)
            if stopped is not None:
                raise Stopped(stopped)
            if rows.skipped:  # no descriptor: NaN rows, left out of the evaluation
                rows.rows[[rows.index(name) for name in rows.skipped]] = np.nan
            write_skipped(saved.with_name(saved.name + ".skipped.tsv"), rows.skipped,
                          {name: i for i, name in enumerate(rows.names)})
            rows.finish(saved)
        finally:
            rows.discard()
    _note(stderr, f"saved the descriptors to {saved} (reuse with --descriptors)")
    return np.load(saved)


def _emit(stream: TextIO, text: str) -> bool:
    """Write and flush text; False (and the stream silenced) when its reader went away."""
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        silence_closed_stdout(stream)
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
        return read_descriptors(path, bin_dims=config.bin_dims, bin_count=frame_count,
                                allow_missing=True)

    main = read(config.descriptors) if config.descriptors is not None else None
    frames = _frames(config, images, main, truth)
    other = None
    if config.compare is not None:  # checked before anything is described
        other = descriptor_rows(read(config.compare), "--compare", frames)
    if main is not None:
        check_dims(config.settings.dims, main.values.shape[-1],
                   f"--descriptors {config.descriptors}")
    _note(stderr, order_note(frames, config.time_tolerance if config.timed else None))
    if main is not None:
        values = descriptor_rows(main, "--descriptors", frames)
        label, saved = config.label or main.path.stem, None
        why = f"without a descriptor (a row of NaN only) in --descriptors {config.descriptors}"
    else:
        assert images is not None
        values = _describe(config, [images[i] for i in frames.order], stderr)
        label, saved = config.label or "server", str(config.out / SAVED_DESCRIPTORS)
        why = SKIPPED_WHY
    if other is not None:
        why += f" or without one in --compare {config.compare}"
    frames, left_out = without_descriptors(
        frames, [values] if other is None else [values, other], why)
    if left_out is not None:
        _note(stderr, left_out)
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
    summary_path = write_summary(config.out, summary)

    report = io.StringIO()
    for i, (name, ev) in enumerate(curves):
        print_report(name, ev, i == 0, report, closures if i == 0 else None)
    _emit(stdout, report.getvalue())
    _note(stderr, f"wrote {', '.join([*files.values(), str(summary_path)])}")
    return summary


