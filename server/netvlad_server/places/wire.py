"""Between the wire and the engine: checked PlaceRows from request messages, answers back.

Every check names the field and the place (by position and id) that is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client._proto import places_pb2 as ppb

from netvlad_server.places.engine import Found, IndexMeta, PlaceIndex, PlaceRows
from netvlad_server.places.limits import (
    METHODS,
    ModelIdentity,
    PlaceLimits,
    check_finite,
    check_id,
    check_k,
    check_metadata,
    invalid,
)

UNIT_TOLERANCE = 1e-3  # |norm - 1| accepted for a descriptor sent by the caller
METHOD_NAMES = {ppb.SEARCH_METHOD_UNSPECIFIED: "exact", ppb.SEARCH_METHOD_EXACT: "exact",
                ppb.SEARCH_METHOD_HNSW: "hnsw"}
METHOD_VALUES = {"exact": ppb.SEARCH_METHOD_EXACT, "hnsw": ppb.SEARCH_METHOD_HNSW}
assert tuple(METHOD_VALUES) == METHODS


def method_name(value: int) -> str:
    """The engine's name of a SearchMethod value."""
    if value not in METHOD_NAMES:
        raise invalid(f"unknown search method {value}; use SEARCH_METHOD_EXACT "
                      f"({ppb.SEARCH_METHOD_EXACT}) or SEARCH_METHOD_HNSW "
                      f"({ppb.SEARCH_METHOD_HNSW})")
    return METHOD_NAMES[value]


def identity_message(identity: ModelIdentity) -> ppb.ModelIdentity:
    """ModelIdentity on the wire."""
    return ppb.ModelIdentity(weights_sha256=identity.weights_sha256,
                             precision=identity.precision, output_dims=identity.output_dims,
                             model_name=identity.model_name)


def index_info(index: PlaceIndex) -> ppb.IndexInfo:
    """IndexInfo of a loaded index."""
    meta = index.meta
    return ppb.IndexInfo(name=meta.name, size=index.size, dims=meta.dims,
                         model=identity_message(meta.model), bytes=index.nbytes,
                         method=METHOD_VALUES[meta.method])


def check_descriptor(values: Sequence[float], dims: int, where: str) -> np.ndarray:
    """A caller's descriptor: exactly dims finite values of unit length."""
    vector = np.asarray(values, dtype=np.float32)
    if vector.shape != (dims,):
        raise invalid(f"{where}: the descriptor has {vector.size} values; this index holds "
                      f"{dims}-value descriptors (ask DescribeImages for dims={dims})")
    if not np.isfinite(vector).all():
        raise invalid(f"{where}: the descriptor holds NaN or infinite values; send the values "
                      "the server described")
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if abs(norm - 1.0) > UNIT_TOLERANCE:
        raise invalid(f"{where}: the descriptor's length is {norm:.6g}, not 1; send unit "
                      "vectors (the first dims values of a descriptor re-normalised)")
    return vector


def where(position: int, place_id: str) -> str:
    """How a message names one place of a request."""
    return f"place {position}" + (f" ({place_id!r})" if place_id else "")


def checked_rows(places: Sequence[ppb.Place], meta: IndexMeta, limits: PlaceLimits
                 ) -> tuple[PlaceRows, list[int]]:
    """Rows for the places (image rows zero until described) and the positions of images."""
    count = len(places)
    vectors = np.zeros((count, meta.dims), np.float32)
    timestamps = np.full(count, math.nan)
    positions = np.full((count, 3), math.nan)
    ids: list[str] = []
    metadata: list[dict[str, str]] = []
    images: list[int] = []
    seen: dict[str, int] = {}
    for i, place in enumerate(places):
        label = where(i, place.id)
        ids.append(check_id(place.id, label))
        if place.id in seen:
            raise invalid(f"{label}: the id is also given to place {seen[place.id]} of this "
                          "request; ids must be unique within a request")
        seen[place.id] = i
        source = place.WhichOneof("source")
        if source == "descriptor":
            vectors[i] = check_descriptor(place.descriptor.values, meta.dims, label)
        elif source == "image":
            images.append(i)
        else:
            raise invalid(f"{label}: holds neither an image nor a descriptor; set Place.image "
                          "or Place.descriptor")
        if place.HasField("timestamp"):
            timestamps[i] = check_finite(place.timestamp, "the timestamp", label)
        if place.HasField("position"):
            p = place.position
            positions[i] = [check_finite(v, "the position", label) for v in (p.x, p.y, p.z)]
        metadata.append(check_metadata(place.metadata, label, limits))
    return PlaceRows(ids, vectors, timestamps, positions, metadata), images


def describe_request(images: Sequence[pb.Image], dims: int, resize: pb.ResizePolicy,
                     priority: int, default_priority: int) -> pb.DescribeImagesRequest:
    """The DescribeImagesRequest for a place request's images (its own default class)."""
    request = pb.DescribeImagesRequest(
        images=images, dims=dims, priority=priority or default_priority)
    request.resize.CopyFrom(resize)
    return request


def query_options(options: ppb.QueryOptions, has_timestamp: bool, limits: PlaceLimits
                  ) -> tuple[int, float | None, float, int]:
    """(k, min similarity or None, exclusion seconds, exclude last N), checked."""
    k = check_k(options.k, limits)
    minimum = None
    if options.HasField("min_similarity"):
        minimum = check_finite(options.min_similarity, "options.min_similarity", "the query")
    within = options.exclude_within_seconds
    if not (math.isfinite(within) and within >= 0):
        raise invalid(f"options.exclude_within_seconds is {within}; give 0 (off) or a "
                      "positive number of seconds")
    if within > 0 and not has_timestamp:
        raise invalid("options.exclude_within_seconds needs the query's timestamp; set "
                      "timestamp (or leave the exclusion at 0)")
    return k, minimum, within, options.exclude_last


def match_message(found: Found) -> ppb.Match:
    """One answer row."""
    match = ppb.Match(id=found.id, similarity=found.similarity, metadata=found.metadata)
    if not math.isnan(found.timestamp):
        match.timestamp = found.timestamp
    if found.position is not None:
        x, y, z = found.position
        match.position.CopyFrom(ppb.Position(x=x, y=y, z=z))
    return match


def place_messages(rows: PlaceRows, start: int, stop: int) -> list[ppb.Place]:
    """Export messages for rows[start:stop], descriptors included."""
    places = []
    for i in range(start, stop):
        place = ppb.Place(id=rows.ids[i], metadata=rows.metadata[i])
        place.descriptor.values.extend(rows.vectors[i].tolist())
        if not math.isnan(rows.timestamps[i]):
            place.timestamp = float(rows.timestamps[i])
        if not math.isnan(rows.positions[i][0]):
            x, y, z = rows.positions[i].tolist()
            place.position.CopyFrom(ppb.Position(x=x, y=y, z=z))
        places.append(place)
    return places
