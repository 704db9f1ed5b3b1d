"""Make docs/evaluation_example.png: `netvlad-client evaluate` on a synthetic drive.

The drive: two laps of a 300 m x 200 m city block (the second one faster and in the other lane,
1.5 m to the side), then 400 m of new road. A frame's descriptor is a smooth function of where
the camera is (random Fourier features with an ~8 m length scale, so nearby places look alike),
plus an appearance change between laps and per-frame noise; one 40 m stretch of the new road
looks like a corner of the block (perceptual aliasing), which gives confident false matches.
Two descriptor sets, "clean" and "noisy", differ only in the per-frame noise.

Usage: python scripts/make_evaluation_example.py [--out docs/evaluation_example.png]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from netvlad_client.cli import main as netvlad_client

DIMS = 256  # generated descriptor length; the evaluation uses the first 128, as on KITTI
LENGTH_SCALE = 8.0  # metres over which a place's look changes


def block_route(step: float, lane_offset: float) -> np.ndarray:
    """Points every `step` metres around a 300 x 200 m rectangle, shifted sideways (N x 2)."""
    corners = np.array([[0, 0], [300, 0], [300, 200], [0, 200], [0, 0]], dtype=float)
    points = []
    for a, b in itertools.pairwise(corners):
        length = np.linalg.norm(b - a)
        direction = (b - a) / length
        normal = np.array([-direction[1], direction[0]])  # left of the driving direction
        for s in np.arange(0.0, length, step):
            points.append(a + s * direction - lane_offset * normal)
    return np.array(points)


def drive() -> tuple[np.ndarray, np.ndarray]:
    """Positions (N x 3, y up as in KITTI: x, 0, z) and the lap number of every frame."""
    lap1 = block_route(1.0, 0.0)
    lap2 = block_route(1.25, 1.5)
    spur = np.column_stack([np.full(400, 300.0), -np.arange(1.0, 401.0)])  # heads away south
    xy = np.vstack([lap1, lap2, spur])
    lap = np.concatenate([np.zeros(len(lap1)), np.ones(len(lap2)), np.full(len(spur), 2)])
    return np.column_stack([xy[:, 0], np.zeros(len(xy)), xy[:, 1]]), lap.astype(int)


def descriptors(positions: np.ndarray, lap: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """Unit-length descriptors: the place's look + a per-lap change + per-frame noise."""
    rng = np.random.default_rng(0)  # the world is the same for both descriptor sets
    freqs = rng.standard_normal((DIMS, 2)) / LENGTH_SCALE
    phases = rng.uniform(0, 2 * np.pi, DIMS)
    xy = positions[:, [0, 2]].copy()
    alias = (lap == 2) & (xy[:, 1] < -200) & (xy[:, 1] > -240)  # looks like the block corner
    xy[alias] = np.column_stack([np.full(alias.sum(), 302.5), -xy[alias, 1] - 200.0])
    place = np.cos(xy @ freqs.T + phases)
    lap_change = rng.standard_normal((3, DIMS)) * 0.25
    frame_noise = np.random.default_rng(seed).standard_normal(place.shape) * noise
    x = place + lap_change[lap] + frame_noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_kitti_poses(path: Path, positions: np.ndarray) -> None:
    """A KITTI poses file: identity rotations, translations in columns 3, 7, 11."""
    poses = np.zeros((len(positions), 12))
    poses[:, [0, 5, 10]] = 1.0
    poses[:, [3, 7, 11]] = positions
    np.savetxt(path, poses, fmt="%.6e")


def main(argv: list[str] | None = None) -> int:
    """Generate the drive, run `netvlad-client evaluate` on it, copy the PR curve to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/evaluation_example.png"))
    args = parser.parse_args(argv)
    positions, lap = drive()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_kitti_poses(work / "00.txt", positions)
        np.save(work / "clean.npy", descriptors(positions, lap, noise=0.6, seed=1))
        np.save(work / "noisy.npy", descriptors(positions, lap, noise=1.2, seed=2))
        status = netvlad_client(
            [
                "evaluate", "--poses", str(work / "00.txt"),
                "--descriptors", str(work / "clean.npy"), "--label", "clean",
                "--compare", str(work / "noisy.npy"), "--compare-label", "noisy",
                "--dims", "128", "--radius", "5", "--suppression", "501",
                "--out", str(work / "evaluation"),
            ]
        )  # fmt: skip
        if status != 0:
            return status
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "evaluation" / "pr_curve.png", args.out)
    print(f"wrote {args.out} ({len(positions)} frames)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
