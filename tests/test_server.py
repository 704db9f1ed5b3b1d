"""The gRPC server end to end: real servers on 127.0.0.1, the real tiny network, real files."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

import cv2
import grpc
import numpy as np
import pytest
from client_support import ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client._proto import netvlad_pb2_grpc as pb_grpc
from netvlad_client.bench.harness import free_port
from netvlad_server.service import SERVICE_NAME, encode_describe_response, encode_stream_response
from prometheus_client.parser import text_string_to_metric_families
from server_thread import InstrumentedModel, ServerThread, tiny_config, wait_for

RNG = np.random.default_rng(3)
TIMEOUT = 60.0


def picture(height: int = 48, width: int = 64, channels: int = 3) -> np.ndarray:
    """A random uint8 image [H, W, C]."""
    return RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)


def raw(array: np.ndarray, image_id: str = "") -> pb.Image:
    """An Image message carrying raw pixels."""
    height, width, channels = array.shape
    return pb.Image(id=image_id, raw=pb.RawImage(data=array.tobytes(), height=height, width=width,
                                                  channels=channels))


def encoded(array: np.ndarray, ext: str = ".png", image_id: str = "") -> pb.Image:
    """An Image message carrying a real file written by OpenCV from an RGB (or gray) array."""
    bgr = array[:, :, ::-1] if array.shape[2] == 3 else array[:, :, 0]
    ok, data = cv2.imencode(ext, np.ascontiguousarray(bgr))
    assert ok
    return pb.Image(id=image_id, encoded=data.tobytes())


def rows(response: pb.DescribeImagesResponse) -> np.ndarray:
    """The response's descriptors as a float32 array [N, D]."""
    return np.array([d.values for d in response.descriptors], dtype=np.float32)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """Make a call that must fail and return its error."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


@pytest.fixture(scope="module")
def server(tiny_model):
    """One shared server with default batching and a 2 MiB message limit."""
    config = tiny_config(free_port(), max_message_bytes=2 * 1024 * 1024)
    with ServerThread(config, lambda _config: tiny_model) as running:
        yield running


@pytest.fixture
def stub(server):
    """A DescriptorService stub on a fresh channel to the shared server."""
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.DescriptorServiceStub(channel)


def open_stub(running: ServerThread) -> tuple[grpc.Channel, pb_grpc.DescriptorServiceStub]:
    """A channel and stub for a test's own server."""
    channel = grpc.insecure_channel(running.target)
    return channel, pb_grpc.DescriptorServiceStub(channel)


def metric_samples(running: ServerThread) -> dict[str, list]:
    """/metrics parsed by prometheus_client: sample name -> samples."""
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(running.metrics_text()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_round_trip_equals_a_direct_network_call(stub, network):
    color, gray, jpeg_source = picture(), picture(40, 56, 1), picture(64, 48)
    jpeg = encoded(jpeg_source, ".jpg", "cam/jpeg")
    request = pb.DescribeImagesRequest(images=[
        encoded(color, ".png", "png"), raw(color, "raw"), raw(gray, "gray"), jpeg])
    response = stub.DescribeImages(request, timeout=TIMEOUT)
    assert [d.id for d in response.descriptors] == ["png", "raw", "gray", "cam/jpeg"]
    assert response.dims == 32
    got = rows(response)
    decoded_jpeg = cv2.imdecode(np.frombuffer(jpeg.encoded, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    expected = np.concatenate([network(color), network(color), network(gray),
                               network(decoded_jpeg)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_shorter_descriptors_and_resize_policy(stub, network):
    image = picture(60, 90)
    response = stub.DescribeImages(pb.DescribeImagesRequest(
        images=[raw(image)], dims=12,
        resize=pb.ResizePolicy(mode=pb.RESIZE_MODE_FIT_LONGEST_SIDE, longest_side=45)),
        timeout=TIMEOUT)
    assert response.dims == 12
    resized = cv2.resize(image, (45, 30), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(rows(response), network(resized, dims=12), atol=1e-6)


def test_concurrent_callers_are_batched_and_each_gets_its_own_rows(tiny_model, network):
    model = InstrumentedModel(tiny_model)
    config = tiny_config(free_port(), max_queue_delay_ms=500.0, max_batch_size=8)
    images = [picture(32, 48) for _ in range(6)]
    with ServerThread(config, model.loader) as running:
        model.batches.clear()  # forget the warm-up
        channel, stub = open_stub(running)
        with channel:
            futures = [stub.DescribeImages.future(pb.DescribeImagesRequest(
                images=[raw(image, f"caller{i}")]), timeout=TIMEOUT)
                for i, image in enumerate(images)]
            answers = [future.result() for future in futures]
        samples = metric_samples(running)
    for i, (image, answer) in enumerate(zip(images, answers, strict=True)):
        assert [d.id for d in answer.descriptors] == [f"caller{i}"]
        np.testing.assert_allclose(rows(answer), network(image), atol=1e-6)
    assert max(batch[0] for batch in model.batches) > 1, model.batches
    count = next(s.value for s in samples["netvlad_batch_size_count"])
    ones = next(s.value for s in samples["netvlad_batch_size_bucket"] if s.labels["le"] == "1.0")
    assert count < 6 and ones < count, "the batch-size histogram shows no batch above 1"


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring a huge image, with no pixel data at all."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", zlib.crc32(chunk[4:]))


BAD_INPUTS = {
    "undecodable": (lambda: [pb.Image(id="bad", encoded=b"\x89PNG\r\n\x1a\n" + bytes(40))],
                    {}, ["image 0 (id 'bad')", "corrupt or truncated PNG header"]),
    "corrupt": (lambda: [raw(picture()),
                         pb.Image(id="bad", encoded=encoded(picture()).encoded[:300])],
                {}, ["image 1 (id 'bad')", "could not be decoded"]),
    "empty": (lambda: [raw(picture()), pb.Image(id="bad", encoded=b"")],
              {}, ["image 1 (id 'bad')", "empty (0 bytes)"]),
    "unknown format": (lambda: [pb.Image(id="bad", encoded=b"GIF89a" + bytes(30))],
                       {}, ["image 0 (id 'bad')", "not a JPEG, PNG, BMP, TIFF, WebP, PNM file"]),
    "too small": (lambda: [raw(picture()), raw(picture(8, 40), "bad")],
                  {}, ["image 1 (id 'bad')", "image is 8x40; both sides must be at least 16"]),
    "bomb by header": (lambda: [pb.Image(id="bad", encoded=_png_declaring(100_000, 100_000))],
                       {}, ["image 0 (id 'bad')", "100000x100000 = 10000000000 pixels",
                            "--max-image-pixels"]),
    "raw length": (lambda: [pb.Image(id="bad", raw=pb.RawImage(data=bytes(100), height=16,
                                                               width=16, channels=3))],
                   {}, ["image 0 (id 'bad')", "holds 100 bytes but 16x16x3 needs 768"]),
    "raw channels": (lambda: [pb.Image(id="bad", raw=pb.RawImage(data=bytes(1024), height=16,
                                                                 width=16, channels=4))],
                     {}, ["image 0 (id 'bad')", "4 channels; expected 1 (grayscale) or 3 (RGB)"]),
    "no source": (lambda: [pb.Image(id="bad")], {}, ["image 0 (id 'bad')", "neither encoded"]),
    "too many images": (lambda: [raw(picture(16, 16)) for _ in range(65)],
                        {}, ["holds 65 images; the limit is 64", "--max-images-per-request"]),
    "no images": (lambda: [], {}, ["holds no images"]),
    "dims too large": (lambda: [raw(picture())], {"dims": 33},
                       ["dims 33 exceeds the model's 32 output values"]),
    "resize too small": (lambda: [raw(picture())], {"resize": pb.ResizePolicy(
        mode=pb.RESIZE_MODE_FIT_LONGEST_SIDE, longest_side=4)}, ["longest_side 4 is out of range"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_invalid_argument_and_a_concurrent_caller_is_unaffected(
        case, stub, network):
    make_images, extra, texts = BAD_INPUTS[case]
    good_image = picture(32, 32)
    good = stub.DescribeImages.future(pb.DescribeImagesRequest(images=[raw(good_image)]),
                                      timeout=TIMEOUT)
    error = rpc_error(stub.DescribeImages, pb.DescribeImagesRequest(images=make_images(), **extra),
                      timeout=TIMEOUT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    for text in texts:
        assert text in error.details()
    np.testing.assert_allclose(rows(good.result()), network(good_image), atol=1e-6)


def test_all_bad_images_of_a_request_are_named_and_counted(stub, server):
    before = metric_samples(server)
    request = pb.DescribeImagesRequest(images=[
        raw(picture()), pb.Image(id="a", encoded=b""), raw(picture(4, 4), "b")])
    details = rpc_error(stub.DescribeImages, request, timeout=TIMEOUT).details()
    assert "image 1 (id 'a'): the encoded image is empty" in details
    assert "image 2 (id 'b'): image is 4x4" in details
    after = metric_samples(server)

    def errors(samples, reason):
        return sum(s.value for s in samples.get("netvlad_image_errors_total", [])
                   if s.labels["reason"] == reason)

    assert errors(after, "empty") == errors(before, "empty") + 1
    assert errors(after, "too_small") == errors(before, "too_small") + 1


def test_a_message_over_the_size_limit_is_refused_saying_the_limit(stub, network):
    image = picture(1024, 1024)  # 3 MiB of raw pixels, over the shared server's 2 MiB
    error = rpc_error(stub.DescribeImages, pb.DescribeImagesRequest(images=[raw(image)]),
                      timeout=TIMEOUT)
    # gRPC itself refuses oversized messages, before any handler runs, with RESOURCE_EXHAUSTED.
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(2 * 1024 * 1024) in error.details()
    small = picture(32, 32)
    ok = stub.DescribeImages(pb.DescribeImagesRequest(images=[raw(small)]), timeout=TIMEOUT)
    np.testing.assert_allclose(rows(ok), network(small), atol=1e-6)


def _held_server(tiny_model, **overrides):
    """A server whose model thread the test holds at a gate, plus the instrumented model."""
    model = InstrumentedModel(tiny_model)
    config = tiny_config(free_port(), max_batch_size=1, max_queue_delay_ms=0.0, **overrides)
    return model, ServerThread(config, model.loader)


def _occupy_model(model: InstrumentedModel, stub) -> grpc.Future:
    """Close the gate and send a request that then blocks inside the model."""
    model.batches.clear()
    model.entered.clear()
    model.gate.clear()
    busy = stub.DescribeImages.future(pb.DescribeImagesRequest(images=[raw(picture(16, 16))]),
                                      timeout=TIMEOUT)
    assert model.entered.wait(TIMEOUT)
    return busy


def test_a_cancelled_request_is_dropped_before_compute(tiny_model):
    model, running = _held_server(tiny_model)
    with running, open_stub(running)[0] as channel:
        stub = pb_grpc.DescriptorServiceStub(channel)
        busy = _occupy_model(model, stub)
        doomed = stub.DescribeImages.future(pb.DescribeImagesRequest(
            images=[raw(picture(24, 24))]), timeout=TIMEOUT)
        wait_for(lambda: running.server.queue_depth == 1, what="the request to be queued")
        doomed.cancel()
        wait_for(lambda: running.server.queue_depth == 0, what="the cancelled request to leave")
        model.gate.set()
        busy.result()
        assert model.shapes_run() == [(16, 16, 3)]  # the cancelled 24x24 image never ran
        samples = metric_samples(running)
    codes = {s.labels["code"]: s.value for s in samples["netvlad_requests_total"]}
    assert codes.get("CANCELLED") == 1


def test_a_request_past_its_deadline_is_dropped_before_compute(tiny_model):
    model, running = _held_server(tiny_model)
    with running, open_stub(running)[0] as channel:
        stub = pb_grpc.DescriptorServiceStub(channel)
        busy = _occupy_model(model, stub)
        error = rpc_error(stub.DescribeImages,
                          pb.DescribeImagesRequest(images=[raw(picture(24, 24))]), timeout=0.3)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: running.server.queue_depth == 0, what="the expired request to leave")
        model.gate.set()
        busy.result()
        assert model.shapes_run() == [(16, 16, 3)]


def test_a_full_queue_answers_resource_exhausted_at_once(tiny_model, network):
    model, running = _held_server(tiny_model, max_queue_size=4, max_images_per_request=4)
    with running, open_stub(running)[0] as channel:
        stub = pb_grpc.DescriptorServiceStub(channel)
        busy = _occupy_model(model, stub)
        queued_images = [picture(16, 16) for _ in range(4)]
        queued = stub.DescribeImages.future(pb.DescribeImagesRequest(
            images=[raw(image) for image in queued_images]), timeout=TIMEOUT)
        wait_for(lambda: running.server.queue_depth == 4, what="four queued images")
        error = rpc_error(stub.DescribeImages,
                          pb.DescribeImagesRequest(images=[raw(picture(16, 16))]), timeout=TIMEOUT)
        assert not model.gate.is_set()  # answered while the model was still busy
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "holds 4 of 4" in error.details() and "--max-queue-size" in error.details()
        model.gate.set()
        busy.result()
        np.testing.assert_allclose(rows(queued.result()), network(np.stack(queued_images)),
                                   atol=1e-6)


def test_a_full_queue_is_marked_busy_and_clients_retry_until_it_drains(tiny_model, network):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from netvlad_client import AsyncNetVLADClient, NetVLADClient, NetVLADRPCError

    model, running = _held_server(tiny_model, max_queue_size=4, max_images_per_request=4)
    image = picture(16, 16)
    with running, open_stub(running)[0] as channel:
        stub = pb_grpc.DescriptorServiceStub(channel)
        busy = _occupy_model(model, stub)
        queued = stub.DescribeImages.future(pb.DescribeImagesRequest(
            images=[raw(picture(16, 16)) for _ in range(4)]), timeout=TIMEOUT)
        wait_for(lambda: running.server.queue_depth == 4, what="a full queue")
        error = rpc_error(stub.DescribeImages, pb.DescribeImagesRequest(images=[raw(image)]),
                          timeout=TIMEOUT)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("netvlad-busy", "queue-full") in tuple(error.trailing_metadata())
        with NetVLADClient(running.target, retries=0) as impatient, \
                pytest.raises(NetVLADRPCError) as caught:
            impatient.describe(image)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED

        def refusals() -> float:
            return sum(sample.value for sample in metric_samples(running)["netvlad_requests_total"]
                       if sample.labels["code"] == "RESOURCE_EXHAUSTED")

        async def async_describe() -> np.ndarray:
            async with AsyncNetVLADClient(running.target, retries=20, backoff=0.05,
                                          max_backoff=0.2) as client:
                return await client.describe(image)

        before = refusals()
        patient = NetVLADClient(running.target, retries=20, backoff=0.05, max_backoff=0.2)
        with patient, ThreadPoolExecutor(2) as pool:
            sync_result = pool.submit(patient.describe, image)
            async_result = pool.submit(asyncio.run, async_describe())
            # Both are turned away, and keep coming back, while the queue stays full ...
            wait_for(lambda: refusals() >= before + 4, what="the clients to retry")
            assert not sync_result.done() and not async_result.done()
            model.gate.set()  # ... until it drains; then they are answered.
            for result in (sync_result, async_result):
                np.testing.assert_allclose(result.result(TIMEOUT), network(image[None]),
                                           atol=1e-6)
        busy.result()
        queued.result()


def test_only_unavailable_and_a_full_queue_are_retried():
    from netvlad_client.retry import is_retryable as _retryable

    class Failure(grpc.RpcError):
        def __init__(self, code, trailers=()):
            self._code, self._trailers = code, trailers

        def code(self):
            return self._code

        def trailing_metadata(self):
            return self._trailers

    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _retryable(Failure(grpc.StatusCode.UNAVAILABLE))
    assert _retryable(Failure(exhausted, (("netvlad-busy", "queue-full"),)))
    assert not _retryable(Failure(exhausted))  # an oversized message: retrying cannot help
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED,
                 grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAUTHENTICATED):
        assert not _retryable(Failure(code, (("netvlad-busy", "queue-full"),)))


def test_a_failing_model_call_fails_only_its_batch_with_internal(tiny_model, network):
    model = InstrumentedModel(tiny_model, fail_height=40)
    with ServerThread(tiny_config(free_port()), model.loader) as running:
        channel, stub = open_stub(running)
        with channel:
            good_image = picture(32, 32)
            bad = stub.DescribeImages.future(pb.DescribeImagesRequest(
                images=[raw(picture(40, 40))]), timeout=TIMEOUT)
            good = stub.DescribeImages.future(pb.DescribeImagesRequest(
                images=[raw(good_image)]), timeout=TIMEOUT)
            error = rpc_error(bad.result)
            assert error.code() == grpc.StatusCode.INTERNAL
            assert "test model refuses height 40" in error.details()
            np.testing.assert_allclose(rows(good.result()), network(good_image), atol=1e-6)
            again = stub.DescribeImages(pb.DescribeImagesRequest(images=[raw(good_image)]),
                                        timeout=TIMEOUT)
            np.testing.assert_allclose(rows(again), network(good_image), atol=1e-6)


def test_health_is_serving_only_after_loading(tiny_model):
    release = threading.Event()

    def slow_loader(_config):
        assert release.wait(TIMEOUT)
        return tiny_model

    with ServerThread(tiny_config(free_port()), slow_loader, load=False) as running:
        channel, stub = open_stub(running)
        with channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status(service: str) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=service),
                                    timeout=TIMEOUT).status

            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            assert status("") == not_serving and status(SERVICE_NAME) == not_serving
            assert rpc_error(health.Check, health_pb2.HealthCheckRequest(service="nope"),
                             timeout=TIMEOUT).code() == grpc.StatusCode.NOT_FOUND
            refused = rpc_error(stub.DescribeImages,
                                pb.DescribeImagesRequest(images=[raw(picture())]), timeout=TIMEOUT)
            assert refused.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in refused.details()
            assert rpc_error(stub.GetModelInfo, pb.GetModelInfoRequest(),
                             timeout=TIMEOUT).code() == grpc.StatusCode.UNAVAILABLE
            loading = threading.Thread(target=running.load)
            loading.start()
            time.sleep(0.2)
            assert status(SERVICE_NAME) == not_serving  # the loader is still blocked
            release.set()
            loading.join(TIMEOUT)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert status("") == serving and status(SERVICE_NAME) == serving
            assert len(stub.DescribeImages(pb.DescribeImagesRequest(images=[raw(picture())]),
                                           timeout=TIMEOUT).descriptors) == 1


def test_reflection_lists_and_describes_the_service(server):
    with grpc.insecure_channel(server.target) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)]
        listed, described = list(reflection.ServerReflectionInfo(iter(requests), timeout=TIMEOUT))
    names = {service.name for service in listed.list_services_response.service}
    assert {"netvlad.v1.DescriptorService", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(raw_file) for raw_file in
             described.file_descriptor_response.file_descriptor_proto]
    methods = {m.name for f in files for s in f.service for m in s.method}
    assert {"DescribeImages", "StreamDescribeImages", "GetModelInfo"} <= methods


def test_metrics_parse_and_carry_every_documented_name(server, stub):
    stub.DescribeImages(pb.DescribeImagesRequest(images=[raw(picture())]), timeout=TIMEOUT)
    samples = metric_samples(server)
    for name in ("netvlad_requests_total", "netvlad_images_total", "netvlad_batch_size_bucket",
                 "netvlad_queue_wait_seconds_bucket", "netvlad_inference_seconds_bucket",
                 "netvlad_request_duration_seconds_bucket", "netvlad_queue_depth",
                 "netvlad_model_info"):
        assert name in samples, f"{name} missing from /metrics"
    info = samples["netvlad_model_info"][0].labels
    assert info["output_dims"] == "32" and info["precision"] == "float32"
    assert info["format"] == "demo" and info["demo"] == "true" and info["model"]
    ok = [s for s in samples["netvlad_requests_total"]
          if s.labels == {"method": "DescribeImages", "code": "OK"}]
    assert ok and ok[0].value >= 1
    assert samples["netvlad_images_total"][0].value >= 1
    les = [s.labels["le"] for s in samples["netvlad_batch_size_bucket"]]
    assert les == [f"{float(n)}" for n in range(1, 9)] + ["+Inf"]


def test_streaming_answers_in_order_and_a_bad_frame_in_stream(stub, network):
    frames = [picture(32, 40) for _ in range(5)]
    requests = [pb.StreamDescribeImagesRequest(sequence=100 + i, request=pb.DescribeImagesRequest(
        images=[raw(frame, f"f{i}")])) for i, frame in enumerate(frames)]
    requests[2] = pb.StreamDescribeImagesRequest(sequence=102, request=pb.DescribeImagesRequest(
        images=[pb.Image(id="broken", encoded=b"not an image")]))
    answers = list(stub.StreamDescribeImages(iter(requests), timeout=TIMEOUT))
    assert [a.sequence for a in answers] == [100, 101, 102, 103, 104]
    assert answers[2].WhichOneof("outcome") == "error"
    assert answers[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "image 0 (id 'broken')" in answers[2].error.message
    for i in (0, 1, 3, 4):
        assert answers[i].response.descriptors[0].id == f"f{i}"
        np.testing.assert_allclose(rows(answers[i].response), network(frames[i]), atol=1e-6)
    many = [pb.StreamDescribeImagesRequest(sequence=i, request=pb.DescribeImagesRequest(
        images=[raw(frames[i % 5])])) for i in range(40)]  # more than --max-stream-inflight
    answers = list(stub.StreamDescribeImages(iter(many), timeout=TIMEOUT))
    assert [a.sequence for a in answers] == list(range(40))
    assert all(a.WhichOneof("outcome") == "response" for a in answers)


def test_a_stream_ends_unavailable_on_shutdown_after_answering_what_it_read(tiny_model):
    more = threading.Event()

    def frames():
        for i in range(2):
            yield pb.StreamDescribeImagesRequest(sequence=i + 1, request=pb.DescribeImagesRequest(
                images=[raw(picture(16, 16))]))
        more.wait(TIMEOUT)

    running = ServerThread(tiny_config(free_port()), lambda _config: tiny_model)
    with running:
        channel, stub = open_stub(running)
        answers = stub.StreamDescribeImages(frames(), timeout=TIMEOUT)
        got = [next(answers).sequence, next(answers).sequence]
        stopper = threading.Thread(target=running.run, args=(running.server.stop(grace=5.0),))
        stopper.start()
        error = rpc_error(next, answers)
        stopper.join(TIMEOUT)
        more.set()
        channel.close()
    assert got == [1, 2]
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()


def test_get_model_info_describes_model_and_limits(stub, server):
    import tensorflow as tf

    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
    config = server.config
    assert (info.output_dims, info.num_clusters, info.cluster_dim) == (32, 4, 8)
    assert info.demo_weights and info.weight_format == "demo" and info.model_name
    assert info.precision == "float32" and not info.xla and info.device == "/CPU:0"
    assert info.tensorflow_version == tf.__version__ and info.server_version
    limits = info.batching
    assert (limits.max_batch_size, limits.max_queue_size, limits.max_images_per_request) == (
        config.max_batch_size, config.max_queue_size, config.max_images_per_request)
    assert limits.max_queue_delay_ms == config.max_queue_delay_ms
    assert (limits.max_image_pixels, limits.min_image_side, limits.max_message_bytes) == (
        config.max_image_pixels, config.min_image_side, config.max_message_bytes)
    assert info.default_resize.mode == pb.RESIZE_MODE_KEEP


def test_hand_encoded_responses_equal_the_protobuf_library_bytes():
    values = RNG.standard_normal((3, 300)).astype(np.float32)
    ids = ["", "x" * 200, "ünïcode"]
    expected = pb.DescribeImagesResponse(dims=300, descriptors=[
        pb.Descriptor(id=i, values=v.tolist()) for i, v in zip(ids, values, strict=True)])
    body = encode_describe_response(ids, list(values), 300)
    assert body == expected.SerializeToString()
    for sequence in (0, 1, 2**40):
        framed = pb.StreamDescribeImagesResponse(sequence=sequence, response=expected)
        assert encode_stream_response(sequence, body) == framed.SerializeToString()


def test_sigterm_drains_admitted_requests_and_exits_zero(tmp_path, network):
    log = tmp_path / "server.log"
    server = ServerProcess(free_port(), free_port(), log, "--warmup-sizes", "",
                           "--max-batch-size", "4", "--max-queue-delay-ms", "20",
                           "--max-queue-size", "256", "--max-images-per-request", "8")
    process, metrics_port = server.process, server.metrics_port
    try:
        server.wait_serving()
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.DescriptorServiceStub(channel)
            batches = [[picture(384, 384) for _ in range(8)] for _ in range(12)]
            futures = [stub.DescribeImages.future(pb.DescribeImagesRequest(
                images=[raw(image) for image in batch]), timeout=120) for batch in batches]

            def started() -> bool:
                url = f"http://127.0.0.1:{metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as page:
                    return "netvlad_batch_size_count 0.0" not in page.read().decode()

            wait_for(started, what="the first batch to run")
            process.send_signal(signal.SIGTERM)
            answers = [future.result() for future in futures]  # every admitted request finishes
            assert process.wait(60) == 0, log.read_text()
            for batch, answer in zip(batches, answers, strict=True):
                np.testing.assert_allclose(rows(answer), network(np.stack(batch)), atol=1e-6)
            late = rpc_error(stub.DescribeImages, pb.DescribeImagesRequest(
                images=[raw(picture())]), timeout=5)
            assert late.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "draining" in text and "stopped" in text


def test_a_second_server_on_a_busy_port_fails_instead_of_sharing_it(tiny_model):
    # gRPC's default SO_REUSEPORT would let both listen and split the callers between them.
    import subprocess
    import sys

    with ServerThread(tiny_config(0), lambda _config: tiny_model) as running:
        port = running.target.rsplit(":", 1)[1]
        second = subprocess.run(
            [sys.executable, "-m", "netvlad_server", "--model", "demo-tiny", "--host",
             "127.0.0.1", "--port", port, "--metrics-port", "0"],
            capture_output=True, text=True, timeout=120)
    assert second.returncode == 1, second.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
    assert "is the port in use?" in second.stderr
