"""Weight loading: all formats round-trip to identical tensors; each bad file has its own error."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from netvlad_server.models_cli import main as models_main
from netvlad_server.weights import (
    SCOPE,
    TENSOR_NAMES,
    MatLayer,
    NetVLADWeights,
    WeightsError,
    check_tensors,
    demo_weights,
    load_weights,
    read_matconvnet,
    save_export,
)
from weightfiles import (
    OFFICIAL_NAME,
    matconvnet_layers,
    write_official_dir,
    write_official_zip,
    write_structed_mat,
    write_tf1_checkpoint,
)


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    """Random tiny-shape tensors (not the session demo seed) written to every format below."""
    return demo_weights("tiny", seed=7).tensors


@pytest.fixture(scope="module")
def files(tmp_path_factory, tensors) -> dict[str, Path]:
    """The same tensors as a checkpoint prefix, official dir, zips, .mat and .npz export."""
    root = tmp_path_factory.mktemp("formats")
    prefix = write_tf1_checkpoint(tensors, root / "plain" / "model.ckpt")
    official = write_official_dir(tensors, root / "unpacked")
    moved = root / "moved" / OFFICIAL_NAME
    shutil.copytree(write_official_dir(tensors, root / "elsewhere"), moved)
    shutil.rmtree(root / "elsewhere")  # its 'checkpoint' file now names a path that is gone
    export = root / "export.npz"
    save_export(NetVLADWeights(dict(tensors), "test", "demo"), export)
    return {
        "prefix": prefix,
        "index file": Path(f"{prefix}.index"),
        "official dir": official,
        "official prefix": official / OFFICIAL_NAME,
        "moved official dir": moved,
        "zip": write_official_zip(tensors, root / f"{OFFICIAL_NAME}.zip"),
        "deflated zip": write_official_zip(
            tensors, root / "deflated.zip", compression=zipfile.ZIP_DEFLATED
        ),
        "mat": write_structed_mat(tensors, root / "net_struct.mat"),
        "npz": export,
    }


FORMATS = {
    "prefix": "tf1-checkpoint",
    "index file": "tf1-checkpoint",
    "official dir": "tf1-checkpoint",
    "official prefix": "tf1-checkpoint",
    "moved official dir": "tf1-checkpoint",
    "zip": "tf1-checkpoint",
    "deflated zip": "tf1-checkpoint",
    "mat": "matconvnet",
    "npz": "npz",
}


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_every_format_loads_identical_tensors(files, tensors, kind):
    weights = load_weights(files[kind])
    assert weights.format == FORMATS[kind]
    assert weights.source == str(files[kind])
    assert sorted(weights.tensors) == sorted(TENSOR_NAMES)
    for name in TENSOR_NAMES:
        loaded = weights.tensors[name]
        assert loaded.dtype == np.float32, name
        assert loaded.shape == tensors[name].shape, name
        np.testing.assert_array_equal(loaded, tensors[name], err_msg=name)
    assert (weights.cluster_dim, weights.num_clusters, weights.output_dims) == (8, 4, 32)


def test_zip_loading_leaves_no_temporary_files(files, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    load_weights(files["zip"])
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(files["zip"].read_bytes()[:-400])  # central directory cut off
    with pytest.raises(WeightsError, match="not a readable zip"):
        load_weights(damaged)
    assert list(scratch.iterdir()) == []


def test_zip_member_paths_cannot_escape_the_temporary_directory(files, tensors, tmp_path):
    source = files["official dir"]
    path = tmp_path / "hostile.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in source.iterdir():
            member = file.name.replace(OFFICIAL_NAME, "../../outside/model")
            archive.writestr(zipfile.ZipInfo(member), file.read_bytes())
    weights = load_weights(path)
    np.testing.assert_array_equal(weights.tensors["WPCA/kernel"], tensors["WPCA/kernel"])
    assert not (tmp_path.parent / "outside").exists()
    assert not (Path(tempfile.gettempdir()).parent / "outside").exists()


def test_weights_package_imports_no_tensorflow(files):
    code = (
        "import sys\n"
        "from netvlad_server.weights import load_weights\n"
        f"load_weights({str(files['npz'])!r}); load_weights({str(files['mat'])!r})\n"
        "load_weights('demo-tiny')\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_read_matconvnet_lists_layers_in_file_order(files, tensors):
    read, layers = read_matconvnet(files["mat"])
    assert len(layers) == 35
    assert layers[0] == MatLayer("conv1_1", "conv")
    assert layers[1] == MatLayer("relu1_1", "relu")
    assert layers[4] == MatLayer("pool1", "pool")
    assert layers[28] == MatLayer("conv5_3", "conv")
    assert [layer.name for layer in layers[29:]] == [
        "preL2", "vlad_core", "vlad_intranorm", "postL2", "WPCA", "finalL2"
    ]  # fmt: skip
    np.testing.assert_array_equal(read["cluster_centers"], tensors["cluster_centers"])


# ---- demo weights and validation -----------------------------------------------------------


def test_tiny_demo_weights_are_deterministic_and_labelled():
    first, again, other = (demo_weights("tiny", seed=s) for s in (3, 3, 4))
    for name in TENSOR_NAMES:
        np.testing.assert_array_equal(first.tensors[name], again.tensors[name])
    assert not np.array_equal(first.tensors["WPCA/kernel"], other.tensors["WPCA/kernel"])
    assert first.source == "tiny-demo" and first.format == "demo"
    assert "DEMO" in first.name and "meaningless" in first.name
    assert first.conv_channels == (8,) * 13
    assert (first.vlad_dim, first.output_dims, first.parameter_count) == (32, 32, 8355)
    assert load_weights("demo-tiny").name == demo_weights("tiny").name


def test_export_of_demo_weights_keeps_the_warning(tmp_path):
    path = tmp_path / "demo.npz"
    save_export(demo_weights("tiny"), path)
    loaded = load_weights(path)
    assert loaded.format == "npz" and "meaningless" in loaded.name
    assert [p.name for p in tmp_path.iterdir()] == ["demo.npz"]  # temp file renamed away


def _edited(tensors, drop=(), **replace) -> dict[str, np.ndarray]:
    """A copy of `tensors` without `drop`, with entries replaced (keys use __ for /)."""
    edited = {k: v for k, v in tensors.items() if k not in drop}
    edited.update({k.replace("__", "/"): v for k, v in replace.items()})
    return edited


def _check_message(tensors) -> str:
    """The WeightsError message check_tensors gives for `tensors` (it must raise)."""
    with pytest.raises(WeightsError) as caught:
        check_tensors(tensors)
    return str(caught.value)


def test_check_tensors_reports_every_problem_in_one_error(tensors):
    message = _check_message(
        _edited(
            tensors,
            drop=("conv4_2/bias",),
            conv9_9__kernel=np.zeros((3, 3, 8, 8), np.float32),
            average_rgb=tensors["average_rgb"].astype(np.float64),
            conv3_1__kernel=np.zeros((3, 3, 16, 8), np.float32),
            WPCA__bias=np.full(32, np.nan, np.float32),
        )
    )
    assert "5 problems" in message
    assert "missing tensors: conv4_2/bias" in message
    assert "unexpected tensors: conv9_9/kernel" in message
    assert "wrong type: average_rgb: expected float32, got float64" in message
    assert "wrong shape: conv3_1/kernel: expected [3, 3, 8, ?], got [3, 3, 16, 8]" in message
    assert "non-finite values: WPCA/bias: 32 NaN or infinite values" in message


def test_shapes_must_agree_along_the_chain(tensors):
    message = _check_message(
        _edited(
            tensors,
            conv5_3__kernel=np.zeros((3, 3, 8, 6), np.float32),
            conv5_3__bias=np.zeros(6, np.float32),
        )
    )
    assert "3 problems" in message
    assert "assignment/kernel: expected [1, 1, 6, ?], got [1, 1, 8, 4]" in message
    assert "cluster_centers: expected [1, 1, 1, 6, 4], got [1, 1, 1, 8, 4]" in message
    assert "WPCA/kernel: expected [1, 1, 24, ?], got [1, 1, 32, 32]" in message  # D*K = 6*4


# ---- bad files: each its own message -------------------------------------------------------


def test_truncated_checkpoint_data(files, tmp_path):
    directory = shutil.copytree(files["official dir"], tmp_path / OFFICIAL_NAME)
    data = directory / f"{OFFICIAL_NAME}.data-00000-of-00001"
    size = data.stat().st_size
    with data.open("r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(WeightsError, match=r"checkpoint data is truncated: \d+ bytes on disk"):
        load_weights(directory)


def test_truncated_data_inside_zip_names_the_zip_member(tensors, tmp_path):
    directory = write_official_dir(tensors, tmp_path / "src")
    data = directory / f"{OFFICIAL_NAME}.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])
    path = tmp_path / "cut.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in directory.iterdir():
            archive.write(file, f"{OFFICIAL_NAME}/{file.name}")
    with pytest.raises(WeightsError) as caught:
        load_weights(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {OFFICIAL_NAME}/{OFFICIAL_NAME}: the checkpoint data")
    assert "truncated: 100 bytes on disk" in message
    assert "netvlad-zip-" not in message


def test_missing_checkpoint_data_file(files, tmp_path):
    directory = shutil.copytree(files["official dir"], tmp_path / OFFICIAL_NAME)
    (directory / f"{OFFICIAL_NAME}.data-00000-of-00001").unlink()
    with pytest.raises(WeightsError, match=r"checkpoint data file\(s\) missing"):
        load_weights(directory)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            {"WPCA__bias": np.zeros(31, np.float32)},
            "wrong shape: WPCA/bias: expected [32], got [31]",
        ),
        ({"drop": ("cluster_centers",)}, "missing tensors: cluster_centers"),
        ({"extra__kernel": np.zeros(2, np.float32)}, "unexpected tensors: extra/kernel"),
        (
            {"conv2_2__kernel": np.zeros((3, 3, 8, 8), np.float64)},
            "wrong type: conv2_2/kernel: expected float32, got float64",
        ),
    ],
    ids=["wrong-shape", "missing", "unexpected", "float64"],
)
def test_bad_checkpoint_tensors(tensors, tmp_path, edit, expected):
    prefix = write_tf1_checkpoint(_edited(tensors, **edit), tmp_path / "bad")
    with pytest.raises(WeightsError) as caught:
        load_weights(prefix)
    assert expected in str(caught.value)
    assert str(prefix) in str(caught.value)


def test_variables_outside_the_scope_are_unexpected(tensors, tmp_path):
    variables = {f"{SCOPE}/{name}": value for name, value in tensors.items()}
    variables["global_step"] = np.zeros((), np.int64)
    prefix = write_tf1_checkpoint(variables, tmp_path / "trained", scope="")
    with pytest.raises(WeightsError, match="unexpected tensors: global_step"):
        load_weights(prefix)


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    prefix = tmp_path / "model"
    Path(f"{prefix}.index").write_bytes(np.random.default_rng(0).bytes(4096))
    Path(f"{prefix}.data-00000-of-00001").write_bytes(b"\0" * 64)
    with pytest.raises(WeightsError, match="not a TensorFlow checkpoint index"):
        load_weights(prefix)


def test_text_file_as_index_is_not_a_checkpoint(tmp_path):
    index = tmp_path / "notes.index"
    index.write_text("these are not weights\n")
    with pytest.raises(WeightsError, match=r"notes\.index: not a TensorFlow checkpoint index"):
        load_weights(index)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("weights.txt", b"hello\n", r"unrecognised weight file \(extension '.txt'\)"),
        ("weights.mat", b"\x01garbage" * 40, "not a readable MATLAB .mat file"),
        ("notes.mat", b"hello\n", "not a readable MATLAB .mat file"),
        ("empty.mat", b"", "not a readable MATLAB .mat file"),
        ("weights.npz", b"\x01garbage" * 40, "not a readable .npz file"),
        ("weights.zip", b"\x01garbage" * 40, "not a readable zip file"),
    ],
)
def test_files_that_are_not_weights(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=expected) as caught:
        load_weights(path)
    assert "expected" in str(caught.value) or "again" in str(caught.value)


def test_truncated_export(files, tmp_path):
    path = tmp_path / "cut.npz"
    path.write_bytes(files["npz"].read_bytes()[:-1000])
    with pytest.raises(WeightsError, match=r"not a readable \.npz file \(not a zip archive, or"):
        load_weights(path)


def test_npz_without_format_marker(tmp_path, tensors):
    path = tmp_path / "plain.npz"
    np.savez(path, **tensors)
    with pytest.raises(WeightsError, match=r"not a netvlad-service export \(no format marker"):
        load_weights(path)


def test_directory_holding_two_checkpoints(tensors, tmp_path):
    write_tf1_checkpoint(tensors, tmp_path / "first")
    write_tf1_checkpoint(tensors, tmp_path / "second")
    with pytest.raises(WeightsError) as caught:
        load_weights(tmp_path)
    message = str(caught.value)
    assert "holds 2 checkpoints" in message
    assert str(tmp_path / "first") in message and str(tmp_path / "second") in message
    assert "'checkpoint' file names 'second'" in message
    assert "pass the prefix of the one to use" in message


def test_directory_without_checkpoint(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(WeightsError, match=r"holds no TensorFlow checkpoint \(no \*\.index file"):
        load_weights(tmp_path)
    save_export(demo_weights("tiny"), tmp_path / "netvlad.npz")
    with pytest.raises(WeightsError, match=r"it holds netvlad\.npz: pass one of those"):
        load_weights(tmp_path)


def test_empty_zip(tmp_path):
    path = tmp_path / "empty.zip"
    zipfile.ZipFile(path, "w").close()
    with pytest.raises(WeightsError, match="the zip is empty"):
        load_weights(path)


def test_zip_without_checkpoint(tmp_path):
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("photos/a.png", b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"holds no TensorFlow checkpoint \(no .index file"):
        load_weights(path)


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(WeightsError) as caught:
        load_weights(missing)
    message = str(caught.value)
    assert f"{missing}: no such file, directory or checkpoint prefix" in message
    assert "expected a checkpoint prefix, a directory holding one, a .zip, a .mat" in message


def _layer(layers: list[dict], name: str) -> dict:
    """The layer dict called `name`."""
    return next(layer for layer in layers if layer["name"] == name)


def _set(layer_name: str, **fields):
    """An edit setting fields of one named layer."""
    return lambda layers: _layer(layers, layer_name).update(fields)


def _insert_relu_after_conv5_3(layers: list[dict]) -> None:
    """Add the ReLU the released model does not have."""
    layers.insert(29, {"name": "relu5_3", "type": "relu", "leak": 0.0})


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_set("relu2_1", type="bnorm"), "layer 7 'relu2_1' (bnorm): unknown layer type"),
        (_set("postL2", name="postL3"), "'postL3' (custom): unknown custom layer"),
        (
            _set("conv1_1", pad=np.zeros((1, 4))),
            "layer 1 'conv1_1' (conv): pad = [0.0, 0.0, 0.0, 0.0], expected 1",
        ),
        (_set("conv3_2", stride=np.array([[2.0, 2.0]])), "'conv3_2' (conv): stride = [2.0, 2.0]"),
        (_set("pool2", method="avg"), "'pool2' (pool): method = 'avg', expected 'max'"),
        (_set("pool3", pool=np.array([[3.0, 3.0]])), "'pool3' (pool): pool = [3.0, 3.0], expected"),
        (_set("relu1_2", leak=0.1), "'relu1_2' (relu): leak = 0.1, expected 0"),
        (
            _set("preL2", param=np.array([[5.0, 1e-12, 1.0, 0.75]])),
            "'preL2' (normalize): param = [5 1e-12 1 0.75] is not an L2 normalisation",
        ),
        (_insert_relu_after_conv5_3, "'relu5_3' (relu): expected a normalize layer"),
        (lambda layers: layers.pop(), "the layer list ends early; missing: custom finalL2"),
        (
            lambda layers: layers.append({"name": "softmax", "type": "softmax"}),
            "layer 36 'softmax' (softmax): unknown layer type",
        ),
    ],
    ids=[
        "unknown-type", "unknown-custom", "pad-0", "stride-2", "avg-pool", "pool-3",
        "leaky-relu", "not-l2", "relu-after-conv5_3", "ends-early", "extra-layer",
    ],
)  # fmt: skip
def test_bad_matconvnet_layers(tensors, tmp_path, edit, expected):
    layers = matconvnet_layers(tensors)
    edit(layers)
    path = write_structed_mat(tensors, tmp_path / "bad.mat", layers=layers)
    with pytest.raises(WeightsError) as caught:
        load_weights(path)
    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


def test_matconvnet_wrong_shapes_are_named(tensors, tmp_path):
    path = write_structed_mat(
        _edited(tensors, WPCA__kernel=np.zeros((1, 1, 32, 16), np.float32)), tmp_path / "w.mat"
    )
    with pytest.raises(WeightsError, match=r"wrong shape: WPCA/bias: expected \[16\], got \[32\]"):
        load_weights(path)


def test_export_with_bad_tensor_names_the_file(tensors, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(
        path,
        __netvlad_format__=np.array("netvlad-service-weights/1"),
        **_edited(tensors, drop=("WPCA/bias",)),
    )
    with pytest.raises(
        WeightsError, match=r"(?s)bad\.npz \(npz\): 1 problem .*missing tensors: WPCA/bias"
    ):
        load_weights(path)


def test_mat_without_net(tmp_path):
    import scipy.io

    path = tmp_path / "stats.mat"
    scipy.io.savemat(path, {"outs": np.zeros(3)})
    with pytest.raises(WeightsError, match=r"no variable 'net' \(found: outs\)"):
        load_weights(path)


# ---- netvlad-models inspect / convert ------------------------------------------------------


@pytest.mark.parametrize("kind", ["official dir", "zip"])
def test_inspect_lists_all_tensors(files, kind, capsys):
    assert models_main(["inspect", str(files[kind])]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.strip().startswith(SCOPE)]
    assert listed == [f"{SCOPE}/{name}" for name in TENSOR_NAMES]
    assert f"{SCOPE}/WPCA/kernel" in out and "[1, 1, 32, 32]" in out
    assert "TensorFlow 1 name-based checkpoint" in out
    assert "output dims (WPCA):   32" in out
    assert "clusters K:           4" in out


def test_inspect_into_a_pipe_closed_early_is_no_error():
    # `netvlad-models inspect X | head`: the reader leaves before the table is written.
    child = subprocess.Popen([sys.executable, "-m", "netvlad_server.models_cli", "inspect",
                              "demo-tiny"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err.decode()
    assert err.decode().strip() == ""


def test_inspect_reports_bad_file(tmp_path, capsys):
    assert models_main(["inspect", str(tmp_path / "absent")]) == 1
    assert "error: " in capsys.readouterr().err


def test_convert_writes_export_and_refuses_to_overwrite(files, tensors, tmp_path, capsys):
    destination = tmp_path / "out" / "model.npz"
    destination.parent.mkdir()
    assert models_main(["convert", str(files["mat"]), str(destination)]) == 0
    loaded = load_weights(destination)
    for name in TENSOR_NAMES:
        np.testing.assert_array_equal(loaded.tensors[name], tensors[name])
    assert loaded.name == "net_struct"
    before = destination.read_bytes()
    assert models_main(["convert", str(files["zip"]), str(destination)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert destination.read_bytes() == before
    assert models_main(["convert", "--force", str(files["zip"]), str(destination)]) == 0
    assert load_weights(destination).name == OFFICIAL_NAME
    assert sorted(os.listdir(destination.parent)) == ["model.npz"]


def test_convert_of_bad_source_writes_nothing(tmp_path, capsys):
    source = tmp_path / "bad.zip"
    zipfile.ZipFile(source, "w").close()
    destination = tmp_path / "model.npz"
    assert models_main(["convert", str(source), str(destination)]) == 1
    assert "the zip is empty" in capsys.readouterr().err
    assert not destination.exists()
    assert models_main(["convert", "demo-tiny", str(tmp_path / "model.bin")]) == 1
    assert "must be a file whose name ends in .npz" in capsys.readouterr().err


def test_convert_refuses_a_missing_directory_before_reading(tmp_path, capsys):
    # The source does not exist either: the destination is judged first, so no load is attempted.
    destination = tmp_path / "nowhere" / "model.npz"
    assert models_main(["convert", str(tmp_path / "absent.zip"), str(destination)]) == 1
    err = capsys.readouterr().err
    assert f"the output directory {destination.parent} does not exist" in err
    assert not destination.parent.exists()
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    assert models_main(["convert", "demo-tiny", str(blocker / "model.npz")]) == 1
    assert f"the output directory {blocker} is not a directory" in capsys.readouterr().err
    assert models_main(["convert", "demo-tiny", str(tmp_path)]) == 1
    assert "must be a file whose name ends in .npz" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_convert_honours_the_umask(tmp_path, umask):
    destination = tmp_path / "model.npz"
    previous = os.umask(umask)
    try:
        assert models_main(["convert", "demo-tiny", str(destination)]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(destination.stat().st_mode) == 0o666 & ~umask


# ---- full size -----------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_round_trip_and_inspect(tmp_path, capsys):
    weights = demo_weights("full", seed=5)
    assert weights.conv_channels[-1] == 512 and weights.num_clusters == 64
    assert weights.tensors["WPCA/kernel"].shape == (1, 1, 32768, 4096)
    paths = {
        "dir": write_official_dir(weights.tensors, tmp_path),
        "zip": write_official_zip(weights.tensors, tmp_path / f"{OFFICIAL_NAME}.zip"),
        "mat": write_structed_mat(weights.tensors, tmp_path / "Pitts30K_struct.mat"),
    }
    paths["npz"] = tmp_path / "export.npz"
    save_export(weights, paths["npz"])
    for kind, path in paths.items():
        loaded = load_weights(path)
        for name in TENSOR_NAMES:
            np.testing.assert_array_equal(loaded.tensors[name], weights.tensors[name], kind)
        del loaded
    for kind in ("dir", "zip"):
        assert models_main(["inspect", str(paths[kind])]) == 0
        out = capsys.readouterr().out
        assert sum(line.strip().startswith(f"{SCOPE}/") for line in out.splitlines()) == 31
        assert "[1, 1, 32768, 4096]" in out
        assert "output dims (WPCA):   4096" in out
        assert "VLAD dim D*K:         32768" in out
