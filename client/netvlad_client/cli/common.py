"""What every `netvlad-client` subcommand shares: connection options, exit codes, input files.

Subcommand modules import from here (and from `bulk`), never from each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from netvlad_client import ClientConfig, NetVLADClient, NetVLADInputError
from netvlad_client.options import Option, choice, positive_int

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_TARGET = "127.0.0.1:50051"
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
    Option(("--target",), "HOST:PORT, IP:PORT,IP:PORT (round-robin) or dns:///NAME:PORT",
           default=DEFAULT_TARGET, env="NETVLAD_TARGET", group=CONNECTION),
    Option(("--timeout",), "deadline of each call in seconds", default=_client_default("timeout"),
           convert=float, env="NETVLAD_CLIENT_TIMEOUT", group=CONNECTION),
    Option(("--retries",), "retries of a call that fails with UNAVAILABLE or finds the server's "
           "queue full, with exponential backoff", default=_client_default("retries"),
           convert=int, env="NETVLAD_CLIENT_RETRIES", group=CONNECTION),
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
)


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


def client_config(args: argparse.Namespace) -> ClientConfig:
    """The client configuration the connection options describe."""
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
    )


def client_from_args(args: argparse.Namespace) -> NetVLADClient:
    """A NetVLADClient for the connection options."""
    return NetVLADClient.from_config(client_config(args))


def _problems(kind: str, items: Sequence[str]) -> str:
    """A short list of what went wrong ("missing files: a, b and 3 more")."""
    shown = ", ".join(items[:_SHOWN_PROBLEMS])
    more = len(items) - _SHOWN_PROBLEMS
    return f"{kind}: {shown}" + (f" and {more} more" if more > 0 else "")


def image_files(inputs: Iterable[str | os.PathLike[str]], recursive: bool = False) -> list[Path]:
    """Expand files and directories (sorted, image extensions only) into a list of image paths.

    Raises NetVLADInputError naming every missing path, non-image file and empty directory.
    """
    files: list[Path] = []
    missing: list[str] = []
    unknown: list[str] = []
    empty: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                (p for p in (path.rglob("*") if recursive else path.iterdir())
                 if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                key=lambda p: p.as_posix(),
            )
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

