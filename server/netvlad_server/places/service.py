"""The gRPC PlaceIndexService: checks, descriptions through the shared batcher, the catalog.

Images in place requests become a DescribeImagesRequest handled by the DescriptorService's own
checks, queue and batcher (queries default to the interactive class, adds to bulk), so every
limit and the priority scheduling hold for them too. Changes go through the Catalog's commit
thread and are answered once durable; searches run in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client._proto import places_pb2 as ppb

from netvlad_server.config import ServerConfig
from netvlad_server.metrics import ServerMetrics
from netvlad_server.places import wire
from netvlad_server.places.catalog import Catalog
from netvlad_server.places.engine import IndexMeta, PlaceIndex, PlaceRows
from netvlad_server.places.limits import (
    DEFAULT_INDEX_DIMS,
    ModelIdentity,
    PlaceError,
    PlaceLimits,
    check_name,
    invalid,
)
from netvlad_server.places.stream import loop_closure_stream
from netvlad_server.service import (
    DescriptorService,
    MalformedMessage,
    ModelDescription,
    RequestError,
    message_parser,
    serialize_message,
)

PLACES_SERVICE_NAME = ppb.DESCRIPTOR.services_by_name["PlaceIndexService"].full_name
log = logging.getLogger(__name__)
_LOADING = "the model is still loading; retry when the gRPC health service reports SERVING"


def place_limits(config: ServerConfig) -> PlaceLimits:
    """The place-index limits of a configuration."""
    return PlaceLimits(config.max_indexes, config.max_places_per_request,
                       config.max_place_metadata_bytes, config.max_index_bytes)


class PlaceIndexService:
    """The PlaceIndexService methods; UNAVAILABLE until `attach` gives it the model's identity."""

    def __init__(self, config: ServerConfig, metrics: ServerMetrics,
                 describer: DescriptorService) -> None:
        self._config = config
        self.metrics = metrics
        self._describer = describer
        self.limits = place_limits(config)
        self.catalog = Catalog(config.index_path, self.limits, config.index_compact_bytes,
                               metrics.place_index_changed)
        self._identity: ModelIdentity | None = None

    async def attach(self, description: ModelDescription) -> None:
        """Load the stored indexes and start serving for the loaded model."""
        root = self.catalog.root
        if root is None:
            log.warning("place indexes are kept IN MEMORY only (--index-dir off): they are lost "
                        "when the server stops")
        else:
            log.info("place indexes are stored under %s (--index-dir)", root.resolve())
        await asyncio.to_thread(self.catalog.open)
        self._identity = ModelIdentity(description.weights_sha256, description.precision,
                                       description.output_dims, description.model_name)
        log.info("place indexes: %d loaded, %d refused; this server's model: %s",
                 len(self.catalog.indexes), len(self.catalog.broken), self._identity)

    async def close(self) -> None:
        """Finish submitted changes and close the logs."""
        await asyncio.to_thread(self.catalog.close)

    # ------------------------------------------------------------------------------ plumbing

    async def _call(self, method: str, request: Any, context: grpc.aio.ServicerContext,
                    handler: Callable[[Any, float | None], Awaitable[Any]]) -> Any:
        """Run one unary handler: errors become the call's status, metrics are counted."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await self.guard(request, context.time_remaining(), handler)
        except (PlaceError, RequestError) as exc:
            code = exc.code
            await context.abort(exc.code, exc.message, getattr(exc, "trailers", ()))
        finally:
            self.metrics.place_request_done(method, code, time.perf_counter() - start)

    async def guard(self, request: Any, timeout: float | None,
                     handler: Callable[[Any, float | None], Awaitable[Any]]) -> Any:
        """handler(request, timeout) once the model is known; unexpected failures -> INTERNAL."""
        if isinstance(request, MalformedMessage):
            raise PlaceError(request.error.code, request.error.message)
        if self._config.index_server:
            raise PlaceError(grpc.StatusCode.FAILED_PRECONDITION,
                             "this server keeps no place indexes (--index-server): they live on "
                             f"{self._config.index_server}; send index calls there (netvlad-client "
                             "--index-target, or a client connected to that server)")
        if self._identity is None:
            raise PlaceError(grpc.StatusCode.UNAVAILABLE, _LOADING)
        try:
            return await handler(request, timeout)
        except (PlaceError, RequestError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("unexpected failure in a place-index call")
            raise PlaceError(grpc.StatusCode.INTERNAL,
                             f"internal server error: {type(exc).__name__}: {exc}") from exc

    def _usable(self, name: str) -> PlaceIndex:
        """The index, refused unless it was made with this server's model."""
        index = self.catalog.get(name)
        if not index.meta.model.same_model(self._identity):
            raise PlaceError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"index {name!r} holds descriptors of {index.meta.model}; this "
                             f"server runs {self._identity}: mixing them would give meaningless "
                             "similarities. Serve the index with its own weights, or create a "
                             "new index for this model")
        return index

    async def _describe(self, images: list[pb.Image], index: PlaceIndex, resize: pb.ResizePolicy,
                        priority: int, default: int, timeout: float | None) -> np.ndarray:
        request = wire.describe_request(images, index.meta.dims, resize, priority, default)
        return await self._describer.describe_rows(request, timeout)

    # ----------------------------------------------------------------------------- handlers

    async def CreateIndex(self, request: ppb.CreateIndexRequest, context: Any) -> ppb.IndexInfo:
        """Create an index for this server's model."""
        return await self._call("CreateIndex", request, context, self._create)

    async def _create(self, request: ppb.CreateIndexRequest, _: float | None) -> ppb.IndexInfo:
        assert self._identity is not None
        output = self._identity.output_dims
        if request.dims > output:
            raise invalid(f"dims {request.dims} exceeds the model's {output} output values; "
                          f"ask for at most {output} (0: the default, "
                          f"{min(DEFAULT_INDEX_DIMS, output)})")
        meta = IndexMeta(check_name(request.name), request.dims or min(DEFAULT_INDEX_DIMS, output),
                         wire.method_name(request.method), self._identity)
        index = await asyncio.wrap_future(self.catalog.create(meta, request.exist_ok))
        return wire.index_info(index)

    async def ListIndexes(self, request: ppb.ListIndexesRequest, context: Any
                          ) -> ppb.ListIndexesResponse:
        """Every index, the server's model and limits."""
        return await self._call("ListIndexes", request, context, self._list)

    async def _list(self, request: ppb.ListIndexesRequest, _: float | None
                    ) -> ppb.ListIndexesResponse:
        assert self._identity is not None
        catalog, limits = self.catalog, self.limits
        infos = [wire.index_info(index) for index in list(catalog.indexes.values())]
        infos += [ppb.IndexInfo(name=name, error=error) for name, error in catalog.broken.items()]
        return ppb.ListIndexesResponse(
            indexes=sorted(infos, key=lambda info: info.name),
            server_model=wire.identity_message(self._identity),
            limits=ppb.PlaceIndexLimits(
                max_indexes=limits.max_indexes,
                max_places_per_request=limits.max_places_per_request,
                max_metadata_bytes=limits.max_metadata_bytes,
                max_total_bytes=limits.max_total_bytes, max_k=limits.max_k,
                default_dims=min(DEFAULT_INDEX_DIMS, self._identity.output_dims),
                durable=catalog.durable))

    async def DropIndex(self, request: ppb.DropIndexRequest, context: Any
                        ) -> ppb.DropIndexResponse:
        """Drop an index and its files."""
        return await self._call("DropIndex", request, context, self._drop)

    async def _drop(self, request: ppb.DropIndexRequest, _: float | None) -> ppb.DropIndexResponse:
        places = await asyncio.wrap_future(self.catalog.drop(request.name))
        return ppb.DropIndexResponse(places=places)

    async def AddPlaces(self, request: ppb.AddPlacesRequest, context: Any
                        ) -> ppb.AddPlacesResponse:
        """Add places, described when given as images; answered once durable."""
        return await self._call("AddPlaces", request, context, self._add)

    async def _add(self, request: ppb.AddPlacesRequest, timeout: float | None
                   ) -> ppb.AddPlacesResponse:
        index = self._usable(request.index)
        if request.weights_sha256 and request.weights_sha256 != index.meta.model.weights_sha256:
            raise PlaceError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the places were made with weights sha256 {request.weights_sha256}"
                             f"; index {request.index!r} holds descriptors of {index.meta.model}")
        count, limit = len(request.places), self.limits.max_places_per_request
        if count == 0:
            raise invalid("the request holds no places; add at least one to places")
        if count > limit:
            self.metrics.place_refused("places_per_request")
            raise PlaceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"the request holds {count} places; the limit is {limit} per "
                             "request (--max-places-per-request); nothing was added: split it")
        start = time.perf_counter()
        rows, images = wire.checked_rows(request.places, index.meta, self.limits)
        if images:
            described = await self._describe([request.places[i].image for i in images], index,
                                             request.resize, request.priority,
                                             pb.PRIORITY_BULK, timeout)
            rows.vectors[images] = described
        replaced, size = await self._commit_add(index, rows)
        self.metrics.place_add_seconds.observe(time.perf_counter() - start)
        return ppb.AddPlacesResponse(added=count, replaced=replaced, size=size)

    async def _commit_add(self, index: PlaceIndex, rows: PlaceRows) -> tuple[list[str], int]:
        try:
            return await asyncio.wrap_future(self.catalog.add(index.meta.name, rows))
        except PlaceError as exc:
            if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.metrics.place_refused("index_bytes")
            raise

    async def QueryPlaces(self, request: ppb.QueryPlacesRequest, context: Any
                          ) -> ppb.QueryPlacesResponse:
        """The best matches of an image or descriptor."""
        return await self._call("QueryPlaces", request, context, self._query)

    async def _query(self, request: ppb.QueryPlacesRequest, timeout: float | None
                     ) -> ppb.QueryPlacesResponse:
        index = self._usable(request.index)
        has_time = request.HasField("timestamp")
        options = wire.query_options(request.options, has_time, self.limits)
        source = request.WhichOneof("source")
        if source == "descriptor":
            vector = wire.check_descriptor(request.descriptor.values, index.meta.dims, "query")
        elif source == "image":
            vector = (await self._describe([request.image], index, request.resize,
                                           request.priority, pb.PRIORITY_INTERACTIVE, timeout))[0]
        else:
            raise invalid("the query holds neither an image nor a descriptor; set image or "
                          "descriptor")
        timestamp = request.timestamp if has_time else math.nan
        matches = await self._search(index, vector, timestamp, options)
        return ppb.QueryPlacesResponse(matches=matches)

    async def _search(self, index: PlaceIndex, vector: np.ndarray, timestamp: float,
                      options: tuple[int, float | None, float, int]) -> list[ppb.Match]:
        k, minimum, within, last = options
        start = time.perf_counter()
        found = await asyncio.to_thread(index.search, vector, k, minimum, timestamp, within, last)
        self.metrics.place_query_seconds.observe(time.perf_counter() - start)
        return [wire.match_message(item) for item in found]

    async def QueryAndAdd(self, request: ppb.QueryAndAddRequest, context: Any
                          ) -> ppb.QueryAndAddResponse:
        """Query with a new place, then add it."""
        return await self._call("QueryAndAdd", request, context, self._query_and_add)

    async def _query_and_add(self, request: ppb.QueryAndAddRequest, timeout: float | None
                             ) -> ppb.QueryAndAddResponse:
        return await self.finish_frame(await self.prepare_frame(request, timeout))

    async def prepare_frame(self, request: ppb.QueryAndAddRequest, timeout: float | None
                             ) -> tuple[PlaceIndex, PlaceRows, tuple]:
        """Check a query-then-add request and describe its image (frames of a stream do this
        concurrently)."""
        index = self._usable(request.index)
        place = request.place
        options = wire.query_options(request.options, place.HasField("timestamp"), self.limits)
        rows, images = wire.checked_rows([place], index.meta, self.limits)
        if images:
            rows.vectors[0] = (await self._describe([place.image], index, request.resize,
                                                    request.priority, pb.PRIORITY_INTERACTIVE,
                                                    timeout))[0]
        return index, rows, options

    async def finish_frame(self, prepared: tuple[PlaceIndex, PlaceRows, tuple]
                            ) -> ppb.QueryAndAddResponse:
        """Search, then add (frames of a stream do this one after another, in order)."""
        index, rows, options = prepared
        start = time.perf_counter()
        matches = await self._search(index, rows.vectors[0], float(rows.timestamps[0]), options)
        replaced, size = await self._commit_add(index, rows)
        self.metrics.place_add_seconds.observe(time.perf_counter() - start)
        return ppb.QueryAndAddResponse(matches=matches, replaced=bool(replaced), size=size)

    async def RemovePlaces(self, request: ppb.RemovePlacesRequest, context: Any
                           ) -> ppb.RemovePlacesResponse:
        """Remove places by id; answered once durable."""
        return await self._call("RemovePlaces", request, context, self._remove)

    async def _remove(self, request: ppb.RemovePlacesRequest, _: float | None
                      ) -> ppb.RemovePlacesResponse:
        self.catalog.get(request.index)
        if not request.ids:
            raise invalid("the request names no places; list their ids in ids")
        removed, missing, size = await asyncio.wrap_future(
            self.catalog.remove(request.index, list(request.ids)))
        return ppb.RemovePlacesResponse(removed=removed, missing=missing, size=size)

    async def ExportPlaces(self, request: ppb.ExportPlacesRequest, context: Any
                           ) -> AsyncIterator[ppb.ExportPlacesResponse]:
        """Stream every place with its descriptor, in the order added."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            index = await self.guard(request, None, self._export_index)
            rows = await asyncio.to_thread(index.rows)
            per_message = max(1, min(1024, self._config.max_message_bytes // 2 // (
                index.meta.dims * 4 + self.limits.max_metadata_bytes + 2048)))
            first = ppb.ExportPlacesResponse(index=wire.index_info(index))
            for offset in range(0, max(len(rows), 1), per_message):
                message = first if offset == 0 else ppb.ExportPlacesResponse()
                end = min(offset + per_message, len(rows))
                message.places.extend(wire.place_messages(rows, offset, end))
                yield message
        except PlaceError as exc:
            code = exc.code
            await context.abort(exc.code, exc.message)
        finally:
            self.metrics.place_request_done("ExportPlaces", code, time.perf_counter() - start)

    async def _export_index(self, request: ppb.ExportPlacesRequest, _: float | None
                            ) -> PlaceIndex:
        return self.catalog.get(request.index)

    async def StreamLoopClosure(self, request_iterator: AsyncIterator[Any], context: Any
                                ) -> AsyncIterator[ppb.StreamLoopClosureResponse]:
        """Each keyframe answered in order; a bad one gets its own error message."""
        async for message in loop_closure_stream(self, request_iterator, context,
                                                 self._config.max_stream_inflight):
            yield message


def add_place_index_service(servicer: PlaceIndexService, server: grpc.aio.Server) -> None:
    """Register the servicer; malformed messages are answered INVALID_ARGUMENT, not UNKNOWN."""
    unary = {"CreateIndex": ppb.CreateIndexRequest, "ListIndexes": ppb.ListIndexesRequest,
             "DropIndex": ppb.DropIndexRequest, "AddPlaces": ppb.AddPlacesRequest,
             "QueryPlaces": ppb.QueryPlacesRequest, "QueryAndAdd": ppb.QueryAndAddRequest,
             "RemovePlaces": ppb.RemovePlacesRequest}
    handlers = {name: grpc.unary_unary_rpc_method_handler(
        getattr(servicer, name), request_deserializer=message_parser(message),
        response_serializer=serialize_message) for name, message in unary.items()}
    handlers["ExportPlaces"] = grpc.unary_stream_rpc_method_handler(
        servicer.ExportPlaces, request_deserializer=message_parser(ppb.ExportPlacesRequest),
        response_serializer=serialize_message)
    handlers["StreamLoopClosure"] = grpc.stream_stream_rpc_method_handler(
        servicer.StreamLoopClosure,
        request_deserializer=message_parser(ppb.StreamLoopClosureRequest),
        response_serializer=serialize_message)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(PLACES_SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(PLACES_SERVICE_NAME, handlers)
