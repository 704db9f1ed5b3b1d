"""The asyncio client: the same options, methods and answers as NetVLADClient, on grpc.aio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc

from netvlad_client._proto import netvlad_pb2, netvlad_pb2_grpc
from netvlad_client.bulk import queue_safe_concurrency
from netvlad_client.config import ClientConfig
from netvlad_client.errors import NetVLADRPCError, closed_error
from netvlad_client.health import ServingWait, check_failed, health_request, status_name
from netvlad_client.inputs import ImageInput
from netvlad_client.places_calls import AsyncPlaceCalls
from netvlad_client.planning import RequestPlan
from netvlad_client.retry import CallAttempts
from netvlad_client.streaming import StreamFrames, StreamResult


class AsyncNetVLADClient(AsyncPlaceCalls):
    """asyncio client on grpc.aio with the same options and methods as NetVLADClient.

    The channel is opened on first use inside the running event loop; use `async with` or
    `await client.close()`. After `close()` every call raises NetVLADError.
    """

    def __init__(self, target: str | Sequence[str], **options: Any):
        self.config = ClientConfig.build(target, **options)
        self._channel: grpc.aio.Channel | None = None
        self._stubs: tuple[netvlad_pb2_grpc.DescriptorServiceStub,
                           health_pb2_grpc.HealthStub] | None = None
        self._info: netvlad_pb2.ModelInfo | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncNetVLADClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled, later calls raise NetVLADError."""
        self._closed = True
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stubs = None

    def _open(self) -> tuple[netvlad_pb2_grpc.DescriptorServiceStub, health_pb2_grpc.HealthStub]:
        """The service and health stubs, opening the channel on first use."""
        if self._closed:
            raise closed_error("AsyncNetVLADClient")
        if self._stubs is None:
            self._channel = self.config.aio_channel()
            self._stubs = (netvlad_pb2_grpc.DescriptorServiceStub(self._channel),
                           health_pb2_grpc.HealthStub(self._channel))
        return self._stubs

    async def _unary(self, method: str, request: Any, timeout: float | None) -> Any:
        """Make one unary call, retrying (with backoff) what a retry can fix; map errors."""
        attempts = CallAttempts(method, self.config, timeout)
        while True:
            try:
                return await getattr(self._open()[0], method)(request, **attempts.options())
            except grpc.RpcError as exc:
                delay = attempts.after_failure(exc)
            await asyncio.sleep(delay)

    async def info(self, timeout: float | None = None) -> netvlad_pb2.ModelInfo:
        """The server's ModelInfo (model, weights, dims, precision, batching limits, version)."""
        self._info = await self._unary("GetModelInfo", netvlad_pb2.GetModelInfoRequest(), timeout)
        return self._info

    async def model_info(self) -> netvlad_pb2.ModelInfo:
        """ModelInfo, asked once and cached (it sizes requests)."""
        return self._info if self._info is not None else await self.info()

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The gRPC health status name: SERVING, NOT_SERVING, SERVICE_UNKNOWN...; no retries."""
        try:
            response = await self._open()[1].Check(
                health_request(service), timeout=timeout, metadata=self.config.metadata()
            )
        except grpc.RpcError as exc:
            return check_failed(exc, self.config)
        return status_name(response)

    async def wait_until_serving(self, timeout: float | None = None, service: str = "") -> None:
        """Wait until the server's health is SERVING (see NetVLADClient.wait_until_serving)."""
        wait = ServingWait(self.config, timeout)
        while True:
            try:
                status: str | None = await self.health(service, timeout=wait.poll_timeout())
            except NetVLADRPCError as exc:
                wait.unreachable(exc)
                status = None
            delay = wait.next_delay(status)
            if delay is None:
                return
            await asyncio.sleep(delay)

    async def describe(
        self,
        images: ImageInput | Iterable[ImageInput],
        dims: int | None = None,
        *,
        batch_size: int | None = None,
        resize: str | int | None = None,
        timeout: float | None = None,
        concurrency: int = 1,
        priority: str | int | None = None,
    ) -> np.ndarray:
        """Describe images; returns (N, D) float32 in input order (see NetVLADClient.describe).

        With `concurrency` > 1, up to that many requests are in flight at once, fewer where
        the queue of their class could not hold them all (see queue_safe_concurrency).
        """
        plan = RequestPlan(images, self.config, dims, resize, batch_size, priority)
        info = await self.model_info()
        plan.fit(info)
        if not plan.images:
            return plan.empty()
        gate = asyncio.Semaphore(
            queue_safe_concurrency(info, concurrency, plan.largest_run, plan.priority)
        )

        async def one(run: range) -> np.ndarray:
            async with gate:
                request = await asyncio.to_thread(plan.request, run)
                try:
                    response = await self._unary("DescribeImages", request, timeout)
                except NetVLADRPCError as exc:
                    raise plan.name_refused(exc, run) from None
                return plan.rows(response, run)

        parts = await asyncio.gather(*(one(run) for run in plan.runs))
        return np.concatenate(parts, axis=0)

    async def describe_stream(
        self,
        frames: Iterable[ImageInput] | AsyncIterable[ImageInput],
        dims: int | None = None,
        *,
        resize: str | int | None = None,
        timeout: float | None = None,
        priority: str | int | None = None,
    ) -> AsyncIterator[StreamResult]:
        """Describe a stream of frames (sync or async iterable); yields StreamResult in order.

        Frames are interactive unless `priority` (or the client's `priority`) says otherwise.
        """
        stream = StreamFrames(self.config, dims, resize, priority)
        if self.config.wait_for_ready:
            await self.wait_until_serving(self.config.timeout)

        async def requests() -> AsyncIterator[netvlad_pb2.StreamDescribeImagesRequest]:
            try:
                if isinstance(frames, AsyncIterable):
                    sequence = 0
                    async for frame in frames:
                        yield stream.request(sequence, frame)
                        sequence += 1
                else:
                    for sequence, frame in enumerate(frames):
                        yield stream.request(sequence, frame)
            except Exception as exc:  # re-raised in the caller's task below
                stream.failed(exc)

        call = self._open()[0].StreamDescribeImages(
            requests(), timeout=timeout, metadata=self.config.metadata()
        )
        try:
            async for message in call:
                yield stream.result(message)
        except grpc.RpcError as exc:
            stream.call_failed(exc)
        finally:
            call.cancel()
        stream.finish()
