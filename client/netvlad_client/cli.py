"""`netvlad-client`: describe images through a running server, show its model, check health.

Global options (before the subcommand) choose the server and the channel security; each has a
NETVLAD_* environment fallback. Errors end with a one-line message and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np
from google.protobuf import json_format

from netvlad_client import __version__
from netvlad_client._proto import netvlad_pb2
from netvlad_client.client import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    ClientConfig,
    NetVLADClient,
    NetVLADError,
    NetVLADInputError,
    describe_concurrently,
    resize_policy,
)
from netvlad_client.outputs import (
    BINARY_FORMATS,
    FORMATS,
    Checkpoint,
    RowFile,
    output_format,
    silence_closed_stdout,
    write_descriptors,
    write_stream,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_TARGET = "127.0.0.1:50051"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
_SHOWN_PROBLEMS = 5


def _env(name: str, default: str | None = None) -> str | None:
    """An environment fallback for a flag; empty counts as unset."""
    return os.environ.get(name) or default


class EnvDefault:
    """A flag's default taken from an environment variable and converted only after parsing
    (resolve_env_defaults), so that a bad value is blamed on the variable, not on the flag."""

    def __init__(self, name: str, text: str, convert: Callable[[str], object]) -> None:
        self.name, self.text, self.convert = name, text, convert

    def __str__(self) -> str:  # what %(default)s shows in --help
        return self.text


def env_default(name: str, convert: Callable[[str], object], default: object) -> object:
    """The default of a typed flag: NAME's value (checked later) when set, else `default`."""
    text = os.environ.get(name)
    return EnvDefault(name, text, convert) if text else default


def resolve_env_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Convert the environment defaults no flag overrode; a bad one ends like a bad flag."""
    for key, value in vars(args).items():
        if isinstance(value, EnvDefault):
            try:
                setattr(args, key, value.convert(value.text))
            except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
                parser.error(f"environment variable {value.name}={value.text!r}: {exc}")


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """Server address, timeout, retries, TLS and token flags (with NETVLAD_* fallbacks)."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target", default=_env("NETVLAD_TARGET", DEFAULT_TARGET),
        help="HOST:PORT, IP:PORT,IP:PORT (round-robin) or dns:///NAME:PORT "
             f"(env NETVLAD_TARGET, default {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--timeout", type=float,
        default=env_default("NETVLAD_CLIENT_TIMEOUT", float, DEFAULT_TIMEOUT),
        help="deadline of each call in seconds (env NETVLAD_CLIENT_TIMEOUT, default %(default)s)",
    )
    group.add_argument(
        "--retries", type=int,
        default=env_default("NETVLAD_CLIENT_RETRIES", int, DEFAULT_RETRIES),
        help="retries of a call that fails with UNAVAILABLE or finds the server's queue full, "
             "with exponential backoff "
             "(env NETVLAD_CLIENT_RETRIES, default %(default)s)",
    )
    group.add_argument(
        "--tls", action="store_true", default=_env("NETVLAD_CLIENT_TLS", "") not in ("", "0"),
        help="use TLS with the system's root certificates (implied by --tls-ca/--tls-cert; "
             "env NETVLAD_CLIENT_TLS=1)",
    )
    group.add_argument("--tls-ca", default=_env("NETVLAD_CLIENT_TLS_CA"),
                       help="PEM file of the CA that signed the server (env NETVLAD_CLIENT_TLS_CA)")
    group.add_argument("--tls-cert", default=_env("NETVLAD_CLIENT_TLS_CERT"),
                       help="client certificate PEM for mutual TLS (env NETVLAD_CLIENT_TLS_CERT)")
    group.add_argument("--tls-key", default=_env("NETVLAD_CLIENT_TLS_KEY"),
                       help="client private key PEM for mutual TLS (env NETVLAD_CLIENT_TLS_KEY)")
    group.add_argument(
        "--tls-server-name", default=_env("NETVLAD_CLIENT_TLS_SERVER_NAME"),
        help="expect this name in the server certificate instead of the target's host "
             "(env NETVLAD_CLIENT_TLS_SERVER_NAME)",
    )
    group.add_argument(
        "--token-file", default=_env("NETVLAD_CLIENT_TOKEN_FILE"),
        help="file whose first line is a bearer token, sent as 'authorization: Bearer ...'; "
             "blank and # comment lines are skipped, as the server's --token-file does "
             "(env NETVLAD_CLIENT_TOKEN_FILE)",
    )


def _read_token(path: str | None) -> str | None:
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
    """The client configuration the global options describe."""
    return ClientConfig.build(
        args.target,
        timeout=args.timeout,
        retries=args.retries,
        tls=args.tls,
        root_certificates=args.tls_ca,
        client_certificate=args.tls_cert,
        client_key=args.tls_key,
        server_name=args.tls_server_name,
        token=_read_token(args.token_file),
    )


def client_from_args(args: argparse.Namespace) -> NetVLADClient:
    """A NetVLADClient for the global options (used by every subcommand, evaluate included)."""
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


class Progress:
    """A one-line progress bar on a terminal (stderr); silent when not enabled."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None):
        self.total = total
        self.enabled = enabled and total > 0
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self._drawn = 0.0

    def advance(self, count: int) -> None:
        """Count finished images and redraw at most ten times a second."""
        self.done += count
        now = time.monotonic()
        if self.enabled and (now - self._drawn >= 0.1 or self.done >= self.total):
            self._drawn = now
            self.stream.write("\r" + self.line(now - self.start))
            self.stream.flush()

    def line(self, elapsed: float) -> str:
        """The bar text, e.g. "[#####     ] 50/100 images 12.5/s ETA 4s"."""
        width = 30
        filled = int(width * self.done / self.total)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = f" ETA {left / rate:.0f}s" if rate > 0 and left > 0 else ""
        bar = "#" * filled + " " * (width - filled)
        return f"[{bar}] {self.done}/{self.total} images {rate:.1f}/s{eta}   "

    def close(self) -> None:
        """End the line so later messages start on their own line."""
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()


def _chunks(names: Sequence[str], size: int) -> list[list[str]]:
    """Consecutive runs of at most size names."""
    return [list(names[i : i + size]) for i in range(0, len(names), size)]


class _Interrupted(Exception):
    """SIGTERM turned into an exception so that finished work is saved before exit."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def _describe_command(args: argparse.Namespace) -> int:
    """`describe`: images and folders in, one (N, D) float32 file out in input order.

    Without --out (or with --out -) the descriptors go to standard output: JSON lines by
    default, or --format csv|npy|npz|bin for a pipe.
    """
    to_stdout = args.out in (None, "-")
    if to_stdout:
        if args.resume:
            raise NetVLADInputError("--resume keeps its work next to the output file; pass "
                                    "--out FILE with it")
        fmt = args.format or "json"
        if fmt in BINARY_FORMATS and sys.stdout.isatty():
            raise NetVLADInputError(f"will not write binary .{fmt} to a terminal; pass --out "
                                    "FILE or redirect standard output")
        out = None
    else:
        out = Path(args.out)
        fmt = output_format(out, args.format)
        named = out.suffix.lower().lstrip(".")
        if named in FORMATS and named != fmt:
            print(f"note: writing {fmt} (--format) into {out}, whose name says {named}",
                  file=sys.stderr)
        if not out.parent.is_dir():
            raise NetVLADInputError(f"the output directory {out.parent} does not exist")
    names = [str(path) for path in image_files(args.images, recursive=args.recursive)]
    with client_from_args(args) as client:
        info = client.info()
        dims = args.dims or info.output_dims
        if dims > info.output_dims:
            raise NetVLADInputError(
                f"--dims {dims} is more than the model's {info.output_dims} output dimensions"
            )
        checkpoint = _checkpoint(args, out, info, dims) if out is not None else None
        if not args.resume and checkpoint is not None:
            if checkpoint.directory.exists():
                print(f"note: {checkpoint.directory} holds work of an interrupted run; pass "
                      "--resume to reuse it", file=sys.stderr)
            checkpoint = None
        unique = list(dict.fromkeys(names))
        # Rows go straight into the output file when it is .npy/.bin and every name is distinct.
        in_place = (out is not None and fmt in RowFile.IN_PLACE_FORMATS
                    and len(unique) == len(names))
        rows = RowFile(unique, dims, output=out if in_place else None, fmt=fmt,
                       scratch_dir=out.parent if out is not None else None)
        try:
            stopped = _describe_all(client, args, info, rows, checkpoint)
            if stopped is not None:
                return stopped
            return _write_output(rows, names, out, fmt, checkpoint)
        finally:
            rows.discard()


def _describe_all(client: NetVLADClient, args: argparse.Namespace, info: netvlad_pb2.ModelInfo,
                  rows: RowFile, checkpoint: Checkpoint | None) -> int | None:
    """Fill `rows`: from the checkpoint of an interrupted run, then through the server.

    Returns None when every row is filled, else the exit status after saying what happened.
    """
    unique = rows.names
    if checkpoint is not None:
        checkpoint.open()
        for names, saved in checkpoint.saved():  # one chunk in memory at a time
            keep = [i for i, name in enumerate(names) if name in rows]
            rows.put([names[i] for i in keep], saved[keep])
        if rows.count():
            print(f"resuming: {rows.count()} of {len(unique)} images already described in "
                  f"{checkpoint.directory}", file=sys.stderr)
    limits = info.batching
    batch_size = args.batch_size or min(
        limits.max_batch_size or 16, limits.max_images_per_request or 1 << 30
    )
    todo = [name for name in unique if not rows.filled(name)]
    stopped = _describe_missing(client, args, todo, batch_size, rows.dims, checkpoint, rows)
    if stopped is None:
        return None
    interrupted, message = stopped
    if checkpoint is not None:
        message += (f"; {rows.count()} of {len(unique)} images are saved in "
                    f"{checkpoint.directory}, run the same command again to finish")
    elif len(todo) > batch_size:
        message += "; pass --resume to keep finished work across runs"
    print(f"netvlad-client: {message}", file=sys.stderr)
    return EXIT_INTERRUPTED if interrupted else EXIT_ERROR


def _write_output(rows: RowFile, names: list[str], out: Path | None, fmt: str,
                  checkpoint: Checkpoint | None) -> int:
    """Write the filled rows in input order (to `out` or standard output); the exit status."""
    if len(names) == len(rows.names):
        descriptors = rows.rows  # input order already; memory-mapped, not copied
    else:  # a file named twice gets its row twice
        descriptors = rows.rows[[rows.index(name) for name in names]]
    shape = f"{descriptors.shape[0]} x {descriptors.shape[1]}"
    if out is None:
        if not _write_stdout(fmt, descriptors, names):
            print(f"netvlad-client: standard output was closed by its reader before all {shape} "
                  f"descriptors ({fmt}) were written", file=sys.stderr)
            return 0
        where = "standard output"
    else:
        if rows.in_place:
            del descriptors
            rows.finish(out)
        else:
            write_descriptors(out, fmt, descriptors, names)
        where = str(out)
    if checkpoint is not None:
        checkpoint.remove()
    print(f"wrote {shape} descriptors to {where} ({fmt})", file=sys.stderr)
    return 0


class _StreamWriter:
    """write() and flush() only: NumPy then writes .npy through it rather than straight to the
    file descriptor, so a closed pipe surfaces as BrokenPipeError, not a short-write OSError."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write(self, data: bytes) -> int:
        return self._stream.write(data)

    def flush(self) -> None:
        self._stream.flush()


def _write_stdout(fmt: str, descriptors: np.ndarray, names: Sequence[str]) -> bool:
    """Descriptors to standard output; False when the reader stopped early (`| head`)."""
    stream = sys.stdout.buffer
    try:
        write_stream(_StreamWriter(stream) if fmt == "npy" else stream, fmt, descriptors, names)
        stream.flush()
    except BrokenPipeError:
        silence_closed_stdout()
        return False
    return True


def _describe_missing(
    client: NetVLADClient,
    args: argparse.Namespace,
    todo: list[str],
    batch_size: int,
    dims: int,
    checkpoint: Checkpoint | None,
    done: RowFile,
) -> tuple[bool, str] | None:
    """Describe `todo` into `done`, checkpointing each finished request.

    Returns None when all is done, else (interrupted, message) after an interrupt (Ctrl-C,
    SIGTERM) or an error; whatever finished before that is in `done` and the checkpoint.
    """
    chunks = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    progress = Progress(len(todo), _show_progress(args.progress, len(chunks) > 1))
    def lowered(concurrency: int, per_request: int, queue: int) -> None:
        print(f"note: {args.concurrency} requests of {per_request} images would overfill the "
              f"server's queue of {queue}; sending {concurrency} at a time", file=sys.stderr)

    results = describe_concurrently(
        client, chunks, args.concurrency, on_lowered=lowered, dims=dims, batch_size=batch_size,
        resize=args.resize,
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


def _checkpoint(
    args: argparse.Namespace, out: Path, info: netvlad_pb2.ModelInfo, dims: int
) -> Checkpoint:
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
            "resize": args.resize,
        },
    )


def _show_progress(mode: str, many: bool) -> bool:
    """auto: a bar only on a terminal and for more than one request; always; never."""
    if mode == "auto":
        return many and sys.stderr.isatty()
    return mode == "always"


def _resize_arg(text: str) -> str:
    """--resize: "keep", N or "fit:N", checked here so that mistakes are usage errors."""
    try:
        resize_policy(text)
    except NetVLADInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive_int(text: str) -> int:
    """An integer >= 1 for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def format_info(info: netvlad_pb2.ModelInfo) -> str:
    """ModelInfo as aligned human-readable lines."""
    limits = info.batching
    resize = info.default_resize
    resize_text = (
        f"fit longest side to {resize.longest_side} px" if resize.longest_side else "keep size"
    )
    rows = [
        ("model", info.model_name + ("   ** DEMO WEIGHTS: descriptors are meaningless **"
                                     if info.demo_weights else "")),
        ("weights", f"{info.weight_source} ({info.weight_format})"),
        ("output dims", f"{info.output_dims} (K={info.num_clusters} clusters x "
                        f"D={info.cluster_dim}, whitened)"),
        ("precision", f"{info.precision}" + (", XLA" if info.xla else "")),
        ("device", info.device),
        ("default resize", resize_text),
        ("max batch size", str(limits.max_batch_size)),
        ("max queue delay", f"{limits.max_queue_delay_ms:g} ms"),
        ("max queue size", str(limits.max_queue_size)),
        ("images/request", str(limits.max_images_per_request)),
        ("max image pixels", str(limits.max_image_pixels)),
        ("min image side", f"{limits.min_image_side} px"),
        ("max message", f"{limits.max_message_bytes} bytes"),
        ("server", f"{info.server_version} (TensorFlow {info.tensorflow_version})"),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _info_command(args: argparse.Namespace) -> int:
    """`info`: the server's ModelInfo, readable or as JSON."""
    with client_from_args(args) as client:
        info = client.info()
    if args.json:
        fields = json_format.MessageToDict(
            info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        print(json.dumps(fields, indent=2, sort_keys=True))
    else:
        print(format_info(info))
    return 0


def _health_command(args: argparse.Namespace) -> int:
    """`health`: print the status; exit 0 only when SERVING (optionally wait for it)."""
    deadline = time.monotonic() + args.wait
    with client_from_args(args) as client:
        while True:
            try:
                status = client.health(args.service, timeout=min(args.timeout, 5.0))
                detail = ""
            except NetVLADError as exc:
                status, detail = ("UNREACHABLE", str(exc))
            if status == "SERVING" or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    print(status + (f": {detail}" if detail else ""))
    return 0 if status == "SERVING" else EXIT_ERROR


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The netvlad-client parser and its subcommand registry."""
    parser = argparse.ArgumentParser(
        prog="netvlad-client",
        description="Describe images with a running netvlad-server, show its model, check health.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_connection_options(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    describe = subparsers.add_parser(
        "describe", help="describe images and folders into one descriptor file",
        description="Describe images (files, or folders of .jpg .jpeg .png .bmp .tif .tiff .webp "
                    "files, sorted) and write an (N, D) float32 array in input order.",
    )
    describe.add_argument("images", nargs="+", metavar="IMG|DIR", help="image files and folders")
    describe.add_argument("--out", "-o",
                          help="output file: .npy .npz .csv .json or .bin (default, or '-': "
                               "standard output)")
    describe.add_argument("--format", choices=FORMATS,
                          help="output format (default: from --out; json on standard output)")
    describe.add_argument("--dims", type=_positive_int,
                          help="keep the first N dimensions, re-normalised (default: all)")
    describe.add_argument("--resize", type=_resize_arg,
                          help="'keep', or N (or fit:N) to fit the longest side to N px "
                               "(default: the server's policy)")
    describe.add_argument("--batch-size", type=_positive_int,
                          help="images per request (default: the server's max batch size)")
    describe.add_argument("--concurrency", type=_positive_int, default=2,
                          help="requests in flight at once (default %(default)s)")
    describe.add_argument("--resume", action="store_true",
                          help="checkpoint finished requests in OUT.partial/ and reuse them when "
                               "run again after an interruption")
    describe.add_argument("--recursive", "-r", action="store_true",
                          help="also take images from sub-folders")
    describe.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                          help="progress bar on stderr (auto: on a terminal, for many files)")
    describe.set_defaults(func=_describe_command)

    info = subparsers.add_parser("info", help="show the server's model and limits")
    info.add_argument("--json", action="store_true", help="print the ModelInfo as JSON")
    info.set_defaults(func=_info_command)

    health = subparsers.add_parser("health", help="exit 0 only when the server is SERVING")
    health.add_argument("--service", default="",
                        help="health service name to ask about (default: the whole server)")
    health.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="keep asking until SERVING or this many seconds have passed")
    health.set_defaults(func=_health_command)

    from netvlad_client import evaluate_cli

    evaluate_cli.register(subparsers)
    return parser, subparsers


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `netvlad-client`; returns the exit status."""
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    resolve_env_defaults(parser, args)
    try:
        return args.func(args)
    except NetVLADError as exc:
        print(f"netvlad-client: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("netvlad-client: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
