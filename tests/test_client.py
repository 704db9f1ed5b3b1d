"""The client library against a real server subprocess (demo-tiny weights on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest
from client_support import ServerProcess, random_image, reference, write_png
from conftest import free_port
from netvlad_client import (
    AsyncNetVLADClient,
    NetVLADClient,
    NetVLADError,
    NetVLADInputError,
    NetVLADRPCError,
    NetVLADUnavailableError,
    __version__,
)
from netvlad_client.client import describe_concurrently, plan_requests, resolve_target

# Batched and single-image forward passes may round differently in the last bits.
ATOL = 1e-6


@pytest.fixture(scope="module")
def server(tiny_server_process):
    return tiny_server_process


@pytest.fixture
def client(server):
    with NetVLADClient(server.target, timeout=60) as client:
        yield client


def test_import_loads_no_tensorflow_or_opencv():
    code = textwrap.dedent(
        """
        import sys
        import netvlad_client, netvlad_client.cli, netvlad_client.outputs
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "cv2", "keras"))
        print(heavy)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_version_is_the_package_version():
    from importlib.metadata import version

    assert __version__ == version("netvlad-service")


def test_describe_paths_bytes_and_arrays_equal_the_network(client, tmp_path):
    rgb = random_image(1, 40, 56)
    gray = random_image(2, 48, 32, channels=1)
    rgb_path = write_png(tmp_path / "rgb.png", rgb)
    gray_path = write_png(tmp_path / "gray.png", gray)
    images = [
        rgb_path,                      # pathlib.Path
        str(gray_path),                # str path
        rgb_path.read_bytes(),         # encoded bytes
        rgb,                           # H x W x 3 uint8
        gray,                          # H x W uint8
        gray[:, :, None],              # H x W x 1 uint8
        rgb.astype(np.float32),        # float in 0..255
        np.asfortranarray(gray),       # non-contiguous memory layout
    ]
    got = client.describe(images)
    expected = np.stack([reference(p) for p in (rgb, gray, rgb, rgb, gray, gray, rgb, gray)])
    assert got.dtype == np.float32
    assert got.shape == (8, 32)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_single_image_gives_one_row(client):
    image = random_image(3)
    got = client.describe(image)
    assert got.shape == (1, 32)
    np.testing.assert_allclose(got[0], reference(image), atol=ATOL, rtol=0)


def test_batch_array_and_empty_list(client):
    images = np.stack([random_image(seed) for seed in range(3)])  # B x H x W x 3
    got = client.describe(images)
    np.testing.assert_allclose(got, np.stack([reference(i) for i in images]), atol=ATOL, rtol=0)
    assert client.describe([]).shape == (0, 32)


def test_dims_truncates_and_renormalises(client):
    image = random_image(4)
    got = client.describe(image, dims=8)
    assert got.shape == (1, 8)
    np.testing.assert_allclose(got[0], reference(image, dims=8), atol=ATOL, rtol=0)
    with NetVLADClient(client.config.target, dims=5) as short:
        assert short.describe(image).shape == (1, 5)


def test_long_lists_are_split_to_the_server_limit_and_keep_order(client, server):
    # The server admits 4 images per request: 10 images need 3 requests, 7 with batch_size 2 need 4.
    images = [random_image(10 + i, 32 + (i % 3) * 8, 40) for i in range(10)]
    before = server.metric("netvlad_requests_total", method="DescribeImages", code="OK")
    got = client.describe(images)
    middle = server.metric("netvlad_requests_total", method="DescribeImages", code="OK")
    small = client.describe(images[:7], batch_size=2)
    after = server.metric("netvlad_requests_total", method="DescribeImages", code="OK")
    assert (middle - before, after - middle) == (3, 4)
    expected = np.stack([reference(i) for i in images])
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(small, expected[:7], atol=ATOL, rtol=0)


def test_plan_requests_respects_count_and_bytes():
    assert plan_requests([10] * 5, max_images=2, max_bytes=10**6) == [
        range(0, 2), range(2, 4), range(4, 5)
    ]
    # 5000 + 64 + 4096 overhead: two 5000-byte images never share a 12000-byte message.
    assert plan_requests([5000, 5000, 10], 10, 12000) == [range(0, 1), range(1, 3)]
    assert plan_requests([50000], 10, 12000) == [range(0, 1)]  # alone; the server says why
    assert plan_requests([], 4, 100) == []


def test_server_rejection_names_the_image_and_is_not_retried(client, server, tmp_path):
    good = write_png(tmp_path / "good.png", random_image(5))
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:60])  # a truncated PNG
    before = server.metric("netvlad_requests_total", method="DescribeImages",
                           code="INVALID_ARGUMENT")
    with pytest.raises(NetVLADRPCError) as caught:
        client.describe([good, broken])
    after = server.metric("netvlad_requests_total", method="DescribeImages",
                          code="INVALID_ARGUMENT")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 1" in caught.value.details and "truncated" in caught.value.details
    assert caught.value.images == [str(broken)]  # the full path, however long
    assert str(broken) in str(caught.value)
    assert after - before == 1  # only UNAVAILABLE is retried


def test_dims_larger_than_the_model_is_the_servers_error(client):
    with pytest.raises(NetVLADRPCError) as caught:
        client.describe(random_image(6), dims=33)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "33" in caught.value.details


def test_bad_local_inputs_fail_before_sending(client, tmp_path):
    cases = [
        (tmp_path / "missing.png", "not found"),
        (tmp_path, "is a directory"),
        (np.full((20, 20), 300.0), "0..255"),
        (np.full((20, 20), -1, dtype=np.int16), "0..255"),
        (np.array([[np.nan] * 20] * 20), "NaN"),
        (np.zeros((20, 20, 4), np.uint8), "H x W x 3"),
        (np.zeros((20, 20), dtype=bool), "dtype bool"),
        (12345, "expected a path"),
    ]
    for image, words in cases:
        with pytest.raises(NetVLADInputError, match=words.replace(".", r"\.")):
            client.describe([random_image(7), image])
    with pytest.raises(NetVLADInputError, match="dims"):
        client.describe(random_image(7), dims=0)
    with pytest.raises(NetVLADInputError, match="resize"):
        client.describe(random_image(7), resize="fit")


def test_resize_option_reaches_the_server(client):
    image = random_image(8, 64, 96)
    import cv2

    halved = cv2.resize(image, (48, 32), interpolation=cv2.INTER_AREA)
    for resize in (48, "48", "fit:48"):
        np.testing.assert_allclose(client.describe(image, resize=resize)[0], reference(halved),
                                   atol=ATOL, rtol=0)
    np.testing.assert_allclose(client.describe(image, resize="keep")[0], reference(image),
                               atol=ATOL, rtol=0)


def test_info_and_health(client, server):
    info = client.info()
    assert info.output_dims == 32
    assert info.demo_weights
    assert info.batching.max_images_per_request == 4
    assert client.health() == "SERVING"


def test_stream_answers_every_frame_and_survives_a_bad_one(client):
    frames = [random_image(20), random_image(21, channels=1), b"definitely not an image",
              random_image(22)]
    results = list(client.describe_stream(frames))
    assert [r.sequence for r in results] == [0, 1, 2, 3]
    assert [r.ok for r in results] == [True, True, False, True]
    assert results[2].error.code == grpc.StatusCode.INVALID_ARGUMENT
    for index in (0, 1, 3):
        np.testing.assert_allclose(results[index].descriptor, reference(frames[index]),
                                   atol=ATOL, rtol=0)


def test_stream_raises_a_local_error_in_the_caller(client, tmp_path):
    def frames():
        yield random_image(23)
        yield tmp_path / "missing.png"

    with pytest.raises(NetVLADInputError, match="not found"):
        list(client.describe_stream(frames()))


def test_async_client_has_the_same_api(server, tmp_path):
    path = write_png(tmp_path / "a.png", random_image(30))
    images = [path, random_image(31), random_image(32, channels=1), random_image(33)]
    expected = np.stack([reference(random_image(s)) for s in (30, 31)]
                        + [reference(random_image(32, channels=1)), reference(random_image(33))])

    async def frames():
        for image in images:
            yield image

    async def scenario():
        async with AsyncNetVLADClient(server.target, timeout=60) as client:
            info = await client.info()
            health = await client.health()
            rows = await client.describe(images, batch_size=1, concurrency=3)
            streamed = [r.descriptor async for r in client.describe_stream(frames())]
            with pytest.raises(NetVLADRPCError) as caught:
                await client.describe([b"junk"])
            return info, health, rows, np.stack(streamed), caught.value

    info, health, rows, streamed, error = asyncio.run(scenario())
    assert (info.output_dims, health) == (32, "SERVING")
    np.testing.assert_allclose(rows, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(streamed, expected, atol=ATOL, rtol=0)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT


def test_closed_port_raises_unavailable_after_retries():
    target = f"127.0.0.1:{free_port()}"
    with NetVLADClient(target, retries=2, backoff=0.01, max_backoff=0.02) as client:
        with pytest.raises(NetVLADUnavailableError) as caught:
            client.info()
        with pytest.raises(NetVLADUnavailableError):
            client.health()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.attempts == 3
    assert target in str(caught.value)
    assert isinstance(caught.value, NetVLADError)


def test_retries_reach_a_late_server_and_round_robin_uses_both(server, tmp_path):
    port, metrics_port = free_port(), free_port()
    late = ServerProcess(port, metrics_port, tmp_path / "late.log")
    try:
        # The server is still importing TensorFlow: without retries the call fails at once...
        with NetVLADClient(late.target, retries=0) as client, pytest.raises(
            NetVLADUnavailableError
        ):
            client.info()
        # ...with retries it keeps trying (backoff capped at 1 s) until the server answers.
        with NetVLADClient(late.target, retries=300, backoff=0.1, max_backoff=1.0) as client:
            image = random_image(40)
            np.testing.assert_allclose(client.describe(image)[0], reference(image),
                                       atol=ATOL, rtol=0)
        # Two live servers behind one client: round-robin sends calls to both.
        counts = [s.metric("netvlad_images_total") for s in (server, late)]
        with NetVLADClient([server.target, late.target], timeout=60) as both:
            for _ in range(20):
                both.describe(image)
        gained = [s.metric("netvlad_images_total") - c
                  for s, c in zip((server, late), counts, strict=True)]
        assert sum(gained) == 20 and min(gained) > 0, gained
    finally:
        late.stop()


def test_address_list_uses_every_address_and_skips_dead_ones(server):
    dead = f"127.0.0.1:{free_port()}"
    with NetVLADClient([dead, server.target], timeout=60) as client:
        assert client.config.target == f"ipv4:{dead},{server.target}"
        image = random_image(41)
        for _ in range(3):
            np.testing.assert_allclose(client.describe(image)[0], reference(image),
                                       atol=ATOL, rtol=0)


def test_resolve_target_forms():
    assert resolve_target("10.0.0.1:5") == "10.0.0.1:5"
    assert resolve_target("localhost:5") == "localhost:5"
    assert resolve_target("10.0.0.1:5, 10.0.0.2:6") == "ipv4:10.0.0.1:5,10.0.0.2:6"
    assert resolve_target(["[::1]:5", "[fe80::2]:6"]) == "ipv6:[::1]:5,[fe80::2]:6"
    assert resolve_target("dns:///netvlad.internal:50051") == "dns:///netvlad.internal:50051"
    assert resolve_target("ipv4:1.2.3.4:5,1.2.3.5:5") == "ipv4:1.2.3.4:5,1.2.3.5:5"
    assert resolve_target("[::1]:5") == "[::1]:5"
    for portless in ("localhost", "::1", "10.0.0.1:"):
        with pytest.raises(NetVLADInputError, match="has no port; expected HOST:PORT"):
            resolve_target(portless)
    with pytest.raises(NetVLADInputError, match="dns:///"):
        resolve_target(["host-a:5", "host-b:5"])
    with pytest.raises(NetVLADInputError, match="IPv4 or all IPv6"):
        resolve_target(["10.0.0.1:5", "[::1]:5"])
    with pytest.raises(NetVLADInputError, match="no server address"):
        resolve_target([])


def test_tls_options_are_checked_and_a_plaintext_server_refuses_tls(server, tmp_path):
    with pytest.raises(NetVLADInputError, match="both a client certificate and its private key"):
        NetVLADClient(server.target, client_certificate=b"cert")
    with pytest.raises(NetVLADInputError, match="cannot read the TLS root CA file"):
        NetVLADClient(server.target, root_certificates=tmp_path / "missing-ca.pem")
    with pytest.raises(NetVLADInputError, match="one non-empty line"):
        NetVLADClient(server.target, token="two\nlines")
    # A TLS handshake against the plaintext server fails: the call ends UNAVAILABLE.
    with NetVLADClient(server.target, tls=True, retries=0, timeout=10) as client:
        assert client.config.tls
        with pytest.raises(NetVLADUnavailableError):
            client.info()


def test_token_travels_as_bearer_metadata(server):
    with NetVLADClient(server.target, token="s3cret ") as client:
        assert client.config.metadata() == (("authorization", "Bearer s3cret"),)
        assert "s3cret" not in repr(client.config)
        # A server without authentication ignores the header.
        assert client.describe(random_image(42)).shape == (1, 32)


def test_queue_safe_concurrency_keeps_requests_in_flight_within_the_queue():
    from netvlad_client._proto import netvlad_pb2
    from netvlad_client.client import queue_safe_concurrency

    def info(queue: int) -> netvlad_pb2.ModelInfo:
        return netvlad_pb2.ModelInfo(batching=netvlad_pb2.BatchingLimits(max_queue_size=queue))

    assert queue_safe_concurrency(info(64), 2, 64) == 1  # 128 images would never fit in 64
    assert queue_safe_concurrency(info(64), 8, 16) == 4
    assert queue_safe_concurrency(info(64), 3, 16) == 3
    assert queue_safe_concurrency(info(8), 4, 100) == 1  # always at least one request
    assert queue_safe_concurrency(info(0), 5, 16) == 5  # a server that does not say: unchanged
    assert queue_safe_concurrency(info(64), 0, 16) == 1


def test_clients_never_overfill_a_small_queue_themselves(tiny_model, network):
    """One client, nobody else: requests sent side by side must not be refused as overload."""
    from server_thread import ServerThread, tiny_config

    config = tiny_config(free_port(), max_queue_size=8, max_images_per_request=8,
                         max_batch_size=1, max_queue_delay_ms=0.0)
    images = [random_image(40 + i, 32, 32) for i in range(24)]
    expected = network(np.stack(images))
    with ServerThread(config, lambda _config: tiny_model) as running:
        with NetVLADClient(running.target, retries=0) as client:
            chunks = [images[i : i + 8] for i in range(0, 24, 8)]
            got = dict(describe_concurrently(client, chunks, 3))
            np.testing.assert_allclose(np.concatenate([got[i] for i in range(3)]), expected,
                                       atol=1e-5)

        async def async_run() -> np.ndarray:
            async with AsyncNetVLADClient(running.target, retries=0) as client:
                return await client.describe(images, batch_size=8, concurrency=3)

        np.testing.assert_allclose(asyncio.run(async_run()), expected, atol=1e-5)


def test_describe_concurrently_keeps_no_rows_once_they_are_handed_over(client):
    """Rows the caller has taken are not held by the generator (a large folder stays small)."""
    import gc
    import weakref

    chunks = [[random_image(70 + i, 24, 24)] for i in range(6)]
    handed = []
    results = describe_concurrently(client, chunks, 2)
    for _, rows in results:
        handed.append(weakref.ref(rows))
        del rows
        gc.collect()
        # The generator, paused, may still see the rows it just yielded; never earlier ones.
        assert all(ref() is None for ref in handed[:-1]), "earlier rows are still held"
    assert len(handed) == 6
