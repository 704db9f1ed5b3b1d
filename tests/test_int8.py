"""int8 (LiteRT) serving, its retrieval check, the calibration cache and `.tflite` export.

Real conversions of the tiny model, real LiteRT interpreters, a real gRPC server on loopback.
"""

from __future__ import annotations

import dataclasses
import os

import cv2
import grpc
import numpy as np
import pytest
from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client._proto import netvlad_pb2_grpc as pb_grpc
from netvlad_client.bench.harness import free_port
from netvlad_server.calibration import CalibrationError, calibration_set, folder_images
from netvlad_server.config import ConfigError, ServerConfig, parse_config
from netvlad_server.int8 import (
    Agreement,
    Int8Network,
    Int8RefusedError,
    build_int8_network,
    calibrated_features_model,
    compare,
    measure_agreement,
    retrieval,
    scene_pairs,
)
from netvlad_server.main import load_model
from netvlad_server.models_cli import main as models_main
from netvlad_server.network import NetVLADNetwork
from netvlad_server.runtime import synthetic_scene
from netvlad_server.tflite import TFLiteRunner
from netvlad_server.weights import demo_weights, save_export
from server_thread import ServerThread, tiny_config

SIZE = (48, 64)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """The tiny weights as an exported .npz in their own folder (where the cache goes)."""
    path = tmp_path_factory.mktemp("weights") / "tiny.npz"
    save_export(demo_weights("tiny", seed=0), path)
    return path


@pytest.fixture(scope="module")
def int8_network(weights_file):
    """The tiny model's int8 network with the built-in calibration, check passed."""
    return build_int8_network(demo_weights("tiny", seed=0), str(weights_file))


def centred_cosines(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Row-wise cosine after removing the reference rows' mean.

    The tiny random model's descriptors of different images are nearly parallel (cosine
    0.9999), so a plain cosine cannot tell a close answer from another image's; what is left
    after the common part can (another image's scores about 0).
    """
    centre = reference.mean(axis=0)
    a, b = ours - centre, reference - centre
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def scenes(size: tuple[int, int], first_seed: int = 20, count: int = 6) -> np.ndarray:
    """[count, H, W, 3] generated scenes."""
    return np.stack([synthetic_scene(*size, first_seed + i) for i in range(count)])


def assert_matches(rows: np.ndarray, reference: np.ndarray, minimum: float) -> None:
    """Each row is close to its own image's reference and closer to it than to any other's."""
    agreement = centred_cosines(rows, reference)
    assert agreement.min() > minimum, agreement
    others = max(centred_cosines(np.roll(rows, k, axis=0), reference).max()
                 for k in range(1, len(rows)))
    assert agreement.min() > others, (agreement, others)


def run_each(runner: TFLiteRunner, images: np.ndarray) -> np.ndarray:
    """The exported model's descriptor of each image, [B, P]."""
    return np.concatenate([runner(image[np.newaxis]) for image in images])


def test_int8_descriptors_are_close_to_float32_but_computed_in_int8(int8_network, network):
    images = scenes(SIZE)
    ours, reference = int8_network(images), network(images)
    assert ours.shape == (6, network.output_dims) and ours.dtype == np.float32
    assert not np.allclose(ours, reference, atol=1e-6)  # really quantized
    assert_matches(ours, reference, 0.9)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    gray = images[:1, :, :, :1]  # one channel is broadcast to RGB, as the network does
    np.testing.assert_allclose(int8_network(gray), int8_network(np.repeat(gray, 3, axis=3)),
                               atol=1e-6)
    np.testing.assert_allclose(int8_network(images, dims=8),
                               int8_network(images)[:, :8] / np.linalg.norm(
                                   int8_network(images)[:, :8], axis=1, keepdims=True), atol=1e-5)


def test_one_interpreter_per_size_least_recently_used_dropped(weights_file, int8_network):
    content, cached, _ = calibrated_features_model(demo_weights("tiny", seed=0),
                                                   NetVLADNetwork(demo_weights("tiny")),
                                                   str(weights_file), None)
    assert cached  # the fixture calibrated and cached it
    bounded = Int8Network(content, NetVLADNetwork(demo_weights("tiny")), max_sizes=2)
    for size in ((32, 32), (48, 64), (32, 32), (40, 40)):
        bounded(synthetic_scene(*size))
    assert bounded.prepared_sizes == [(32, 32), (40, 40)]
    again = bounded(synthetic_scene(48, 64, 5))  # a dropped size is prepared anew, same answer
    # (to the int8 whitening's rounding: the fixture whitens in LiteRT, `bounded` in float32)
    np.testing.assert_allclose(again, int8_network(synthetic_scene(48, 64, 5)), atol=5e-5)


def test_int8_server_round_trip(weights_file, network, int8_network):
    config = tiny_config(free_port(), model=str(weights_file), precision="int8",
                         max_batch_size=4, mixed_bulk_batch_size=1)
    images = [synthetic_scene(*SIZE, 7), synthetic_scene(40, 56, 8)]
    bulk = [synthetic_scene(*SIZE, seed) for seed in (9, 10, 11)]

    def raw(image: np.ndarray) -> pb.Image:
        return pb.Image(raw=pb.RawImage(data=image.tobytes(), height=image.shape[0],
                                        width=image.shape[1], channels=3))

    with ServerThread(config, load_model) as running, \
            grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.DescriptorServiceStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
        answers = [stub.DescribeImages(pb.DescribeImagesRequest(images=[raw(image)]),
                                       timeout=60).descriptors[0].values for image in images]
        stepped = stub.DescribeImages(pb.DescribeImagesRequest(  # a bulk batch in steps of one
            images=[raw(image) for image in bulk], priority=pb.PRIORITY_BULK), timeout=60)
        metrics = running.metrics_text()
    assert info.precision == "int8"
    np.testing.assert_allclose(np.array([d.values for d in stepped.descriptors], np.float32),
                               int8_network(np.stack(bulk)), atol=1e-5)
    assert 'precision="int8"' in metrics
    for image, values in zip(images, answers, strict=True):
        row = np.array(values, np.float32)
        np.testing.assert_allclose(row, int8_network(image)[0], atol=1e-5)
        assert not np.allclose(row, network(image)[0], atol=1e-6)


def test_int8_is_refused_with_the_measured_numbers_when_retrieval_changes(tmp_path, caplog):
    folder = tmp_path / "dark"
    folder.mkdir()
    for i in range(4):  # all-black frames: ranges far too narrow for real scenes
        cv2.imwrite(str(folder / f"{i}.png"), np.zeros((48, 64, 3), np.uint8))
    weights = tmp_path / "tiny.npz"
    save_export(demo_weights("tiny", seed=0), weights)
    config = tiny_config(0, model=str(weights), precision="int8", calibration=str(folder))
    with pytest.raises(Int8RefusedError) as refused:
        load_model(config)
    message = str(refused.value)
    assert "--precision int8 refused" in message and "cosine to float32 min" in message
    assert "nearest neighbours changed" in message and "--calibration DIR" in message


def test_retrieval_policy_judges_neighbours_and_auc_or_cosine_when_uninformative():
    places = np.eye(8, 16, dtype=np.float32)  # 8 orthogonal places, two views each
    views = np.repeat(places, 2, axis=0) + 0.05 * np.eye(16, dtype=np.float32)
    views /= np.linalg.norm(views, axis=1, keepdims=True)
    nearest, auc = retrieval(views)
    assert list(nearest) == [i ^ 1 for i in range(16)]
    assert auc == pytest.approx(15 / 16)  # the reference's AUC: the first match adds no area
    good = Agreement(16, 0.9999, 0.99995, 3, 0, 1.0, auc, auc - 0.01)
    assert good.passed  # changes inside float32's ties do not count
    assert not dataclasses.replace(good, decisive_changes=1).passed
    assert not dataclasses.replace(good, auc_int8=auc - 0.05).passed
    random_weights = dataclasses.replace(good, recall_float32=0.2, decisive_changes=5)
    assert random_weights.passed and "cosine decides" in str(random_weights)
    assert not dataclasses.replace(random_weights, cosine_min=0.99).passed


def test_compare_passes_a_shared_offset_and_refuses_per_image_noise_that_swaps_places():
    rng = np.random.default_rng(3)
    centre = rng.normal(size=64)  # nearly parallel descriptors, as random weights give
    places = centre + 0.05 * rng.normal(size=(8, 64))
    views = np.repeat(places, 2, axis=0) + 0.01 * rng.normal(size=(16, 64))

    def unit(rows: np.ndarray) -> np.ndarray:
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    reference = unit(views)
    shifted = compare(unit(views + 0.05 * rng.normal(size=64)), reference)  # one offset for all
    assert shifted.informative and shifted.passed and shifted.nn_changes == 0
    assert shifted.cosine_min < 0.9999  # the cosine alone would not have told
    assert "float32 finds the other view for 100% of the images" in str(shifted)
    noisy = compare(unit(views + 0.08 * rng.normal(size=(16, 64))), reference)
    assert noisy.decisive_changes > 0 and not noisy.passed
    assert f"{noisy.decisive_changes} of 16 nearest neighbours changed" in str(noisy)


def test_agreement_check_measures_scene_pairs(weights_file, int8_network):
    images = scene_pairs(places=3, size=SIZE)
    assert images.shape == (6, *SIZE, 3)
    weights = demo_weights("tiny", seed=0)
    content, _, _ = calibrated_features_model(weights, NetVLADNetwork(weights),
                                              str(weights_file), None)
    agreement = measure_agreement(Int8Network(content, NetVLADNetwork(weights)), images)
    assert agreement.images == 6 and 0.999 < agreement.cosine_min <= agreement.cosine_median < 1
    with pytest.raises(RuntimeError, match="released after the start-up check"):
        int8_network.float32_reference(images)  # serving keeps no float32 convolutions


def test_scene_pairs_are_two_views_of_each_place_the_second_shifted_and_darker():
    images = scene_pairs(places=2, size=(40, 64)).astype(np.float32)
    shift = 64 // 8
    for place in range(2):
        first, second = images[2 * place], images[2 * place + 1]
        np.testing.assert_allclose(second[:, :-shift], first[:, shift:] * 0.95, atol=0.51)
    assert not np.allclose(images[0], images[2], atol=20)  # different places


@pytest.mark.slow
def test_agreement_check_is_informative_on_the_full_size_demo_weights():
    """The check's pairs are recognised by float32 even with random full-size weights, so the
    nearest-neighbour and AUC rules judge int8 there, not the cosine fallback."""
    full = NetVLADNetwork(demo_weights("full"))
    pairs = scene_pairs()
    nearest, auc = retrieval(np.concatenate([full(image) for image in pairs]))
    assert list(nearest) == [i ^ 1 for i in range(len(pairs))]
    assert auc == pytest.approx(15 / 16)


def test_calibration_is_cached_by_weights_fingerprint_and_invalidated(tmp_path):
    path = tmp_path / "model.npz"
    save_export(demo_weights("tiny", seed=0), path)

    def calibrated(seed: int):
        weights = demo_weights("tiny", seed=seed)
        return calibrated_features_model(weights, NetVLADNetwork(weights), str(path), None)

    first, cached, cache_file = calibrated(0)
    assert not cached and cache_file.parent == tmp_path and cache_file.read_bytes() == first
    stamp = cache_file.stat().st_mtime_ns
    second, cached, again = calibrated(0)
    assert cached and second == first and again == cache_file
    assert cache_file.stat().st_mtime_ns == stamp  # read, not written again
    save_export(demo_weights("tiny", seed=1), path)  # the weights change: new fingerprint
    third, cached, changed = calibrated(1)
    assert not cached and changed != cache_file and third != first
    assert not cache_file.exists()  # the stale model is removed
    assert sorted(p.name for p in tmp_path.glob("*.tflite")) == [changed.name]


def export(tmp_path, *args: str) -> int:
    """Run `netvlad-models export demo-tiny OUT ARGS`; the file is tmp_path/out.tflite."""
    return models_main(["export", "demo-tiny", str(tmp_path / "out.tflite"), *args])


@pytest.mark.parametrize(("precision", "min_centred_cosine"),
                         [("float32", 0.9999), ("float16", 0.99), ("int8", 0.9)])
def test_export_runs_in_litert_and_matches_the_network(tmp_path, network, precision,
                                                       min_centred_cosine):
    assert export(tmp_path, "--format", "tflite", "--precision", precision) == 0
    content = (tmp_path / "out.tflite").read_bytes()
    runner = TFLiteRunner(content)
    assert runner.input_dtype == np.uint8
    for size in ((48, 64), (32, 40)):  # no --size: any input size
        images = scenes(size)
        rows, reference = run_each(runner, images), network(images)
        assert rows.shape == reference.shape == (6, network.output_dims)
        assert_matches(rows, reference, min_centred_cosine)
    if precision == "float32":
        np.testing.assert_allclose(rows, reference, atol=2e-5)


def test_int8_export_gives_the_int8_servers_descriptors(tmp_path, int8_network):
    assert export(tmp_path, "--precision", "int8") == 0  # built-in calibration, as the server
    runner = TFLiteRunner((tmp_path / "out.tflite").read_bytes())
    images = scenes((40, 56), first_seed=40)
    # The server whitens with two int8 levels in LiteRT (float32's to about 1e-4 relative), the
    # exported file in float32: the same convolutions, descriptors equal to that rounding.
    np.testing.assert_allclose(run_each(runner, images), int8_network(images), atol=5e-5)


def test_export_with_a_fixed_size_and_a_calibration_folder(tmp_path, network):
    folder = tmp_path / "frames"
    folder.mkdir()
    for seed in range(3):
        cv2.imwrite(str(folder / f"{seed}.jpg"), synthetic_scene(60, 80, seed)[:, :, ::-1])
    assert export(tmp_path, "--precision", "int8", "--calibration", str(folder),
                  "--size", "48x64") == 0
    runner = TFLiteRunner((tmp_path / "out.tflite").read_bytes())
    images = scenes((48, 64))
    assert_matches(run_each(runner, images), network(images), 0.6)  # three calibration images


def test_export_refuses_bad_sizes_paths_and_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:
        export(tmp_path, "--size", "8x64")
    assert usage.value.code == 2
    assert "both sides must be at least 16 pixels" in capsys.readouterr().err
    assert export(tmp_path, "--calibration", str(tmp_path)) == 1
    assert "for --precision int8 only" in capsys.readouterr().err
    assert models_main(["export", "demo-tiny", str(tmp_path / "out.onnx")]) == 1
    assert "must end in .tflite" in capsys.readouterr().err
    (tmp_path / "out.tflite").write_bytes(b"old")
    assert export(tmp_path) == 1
    assert "pass --force" in capsys.readouterr().err
    assert export(tmp_path, "--precision", "int8", "--calibration", str(tmp_path / "none"),
                  "--force") == 1
    assert "does not exist" in capsys.readouterr().err


def test_calibration_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        folder_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(CalibrationError, match="holds no images"):
        folder_images(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(CalibrationError, match=r"broken\.jpg.*remove or replace"):
        folder_images(tmp_path)
    os.remove(tmp_path / "broken.jpg")
    cv2.imwrite(str(tmp_path / "tiny.png"), np.zeros((8, 30, 3), np.uint8))
    with pytest.raises(CalibrationError, match=r"tiny\.png.*at least 16"):
        folder_images(tmp_path)
    os.remove(tmp_path / "tiny.png")
    cv2.imwrite(str(tmp_path / "gray.png"), np.full((40, 80), 90, np.uint8))
    cv2.imwrite(str(tmp_path / "large.png"), np.full((800, 400, 3), 90, np.uint8))
    gray, large = folder_images(tmp_path)
    assert gray.shape == (40, 80, 3) and large.shape == (320, 160, 3)  # gray made RGB, fitted
    builtin = calibration_set(None)
    assert builtin.source == "builtin" and builtin.digest == calibration_set("builtin").digest


def test_int8_flags_and_their_checks():
    config = parse_config(["--precision", "int8", "--calibration", "frames/"], {})
    assert (config.precision, config.calibration) == ("int8", "frames/")
    from_env = parse_config([], {"NETVLAD_PRECISION": "int8", "NETVLAD_CALIBRATION": "x"})
    assert from_env.calibration == "x"
    with pytest.raises(ConfigError, match="for --precision int8 only"):
        ServerConfig(precision="float32", calibration="frames/")
    with pytest.raises(ConfigError, match="--xla does not apply"):
        ServerConfig(precision="int8", xla=True)
