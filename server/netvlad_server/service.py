"""The gRPC DescriptorService: check requests, decode images in threads, queue them, answer.

Knows nothing of TensorFlow: the model arrives as a `LoadedModel` (a forward callable, a truncation
callable and a description) built by main. Each request's images are decoded in a thread pool,
queued together in the dynamic batcher, and the caller gets exactly its own rows, encoded straight
into the wire format (the float rows are copied once, no per-value Python objects).

Each request's `priority` picks the batcher's class its images queue in: interactive ahead of
bulk, each with its own queue budget (see batching.py for the scheduling guarantee).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from importlib import metadata

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client._proto import netvlad_pb2_grpc as pb_grpc
from netvlad_client.retry import BUSY_TRAILER

from netvlad_server.batching import (
    BatcherClosedError,
    BatchFailedError,
    BatchingPolicy,
    DeadlineExpiredError,
    DynamicBatcher,
    PriorityClass,
    QueueFullError,
    Steps,
)
from netvlad_server.config import PRIORITIES, ServerConfig
from netvlad_server.images import ImageError, ImageLimits, image_label, prepare_encoded, prepare_raw
from netvlad_server.metrics import ServerMetrics

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DescriptorService"].full_name
_ERRORS_SHOWN = 10  # image errors quoted in one INVALID_ARGUMENT message
_PENDING = np.empty((0, 0, 0), np.uint8)  # placeholder until a thread-pool decode finishes
_LOADING = "the model is still loading; retry when the gRPC health service reports SERVING"
log = logging.getLogger(__name__)

BatchItem = tuple[np.ndarray, int]  # (image [H, W, C] uint8, dims wanted; 0 = all)
PRIORITY_CLASSES = {pb.PRIORITY_INTERACTIVE: "interactive", pb.PRIORITY_BULK: "bulk"}
CLASS_PRIORITIES = {name: value for value, name in PRIORITY_CLASSES.items()}
assert tuple(PRIORITY_CLASSES.values()) == PRIORITIES  # the wire enum and the flag's choices


# After an interactive batch, how long bulk waits for the same caller's next request: its answer
# going out, the next request coming in and being decoded take a few ms (docs/PRIORITY.md).
INTERACTIVE_LINGER_SECONDS = 0.01


def batching_policy(config: ServerConfig) -> BatchingPolicy:
    """The batcher's policy: the configured limits, interactive ahead of bulk."""
    return BatchingPolicy(
        max_batch_size=config.max_batch_size, max_queue_delay=config.max_queue_delay_ms / 1000.0,
        max_queue_size=config.max_queue_size,
        classes=(PriorityClass("interactive", config.max_queue_size),
                 PriorityClass("bulk", config.bulk_queue_size)),
        mixed_batch_size=config.bulk_batch_size_mixed, linger=INTERACTIVE_LINGER_SECONDS)


@dataclass(frozen=True)
class ModelDescription:
    """What GetModelInfo and the metrics say about the loaded model."""

    model_name: str
    weight_source: str
    weight_format: str
    demo: bool
    output_dims: int
    num_clusters: int
    cluster_dim: int
    precision: str
    xla: bool
    device: str
    tensorflow_version: str
    weights_sha256: str = ""  # weights_fingerprint of the tensors; place indexes record it


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve: forward([B,H,W,C]) -> float32 [B, output_dims] and truncation."""

    forward: Callable[[np.ndarray], np.ndarray]
    truncate: Callable[[np.ndarray, int], np.ndarray]  # (rows [N, D], n) -> first n, renormalised
    description: ModelDescription
    # forward in two stages, (images [B,H,W,C] -> pooled [B, F], pooled [B, F] -> [B, output_dims]):
    # the first runs a few images at a time, the second once per batch (make_stepped_runner).
    stages: tuple[Callable[[np.ndarray], np.ndarray],
                  Callable[[np.ndarray], np.ndarray]] | None = None


class RequestError(Exception):
    """A request answered with a non-OK gRPC status and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers


def _stack(items: Sequence[BatchItem]) -> np.ndarray:
    """The items' images as one [B, H, W, C] array."""
    return items[0][0][np.newaxis] if len(items) == 1 else np.stack([image for image, _ in items])


def _rows(model: LoadedModel, items: Sequence[BatchItem], out: np.ndarray) -> list[np.ndarray]:
    """Each item's descriptor from the batch's [B, output_dims] output, truncated as it asked."""
    full = model.description.output_dims
    out = np.asarray(out, dtype=np.float32)
    if out.shape != (len(items), full):
        raise ValueError(f"the model returned shape {out.shape} for {len(items)} images; "
                         f"expected ({len(items)}, {full})")
    rows = list(out)
    for dims in {dims for _, dims in items if 0 < dims < full}:
        chosen = [i for i, (_, wanted) in enumerate(items) if wanted == dims]
        for i, row in zip(chosen, model.truncate(out[chosen], dims), strict=True):
            rows[i] = row
    return rows


def make_batch_runner(model: LoadedModel) -> Callable[[list[BatchItem]], list[np.ndarray]]:
    """The batcher's `run`: stack a batch once, one forward call, rows truncated per request."""
    return lambda items: _rows(model, items, model.forward(_stack(items)))


def make_stepped_runner(
    model: LoadedModel,
) -> Callable[[list[BatchItem], int], Steps[np.ndarray]] | None:
    """The batcher's `run_in_steps` (None when the model has no stages).

    Each step runs the first stage on up to `step` images; the last step also runs the second
    stage once on the whole batch, so a batch costs the second stage once however it is cut.
    """
    if model.stages is None:
        return None
    first, second = model.stages

    def run(items: list[BatchItem], step: int) -> Steps[np.ndarray]:
        pooled = []
        for start in range(0, len(items), step):
            if start:
                yield  # a pause point between two steps
            pooled.append(first(_stack(items[start:start + step])))
        return _rows(model, items, second(np.concatenate(pooled)))

    return run


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint encoding of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_describe_response(ids: Sequence[str], rows: Sequence[np.ndarray], dims: int) -> bytes:
    """Serialise a DescribeImagesResponse directly (same bytes as the protobuf library produces)."""
    parts = []
    for image_id, row in zip(ids, rows, strict=True):
        values = _field(2, np.asarray(row, dtype="<f4").tobytes())  # packed repeated float
        parts.append(_field(1, _field(1, image_id.encode()) + values if image_id else values))
    if dims:
        parts.append(b"\x10" + _varint(dims))
    return b"".join(parts)


def encode_stream_response(sequence: int, response: bytes) -> bytes:
    """Serialise a StreamDescribeImagesResponse around an already serialised response."""
    head = b"\x08" + _varint(sequence) if sequence else b""
    return head + _field(2, response)


class MalformedMessage:
    """A request message that failed to parse; its handler answers INVALID_ARGUMENT."""

    sequence = 0  # read where a stream frame's sequence number would be

    def __init__(self, type_name: str, error: DecodeError) -> None:
        self.error = RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the message is not a valid {type_name} ({error}); send one serialised from "
            "netvlad/v1/netvlad.proto, with string fields in UTF-8")

    @property
    def request(self) -> MalformedMessage:
        """Stands for the DescribeImagesRequest a stream frame would hold."""
        return self


def message_parser(message_type: type[Message]) -> Callable[[bytes], Message | MalformedMessage]:
    """A request deserializer that turns parse failures into a MalformedMessage, not UNKNOWN."""
    type_name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | MalformedMessage:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return MalformedMessage(type_name, exc)

    return parse


def serialize_message(message: Message | bytes) -> bytes:
    """Response serializer accepting pre-encoded bytes as well as protobuf messages."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_descriptor_service(servicer: DescriptorService, server: grpc.aio.Server) -> None:
    """Register the servicer with a serializer that passes pre-encoded responses through."""
    handlers = {
        "DescribeImages": grpc.unary_unary_rpc_method_handler(
            servicer.DescribeImages, request_deserializer=message_parser(pb.DescribeImagesRequest),
            response_serializer=serialize_message),
        "StreamDescribeImages": grpc.stream_stream_rpc_method_handler(
            servicer.StreamDescribeImages,
            request_deserializer=message_parser(pb.StreamDescribeImagesRequest),
            response_serializer=serialize_message),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=message_parser(pb.GetModelInfoRequest),
            response_serializer=serialize_message),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # faster dispatch, as generated


def server_version() -> str:
    """The installed netvlad-service version."""
    try:
        return metadata.version("netvlad-service")
    except metadata.PackageNotFoundError:
        return "unknown"


def _cancel_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why gRPC cancelled a handler: its deadline passed, or the caller went away."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class DescriptorService(pb_grpc.DescriptorServiceServicer):
    """The DescriptorService methods; answers UNAVAILABLE until `attach` hands it a model."""

    def __init__(self, config: ServerConfig, metrics: ServerMetrics, decode_pool: Executor) -> None:
        self._config = config
        self._metrics = metrics
        self._pool = decode_pool
        self._limits = ImageLimits(config.max_image_pixels, config.min_image_side)
        self._model: LoadedModel | None = None
        self._batcher: DynamicBatcher[BatchItem, np.ndarray] | None = None
        self._info: pb.ModelInfo | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._shutting_down = False

    def attach(self, model: LoadedModel, batcher: DynamicBatcher[BatchItem, np.ndarray]) -> None:
        """Start serving `model` through `batcher` (already started, with batching_policy)."""
        self._model = model
        self._batcher = batcher
        self._info = self._model_info(model.description)
        self._metrics.set_queue_limits({cls.name: cls.max_queue_size
                                        for cls in batcher.policy.priority_classes})

    def _class_label(self, request: pb.DescribeImagesRequest | MalformedMessage) -> str:
        """The class a request is counted under: its own, else the configured default."""
        priority = getattr(request, "priority", pb.PRIORITY_UNSPECIFIED)
        return PRIORITY_CLASSES.get(priority, self._config.default_priority)

    def begin_shutdown(self) -> None:
        """Stop reading new stream frames; streams answer what they hold, then end UNAVAILABLE."""
        self._shutting_down = True
        for reader in list(self._readers):
            reader.cancel()

    async def DescribeImages(self, request: pb.DescribeImagesRequest,
                             context: grpc.aio.ServicerContext) -> bytes:
        """Describe the request's images; one descriptor per image, in request order."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await self._guarded(request, context.time_remaining())
        except RequestError as exc:
            code = exc.code
            await context.abort(exc.code, exc.message, exc.trailers)
        except asyncio.CancelledError:
            code = _cancel_code(context)
            raise
        finally:
            self._metrics.request_done("DescribeImages", code, time.perf_counter() - start,
                                       self._class_label(request))

    async def StreamDescribeImages(
        self, request_iterator: AsyncIterator[pb.StreamDescribeImagesRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        """Answer each frame in order; a bad frame gets an error Status and the stream goes on."""
        window = asyncio.Semaphore(self._config.max_stream_inflight)
        answers: asyncio.Queue[asyncio.Future[bytes] | None] = asyncio.Queue()
        reader = asyncio.ensure_future(
            self._read_frames(request_iterator, context, window, answers))
        reader.add_done_callback(lambda _reader: answers.put_nowait(None))  # however it ends
        self._readers.add(reader)
        if self._shutting_down:
            reader.cancel()
        try:
            while (answer := await answers.get()) is not None:
                try:
                    body = await answer
                finally:
                    window.release()
                yield body
            if reader.cancelled():
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "the server is shutting down; frames after the last answered "
                                    "sequence number were not read, send them again elsewhere")
            reader.result()  # surfaces a failure to read the stream
        finally:
            self._readers.discard(reader)
            reader.cancel()
            while not answers.empty():
                pending = answers.get_nowait()
                if pending is not None:
                    pending.cancel()

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        """The loaded model, its precision and the batching limits."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if isinstance(request, MalformedMessage):
                code = request.error.code
                await context.abort(code, request.error.message)
            if self._info is None:
                code = grpc.StatusCode.UNAVAILABLE
                await context.abort(code, _LOADING)
            return self._info
        finally:
            self._metrics.request_done("GetModelInfo", code, time.perf_counter() - start)

    async def _read_frames(
        self, request_iterator: AsyncIterator[pb.StreamDescribeImagesRequest],
        context: grpc.aio.ServicerContext, window: asyncio.Semaphore,
        answers: asyncio.Queue[asyncio.Future[bytes] | None],
    ) -> None:
        """Read frames while fewer than max_stream_inflight are unanswered; start each one."""
        iterator = aiter(request_iterator)
        while True:
            await window.acquire()
            try:
                message = await anext(iterator)
            except StopAsyncIteration:
                return
            answers.put_nowait(asyncio.ensure_future(self._frame(message, context)))

    async def _frame(self, message: pb.StreamDescribeImagesRequest,
                     context: grpc.aio.ServicerContext) -> bytes:
        """One stream frame: the encoded response, or an encoded error Status for this frame."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            body = await self._guarded(message.request, context.time_remaining())
            return encode_stream_response(message.sequence, body)
        except RequestError as exc:
            code = exc.code
            error = pb.Status(code=exc.code.value[0], message=exc.message)
            return pb.StreamDescribeImagesResponse(sequence=message.sequence,
                                                   error=error).SerializeToString()
        except asyncio.CancelledError:
            code = _cancel_code(context)
            raise
        finally:
            self._metrics.request_done("StreamDescribeImages", code, time.perf_counter() - start,
                                       self._class_label(message.request))

    async def describe_rows(self, request: pb.DescribeImagesRequest,
                            timeout: float | None) -> np.ndarray:
        """(N, dims) float32 rows of a request's images through DescribeImages' checks, queue
        and batcher (the place index describes its images here); raises RequestError."""
        response = pb.DescribeImagesResponse.FromString(await self._guarded(request, timeout))
        return np.array([d.values for d in response.descriptors], dtype=np.float32)

    async def _guarded(self, request: pb.DescribeImagesRequest, timeout: float | None) -> bytes:
        """_describe with unexpected failures logged and turned into INTERNAL."""
        try:
            return await self._describe(request, timeout)
        except (RequestError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("unexpected failure while describing a request")
            raise RequestError(grpc.StatusCode.INTERNAL,
                               f"internal server error: {type(exc).__name__}: {exc}") from exc

    async def _describe(self, request: pb.DescribeImagesRequest, timeout: float | None) -> bytes:
        """Check, decode, queue and await one request's images; the encoded response."""
        if isinstance(request, MalformedMessage):
            raise request.error
        model, batcher = self._model, self._batcher
        if model is None or batcher is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, _LOADING)
        dims, longest_side = self._check_request(request, model.description.output_dims)
        priority = self._class_label(request)
        images = await self._decode_all(request.images, longest_side)
        try:
            futures = batcher.submit([(image.shape, (image, dims)) for image in images], timeout,
                                     priority)
        except QueueFullError as exc:
            flag = ("--max-bulk-queue-size" if priority == "bulk" and
                    self._config.max_bulk_queue_size else "--max-queue-size")
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {exc} ({flag})",
                               (BUSY_TRAILER,)) from None
        except BatcherClosedError:
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               "the server is shutting down; retry on another replica") from None
        try:
            rows = await asyncio.gather(*futures)
        except DeadlineExpiredError as exc:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
        except BatchFailedError as exc:
            log.error("model call failed for a batch holding %d image(s) of shape %s: %s",
                      len(images), images[0].shape, exc, exc_info=exc.__cause__)
            raise RequestError(grpc.StatusCode.INTERNAL,
                               f"the model failed on the batch holding this request's images: "
                               f"{exc}") from None
        finally:
            for future in futures:
                future.cancel()  # frees queue places when leaving early; no-op on finished ones
        self._metrics.images.inc(len(images))
        return encode_describe_response([image.id for image in request.images], rows, dims)

    def _check_request(
        self, request: pb.DescribeImagesRequest, output_dims: int
    ) -> tuple[int, int]:
        """Validate counts, dims and resize policy; return (dims, longest side or 0 to keep)."""
        config = self._config
        count = len(request.images)
        if count == 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "the request holds no images; add at least one to images")
        if count > config.max_images_per_request:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request holds {count} images; the limit is {config.max_images_per_request} "
                "per request (--max-images-per-request); split it into smaller requests")
        if request.dims > output_dims:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"dims {request.dims} exceeds the model's {output_dims} output values; ask for "
                f"at most {output_dims} (0 means all)")
        if request.priority != pb.PRIORITY_UNSPECIFIED and request.priority not in PRIORITY_CLASSES:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown priority {request.priority}; use PRIORITY_INTERACTIVE "
                f"({pb.PRIORITY_INTERACTIVE}) or PRIORITY_BULK ({pb.PRIORITY_BULK}), or leave it "
                f"unset for the server's default ({self._config.default_priority})")
        dims = request.dims or output_dims
        mode = request.resize.mode
        if mode == pb.RESIZE_MODE_UNSPECIFIED:
            return dims, config.resize.longest_side
        if mode == pb.RESIZE_MODE_KEEP:
            return dims, 0
        if mode != pb.RESIZE_MODE_FIT_LONGEST_SIDE:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"unknown resize mode {mode}; use KEEP or FIT_LONGEST_SIDE")
        side = request.resize.longest_side
        if side < config.min_image_side or side * side > config.max_image_pixels:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"resize longest_side {side} is out of range: it must be at least "
                f"{config.min_image_side} and its square at most {config.max_image_pixels} pixels")
        return dims, side

    async def _decode_all(self, images: Sequence[pb.Image], longest_side: int) -> list[np.ndarray]:
        """Decode every image (encoded ones in the thread pool, in parallel); all errors at once."""
        loop = asyncio.get_running_loop()
        results: list[np.ndarray | BaseException] = []
        pending: list[tuple[int, asyncio.Future[np.ndarray]]] = []
        limits = self._limits
        for index, image in enumerate(images):
            label = image_label(index, image.id)
            source = image.WhichOneof("source")
            if source == "encoded":
                results.append(_PENDING)
                pending.append((index, loop.run_in_executor(
                    self._pool, prepare_encoded, image.encoded, longest_side, limits, label)))
            elif source == "raw" and longest_side:
                raw = image.raw
                results.append(_PENDING)
                pending.append((index, loop.run_in_executor(
                    self._pool, prepare_raw, raw.data, raw.height, raw.width, raw.channels,
                    longest_side, limits, label)))
            elif source == "raw":  # a zero-copy view and a few checks: cheaper than a thread hop
                raw = image.raw
                try:
                    results.append(prepare_raw(raw.data, raw.height, raw.width, raw.channels, 0,
                                               limits, label))
                except ImageError as exc:
                    results.append(exc)
            else:
                results.append(ImageError(label, "missing_source",
                                          "holds neither encoded bytes nor raw pixels; set "
                                          "Image.encoded or Image.raw"))
        if pending:
            decoded = await asyncio.gather(*(future for _, future in pending),
                                           return_exceptions=True)
            for (index, _), result in zip(pending, decoded, strict=True):
                results[index] = result
        errors = [result for result in results if isinstance(result, BaseException)]
        if not errors:
            return results  # type: ignore[return-value]
        for error in errors:
            if not isinstance(error, ImageError):
                raise error
        for error in errors:
            self._metrics.image_refused(error.reason)
        shown = "; ".join(str(error) for error in errors[:_ERRORS_SHOWN])
        more = f"; and {len(errors) - _ERRORS_SHOWN} more" if len(errors) > _ERRORS_SHOWN else ""
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, shown + more)

    def _model_info(self, d: ModelDescription) -> pb.ModelInfo:
        """The GetModelInfo answer for a model under this configuration."""
        config = self._config
        resize = (pb.ResizePolicy(mode=pb.RESIZE_MODE_KEEP) if config.resize.keep else
                  pb.ResizePolicy(mode=pb.RESIZE_MODE_FIT_LONGEST_SIDE,
                                  longest_side=config.resize.longest_side))
        batching = pb.BatchingLimits(
            max_batch_size=config.max_batch_size, max_queue_delay_ms=config.max_queue_delay_ms,
            max_queue_size=config.max_queue_size,
            max_images_per_request=config.max_images_per_request,
            max_image_pixels=config.max_image_pixels, min_image_side=config.min_image_side,
            max_message_bytes=config.max_message_bytes,
            max_bulk_queue_size=config.bulk_queue_size)
        return pb.ModelInfo(
            model_name=d.model_name, weight_source=d.weight_source, weight_format=d.weight_format,
            demo_weights=d.demo, output_dims=d.output_dims, num_clusters=d.num_clusters,
            cluster_dim=d.cluster_dim, precision=d.precision, xla=d.xla, batching=batching,
            default_resize=resize, server_version=server_version(),
            tensorflow_version=d.tensorflow_version, device=d.device,
            default_priority=CLASS_PRIORITIES[config.default_priority])
