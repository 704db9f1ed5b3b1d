"""The place index calls ("have I been here before?") for NetVLADClient and AsyncNetVLADClient.

`PlaceCalls` (blocking) and `AsyncPlaceCalls` (asyncio) are mixed into the two clients; both
build the same messages and read the same answers through the helpers here, and use the
clients' channel, retry policy, TLS and token. docs/PLACES.md describes every call.

Places go to the server as a `Place` (an image or a ready descriptor, optional timestamp,
position and string metadata). Answers come back as `Match` rows, best first. `PlaceArrays`
is an exported index (ids, descriptors, timestamps, positions, metadata) and its `.npz` file,
which `netvlad-client evaluate --descriptors` and numpy read directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from netvlad_client._proto import netvlad_pb2, places_pb2
from netvlad_client.errors import NetVLADInputError, NetVLADRPCError, status_code
from netvlad_client.inputs import ImageInput, image_message, priority_value, resize_policy

ADD_BATCH = 32  # places per AddPlaces request (within the server's default limits)
METHODS = {"exact": places_pb2.SEARCH_METHOD_EXACT, "hnsw": places_pb2.SEARCH_METHOD_HNSW}
METHOD_NAMES = {value: name for name, value in METHODS.items()}
METHOD_NAMES[places_pb2.SEARCH_METHOD_UNSPECIFIED] = "exact"


@dataclass(frozen=True)
class Place:
    """One place to add: `image` (path, bytes or array) or `descriptor` (unit vector)."""

    id: str
    image: ImageInput | None = None
    descriptor: np.ndarray | Sequence[float] | None = None
    timestamp: float | None = None
    position: tuple[float, float, float] | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Match:
    """One query answer: a stored place and its cosine similarity to the query."""

    id: str
    similarity: float
    timestamp: float | None
    position: tuple[float, float, float] | None
    metadata: dict[str, str]


@dataclass(frozen=True)
class IndexInfo:
    """An index: name, places, dims, search method, memory, model identity (or load error)."""

    name: str
    size: int
    dims: int
    method: str
    bytes: int
    weights_sha256: str
    precision: str
    model_name: str
    error: str = ""


@dataclass(frozen=True)
class AddResult:
    """What an add did: places sent, ids whose old entry was replaced, index size after."""

    added: int
    replaced: list[str]
    size: int


@dataclass(frozen=True)
class LoopClosure:
    """One keyframe's answer: its candidates (best first) or the error for that frame."""

    sequence: int
    id: str
    matches: list[Match]
    replaced: bool
    size: int
    error: NetVLADRPCError | None = None

    @property
    def ok(self) -> bool:
        """True when the keyframe was queried and added."""
        return self.error is None


@dataclass
class PlaceArrays:
    """Every place of an index as arrays (NaN marks a missing timestamp or position)."""

    ids: list[str]
    descriptors: np.ndarray  # (N, dims) float32
    timestamps: np.ndarray  # (N,) float64
    positions: np.ndarray  # (N, 3) float64
    metadata: list[dict[str, str]]
    weights_sha256: str = ""

    def save_npz(self, path: str | Path) -> None:
        """Write the .npz (atomically): `descriptors` and `names` as evaluate reads them, plus
        `ids`, `timestamps`, `positions`, `metadata` (JSON per place) and `weights_sha256`."""
        arrays = {"descriptors": np.asarray(self.descriptors, np.float32),
                  "names": np.array(self.ids, dtype=str), "ids": np.array(self.ids, dtype=str),
                  "timestamps": self.timestamps, "positions": self.positions,
                  "metadata": np.array([json.dumps(m) for m in self.metadata], dtype=str),
                  "weights_sha256": np.array(self.weights_sha256)}
        from netvlad_client.formats import atomic_write  # formats imports the package root

        atomic_write(Path(path), lambda handle: np.savez(handle, **arrays))

    @classmethod
    def load_npz(cls, path: str | Path) -> PlaceArrays:
        """Read a file save_npz wrote (or any .npz with `descriptors` and `ids` or `names`)."""
        try:
            archive = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise NetVLADInputError(f"cannot read the place file {path}: {exc}") from None
        with archive:
            files = set(archive.files)
            key = "ids" if "ids" in files else "names"
            if "descriptors" not in files or key not in files:
                raise NetVLADInputError(f"{path}: a place file needs 'descriptors' and 'ids' (or "
                                        f"'names') arrays; it holds {', '.join(sorted(files))}")
            descriptors = np.asarray(archive["descriptors"], np.float32)
            count = len(descriptors)
            ids = [str(i) for i in archive[key]]
            return cls(ids, descriptors,
                       archive["timestamps"] if "timestamps" in files else np.full(count, np.nan),
                       archive["positions"] if "positions" in files else np.full((count, 3),
                                                                                 np.nan),
                       [json.loads(str(m)) for m in archive["metadata"]] if "metadata" in files
                       else [{} for _ in ids],
                       str(archive["weights_sha256"]) if "weights_sha256" in files else "")

    def places(self) -> list[Place]:
        """The rows as Place values (descriptors) for add_places."""
        return [Place(place_id, descriptor=self.descriptors[i],
                      timestamp=None if math.isnan(self.timestamps[i]) else
                      float(self.timestamps[i]),
                      position=None if math.isnan(self.positions[i][0]) else
                      tuple(self.positions[i].tolist()),
                      metadata=self.metadata[i]) for i, place_id in enumerate(self.ids)]


# ------------------------------------------------------------------ messages (sync and async)

def method_value(method: str) -> int:
    """The SearchMethod of "exact" or "hnsw"."""
    if method not in METHODS:
        raise NetVLADInputError(f"search method {method!r}: use one of {', '.join(METHODS)}")
    return METHODS[method]


def place_message(place: Place) -> places_pb2.Place:
    """A Place on the wire."""
    if (place.image is None) == (place.descriptor is None):
        raise NetVLADInputError(f"place {place.id!r}: give exactly one of image and descriptor")
    message = places_pb2.Place(id=place.id, metadata=place.metadata)
    if place.image is not None:
        message.image.CopyFrom(image_message(place.image, ""))
    else:
        message.descriptor.values.extend(np.asarray(place.descriptor, np.float32).tolist())
    if place.timestamp is not None:
        message.timestamp = place.timestamp
    if place.position is not None:
        x, y, z = place.position
        message.position.CopyFrom(places_pb2.Position(x=x, y=y, z=z))
    return message


def query_options(k: int, min_similarity: float | None, exclude_within_seconds: float,
                  exclude_last: int) -> places_pb2.QueryOptions:
    """QueryOptions (checked by the server)."""
    options = places_pb2.QueryOptions(k=k, exclude_within_seconds=exclude_within_seconds,
                                      exclude_last=exclude_last)
    if min_similarity is not None:
        options.min_similarity = min_similarity
    return options


def query_request(index: str, image: ImageInput | None, descriptor: object,
                  timestamp: float | None, options: places_pb2.QueryOptions,
                  resize: str | int | None, priority: int) -> places_pb2.QueryPlacesRequest:
    """A QueryPlacesRequest by image or by descriptor."""
    if (image is None) == (descriptor is None):
        raise NetVLADInputError("query: give exactly one of image and descriptor")
    request = places_pb2.QueryPlacesRequest(index=index, options=options, priority=priority)
    if image is not None:
        request.image.CopyFrom(image_message(image, ""))
    else:
        request.descriptor.values.extend(np.asarray(descriptor, np.float32).tolist())
    if timestamp is not None:
        request.timestamp = timestamp
    policy = resize_policy(resize)
    if policy is not None:
        request.resize.CopyFrom(policy)
    return request


def query_and_add_request(index: str, place: Place, options: places_pb2.QueryOptions,
                          resize: str | int | None, priority: int
                          ) -> places_pb2.QueryAndAddRequest:
    """A QueryAndAddRequest: query with the place, then add it."""
    request = places_pb2.QueryAndAddRequest(index=index, place=place_message(place),
                                            options=options, priority=priority)
    policy = resize_policy(resize)
    if policy is not None:
        request.resize.CopyFrom(policy)
    return request


def add_requests(index: str, places: Iterable[Place], batch_size: int, resize: str | int | None,
                 priority: int, weights_sha256: str = ""
                 ) -> Iterable[places_pb2.AddPlacesRequest]:
    """AddPlacesRequests of at most batch_size places each."""
    if batch_size < 1:
        raise NetVLADInputError(f"batch_size must be at least 1, got {batch_size}")
    policy = resize_policy(resize)
    chunk: list[places_pb2.Place] = []
    for place in places:
        chunk.append(place_message(place))
        if len(chunk) == batch_size:
            yield _add_request(index, chunk, policy, priority, weights_sha256)
            chunk = []
    if chunk:
        yield _add_request(index, chunk, policy, priority, weights_sha256)


def _add_request(index: str, places: list[places_pb2.Place],
                 policy: netvlad_pb2.ResizePolicy | None, priority: int,
                 weights_sha256: str) -> places_pb2.AddPlacesRequest:
    request = places_pb2.AddPlacesRequest(index=index, places=places, priority=priority,
                                          weights_sha256=weights_sha256)
    if policy is not None:
        request.resize.CopyFrom(policy)
    return request


def matches(messages: Iterable[places_pb2.Match]) -> list[Match]:
    """Match rows from the wire."""
    return [Match(m.id, m.similarity, m.timestamp if m.HasField("timestamp") else None,
                  (m.position.x, m.position.y, m.position.z) if m.HasField("position") else None,
                  dict(m.metadata)) for m in messages]


def index_info(info: places_pb2.IndexInfo) -> IndexInfo:
    """IndexInfo from the wire."""
    return IndexInfo(info.name, info.size, info.dims, METHOD_NAMES.get(info.method, "unknown"),
                     info.bytes, info.model.weights_sha256, info.model.precision,
                     info.model.model_name, info.error)


def loop_closure(message: places_pb2.StreamLoopClosureResponse, place_id: str,
                 target: str) -> LoopClosure:
    """One stream answer."""
    if message.WhichOneof("outcome") == "error":
        error = NetVLADRPCError("StreamLoopClosure", status_code(message.error.code),
                                message.error.message, target)
        return LoopClosure(message.sequence, place_id, [], False, 0, error)
    response = message.response
    return LoopClosure(message.sequence, place_id, matches(response.matches), response.replaced,
                       response.size)


class ExportReader:
    """Collects ExportPlaces messages into PlaceArrays."""

    def __init__(self) -> None:
        self.info: places_pb2.IndexInfo | None = None
        self.places: list[places_pb2.Place] = []

    def read(self, message: places_pb2.ExportPlacesResponse) -> None:
        """Take one stream message."""
        if message.HasField("index"):
            self.info = message.index
        self.places.extend(message.places)

    def arrays(self) -> PlaceArrays:
        """Every place read."""
        dims = self.info.dims if self.info is not None else 0
        count = len(self.places)
        descriptors = np.zeros((count, dims), np.float32)
        timestamps = np.full(count, np.nan)
        positions = np.full((count, 3), np.nan)
        for i, place in enumerate(self.places):
            descriptors[i] = place.descriptor.values
            if place.HasField("timestamp"):
                timestamps[i] = place.timestamp
            if place.HasField("position"):
                positions[i] = (place.position.x, place.position.y, place.position.z)
        return PlaceArrays([p.id for p in self.places], descriptors, timestamps, positions,
                           [dict(p.metadata) for p in self.places],
                           self.info.model.weights_sha256 if self.info is not None else "")


def merge_adds(results: Iterable[places_pb2.AddPlacesResponse]) -> AddResult:
    """One AddResult over several AddPlaces answers."""
    added, replaced, size = 0, [], 0
    for response in results:
        added += response.added
        replaced.extend(response.replaced)
        size = response.size
    return AddResult(added, replaced, size)


def call_priority(priority: str | int | None, default: int) -> int:
    """A call's priority: its own, else the client's (0 lets the server pick per call type)."""
    return priority_value(priority) if priority is not None else default
