"""The TF network against the independent NumPy reference, plus its input rules and options."""

from __future__ import annotations

import numpy as np
import pytest
import reference_numpy as ref
from netvlad_server.network import (
    ImageShapeError,
    NetVLADNetwork,
    layer_plan,
    truncate_descriptors,
)
from netvlad_server.weights import NetVLADWeights, demo_weights

TOLERANCE = 1e-5  # max abs difference allowed between TF float32 and the float64 reference


def random_images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Uniform float32 pixels in 0..255."""
    return np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_net(tiny_weights: NetVLADWeights) -> NetVLADNetwork:
    """The float32 network on the tiny demo weights, shared by the module."""
    return NetVLADNetwork(tiny_weights)


@pytest.mark.parametrize("shape", [(201, 300, 3), (16, 16, 3), (17, 33, 3), (64, 48, 1)])
def test_matches_reference_on_tiny_shapes(tiny_net, tiny_weights, shape):
    image = random_images(shape, seed=sum(shape))
    got = tiny_net(image)
    want = ref.describe(tiny_weights.tensors, image)
    assert got.shape == (1, 32) and got.dtype == np.float32
    assert np.abs(got - want).max() < TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_sizes_come_from_the_weights(tiny_net):
    assert (tiny_net.cluster_dim, tiny_net.num_clusters, tiny_net.output_dims) == (8, 4, 32)


def test_grayscale_is_the_gray_channel_copied_to_rgb(tiny_net, tiny_weights):
    gray = random_images((40, 52, 1), seed=3)
    got = tiny_net(gray)
    np.testing.assert_allclose(got, tiny_net(np.repeat(gray, 3, axis=-1)), atol=1e-7)
    assert np.abs(got - ref.describe(tiny_weights.tensors, gray)).max() < TOLERANCE


def test_uint8_and_float_inputs_agree(tiny_net):
    pixels = np.random.default_rng(4).integers(0, 256, (33, 41, 3), dtype=np.uint8)
    as_uint8 = tiny_net(pixels)
    np.testing.assert_array_equal(as_uint8, tiny_net(pixels.astype(np.float32)))
    np.testing.assert_array_equal(as_uint8, tiny_net(pixels.astype(np.float64)))


def test_batch_equals_images_one_at_a_time(tiny_net, tiny_weights):
    batch = random_images((5, 37, 45, 3), seed=5)
    together = tiny_net(batch)
    one_by_one = np.concatenate([tiny_net(image) for image in batch])
    assert together.shape == (5, 32)
    np.testing.assert_allclose(together, one_by_one, atol=1e-6)
    assert np.abs(together - ref.describe(tiny_weights.tensors, batch)).max() < TOLERANCE
    assert not np.allclose(together[0], together[1])  # rows really are different images


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_two_stages_in_steps_give_the_whole_forward(tiny_weights, precision):
    net = NetVLADNetwork(tiny_weights, precision)
    images = np.random.default_rng(5).integers(0, 256, (5, 40, 56, 3), dtype=np.uint8)
    pooled = np.concatenate([net.pooled(images[:2]), net.pooled(images[2:])])
    assert pooled.shape == (5, net.cluster_dim * net.num_clusters)
    np.testing.assert_allclose(net.whiten(pooled), net(images), atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        net.pooled(images.astype(np.float32))


def test_new_image_sizes_reuse_one_graph(tiny_weights):
    net = NetVLADNetwork(tiny_weights)
    for shape in [(16, 16, 3), (1, 30, 20, 1), (3, 64, 17, 3), (2, 201, 300, 3)]:
        net(random_images(shape))
    assert net._descriptors.experimental_get_tracing_count() == 1


def test_layer_outputs_match_reference_layer_by_layer(tiny_net, tiny_weights):
    image = random_images((45, 61, 3), seed=6)
    ours = tiny_net.layer_outputs(image)
    theirs = ref.image_layers(tiny_weights.tensors, image)
    assert [name for name, _ in ours] == [name for name, _ in theirs]
    assert [name for name, _ in ours] == [name for name, _ in layer_plan()]
    assert len(ours) == 35
    for (name, got), (_, want) in zip(ours, theirs, strict=True):
        assert got.shape == (1, *want.shape), name
        scale = max(np.abs(want).max(), 1.0)
        assert np.abs(got[0] - want).max() < TOLERANCE * scale, name
    np.testing.assert_allclose(ours[-1][1], tiny_net(image), atol=1e-7)


def test_layer_outputs_can_take_a_mean_subtracted_image(tiny_net, tiny_weights):
    image = random_images((24, 30, 3), seed=7)
    centred = image - tiny_weights.tensors["average_rgb"]
    final = tiny_net.layer_outputs(centred, subtract_mean=False)[-1][1]
    np.testing.assert_allclose(final, tiny_net(image), atol=1e-6)


def test_reference_wrong_flatten_order_is_caught(tiny_net, tiny_weights, monkeypatch):
    """Power check: a K-major flatten in the reference must break the agreement."""
    image = random_images((32, 32, 3), seed=8)
    monkeypatch.setattr(ref, "flatten_vlad", lambda v: v.T.reshape(-1))
    assert np.abs(tiny_net(image) - ref.describe(tiny_weights.tensors, image)).max() > 1e-2


def test_reference_relu_after_conv5_3_is_caught(tiny_net, tiny_weights, monkeypatch):
    """Power check: a ReLU after conv5_3 in the reference must break the agreement."""
    image = random_images((32, 32, 3), seed=9)
    monkeypatch.setattr(ref, "NO_RELU_AFTER", ())
    assert np.abs(tiny_net(image) - ref.describe(tiny_weights.tensors, image)).max() > 1e-2


def test_perturbed_weight_is_caught(tiny_net, tiny_weights):
    """Power check: 1% noise on one kernel is far above the tolerance.

    (Scaling a kernel would not do: ReLU and max-pool are scale-free and preL2 divides it out.)
    """
    image = random_images((32, 32, 3), seed=10)
    tensors = dict(tiny_weights.tensors)
    kernel = tensors["conv3_2/kernel"]
    noise = np.random.default_rng(10).standard_normal(kernel.shape) * 0.01 * kernel.std()
    tensors["conv3_2/kernel"] = kernel + noise.astype(np.float32)
    assert np.abs(tiny_net(image) - ref.describe(tensors, image)).max() > 10 * TOLERANCE


def test_truncation_keeps_first_dims_renormalised(tiny_net):
    image = random_images((20, 24, 3), seed=11)
    full = tiny_net(image)
    short = tiny_net(image, dims=8)
    assert short.shape == (1, 8)
    np.testing.assert_allclose(short, full[:, :8] / np.linalg.norm(full[:, :8]), atol=1e-6)
    np.testing.assert_allclose(short, truncate_descriptors(full, 8), atol=1e-7)
    np.testing.assert_allclose(tiny_net(image, dims=32), full, atol=1e-7)


@pytest.mark.parametrize("dims", [0, -1, 33, 2.5, True])
def test_truncation_rejects_bad_dims(tiny_net, dims):
    with pytest.raises(ValueError, match="dims must be an integer from 1 to 32"):
        tiny_net(random_images((16, 16, 3)), dims=dims)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((15, 300, 3)), "15x300 pixels; both sides must be at least 16"),
        (np.zeros((2, 300, 15, 1)), "300x15 pixels"),
        (np.zeros((16, 16, 2)), "1 \\(grayscale\\) or 3 \\(RGB\\) channels.*got 2"),
        (np.zeros((16, 16, 4), np.uint8), "got 4"),
        (np.zeros((16, 16)), "rank 2"),
        (np.zeros((1, 1, 16, 16, 3)), "rank 5"),
        (np.zeros((0, 16, 16, 3)), "empty batch"),
        (np.zeros((16, 16, 3), np.int32), "uint8 or float.*int32"),
        (np.full((16, 16, 3), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_images_get_specific_errors(tiny_net, images, message):
    with pytest.raises(ImageShapeError, match=message):
        tiny_net(images)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_lower_precision_agrees_with_float32(tiny_net, tiny_weights, precision):
    net = NetVLADNetwork(tiny_weights, precision=precision)
    images = random_images((4, 48, 64, 3), seed=12)
    cosine = np.sum(net(images) * tiny_net(images), axis=1)
    assert net.precision == precision
    assert cosine.min() > 0.999
    low_layers = net.layer_outputs(images[:1])
    assert all(out.dtype == np.float32 for _, out in low_layers)


def test_unknown_precision_is_refused(tiny_weights):
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16, float16"):
        NetVLADNetwork(tiny_weights, precision="int8")


def test_xla_compiled_network_matches(tiny_net, tiny_weights):
    images = random_images((2, 40, 36, 3), seed=13)
    np.testing.assert_allclose(NetVLADNetwork(tiny_weights, xla=True)(images), tiny_net(images),
                               atol=TOLERANCE)


@pytest.fixture(scope="module")
def full_weights() -> NetVLADWeights:
    """Full-size random weights (4096-D output), as the released model is shaped."""
    return demo_weights("full", seed=1)


@pytest.fixture(scope="module")
def full_net(full_weights: NetVLADWeights) -> NetVLADNetwork:
    """The float32 network on the full-size weights."""
    return NetVLADNetwork(full_weights)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(480, 640, 3), (201, 300, 1)])
def test_full_size_matches_reference(full_net, full_weights, shape):
    image = np.random.default_rng(14).integers(0, 256, shape, dtype=np.uint8)
    got = full_net(image)
    assert got.shape == (1, 4096)
    assert np.abs(got - ref.describe(full_weights.tensors, image)).max() < TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(got), 1.0, atol=1e-6)
