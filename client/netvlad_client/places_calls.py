"""The place index methods of NetVLADClient (`PlaceCalls`) and AsyncNetVLADClient
(`AsyncPlaceCalls`): the same names, arguments and answers; messages come from places.py.

Unary calls follow the clients' retry policy (UNAVAILABLE and a full queue are retried; an add
repeated after a lost answer replaces the same ids, so it is safe). Streams are not retried.
Priority: None uses the client's `priority`, and when that is unset too the server picks per
call: queries interactive, adds bulk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc

from netvlad_client._proto import places_pb2, places_pb2_grpc
from netvlad_client.config import ClientConfig
from netvlad_client.errors import rpc_error
from netvlad_client.inputs import ImageInput
from netvlad_client.places import (
    ADD_BATCH,
    AddResult,
    ExportReader,
    IndexInfo,
    LoopClosure,
    Match,
    Place,
    PlaceArrays,
    add_requests,
    call_priority,
    index_info,
    loop_closure,
    matches,
    merge_adds,
    method_value,
    query_and_add_request,
    query_options,
    query_request,
)
from netvlad_client.retry import CallAttempts

STREAM = "StreamLoopClosure"


def _create(name: str, dims: int | None, method: str, exist_ok: bool
            ) -> places_pb2.CreateIndexRequest:
    return places_pb2.CreateIndexRequest(name=name, dims=dims or 0, method=method_value(method),
                                         exist_ok=exist_ok)


class PlaceCalls:
    """Place index calls of the blocking client (mixed into NetVLADClient)."""

    config: ClientConfig
    _channel: grpc.Channel
    _open_channel: Any  # the client's context manager refusing calls after close()

    def _places(self, method: str, request: Any, timeout: float | None) -> Any:
        attempts = CallAttempts(method, self.config, timeout)
        stub = places_pb2_grpc.PlaceIndexServiceStub(self._channel)
        while True:
            with self._open_channel():
                try:
                    return getattr(stub, method)(request, **attempts.options())
                except grpc.RpcError as exc:
                    delay = attempts.after_failure(exc)
            time.sleep(delay)

    def create_index(self, name: str, dims: int | None = None, *, method: str = "exact",
                     exist_ok: bool = False, timeout: float | None = None) -> IndexInfo:
        """Create an index for the server's model; dims None: the server's default length."""
        return index_info(self._places("CreateIndex", _create(name, dims, method, exist_ok),
                                       timeout))

    def list_indexes(self, timeout: float | None = None) -> list[IndexInfo]:
        """Every index of the server."""
        response = self._places("ListIndexes", places_pb2.ListIndexesRequest(), timeout)
        return [index_info(info) for info in response.indexes]

    def place_limits(self, timeout: float | None = None) -> places_pb2.ListIndexesResponse:
        """The whole ListIndexes answer: indexes, the server's model identity and limits."""
        return self._places("ListIndexes", places_pb2.ListIndexesRequest(), timeout)

    def drop_index(self, name: str, timeout: float | None = None) -> int:
        """Delete an index and its places; returns how many places it held."""
        return self._places("DropIndex", places_pb2.DropIndexRequest(name=name), timeout).places

    def add_places(self, index: str, places: Iterable[Place], *, batch_size: int = ADD_BATCH,
                   resize: str | int | None = None, priority: str | int | None = None,
                   weights_sha256: str = "", timeout: float | None = None) -> AddResult:
        """Add places in requests of batch_size; each answer means its places are durable."""
        priority_value = call_priority(priority, self.config.priority)
        return merge_adds(self._places("AddPlaces", request, timeout) for request in
                          add_requests(index, places, batch_size, resize, priority_value,
                                       weights_sha256))

    def query_places(self, index: str, image: ImageInput | None = None, *,
                     descriptor: object = None, k: int = 10, min_similarity: float | None = None,
                     timestamp: float | None = None, exclude_within_seconds: float = 0.0,
                     exclude_last: int = 0, resize: str | int | None = None,
                     priority: str | int | None = None, timeout: float | None = None
                     ) -> list[Match]:
        """The k places most similar to an image or descriptor, best first."""
        request = query_request(index, image, descriptor, timestamp,
                                query_options(k, min_similarity, exclude_within_seconds,
                                              exclude_last), resize,
                                call_priority(priority, self.config.priority))
        return matches(self._places("QueryPlaces", request, timeout).matches)

    def query_and_add(self, index: str, place: Place, *, k: int = 10,
                      min_similarity: float | None = None, exclude_within_seconds: float = 0.0,
                      exclude_last: int = 0, resize: str | int | None = None,
                      priority: str | int | None = None, timeout: float | None = None
                      ) -> LoopClosure:
        """The loop-closure step: candidates for the place, then the place added."""
        request = query_and_add_request(
            index, place, query_options(k, min_similarity, exclude_within_seconds, exclude_last),
            resize, call_priority(priority, self.config.priority))
        response = self._places("QueryAndAdd", request, timeout)
        return LoopClosure(0, place.id, matches(response.matches), response.replaced,
                           response.size)

    def loop_closure_stream(self, index: str, keyframes: Iterable[Place], *, k: int = 10,
                            min_similarity: float | None = None,
                            exclude_within_seconds: float = 0.0, exclude_last: int = 0,
                            resize: str | int | None = None, priority: str | int | None = None,
                            timeout: float | None = None) -> Iterator[LoopClosure]:
        """Stream keyframes over one call; yields one LoopClosure per keyframe, in order (a
        refused keyframe has `error` set and the stream goes on)."""
        options = query_options(k, min_similarity, exclude_within_seconds, exclude_last)
        priority_value = call_priority(priority, self.config.priority)
        sent: list[str] = []
        failure: list[BaseException] = []

        def requests() -> Iterator[places_pb2.StreamLoopClosureRequest]:
            try:
                for sequence, place in enumerate(keyframes):
                    request = query_and_add_request(index, place, options, resize,
                                                    priority_value)
                    sent.append(place.id)
                    yield places_pb2.StreamLoopClosureRequest(sequence=sequence, request=request)
            except Exception as exc:  # raised in the caller's thread once the call ends
                failure.append(exc)

        with self._open_channel():
            call = places_pb2_grpc.PlaceIndexServiceStub(self._channel).StreamLoopClosure(
                requests(), timeout=timeout, metadata=self.config.metadata())
        try:
            for message in call:
                yield loop_closure(message, sent[message.sequence], self.config.target)
        except grpc.RpcError as exc:
            raise rpc_error(STREAM, exc, self.config, 1) from None
        finally:
            call.cancel()
        if failure:
            raise failure[0]

    def remove_places(self, index: str, ids: Iterable[str], timeout: float | None = None
                      ) -> tuple[int, list[str]]:
        """Remove places by id; returns (removed, ids that were not present)."""
        response = self._places("RemovePlaces", places_pb2.RemovePlacesRequest(
            index=index, ids=list(ids)), timeout)
        return response.removed, list(response.missing)

    def export_places(self, index: str, timeout: float | None = None) -> PlaceArrays:
        """Every place of an index with its descriptor, in the order added."""
        reader = ExportReader()
        with self._open_channel():
            call = places_pb2_grpc.PlaceIndexServiceStub(self._channel).ExportPlaces(
                places_pb2.ExportPlacesRequest(index=index), timeout=timeout,
                metadata=self.config.metadata())
            try:
                for message in call:
                    reader.read(message)
            except grpc.RpcError as exc:
                raise rpc_error("ExportPlaces", exc, self.config, 1) from None
        return reader.arrays()

    def export_npz(self, index: str, path: str | Path, timeout: float | None = None) -> int:
        """Export an index to a .npz (see PlaceArrays.save_npz); returns the places written."""
        arrays = self.export_places(index, timeout)
        arrays.save_npz(path)
        return len(arrays.ids)

    def import_npz(self, index: str, path: str | Path, *, batch_size: int = ADD_BATCH,
                   timeout: float | None = None) -> AddResult:
        """Add the places of a .npz to an existing index (refused if another model made it)."""
        arrays = PlaceArrays.load_npz(path)
        return self.add_places(index, arrays.places(), batch_size=batch_size,
                               weights_sha256=arrays.weights_sha256, timeout=timeout)


async def _aiter(items: Iterable[Place] | AsyncIterable[Place]) -> AsyncIterator[Place]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


class AsyncPlaceCalls:
    """Place index calls of the asyncio client (mixed into AsyncNetVLADClient)."""

    config: ClientConfig
    _open: Any  # opens the channel on first use
    _channel: grpc.aio.Channel | None

    def _stub(self) -> places_pb2_grpc.PlaceIndexServiceStub:
        self._open()
        return places_pb2_grpc.PlaceIndexServiceStub(self._channel)

    async def _places(self, method: str, request: Any, timeout: float | None) -> Any:
        attempts = CallAttempts(method, self.config, timeout)
        while True:
            try:
                return await getattr(self._stub(), method)(request, **attempts.options())
            except grpc.RpcError as exc:
                delay = attempts.after_failure(exc)
            await asyncio.sleep(delay)

    async def create_index(self, name: str, dims: int | None = None, *, method: str = "exact",
                           exist_ok: bool = False, timeout: float | None = None) -> IndexInfo:
        """Create an index for the server's model; dims None: the server's default length."""
        return index_info(await self._places("CreateIndex",
                                             _create(name, dims, method, exist_ok), timeout))

    async def list_indexes(self, timeout: float | None = None) -> list[IndexInfo]:
        """Every index of the server."""
        response = await self._places("ListIndexes", places_pb2.ListIndexesRequest(), timeout)
        return [index_info(info) for info in response.indexes]

    async def drop_index(self, name: str, timeout: float | None = None) -> int:
        """Delete an index and its places; returns how many places it held."""
        response = await self._places("DropIndex", places_pb2.DropIndexRequest(name=name),
                                      timeout)
        return response.places

    async def add_places(self, index: str, places: Iterable[Place], *,
                         batch_size: int = ADD_BATCH, resize: str | int | None = None,
                         priority: str | int | None = None, weights_sha256: str = "",
                         timeout: float | None = None) -> AddResult:
        """Add places in requests of batch_size; each answer means its places are durable."""
        priority_value = call_priority(priority, self.config.priority)
        answers = [await self._places("AddPlaces", request, timeout) for request in
                   add_requests(index, places, batch_size, resize, priority_value,
                                weights_sha256)]
        return merge_adds(answers)

    async def query_places(self, index: str, image: ImageInput | None = None, *,
                           descriptor: object = None, k: int = 10,
                           min_similarity: float | None = None, timestamp: float | None = None,
                           exclude_within_seconds: float = 0.0, exclude_last: int = 0,
                           resize: str | int | None = None, priority: str | int | None = None,
                           timeout: float | None = None) -> list[Match]:
        """The k places most similar to an image or descriptor, best first."""
        request = query_request(index, image, descriptor, timestamp,
                                query_options(k, min_similarity, exclude_within_seconds,
                                              exclude_last), resize,
                                call_priority(priority, self.config.priority))
        return matches((await self._places("QueryPlaces", request, timeout)).matches)

    async def query_and_add(self, index: str, place: Place, *, k: int = 10,
                            min_similarity: float | None = None,
                            exclude_within_seconds: float = 0.0, exclude_last: int = 0,
                            resize: str | int | None = None, priority: str | int | None = None,
                            timeout: float | None = None) -> LoopClosure:
        """The loop-closure step: candidates for the place, then the place added."""
        request = query_and_add_request(
            index, place, query_options(k, min_similarity, exclude_within_seconds, exclude_last),
            resize, call_priority(priority, self.config.priority))
        response = await self._places("QueryAndAdd", request, timeout)
        return LoopClosure(0, place.id, matches(response.matches), response.replaced,
                           response.size)

    async def loop_closure_stream(self, index: str,
                                  keyframes: Iterable[Place] | AsyncIterable[Place], *, k: int = 10,
                                  min_similarity: float | None = None,
                                  exclude_within_seconds: float = 0.0, exclude_last: int = 0,
                                  resize: str | int | None = None,
                                  priority: str | int | None = None,
                                  timeout: float | None = None) -> AsyncIterator[LoopClosure]:
        """Stream keyframes over one call; one LoopClosure per keyframe, in order."""
        options = query_options(k, min_similarity, exclude_within_seconds, exclude_last)
        priority_value = call_priority(priority, self.config.priority)
        sent: list[str] = []

        async def requests() -> AsyncIterator[places_pb2.StreamLoopClosureRequest]:
            async for place in _aiter(keyframes):
                request = query_and_add_request(index, place, options, resize, priority_value)
                sent.append(place.id)
                yield places_pb2.StreamLoopClosureRequest(sequence=len(sent) - 1,
                                                          request=request)

        call = self._stub().StreamLoopClosure(requests(), timeout=timeout,
                                              metadata=self.config.metadata())
        try:
            async for message in call:
                yield loop_closure(message, sent[message.sequence], self.config.target)
        except grpc.RpcError as exc:
            raise rpc_error(STREAM, exc, self.config, 1) from None
        finally:
            call.cancel()

    async def remove_places(self, index: str, ids: Iterable[str],
                            timeout: float | None = None) -> tuple[int, list[str]]:
        """Remove places by id; returns (removed, ids that were not present)."""
        response = await self._places("RemovePlaces", places_pb2.RemovePlacesRequest(
            index=index, ids=list(ids)), timeout)
        return response.removed, list(response.missing)

    async def export_places(self, index: str, timeout: float | None = None) -> PlaceArrays:
        """Every place of an index with its descriptor, in the order added."""
        reader = ExportReader()
        call = self._stub().ExportPlaces(places_pb2.ExportPlacesRequest(index=index),
                                         timeout=timeout, metadata=self.config.metadata())
        try:
            async for message in call:
                reader.read(message)
        except grpc.RpcError as exc:
            raise rpc_error("ExportPlaces", exc, self.config, 1) from None
        return reader.arrays()

    async def export_npz(self, index: str, path: str | Path,
                         timeout: float | None = None) -> int:
        """Export an index to a .npz (see PlaceArrays.save_npz); returns the places written."""
        arrays = await self.export_places(index, timeout)
        arrays.save_npz(path)
        return len(arrays.ids)

    async def import_npz(self, index: str, path: str | Path, *, batch_size: int = ADD_BATCH,
                         timeout: float | None = None) -> AddResult:
        """Add the places of a .npz to an existing index (refused if another model made it)."""
        arrays = PlaceArrays.load_npz(path)
        return await self.add_places(index, arrays.places(), batch_size=batch_size,
                                     weights_sha256=arrays.weights_sha256, timeout=timeout)
