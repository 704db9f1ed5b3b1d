"""StreamLoopClosure: keyframes in, loop-closure candidates out, in the order sent.

Up to `inflight` frames are checked and described at once (their images share the batcher), but
each frame's query and add run strictly in frame order, so frame n+1's query sees frame n. A
frame that fails gets an error Status in its own message and the stream goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client._proto import places_pb2 as ppb

from netvlad_server.places.limits import PlaceError
from netvlad_server.service import MalformedMessage, RequestError

if TYPE_CHECKING:
    from netvlad_server.places.service import PlaceIndexService

METHOD = "StreamLoopClosure"


def _error(sequence: int, code: grpc.StatusCode, message: str) -> ppb.StreamLoopClosureResponse:
    return ppb.StreamLoopClosureResponse(
        sequence=sequence, error=pb.Status(code=code.value[0], message=message))


async def loop_closure_stream(service: PlaceIndexService, request_iterator: AsyncIterator[Any],
                              context: Any, inflight: int
                              ) -> AsyncIterator[ppb.StreamLoopClosureResponse]:
    """Answer each frame in order (see the module docstring)."""
    window = asyncio.Semaphore(inflight)
    frames: asyncio.Queue[tuple[int, float, asyncio.Future] | None] = asyncio.Queue()

    async def read() -> None:
        async for message in request_iterator:
            await window.acquire()
            prepared = asyncio.ensure_future(_prepare(service, message, context))
            frames.put_nowait((message.sequence, time.perf_counter(), prepared))

    reader = asyncio.ensure_future(read())
    reader.add_done_callback(lambda _: frames.put_nowait(None))
    try:
        while (frame := await frames.get()) is not None:
            sequence, start, prepared = frame
            code = grpc.StatusCode.OK
            try:
                answer = await service.guard(await prepared, None,
                                             lambda frame, _: service.finish_frame(frame))
                yield ppb.StreamLoopClosureResponse(sequence=sequence, response=answer)
            except (PlaceError, RequestError) as exc:
                code = exc.code
                yield _error(sequence, exc.code, exc.message)
            finally:
                window.release()
                service.metrics.place_request_done(METHOD, code, time.perf_counter() - start)
        reader.result()  # a failure to read the stream ends the call with its error
    finally:
        reader.cancel()
        while not frames.empty():
            pending = frames.get_nowait()
            if pending is not None:
                pending[2].cancel()


async def _prepare(service: PlaceIndexService, message: Any, context: Any) -> Any:
    """Check and describe one frame (errors surface when its turn comes)."""
    if isinstance(message, MalformedMessage):
        raise PlaceError(message.error.code, message.error.message)
    return await service.guard(message.request, context.time_remaining(), service.prepare_frame)
