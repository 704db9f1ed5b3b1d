from netvlad_client._proto import netvlad_pb2 as _netvlad_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEARCH_METHOD_UNSPECIFIED: _ClassVar[SearchMethod]
    SEARCH_METHOD_EXACT: _ClassVar[SearchMethod]
    SEARCH_METHOD_HNSW: _ClassVar[SearchMethod]
SEARCH_METHOD_UNSPECIFIED: SearchMethod
SEARCH_METHOD_EXACT: SearchMethod
SEARCH_METHOD_HNSW: SearchMethod

class ModelIdentity(_message.Message):
    __slots__ = ("weights_sha256", "precision", "output_dims", "model_name")
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    weights_sha256: str
    precision: str
    output_dims: int
    model_name: str
    def __init__(self, weights_sha256: _Optional[str] = ..., precision: _Optional[str] = ..., output_dims: _Optional[int] = ..., model_name: _Optional[str] = ...) -> None: ...

class CreateIndexRequest(_message.Message):
    __slots__ = ("name", "dims", "method", "exist_ok")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    EXIST_OK_FIELD_NUMBER: _ClassVar[int]
    name: str
    dims: int
    method: SearchMethod
    exist_ok: bool
    def __init__(self, name: _Optional[str] = ..., dims: _Optional[int] = ..., method: _Optional[_Union[SearchMethod, str]] = ..., exist_ok: _Optional[bool] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("name", "size", "dims", "model", "bytes", "method", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    dims: int
    model: ModelIdentity
    bytes: int
    method: SearchMethod
    error: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., dims: _Optional[int] = ..., model: _Optional[_Union[ModelIdentity, _Mapping]] = ..., bytes: _Optional[int] = ..., method: _Optional[_Union[SearchMethod, str]] = ..., error: _Optional[str] = ...) -> None: ...

class PlaceIndexLimits(_message.Message):
    __slots__ = ("max_indexes", "max_places_per_request", "max_metadata_bytes", "max_total_bytes", "max_k", "default_dims", "durable")
    MAX_INDEXES_FIELD_NUMBER: _ClassVar[int]
    MAX_PLACES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_METADATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_DIMS_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    max_indexes: int
    max_places_per_request: int
    max_metadata_bytes: int
    max_total_bytes: int
    max_k: int
    default_dims: int
    durable: bool
    def __init__(self, max_indexes: _Optional[int] = ..., max_places_per_request: _Optional[int] = ..., max_metadata_bytes: _Optional[int] = ..., max_total_bytes: _Optional[int] = ..., max_k: _Optional[int] = ..., default_dims: _Optional[int] = ..., durable: _Optional[bool] = ...) -> None: ...

class ListIndexesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListIndexesResponse(_message.Message):
    __slots__ = ("indexes", "server_model", "limits")
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    SERVER_MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    indexes: _containers.RepeatedCompositeFieldContainer[IndexInfo]
    server_model: ModelIdentity
    limits: PlaceIndexLimits
    def __init__(self, indexes: _Optional[_Iterable[_Union[IndexInfo, _Mapping]]] = ..., server_model: _Optional[_Union[ModelIdentity, _Mapping]] = ..., limits: _Optional[_Union[PlaceIndexLimits, _Mapping]] = ...) -> None: ...

class DropIndexRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DropIndexResponse(_message.Message):
    __slots__ = ("places",)
    PLACES_FIELD_NUMBER: _ClassVar[int]
    places: int
    def __init__(self, places: _Optional[int] = ...) -> None: ...

class Position(_message.Message):
    __slots__ = ("x", "y", "z")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    z: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., z: _Optional[float] = ...) -> None: ...

class Place(_message.Message):
    __slots__ = ("id", "image", "descriptor", "timestamp", "position", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: _netvlad_pb2.Image
    descriptor: _netvlad_pb2.Descriptor
    timestamp: float
    position: Position
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., image: _Optional[_Union[_netvlad_pb2.Image, _Mapping]] = ..., descriptor: _Optional[_Union[_netvlad_pb2.Descriptor, _Mapping]] = ..., timestamp: _Optional[float] = ..., position: _Optional[_Union[Position, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AddPlacesRequest(_message.Message):
    __slots__ = ("index", "places", "resize", "priority", "weights_sha256")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PLACES_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    index: str
    places: _containers.RepeatedCompositeFieldContainer[Place]
    resize: _netvlad_pb2.ResizePolicy
    priority: _netvlad_pb2.Priority
    weights_sha256: str
    def __init__(self, index: _Optional[str] = ..., places: _Optional[_Iterable[_Union[Place, _Mapping]]] = ..., resize: _Optional[_Union[_netvlad_pb2.ResizePolicy, _Mapping]] = ..., priority: _Optional[_Union[_netvlad_pb2.Priority, str]] = ..., weights_sha256: _Optional[str] = ...) -> None: ...

class AddPlacesResponse(_message.Message):
    __slots__ = ("added", "replaced", "size")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    added: int
    replaced: _containers.RepeatedScalarFieldContainer[str]
    size: int
    def __init__(self, added: _Optional[int] = ..., replaced: _Optional[_Iterable[str]] = ..., size: _Optional[int] = ...) -> None: ...

class QueryOptions(_message.Message):
    __slots__ = ("k", "min_similarity", "exclude_within_seconds", "exclude_last")
    K_FIELD_NUMBER: _ClassVar[int]
    MIN_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_WITHIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_LAST_FIELD_NUMBER: _ClassVar[int]
    k: int
    min_similarity: float
    exclude_within_seconds: float
    exclude_last: int
    def __init__(self, k: _Optional[int] = ..., min_similarity: _Optional[float] = ..., exclude_within_seconds: _Optional[float] = ..., exclude_last: _Optional[int] = ...) -> None: ...

class QueryPlacesRequest(_message.Message):
    __slots__ = ("index", "image", "descriptor", "timestamp", "options", "resize", "priority")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    index: str
    image: _netvlad_pb2.Image
    descriptor: _netvlad_pb2.Descriptor
    timestamp: float
    options: QueryOptions
    resize: _netvlad_pb2.ResizePolicy
    priority: _netvlad_pb2.Priority
    def __init__(self, index: _Optional[str] = ..., image: _Optional[_Union[_netvlad_pb2.Image, _Mapping]] = ..., descriptor: _Optional[_Union[_netvlad_pb2.Descriptor, _Mapping]] = ..., timestamp: _Optional[float] = ..., options: _Optional[_Union[QueryOptions, _Mapping]] = ..., resize: _Optional[_Union[_netvlad_pb2.ResizePolicy, _Mapping]] = ..., priority: _Optional[_Union[_netvlad_pb2.Priority, str]] = ...) -> None: ...

class Match(_message.Message):
    __slots__ = ("id", "similarity", "timestamp", "position", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    similarity: float
    timestamp: float
    position: Position
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., similarity: _Optional[float] = ..., timestamp: _Optional[float] = ..., position: _Optional[_Union[Position, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class QueryPlacesResponse(_message.Message):
    __slots__ = ("matches",)
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[Match]
    def __init__(self, matches: _Optional[_Iterable[_Union[Match, _Mapping]]] = ...) -> None: ...

class QueryAndAddRequest(_message.Message):
    __slots__ = ("index", "place", "options", "resize", "priority")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PLACE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    index: str
    place: Place
    options: QueryOptions
    resize: _netvlad_pb2.ResizePolicy
    priority: _netvlad_pb2.Priority
    def __init__(self, index: _Optional[str] = ..., place: _Optional[_Union[Place, _Mapping]] = ..., options: _Optional[_Union[QueryOptions, _Mapping]] = ..., resize: _Optional[_Union[_netvlad_pb2.ResizePolicy, _Mapping]] = ..., priority: _Optional[_Union[_netvlad_pb2.Priority, str]] = ...) -> None: ...

class QueryAndAddResponse(_message.Message):
    __slots__ = ("matches", "replaced", "size")
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[Match]
    replaced: bool
    size: int
    def __init__(self, matches: _Optional[_Iterable[_Union[Match, _Mapping]]] = ..., replaced: _Optional[bool] = ..., size: _Optional[int] = ...) -> None: ...

class StreamLoopClosureRequest(_message.Message):
    __slots__ = ("sequence", "request")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    request: QueryAndAddRequest
    def __init__(self, sequence: _Optional[int] = ..., request: _Optional[_Union[QueryAndAddRequest, _Mapping]] = ...) -> None: ...

class StreamLoopClosureResponse(_message.Message):
    __slots__ = ("sequence", "response", "error")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    response: QueryAndAddResponse
    error: _netvlad_pb2.Status
    def __init__(self, sequence: _Optional[int] = ..., response: _Optional[_Union[QueryAndAddResponse, _Mapping]] = ..., error: _Optional[_Union[_netvlad_pb2.Status, _Mapping]] = ...) -> None: ...

class RemovePlacesRequest(_message.Message):
    __slots__ = ("index", "ids")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    index: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, index: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RemovePlacesResponse(_message.Message):
    __slots__ = ("removed", "missing", "size")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    removed: int
    missing: _containers.RepeatedScalarFieldContainer[str]
    size: int
    def __init__(self, removed: _Optional[int] = ..., missing: _Optional[_Iterable[str]] = ..., size: _Optional[int] = ...) -> None: ...

class ExportPlacesRequest(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: str
    def __init__(self, index: _Optional[str] = ...) -> None: ...

class ExportPlacesResponse(_message.Message):
    __slots__ = ("index", "places")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PLACES_FIELD_NUMBER: _ClassVar[int]
    index: IndexInfo
    places: _containers.RepeatedCompositeFieldContainer[Place]
    def __init__(self, index: _Optional[_Union[IndexInfo, _Mapping]] = ..., places: _Optional[_Iterable[_Union[Place, _Mapping]]] = ...) -> None: ...
