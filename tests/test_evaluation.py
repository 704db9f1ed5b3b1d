"""Place-recognition evaluation (docs/EVALUATION.md) and `netvlad-client evaluate`.

Synthetic sequences whose answers are known by construction, hand-worked tiny cases for every
step, a 5 000-frame memory check, the file readers against the real descriptor writer, and the
command line through `netvlad-client`'s own `main()` and a subprocess.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from netvlad_client.cli import main as cli_main
from netvlad_client.evaluation import (
    EvaluationError,
    EvaluationSettings,
    accepted_at_precision,
    confusion_figure,
    confusion_matrices,
    evaluate,
    match_times,
    name_time_ns,
    natural_order,
    nearest_matches,
    nearest_position_distances,
    read_descriptors,
    read_euroc_groundtruth,
    read_kitti_poses,
    read_positions,
    read_tum_trajectory,
    time_order,
    trajectory_figure,
)
from netvlad_client.formats import write_descriptors

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def loop_positions(places: int, laps: int, circumference: float = 1000.0) -> np.ndarray:
    """A circular route of `places` evenly spaced points driven `laps` times (N x 3)."""
    angle = 2 * np.pi * (np.arange(places * laps) % places) / places
    r = circumference / (2 * np.pi)
    return np.column_stack([r * np.cos(angle), np.zeros(len(angle)), r * np.sin(angle)])


def write_kitti_poses(path: Path, positions: np.ndarray) -> Path:
    """A KITTI poses file (identity rotation) whose translations are the positions."""
    poses = np.zeros((len(positions), 12))
    poses[:, [0, 5, 10]] = 1.0
    poses[:, [3, 7, 11]] = positions
    np.savetxt(path, poses, fmt="%.9e")
    return path


def brute_force_neighbours(x: np.ndarray, suppression: int, k: int) -> list[list[int]]:
    """Each frame's k nearest non-suppressed frames by (exact distance, index), plain Python."""
    half = (suppression - 1) // 2
    d = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(axis=2)
    out = []
    for i in range(len(x)):
        candidates = sorted((d[i, j], j) for j in range(len(x)) if abs(i - j) > half)
        out.append([j for _, j in candidates[:k]])
    return out


def assert_png(path: Path) -> None:
    """The file exists, is a PNG and decodes to a real picture."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    picture = imread(path)
    assert picture.ndim == 3 and min(picture.shape[:2]) >= 200, picture.shape


# --------------------------------------------------------------------------- known answers


def test_revisits_with_matching_descriptors_score_auc_one():
    places, laps, tail = 120, 3, 40
    loop = loop_positions(places, laps)  # 8.3 m between places, revisits every 120 frames
    tail_positions = np.column_stack(
        [np.full(tail, 5000.0), np.arange(tail) * 10.0, np.zeros(tail)]
    )
    positions = np.vstack([loop, tail_positions])
    rng = np.random.default_rng(1)
    place_codes = rng.standard_normal((places, 64))
    descriptors = np.vstack(
        [
            place_codes[np.arange(places * laps) % places]
            + 0.01 * rng.standard_normal((places * laps, 64)),
            rng.standard_normal((tail, 64)),  # never revisited: unique, far from everything
        ]
    )
    ev = evaluate(descriptors, positions, EvaluationSettings(suppression=21, dims=32))
    assert ev.num_positives == places * laps  # the tail has no true revisit
    assert not ev.has_revisit[places * laps :].any()
    assert ev.auc == pytest.approx(1 - 1 / (places * laps), abs=1e-12)
    assert ev.recall_at == {1: 1.0, 5: 1.0, 10: 1.0}
    # Every loop frame matched the same place on another lap; the tail comes last, all false.
    loop_match = ev.match[: places * laps]
    assert np.array_equal(loop_match % places, np.arange(places * laps) % places)
    assert np.all(ev.order[: places * laps] < places * laps)
    assert ev.precision[places * laps - 1] == 1.0
    assert ev.precision[-1] == pytest.approx(places * laps / len(positions))


def chance_auc(positions: np.ndarray, suppression: int, radius: float) -> tuple[float, float]:
    """Expected AUC (and recall@1) when each frame's match is a uniformly random candidate.

    q_i = share of frame i's non-suppressed frames within the radius; with matches accepted in
    an order unrelated to correctness, each step is a true positive with probability p = mean q.
    E[sum over steps k of (1/P) * 1[TP at k] * TP_k / k] = (p / P) * (p * M + (1 - p) * H_M),
    M frames with a candidate, P with a true revisit, H_M the M-th harmonic number.
    """
    n = len(positions)
    half = (suppression - 1) // 2
    idx = np.arange(n)
    candidate = np.abs(idx[:, None] - idx[None, :]) > half
    close = np.linalg.norm(positions[:, None] - positions[None], axis=2) < radius
    q = (candidate & close).sum(axis=1) / candidate.sum(axis=1)
    p = float(q.mean())
    positives = int((candidate & close).any(axis=1).sum())
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    return p / positives * (p * n + (1 - p) * harmonic), float((q * (q > 0)).sum() / positives)


def test_random_descriptors_score_chance():
    positions = loop_positions(places=4, laps=100)  # 4 places 250 m apart, 400 frames
    expected_auc, expected_r1 = chance_auc(positions, suppression=5, radius=5.0)
    assert expected_auc == pytest.approx(0.066, abs=0.001)  # p ~ 0.25: AUC ~ p^2 + a little
    aucs, r1s = [], []
    for seed in range(20):
        x = np.random.default_rng(seed).standard_normal((len(positions), 16))
        ev = evaluate(x, positions, EvaluationSettings(suppression=5))
        aucs.append(ev.auc)
        r1s.append(ev.recall_at[1])
    # 20 runs: the standard error of the mean is ~5% of the value; allow 4 of them.
    assert np.mean(aucs) == pytest.approx(expected_auc, rel=0.2)
    assert np.mean(r1s) == pytest.approx(expected_r1, rel=0.1)


# --------------------------------------------------------------------------- hand-worked steps


def test_hand_worked_sequence_every_step():
    # Six frames, suppression 3 (frames next to each other never match), radius 5.
    # Frame 3 revisits frame 0 (1 m), frame 5 revisits frame 2 (1 m); 1 and 4 revisit nothing.
    positions = np.array([[0, 0, 0], [100, 0, 0], [200, 0, 0], [1, 0, 0], [300, 0, 0], [201, 0, 0]])
    # 1-D descriptors. Non-suppressed squared distances, nearest first:
    #   f0 (0):  f3 1, f4 121, f2 400, f5 576   -> 3, 1   (true)
    #   f1 (10): f4 1, f3 81, f5 196            -> 4, 1   (false: 100 m vs 300 m)
    #   f2 (20): f5 16, f4 81, f0 400           -> 5, 16  (true)
    #   f3 (1):  f0 1, f1 81, f5 529            -> 0, 1   (true)
    #   f4 (11): f1 1, f2 81, f0 121            -> 1, 1   (false)
    #   f5 (24): f2 16, f1 196, f3 529, f0 576  -> 2, 16  (true)
    descriptors = np.array([[0.0], [10.0], [20.0], [1.0], [11.0], [24.0]])
    ev = evaluate(descriptors, positions, EvaluationSettings(suppression=3, recall_ns=(1, 2)))
    assert ev.match.tolist() == [3, 4, 5, 0, 1, 2]
    assert ev.match_distance.tolist() == [1, 1, 16, 1, 1, 16]
    assert ev.true_positive.tolist() == [True, False, True, True, False, True]
    # Ground truth: nearest non-suppressed position.
    assert ev.gt_distance.tolist() == [1, 99, 1, 1, 100, 1]
    assert ev.has_revisit.tolist() == [True, False, True, True, False, True]
    assert ev.num_positives == 4  # recall's denominator leaves out frames 1 and 4
    # Ties in match distance keep frame order: 0, 1, 3, 4 (distance 1), then 2, 5 (16).
    assert ev.order.tolist() == [0, 1, 3, 4, 2, 5]
    # Accepting T F T F T T: TP 1 1 2 2 3 4.
    np.testing.assert_allclose(ev.precision, [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5, 4 / 6])
    np.testing.assert_allclose(ev.recall, [1 / 4, 1 / 4, 2 / 4, 2 / 4, 3 / 4, 1])
    # AUC = 1/4 * (2/3 + 3/5 + 4/6): the first accepted match adds no area
    assert ev.auc == pytest.approx(0.25 * (2 / 3 + 3 / 5 + 4 / 6))
    assert ev.recall_at == {1: 1.0, 2: 1.0}
    assert ev.precision_at_recall([0.25, 0.5, 0.75, 1.0]) == pytest.approx(
        {0.25: 1.0, 0.5: 2 / 3, 0.75: 3 / 5, 1.0: 4 / 6}
    )


def test_suppression_band_edges_for_matches():
    # Descriptor of frame i is i: the nearest frames are always the closest in time, so the
    # band decides. Width 5 suppresses frames 1 and 2 apart; 3 apart is the first allowed.
    # Frames 3 and 4 have candidates 3 before and 3 after at the same distance: the lower wins.
    x = np.arange(8, dtype=np.float32)[:, None]
    idx, dist = nearest_matches(x, suppression=5, k=2)
    assert idx[:, 0].tolist() == [3, 4, 5, 0, 1, 2, 3, 4]
    assert dist[:, 0].tolist() == [9.0] * 8
    assert idx[:, 1].tolist() == [4, 5, 6, 6, 7, 1, 2, 3]
    # Width 1: only the frame itself is suppressed.
    idx, _ = nearest_matches(x, suppression=1, k=1)
    assert idx[:, 0].tolist() == [1, 0, 1, 2, 3, 4, 5, 6]


def test_suppression_band_edges_for_ground_truth():
    # Frame 2 stands where frame 0 stood (2 frames apart); frame 7 where frame 4 stood (3 apart).
    x = 100.0 * np.arange(8)
    x[2], x[7] = 0.0, 400.0
    positions = np.column_stack([x, np.zeros(8), np.zeros(8)])
    gt = np.sqrt(nearest_position_distances(positions, suppression=5))
    assert gt.tolist() == [300, 300, 400, 100, 0, 400, 300, 0]
    gt = np.sqrt(nearest_position_distances(positions, suppression=3))
    assert gt[[0, 2]].tolist() == [0, 0]  # 2 apart is outside a band of 3


def test_recall_denominator_ignores_neighbours_inside_the_band():
    # The vehicle waits 6 frames at the start (same place, all inside the band), drives away
    # and comes back to the start once, 30 frames later.
    positions = np.array(
        [[0, 0, 0]] * 6 + [[10.0 * k, 0, 0] for k in range(1, 25)] + [[0.5, 0, 0]],
    )
    rng = np.random.default_rng(3)
    x = rng.standard_normal((len(positions), 8))
    x[-1] = x[0] + 1e-3  # the return looks like the start
    ev = evaluate(x, positions, EvaluationSettings(suppression=11))
    # True revisits: frames 0..5 (to the last frame) and the last frame; the waiting frames do
    # not count each other.
    assert np.flatnonzero(ev.has_revisit).tolist() == [0, 1, 2, 3, 4, 5, 30]
    assert ev.num_positives == 7
    assert ev.match[30] == 0 and ev.true_positive[30]
    assert ev.recall[-1] == pytest.approx(np.count_nonzero(ev.true_positive) / 7)
    # Without the return, waiting in one place is no revisit at all.
    with pytest.raises(EvaluationError, match="no frame has a true revisit"):
        evaluate(x[:30], positions[:30], EvaluationSettings(suppression=11))


def test_identical_descriptors_tie_exactly_and_the_lowest_index_wins():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((60, 128)).astype(np.float32)
    x[40] = x[25] = x[50] = x[0] + rng.standard_normal(128).astype(np.float32) * 0.01
    idx, dist = nearest_matches(x, suppression=3, k=3)
    assert idx[0].tolist() == [25, 40, 50]
    assert dist[0, 0] == dist[0, 1] == dist[0, 2]
    # The duplicates' own best match is the lowest-index duplicate outside their band.
    assert idx[40, 0] == 25 and idx[25, 0] == 40 and idx[50, 0] == 25


def test_nearest_matches_equal_brute_force_with_many_ties():
    rng = np.random.default_rng(11)
    for _ in range(25):
        n = int(rng.integers(4, 70))
        x = rng.integers(0, 3, size=(n, int(rng.integers(1, 5)))).astype(np.float32)
        suppression = int(rng.choice([1, 3, 5, 9]))
        k = int(rng.integers(1, 6))
        idx, dist = nearest_matches(x, suppression, k, block_elements=int(rng.integers(1, 300)))
        expected = brute_force_neighbours(x, suppression, k)
        for i in range(n):
            found = [j for j in idx[i] if j >= 0]
            assert found == expected[i][: len(found)]
            assert len(found) == len(expected[i])
            assert np.all(np.isinf(dist[i, len(found) :]))


def test_descriptors_far_from_the_origin_still_give_exact_neighbours():
    # |a|^2 + |b|^2 - 2ab in float32 loses everything to cancellation here; the exact re-rank
    # of a shortlist widened by the rounding bound must still find the true neighbours.
    rng = np.random.default_rng(12)
    x = (300.0 + 0.05 * rng.standard_normal((80, 8))).astype(np.float32)
    idx, dist = nearest_matches(x, suppression=3, k=3)
    expected = brute_force_neighbours(x, 3, 3)
    assert idx.tolist() == expected
    exact = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(dist, np.take_along_axis(exact, idx, axis=1), rtol=1e-12)


def test_radius_is_strict_for_revisits_and_true_positives():
    # Frame 3 is exactly 5 m from frame 0 (not a revisit, not a true match); frame 4 is 4.9 m
    # from frame 1; frame 5 is 7 m from frame 2 (within twice the radius, still false).
    positions = np.array(
        [[0, 0, 0], [100, 0, 0], [200, 0, 0], [5, 0, 0], [104.9, 0, 0], [207, 0, 0]]
    )
    x = np.array([[0.0], [10.0], [20.0], [0.5], [10.5], [20.5]])
    ev = evaluate(x, positions, EvaluationSettings(suppression=5))
    assert ev.match.tolist() == [3, 4, 5, 0, 1, 2]
    assert ev.has_revisit.tolist() == [False, True, False, False, True, False]
    assert ev.true_positive.tolist() == [False, True, False, False, True, False]
    assert ev.num_positives == 2
    # All match distances tie at 0.25: order 0..5 gives F T F F T F, precision 1/2 then 2/5.
    assert ev.auc == pytest.approx(0.5 * (1 / 2 + 2 / 5))


def test_block_size_does_not_change_the_result():
    positions = loop_positions(places=50, laps=4)
    x = np.random.default_rng(5).standard_normal((len(positions), 24))
    settings = EvaluationSettings(suppression=9, dims=16, renormalize=True)
    whole = evaluate(x, positions, settings)
    blocked = evaluate(x, positions, settings, block_elements=37)
    assert np.array_equal(whole.neighbours, blocked.neighbours)
    assert np.array_equal(whole.order, blocked.order)
    assert whole.auc == blocked.auc


def test_dims_truncate_with_or_without_renormalising():
    # Places A, B, A, B. Cropped to 2 dims: f0 (0.1, 0), f1 (0, 0.1), f2 (1, 0), f3 (0, 0.12).
    # Raw, f0 is nearest to f1 (0.02) rather than f2 (0.81); renormalised, f0 and f2 are both
    # (1, 0) and f0 finds f2, the true revisit. The third value is dropped either way.
    positions = loop_positions(places=2, laps=2)
    x = np.array([[0.1, 0, 5], [0, 0.1, -5], [1, 0, -5], [0, 0.12, 5]], dtype=np.float32)
    raw = evaluate(x, positions, EvaluationSettings(dims=2, suppression=1))
    renorm = evaluate(x, positions, EvaluationSettings(dims=2, suppression=1, renormalize=True))
    assert raw.match[0] == 1 and not raw.true_positive[0]
    assert raw.match_distance[0] == pytest.approx(0.02, rel=1e-6)
    assert renorm.match[0] == 2 and renorm.true_positive[0]
    assert renorm.match_distance[0] == pytest.approx(0.0, abs=1e-12)
    assert evaluate(x, positions, EvaluationSettings(suppression=1)).match[0] == 3


# --------------------------------------------------------------------------- size and memory


def test_5000_frames_with_bounded_memory():
    n = 5000
    rng = np.random.default_rng(0)
    positions = loop_positions(places=1000, laps=5, circumference=3000.0)
    x = rng.standard_normal((n, 256)).astype(np.float32)
    settings = EvaluationSettings(dims=128, suppression=501)
    tracemalloc.start()
    try:
        ev = evaluate(x, positions, settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # No N x N matrix at all: not the float64 one (200 MB), not even a float32 one (100 MB).
    assert peak < n * n * 4, f"peak {peak / 1e6:.0f} MB"
    assert ev.num_frames == n and ev.num_positives == n
    # Spot-check rows against plain NumPy on the same truncated descriptors.
    xs = x[:, :128].astype(np.float64)
    for i in (0, 250, 251, 2500, 4999):
        d = ((xs - xs[i]) ** 2).sum(axis=1)
        d[max(0, i - 250) : i + 251] = np.inf
        assert ev.match[i] == int(np.argmin(d))
        assert ev.match_distance[i] == pytest.approx(d.min(), rel=1e-12)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"suppression": 500}, "must be odd.*use 499 or 501"),
        ({"suppression": 0}, "positive odd number"),
        ({"radius": 0.0}, "radius must be a positive"),
        ({"dims": 0}, "dims must be a positive"),
        ({"recall_ns": (0,)}, "recall@N needs positive"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(EvaluationError, match=message):
        EvaluationSettings(**kwargs)


def test_bad_inputs_get_specific_errors():
    positions = loop_positions(places=5, laps=4)
    x = np.random.default_rng(0).standard_normal((20, 8))
    with pytest.raises(EvaluationError, match="only 8"):
        evaluate(x, positions, EvaluationSettings(dims=16))
    with pytest.raises(EvaluationError, match="descriptors has 19 frames but positions has 20"):
        evaluate(x[:19], positions)
    bad = x.copy()
    bad[7, 3] = np.nan
    with pytest.raises(EvaluationError, match="row 7"):
        evaluate(bad, positions)
    with pytest.raises(EvaluationError, match="leaves none of the 20 frames"):
        evaluate(x, positions, EvaluationSettings(suppression=39))
    straight = np.column_stack([np.arange(20) * 10.0, np.zeros(20), np.zeros(20)])
    with pytest.raises(EvaluationError, match="no frame has a true revisit"):
        evaluate(x, straight, EvaluationSettings(suppression=3))


# --------------------------------------------------------------------------- files


def test_kitti_poses_and_position_files(tmp_path):
    positions = loop_positions(places=7, laps=2)
    poses = write_kitti_poses(tmp_path / "00.txt", positions)
    np.testing.assert_allclose(read_kitti_poses(poses), positions, atol=1e-6)

    (tmp_path / "xyz.txt").write_text("# x y z\n1 2 3\n\n4\t5  6\n")
    np.testing.assert_array_equal(read_positions(tmp_path / "xyz.txt"), [[1, 2, 3], [4, 5, 6]])
    (tmp_path / "xyz.csv").write_text("x,y,z\n1,2,3\n4, 5, 6\n")
    np.testing.assert_array_equal(read_positions(tmp_path / "xyz.csv"), [[1, 2, 3], [4, 5, 6]])
    (tmp_path / "xy.csv").write_text("1,2\n4,5\n")
    np.testing.assert_array_equal(read_positions(tmp_path / "xy.csv"), [[1, 2, 0], [4, 5, 0]])

    (tmp_path / "short.txt").write_text("1 0 0 5 0 1 0 6 0 0 1 7\n1 0 0 5 0 1 0 6 0 0 1\n")
    with pytest.raises(EvaluationError, match=r"short.txt line 2: expected 12 numbers.*got 11"):
        read_kitti_poses(tmp_path / "short.txt")
    with pytest.raises(EvaluationError, match="use --positions"):
        read_kitti_poses(tmp_path / "xyz.txt")
    with pytest.raises(EvaluationError, match="use --poses"):
        read_positions(poses)
    (tmp_path / "text.txt").write_text("1 2 3\n4 five 6\n")
    with pytest.raises(EvaluationError, match="line 2: not a list of numbers"):
        read_positions(tmp_path / "text.txt")
    with pytest.raises(EvaluationError, match="cannot read positions file"):
        read_positions(tmp_path / "missing.txt")


@pytest.mark.parametrize("fmt", ["npy", "npz", "csv", "json", "bin"])
def test_descriptor_files_written_by_describe_read_back(tmp_path, fmt):
    values = np.random.default_rng(2).standard_normal((9, 6)).astype(np.float32)
    names = [f"image_0/{i:06d}.png" for i in range(9)]
    path = tmp_path / f"d.{fmt}"
    write_descriptors(path, fmt, values, names)  # the writer `netvlad-client describe` uses
    loaded = read_descriptors(path, bin_count=9)
    np.testing.assert_array_equal(loaded.values, values)
    assert loaded.values.dtype == np.float32
    if fmt in ("npz", "json"):
        assert loaded.names == names


def test_descriptor_file_errors(tmp_path):
    values = np.ones((6, 4), dtype=np.float32)
    write_descriptors(tmp_path / "d.bin", "bin", values, [])
    assert read_descriptors(tmp_path / "d.bin", bin_dims=4).values.shape == (6, 4)
    assert read_descriptors(tmp_path / "d.bin", bin_count=3).values.shape == (3, 8)
    with pytest.raises(EvaluationError, match="24 float32 values do not split into 5"):
        read_descriptors(tmp_path / "d.bin", bin_count=5)
    with pytest.raises(EvaluationError, match="not a whole number of 5-dimensional"):
        read_descriptors(tmp_path / "d.bin", bin_dims=5)
    with pytest.raises(EvaluationError, match="does not record its shape"):
        read_descriptors(tmp_path / "d.bin")
    np.savez(tmp_path / "other.npz", features=values)
    with pytest.raises(EvaluationError, match=r"no 'descriptors' array.*features"):
        read_descriptors(tmp_path / "other.npz")
    with pytest.raises(EvaluationError, match=r"unknown format \.h5"):
        read_descriptors(tmp_path / "d.h5")
    with pytest.raises(EvaluationError, match="does not exist"):
        read_descriptors(tmp_path / "nothing.npy")
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(EvaluationError, match="data row 2: 2 values, expected 3"):
        read_descriptors(tmp_path / "ragged.csv")


def test_confusion_matrices_are_subsampled_with_the_band_blank():
    positions = loop_positions(places=100, laps=25)  # 2500 frames
    x = np.random.default_rng(4).standard_normal((2500, 8))
    cm = confusion_matrices(x, positions, EvaluationSettings(suppression=21), max_frames=1000)
    assert cm.frames.tolist() == list(range(0, 2500, 3))
    assert cm.descriptor.shape == cm.position.shape == (834, 834)
    assert np.isnan(cm.position[10, 12]) and np.isnan(cm.position[10, 13])  # 6, 9 frames apart
    assert not np.isnan(cm.position[10, 14])  # 12 frames apart
    i, j = 0, 100  # frames 0 and 300: the same place three laps later
    assert cm.position[i, j] == pytest.approx(0.0, abs=1e-3)
    d = np.sum((x[0] - x[300]) ** 2)
    assert cm.descriptor[i, j] == pytest.approx(d, rel=1e-5)


# --------------------------------------------------------------------------- command line


def synthetic_run(tmp_path: Path, noise: float = 0.05, frames_off: int = 0) -> dict[str, Path]:
    """Poses, good descriptors (.npy) and noisy ones (.npz) for a 3-lap loop of 150 places."""
    positions = loop_positions(places=150, laps=3)
    rng = np.random.default_rng(9)
    codes = rng.standard_normal((150, 64)).astype(np.float32)
    place = np.arange(450) % 150
    good = codes[place] + noise * rng.standard_normal((450, 64)).astype(np.float32)
    noisy = codes[place] + 1.5 * rng.standard_normal((450, 64)).astype(np.float32)
    paths = {
        "poses": write_kitti_poses(tmp_path / "00.txt", positions[: 450 - frames_off]),
        "good": tmp_path / "float32.npy",
        "noisy": tmp_path / "noisy.npz",
    }
    np.save(paths["good"], good)
    write_descriptors(paths["noisy"], "npz", noisy, [str(i) for i in range(450)])
    return paths


def auc_line(text: str) -> float:
    """The value of the one `AUC: <value>` line."""
    lines = [line for line in text.splitlines() if line.startswith("AUC: ")]
    assert len(lines) == 1, text
    return float(lines[0].split()[1])


def test_cli_saved_descriptors_and_kitti_poses(tmp_path, capsys):
    paths = synthetic_run(tmp_path)
    out = tmp_path / "out"
    args = ["evaluate", "--poses", str(paths["poses"]), "--descriptors", str(paths["good"])]
    args += ["--compare", str(paths["noisy"]), "--compare-label", "noisy", "--label", "good"]
    args += ["--dims", "32", "--suppression", "51", "--out", str(out)]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    expected_good = evaluate(
        np.load(paths["good"]),
        read_kitti_poses(paths["poses"]),
        EvaluationSettings(dims=32, suppression=51),
    )
    assert auc_line(printed) == pytest.approx(expected_good.auc, abs=1e-6)
    assert auc_line(printed) > 0.99
    assert "AUC (noisy): " in printed
    assert "precision at recall 0.5: " in printed and "recall@10: " in printed
    for name in ("pr_curve.png", "confusion_descriptors.png", "confusion_positions.png"):
        assert_png(out / name)
    summary = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in summary["results"]] == ["good", "noisy"]
    assert summary["results"][0]["auc"] == pytest.approx(expected_good.auc)
    assert summary["results"][1]["auc"] < 0.9 * summary["results"][0]["auc"]
    assert summary["settings"] == {
        "dims": 32,
        "renormalize": False,
        "radius": 5.0,
        "suppression": 51,
    }
    assert summary["results"][0]["frames_with_true_revisit"] == 450


def test_cli_subprocess_plain_positions_and_bin_descriptors(tmp_path):
    positions = loop_positions(places=100, laps=3)
    np.savetxt(tmp_path / "positions.csv", positions, delimiter=",")
    codes = np.random.default_rng(6).standard_normal((100, 16)).astype(np.float32)
    write_descriptors(tmp_path / "d.bin", "bin", codes[np.arange(300) % 100], [])
    cmd = [sys.executable, "-m", "netvlad_client.cli", "evaluate"]
    cmd += [
        "--positions",
        str(tmp_path / "positions.csv"),
        "--descriptors",
        str(tmp_path / "d.bin"),
    ]
    cmd += ["--dims", "all", "--suppression", "11", "--out", str(tmp_path / "o"), "--no-plots"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert auc_line(done.stdout) == pytest.approx(1 - 1 / 300)
    assert "recall@1: 1.0000" in done.stdout
    assert not (tmp_path / "o" / "pr_curve.png").exists()
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["settings"]["dims"] is None


def test_cli_count_mismatches_name_both_files(tmp_path, capsys):
    paths = synthetic_run(tmp_path, frames_off=3)  # poses for 447 frames, descriptors for 450
    args = ["evaluate", "--poses", str(paths["poses"]), "--descriptors", str(paths["good"])]
    assert cli_main([*args, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"--descriptors {paths['good']} has 450 frames" in err
    assert f"--poses {paths['poses']} has 447" in err

    images = tmp_path / "seq" / "image_0"
    images.mkdir(parents=True)
    from matplotlib.image import imsave

    for i in range(5):
        imsave(images / f"{i:06d}.png", np.full((20, 20), i * 40, dtype=np.uint8), cmap="gray")
    assert (
        cli_main(["evaluate", "--poses", str(paths["poses"]), "--images", str(tmp_path / "seq")])
        == 1
    )
    err = capsys.readouterr().err
    assert f"--images {tmp_path / 'seq'} has 5 frames but --poses {paths['poses']} has 447" in err

    bad_bin = tmp_path / "d.bin"
    write_descriptors(bad_bin, "bin", np.ones((448, 2), np.float32), [])
    assert (
        cli_main(["evaluate", "--poses", str(paths["poses"]), "--descriptors", str(bad_bin)]) == 1
    )
    assert "do not split into 447 descriptors" in capsys.readouterr().err


def test_cli_dims_above_the_descriptors_names_the_flag(tmp_path, capsys):
    paths = synthetic_run(tmp_path)  # 64-D descriptors; the command line's default is 128
    args = ["evaluate", "--poses", str(paths["poses"]), "--descriptors", str(paths["good"])]
    assert cli_main([*args, "--no-plots", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"netvlad-client evaluate: error: --dims 128 asks for more dimensions than "
                   f"the 64 of --descriptors {paths['good']}; pass --dims 64 or --dims all")


def test_cli_saved_nan_rows_are_frames_without_a_descriptor(tmp_path, capsys):
    # `evaluate --on-error skip` saves a skipped frame as a row of NaN only: reading that file
    # back leaves those frames out with their ground truth, as the live run did.
    positions, skipped = loop_positions(places=100, laps=3), [0, 17, 150, 299]
    values = loop_descriptors(300, 100)
    saved, path = values.copy(), tmp_path / "descriptors.npy"
    saved[skipped] = np.nan
    np.save(path, saved)
    args = ["evaluate", "--poses", str(write_kitti_poses(tmp_path / "poses.txt", positions)),
            "--descriptors", str(path), "--dims", "all", "--suppression", "21", "--no-plots",
            "--out", str(tmp_path / "out")]
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    kept = np.setdiff1d(np.arange(300), skipped)
    expected = evaluate(values[kept], positions[kept], EvaluationSettings(suppression=21))
    assert auc_line(captured.out) == pytest.approx(expected.auc, abs=1e-9)
    assert (f"left out 4 frames without a descriptor (a row of NaN only) in --descriptors "
            f"{path}, with their ground truth: #0, #17, #150, #299" in captured.err)
    frames = json.loads((tmp_path / "out" / "summary.json").read_text())["frames"]
    assert (frames["given"], frames["evaluated"]) == (300, 296)

    # A row with only some NaN values (or an infinity) is damage, not a skipped frame.
    saved[5, 3] = np.nan
    np.save(path, saved)
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "row 5 (0-based) holds NaN or infinity; 1 row(s) in all" in err
    assert "a row of NaN only" in err


def test_cli_without_matplotlib_stops_before_any_work_and_names_no_plots(tmp_path):
    paths = synthetic_run(tmp_path)
    code = ("import sys; sys.modules['matplotlib'] = None; "  # as if it were not installed
            "from netvlad_client.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["evaluate", "--poses", str(paths["poses"]), "--descriptors", str(paths["good"]),
            "--dims", "all", "--out", str(tmp_path / "o")]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "pass --no-plots" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == "" and not (tmp_path / "o").exists()  # refused before evaluating
    done = subprocess.run([sys.executable, "-c", code, *args, "--no-plots"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "o" / "summary.json").exists()


def test_cli_needs_images_or_descriptors(tmp_path, capsys):
    poses = write_kitti_poses(tmp_path / "00.txt", loop_positions(5, 2))
    assert cli_main(["evaluate", "--poses", str(poses), "--out", str(tmp_path / "o")]) == 1
    assert "give --images DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--descriptors", "x.npy"])  # one ground truth is required
    assert ("one of the arguments --poses --positions --tum --euroc is required"
            in capsys.readouterr().err)


def test_cli_environment_fallbacks(tmp_path, capsys, monkeypatch):
    from netvlad_client.cli import build_parser

    paths = synthetic_run(tmp_path)
    monkeypatch.setenv("NETVLAD_EVAL_DIMS", "16")
    monkeypatch.setenv("NETVLAD_EVAL_SUPPRESSION", "41")
    monkeypatch.setenv("NETVLAD_EVAL_RENORMALIZE", "1")
    monkeypatch.setenv("NETVLAD_EVAL_OUT", str(tmp_path / "env-out"))
    args = ["evaluate", "--poses", str(paths["poses"]), "--descriptors", str(paths["good"])]
    assert cli_main([*args, "--no-plots"]) == 0
    summary = json.loads((tmp_path / "env-out" / "summary.json").read_text())
    assert summary["settings"] == {
        "dims": 16,
        "renormalize": True,
        "radius": 5.0,
        "suppression": 41,
    }
    # A bad value is reported by `evaluate` only; the other subcommands still parse.
    monkeypatch.setenv("NETVLAD_EVAL_RADIUS", "five")
    from netvlad_client.options import parse_args

    assert parse_args(build_parser(), ["info"]).command == "info"
    with pytest.raises(SystemExit):
        cli_main(args)
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage lines
    assert "environment variable NETVLAD_EVAL_RADIUS='five'" in error and "--radius" not in error
    assert cli_main([*args, "--radius", "5", "--no-plots"]) == 0  # the flag overrides it


def test_evaluation_modules_import_neither_tensorflow_nor_matplotlib():
    code = (
        "import sys, netvlad_client.evaluation, netvlad_client.cli.evaluate; "
        "print(sorted(m for m in ('tensorflow', 'matplotlib') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------- frame order


def test_natural_order_compares_digit_runs_as_numbers():
    names = ["10.png", "9.png", "0.png", "100.png", "11.png", "1.png"]
    assert [names[i] for i in natural_order(names)] == [
        "0.png", "1.png", "9.png", "10.png", "11.png", "100.png"
    ]
    # Folders do not take part; digit runs after text are numbers too.
    names = ["seq/frame_10.jpg", "seq/frame_2.jpg", "seq/frame_1.jpg"]
    assert natural_order(names).tolist() == [2, 1, 0]
    # Zero-padded names keep their text order, and so do names without digits.
    assert natural_order([f"{i:06d}.png" for i in range(12)]).tolist() == list(range(12))
    assert natural_order(["hall.png", "bridge.png", "kitchen.png"]).tolist() == [1, 0, 2]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["0.png", "1.png", "01.png"], "1.png and 01.png carry the same frame number"),
        (["1.png", "1.jpg"], "1.png and 1.jpg carry the same frame number"),
        (["left_1.png", "right_1.png", "left_2.png"], r"2 different patterns \('left_#'"),
        (["0.png", "frame_1.png"], "order is ambiguous"),
    ],
)
def test_natural_order_refuses_ambiguous_names(names, message):
    with pytest.raises(EvaluationError, match=message):
        natural_order(names, "--images d")


def loop_descriptors(positions_count: int, places: int, seed: int = 9) -> np.ndarray:
    """Descriptors of a loop: one code per place plus a little noise, float32."""
    rng = np.random.default_rng(seed)
    codes = rng.standard_normal((places, 32)).astype(np.float32)
    place = np.arange(positions_count) % places
    return codes[place] + 0.05 * rng.standard_normal((positions_count, 32)).astype(np.float32)


def test_cli_pairs_unpadded_frame_names_with_poses_in_natural_order(tmp_path, capsys):
    # 300 frames named 0.png ... 299.png, saved in text order (0, 1, 10, 100, 101, ...), as a
    # folder listing gives them: pose k belongs to frame k, not to the k-th name in text order.
    positions = loop_positions(places=100, laps=3)
    values = loop_descriptors(300, 100)
    text_order = sorted(range(300), key=lambda i: f"{i}.png")
    names = [f"seq/{i}.png" for i in text_order]
    write_descriptors(tmp_path / "d.npz", "npz", values[text_order], names)
    poses = write_kitti_poses(tmp_path / "poses.txt", positions)
    out = tmp_path / "out"
    args = ["evaluate", "--poses", str(poses), "--descriptors", str(tmp_path / "d.npz"),
            "--dims", "0", "--suppression", "21", "--no-plots", "--out", str(out)]
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    expected = evaluate(values, positions, EvaluationSettings(suppression=21))
    assert auc_line(captured.out) == pytest.approx(expected.auc, abs=1e-9)
    assert auc_line(captured.out) > 0.99
    assert ("natural order of the names (digit runs as numbers), which differs from plain text "
            "order: 0.png ... 299.png") in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"]["first"] == "seq/0.png" and summary["frames"]["last"] == "seq/299.png"
    assert summary["settings"]["dims"] is None  # --dims 0 means every dimension

    # The same rows given with an --images folder are paired by name, whatever their order.
    folder = tmp_path / "seq"
    folder.mkdir()
    for i in range(300):
        (folder / f"{i}.png").write_bytes(b"")  # only the names are read: no server involved
    assert cli_main([*args[:3], "--images", str(folder), *args[3:]]) == 0
    assert auc_line(capsys.readouterr().out) == pytest.approx(expected.auc, abs=1e-9)

    # Names that collide in natural order stop the run before any work, naming both.
    (folder / "07.png").write_bytes(b"")
    assert cli_main([*args[:3], "--images", str(folder), *args[3:]]) == 1
    err = capsys.readouterr().err
    assert f"--images {folder}: 07.png and 7.png carry the same frame number" in err


def test_cli_descriptor_names_that_do_not_match_the_images_are_refused(tmp_path, capsys):
    folder = tmp_path / "seq"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(b"")
    write_descriptors(tmp_path / "d.npz", "npz", np.eye(6, dtype=np.float32),
                      [f"other/{i}.jpg" for i in range(6)])
    poses = write_kitti_poses(tmp_path / "p.txt", loop_positions(3, 2))
    assert cli_main(["evaluate", "--poses", str(poses), "--images", str(folder), "--descriptors",
                     str(tmp_path / "d.npz"), "--dims", "all", "--suppression", "1",
                     "--no-plots", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "no row is named like 0.png, 1.png, 2.png, 3.png, 4.png and 1 more" in err


# --------------------------------------------------------------------------- results on disk


def test_closed_stdout_still_writes_every_file_and_exits_quietly(tmp_path):
    paths = synthetic_run(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "netvlad_client.cli", "evaluate", "--poses", str(paths["poses"]),
           "--descriptors", str(paths["good"]), "--dims", "32", "--suppression", "51",
           "--out", str(out)]
    for env in ({}, {"PYTHONUNBUFFERED": "1"}):
        # The reader is gone before the first line is printed (`| head -1` after one line, or
        # `| true`): the report cannot be written, the files must be.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**__import__("os").environ, **env})
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 0, err
        assert "Broken pipe" not in err and "Traceback" not in err, err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["results"][0]["auc"] > 0.99
        for name in ("pr_curve.png", "trajectory.png", "confusion_descriptors.png",
                     "confusion_positions.png", "matches.csv"):
            assert (out / name).stat().st_size > 0, name
        for name in list(out.iterdir()):
            name.unlink()


# --------------------------------------------------------------------------- timed ground truth


def test_timestamps_in_file_names():
    assert name_time_ns("rgb/1305031102.175304.png") == 1305031102175304000
    assert name_time_ns("1403636579763555584.png") == 1403636579763555584  # EuRoC: nanoseconds
    assert name_time_ns("frame_12.5.png") == 12_500_000_000
    assert name_time_ns("1305031102.png") == 1305031102_000_000_000  # short whole: seconds
    with pytest.raises(EvaluationError, match=r"frame left\.png: its name carries no timestamp"):
        name_time_ns("a/left.png")
    order, times = time_order(["2.5.png", "10.0.png", "2.25.png"])
    assert order.tolist() == [2, 0, 1]  # 2.25 s, 2.5 s, 10 s: decimals are not digit runs
    assert times.tolist() == [2_250_000_000, 2_500_000_000, 10_000_000_000]
    with pytest.raises(EvaluationError, match=r"1\.5\.png and 1\.500\.png carry the same"):
        time_order(["1.5.png", "1.500.png"])


def test_tum_and_euroc_ground_truth_files(tmp_path):
    tum = tmp_path / "groundtruth.txt"
    tum.write_text(
        "# ground truth trajectory\n# timestamp tx ty tz qx qy qz qw\n"
        "1305031098.6659 1.3563 0.6305 1.6380 0.6132 0.5962 -0.3311 -0.3986\n"
        "1305031098.6758 1.3543 0.6341 1.6374 0.6131 0.5961 -0.3308 -0.3990\n"
        "1305031098.6559 1.3500 0.6300 1.6300 0.6132 0.5962 -0.3311 -0.3986\n"
    )
    truth = read_tum_trajectory(tum)
    assert truth.times_ns.tolist() == [1305031098655900000, 1305031098665900000,
                                       1305031098675800000]  # sorted by time
    np.testing.assert_allclose(truth.positions[1], [1.3563, 0.6305, 1.6380])
    euroc = tmp_path / "data.csv"
    euroc.write_text(
        "#timestamp, p_RS_R_x [m], p_RS_R_y [m], p_RS_R_z [m], q_RS_w [], q_RS_x [], q_RS_y [], "
        "q_RS_z [], v_RS_R_x [m s^-1], v_RS_R_y [m s^-1], v_RS_R_z [m s^-1], b_w_RS_S_x "
        "[rad s^-1], b_w_RS_S_y [rad s^-1], b_w_RS_S_z [rad s^-1], b_a_RS_S_x [m s^-2], "
        "b_a_RS_S_y [m s^-2], b_a_RS_S_z [m s^-2]\n"
        "1403636580838555648,4.688319,-1.786938,0.783338,0.534108,-0.153029,-0.827383,-0.082152,"
        "-0.027876,0.033207,0.800006,-0.003172,0.021267,0.078502,-0.025266,0.136696,0.075593\n"
        "1403636580843555328,4.688177,-1.786770,0.787350,0.534640,-0.152990,-0.826863,-0.082422,"
        "-0.029272,0.033992,0.804600,-0.003172,0.021267,0.078502,-0.025266,0.136696,0.075593\n"
    )
    truth = read_euroc_groundtruth(euroc)
    assert truth.times_ns.tolist() == [1403636580838555648, 1403636580843555328]  # exact
    np.testing.assert_allclose(truth.positions[0], [4.688319, -1.786938, 0.783338])

    bad = tmp_path / "bad.txt"
    cases = [
        (read_tum_trajectory, "1 2 3\n", "expected 8 values .* got 3 \\(a plain position"),
        (read_tum_trajectory, " ".join(["1"] * 12) + "\n", "got 12 \\(a KITTI poses file"),
        (read_tum_trajectory, "1403636580838555648,1,2,3\n", "use --euroc"),
        (read_tum_trajectory, "12:00 1 2 3 0 0 0 1\n", "line 1: expected a timestamp in seconds"),
        (read_euroc_groundtruth, "1305031098.6659 1 2 3 0 0 0 1\n", "seconds\\? a TUM"),
        (read_euroc_groundtruth, "1403636580838555648,1,2\n", "at least 4 values"),
        (read_euroc_groundtruth, "# only a header\n", "holds no data rows"),
    ]
    for reader, text, message in cases:
        bad.write_text(text)
        with pytest.raises(EvaluationError, match=message):
            reader(bad)


def test_match_times_takes_the_nearest_sample_within_the_tolerance():
    from netvlad_client.evaluation import GroundTruth

    truth = GroundTruth(np.array([100, 200, 300], dtype=np.int64), np.zeros((3, 3)))
    frames = np.array([40, 90, 149, 150, 151, 310, 351, 400])
    # 150 is as near 100 as 200: the earlier sample wins; 50 away is still within 50.
    assert match_times(frames, truth, 50).tolist() == [-1, 0, 0, 0, 1, 2, -1, -1]
    assert match_times(np.array([50, 350]), truth, 50).tolist() == [0, 2]
    assert match_times(frames, truth, 0).tolist() == [-1] * 8
    assert match_times(np.array([200]), truth, 0).tolist() == [1]


def timed_sequence(tmp_path: Path, kind: str) -> tuple[Path, Path, np.ndarray]:
    """A 3-lap loop seen at 10 Hz by frames named by time; ground truth at 100 Hz that starts
    0.5 s after the camera (5 frames without ground truth, as EuRoC's first frames)."""
    positions = loop_positions(places=100, laps=3)
    start = 1_403_636_579_763_555_584 if kind == "euroc" else 1_305_031_102_175_304_000
    frame_ns = start + np.arange(300, dtype=np.int64) * 100_000_000
    gt_ns = start + 500_000_000 + np.arange(2951, dtype=np.int64) * 10_000_000 + 1_000_000
    # Ground-truth position at time t: the loop position of the frame nearest in time.
    gt_positions = positions[np.clip(np.rint((gt_ns - start) / 1e8).astype(int), 0, 299)]
    folder = tmp_path / "images"
    folder.mkdir()
    for t in frame_ns[::-1]:
        name = f"{t}.png" if kind == "euroc" else f"{t // 10**9}.{(t % 10**9) // 1000:06d}.png"
        (folder / name).write_bytes(b"")
    if kind == "euroc":
        gt = tmp_path / "data.csv"
        rows = [f"{t},{x:.6f},{y:.6f},{z:.6f},1,0,0,0"
                for t, (x, y, z) in zip(gt_ns, gt_positions, strict=True)]
        gt.write_text("#timestamp [ns], p_RS_R_x [m], p_RS_R_y [m], p_RS_R_z [m], q_RS_w []"
                      ", q_RS_x [], q_RS_y [], q_RS_z []\n" + "\n".join(rows) + "\n")
    else:
        gt = tmp_path / "groundtruth.txt"
        rows = [f"{t // 10**9}.{t % 10**9:09d} {x:.6f} {y:.6f} {z:.6f} 0 0 0 1"
                for t, (x, y, z) in zip(gt_ns, gt_positions, strict=True)]
        gt.write_text("# timestamp tx ty tz qx qy qz qw\n" + "\n".join(rows) + "\n")
    return folder, gt, positions


@pytest.mark.parametrize("kind", ["tum", "euroc"])
def test_cli_timed_ground_truth_matches_frames_by_the_time_in_their_names(tmp_path, capsys, kind):
    folder, gt, positions = timed_sequence(tmp_path, kind)
    values = loop_descriptors(300, 100)
    np.save(tmp_path / "d.npy", values)  # rows in time order, as evaluate saves them
    out = tmp_path / "out"
    args = ["evaluate", f"--{kind}", str(gt), "--images", str(folder), "--descriptors",
            str(tmp_path / "d.npy"), "--dims", "all", "--suppression", "21", "--out", str(out)]
    assert cli_main([*args, "--no-plots"]) == 0
    captured = capsys.readouterr()
    # The first 5 frames (0.5 s before the ground truth starts) are left out and named.
    expected = evaluate(values[5:], positions[5:], EvaluationSettings(suppression=21))
    assert auc_line(captured.out) == pytest.approx(expected.auc, abs=1e-9)
    assert "by the timestamps in the names" in captured.err
    assert "295 of 300 frames have ground truth within 0.02 s; left out 5 without" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"]["evaluated"] == 295
    assert len(summary["frames"]["without_ground_truth"]) == 5
    assert summary["positions"]["kind"] == kind

    # A tolerance below the 1 ms offset matches nothing: the error gives both time spans.
    assert cli_main([*args, "--no-plots", "--time-tolerance", "0.0005"]) == 1
    err = capsys.readouterr().err
    assert "only 0 of the 300 frames" in err and "raise --time-tolerance" in err
    assert "the ground truth 1" in err

    # Descriptors without names and no images: nothing to read the times from.
    assert cli_main(["evaluate", f"--{kind}", str(gt), "--descriptors", str(tmp_path / "d.npy"),
                     "--no-plots", "--out", str(out)]) == 1
    assert "carries no names; give --images DIR" in capsys.readouterr().err


# --------------------------------------------------------------------------- match list, figures


def test_cli_match_list_and_trajectory_with_loop_closures(tmp_path, capsys):
    positions = loop_positions(places=100, laps=3)
    values = loop_descriptors(300, 100)
    rng = np.random.default_rng(3)
    values[250:] = rng.standard_normal((50, 32))  # the last 50 frames match wrongly
    np.save(tmp_path / "d.npy", values)
    np.savetxt(tmp_path / "p.txt", positions)
    out = tmp_path / "out"
    assert cli_main(["evaluate", "--positions", str(tmp_path / "p.txt"), "--descriptors",
                     str(tmp_path / "d.npy"), "--dims", "all", "--suppression", "21",
                     "--closure-precision", "0.8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    ev = evaluate(values, positions, EvaluationSettings(suppression=21))
    accepted = accepted_at_precision(ev, 0.8)
    # The longest prefix of the acceptance order with precision >= 0.8, and not one more.
    assert ev.precision[len(accepted) - 1] >= 0.8
    assert len(accepted) == len(ev.order) or ev.precision[len(accepted):].max() < 0.8
    true = int(ev.true_positive[accepted].sum())
    assert len(accepted) - true > 0 and true > 200  # both kinds are drawn
    assert (f"loop closures at precision >= 0.8: {len(accepted)} accepted ({true} true, "
            f"{len(accepted) - true} false)") in printed

    with (out / "matches.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 300
    assert list(rows[0]) == ["frame", "name", "match", "match_name", "squared_distance",
                             "acceptance_rank", "accepted", "true_positive", "has_true_revisit",
                             "position_distance", "x", "y", "z", "match_x", "match_y", "match_z"]
    for i, row in enumerate(rows):
        assert int(row["match"]) == ev.match[i]
        assert float(row["squared_distance"]) == pytest.approx(ev.match_distance[i], rel=1e-7)
        assert row["true_positive"] == str(int(ev.true_positive[i]))
        assert int(row["acceptance_rank"]) == ev.order.tolist().index(i)
        distance = np.linalg.norm(positions[i] - positions[ev.match[i]])
        assert float(row["position_distance"]) == pytest.approx(distance, abs=1e-6)
        assert float(row["x"]) == pytest.approx(positions[i, 0])
    assert sorted(int(r["frame"]) for r in rows if r["accepted"] == "1") == sorted(accepted)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loop_closures"]["accepted"] == len(accepted)
    assert summary["loop_closures"]["true"] == true
    assert_png(out / "trajectory.png")

    # The figure: one green line per accepted true match, one red per false, x-y plane.
    fig = trajectory_figure(positions, ev.match, accepted, ev.true_positive, "xz", "t")
    from matplotlib.collections import LineCollection

    lines = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    green, red = lines
    assert len(green.get_segments()) == true and len(red.get_segments()) == len(accepted) - true
    first = accepted[0]
    np.testing.assert_allclose(
        green.get_segments()[0] if ev.true_positive[first] else red.get_segments()[0],
        positions[[first, ev.match[first]]][:, [0, 2]],
    )
    assert tuple(green.get_colors()[0][:3]) != tuple(red.get_colors()[0][:3])
    assert green.get_colors()[0][1] > green.get_colors()[0][0]  # green
    assert red.get_colors()[0][0] > red.get_colors()[0][1]  # red


def test_confusion_title_stays_clear_of_the_colour_bar():
    frames = np.arange(0, 4541, 5)
    matrix = np.random.default_rng(0).random((len(frames), len(frames))).astype(np.float32)
    title = ("Descriptor distances (vd16_pitts30k_conv5_3_vlad_preL2_intra_white, suppressed "
             "band of 501 blank, every 5th frame)")
    fig = confusion_figure(matrix, frames, title, "squared descriptor distance")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [t for t in (fig._suptitle, *(ax.title for ax in fig.axes)) if t and t.get_text()]
    assert texts, "no title drawn"
    whole = fig.bbox
    image_axes, colour_bar = fig.axes
    # Clear of the picture and of the whole colour bar (its ticks and label included).
    for box in (image_axes.get_window_extent(renderer), colour_bar.get_tightbbox(renderer)):
        for text in texts:
            assert not text.get_window_extent(renderer).overlaps(box), text.get_text()
    for text in texts:
        extent = text.get_window_extent(renderer)
        assert whole.x0 <= extent.x0 and extent.x1 <= whole.x1 and extent.y1 <= whole.y1


# --------------------------------------------------------------------------- through a server


def test_end_to_end_through_a_real_server(tiny_server_process, tmp_path, capsys):
    from client_support import reference, write_png

    # KITTI layout: 12 places 50 m apart on a loop, driven 3 times; each visit sees its place's
    # scene with a little sensor noise. Described by the real demo-tiny server (4 images a
    # request, so the 36 images take several requests and come back in file order).
    places, laps = 12, 3
    rng = np.random.default_rng(21)
    scenes = rng.integers(0, 256, size=(places, 32, 32), dtype=np.uint8)
    images = tmp_path / "seq" / "image_0"
    images.mkdir(parents=True)
    pixels = []
    for frame in range(places * laps):
        noise = rng.integers(-3, 4, size=(32, 32))
        picture = np.clip(scenes[frame % places].astype(int) + noise, 0, 255).astype(np.uint8)
        write_png(images / f"{frame}.png", picture)  # unpadded: text order would be 0, 1, 10
        pixels.append(picture)
    poses = write_kitti_poses(tmp_path / "00.txt", loop_positions(places, laps, 600.0))
    out = tmp_path / "out"
    args = ["evaluate", "--images", str(tmp_path / "seq"), "--poses", str(poses)]
    # The command line's default --dims 128 is refused from the server's info, before describing.
    assert cli_main(["--target", tiny_server_process.target, *args, "--out", str(out)]) == 1
    assert ("--dims 128 asks for more dimensions than the 32 of the server's model"
            in capsys.readouterr().err) and not out.exists()
    args += ["--dims", "32", "--suppression", "5", "--out", str(out)]

    assert cli_main(["--target", tiny_server_process.target, *args]) == 0
    first = capsys.readouterr()
    assert "natural order of the names (digit runs as numbers), which differs" in first.err
    saved = np.load(out / "descriptors.npy")  # in frame order 0, 1, 2, ..., 35
    expected = np.stack([reference(p) for p in pixels])  # the network called directly
    np.testing.assert_allclose(saved, expected, atol=1e-5)
    auc = auc_line(first.out)
    assert auc == pytest.approx(
        evaluate(saved, read_kitti_poses(poses), EvaluationSettings(dims=32, suppression=5)).auc,
        abs=1e-6,
    )
    assert auc > 0.95  # same scene + noise is far nearer than another scene, even untrained
    for name in ("pr_curve.png", "confusion_descriptors.png", "confusion_positions.png"):
        assert_png(out / name)
    assert json.loads((out / "summary.json").read_text())["target"] == tiny_server_process.target

    # The saved descriptors repeat the run without the server.
    again = ["evaluate", "--descriptors", str(out / "descriptors.npy"), "--poses", str(poses)]
    again += ["--dims", "32", "--suppression", "5", "--out", str(tmp_path / "again")]
    assert cli_main(["--target", "127.0.0.1:1", *again]) == 0
    assert auc_line(capsys.readouterr().out) == auc
