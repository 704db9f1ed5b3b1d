"""compare-layers through the real CLI: .mat models and stats written from the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import reference_numpy as ref
import scipy.io
from netvlad_server.layercheck import FINAL_MAX_ABS, LAYER_MAX_ABS
from netvlad_server.models_cli import main
from weightfiles import write_stats, write_structed_mat


@pytest.fixture(scope="module")
def image(tiny_weights) -> np.ndarray:
    """A 40x56 RGB image with the mean colour removed, as vl_simplenn receives it."""
    pixels = np.random.default_rng(20).uniform(0, 255, (40, 56, 3))
    return (pixels - tiny_weights.tensors["average_rgb"]).astype(np.float32)


@pytest.fixture(scope="module")
def reference_layers(tiny_weights, image) -> list[tuple[str, np.ndarray]]:
    """The NumPy reference's outputs for every layer, playing MATLAB's part."""
    return ref.image_layers(tiny_weights.tensors, image, subtract_mean=False)


@pytest.fixture(scope="module")
def net_mat(tiny_weights, tmp_path_factory):
    """The tiny weights as a structed MatConvNet .mat."""
    return write_structed_mat(tiny_weights.tensors, tmp_path_factory.mktemp("mat") / "net.mat")


def run(capsys, *args: object) -> tuple[int, str, str]:
    """Run `netvlad-models compare-layers ARGS`; return exit code, stdout and stderr."""
    code = main(["compare-layers", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows(out: str) -> dict[str, list[str]]:
    """Table rows keyed by layer name."""
    table = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 7 and fields[0].isdigit():
            table[fields[1]] = fields
    return table


@pytest.mark.parametrize("input_in_outs", [False, True], ids=["input+outs", "netvlad_tf-outs"])
def test_passes_on_reference_stats(
    capsys, tmp_path, net_mat, image, reference_layers, input_in_outs
):
    stats = write_stats(tmp_path / "stats.mat", image, reference_layers, input_in_outs)
    code, out, _ = run(capsys, net_mat, stats)
    assert code == 0, out
    table = rows(out)
    assert len(table) == 35 and all(fields[-1] == "ok" for fields in table.values())
    assert table["conv1_1"][3] == "40x56x8"
    assert table["vlad_core"][3] == "4x8"  # 1 x K x D, squeezed
    assert table["vlad_intranorm"][2] == "normalize"  # names and types come from the .mat
    assert float(table["finalL2"][5]) == FINAL_MAX_ABS
    assert float(table["conv3_2"][5]) == LAYER_MAX_ABS
    assert "PASSED: all 35 layers" in out


def test_fails_naming_the_perturbed_layer(
    capsys, tmp_path, tiny_weights, image, reference_layers
):
    tensors = dict(tiny_weights.tensors)
    tensors["conv3_2/kernel"] = tensors["conv3_2/kernel"] * np.float32(1.1)
    net = write_structed_mat(tensors, tmp_path / "perturbed.mat")
    stats = write_stats(tmp_path / "stats.mat", image, reference_layers)
    code, out, _ = run(capsys, net, stats)
    assert code == 1
    table = rows(out)
    names = list(table)
    assert all(table[name][-1] == "ok" for name in names[: names.index("conv3_2")])
    assert table["conv3_2"][-1] == "FAIL"
    assert "FAILED: first mismatch at conv3_2 (layer 13)" in out


def test_final_vector_has_the_tighter_threshold(
    capsys, tmp_path, net_mat, image, reference_layers
):
    layers = list(reference_layers)
    name, final = layers[-1]
    layers[-1] = (name, final + np.eye(1, final.size, 3).ravel() * 0.001)  # 0.001 off in one dim
    code, out, _ = run(capsys, net_mat, write_stats(tmp_path / "s.mat", image, layers))
    assert code == 1
    table = rows(out)
    assert [n for n, fields in table.items() if fields[-1] == "FAIL"] == ["finalL2"]
    assert 0.0009 < float(table["finalL2"][4]) < 0.0011


def stats_with_vlad_core(path, image, layers, vlad_core: np.ndarray):
    """Write reference stats, then replace the vlad_core entry of `outs` with `vlad_core`."""
    index = [name for name, _ in layers].index("vlad_core")
    write_stats(path, image, layers)
    contents = scipy.io.loadmat(path)
    contents["outs"][0, index] = vlad_core.astype(np.float32)
    scipy.io.savemat(path, {"input": contents["input"], "outs": contents["outs"]})
    return path


def test_vlad_core_as_d_major_vector_is_accepted(
    capsys, tmp_path, net_mat, image, reference_layers
):
    vlad = dict(reference_layers)["vlad_core"]  # D x K
    d_major = stats_with_vlad_core(tmp_path / "d.mat", image, reference_layers, vlad.reshape(-1))
    code, out, _ = run(capsys, net_mat, d_major)
    assert code == 0, out

    k_major = stats_with_vlad_core(tmp_path / "k.mat", image, reference_layers, vlad.T.reshape(-1))
    code, out, _ = run(capsys, net_mat, k_major)
    assert code == 1 and rows(out)["vlad_core"][-1] == "FAIL"


def test_transposed_vlad_core_is_refused_not_reordered(
    capsys, tmp_path, net_mat, image, reference_layers
):
    vlad = dict(reference_layers)["vlad_core"]  # D x K, where MatConvNet stores 1 x K x D
    stats = stats_with_vlad_core(tmp_path / "t.mat", image, reference_layers, vlad)
    code, _, err = run(capsys, net_mat, stats)
    assert code == 2
    assert "layer 31 (vlad_core): stats shape [8, 4]" in err and "1 x K x D" in err


def test_wrong_number_of_outputs_is_refused(capsys, tmp_path, net_mat, image, reference_layers):
    stats = write_stats(tmp_path / "stats.mat", image, reference_layers[:-2])
    code, _, err = run(capsys, net_mat, stats)
    assert code == 2
    assert "'outs' holds 33 arrays; the network has 35 layers" in err


def test_stats_without_outs_is_refused(capsys, tmp_path, net_mat):
    scipy.io.savemat(tmp_path / "empty.mat", {"times": np.zeros(3)})
    code, _, err = run(capsys, net_mat, tmp_path / "empty.mat")
    assert code == 2 and "no variable 'outs' (found: times)" in err


def test_stats_that_are_not_a_mat_file_are_refused(capsys, tmp_path, net_mat):
    (tmp_path / "notes.txt").write_text("hello\n")
    code, _, err = run(capsys, net_mat, tmp_path / "notes.txt")
    assert code == 2 and "notes.txt: not a readable MATLAB v5/v7 .mat file" in err


@pytest.mark.parametrize(
    ("name", "problem"), [("absent.mat", "no such file"), (".", "is a directory")]
)
def test_missing_or_directory_net_is_named(capsys, tmp_path, net_mat, name, problem):
    code, _, err = run(capsys, tmp_path / name, net_mat)
    assert code == 2 and f"{tmp_path / name}: {problem}; expected a structed MatConvNet" in err


def test_unknown_precision_is_refused(capsys, net_mat, tmp_path):
    code, _, err = run(capsys, net_mat, tmp_path / "x.mat", "--precision", "int8")
    assert code == 2 and "--precision must be one of float32, bfloat16, float16" in err
