"""Describing many images into a row file: concurrent requests, progress, resume, interrupts.

`describe` and `evaluate` both fill their rows through `describe_rows`; the requests run through
the library's scheduler (`run_concurrently`, the core of `describe_concurrently`). With
`--on-error skip` a request refused for some of its images' sake is sent again without them, and
those images are set aside with the reason; by default (`fail`) the first refusal stops the run.
Either way bad images are named by their path and their position in the input.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import grpc
import numpy as np

from netvlad_client import NetVLADClient, NetVLADError, NetVLADInputError
from netvlad_client._proto import netvlad_pb2
from netvlad_client.bulk import bulk_priority, fitted_concurrency, run_concurrently
from netvlad_client.cli.common import EXIT_ERROR, EXIT_INTERRUPTED, messages, say
from netvlad_client.errors import NetVLADRPCError
from netvlad_client.formats import atomic_write
from netvlad_client.inputs import image_message
from netvlad_client.options import Option, choice
from netvlad_client.progress import Progress, choose_mode
from netvlad_client.rowstore import Checkpoint, RowFile

ON_ERROR = ("fail", "skip")
_SKIPS_SHOWN = 10  # skipped images named one by one on stderr; the rest only counted
# Codes after which the same request may well succeed later: a rerun (or --resume) helps.
_TRANSIENT = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
})
# One image's part of the server's INVALID_ARGUMENT message: "image 3 (id '...'): why".
_IMAGE_PART = re.compile(r"(?:^|; )image (\d+)\b")
_LABEL_END = re.compile(r"^(?: \(id (?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\))?: ")


def on_error_option(group: str | None = None) -> Option:
    """--on-error fail|skip: what an image the client cannot read or the server refuses does."""
    return Option(("--on-error",), "an image that cannot be read or that the server refuses: "
                  "'fail' stops the run; 'skip' leaves it out (listed with the reason in a "
                  ".skipped.tsv file beside the output) and describes the rest", default="fail",
                  convert=choice(ON_ERROR), choices=ON_ERROR, group=group)


class _Interrupted(Exception):
    """SIGTERM turned into an exception so that finished work is saved before exit."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise _Interrupted(signal.Signals(signum).name)


class OutputClosed(Exception):
    """Raised by an `on_rows` hook whose reader went away (`| head`): stop describing at once."""


class ImagesRefused(NetVLADError):
    """A request failed for the sake of some of its images: `refused` maps name -> reason."""

    def __init__(self, cause: NetVLADError, refused: Mapping[str, str]) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.code = cause.code
        self.refused = dict(refused)


@dataclass(frozen=True)
class BulkSettings:
    """How a bulk run sends its images."""

    batch_size: int | None = None  # images per request; None: the server's max batch size
    concurrency: int = 2
    resize: str | None = None
    progress: str = "auto"  # auto | always | never
    resume_hint: str | None = None  # said after a failure when no checkpoint is kept
    on_error: str | None = None  # fail | skip (--on-error); None: strict, the command has no flag


@dataclass(frozen=True)
class _ChunkResult:
    """What one request of a bulk run gave: rows for `names`, and the images it left out."""

    names: list[str]
    rows: np.ndarray
    skipped: dict[str, str]


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


def _reasons(details: str) -> list[str]:
    """The per-image reasons of a server refusal, in the order the images are named."""
    found = list(_IMAGE_PART.finditer(details))
    reasons = []
    for here, after in zip(found, [*found[1:], None], strict=True):
        text = details[here.end(): after.start() if after else len(details)]
        label = _LABEL_END.match(text)
        text = text[label.end():] if label else text.lstrip(": ")
        reasons.append(re.sub(r"; and \d+ more$", "", text).strip())
    return reasons


def refused_images(names: Sequence[str], error: NetVLADError) -> dict[str, str]:
    """The images of one request to blame for `error` (name -> reason); empty when the error is
    not any one image's (a bad option, an unreachable server...)."""
    if isinstance(error, NetVLADRPCError):
        if error.code != grpc.StatusCode.INVALID_ARGUMENT or not error.images:
            return {}
        reasons = _reasons(error.details)
        if len(reasons) != len(error.images):
            reasons = [error.details] * len(error.images)
        return {name: f"{error.code.name}: {reason}"
                for name, reason in zip(error.images, reasons, strict=True) if name in names}
    if isinstance(error, NetVLADInputError):  # a file the client could not read: find which
        unreadable = {}
        for name in names:
            try:
                image_message(name, name)
            except NetVLADInputError as exc:
                unreadable[name] = str(exc)
        return unreadable
    return {}


def _describe_chunk(client: NetVLADClient, names: Sequence[str], skip: bool,
                    options: Mapping[str, object]) -> _ChunkResult:
    """Describe one chunk; with `skip`, leave out the images refused and describe the others."""
    left = list(names)
    skipped: dict[str, str] = {}
    while left:
        try:
            return _ChunkResult(left, client.describe(left, **options), skipped)
        except NetVLADError as exc:
            blamed = refused_images(left, exc)
            if not blamed:
                raise
            if not skip:
                raise ImagesRefused(exc, blamed) from None
            skipped.update(blamed)
            left = [name for name in left if name not in blamed]
    return _ChunkResult([], np.empty((0, int(options["dims"])), np.float32), skipped)


def describe_rows(client: NetVLADClient, info: netvlad_pb2.ModelInfo, rows: RowFile,
                  settings: BulkSettings, checkpoint: Checkpoint | None = None,
                  stream: TextIO | None = None, *, positions: Mapping[str, int] | None = None,
                  on_rows: Callable[[], None] | None = None) -> int | None:
    """Fill `rows`: from the checkpoint of an interrupted run, then through the server.

    Returns None when every row is filled or skipped (`rows.skipped`, with --on-error skip),
    else the exit status after saying on `stream` what happened (whatever finished is in `rows`
    and the checkpoint). `positions` gives each name's position in the input as messages
    report it (default: its row). `on_rows()` runs after each request's rows are stored; it may
    raise OutputClosed, which stops the run (no request starts after it) and is re-raised.
    """
    stream = messages(stream)
    unique = rows.names
    skip = settings.on_error == "skip"
    if checkpoint is not None:
        checkpoint.open()
        for names, saved in checkpoint.saved():  # one chunk in memory at a time
            keep = [i for i, name in enumerate(names) if name in rows]
            rows.put([names[i] for i in keep], saved[keep])
        if skip:
            for name, reason in checkpoint.skipped().items():
                if name in rows and not rows.filled(name):
                    rows.skip(name, reason)
        if rows.count() or rows.skipped:
            also = f" ({len(rows.skipped)} skipped before)" if rows.skipped else ""
            say(f"resuming: {rows.count()} of {len(unique)} images already described{also} "
                f"in {checkpoint.directory}", stream)
    batch_size = settings.batch_size or default_batch_size(info)
    todo = [name for name in unique if not rows.settled(name)]
    where = positions or {name: i for i, name in enumerate(unique)}
    stopped = _describe_missing(client, todo, batch_size, rows, settings, checkpoint, stream,
                                where, on_rows)
    if stopped is None:
        return None
    interrupted, error = stopped
    say(f"netvlad-client: {_failure_message(error, client, settings, checkpoint, rows, where)}",
        stream)
    return EXIT_INTERRUPTED if interrupted else EXIT_ERROR


def write_skipped(path: Path, skipped: Mapping[str, str], positions: Mapping[str, int]) -> None:
    """The list of skipped images (path, position in the input from 0, reason) as a TSV file,
    atomically; with nothing skipped, a list left by an earlier run is removed instead."""
    if not skipped:
        path.unlink(missing_ok=True)  # it would describe this run wrongly
        return
    lines = ["path\tposition\treason\n"]
    for name, reason in sorted(skipped.items(), key=lambda item: positions[item[0]]):
        cells = (name, str(positions[name]), reason)
        lines.append("\t".join(" ".join(cell.split()) for cell in cells) + "\n")
    text = "".join(lines).encode()
    atomic_write(path, lambda handle: handle.write(text))


def describe_position(name: str, positions: Mapping[str, int]) -> str:
    """How messages name an image of a bulk run: its path and position in the input."""
    return f"{name} (input #{positions[name]})"


def _failure_message(error: BaseException | None, client: NetVLADClient, settings: BulkSettings,
                     checkpoint: Checkpoint | None, rows: RowFile,
                     positions: Mapping[str, int]) -> str:
    """What stopped the run and the advice that helps with it (None: an interrupt)."""
    saved = (f"{rows.count()} of {len(rows.names)} images are saved in {checkpoint.directory}"
             if checkpoint is not None else None)
    resume = (f"; {saved}, run the same command again to finish" if saved
              else f"; {settings.resume_hint}" if settings.resume_hint else "")
    if error is None:
        return "interrupted" + resume
    if isinstance(error, ImagesRefused):
        code = error.code.name + ": " if error.code is not None else ""
        refused = "; ".join(f"{describe_position(name, positions)}: {reason}"
                            for name, reason in error.refused.items())
        fix = "fix or remove the image" + ("s" if len(error.refused) > 1 else "")
        if settings.on_error is not None:
            fix += ", or pass --on-error skip to describe the rest"
        return f"error: {code}refused {refused}; {fix}" + (f"; {saved}" if saved else "")
    message = f"error: {error}"
    code = getattr(error, "code", None)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message += (f"; each call may take --timeout {client.config.timeout:g} s: raise "
                    "--timeout (or lower --batch-size) for a slow or busy server")
    if code in _TRANSIENT:
        return message + resume
    return message + (f"; {saved}" if saved else "")


def _describe_missing(client: NetVLADClient, todo: list[str], batch_size: int, done: RowFile,
                      settings: BulkSettings, checkpoint: Checkpoint | None, stream: TextIO,
                      positions: Mapping[str, int], on_rows: Callable[[], None] | None
                      ) -> tuple[bool, BaseException | None] | None:
    """Describe `todo` into `done`, checkpointing each finished request.

    Returns None when all is done, else (interrupted, the error or None) after an interrupt
    (Ctrl-C, SIGTERM) or an error. On an interrupt the client is closed, which ends the calls in
    flight at once; their threads are never waited for.
    """
    chunks: Sequence[list[str]] = [todo[i : i + batch_size]
                                   for i in range(0, len(todo), batch_size)]
    mode = choose_mode(settings.progress, stream, worth_it=len(chunks) > 1)
    progress = Progress(len(todo), mode=mode, stream=stream)

    def lowered(concurrency: int, per_request: int, queue: int, queue_class: str) -> None:
        say(f"note: {settings.concurrency} requests of {per_request} images would overfill "
            f"the server's {queue_class} queue of {queue}; sending {concurrency} at a time",
            stream)

    skip = settings.on_error == "skip"
    priority = bulk_priority(client.config, len(chunks))
    options = {"dims": done.dims, "batch_size": batch_size, "resize": settings.resize,
               "priority": priority}
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if main_thread else None
    results = None
    shown = 0
    try:
        concurrency = fitted_concurrency(client, chunks, settings.concurrency, lowered,
                                         batch_size, priority)
        results = run_concurrently(lambda names: _describe_chunk(client, names, skip, options),
                                   chunks, concurrency)
        for _, result in results:
            if checkpoint is not None:
                if len(result.names):
                    checkpoint.save(result.names, result.rows)
                if result.skipped:
                    checkpoint.save_skipped(result.skipped)
            done.put(result.names, result.rows)
            for name, reason in result.skipped.items():
                done.skip(name, reason)
                if shown < _SKIPS_SHOWN:
                    say(f"note: skipped {describe_position(name, positions)}: {reason}", stream)
                shown += 1
            progress.advance(len(result.names) + len(result.skipped))
            if on_rows is not None:
                on_rows()
    except (KeyboardInterrupt, _Interrupted):
        client.close()  # ends the calls in flight at once
        return True, None
    except OutputClosed:
        client.close()
        raise
    except NetVLADError as exc:
        return False, exc
    finally:
        if results is not None:
            results.close()  # no request starts after this
        progress.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if shown > _SKIPS_SHOWN:
        say(f"note: {shown - _SKIPS_SHOWN} more images skipped", stream)
    return None
