"""The int8 path's LiteRT whitening: two int8 levels, float32's result, the float32 copy released.

Real LiteRT interpreters on the tiny model (and, marked slow, the full-size demo matrix).
"""

from __future__ import annotations

import numpy as np
import pytest
from netvlad_server.int8 import Int8Network, build_int8_network
from netvlad_server.network import NetVLADNetwork
from netvlad_server.runtime import synthetic_scene
from netvlad_server.tflite import (
    WhiteningRunner,
    interpreter_class,
    split_rows,
    whitening_levels,
    whitening_model,
)
from netvlad_server.weights import demo_weights, save_export


def unit_rows(count: int, width: int, seed: int = 0) -> np.ndarray:
    """Rows like postL2's: unit length, mixed signs, a few large values."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((count, width)).astype(np.float32)
    rows[:, :7] *= 6.0  # outliers widen each row's range, as real NetVLAD vectors do
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """Largest row-wise |ours - reference| / |reference|."""
    return float(np.max(np.linalg.norm(ours - reference, axis=1)
                        / np.linalg.norm(reference, axis=1)))


def test_two_levels_rebuild_every_column_to_its_largest_value_over_64516():
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((300, 40)).astype(np.float32)
    matrix[:, 3] *= 1e-4  # a column far smaller than the others keeps its own scale
    matrix[:, 7] = 0.0  # and an empty one does not divide by zero
    weights, scales = whitening_levels(matrix)
    assert weights.dtype == np.int8 and weights.shape == (2, 40, 300)
    assert scales.shape == (2, 40)
    rebuilt = (weights[0].T * scales[0] + weights[1].T * scales[1]).astype(np.float32)
    column_max = np.abs(matrix).max(axis=0)
    assert np.all(np.abs(rebuilt - matrix) <= column_max / 64516 + 1e-12)
    one_level = weights[0].T * scales[0]
    assert np.abs(one_level - matrix).max() > 100 * np.abs(rebuilt - matrix).max()
    assert not rebuilt[:, 7].any()


def test_split_rows_first_half_is_exactly_int8_and_the_halves_add_up():
    rows = unit_rows(3, 500)
    rows[1] = np.abs(rows[1])  # a row without negative values: its range starts at 0
    rows[2] = 0.0  # an all-zero row
    split = split_rows(rows)
    rounded, rest = split[:3], split[3:]
    np.testing.assert_allclose(rounded + rest, rows, atol=1e-7)
    for row, original in zip(rounded, rows, strict=True):
        assert len(np.unique(row)) <= 256  # int8 levels
        spread = max(original.max(), 0) - min(original.min(), 0)
        assert np.abs(original - row).max() <= spread / 255 / 2 + 1e-7
    assert not rest[2].any() and not rounded[2].any()


def test_whitening_model_is_two_int8_fully_connected_at_a_quarter_of_float32s_bytes_each():
    matrix = np.random.default_rng(2).standard_normal((1024, 64)).astype(np.float32)
    content = whitening_model(matrix)
    assert 2 * matrix.size <= len(content) < 2 * matrix.size + 16_384  # two int8 levels
    interpreter = interpreter_class()(model_content=content)
    ops = interpreter._get_ops_details()
    assert [op["op_name"] for op in ops] == ["FULLY_CONNECTED", "FULLY_CONNECTED"]
    kinds = {detail["name"]: detail["dtype"] for detail in interpreter.get_tensor_details()}
    assert kinds == {"rows": np.float32, "level1": np.int8, "coarse": np.float32,
                     "rounded": np.float32, "level2": np.int8, "fine": np.float32}


def test_whitening_runner_gives_float32s_product_at_every_batch_size():
    matrix = np.random.default_rng(3).standard_normal((2048, 96)).astype(np.float32) * 0.02
    bias = np.linspace(-0.01, 0.01, 96, dtype=np.float32)
    runner = WhiteningRunner(matrix, bias, threads=1)
    for count in (1, 5, 2, 5):  # the input is re-prepared when the batch size changes
        rows = unit_rows(count, 2048, seed=count)
        reference = rows.astype(np.float64) @ matrix + bias
        ours = runner(rows)
        assert ours.shape == (count, 96) and ours.dtype == np.float32
        error = relative_error(ours, reference)
        assert 0 < error < 5e-4, error  # computed in int8, yet float32's to about 1e-4
    one_level = (split_rows(rows)[:count] @ matrix + bias)  # what one rounded input gives
    assert relative_error(one_level, reference) > 5 * error


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """The tiny weights as an exported .npz in their own folder (where the cache goes)."""
    path = tmp_path_factory.mktemp("weights") / "tiny.npz"
    save_export(demo_weights("tiny", seed=0), path)
    return path


def test_int8_network_whitens_in_litert_without_a_tensorflow_copy_of_the_matrix(weights_file):
    int8 = build_int8_network(demo_weights("tiny", seed=0), str(weights_file))
    network = int8._network
    assert network._wpca is None  # TensorFlow never held a copy of the whitening
    images = np.stack([synthetic_scene(48, 64, seed) for seed in range(4)])
    with pytest.raises(RuntimeError, match="built without its whitening"):
        NetVLADNetwork(demo_weights("tiny", seed=0), whitening=False)(images)
    with pytest.raises(RuntimeError, match="float32 matrix was released"):
        int8._whitening.float32(np.zeros((1, network.output_dims), np.float32))
    ours = int8(images)
    float_tail = Int8Network(int8._model, NetVLADNetwork(demo_weights("tiny", seed=0)))(images)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours, float_tail, atol=5e-5)  # the same convolutions
    assert not np.array_equal(ours, float_tail)  # but the whitening really ran in LiteRT
    np.testing.assert_allclose(int8(images[:1]), ours[:1], atol=1e-6)  # batch 1 as in a batch


@pytest.mark.slow
def test_full_size_whitening_in_int8_keeps_the_descriptor():
    weights = demo_weights("full")
    matrix = np.reshape(weights.tensors["WPCA/kernel"], [32768, 4096])
    bias = weights.tensors["WPCA/bias"]
    runner = WhiteningRunner(matrix, bias)
    rows = unit_rows(3, 32768, seed=4)
    reference = rows.astype(np.float64) @ matrix + bias.reshape(-1)
    assert relative_error(runner(rows), reference) < 5e-4
