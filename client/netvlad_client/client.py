"""Thin gRPC client for the NetVLAD descriptor service (sync and asyncio); no TensorFlow.

Images go over the wire as encoded files (paths, bytes) or raw uint8 pixel buffers (numpy
arrays); descriptors come back as one `(N, D)` float32 array in input order.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from netvlad_client._proto import netvlad_pb2, netvlad_pb2_grpc

ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray
PemInput = str | os.PathLike[str] | bytes | None

DEFAULT_TIMEOUT = 120.0
DEFAULT_RETRIES = 4
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Room left in a request for ids and protobuf framing when packing images up to the byte limit.
_REQUEST_OVERHEAD_BYTES = 4096
_PER_IMAGE_OVERHEAD_BYTES = 64
_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
# The server names a refused image by its position in the request: "image 3 (id '...'): ...".
_REFUSED_IMAGE = re.compile(r"(?:^|; )image (\d+)\b")
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:]+)):(?P<port>\d+)$")


class NetVLADError(Exception):
    """Base of every error this package raises; `code` is the gRPC status when there is one."""

    code: grpc.StatusCode | None = None
    details: str = ""


class NetVLADInputError(NetVLADError, ValueError):
    """An image or option was unusable before anything was sent (missing file, bad array...)."""


class NetVLADRPCError(NetVLADError):
    """The server (or the channel) answered a call with a non-OK gRPC status."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str, target: str = ""):
        self.method = method
        self.code = code
        self.details = details or ""
        self.target = target
        self.images: list[str] = []  # the caller's names of the images the server refused
        where = f" ({target})" if target else ""
        super().__init__(f"{method}{where}: {code.name}: {self.details}")


class NetVLADUnavailableError(NetVLADRPCError):
    """The server could not be reached (UNAVAILABLE), even after the configured retries."""

    def __init__(self, method: str, details: str, target: str, attempts: int):
        self.attempts = attempts
        super().__init__(method, grpc.StatusCode.UNAVAILABLE, details, target)
        self.args = (
            f"server at {target} unavailable after {attempts} attempt(s) ({method}): {details}",
        )


@dataclass(frozen=True)
class StreamResult:
    """One frame's answer from `describe_stream`: a descriptor, or the error for that frame."""

    sequence: int
    id: str
    descriptor: np.ndarray | None
    error: NetVLADRPCError | None

    @property
    def ok(self) -> bool:
        """True when the frame was described."""
        return self.error is None


@dataclass(frozen=True)
class ClientConfig:
    """Everything a client needs to open a channel and make calls; shared by sync and async."""

    target: str
    timeout: float | None = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    backoff: float = 0.2
    max_backoff: float = 5.0
    tls: bool = False
    root_certificates: bytes | None = None
    client_certificate: bytes | None = None
    client_key: bytes | None = field(default=None, repr=False)  # secrets stay out of logs
    server_name: str | None = None
    token: str | None = field(default=None, repr=False)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    dims: int | None = None
    resize: str | int | None = None

    @classmethod
    def build(
        cls,
        target: str | Sequence[str],
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        tls: bool = False,
        root_certificates: PemInput = None,
        client_certificate: PemInput = None,
        client_key: PemInput = None,
        server_name: str | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        dims: int | None = None,
        resize: str | int | None = None,
    ) -> ClientConfig:
        """Validate the user's options and read the PEM files once."""
        if (client_certificate is None) != (client_key is None):
            raise NetVLADInputError(
                "mutual TLS needs both a client certificate and its private key; got only the "
                + ("certificate" if client_key is None else "key")
            )
        if retries < 0:
            raise NetVLADInputError(f"retries must be >= 0, got {retries}")
        if timeout is not None and timeout <= 0:
            raise NetVLADInputError(f"timeout must be positive seconds (or None), got {timeout}")
        if token is not None and (not token.strip() or "\n" in token.strip()):
            raise NetVLADInputError("the bearer token must be one non-empty line")
        if token is not None and not all(" " <= c <= "~" for c in token.strip()):
            raise NetVLADInputError("the bearer token must be printable ASCII (gRPC metadata "
                                    "carries no other characters)")
        _check_dims(dims)
        resize_policy(resize)
        secure = bool(tls or root_certificates or client_certificate or server_name)
        return cls(
            target=resolve_target(target),
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            tls=secure,
            root_certificates=_read_pem(root_certificates, "TLS root CA"),
            client_certificate=_read_pem(client_certificate, "client certificate"),
            client_key=_read_pem(client_key, "client key"),
            server_name=server_name,
            token=token.strip() if token else None,
            max_message_bytes=max_message_bytes,
            dims=dims,
            resize=resize,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """gRPC channel arguments: round-robin, message limits, reconnect pace, TLS name."""
        from netvlad_client import __version__

        options: list[tuple[str, Any]] = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # Reconnect at the pace of our own retries, so a server that comes up late is found.
            ("grpc.initial_reconnect_backoff_ms", max(1, int(self.backoff * 1000))),
            ("grpc.min_reconnect_backoff_ms", max(1, int(self.backoff * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(self.max_backoff * 1000))),
            ("grpc.primary_user_agent", f"netvlad-client/{__version__}"),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS channel credentials, or None for a plaintext channel."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.client_key,
            certificate_chain=self.client_certificate,
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the bearer token when one is configured."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def retry_delays(self) -> Iterator[float]:
        """Exponential backoff with jitter: backoff, 2*backoff, ... capped at max_backoff."""
        for attempt in range(self.retries):
            delay = min(self.max_backoff, self.backoff * (2**attempt))
            yield delay * random.uniform(0.5, 1.0)


def resolve_target(target: str | Sequence[str]) -> str:
    """Turn "host:port", "a:p,b:p", a list of addresses or a gRPC URI into one gRPC target.

    Several addresses become gRPC's multi-address `ipv4:`/`ipv6:` target (IP literals only);
    the channel's round_robin policy then spreads calls over all of them. For host names, use
    one DNS name resolving to every server: `dns:///name:port`.
    """
    if isinstance(target, str):
        target = target.strip()
        if target.startswith(_TARGET_SCHEMES):
            return target
        addresses = [part.strip() for part in target.split(",") if part.strip()]
    else:
        addresses = [str(part).strip() for part in target]
    if not addresses:
        raise NetVLADInputError("no server address given (expected HOST:PORT)")
    if len(addresses) == 1:
        if not _HOST_PORT.match(addresses[0]):  # gRPC would silently dial port 443
            raise NetVLADInputError(
                f"server address {addresses[0]!r} has no port; expected HOST:PORT, e.g. "
                f"{addresses[0].rstrip(':') or 'localhost'}:50051, or [IPv6]:PORT"
            )
        return addresses[0]
    families = set()
    for address in addresses:
        match = _HOST_PORT.match(address)
        host = match and (match["v6"] or match["host"])
        try:
            families.add(ipaddress.ip_address(host).version if host else None)
        except ValueError:
            families.add(None)
    if None in families or len(families) != 1:
        raise NetVLADInputError(
            f"several addresses must all be IPv4 or all IPv6 literals with ports "
            f"(e.g. 10.0.0.1:50051,10.0.0.2:50051); got {addresses}. For host names use one DNS "
            "name that resolves to every server: dns:///name:port"
        )
    return f"ipv{families.pop()}:" + ",".join(addresses)


def _read_pem(value: PemInput, what: str) -> bytes | None:
    """PEM bytes from bytes, PEM text or a file path; a clear error for a missing file."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    path = Path(value)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise NetVLADInputError(f"cannot read the {what} file {path}: {exc.strerror}") from None


def _check_dims(dims: int | None) -> None:
    """Reject a non-positive output length before any call."""
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise NetVLADInputError(f"dims must be a positive integer (or None for all), got {dims!r}")


def resize_policy(resize: str | int | None) -> netvlad_pb2.ResizePolicy | None:
    """None (the server's default), "keep", or N / "fit:N" (fit the longest side to N px)."""
    if resize is None:
        return None
    text = str(resize).strip().lower()
    if text == "keep":
        return netvlad_pb2.ResizePolicy(mode=netvlad_pb2.RESIZE_MODE_KEEP)
    text = text.removeprefix("fit:")
    if isinstance(resize, bool) or not text.isdigit() or int(text) < 1:
        raise NetVLADInputError(
            f"resize must be 'keep', or N or 'fit:N' to fit the longest side to N pixels; "
            f"got {resize!r}"
        )
    return netvlad_pb2.ResizePolicy(
        mode=netvlad_pb2.RESIZE_MODE_FIT_LONGEST_SIDE, longest_side=int(text)
    )


def _as_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """A single image (path, bytes, 2-D/3-D array) or a batch (list, 4-D array) as a list."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)):
        return [images]
    if isinstance(images, np.ndarray):
        return [images] if images.ndim in (2, 3) else list(images)
    return list(images)


def _image_size(image: ImageInput) -> int:
    """Bytes the image will take on the wire, found without reading files."""
    if isinstance(image, np.ndarray):
        return int(image.size)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return len(image)
    try:
        return os.path.getsize(image)
    except OSError:
        return 0  # reported with a clear message when the file is read


def _image_id(image: ImageInput, index: int) -> str:
    """The id sent with an image: its path, or its position in the call."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return f"#{index}"


def _pixels_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """uint8 H x W x C pixels from an integer or 0..255 float array; clear errors otherwise."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise NetVLADInputError(
            f"image {name}: expected an H x W, H x W x 1 or H x W x 3 array, got shape "
            f"{array.shape}"
        )
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise NetVLADInputError(f"image {name}: unsupported dtype {array.dtype}; use uint8 pixels")
    if array.size and not np.all(np.isfinite(array)):
        raise NetVLADInputError(f"image {name}: holds NaN or infinite values")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0 or high > 255:
        raise NetVLADInputError(
            f"image {name}: pixel values must lie in 0..255, found {low}..{high} "
            f"(dtype {array.dtype}); scale 0..1 images by 255, and 16-bit images down to 8 bits"
        )
    return np.ascontiguousarray(np.rint(array).astype(np.uint8))


def image_message(image: ImageInput, image_id: str) -> netvlad_pb2.Image:
    """One `Image` message: a path is read as encoded bytes, an array becomes a raw buffer."""
    if isinstance(image, np.ndarray):
        pixels = _pixels_uint8(image, image_id)
        height, width, channels = pixels.shape
        raw = netvlad_pb2.RawImage(
            data=pixels.tobytes(), height=height, width=width, channels=channels
        )
        return netvlad_pb2.Image(id=image_id, raw=raw)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return netvlad_pb2.Image(id=image_id, encoded=bytes(image))
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NetVLADInputError(f"image file not found: {path}") from None
        except IsADirectoryError:
            raise NetVLADInputError(f"{path} is a directory, expected an image file") from None
        except OSError as exc:
            raise NetVLADInputError(f"cannot read image {path}: {exc.strerror}") from None
        return netvlad_pb2.Image(id=image_id, encoded=data)
    raise NetVLADInputError(
        f"image {image_id}: expected a path, encoded bytes or a numpy array, got "
        f"{type(image).__name__}"
    )


def plan_requests(sizes: Sequence[int], max_images: int, max_bytes: int) -> list[range]:
    """Split images into consecutive runs of at most max_images and about max_bytes each."""
    budget = max(1, max_bytes - _REQUEST_OVERHEAD_BYTES)
    runs: list[range] = []
    start, used = 0, 0
    for index, size in enumerate(sizes):
        cost = size + _PER_IMAGE_OVERHEAD_BYTES
        if index > start and (index - start >= max_images or used + cost > budget):
            runs.append(range(start, index))
            start, used = index, 0
        used += cost
    if start < len(sizes):
        runs.append(range(start, len(sizes)))
    return runs


def _descriptors(response: netvlad_pb2.DescribeImagesResponse, expected: int) -> np.ndarray:
    """The response's descriptors as an (N, D) float32 array, checked against the request."""
    if len(response.descriptors) != expected:
        raise NetVLADError(
            f"the server answered {len(response.descriptors)} descriptors for {expected} images"
        )
    dims = response.dims or (len(response.descriptors[0].values) if expected else 0)
    out = np.empty((expected, dims), dtype=np.float32)
    for row, descriptor in enumerate(response.descriptors):
        if len(descriptor.values) != dims:
            raise NetVLADError(
                f"descriptor {descriptor.id!r} has {len(descriptor.values)} values, expected {dims}"
            )
        out[row] = descriptor.values
    return out


def _stream_result(message: netvlad_pb2.StreamDescribeImagesResponse, target: str) -> StreamResult:
    """One streamed answer as a StreamResult (descriptor or per-frame error)."""
    if message.WhichOneof("outcome") == "error":
        code = _status_code(message.error.code)
        error = NetVLADRPCError("StreamDescribeImages", code, message.error.message, target)
        return StreamResult(message.sequence, "", None, error)
    descriptors = _descriptors(message.response, len(message.response.descriptors))
    frame_id = message.response.descriptors[0].id if len(descriptors) else ""
    return StreamResult(message.sequence, frame_id, descriptors[0], None)


def _status_code(number: int) -> grpc.StatusCode:
    """grpc.StatusCode for a numeric status (UNKNOWN for numbers gRPC does not define)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


# Trailing metadata the server puts on a RESOURCE_EXHAUSTED that means "queue full, try again
# shortly", telling it apart from gRPC's own RESOURCE_EXHAUSTED for an oversized message.
BUSY_TRAILER = ("netvlad-busy", "queue-full")


def _retryable(exc: grpc.RpcError) -> bool:
    """UNAVAILABLE (no server, or one shutting down) and a full queue pass if tried again
    later; gRPC's own RESOURCE_EXHAUSTED for an oversized message, like every other error,
    would only fail again."""
    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED or not hasattr(exc, "trailing_metadata"):
        return False
    return any(key == BUSY_TRAILER[0] for key, _ in exc.trailing_metadata() or ())


def _rpc_error(
    method: str, exc: grpc.RpcError, config: ClientConfig, attempts: int
) -> NetVLADError:
    """A NetVLADError subclass carrying the call's status code and the server's message."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return NetVLADUnavailableError(method, details, config.target, attempts)
    return NetVLADRPCError(method, code, details, config.target)


def _health_name(status: int) -> str:
    """The health status enum name, e.g. "SERVING"."""
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


class _Requests:
    """Builds the DescribeImages requests of one call, split to fit the server's limits."""

    def __init__(
        self,
        images: ImageInput | Iterable[ImageInput],
        info: netvlad_pb2.ModelInfo,
        config: ClientConfig,
        dims: int | None,
        resize: str | int | None,
        batch_size: int | None,
    ):
        self.images = _as_list(images)
        _check_dims(dims)
        if batch_size is not None and batch_size < 1:
            raise NetVLADInputError(f"batch_size must be >= 1, got {batch_size}")
        self.dims = dims if dims is not None else config.dims
        self.resize = resize_policy(resize if resize is not None else config.resize)
        limits = info.batching
        max_images = limits.max_images_per_request or len(self.images) or 1
        if batch_size:
            max_images = min(max_images, batch_size)
        max_bytes = min(limits.max_message_bytes or config.max_message_bytes,
                        config.max_message_bytes)
        sizes = [_image_size(image) for image in self.images]
        self.runs = plan_requests(sizes, max_images, max_bytes)
        self.output_dims = self.dims or info.output_dims

    def request(self, run: range) -> netvlad_pb2.DescribeImagesRequest:
        """The request for one run of images (files are read here, not before)."""
        request = netvlad_pb2.DescribeImagesRequest(
            images=[image_message(self.images[i], _image_id(self.images[i], i)) for i in run],
            dims=self.dims or 0,
        )
        if self.resize is not None:
            request.resize.CopyFrom(self.resize)
        return request

    def name_refused(self, error: NetVLADRPCError, run: range) -> NetVLADRPCError:
        """Add the caller's names (full paths) of the images a refusal points at by position."""
        positions = [int(found) for found in _REFUSED_IMAGE.findall(error.details)]
        error.images = [
            _image_id(self.images[run[p]], run[p]) for p in positions if p < len(run)
        ]
        if error.images:
            error.args = (f"{error.args[0]} [refused: {', '.join(error.images)}]",)
        return error

    def empty(self) -> np.ndarray:
        """The (0, D) answer to a call with no images."""
        return np.empty((0, self.output_dims), dtype=np.float32)


class NetVLADClient:
    """Blocking client. Thread-safe: share one instance between threads.

    `target` is "host:port", "ip:port,ip:port", a list of IP addresses, or any gRPC target such
    as `dns:///name:port`; calls are spread round-robin over every address it resolves to.
    Calls that fail with UNAVAILABLE, or with RESOURCE_EXHAUSTED because the server's queue is
    full (marked by the `netvlad-busy` trailer), are retried `retries` times with exponential
    backoff; nothing else is. `timeout` is the deadline of each attempt in seconds.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        tls: bool = False,
        root_certificates: PemInput = None,
        client_certificate: PemInput = None,
        client_key: PemInput = None,
        server_name: str | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        dims: int | None = None,
        resize: str | int | None = None,
    ):
        self._open(ClientConfig.build(
            target, timeout=timeout, retries=retries, backoff=backoff, max_backoff=max_backoff,
            tls=tls, root_certificates=root_certificates, client_certificate=client_certificate,
            client_key=client_key, server_name=server_name, token=token,
            max_message_bytes=max_message_bytes, dims=dims, resize=resize,
        ))

    @classmethod
    def from_config(cls, config: ClientConfig) -> NetVLADClient:
        """A client for an already validated configuration (what the CLI builds)."""
        client = cls.__new__(cls)
        client._open(config)
        return client

    def _open(self, config: ClientConfig) -> None:
        """Open the channel (plaintext or TLS) described by config."""
        self.config = config
        credentials = config.credentials()
        options = config.channel_options()
        self._channel = (
            grpc.secure_channel(config.target, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(config.target, options=options)
        )
        self._stub = netvlad_pb2_grpc.DescriptorServiceStub(self._channel)
        self._info: netvlad_pb2.ModelInfo | None = None

    def __enter__(self) -> NetVLADClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def _call(self, method: str, call: Any, request: Any, timeout: float | None) -> Any:
        """Make one unary call, retrying (with backoff) what a retry can fix; map errors."""
        delays = self.config.retry_delays()
        attempts = 0
        while True:
            attempts += 1
            try:
                return call(
                    request,
                    timeout=timeout if timeout is not None else self.config.timeout,
                    metadata=self.config.metadata(),
                )
            except grpc.RpcError as exc:
                delay = next(delays, None) if _retryable(exc) else None
                if delay is None:
                    raise _rpc_error(method, exc, self.config, attempts) from None
                time.sleep(delay)

    def info(self, timeout: float | None = None) -> netvlad_pb2.ModelInfo:
        """The server's ModelInfo (model, weights, dims, precision, batching limits, version)."""
        self._info = self._call(
            "GetModelInfo", self._stub.GetModelInfo, netvlad_pb2.GetModelInfoRequest(), timeout
        )
        return self._info

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The gRPC health status name: SERVING, NOT_SERVING, SERVICE_UNKNOWN...; no retries."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                metadata=self.config.metadata(),
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return _health_name(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            raise _rpc_error("Health.Check", exc, self.config, 1) from None
        return _health_name(response.status)

    def _limits(self) -> netvlad_pb2.ModelInfo:
        """ModelInfo, asked once and cached, to size requests."""
        return self._info if self._info is not None else self.info()

    def describe(
        self,
        images: ImageInput | Iterable[ImageInput],
        dims: int | None = None,
        *,
        batch_size: int | None = None,
        resize: str | int | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Describe images (paths, encoded bytes or arrays); returns (N, D) float32 in order.

        A single image also gives a (1, D) array. Images are sent in requests of at most
        `batch_size` and at most the server's max_images_per_request and message size.
        """
        plan = _Requests(images, self._limits(), self.config, dims, resize, batch_size)
        if not plan.images:
            return plan.empty()
        parts = []
        for run in plan.runs:
            try:
                response = self._call(
                    "DescribeImages", self._stub.DescribeImages, plan.request(run), timeout
                )
            except NetVLADRPCError as exc:
                raise plan.name_refused(exc, run) from None
            parts.append(_descriptors(response, len(run)))
        return np.concatenate(parts, axis=0)

    def describe_stream(
        self,
        frames: Iterable[ImageInput],
        dims: int | None = None,
        *,
        resize: str | int | None = None,
        timeout: float | None = None,
    ) -> Iterator[StreamResult]:
        """Describe a (possibly endless) stream of frames over one bidirectional call.

        Yields one StreamResult per frame, in order; a frame the server rejects yields a result
        with `error` set and the stream goes on. Streams are not retried; `timeout` (default
        none) bounds the whole stream.
        """
        _check_dims(dims)
        dims = dims if dims is not None else self.config.dims
        policy = resize_policy(resize if resize is not None else self.config.resize)
        failure: list[BaseException] = []

        def requests() -> Iterator[netvlad_pb2.StreamDescribeImagesRequest]:
            try:
                for sequence, frame in enumerate(frames):
                    yield _stream_request(sequence, frame, dims, policy)
            except Exception as exc:  # re-raised in the caller's thread below
                failure.append(exc)

        call = self._stub.StreamDescribeImages(
            requests(), timeout=timeout, metadata=self.config.metadata()
        )
        try:
            for message in call:
                yield _stream_result(message, self.config.target)
        except grpc.RpcError as exc:
            if not failure:
                raise _rpc_error("StreamDescribeImages", exc, self.config, 1) from None
        finally:
            call.cancel()
        if failure:
            raise failure[0]


def _stream_request(
    sequence: int,
    frame: ImageInput,
    dims: int | None,
    policy: netvlad_pb2.ResizePolicy | None,
) -> netvlad_pb2.StreamDescribeImagesRequest:
    """The stream message for one frame."""
    request = netvlad_pb2.DescribeImagesRequest(
        images=[image_message(frame, _image_id(frame, sequence))], dims=dims or 0
    )
    if policy is not None:
        request.resize.CopyFrom(policy)
    return netvlad_pb2.StreamDescribeImagesRequest(sequence=sequence, request=request)


class AsyncNetVLADClient:
    """asyncio client on grpc.aio with the same options and methods as NetVLADClient.

    The channel is opened on first use inside the running event loop; use `async with` or
    `await client.close()`.
    """

    def __init__(self, target: str | Sequence[str], **options: Any):
        self.config = ClientConfig.build(target, **options)
        self._channel: grpc.aio.Channel | None = None
        self._stub: netvlad_pb2_grpc.DescriptorServiceStub | None = None
        self._info: netvlad_pb2.ModelInfo | None = None

    async def __aenter__(self) -> AsyncNetVLADClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    def _open(self) -> netvlad_pb2_grpc.DescriptorServiceStub:
        """The stub, opening the channel on first use."""
        if self._stub is None:
            credentials = self.config.credentials()
            options = self.config.channel_options()
            self._channel = (
                grpc.aio.secure_channel(self.config.target, credentials, options=options)
                if credentials is not None
                else grpc.aio.insecure_channel(self.config.target, options=options)
            )
            self._stub = netvlad_pb2_grpc.DescriptorServiceStub(self._channel)
        return self._stub

    async def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        """Make one unary call, retrying (with backoff) what a retry can fix; map errors."""
        delays = self.config.retry_delays()
        attempts = 0
        while True:
            attempts += 1
            try:
                return await getattr(self._open(), method)(
                    request,
                    timeout=timeout if timeout is not None else self.config.timeout,
                    metadata=self.config.metadata(),
                )
            except grpc.RpcError as exc:
                delay = next(delays, None) if _retryable(exc) else None
                if delay is None:
                    raise _rpc_error(method, exc, self.config, attempts) from None
                await asyncio.sleep(delay)

    async def info(self, timeout: float | None = None) -> netvlad_pb2.ModelInfo:
        """The server's ModelInfo (model, weights, dims, precision, batching limits, version)."""
        self._info = await self._call("GetModelInfo", netvlad_pb2.GetModelInfoRequest(), timeout)
        return self._info

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The gRPC health status name: SERVING, NOT_SERVING, SERVICE_UNKNOWN...; no retries."""
        self._open()
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                metadata=self.config.metadata(),
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return _health_name(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            raise _rpc_error("Health.Check", exc, self.config, 1) from None
        return _health_name(response.status)

    async def describe(
        self,
        images: ImageInput | Iterable[ImageInput],
        dims: int | None = None,
        *,
        batch_size: int | None = None,
        resize: str | int | None = None,
        timeout: float | None = None,
        concurrency: int = 1,
    ) -> np.ndarray:
        """Describe images; returns (N, D) float32 in input order (see NetVLADClient.describe).

        With `concurrency` > 1, up to that many requests are in flight at once, fewer where
        the server's queue could not hold them all (see queue_safe_concurrency).
        """
        info = self._info if self._info is not None else await self.info()
        plan = _Requests(images, info, self.config, dims, resize, batch_size)
        if not plan.images:
            return plan.empty()
        largest = max(len(run) for run in plan.runs)
        gate = asyncio.Semaphore(queue_safe_concurrency(info, concurrency, largest))

        async def one(run: range) -> np.ndarray:
            async with gate:
                request = await asyncio.to_thread(plan.request, run)
                try:
                    response = await self._call("DescribeImages", request, timeout)
                except NetVLADRPCError as exc:
                    raise plan.name_refused(exc, run) from None
                return _descriptors(response, len(run))

        parts = await asyncio.gather(*(one(run) for run in plan.runs))
        return np.concatenate(parts, axis=0)

    async def describe_stream(
        self,
        frames: Iterable[ImageInput] | AsyncIterable[ImageInput],
        dims: int | None = None,
        *,
        resize: str | int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamResult]:
        """Describe a stream of frames (sync or async iterable); yields StreamResult in order."""
        _check_dims(dims)
        dims = dims if dims is not None else self.config.dims
        policy = resize_policy(resize if resize is not None else self.config.resize)
        failure: list[BaseException] = []

        async def requests() -> AsyncIterator[netvlad_pb2.StreamDescribeImagesRequest]:
            try:
                if isinstance(frames, AsyncIterable):
                    sequence = 0
                    async for frame in frames:
                        yield _stream_request(sequence, frame, dims, policy)
                        sequence += 1
                else:
                    for sequence, frame in enumerate(frames):
                        yield _stream_request(sequence, frame, dims, policy)
            except Exception as exc:  # re-raised in the caller's task below
                failure.append(exc)

        call = self._open().StreamDescribeImages(
            requests(), timeout=timeout, metadata=self.config.metadata()
        )
        try:
            async for message in call:
                yield _stream_result(message, self.config.target)
        except grpc.RpcError as exc:
            if not failure:
                raise _rpc_error("StreamDescribeImages", exc, self.config, 1) from None
        finally:
            call.cancel()
        if failure:
            raise failure[0]



def queue_safe_concurrency(info: netvlad_pb2.ModelInfo, concurrency: int,
                           images_per_request: int) -> int:
    """`concurrency` lowered so that the requests in flight fit the server's queue (at least 1).

    The server refuses a request its queue cannot take whole (RESOURCE_EXHAUSTED), so a client
    that sends more images at once than the queue holds would overload an otherwise idle server.
    """
    queue = info.batching.max_queue_size
    concurrency = max(1, concurrency)
    if not queue or images_per_request < 1:
        return concurrency
    return max(1, min(concurrency, queue // images_per_request))


def describe_concurrently(
    client: NetVLADClient,
    chunks: Sequence[Sequence[ImageInput]],
    concurrency: int,
    *,
    on_lowered: Callable[[int, int, int], None] | None = None,
    **options: Any,
) -> Iterator[tuple[int, np.ndarray]]:
    """Describe chunks with up to `concurrency` requests in flight; yields (chunk index, rows).

    Results come as they finish, not in order: the caller places them by index. After the
    first failure no further chunk starts, the chunks already in flight are still yielded, and
    then the failure is raised. `options` go to `NetVLADClient.describe`. `concurrency` is
    lowered where the server's queue could not hold that many requests at once;
    `on_lowered(concurrency, images per request, queue size)` then hears of it.
    """
    if chunks:
        info = client._limits()
        per_request = max(len(chunk) for chunk in chunks)
        for limit in (info.batching.max_images_per_request, options.get("batch_size")):
            per_request = min(per_request, limit or per_request)
        safe = queue_safe_concurrency(info, concurrency, per_request)
        if safe < concurrency and on_lowered is not None:
            on_lowered(safe, per_request, info.batching.max_queue_size)
        concurrency = safe
    pool = futures.ThreadPoolExecutor(max_workers=max(1, concurrency))
    pending = {pool.submit(client.describe, chunk, **options): i for i, chunk in enumerate(chunks)}
    failure: BaseException | None = None
    try:
        for future in futures.as_completed(list(pending)):
            index = pending.pop(future)  # then nothing here keeps its rows alive once yielded
            if future.cancelled():
                continue
            if future.exception() is not None:
                if failure is None:
                    failure = future.exception()
                    for other in pending:
                        other.cancel()
                continue
            yield index, future.result()
    finally:
        # Never block here: an interrupted caller closes the client, which ends calls in flight.
        pool.shutdown(wait=False, cancel_futures=True)
    if failure is not None:
        raise failure
