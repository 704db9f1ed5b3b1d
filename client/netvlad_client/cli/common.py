"""What every `netvlad-client` subcommand shares: connection options, exit codes, input files.

Subcommand modules import from here (and from `bulk`), never from each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from netvlad_client import DEFAULT_PORT, ClientConfig, NetVLADClient, NetVLADInputError
from netvlad_client.inputs import PRIORITIES
from netvlad_client.options import Option, choice, int_range, positive_float, positive_int

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm",
                    ".pnm", ".pbm")
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"
PRIORITY_SETTINGS = tuple(PRIORITIES)
DEFAULT_CONCURRENCY = 2
PROGRESS_SETTINGS = ("auto", "always", "never")
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
_SHOWN_PROBLEMS = 5


def _client_default(name: str) -> object:
    """ClientConfig's own default of a field: the one definition of connection defaults."""
    return next(f.default for f in dataclasses.fields(ClientConfig) if f.name == name)


def resize_setting(text: str) -> str:
    """--resize: "keep", N or "fit:N", checked as ClientConfig checks it."""
    ClientConfig.build(DEFAULT_TARGET, resize=text)  # raises NetVLADInputError (a ValueError)
    return text


CONNECTION = "connection"
CONNECTION_OPTIONS: tuple[Option, ...] = (
    Option(("--target",), f"HOST[:PORT] (port {DEFAULT_PORT} when omitted), IP:PORT,IP:PORT "
           "(round-robin) or dns:///NAME:PORT", default=DEFAULT_TARGET, env="NETVLAD_TARGET",
           group=CONNECTION),
    Option(("--timeout",), "deadline of each call in seconds", default=_client_default("timeout"),
           convert=positive_float, env="NETVLAD_CLIENT_TIMEOUT", group=CONNECTION),
    Option(("--retries",), "retries of a call that fails with UNAVAILABLE or finds the server's "
           "queue full, with exponential backoff", default=_client_default("retries"),
           convert=int_range(0), env="NETVLAD_CLIENT_RETRIES", group=CONNECTION),
    Option(("--priority",), "the server's queue class of every request: interactive (someone "
           "waits for the answer) runs ahead of bulk (many requests back to back)",
           convert=choice(PRIORITY_SETTINGS, str.lower), choices=PRIORITY_SETTINGS,
           env="NETVLAD_CLIENT_PRIORITY", group=CONNECTION,
           shown_default="bulk for more than one request's worth of images and for evaluate "
           "and evaluate-retrieval; interactive for one request"),
    Option(("--tls",), "use TLS with the system's root certificates (implied by --tls-ca/"
           "--tls-cert)", default=_client_default("tls"), kind="switch", env="NETVLAD_CLIENT_TLS",
           group=CONNECTION),
    Option(("--tls-ca",), "PEM file of the CA that signed the server", env="NETVLAD_CLIENT_TLS_CA",
           group=CONNECTION),
    Option(("--tls-cert",), "client certificate PEM for mutual TLS",
           env="NETVLAD_CLIENT_TLS_CERT", group=CONNECTION),
    Option(("--tls-key",), "client private key PEM for mutual TLS", env="NETVLAD_CLIENT_TLS_KEY",
           group=CONNECTION),
    Option(("--tls-server-name",), "expect this name in the server certificate instead of the "
           "target's host", env="NETVLAD_CLIENT_TLS_SERVER_NAME", group=CONNECTION),
    Option(("--token-file",), "file whose first line is a bearer token, sent as 'authorization: "
           "Bearer ...'; blank and # comment lines are skipped, as the server's --token-file does",
           env="NETVLAD_CLIENT_TOKEN_FILE", group=CONNECTION),
    Option(("--verbose", "-v"), "also show gRPC's own log lines (connection and TLS details) on "
           "stderr; without it they are hidden unless GRPC_VERBOSITY is set", default=False,
           kind="switch", group=CONNECTION),
)


def dims_setting(text: str) -> int:
    """--dims: N keeps the first N values, re-normalised; 0 or "all" keeps every one (0)."""
    if text.strip().lower() == "all":
        return 0
    return int_range(0)(text)


def progress_option(help_text: str, group: str | None = None) -> Option:
    """--progress auto|always|never (a bar on stderr)."""
    return Option(("--progress",), help_text, default="auto", convert=choice(PROGRESS_SETTINGS),
                  choices=PROGRESS_SETTINGS, group=group)


def concurrency_option(help_text: str, group: str | None = None, metavar: str | None = None
                       ) -> Option:
    """--concurrency N: requests in flight at once."""
    return Option(("--concurrency",), help_text, default=DEFAULT_CONCURRENCY,
                  convert=positive_int, metavar=metavar, group=group)


def read_token(path: str | None) -> str | None:
    """The bearer token: the first line of the file that is neither blank nor a # comment."""
    if not path:
        return None
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except OSError as exc:
        raise NetVLADInputError(f"cannot read the token file {path}: {exc.strerror}") from None
    token = next((line for line in lines if line and not line.startswith("#")), None)
    if token is None:
        raise NetVLADInputError(f"the token file {path} is empty (only blank or # lines)")
    return token


def client_config(args: argparse.Namespace, priority: str | None = None) -> ClientConfig:
    """The client configuration the connection options describe.

    `priority` is the command's default class, used unless --priority says otherwise; None
    leaves the choice to each call (see `netvlad_client.bulk.bulk_priority`).
    """
    return ClientConfig.build(
        args.target,
        timeout=args.timeout,
        retries=args.retries,
        tls=args.tls,
        root_certificates=args.tls_ca,
        client_certificate=args.tls_cert,
        client_key=args.tls_key,
        server_name=args.tls_server_name,
        token=read_token(args.token_file),
        priority=args.priority or priority,
    )


def client_from_args(args: argparse.Namespace, priority: str | None = None) -> NetVLADClient:
    """A NetVLADClient for the connection options (`priority`: see `client_config`)."""
    return NetVLADClient.from_config(client_config(args, priority))


def _problems(kind: str, items: Sequence[str]) -> str:
    """A short list of what went wrong ("missing files: a, b and 3 more")."""
    shown = ", ".join(items[:_SHOWN_PROBLEMS])
    more = len(items) - _SHOWN_PROBLEMS
    return f"{kind}: {shown}" + (f" and {more} more" if more > 0 else "")


class MessageStream:
    """Messages to the user (stderr) that a reader gone away cannot turn into a failure.

    With `2>&1 | head` the reader may close the pipe while the run goes on: the first write
    that meets the closed pipe points the file descriptor at /dev/null and later messages are
    dropped, so results and the exit status never depend on who reads the messages.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        """Write text (or drop it once the reader is gone)."""
        if not self.reader_gone:
            try:
                self._stream.write(text)
            except OSError as exc:
                self._gone(exc)
        return len(text)

    def flush(self) -> None:
        """Flush (a no-op once the reader is gone)."""
        if not self.reader_gone:
            try:
                self._stream.flush()
            except OSError as exc:
                self._gone(exc)

    def isatty(self) -> bool:
        """Whether the stream is a terminal."""
        return not self.reader_gone and self._stream.isatty()

    def _gone(self, exc: OSError) -> None:
        if not isinstance(exc, BrokenPipeError) and exc.errno not in (errno.EPIPE, errno.EBADF):
            raise exc
        self.reader_gone = True
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError, AttributeError):
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)  # the interpreter's own flush at exit then succeeds quietly
        finally:
            os.close(devnull)


def messages(stream: TextIO | None = None) -> TextIO:
    """`stream` (default: standard error) as a MessageStream, once."""
    stream = stream if stream is not None else sys.stderr
    if isinstance(stream, MessageStream):
        return stream
    return MessageStream(stream)  # type: ignore[return-value]


def say(text: str, stream: TextIO | None = None) -> None:
    """One line for the user on standard error (or `stream`); a closed reader changes nothing."""
    print(text, file=messages(stream), flush=True)


def _scan(directory: Path, recursive: bool, broken: list[str], linked: list[str]) -> list[Path]:
    """The image files of a folder (and its sub-folders when recursive), unsorted.

    Broken symbolic links, and with `recursive` symbolic links to folders (not followed, so a
    link cannot make the scan loop), are listed in `broken` and `linked`.
    """
    found: list[Path] = []
    pending = [directory]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                path = Path(entry.path)
                if entry.is_symlink() and not path.exists():
                    broken.append(str(path))
                elif entry.is_dir():
                    if not recursive:
                        continue
                    if entry.is_symlink():
                        linked.append(str(path))
                    else:
                        pending.append(path)
                elif entry.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(path)
    return found


def image_files(inputs: Iterable[str | os.PathLike[str]], recursive: bool = False,
                notes: TextIO | None = None) -> list[Path]:
    """Expand files and directories (sorted, image extensions only) into a list of image paths.

    Raises NetVLADInputError naming every missing path, non-image file and empty directory.
    Broken symbolic links in a folder, and symbolic links to sub-folders (not followed) with
    `recursive`, are skipped with a note on `notes` (default: standard error).
    """
    files: list[Path] = []
    missing: list[str] = []
    unknown: list[str] = []
    empty: list[str] = []
    broken: list[str] = []
    linked: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(_scan(path, recursive, broken, linked), key=lambda p: p.as_posix())
            if found:
                files.extend(found)
            else:
                empty.append(str(path))
        elif path.is_file():
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(path)
            else:
                unknown.append(str(path))
        else:
            missing.append(str(path))
    if broken:
        say("note: " + _problems("skipped broken symbolic links", sorted(broken)), notes)
    if linked:
        say("note: " + _problems("did not follow symbolic links to folders (pass the folders "
                                 "themselves to describe them)", sorted(linked)), notes)
    problems = []
    if missing:
        problems.append(_problems("not found", missing))
    if unknown:
        problems.append(
            _problems(f"not an image file (expected {' '.join(IMAGE_EXTENSIONS)})", unknown)
        )
    if empty:
        problems.append(_problems("no image files in directory", empty))
    if problems:
        raise NetVLADInputError("; ".join(problems))
    return files
