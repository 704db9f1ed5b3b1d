"""The shared half of `describe_stream`: one message per frame out, one StreamResult back.

A frame that cannot be converted (missing file, bad array) must surface in the caller, not
vanish inside gRPC's request-reading thread or task: `StreamFrames` keeps it and the drivers
raise it once the call has ended.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from netvlad_client._proto import netvlad_pb2
from netvlad_client.config import ClientConfig
from netvlad_client.errors import NetVLADRPCError, rpc_error, status_code
from netvlad_client.inputs import (
    ImageInput,
    check_dims,
    image_id,
    image_message,
    priority_value,
    resize_policy,
)
from netvlad_client.planning import decode_descriptors

METHOD = "StreamDescribeImages"


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


class StreamFrames:
    """One stream's options, its request messages and its answers.

    Frames are interactive unless the call or the client names a class: a stream is a camera
    or a robot waiting for each answer.
    """

    def __init__(self, config: ClientConfig, dims: int | None, resize: str | int | None,
                 priority: str | int | None = None):
        check_dims(dims)
        self.config = config
        self.dims = dims if dims is not None else config.dims
        self.policy = resize_policy(resize if resize is not None else config.resize)
        if priority is not None:
            self.priority = priority_value(priority)
        elif config.priority != netvlad_pb2.PRIORITY_UNSPECIFIED:
            self.priority = config.priority
        else:
            self.priority = netvlad_pb2.PRIORITY_INTERACTIVE
        self.failure: BaseException | None = None

    def request(self, sequence: int, frame: ImageInput) -> netvlad_pb2.StreamDescribeImagesRequest:
        """The stream message for one frame."""
        request = netvlad_pb2.DescribeImagesRequest(
            images=[image_message(frame, image_id(frame, sequence))], dims=self.dims or 0,
            priority=self.priority,  # type: ignore[arg-type]  # a Priority value
        )
        if self.policy is not None:
            request.resize.CopyFrom(self.policy)
        return netvlad_pb2.StreamDescribeImagesRequest(sequence=sequence, request=request)

    def failed(self, exc: BaseException) -> None:
        """Keep a frame's local failure, to be raised in the caller once the call ended."""
        self.failure = exc

    def result(self, message: netvlad_pb2.StreamDescribeImagesResponse) -> StreamResult:
        """One streamed answer as a StreamResult (descriptor or per-frame error)."""
        if message.WhichOneof("outcome") == "error":
            code = status_code(message.error.code)
            error = NetVLADRPCError(METHOD, code, message.error.message, self.config.target)
            return StreamResult(message.sequence, "", None, error)
        descriptors = decode_descriptors(message.response, len(message.response.descriptors))
        frame_id = message.response.descriptors[0].id if len(descriptors) else ""
        return StreamResult(message.sequence, frame_id, descriptors[0], None)

    def call_failed(self, exc: grpc.RpcError) -> None:
        """The call ended with an error: raise it, unless a local failure explains it."""
        if self.failure is None:
            raise rpc_error(METHOD, exc, self.config, 1) from None

    def finish(self) -> None:
        """Raise the local failure that ended the stream, if any."""
        if self.failure is not None:
            raise self.failure
