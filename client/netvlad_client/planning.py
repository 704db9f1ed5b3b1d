"""How one describe call becomes requests, and how answers become rows; pure, no IO.

Images are split into consecutive runs that fit the server's `max_images_per_request`, the
message size limit and the caller's `batch_size`; each run is one DescribeImages request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from netvlad_client._proto import netvlad_pb2
from netvlad_client.config import ClientConfig
from netvlad_client.errors import NetVLADError, NetVLADInputError, NetVLADRPCError
from netvlad_client.inputs import (
    ImageInput,
    as_list,
    check_dims,
    image_id,
    image_message,
    image_size,
    priority_value,
    resize_policy,
)

# Room left in a request for ids and protobuf framing when packing images up to the byte limit.
_REQUEST_OVERHEAD_BYTES = 4096
_PER_IMAGE_OVERHEAD_BYTES = 64
# The server names a refused image by its position in the request: "image 3 (id '...'): ...".
_REFUSED_IMAGE = re.compile(r"(?:^|; )image (\d+)\b")


def plan_requests(sizes: Sequence[int], max_images: int, max_bytes: int) -> list[range]:
    """Split images into consecutive runs of at most max_images and about max_bytes each."""
    budget = max(1, max_bytes - _REQUEST_OVERHEAD_BYTES)
    runs: list[range] = []
    start, used = 0, 0
    for index, size in enumerate(sizes):
        cost = size + _PER_IMAGE_OVERHEAD_BYTES
        if index > start and (index - start >= max_images or used + cost > budget):
            runs.append(range(start, index))
            start, used = index, 0
        used += cost
    if start < len(sizes):
        runs.append(range(start, len(sizes)))
    return runs


def decode_descriptors(response: netvlad_pb2.DescribeImagesResponse, expected: int) -> np.ndarray:
    """The response's descriptors as an (N, D) float32 array, checked against the request."""
    if len(response.descriptors) != expected:
        raise NetVLADError(
            f"the server answered {len(response.descriptors)} descriptors for {expected} images"
        )
    dims = response.dims or (len(response.descriptors[0].values) if expected else 0)
    out = np.empty((expected, dims), dtype=np.float32)
    for row, descriptor in enumerate(response.descriptors):
        if len(descriptor.values) != dims:
            raise NetVLADError(
                f"descriptor {descriptor.id!r} has {len(descriptor.values)} values, expected {dims}"
            )
        out[row] = descriptor.values
    return out


class RequestPlan:
    """The DescribeImages requests of one call, split to fit the server's limits.

    Built in two steps so that bad arguments are refused before any call: the constructor
    checks the images and options, `fit` splits them once the server's limits are known.
    `priority` None is the client's default class (`ClientConfig.priority`).
    """

    def __init__(
        self,
        images: ImageInput | Iterable[ImageInput],
        config: ClientConfig,
        dims: int | None,
        resize: str | int | None,
        batch_size: int | None,
        priority: str | int | None = None,
    ):
        self.images = as_list(images)
        check_dims(dims)
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise NetVLADInputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.config = config
        self.batch_size = batch_size
        self.dims = dims if dims is not None else config.dims
        self.resize = resize_policy(resize if resize is not None else config.resize)
        self.priority = priority_value(priority) if priority is not None else config.priority
        self.runs: list[range] = []
        self.output_dims = self.dims or 0

    def fit(self, info: netvlad_pb2.ModelInfo) -> RequestPlan:
        """Split the images into runs within the server's limits (returns self)."""
        limits = info.batching
        max_images = limits.max_images_per_request or len(self.images) or 1
        if self.batch_size:
            max_images = min(max_images, self.batch_size)
        max_bytes = min(limits.max_message_bytes or self.config.max_message_bytes,
                        self.config.max_message_bytes)
        self.runs = plan_requests([image_size(image) for image in self.images], max_images,
                                  max_bytes)
        self.output_dims = self.dims or info.output_dims
        return self

    @property
    def largest_run(self) -> int:
        """Images in the largest request (0 when there are none)."""
        return max((len(run) for run in self.runs), default=0)

    def request(self, run: range) -> netvlad_pb2.DescribeImagesRequest:
        """The request for one run of images (files are read here, not before)."""
        request = netvlad_pb2.DescribeImagesRequest(
            images=[image_message(self.images[i], image_id(self.images[i], i)) for i in run],
            dims=self.dims or 0,
            priority=self.priority,  # type: ignore[arg-type]  # a Priority value
        )
        if self.resize is not None:
            request.resize.CopyFrom(self.resize)
        return request

    def rows(self, response: netvlad_pb2.DescribeImagesResponse, run: range) -> np.ndarray:
        """The descriptors answering the request of `run`."""
        return decode_descriptors(response, len(run))

    def name_refused(self, error: NetVLADRPCError, run: range) -> NetVLADRPCError:
        """Add the caller's names of the images a refusal points at by position."""
        positions = [int(found) for found in _REFUSED_IMAGE.findall(error.details)]
        error.images = [
            image_id(self.images[run[p]], run[p]) for p in positions if p < len(run)
        ]
        if error.images:
            error.args = (f"{error.args[0]} [refused: {', '.join(error.images)}]",)
        return error

    def empty(self) -> np.ndarray:
        """The (0, D) answer to a call with no images."""
        return np.empty((0, self.output_dims), dtype=np.float32)
