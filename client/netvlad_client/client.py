"""The blocking client: a thin driver around the shared request, retry and health logic.

Images go over the wire as encoded files (paths, bytes) or raw uint8 pixel buffers (numpy
arrays); descriptors come back as one `(N, D)` float32 array in input order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc

from netvlad_client._proto import netvlad_pb2, netvlad_pb2_grpc
from netvlad_client.config import ClientConfig
from netvlad_client.errors import NetVLADError, NetVLADRPCError, closed_error
from netvlad_client.health import ServingWait, check_failed, health_request, status_name
from netvlad_client.inputs import ImageInput
from netvlad_client.places_calls import PlaceCalls
from netvlad_client.planning import RequestPlan
from netvlad_client.retry import CallAttempts
from netvlad_client.streaming import StreamFrames, StreamResult


class NetVLADClient(PlaceCalls):
    """Blocking client. Thread-safe: share one instance between threads.

    `target` is "host[:port]" (port 50051 by default), "ip:port,ip:port", a list of IP
    addresses, or any gRPC target such as `dns:///name:port`; calls are spread round-robin over
    every address it resolves to. The keyword options are those of `ClientConfig` (timeout,
    retries, backoff, max_backoff, TLS and token, max_message_bytes, dims, resize,
    wait_for_ready, priority). Calls that fail with UNAVAILABLE, or with RESOURCE_EXHAUSTED
    because the server's queue is full (the `netvlad-busy` trailer), are retried `retries` times
    with exponential backoff; nothing else is. `timeout` is the deadline of each attempt in
    seconds.
    """

    def __init__(self, target: str | Sequence[str], **options: Any):
        self._start(ClientConfig.build(target, **options))

    @classmethod
    def from_config(cls, config: ClientConfig) -> NetVLADClient:
        """A client for an already validated configuration (what the CLI builds)."""
        client = cls.__new__(cls)
        client._start(config)
        return client

    def _start(self, config: ClientConfig) -> None:
        """Open the channel (plaintext or TLS) described by config."""
        self.config = config
        self._channel = config.channel()
        self._stub = netvlad_pb2_grpc.DescriptorServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._info: netvlad_pb2.ModelInfo | None = None
        self._closed = False

    def __enter__(self) -> NetVLADClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled, later calls raise NetVLADError."""
        self._closed = True
        self._channel.close()

    @contextmanager
    def _open_channel(self) -> Iterator[None]:
        """Refuse calls on a closed client with a NetVLADError (gRPC raises ValueError)."""
        if self._closed:
            raise closed_error("NetVLADClient")
        try:
            yield
        except ValueError as exc:
            if self._closed and not isinstance(exc, NetVLADError):
                raise closed_error("NetVLADClient") from None
            raise

    def _unary(self, method: str, request: Any, timeout: float | None) -> Any:
        """Make one unary call, retrying (with backoff) what a retry can fix; map errors."""
        attempts = CallAttempts(method, self.config, timeout)
        call = getattr(self._stub, method)
        while True:
            with self._open_channel():
                try:
                    return call(request, **attempts.options())
                except grpc.RpcError as exc:
                    delay = attempts.after_failure(exc)
            time.sleep(delay)

    def info(self, timeout: float | None = None) -> netvlad_pb2.ModelInfo:
        """The server's ModelInfo (model, weights, dims, precision, batching limits, version)."""
        self._info = self._unary("GetModelInfo", netvlad_pb2.GetModelInfoRequest(), timeout)
        return self._info

    def model_info(self) -> netvlad_pb2.ModelInfo:
        """ModelInfo, asked once and cached (it sizes requests)."""
        return self._info if self._info is not None else self.info()

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The gRPC health status name: SERVING, NOT_SERVING, SERVICE_UNKNOWN...; no retries."""
        with self._open_channel():
            try:
                response = self._health.Check(
                    health_request(service), timeout=timeout, metadata=self.config.metadata()
                )
            except grpc.RpcError as exc:
                return check_failed(exc, self.config)
        return status_name(response)

    def wait_until_serving(self, timeout: float | None = None, service: str = "") -> None:
        """Block until the server's health is SERVING (a server may listen while it loads).

        `timeout` is in seconds (None: no limit); past it, NetVLADUnavailableError names the
        last answer. Errors that waiting cannot fix (a refused token) are raised at once; a TLS
        mismatch looks like an unreachable server (UNAVAILABLE) and is waited on.
        """
        wait = ServingWait(self.config, timeout)
        while True:
            try:
                status: str | None = self.health(service, timeout=wait.poll_timeout())
            except NetVLADRPCError as exc:
                wait.unreachable(exc)
                status = None
            delay = wait.next_delay(status)
            if delay is None:
                return
            time.sleep(delay)

    def describe(
        self,
        images: ImageInput | Iterable[ImageInput],
        dims: int | None = None,
        *,
        batch_size: int | None = None,
        resize: str | int | None = None,
        timeout: float | None = None,
        priority: str | int | None = None,
    ) -> np.ndarray:
        """Describe images (paths, encoded bytes or arrays); returns (N, D) float32 in order.

        A single image also gives a (1, D) array. Images are sent in requests of at most
        `batch_size` and at most the server's max_images_per_request and message size.
        `dims` keeps the first dims values, renormalised (0 or None: all). `priority` is the
        requests' class: "interactive", "bulk", "default" (the server's) or None (the client's
        `priority`, by default the server's class).
        """
        plan = RequestPlan(images, self.config, dims, resize, batch_size, priority)
        plan.fit(self.model_info())
        if not plan.images:
            return plan.empty()
        parts = []
        for run in plan.runs:
            try:
                response = self._unary("DescribeImages", plan.request(run), timeout)
            except NetVLADRPCError as exc:
                raise plan.name_refused(exc, run) from None
            parts.append(plan.rows(response, run))
        return np.concatenate(parts, axis=0)

    def describe_stream(
        self,
        frames: Iterable[ImageInput],
        dims: int | None = None,
        *,
        resize: str | int | None = None,
        timeout: float | None = None,
        priority: str | int | None = None,
    ) -> Iterator[StreamResult]:
        """Describe a (possibly endless) stream of frames over one bidirectional call.

        Yields one StreamResult per frame, in order; a frame the server rejects yields a result
        with `error` set and the stream goes on. Streams are not retried; `timeout` (default
        none) bounds the whole stream. With wait_for_ready, a loading server is waited for
        (up to the client's timeout) before the stream opens. Frames are interactive unless
        `priority` (or the client's `priority`) names another class.
        """
        stream = StreamFrames(self.config, dims, resize, priority)
        if self.config.wait_for_ready:
            self.wait_until_serving(self.config.timeout)

        def requests() -> Iterator[netvlad_pb2.StreamDescribeImagesRequest]:
            try:
                for sequence, frame in enumerate(frames):
                    yield stream.request(sequence, frame)
            except Exception as exc:  # re-raised in the caller's thread below
                stream.failed(exc)

        with self._open_channel():
            call = self._stub.StreamDescribeImages(
                requests(), timeout=timeout, metadata=self.config.metadata()
            )
        try:
            for message in call:
                yield stream.result(message)
        except grpc.RpcError as exc:
            stream.call_failed(exc)
        finally:
            call.cancel()
        stream.finish()

