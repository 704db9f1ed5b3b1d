"""Describing many images at once: several requests in flight, within the server's queue.

The server refuses a request its queue cannot take whole (RESOURCE_EXHAUSTED), so a client
that sends more images at once than the queue holds would overload an otherwise idle server;
`queue_safe_concurrency` lowers the number of requests in flight to what fits the queue of the
requests' priority class (bulk work has its own budget, `max_bulk_queue_size`).

Requests run on daemon threads that the consumer starts one at a time as earlier ones finish:
at most `concurrency` are ever in flight, none starts once the caller stops asking (a failure,
Ctrl-C, a closed output), and a call blocked on a silent server never holds up the exit of the
process (no thread pool to join at interpreter shutdown).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from netvlad_client._proto import netvlad_pb2
from netvlad_client.inputs import ImageInput, priority_name, priority_value

if TYPE_CHECKING:
    from netvlad_client.client import NetVLADClient
    from netvlad_client.config import ClientConfig

Chunk = TypeVar("Chunk")
Result = TypeVar("Result")


def queue_budget(info: netvlad_pb2.ModelInfo, priority: str | int | None = None
                 ) -> tuple[int, str]:
    """The queue budget (images, 0: unknown) of the class `priority` selects, and its name.

    None is the server's default class. A server from before priority classes reports no bulk
    budget (0): bulk work then shares `max_queue_size`, as it did there.
    """
    limits = info.batching
    name = priority_name(priority_value(priority), info.default_priority)
    if name == "bulk":
        return limits.max_bulk_queue_size or limits.max_queue_size, name
    return limits.max_queue_size, name


def bulk_priority(config: ClientConfig, requests: int, priority: str | int | None = None) -> int:
    """The class (wire value) of a job of `requests` requests: `priority` when given, else the
    client's default (`config.priority`), else bulk for several requests and interactive for
    one (someone is waiting for that answer)."""
    if priority is not None:
        return priority_value(priority)
    if config.priority != netvlad_pb2.PRIORITY_UNSPECIFIED:
        return config.priority
    return netvlad_pb2.PRIORITY_BULK if requests > 1 else netvlad_pb2.PRIORITY_INTERACTIVE


def queue_safe_concurrency(info: netvlad_pb2.ModelInfo, concurrency: int,
                           images_per_request: int, priority: str | int | None = None) -> int:
    """`concurrency` lowered so that the requests in flight fit the queue of their class
    (`priority`; None: the server's default class); at least 1."""
    queue_size, _ = queue_budget(info, priority)
    concurrency = max(1, concurrency)
    if not queue_size or images_per_request < 1:
        return concurrency
    return max(1, min(concurrency, queue_size // images_per_request))


def run_concurrently(work: Callable[[Chunk], Result], chunks: Sequence[Chunk],
                     concurrency: int) -> Iterator[tuple[int, Result]]:
    """Run `work(chunk)` for every chunk, at most `concurrency` at once; yield (index, result).

    Results come as they finish, not in order. A chunk starts only while the caller asks for
    more, so at most `concurrency` are in flight and none starts after the caller stops (closes
    the generator). After the first failure no further chunk starts, the chunks already in
    flight are still yielded, and then the failure is raised. Workers are daemon threads: a
    call still blocked when the caller gives up is abandoned, never joined.
    """
    finished: queue.SimpleQueue[tuple[int, Any, BaseException | None]] = queue.SimpleQueue()

    def run_one(index: int) -> None:
        try:
            finished.put((index, work(chunks[index]), None))
        except BaseException as exc:  # handed to the consumer, who raises it
            finished.put((index, None, exc))

    concurrency = max(1, concurrency)
    started = running = 0
    failure: BaseException | None = None
    while True:
        while failure is None and running < concurrency and started < len(chunks):
            threading.Thread(target=run_one, args=(started,), daemon=True,
                             name=f"netvlad-chunk-{started}").start()
            started += 1
            running += 1
        if running == 0:
            break
        index, result, error = finished.get()
        running -= 1
        if error is not None:
            failure = failure or error
            continue
        yield index, result
    if failure is not None:
        raise failure


def describe_concurrently(
    client: NetVLADClient,
    chunks: Sequence[Sequence[ImageInput]],
    concurrency: int,
    *,
    on_lowered: Callable[[int, int, int, str], None] | None = None,
    priority: str | int | None = None,
    **options: Any,
) -> Iterator[tuple[int, np.ndarray]]:
    """Describe chunks with up to `concurrency` requests in flight; yields (chunk index, rows).

    Results come as they finish, not in order: the caller places them by index. At most
    `concurrency` chunks are in flight; after the first failure no further chunk starts, the
    chunks already in flight are still yielded, and then the failure is raised. A caller that
    stops early (closes the generator) starts no more chunks; `client.close()` then ends the
    calls in flight. `options` go to `NetVLADClient.describe`.

    `priority` is the requests' class (see `bulk_priority`): bulk for more than one chunk and
    interactive for a single one, unless the call or the client names a class. `concurrency`
    is lowered where the class's queue could not hold that many requests at once;
    `on_lowered(concurrency, images per request, queue size, class name)` then hears of it.
    """
    priority = options["priority"] = bulk_priority(client.config, len(chunks), priority)
    concurrency = fitted_concurrency(client, chunks, concurrency, on_lowered,
                                     options.get("batch_size"), priority)
    yield from run_concurrently(lambda chunk: client.describe(chunk, **options), chunks,
                                concurrency)


def fitted_concurrency(client: NetVLADClient, chunks: Sequence[Sequence[Any]], concurrency: int,
                       on_lowered: Callable[[int, int, int, str], None] | None = None,
                       batch_size: int | None = None, priority: str | int | None = None) -> int:
    """`concurrency` lowered to what the queue of the requests' class holds for these chunks.

    `priority` None is the client's default class; `on_lowered` as in `describe_concurrently`.
    """
    if not chunks:
        return max(1, concurrency)
    info = client.model_info()
    per_request = max(len(chunk) for chunk in chunks)
    for limit in (info.batching.max_images_per_request, batch_size):
        per_request = min(per_request, limit or per_request)
    chosen = priority if priority is not None else client.config.priority
    safe = queue_safe_concurrency(info, concurrency, per_request, chosen)
    if safe < concurrency and on_lowered is not None:
        on_lowered(safe, per_request, *queue_budget(info, chosen))
    return safe
