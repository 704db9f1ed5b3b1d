from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResizeMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESIZE_MODE_UNSPECIFIED: _ClassVar[ResizeMode]
    RESIZE_MODE_KEEP: _ClassVar[ResizeMode]
    RESIZE_MODE_FIT_LONGEST_SIDE: _ClassVar[ResizeMode]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_INTERACTIVE: _ClassVar[Priority]
    PRIORITY_BULK: _ClassVar[Priority]
RESIZE_MODE_UNSPECIFIED: ResizeMode
RESIZE_MODE_KEEP: ResizeMode
RESIZE_MODE_FIT_LONGEST_SIDE: ResizeMode
PRIORITY_UNSPECIFIED: Priority
PRIORITY_INTERACTIVE: Priority
PRIORITY_BULK: Priority

class RawImage(_message.Message):
    __slots__ = ("data", "height", "width", "channels")
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    height: int
    width: int
    channels: int
    def __init__(self, data: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("id", "encoded", "raw")
    ID_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    id: str
    encoded: bytes
    raw: RawImage
    def __init__(self, id: _Optional[str] = ..., encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class ResizePolicy(_message.Message):
    __slots__ = ("mode", "longest_side")
    MODE_FIELD_NUMBER: _ClassVar[int]
    LONGEST_SIDE_FIELD_NUMBER: _ClassVar[int]
    mode: ResizeMode
    longest_side: int
    def __init__(self, mode: _Optional[_Union[ResizeMode, str]] = ..., longest_side: _Optional[int] = ...) -> None: ...

class DescribeImagesRequest(_message.Message):
    __slots__ = ("images", "dims", "resize", "priority")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    dims: int
    resize: ResizePolicy
    priority: Priority
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., dims: _Optional[int] = ..., resize: _Optional[_Union[ResizePolicy, _Mapping]] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class Descriptor(_message.Message):
    __slots__ = ("id", "values")
    ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    id: str
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, id: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class DescribeImagesResponse(_message.Message):
    __slots__ = ("descriptors", "dims")
    DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    descriptors: _containers.RepeatedCompositeFieldContainer[Descriptor]
    dims: int
    def __init__(self, descriptors: _Optional[_Iterable[_Union[Descriptor, _Mapping]]] = ..., dims: _Optional[int] = ...) -> None: ...

class StreamDescribeImagesRequest(_message.Message):
    __slots__ = ("sequence", "request")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    request: DescribeImagesRequest
    def __init__(self, sequence: _Optional[int] = ..., request: _Optional[_Union[DescribeImagesRequest, _Mapping]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StreamDescribeImagesResponse(_message.Message):
    __slots__ = ("sequence", "response", "error")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    response: DescribeImagesResponse
    error: Status
    def __init__(self, sequence: _Optional[int] = ..., response: _Optional[_Union[DescribeImagesResponse, _Mapping]] = ..., error: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BatchingLimits(_message.Message):
    __slots__ = ("max_batch_size", "max_queue_delay_ms", "max_queue_size", "max_images_per_request", "max_image_pixels", "min_image_side", "max_message_bytes", "max_bulk_queue_size")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MIN_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BULK_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    max_images_per_request: int
    max_image_pixels: int
    min_image_side: int
    max_message_bytes: int
    max_bulk_queue_size: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queue_delay_ms: _Optional[float] = ..., max_queue_size: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., min_image_side: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_bulk_queue_size: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "weight_source", "weight_format", "demo_weights", "output_dims", "num_clusters", "cluster_dim", "precision", "xla", "batching", "default_resize", "server_version", "tensorflow_version", "device", "default_priority")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    DEMO_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIMS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_DIM_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    XLA_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RESIZE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORFLOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    weight_source: str
    weight_format: str
    demo_weights: bool
    output_dims: int
    num_clusters: int
    cluster_dim: int
    precision: str
    xla: bool
    batching: BatchingLimits
    default_resize: ResizePolicy
    server_version: str
    tensorflow_version: str
    device: str
    default_priority: Priority
    def __init__(self, model_name: _Optional[str] = ..., weight_source: _Optional[str] = ..., weight_format: _Optional[str] = ..., demo_weights: _Optional[bool] = ..., output_dims: _Optional[int] = ..., num_clusters: _Optional[int] = ..., cluster_dim: _Optional[int] = ..., precision: _Optional[str] = ..., xla: _Optional[bool] = ..., batching: _Optional[_Union[BatchingLimits, _Mapping]] = ..., default_resize: _Optional[_Union[ResizePolicy, _Mapping]] = ..., server_version: _Optional[str] = ..., tensorflow_version: _Optional[str] = ..., device: _Optional[str] = ..., default_priority: _Optional[_Union[Priority, str]] = ...) -> None: ...
