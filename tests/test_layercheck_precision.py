"""compare-layers under reduced precision: limits scaled to the precision's rounding.

The float32 limits of the reference port cannot hold for bfloat16 (conv1_1 of a real image is off
by more than 1 after rounding); the scaled limits must pass correct weights and still name a
convolution whose kernel is 5% off.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference_numpy as ref
from netvlad_server.layercheck import LAYER_MAX_ABS, relative_limit
from netvlad_server.models_cli import main
from netvlad_server.weights import demo_weights
from weightfiles import write_stats, write_structed_mat


def compare(capsys, net, stats, precision: str) -> tuple[int, dict[str, list[str]], str]:
    """Run `netvlad-models compare-layers --precision P`; exit code, rows by layer, stdout."""
    code = main(["compare-layers", str(net), str(stats), "--precision", precision])
    out = capsys.readouterr().out
    table = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 7 and fields[0].isdigit():
            table[fields[1]] = fields
    return code, table, out


def scene(weights, height: int, width: int) -> np.ndarray:
    """A smooth scene with edges (not noise), mean colour removed as vl_simplenn receives it."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([
        128 + 100 * np.sin(x / 7.0) * np.cos(y / 11.0),
        128 + 90 * np.sign(np.sin(x / 13.0 + y / 17.0)),
        255 * (x + y) / (height + width),
    ], axis=-1)
    return (pixels - weights.tensors["average_rgb"]).astype(np.float32)


def check(capsys, tmp_path, weights, image, precisions=("float32", "bfloat16", "float16")) -> None:
    """Correct weights pass in every precision; a 5% kernel change fails, naming its layer."""
    stats = write_stats(tmp_path / "stats.mat", image,
                        ref.image_layers(weights.tensors, image, subtract_mean=False))
    net = write_structed_mat(weights.tensors, tmp_path / "net.mat")
    tensors = dict(weights.tensors)
    tensors["conv3_2/kernel"] = tensors["conv3_2/kernel"] * np.float32(1.05)
    perturbed = write_structed_mat(tensors, tmp_path / "perturbed.mat")
    for precision in precisions:
        code, table, out = compare(capsys, net, stats, precision)
        assert code == 0, out
        assert "PASSED" in out
        code, table, out = compare(capsys, perturbed, stats, precision)
        assert code == 1, out
        assert "FAILED: first mismatch at conv3_2 (layer 13)" in out
        assert table["conv3_1"][-1] == "ok" and table["conv3_2"][-1] == "FAIL"


def test_scaled_limits_pass_correct_weights_and_catch_a_changed_kernel(capsys, tmp_path):
    weights = demo_weights("tiny", seed=3)
    check(capsys, tmp_path, weights, scene(weights, 48, 64))


def test_limits_widen_with_the_values_for_reduced_precision_only(capsys, tmp_path, tiny_weights):
    image = scene(tiny_weights, 40, 56)
    layers = ref.image_layers(tiny_weights.tensors, image, subtract_mean=False)
    stats = write_stats(tmp_path / "stats.mat", image, layers)
    net = write_structed_mat(tiny_weights.tensors, tmp_path / "net.mat")
    largest = float(np.max(np.abs(dict(layers)["conv1_1"])))
    _, table32, _ = compare(capsys, net, stats, "float32")
    _, table16, _ = compare(capsys, net, stats, "bfloat16")
    assert float(table32["conv1_1"][5]) == LAYER_MAX_ABS
    expected = max(LAYER_MAX_ABS, relative_limit("bfloat16") * largest)
    assert float(table16["conv1_1"][5]) == pytest.approx(expected, rel=5e-3)
    assert relative_limit("float32") == 0.0
    assert relative_limit("float16") < relative_limit("bfloat16")


@pytest.mark.slow
def test_full_size_bfloat16_passes_and_catches_a_changed_kernel(capsys, tmp_path):
    weights = demo_weights("full", seed=4)
    check(capsys, tmp_path, weights, scene(weights, 96, 128), precisions=("bfloat16",))
