"""Describing many images at once: several requests in flight, within the server's queue.

The server refuses a request its queue cannot take whole (RESOURCE_EXHAUSTED), so a client
that sends more images at once than the queue holds would overload an otherwise idle server;
`queue_safe_concurrency` lowers the number of requests in flight to what fits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import TYPE_CHECKING, Any

import numpy as np

from netvlad_client._proto import netvlad_pb2
from netvlad_client.inputs import ImageInput

if TYPE_CHECKING:
    from netvlad_client.client import NetVLADClient


def queue_safe_concurrency(info: netvlad_pb2.ModelInfo, concurrency: int,
                           images_per_request: int) -> int:
    """`concurrency` lowered so that the requests in flight fit the server's queue (at least 1)."""
    queue = info.batching.max_queue_size
    concurrency = max(1, concurrency)
    if not queue or images_per_request < 1:
        return concurrency
    return max(1, min(concurrency, queue // images_per_request))


def describe_concurrently(
    client: NetVLADClient,
    chunks: Sequence[Sequence[ImageInput]],
    concurrency: int,
    *,
    on_lowered: Callable[[int, int, int], None] | None = None,
    **options: Any,
) -> Iterator[tuple[int, np.ndarray]]:
    """Describe chunks with up to `concurrency` requests in flight; yields (chunk index, rows).

    Results come as they finish, not in order: the caller places them by index. After the
    first failure no further chunk starts, the chunks already in flight are still yielded, and
    then the failure is raised. `options` go to `NetVLADClient.describe`. `concurrency` is
    lowered where the server's queue could not hold that many requests at once;
    `on_lowered(concurrency, images per request, queue size)` then hears of it.
    """
    if chunks:
        info = client.model_info()
        per_request = max(len(chunk) for chunk in chunks)
        for limit in (info.batching.max_images_per_request, options.get("batch_size")):
            per_request = min(per_request, limit or per_request)
        safe = queue_safe_concurrency(info, concurrency, per_request)
        if safe < concurrency and on_lowered is not None:
            on_lowered(safe, per_request, info.batching.max_queue_size)
        concurrency = safe
    pool = futures.ThreadPoolExecutor(max_workers=max(1, concurrency))
    pending = {pool.submit(client.describe, chunk, **options): i for i, chunk in enumerate(chunks)}
    failure: BaseException | None = None
    try:
        for future in futures.as_completed(list(pending)):
            index = pending.pop(future)  # then nothing here keeps its rows alive once yielded
            if future.cancelled():
                continue
            if future.exception() is not None:
                if failure is None:
                    failure = future.exception()
                    for other in pending:
                        other.cancel()
                continue
            yield index, future.result()
    finally:
        # Never block here: an interrupted caller closes the client, which ends calls in flight.
        pool.shutdown(wait=False, cancel_futures=True)
    if failure is not None:
        raise failure
