"""The client library against a real server subprocess (demo-tiny weights on 127.0.0.1), and the
command line's connection options, versions and --dims rule."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest
from client_support import ServerProcess, random_image, reference, write_png
from netvlad_client import (
    AsyncNetVLADClient,
    NetVLADClient,
    NetVLADError,
    NetVLADInputError,
    NetVLADRPCError,
    NetVLADUnavailableError,
    __version__,
    describe_concurrently,
    plan_requests,
    resolve_target,
)
from netvlad_client.bench.harness import free_port

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
        import netvlad_client, netvlad_client.cli, netvlad_client.formats
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
        client.describe(random_image(7), dims=-1)
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
    # A host alone gets the server's default port.
    assert resolve_target("localhost") == "localhost:50051"
    assert resolve_target(" robot-server ") == "robot-server:50051"
    assert resolve_target("::1") == "[::1]:50051"
    assert resolve_target("[::1]") == "[::1]:50051"
    assert resolve_target("10.0.0.1,10.0.0.2:6") == "ipv4:10.0.0.1:50051,10.0.0.2:6"
    for broken in ("10.0.0.1:", "host:http", ":50051", "[::1]:"):
        with pytest.raises(NetVLADInputError, match=r"is not HOST\[:PORT\]"):
            resolve_target(broken)
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
    from netvlad_client import queue_safe_concurrency
    from netvlad_client._proto import netvlad_pb2

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


def test_dims_zero_means_all_dimensions(client):
    image = random_image(80)
    full = reference(image)
    np.testing.assert_allclose(client.describe(image, dims=0)[0], full, atol=ATOL, rtol=0)
    with NetVLADClient(client.config.target, dims=0) as every:
        assert every.config.dims is None
        assert every.describe(image).shape == (1, 32)
    with NetVLADClient(client.config.target, dims=5) as short:
        assert short.describe(image, dims=0).shape == (1, 32)  # the call's 0 wins over 5
        assert [r.descriptor.shape for r in short.describe_stream([image], dims=0)] == [(32,)]
    with pytest.raises(NetVLADInputError, match="0 or None for all"):
        NetVLADClient(client.config.target, dims=-3)


def test_a_host_without_port_reaches_port_50051():
    with NetVLADClient("localhost") as client:
        assert client.config.target == "localhost:50051"


def test_every_python_api_error_is_a_netvlad_error(server, tmp_path):
    """Wrong arguments and calls on a closed client raise NetVLADError, never a bare TypeError."""
    client = NetVLADClient(server.target, timeout=60)
    image = random_image(81)
    cases = [
        (123, "expected a path, encoded bytes, a numpy array or an iterable of them, got int"),
        (None, "got NoneType"),
        ([[1, 2], [3, 4]], "image #0: .* got list; pass pixel rows as one numpy array"),
        ([image, {"a": 1}], "image #1: expected a path.* got dict"),
        (np.zeros(7, np.uint8), r"got shape \(7,\)"),
    ]
    for images, words in cases:
        with pytest.raises(NetVLADInputError, match=words):
            client.describe(images)
        with pytest.raises(NetVLADInputError):
            list(client.describe_stream(images if isinstance(images, list) else [images]))
    with pytest.raises(NetVLADInputError, match="batch_size must be an integer >= 1"):
        client.describe(image, batch_size=0)
    with pytest.raises(NetVLADInputError, match=r"unknown client option.* timout"):
        NetVLADClient(server.target, timout=5)
    with pytest.raises(NetVLADInputError, match="retries must be an integer >= 0"):
        NetVLADClient(server.target, retries="3")
    with pytest.raises(NetVLADInputError, match="target must be"):
        NetVLADClient(50051)
    assert client.describe(image).shape == (1, 32)
    client.close()
    for call in (lambda: client.describe(image), client.info, client.health,
                 lambda: list(client.describe_stream([image])),
                 lambda: client.wait_until_serving(1)):
        with pytest.raises(NetVLADError, match="this NetVLADClient is closed") as caught:
            call()
        assert not isinstance(caught.value, NetVLADRPCError)

    async def closed_async() -> list[str]:
        async with AsyncNetVLADClient(server.target) as aclient:
            assert (await aclient.describe(image)).shape == (1, 32)
            with pytest.raises(NetVLADInputError, match="got int"):
                await aclient.describe(123)
        messages = []
        for call in (lambda: aclient.describe(image), aclient.info, aclient.health):
            with pytest.raises(NetVLADError) as caught:
                await call()
            messages.append(str(caught.value))
        return messages

    assert all("AsyncNetVLADClient is closed" in m for m in asyncio.run(closed_async()))


def test_describe_concurrently_is_part_of_the_public_api():
    import netvlad_client
    from netvlad_client import bulk

    assert netvlad_client.describe_concurrently is bulk.describe_concurrently
    assert "describe_concurrently" in netvlad_client.__all__


def test_clients_wait_for_a_server_that_is_still_loading(tiny_model, network):
    """A robot's process may start before the server has loaded its model."""
    from concurrent.futures import ThreadPoolExecutor

    from server_thread import ServerThread, tiny_config

    image = random_image(82, 32, 32)
    loading = ServerThread(tiny_config(free_port()), lambda _config: tiny_model, load=False)
    quick = {"retries": 1, "backoff": 0.01, "max_backoff": 0.02}
    with loading, ThreadPoolExecutor(3) as pool:
        with NetVLADClient(loading.target, **quick) as impatient:
            with pytest.raises(NetVLADUnavailableError, match="still loading"):
                impatient.describe(image)  # what a caller without waiting gets
            with pytest.raises(NetVLADUnavailableError, match=r"not SERVING after 0\.3 s"):
                impatient.wait_until_serving(0.3)
            with pytest.raises(NetVLADUnavailableError, match="NOT_SERVING"):
                impatient.wait_until_serving(0.3)

        async def async_wait() -> np.ndarray:
            async with AsyncNetVLADClient(loading.target, **quick) as client:
                await client.wait_until_serving(60)
                return await client.describe(image)

        patient = NetVLADClient(loading.target, wait_for_ready=True, timeout=60, **quick)
        waiting = NetVLADClient(loading.target, **quick)
        with patient, waiting:
            described = pool.submit(patient.describe, image)
            waited = pool.submit(waiting.wait_until_serving, 60)
            async_described = pool.submit(asyncio.run, async_wait())
            futures_ = (described, waited, async_described)
            time.sleep(1.5)  # well past what the retries alone would wait
            assert not any(f.done() for f in futures_), [f.exception() for f in futures_]
            loading.load()
            expected = network(image[None])
            np.testing.assert_allclose(described.result(60), expected, atol=1e-5)
            assert waited.result(60) is None
            np.testing.assert_allclose(async_described.result(60), expected, atol=1e-5)
            streamed = list(patient.describe_stream([image]))
            np.testing.assert_allclose(streamed[0].descriptor, expected[0], atol=1e-5)


def test_waiting_for_a_server_that_never_comes_ends_at_the_timeout():
    target = f"127.0.0.1:{free_port()}"
    with NetVLADClient(target, backoff=0.01, max_backoff=0.05) as client:
        start = time.monotonic()
        with pytest.raises(NetVLADUnavailableError, match=r"not SERVING after 0\.5 s.*UNAVAILABLE"):
            client.wait_until_serving(0.5)
        assert 0.4 < time.monotonic() - start < 5
        with pytest.raises(NetVLADInputError, match="timeout must be seconds"):
            client.wait_until_serving(-1)
    with NetVLADClient(target, wait_for_ready=True, timeout=0.5, backoff=0.01) as client:
        start = time.monotonic()
        with pytest.raises(NetVLADRPCError) as caught:
            client.info()
        assert 0.4 < time.monotonic() - start < 5
        assert caught.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                     grpc.StatusCode.UNAVAILABLE)


# --------------------------------------------------------------------------- command-line basics


def _cli_error(capsys, *argv: str, environ: dict[str, str] | None = None) -> str:
    """The last stderr line of a usage error (exit status 2) of netvlad-client."""
    from netvlad_client.cli import main

    with pytest.raises(SystemExit) as caught:
        main(list(argv), environ)
    assert caught.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("variable, value, why", [
    ("NETVLAD_CLIENT_RETRIES", "abc", "expected an integer, got 'abc'"),
    ("NETVLAD_CLIENT_RETRIES", "-1", "expected an integer at least 0, got -1"),
    ("NETVLAD_CLIENT_RETRIES", "2.5", "expected an integer, got '2.5'"),
    ("NETVLAD_CLIENT_TIMEOUT", "abc", "expected a number > 0, got 'abc'"),
    ("NETVLAD_CLIENT_TIMEOUT", "0", "expected a number > 0, got '0'"),
    ("NETVLAD_CLIENT_TIMEOUT", "-5", "expected a number > 0, got '-5'"),
    ("NETVLAD_CLIENT_TIMEOUT", "nan", "expected a number > 0, got 'nan'"),
])
def test_a_bad_connection_variable_is_named_with_what_it_expects(capsys, variable, value, why):
    error = _cli_error(capsys, "info", environ={variable: value})
    assert error == f"netvlad-client: error: environment variable {variable}={value!r}: {why}"
    flag = "--" + variable.removeprefix("NETVLAD_CLIENT_").lower()
    assert _cli_error(capsys, flag, value, "info", environ={}) == (
        f"netvlad-client: error: argument {flag}: {why}")


def test_every_program_has_the_same_version(capsys):
    from netvlad_client.cli import main as client_main
    from netvlad_server.config import parse_config
    from netvlad_server.models_cli import main as models_main

    shown = []
    for run in (client_main, parse_config, models_main):
        with pytest.raises(SystemExit) as caught:
            run(["--version"])
        assert caught.value.code == 0
        shown.append(capsys.readouterr().out.strip())
    assert shown == [f"{program} {__version__}"
                     for program in ("netvlad-client", "netvlad-server", "netvlad-models")]


def test_help_shows_the_port_default_and_the_fetch_timeout_default(capsys):
    from netvlad_client.cli import main as client_main
    from netvlad_server.models_cli import main as models_main

    for run, argv in ((client_main, ["--help"]), (models_main, ["fetch", "--help"])):
        with pytest.raises(SystemExit):
            run(argv)
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "HOST[:PORT] (port 50051 when omitted)" in shown
    assert "seconds without data before giving up (default 30.0)" in shown


def test_describe_dims_0_or_all_means_every_dimension(server, tmp_path, capsys):
    from netvlad_client.cli import main

    image = random_image(71)
    path = write_png(tmp_path / "a.png", image)
    for dims in ("0", "all", "32"):
        out = tmp_path / f"d{dims}.npy"
        assert main(["--target", server.target, "describe", str(path), "--dims", dims,
                     "--out", str(out)]) == 0
        np.testing.assert_allclose(np.load(out), reference(image)[None], atol=ATOL)
    assert main(["--target", server.target, "describe", str(path), "--dims", "8",
                 "--out", str(tmp_path / "d8.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "d8.npy"), reference(image, dims=8)[None],
                               atol=ATOL)
    capsys.readouterr()
    assert "argument --dims: expected an integer at least 0, got -1" in _cli_error(
        capsys, "--target", server.target, "describe", str(path), "--dims", "-1")
    with NetVLADClient(server.target, timeout=60, dims=0) as client:  # the library's rule
        np.testing.assert_allclose(client.describe(image, dims=0), reference(image)[None],
                                   atol=ATOL)
