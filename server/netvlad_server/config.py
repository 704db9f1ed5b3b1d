"""Server configuration: the flag table of `netvlad-server` and the one object built from it.

Every flag `--some-name` falls back to `NETVLAD_SOME_NAME`; precedence, empty variables, booleans
and error messages follow `netvlad_client.options` like every other command (docs/OPTIONS.md).
`SERVER_OPTIONS` is the one place for defaults: `ServerConfig`'s fields take theirs from it, and
a `ServerConfig` built directly (as tests do) passes the same checks as one built from flags.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netvlad_client import __version__
from netvlad_client.options import (
    Option,
    OptionError,
    add_options,
    choice,
    int_range,
    non_negative_float,
    parse_bool,
    path_or_none,
    resolve,
)

OFFICIAL_MODEL_NAME = "vd16_pitts30k_conv5_3_vlad_preL2_intra_white"
PRECISIONS = ("float32", "bfloat16", "float16", "int8", "auto")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PRIORITIES = ("interactive", "bulk")  # the priority classes, highest first
NETWORK_MIN_SIDE = 16  # four 2x2 poolings must leave at least one pixel
MIB = 1024 * 1024


class ConfigError(OptionError):
    """A flag or environment value that cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class Resize:
    """A resize policy: keep the size (longest_side 0) or fit the longest side to N pixels."""

    longest_side: int = 0

    @property
    def keep(self) -> bool:
        """True when images are described at the size they have."""
        return self.longest_side == 0

    def __str__(self) -> str:
        return "keep" if self.keep else f"fit:{self.longest_side}"


def parse_resize(text: str) -> Resize:
    """Parse "keep" or "fit:N" (N pixels on the longest side)."""
    text = text.strip().lower()
    if text == "keep":
        return Resize()
    if text.startswith("fit:") and text[4:].isdigit() and int(text[4:]) > 0:
        return Resize(int(text[4:]))
    raise ConfigError(f"resize policy {text!r}: expected 'keep' or 'fit:N' with N > 0 (pixels)")


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """Parse a comma-separated list of HEIGHTxWIDTH sizes, e.g. "480x640,240x320"; "" or "none"
    is no size at all."""
    if text.strip().lower() == "none":
        return ()
    sizes = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        height, sep, width = part.partition("x")
        if not (sep and height.isdigit() and width.isdigit() and int(height) and int(width)):
            raise ConfigError(f"size {part!r}: expected HEIGHTxWIDTH, e.g. 480x640")
        sizes.append((int(height), int(width)))
    return tuple(sizes)


def sizes_text(sizes: tuple[tuple[int, int], ...]) -> str:
    """Render sizes the way --warmup-sizes takes them ("none" for no size)."""
    return ",".join(f"{h}x{w}" for h, w in sizes) or "none"


def _flag(name: str, convert: Any, default: Any, help_text: str, **extra: Any) -> Option:
    """One row of the table: --NAME with NETVLAD_NAME as its environment fallback."""
    dest = name.replace("-", "_")
    kind = "bool" if convert is parse_bool else "value"
    metavar = None if kind == "bool" or "choices" in extra else dest.upper()
    return Option((f"--{name}",), help_text, default=default, convert=convert,
                  env=f"NETVLAD_{dest.upper()}", kind=kind, metavar=metavar, **extra)


_PORT = int_range(0, 65535)
SERVER_OPTIONS: tuple[Option, ...] = (
    _flag("model", str, None, "weights: a TF1 checkpoint prefix or directory, the official .zip, "
          "a structed .mat, an exported .npz, or demo / demo-tiny (meaningless random weights)",
          shown_default=f"models/{OFFICIAL_MODEL_NAME} if present, else demo"),
    _flag("host", str, "0.0.0.0", "address the gRPC server binds to"),
    _flag("port", _PORT, 50051, "gRPC port (0 picks a free one)"),
    _flag("metrics-host", str, "0.0.0.0", "address of the Prometheus /metrics endpoint"),
    _flag("metrics-port", _PORT, 9090, "port of the Prometheus /metrics endpoint (0 disables it)"),
    _flag("max-batch-size", int_range(1, 4096), 8, "most images run through the model at once"),
    _flag("max-queue-delay-ms", non_negative_float, 5.0,
          "longest wait for more images of the same size before a partial batch runs"),
    _flag("max-queue-size", int_range(1), 64,
          "most images waiting for the model per priority class (interactive, and bulk unless "
          "--max-bulk-queue-size is set); beyond it requests get RESOURCE_EXHAUSTED at once"),
    _flag("max-bulk-queue-size", int_range(0), 0,
          "most bulk-priority images waiting for the model (0: the same as --max-queue-size); "
          "a full bulk queue never refuses interactive requests"),
    _flag("mixed-bulk-batch-size", int_range(0, 4096), 0,
          "bulk batches are computed in steps of at most this many images, and interactive "
          "requests run between two steps, so one finds at most a step in its way (0: a quarter "
          "of --max-batch-size, rounded up; --max-batch-size: one step per batch)"),
    _flag("default-priority", choice(PRIORITIES, str.lower), "interactive",
          "priority class of requests that leave it unspecified", choices=PRIORITIES),
    _flag("max-images-per-request", int_range(1), 64, "most images in one request"),
    _flag("max-message-bytes", int_range(1024), 64 * MIB, "largest gRPC message accepted or sent"),
    _flag("max-image-pixels", int_range(NETWORK_MIN_SIDE**2), 4096 * 4096,
          "largest image (height x width), checked from the file header before decoding"),
    _flag("min-image-side", int_range(NETWORK_MIN_SIDE), NETWORK_MIN_SIDE,
          "smallest image height or width accepted"),
    _flag("resize", parse_resize, Resize(),
          "default resize policy when a request gives none: keep, or fit:N (longest side N px)"),
    _flag("decode-threads", int_range(1, 256), min(4, os.cpu_count() or 1),
          "threads decoding images in parallel", shown_default="min(4, cores)"),
    _flag("precision", choice(PRECISIONS, str.lower), "auto",
          "precision of the convolutions (NetVLAD and whitening stay float32); auto: bfloat16 on "
          "CPUs with avx512_bf16/AMX and GPUs from compute capability 8.0, float16 on 7.x GPUs, "
          "else float32 (never int8); int8: calibrated, run by LiteRT on the CPU, refused unless "
          "retrieval matches float32's (docs/INT8.md)", choices=PRECISIONS),
    _flag("calibration", str, "builtin",
          "with --precision int8: a folder of images like those the server will describe, to "
          "calibrate the int8 activation ranges (builtin: generated scenes); cached next to the "
          "weights"),
    _flag("xla", parse_bool, False, "compile the forward pass with XLA"),
    _flag("intra-op-threads", int_range(0, 1024), 0,
          "threads one TensorFlow operation may use (0: one per core)"),
    _flag("inter-op-threads", int_range(0, 1024), 1,
          "TensorFlow operations run at once (0: TensorFlow's choice); the network is a chain, "
          "so 1 avoids oversubscribing the cores"),
    _flag("gpu-memory-growth", parse_bool, True,
          "allocate GPU memory as needed rather than all of it at start"),
    _flag("warmup-sizes", parse_sizes, ((480, 640),),
          "image sizes HEIGHTxWIDTH (comma-separated; none for no warm-up) run once before "
          "reporting SERVING", shown_default="480x640"),
    _flag("max-stream-inflight", int_range(1), 16,
          "most frames of one stream being described at once (more are read as answers leave)"),
    _flag("shutdown-grace-s", non_negative_float, 30.0,
          "on SIGTERM, how long admitted requests may take to finish"),
    _flag("index-dir", str, "indexes", "directory of the place indexes (write-ahead log and "
          "snapshots, relative to the working directory); off: in memory only, lost at exit"),
    _flag("max-indexes", int_range(1), 64, "most place indexes at once"),
    _flag("max-places-per-request", int_range(1), 256,
          "most places in one AddPlaces request (places given as images also obey "
          "--max-images-per-request)"),
    _flag("max-place-metadata-bytes", int_range(0), 4096,
          "largest metadata of one place (keys plus values, UTF-8)"),
    _flag("max-index-bytes", int_range(1), 4 * 1024 * MIB,
          "most memory all place indexes together may take; adds beyond it get "
          "RESOURCE_EXHAUSTED", shown_default="4 GiB"),
    _flag("index-compact-bytes", int_range(1), 64 * MIB,
          "write-ahead log size of an index that triggers a new snapshot (and at least the "
          "last snapshot's size)", shown_default="64 MiB"),
    _flag("index-server", path_or_none, None, "keep no place indexes here: they live on that "
          "server (HOST:PORT), and every place-index call here is refused with "
          "FAILED_PRECONDITION naming it (describing replicas of a deployment with one index "
          "server, docs/PLACES.md)"),
    _flag("log-level", choice(LOG_LEVELS, str.upper), "INFO", "logging level", choices=LOG_LEVELS),
    _flag("tls-cert", path_or_none, None, "PEM certificate chain: with --tls-key, the gRPC port "
          "speaks TLS only"),
    _flag("tls-key", path_or_none, None, "PEM private key of --tls-cert"),
    _flag("tls-client-ca", path_or_none, None, "PEM CA bundle: require client certificates "
          "signed by it (mutual TLS; needs --tls-cert)"),
    _flag("token-file", path_or_none, None, "file of accepted bearer tokens, one per line: calls "
          "without one get UNAUTHENTICATED (the health service stays open)"),
)
_OPTION = {option.key: option for option in SERVER_OPTIONS}
_DEFAULT = {key: option.default for key, option in _OPTION.items()}


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to know, resolved from flags, environment and defaults.

    The defaults are the flag table's; only `model` differs: the flag's default depends on the
    working directory (`default_model`), a directly built config means the demo weights.
    """

    model: str = "demo"
    model_is_default: bool = False  # True when --model was not given and the default was chosen
    host: str = _DEFAULT["host"]
    port: int = _DEFAULT["port"]
    metrics_host: str = _DEFAULT["metrics_host"]
    metrics_port: int = _DEFAULT["metrics_port"]
    max_batch_size: int = _DEFAULT["max_batch_size"]
    max_queue_delay_ms: float = _DEFAULT["max_queue_delay_ms"]
    max_queue_size: int = _DEFAULT["max_queue_size"]  # per priority class
    max_bulk_queue_size: int = _DEFAULT["max_bulk_queue_size"]  # 0: the same as max_queue_size
    mixed_bulk_batch_size: int = _DEFAULT["mixed_bulk_batch_size"]  # 0: max_batch_size / 4
    default_priority: str = _DEFAULT["default_priority"]
    max_images_per_request: int = _DEFAULT["max_images_per_request"]
    max_message_bytes: int = _DEFAULT["max_message_bytes"]
    max_image_pixels: int = _DEFAULT["max_image_pixels"]
    min_image_side: int = _DEFAULT["min_image_side"]
    resize: Resize = _DEFAULT["resize"]
    decode_threads: int = _DEFAULT["decode_threads"]
    precision: str = _DEFAULT["precision"]
    calibration: str = _DEFAULT["calibration"]  # "builtin" or a folder of images (int8)
    xla: bool = _DEFAULT["xla"]
    intra_op_threads: int = _DEFAULT["intra_op_threads"]  # 0: TensorFlow's choice, one per core
    inter_op_threads: int = _DEFAULT["inter_op_threads"]
    gpu_memory_growth: bool = _DEFAULT["gpu_memory_growth"]
    warmup_sizes: tuple[tuple[int, int], ...] = _DEFAULT["warmup_sizes"]
    max_stream_inflight: int = _DEFAULT["max_stream_inflight"]
    shutdown_grace_s: float = _DEFAULT["shutdown_grace_s"]
    index_dir: str = _DEFAULT["index_dir"]  # "off": place indexes in memory only
    max_indexes: int = _DEFAULT["max_indexes"]
    max_places_per_request: int = _DEFAULT["max_places_per_request"]
    max_place_metadata_bytes: int = _DEFAULT["max_place_metadata_bytes"]
    max_index_bytes: int = _DEFAULT["max_index_bytes"]
    index_compact_bytes: int = _DEFAULT["index_compact_bytes"]
    index_server: str | None = _DEFAULT["index_server"]  # place indexes live there, not here
    log_level: str = _DEFAULT["log_level"]
    tls_cert: str | None = _DEFAULT["tls_cert"]  # PEM paths; see security.py
    tls_key: str | None = _DEFAULT["tls_key"]
    tls_client_ca: str | None = _DEFAULT["tls_client_ca"]
    token_file: str | None = _DEFAULT["token_file"]

    def __post_init__(self) -> None:
        """Each field must be a value its flag accepts, and the fields must fit together."""
        for key, option in _OPTION.items():
            _check_field(option, getattr(self, key))
        _validate(self)

    @property
    def bulk_queue_size(self) -> int:
        """The bulk class's queue budget in force."""
        return self.max_bulk_queue_size or self.max_queue_size

    @property
    def bulk_batch_size_mixed(self) -> int:
        """Most images per bulk batch while interactive requests are arriving."""
        return self.mixed_bulk_batch_size or (self.max_batch_size + 3) // 4

    @property
    def index_path(self) -> Path | None:
        """Where the place indexes live; None keeps them in memory only (--index-dir off)."""
        text = self.index_dir.strip()
        return None if text.lower() in ("", "off") else Path(text)

    @property
    def address(self) -> str:
        """The host:port the gRPC server binds to."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _check_field(option: Option, value: Any) -> None:
    """Refuse a value its flag could not have produced: it must read back from its text form."""
    if value is None and option.default is None and option.key != "model":
        return
    if option.key == "warmup_sizes":
        text = sizes_text(value)
    else:
        text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        converted = (parse_bool if option.kind == "bool" else option.convert)(text)
    except ValueError as exc:
        raise ConfigError(f"ServerConfig {option.key}={value!r}: {exc} (as {option.name})"
                          ) from None
    if converted != value or isinstance(converted, bool) != isinstance(value, bool):
        raise ConfigError(f"ServerConfig {option.key}={value!r}: not a value {option.name} "
                          f"takes (it would read {converted!r})")


def default_model(models_dir: Path = Path("models")) -> str:
    """The official model under ./models (directory, then zip) if present, else "demo"."""
    for candidate in (models_dir / OFFICIAL_MODEL_NAME, models_dir / f"{OFFICIAL_MODEL_NAME}.zip"):
        if candidate.exists():
            return str(candidate)
    return "demo"


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of netvlad-server; values are resolved later (flag > env > default)."""
    parser = argparse.ArgumentParser(
        prog="netvlad-server",
        description="Serve NetVLAD place-recognition descriptors over gRPC with dynamic batching.",
        epilog="Every flag --some-name falls back to the environment variable NETVLAD_SOME_NAME.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_options(parser, SERVER_OPTIONS)
    return parser


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """Build the ServerConfig from flags and NETVLAD_* variables (environ); exits on error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    environ = os.environ if environ is None else environ
    try:
        return config_from_values(vars(args), environ)
    except ConfigError as exc:
        parser.error(str(exc))


def config_from_values(flags: Mapping[str, Any], environ: Mapping[str, str]) -> ServerConfig:
    """Resolve each setting (flag value, else NETVLAD_* variable, else default) and validate."""
    try:
        values = resolve(SERVER_OPTIONS, flags, environ)
    except OptionError as exc:
        raise ConfigError(str(exc)) from None
    values["model_is_default"] = values["model"] is None
    if values["model"] is None:
        values["model"] = default_model()
    return ServerConfig(**values)


def _validate(config: ServerConfig) -> None:
    """Reject combinations of settings that cannot work together."""
    if config.max_images_per_request > config.max_queue_size:
        raise ConfigError(
            f"--max-images-per-request ({config.max_images_per_request}) exceeds --max-queue-size "
            f"({config.max_queue_size}): such a request could never be admitted; lower the first "
            "or raise the second")
    if config.max_images_per_request > config.bulk_queue_size:
        raise ConfigError(
            f"--max-images-per-request ({config.max_images_per_request}) exceeds "
            f"--max-bulk-queue-size ({config.max_bulk_queue_size}): such a bulk request could "
            "never be admitted; lower the first or raise the second")
    if config.mixed_bulk_batch_size > config.max_batch_size:
        raise ConfigError(
            f"--mixed-bulk-batch-size ({config.mixed_bulk_batch_size}) exceeds --max-batch-size "
            f"({config.max_batch_size}): no batch is larger than --max-batch-size; set it to "
            f"{config.max_batch_size} (bulk batches never shrink) or lower")
    if config.min_image_side**2 > config.max_image_pixels:
        raise ConfigError(
            f"--min-image-side ({config.min_image_side}) squared exceeds --max-image-pixels "
            f"({config.max_image_pixels}): no image could pass both")
    if not config.resize.keep and config.resize.longest_side < config.min_image_side:
        raise ConfigError(
            f"--resize {config.resize}: the longest side must be at least --min-image-side "
            f"({config.min_image_side})")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together: give both (the certificate "
                          "chain and its private key) or neither")
    if config.tls_client_ca and not config.tls_cert:
        raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
    if config.calibration != "builtin" and config.precision != "int8":
        raise ConfigError(f"--calibration {config.calibration}: calibration is for --precision "
                          f"int8 only (precision is {config.precision}); drop it or add "
                          "--precision int8")
    if config.xla and config.precision == "int8":
        raise ConfigError("--xla does not apply to --precision int8 (LiteRT runs the int8 "
                          "convolutions): drop one of them")
    for height, width in config.warmup_sizes:
        if min(height, width) < config.min_image_side:
            raise ConfigError(
                f"--warmup-sizes {height}x{width}: smaller than --min-image-side "
                f"({config.min_image_side})")
