"""Hostile input against real servers: bombs, broken files, lying buffers, odd ids, floods, fuzz.

Each case must end in a clear INVALID_ARGUMENT (or a correct answer), never crash the server, never
grow its memory and never disturb another caller. test_server.py already covers one example of each
bad input; here every format, the extremes and random input (hypothesis) are covered.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import cv2
import grpc
import numpy as np
import pytest
from client_support import ServerProcess
from hostile import (
    FORMATS,
    PICTURE,
    DecodeSpy,
    bombs,
    corruptions,
    good_files,
    raw_image,
    raw_lies,
    truncations,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client._proto import netvlad_pb2_grpc as pb_grpc
from netvlad_client.bench.harness import free_port
from netvlad_server.images import (
    ImageError,
    ImageLimits,
    decode_encoded,
    prepare_raw,
    read_header,
)
from server_thread import InstrumentedModel, ServerThread, tiny_config

TIMEOUT = 60.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT
FUZZ_EXAMPLES = int(os.environ.get("NETVLAD_FUZZ_EXAMPLES", "200"))  # raise by hand for long runs
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FILES = good_files()
SMALL_LIMITS = ImageLimits(max_pixels=256 * 256, min_side=16)
RNG_IMAGES = np.random.default_rng(5).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def instrumented(tiny_model):
    return InstrumentedModel(tiny_model)


@pytest.fixture(scope="module")
def server(instrumented):
    """Default limits (64 images, 16 Mpixel images), a 4 MiB message limit."""
    config = tiny_config(free_port(), max_message_bytes=4 * 1024 * 1024)
    with ServerThread(config, instrumented.loader) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target, options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024)]) as channel:
        yield pb_grpc.DescriptorServiceStub(channel)


@pytest.fixture
def spy(monkeypatch) -> DecodeSpy:
    counter = DecodeSpy()
    monkeypatch.setattr(cv2, "imdecode", counter)
    return counter


def rows(response: pb.DescribeImagesResponse) -> np.ndarray:
    return np.array([d.values for d in response.descriptors], dtype=np.float32)


def call_error(stub, request: pb.DescribeImagesRequest) -> grpc.RpcError:
    """Make a DescribeImages call that must fail; its error."""
    with pytest.raises(grpc.RpcError) as caught:
        stub.DescribeImages(request, timeout=TIMEOUT)
    return caught.value


class GoodCaller:
    """A concurrent caller describing one image in a loop and checking every answer."""

    def __init__(self, stub, network) -> None:
        self.stub = stub
        self.image = PICTURE[:32, :32]
        self.expected = network(self.image)
        self.answers = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        request = pb.DescribeImagesRequest(images=[raw_image(self.image, "good")])
        while not self._stop.is_set() or self.answers == 0:
            try:
                got = rows(self.stub.DescribeImages(request, timeout=TIMEOUT))
                if not np.allclose(got, self.expected, atol=1e-5):
                    self.failures.append("wrong descriptor")
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code()}: {exc.details()}")
            self.answers += 1

    def __enter__(self) -> GoodCaller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        assert not self.failures, self.failures[:5]
        assert self.answers > 0


def test_decompression_bombs_are_refused_before_any_decoding(stub, server, network, spy):
    limit = server.config.max_image_pixels
    with GoodCaller(stub, network):
        for name, data in bombs(limit).items():
            assert len(data) < 1024 * 1024, name  # small files...
            error = call_error(stub, pb.DescribeImagesRequest(
                images=[raw_image(PICTURE), pb.Image(id="bomb", encoded=data)]))
            assert error.code() == INVALID, (name, error.details())
            assert error.details().startswith("image 1 (id 'bomb'): ")
            if "twice" in name:
                assert "holds tag 256 twice" in error.details()
            else:  # ...declaring far more pixels than allowed
                assert f"over the limit of {limit} (--max-image-pixels)" in error.details()
    assert spy.calls == 0, "a bomb reached the decoder"
    response = stub.DescribeImages(pb.DescribeImagesRequest(
        images=[pb.Image(encoded=FILES["PNG"])]), timeout=TIMEOUT)
    assert spy.calls == 1  # the spy does see real decodes
    np.testing.assert_allclose(rows(response), network(PICTURE), atol=1e-5)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_truncated_and_corrupt_files_of_every_format(name, stub, network):
    data = FILES[name]
    with GoodCaller(stub, network):
        for broken in truncations(data):
            error = call_error(stub, pb.DescribeImagesRequest(
                images=[pb.Image(id="ok", encoded=data), pb.Image(id="cut", encoded=broken)]))
            assert error.code() == INVALID
            assert error.details().startswith("image 1 (id 'cut'): "), error.details()
            assert any(word in error.details() for word in (
                "corrupt or truncated", "could not be decoded", f"not a {', '.join(FORMATS)}")), \
                error.details()
        for broken in corruptions(data):
            request = pb.DescribeImagesRequest(images=[pb.Image(id="bad", encoded=broken)])
            try:
                answer = stub.DescribeImages(request, timeout=TIMEOUT)
            except grpc.RpcError as exc:
                assert exc.code() == INVALID and exc.details().startswith("image 0 (id 'bad')")
                continue
            # Some decoders accept damaged pixel data: then it is what OpenCV makes of it.
            decoded = cv2.imdecode(np.frombuffer(broken, np.uint8), cv2.IMREAD_ANYCOLOR)
            pixels = decoded[:, :, None] if decoded.ndim == 2 else decoded[:, :, ::-1]
            np.testing.assert_allclose(rows(answer), network(pixels), atol=1e-5)


def test_every_bad_file_of_a_request_is_named_at_once(stub):
    broken = [truncations(data)[2] for data in FILES.values()]
    request = pb.DescribeImagesRequest(images=[
        pb.Image(id=f"f{i}", encoded=data) for i, data in enumerate(broken)])
    details = call_error(stub, request).details()
    for i in range(len(broken)):
        assert f"image {i} (id 'f{i}')" in details


@pytest.mark.parametrize("case", sorted(raw_lies()))
def test_raw_buffers_that_disagree_with_their_shape(case, stub):
    error = call_error(stub, pb.DescribeImagesRequest(
        images=[raw_image(PICTURE), pb.Image(id="liar", raw=raw_lies()[case])]))
    assert error.code() == INVALID
    assert error.details().startswith("image 1 (id 'liar'): raw image "), error.details()


ODD_IDS = {
    "empty": "",
    "100 KB": "x" * 100_000,
    "non-ASCII": "камера-7/帧/ß",
    "emoji": "🤖📷🛰️" * 30,
    "control characters": "a\nb\tc\x00d",
    "looks like a label": "image 5 (id 'x'): forged",
}


def test_odd_ids_come_back_unchanged(stub, network):
    request = pb.DescribeImagesRequest(images=[
        raw_image(PICTURE, image_id) for image_id in ODD_IDS.values()])
    response = stub.DescribeImages(request, timeout=TIMEOUT)
    assert [d.id for d in response.descriptors] == list(ODD_IDS.values())
    expected = network(PICTURE)
    np.testing.assert_allclose(rows(response), np.repeat(expected, len(ODD_IDS), 0), atol=1e-5)


def test_odd_ids_in_errors_are_quoted_short_and_safe(stub):
    request = pb.DescribeImagesRequest(images=[
        pb.Image(id=image_id, encoded=b"not an image") for image_id in ODD_IDS.values()])
    details = call_error(stub, request).details()
    assert len(details.encode()) < 8192  # fits gRPC's default metadata limit
    assert "image 0: not a JPEG" in details  # no id: position only
    assert "image 1 (id '" + "x" * 64 + "...')" in details  # shortened
    assert "image 2 (id 'камера-7/帧/ß')" in details
    assert "image 4 (id 'a\\nb\\tc\\x00d')" in details  # escaped, cannot forge log lines
    assert "image 5 (id \"image 5 (id 'x'): forged\")" in details


def test_ten_thousand_images_in_one_request_are_refused_naming_the_limit(stub, server,
                                                                          instrumented):
    ran = len(instrumented.batches)
    tiny = raw_image(PICTURE[:16, :16, :1])  # 256 bytes: 10 000 fit in the message limit
    request = pb.DescribeImagesRequest(images=[tiny] * 10_000)
    error = call_error(stub, request)
    assert error.code() == INVALID
    assert "holds 10000 images; the limit is 64 per request (--max-images-per-request)" in \
        error.details()
    assert len(instrumented.batches) == ran  # nothing reached the model
    assert server.server.queue_depth == 0


def test_ten_thousand_images_are_described_when_the_limits_allow(tiny_model, network):
    config = tiny_config(free_port(), max_images_per_request=10_000, max_queue_size=10_000,
                         max_batch_size=128, max_message_bytes=32 * 1024 * 1024)
    images = [RNG_IMAGES[i] for i in range(10)]
    request = pb.DescribeImagesRequest(images=[
        raw_image(images[i % 10], f"n{i}") for i in range(10_000)])
    with ServerThread(config, lambda _config: tiny_model) as running, \
            grpc.insecure_channel(running.target, options=[
                ("grpc.max_send_message_length", 32 * 1024 * 1024),
                ("grpc.max_receive_message_length", 32 * 1024 * 1024)]) as channel:
        response = pb_grpc.DescriptorServiceStub(channel).DescribeImages(request, timeout=300)
    assert [d.id for d in response.descriptors] == [f"n{i}" for i in range(10_000)]
    expected = network(np.stack(images))
    got = rows(response).reshape(1000, 10, -1)
    np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), atol=1e-5)


def test_messages_over_the_size_limit_are_refused_and_nothing_else_suffers(stub, network):
    big = pb.Image(id="big", encoded=FILES["PNG"] + bytes(6 * 1024 * 1024))  # 6 MiB > 4 MiB
    with GoodCaller(stub, network):
        error = call_error(stub, pb.DescribeImagesRequest(images=[big]))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(4 * 1024 * 1024) in error.details()
        frames = [pb.StreamDescribeImagesRequest(sequence=1, request=pb.DescribeImagesRequest(
            images=[raw_image(PICTURE)])),
            pb.StreamDescribeImagesRequest(sequence=2, request=pb.DescribeImagesRequest(
                images=[big]))]
        answers = stub.StreamDescribeImages(iter(frames), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as caught:
            for answer in answers:
                assert answer.sequence == 1  # the good frame before the oversized one
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_bytes_that_are_no_request_message_get_invalid_argument(server):
    with grpc.insecure_channel(server.target) as channel:
        bad_utf8_id = b"\x0a\x05\x0a\x03\xff\xfe\xfd"  # images { id: <invalid UTF-8> }
        for method, data in (("DescribeImages", b"\xff\xff\xff"),
                             ("DescribeImages", bad_utf8_id), ("GetModelInfo", b"\xff\xff")):
            call = channel.unary_unary(f"/netvlad.v1.DescriptorService/{method}")
            with pytest.raises(grpc.RpcError) as caught:
                call(data, timeout=TIMEOUT)
            assert caught.value.code() == INVALID, caught.value.details()
            assert f"is not a valid netvlad.v1.{method}Request" in caught.value.details()
        stream = channel.stream_stream("/netvlad.v1.DescriptorService/StreamDescribeImages")
        good = pb.StreamDescribeImagesRequest(sequence=9, request=pb.DescribeImagesRequest(
            images=[raw_image(PICTURE)])).SerializeToString()
        answers = [pb.StreamDescribeImagesResponse.FromString(raw)
                   for raw in stream(iter([b"\xff\xff", good]), timeout=TIMEOUT)]
    assert answers[0].error.code == INVALID.value[0]
    assert "is not a valid netvlad.v1.StreamDescribeImagesRequest" in answers[0].error.message
    assert answers[1].sequence == 9 and answers[1].WhichOneof("outcome") == "response"


# ---------------------------------------------------------------- fuzzing (hypothesis)

def _mutated(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    """data with bytes replaced at (position mod length, value) and optionally truncated."""
    mutated = bytearray(data)
    for position, value in edits:
        mutated[position % len(mutated)] = value
    return bytes(mutated[:cut] if cut is not None else mutated)


header_edits = st.lists(st.tuples(st.integers(0, 95), st.integers(0, 255)), max_size=6)
any_edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=4)
mutated_files = st.builds(
    _mutated, st.sampled_from(sorted(FILES.values())), st.one_of(header_edits, any_edits),
    st.one_of(st.none(), st.integers(0, 4096)))


@FUZZ
@given(data=st.one_of(st.binary(max_size=512), mutated_files))
def test_fuzz_decoding_raises_only_image_errors_and_never_exceeds_the_header(data):
    try:
        header = read_header(data)
        image = decode_encoded(data, SMALL_LIMITS, "image 0")
    except ImageError as exc:
        assert str(exc).startswith("image 0: ") or str(exc).startswith("image: ")
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (1, 3)
    # The size check before decoding is only sound if the decoder never makes more pixels.
    assert image.shape[:2] == (header.height, header.width)


@FUZZ
@given(data=st.binary(max_size=64), height=st.integers(0, 2**32 - 1),
       width=st.integers(0, 2**32 - 1), channels=st.integers(0, 2**32 - 1),
       longest=st.sampled_from([0, 16, 40]))
def test_fuzz_raw_buffers(data, height, width, channels, longest):
    try:
        image = prepare_raw(data, height, width, channels, longest, SMALL_LIMITS, "image 0")
    except ImageError as exc:
        assert str(exc).startswith("image 0: raw image") or "both sides" in str(exc)
        return
    assert len(data) == height * width * channels and image.dtype == np.uint8
    assert max(image.shape[:2]) == (longest or max(height, width))


def _fuzz_image(data: bytes, raw: tuple[bytes, int, int, int] | None, image_id: str) -> pb.Image:
    if raw is not None:
        pixels, height, width, channels = raw
        return pb.Image(id=image_id, raw=pb.RawImage(data=pixels, height=height, width=width,
                                                     channels=channels))
    return pb.Image(id=image_id, encoded=data)


raw_parts = st.one_of(
    st.none(),
    st.tuples(st.binary(max_size=64), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
              st.integers(0, 2**32 - 1)),
    st.builds(lambda h, w, c: (bytes(h * w * c), h, w, c), st.integers(0, 40),
              st.integers(0, 40), st.sampled_from([1, 3])))
fuzz_images = st.builds(_fuzz_image, st.one_of(st.binary(max_size=256), mutated_files),
                        raw_parts, st.text(max_size=80))
fuzz_requests = st.builds(
    lambda images, dims, mode, side: pb.DescribeImagesRequest(
        images=images, dims=dims, resize=pb.ResizePolicy(mode=mode, longest_side=side)),
    st.lists(fuzz_images, max_size=5),
    st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1)),
    st.integers(0, 5),
    st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)))


@pytest.fixture(scope="module")
def fuzz_server(tiny_model):
    """A server with a small pixel limit, so that fuzzed headers cannot ask for big images."""
    config = tiny_config(free_port(), max_image_pixels=256 * 256)
    with ServerThread(config, lambda _config: tiny_model) as running:
        yield running


@pytest.fixture(scope="module")
def fuzz_channel(fuzz_server):
    with grpc.insecure_channel(fuzz_server.target) as channel:
        yield channel


@FUZZ
@given(request=fuzz_requests)
def test_fuzz_requests_to_a_real_server(fuzz_channel, request):
    stub = pb_grpc.DescriptorServiceStub(fuzz_channel)
    try:
        response = stub.DescribeImages(request, timeout=TIMEOUT)
    except grpc.RpcError as exc:
        assert exc.code() == INVALID, (exc.code(), exc.details())
        assert exc.details()
        return
    assert len(response.descriptors) == len(request.images) > 0
    assert [d.id for d in response.descriptors] == [image.id for image in request.images]
    norms = np.linalg.norm(rows(response), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-4)


@FUZZ
@given(data=st.one_of(st.binary(max_size=512),
                      fuzz_requests.map(lambda r: r.SerializeToString()).flatmap(
                          lambda raw: st.builds(_mutated, st.just(raw or b"\x00"), any_edits,
                                                st.none()))))
def test_fuzz_raw_bytes_to_a_real_server(fuzz_channel, data):
    call = fuzz_channel.unary_unary("/netvlad.v1.DescriptorService/DescribeImages")
    try:
        pb.DescribeImagesResponse.FromString(call(data, timeout=TIMEOUT))
    except grpc.RpcError as exc:
        assert exc.code() == INVALID, (exc.code(), exc.details())


# ---------------------------------------------------------------- memory under a barrage

def _barrage(target: str) -> list[str]:
    """One round of hostile requests from 4 threads; returns unexpected outcomes (none wanted)."""
    bad: list[pb.DescribeImagesRequest] = []
    bad += [pb.DescribeImagesRequest(images=[pb.Image(encoded=data)])
            for data in bombs(4096 * 4096).values()]
    for data in FILES.values():
        bad += [pb.DescribeImagesRequest(images=[pb.Image(encoded=cut)])
                for cut in truncations(data)[:4]]
    bad += [pb.DescribeImagesRequest(images=[pb.Image(id="x" * 100_000, raw=lie)])
            for lie in raw_lies().values()]
    bad.append(pb.DescribeImagesRequest(images=[raw_image(PICTURE[:16, :16])] * 10_000))
    oversize = pb.DescribeImagesRequest(images=[pb.Image(encoded=bytes(70 * 1024 * 1024))])
    problems: list[str] = []

    def send(request: pb.DescribeImagesRequest) -> None:
        with grpc.insecure_channel(target, options=[
                ("grpc.max_send_message_length", 128 * 1024 * 1024)]) as channel:
            stub = pb_grpc.DescriptorServiceStub(channel)
            try:
                stub.DescribeImages(request, timeout=TIMEOUT)
                problems.append("a hostile request was answered OK")
            except grpc.RpcError as exc:
                expected = (grpc.StatusCode.RESOURCE_EXHAUSTED if request is oversize
                            else INVALID)
                if exc.code() != expected:
                    problems.append(f"{exc.code()}: {exc.details()}")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(send, [*bad, oversize]))
    return problems


def test_a_hostile_barrage_leaves_memory_flat_and_good_callers_served(tmp_path, network):
    server = ServerProcess(free_port(), free_port(), tmp_path / "server.log")
    try:
        server.wait_serving()
        with grpc.insecure_channel(server.target) as channel, \
                GoodCaller(pb_grpc.DescriptorServiceStub(channel), network) as good:
            assert _barrage(server.target) == []  # warms allocator pools and caches
            time.sleep(1.0)
            before = server.rss_bytes()
            for _ in range(3):
                assert _barrage(server.target) == []
            time.sleep(1.0)
            after = server.rss_bytes()
            assert server.process.poll() is None, server.tail()
        assert good.answers > 10
    finally:
        server.stop()
    growth_mib = (after - before) / 2**20
    print(f"server RSS {before / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB "
          f"({growth_mib:+.1f} MiB over 3 barrages)")
    # Each barrage carries ~80 MiB and ~10 MiB of ids; a leak of any of it would show here.
    assert growth_mib < 40, f"server memory grew {growth_mib:.1f} MiB over 3 hostile barrages"
