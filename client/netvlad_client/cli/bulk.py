"""Describing many images into a row file: concurrent requests, progress, resume, interrupts.

`describe` and `evaluate` both fill their rows through `describe_rows`; the requests themselves
go through the library's bulk describer (`describe_concurrently`).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from netvlad_client import NetVLADClient, NetVLADError, describe_concurrently
from netvlad_client._proto import netvlad_pb2
from netvlad_client.cli.common import EXIT_ERROR, EXIT_INTERRUPTED
from netvlad_client.progress import Progress, choose_mode
from netvlad_client.rowstore import Checkpoint, RowFile


class _Interrupted(Exception):
    """SIGTERM turned into an exception so that finished work is saved before exit."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise _Interrupted(signal.Signals(signum).name)


@dataclass(frozen=True)
class BulkSettings:
    """How a bulk run sends its images."""

    batch_size: int | None = None  # images per request; None: the server's max batch size
    concurrency: int = 2
    resize: str | None = None
    progress: str = "auto"  # auto | always | never
    resume_hint: str | None = None  # said after a failure when no checkpoint is kept


def checkpoint_for(out: Path, info: netvlad_pb2.ModelInfo, dims: int,
                   resize: str | None) -> Checkpoint:
    """The resume checkpoint OUT.partial/, tied to the model and the options that shape rows."""
    return Checkpoint(
        out.with_name(out.name + ".partial"),
        {
            "model_name": info.model_name,
            "weight_source": info.weight_source,
            "weight_format": info.weight_format,
            "precision": info.precision,
            "output_dims": info.output_dims,
            "dims": dims,
            "resize": resize,
        },
    )


def default_batch_size(info: netvlad_pb2.ModelInfo) -> int:
    """Images per request: the server's max batch size, within its per-request limit."""
    limits = info.batching
    return min(limits.max_batch_size or 16, limits.max_images_per_request or 1 << 30)


def describe_rows(client: NetVLADClient, info: netvlad_pb2.ModelInfo, rows: RowFile,
                  settings: BulkSettings, checkpoint: Checkpoint | None = None,
                  stream: TextIO | None = None) -> int | None:
    """Fill `rows`: from the checkpoint of an interrupted run, then through the server.

    Returns None when every row is filled, else the exit status after saying on `stream` what
    happened (whatever finished is in `rows` and the checkpoint).
    """
    stream = stream or sys.stderr
    unique = rows.names
    if checkpoint is not None:
        checkpoint.open()
        for names, saved in checkpoint.saved():  # one chunk in memory at a time
            keep = [i for i, name in enumerate(names) if name in rows]
            rows.put([names[i] for i in keep], saved[keep])
        if rows.count():
            print(f"resuming: {rows.count()} of {len(unique)} images already described in "
                  f"{checkpoint.directory}", file=stream)
    batch_size = settings.batch_size or default_batch_size(info)
    todo = [name for name in unique if not rows.filled(name)]
    stopped = _describe_missing(client, todo, batch_size, rows, settings, checkpoint, stream)
    if stopped is None:
        return None
    interrupted, message = stopped
    if checkpoint is not None:
        message += (f"; {rows.count()} of {len(unique)} images are saved in "
                    f"{checkpoint.directory}, run the same command again to finish")
    elif len(todo) > batch_size and settings.resume_hint:
        message += f"; {settings.resume_hint}"
    print(f"netvlad-client: {message}", file=stream)
    return EXIT_INTERRUPTED if interrupted else EXIT_ERROR


def _describe_missing(client: NetVLADClient, todo: list[str], batch_size: int, done: RowFile,
                      settings: BulkSettings, checkpoint: Checkpoint | None, stream: TextIO
                      ) -> tuple[bool, str] | None:
    """Describe `todo` into `done`, checkpointing each finished request.

    Returns None when all is done, else (interrupted, message) after an interrupt (Ctrl-C,
    SIGTERM) or an error.
    """
    chunks: Sequence[list[str]] = [todo[i : i + batch_size]
                                   for i in range(0, len(todo), batch_size)]
    mode = choose_mode(settings.progress, stream, worth_it=len(chunks) > 1)
    progress = Progress(len(todo), mode=mode, stream=stream)

    def lowered(concurrency: int, per_request: int, queue: int) -> None:
        print(f"note: {settings.concurrency} requests of {per_request} images would overfill "
              f"the server's queue of {queue}; sending {concurrency} at a time", file=stream)

    results = describe_concurrently(
        client, chunks, settings.concurrency, on_lowered=lowered, dims=done.dims,
        batch_size=batch_size, resize=settings.resize,
    )
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if main_thread else None
    try:
        for index, rows in results:
            if checkpoint is not None:
                checkpoint.save(chunks[index], rows)
            done.put(chunks[index], rows)
            progress.advance(len(rows))
    except (KeyboardInterrupt, _Interrupted):
        client.close()  # ends the calls in flight at once
        results.close()
        return True, "interrupted"
    except NetVLADError as exc:
        return False, f"error: {exc}"
    finally:
        progress.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return None
