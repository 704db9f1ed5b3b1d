"""The KITTI test's AUC against a plain re-statement of the reference's code (docs/EVALUATION.md).

The reference (netvlad_tf's `precision_recall.evaluate`, MATLAB's `evaluate_pr.m`) builds the full
distance matrix with scipy's `pdist`, suppresses the band around the diagonal, takes each frame's
`argmin`, sorts the frames by match distance with a stable sort and sums
(recall[i] - recall[i-1]) x precision[i] over i = 2..n. `reference_kitti` below does exactly that
with scipy and plain Python loops; the project's blockwise float32-shortlist evaluation must agree
to 1e-9 in AUC and pick the very same matches, also on sequences full of ties and near-ties.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from netvlad_client.evaluation import (
    EvaluationSettings,
    auc_from_zero,
    evaluate,
    precision_recall,
    reference_auc,
)
from scipy.spatial.distance import pdist, squareform


def reference_kitti(
    feats: np.ndarray, positions: np.ndarray, suppression: int, radius: float
) -> dict[str, object]:
    """The reference evaluation, re-stated: full pdist matrices, argmin, stable sort, the sum."""
    n = len(feats)
    half = (suppression - 1) // 2
    desc = squareform(pdist(feats, "sqeuclidean"))
    pos = squareform(pdist(positions, "euclidean"))
    band = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) <= half
    desc[band] = np.inf
    pos[band] = np.inf
    match = desc.argmin(axis=1)  # the first (lowest) index among equal distances
    match_distance = desc[np.arange(n), match]
    gt = pos.min(axis=1)
    positives = int(np.sum(gt < radius))
    order = np.argsort(match_distance, kind="stable")
    tp = fp = 0
    precision, recall = [], []
    for i in order:
        if pos[i, match[i]] < radius:
            tp += 1
        else:
            fp += 1
        precision.append(tp / (tp + fp))
        recall.append(tp / positives)
    area = 0.0
    for i in range(1, len(order)):  # i = 2..n in the reference's 1-based counting
        area += (recall[i] - recall[i - 1]) * precision[i]
    return {"auc": area, "match": match, "order": order, "positives": positives}


def loop(places: int, laps: int, spacing: float = 8.0) -> np.ndarray:
    """Positions (N x 3) of a circular route of `places` points driven `laps` times."""
    angle = 2 * np.pi * (np.arange(places * laps) % places) / places
    r = places * spacing / (2 * np.pi)
    return np.column_stack([r * np.cos(angle), r * np.sin(angle), np.zeros(len(angle))])


def random_sequence(seed: int) -> tuple[np.ndarray, np.ndarray, int, float]:
    """A noisy loop with drift and random look-alikes: (descriptors, positions, band, radius)."""
    rng = np.random.default_rng(seed)
    places, laps = int(rng.integers(20, 60)), int(rng.integers(2, 5))
    positions = loop(places, laps) + rng.normal(0, 1.5, size=(places * laps, 3))
    codes = rng.standard_normal((places, int(rng.integers(4, 48))))
    noise = float(rng.uniform(0.2, 1.5))
    feats = codes[np.arange(places * laps) % places] + noise * rng.standard_normal(
        (places * laps, codes.shape[1])
    )
    suppression = int(rng.choice([1, 3, 5, 11]))
    return feats.astype(np.float32), positions, suppression, float(rng.uniform(3.0, 9.0))


@pytest.mark.parametrize("seed", range(8))
def test_auc_equals_the_reference_restatement_on_random_sequences(seed):
    feats, positions, suppression, radius = random_sequence(seed)
    expected = reference_kitti(feats, positions, suppression, radius)
    ev = evaluate(
        feats, positions, EvaluationSettings(radius=radius, suppression=suppression)
    )
    assert ev.match.tolist() == expected["match"].tolist()
    assert ev.order.tolist() == expected["order"].tolist()
    assert ev.num_positives == expected["positives"]
    assert abs(ev.auc - expected["auc"]) < 1e-9
    # The second figure counts the first step as well: exactly recall[1] x precision[1] more.
    assert ev.auc_from_zero - ev.auc == pytest.approx(ev.recall[0] * ev.precision[0], abs=1e-12)


def near_tie_sequences() -> list[tuple[str, np.ndarray]]:
    """Descriptor sets built so that many match distances tie or differ in the last bits."""
    rng = np.random.default_rng(31)
    n = 160
    integers = rng.integers(0, 3, size=(n, 3)).astype(np.float32)  # exact ties everywhere
    base = rng.standard_normal((n // 4, 64)).astype(np.float32)
    ulp = np.repeat(base, 4, axis=0)  # four copies a place, some nudged by one float32 ulp
    nudged = rng.random(ulp.shape) < 0.05
    ulp[nudged] = np.nextafter(ulp[nudged], np.float32(np.inf))
    far = (300.0 + 0.01 * rng.standard_normal((n, 16))).astype(np.float32)  # float32 cancels
    duplicates = rng.standard_normal((n, 32)).astype(np.float32)
    duplicates[::5] = duplicates[0]  # every fifth frame identical: ties broken by index
    unit = rng.standard_normal((n, 128)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    unit[1::2] = unit[0::2] + np.float32(1e-7) * rng.standard_normal((n // 2, 128), np.float32)
    return [
        ("integers", integers),
        ("ulp", ulp),
        ("far", far),
        ("duplicates", duplicates),
        ("unit", unit),
        ("float64", far.astype(np.float64) + 1e-12 * rng.standard_normal(far.shape)),
    ]


@pytest.mark.parametrize(("name", "feats"), near_tie_sequences())
def test_blockwise_path_picks_the_references_matches_on_near_ties(name, feats):
    positions = loop(places=40, laps=4, spacing=10.0)
    expected = reference_kitti(feats, positions, suppression=5, radius=5.0)
    for block in (37, 1 << 21):  # many tiny row blocks, and the default
        ev = evaluate(
            feats, positions, EvaluationSettings(suppression=5), block_elements=block
        )
        assert ev.match.tolist() == expected["match"].tolist(), name
        assert ev.order.tolist() == expected["order"].tolist(), name
        assert abs(ev.auc - expected["auc"]) < 1e-9, name
    # The match distances are pdist's values (float64 sums of the given values).
    desc = squareform(pdist(feats, "sqeuclidean"))
    np.testing.assert_allclose(
        ev.match_distance, desc[np.arange(len(feats)), ev.match], rtol=1e-12, atol=0
    )


def test_the_first_accepted_match_adds_no_area():
    # T F T T: precision 1, 1/2, 2/3, 3/4; recall (P = 4) 1/4, 1/4, 1/2, 3/4.
    precision, recall = precision_recall(np.array([True, False, True, True]), 4)
    np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3, 3 / 4])
    np.testing.assert_allclose(recall, [1 / 4, 1 / 4, 1 / 2, 3 / 4])
    assert reference_auc(precision, recall) == pytest.approx(1 / 4 * (2 / 3 + 3 / 4), abs=1e-15)
    assert auc_from_zero(precision, recall) == pytest.approx(
        1 / 4 * (1 + 2 / 3 + 3 / 4), abs=1e-15
    )
    # A perfect ranking: 1 - 1/P in the reference's figure, exactly 1 from zero.
    precision, recall = precision_recall(np.ones(10, dtype=bool), 10)
    assert reference_auc(precision, recall) == pytest.approx(0.9, abs=1e-15)
    assert auc_from_zero(precision, recall) == pytest.approx(1.0, abs=1e-15)
    # A single accepted match has no area at all.
    precision, recall = precision_recall(np.array([True]), 1)
    assert reference_auc(precision, recall) == 0.0


def test_evaluate_command_prints_and_saves_the_references_auc(tmp_path, capsys):
    from netvlad_client.cli import main as cli_main

    feats, positions, suppression, radius = random_sequence(100)
    np.save(tmp_path / "d.npy", feats)
    np.savetxt(tmp_path / "positions.txt", positions)
    expected = reference_kitti(feats, positions, suppression, radius)
    args = ["evaluate", "--positions", str(tmp_path / "positions.txt"), "--descriptors"]
    args += [str(tmp_path / "d.npy"), "--dims", "all", "--suppression", str(suppression)]
    args += ["--radius", repr(radius), "--out", str(tmp_path / "o"), "--no-plots"]
    assert cli_main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    headline = [line for line in lines if line.startswith("AUC: ")]
    assert len(headline) == 1
    assert abs(float(headline[0].split()[1]) - expected["auc"]) < 1e-9
    second = [line for line in lines if line.startswith("AUC from recall 0")]
    assert len(second) == 1 and float(second[0].split()[-1]) > float(headline[0].split()[1])
    result = json.loads((tmp_path / "o" / "summary.json").read_text())["results"][0]
    assert abs(result["auc"] - expected["auc"]) < 1e-9
    assert result["auc_from_zero"] > result["auc"]
