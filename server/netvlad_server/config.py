"""Server configuration: command-line flags with NETVLAD_* environment fallbacks, one object.

Precedence is flag > environment variable > default. Every flag `--some-name` reads
`NETVLAD_SOME_NAME` when the flag is absent; `ServerConfig` is built once in `main` and passed down.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OFFICIAL_MODEL_NAME = "vd16_pitts30k_conv5_3_vlad_preL2_intra_white"
PRECISIONS = ("float32", "bfloat16", "float16", "auto")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
NETWORK_MIN_SIDE = 16  # four 2x2 poolings must leave at least one pixel
MIB = 1024 * 1024


class ConfigError(ValueError):
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


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to know, resolved from flags, environment and defaults."""

    model: str = "demo"
    model_is_default: bool = False  # True when --model was not given and the default was chosen
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9090
    max_batch_size: int = 8
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 64
    max_images_per_request: int = 64
    max_message_bytes: int = 64 * MIB
    max_image_pixels: int = 4096 * 4096
    min_image_side: int = NETWORK_MIN_SIDE
    resize: Resize = Resize()
    decode_threads: int = 2
    precision: str = "auto"
    xla: bool = False
    intra_op_threads: int = 0  # 0: TensorFlow's choice, one per core
    inter_op_threads: int = 1
    gpu_memory_growth: bool = True
    warmup_sizes: tuple[tuple[int, int], ...] = ((480, 640),)
    max_stream_inflight: int = 16
    shutdown_grace_s: float = 30.0
    log_level: str = "INFO"
    tls_cert: str | None = None  # PEM paths; see security.py
    tls_key: str | None = None
    tls_client_ca: str | None = None
    token_file: str | None = None

    @property
    def address(self) -> str:
        """The host:port the gRPC server binds to."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def default_model(models_dir: Path = Path("models")) -> str:
    """The official model under ./models (directory, then zip) if present, else "demo"."""
    for candidate in (models_dir / OFFICIAL_MODEL_NAME, models_dir / f"{OFFICIAL_MODEL_NAME}.zip"):
        if candidate.exists():
            return str(candidate)
    return "demo"


def parse_resize(text: str) -> Resize:
    """Parse "keep" or "fit:N" (N pixels on the longest side)."""
    text = text.strip().lower()
    if text == "keep":
        return Resize()
    if text.startswith("fit:") and text[4:].isdigit() and int(text[4:]) > 0:
        return Resize(int(text[4:]))
    raise ConfigError(f"resize policy {text!r}: expected 'keep' or 'fit:N' with N > 0 (pixels)")


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """Parse a comma-separated list of HEIGHTxWIDTH sizes, e.g. "480x640,240x320" ("" = none)."""
    sizes = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        height, sep, width = part.partition("x")
        if not (sep and height.isdigit() and width.isdigit() and int(height) and int(width)):
            raise ConfigError(f"size {part!r}: expected HEIGHTxWIDTH, e.g. 480x640")
        sizes.append((int(height), int(width)))
    return tuple(sizes)


def _path_or_none(text: str) -> str | None:
    """A file path, or None for an empty value (an unset environment variable)."""
    return text.strip() or None


def _parse_bool(text: str) -> bool:
    """Parse an environment boolean such as 1/0, true/false, yes/no, on/off."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"expected a boolean (1/0, true/false, yes/no, on/off), got {text!r}")


@dataclass(frozen=True)
class _Flag:
    """One command-line flag: its parser for strings, its default and its help text."""

    name: str
    convert: Callable[[str], Any]
    default: Any
    help: str
    choices: Sequence[str] | None = None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "NETVLAD_" + self.dest.upper()


def _int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """A converter accepting integers in [low, high]."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"expected an integer {bound}, got {value}")
        return value

    return convert


def _non_negative_float(text: str) -> float:
    """A converter accepting floats >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise ConfigError(f"expected a number >= 0, got {text!r}")
    return value


def _choice(choices: Sequence[str], fold: Callable[[str], str]) -> Callable[[str], str]:
    """A converter accepting one of `choices` after case folding."""

    def convert(text: str) -> str:
        value = fold(text.strip())
        if value not in choices:
            raise ConfigError(f"expected one of {', '.join(choices)}; got {text!r}")
        return value

    return convert


_PORT = _int_range(0, 65535)
_FLAGS: tuple[_Flag, ...] = (
    _Flag("model", str, None, "weights: a TF1 checkpoint prefix or directory, the official .zip, a "
          "structed .mat, an exported .npz, or demo / demo-tiny (meaningless random weights). "
          f"Default: models/{OFFICIAL_MODEL_NAME} if present, else demo"),
    _Flag("host", str, "0.0.0.0", "address the gRPC server binds to"),
    _Flag("port", _PORT, 50051, "gRPC port (0 picks a free one)"),
    _Flag("metrics-host", str, "0.0.0.0", "address of the Prometheus /metrics endpoint"),
    _Flag("metrics-port", _PORT, 9090, "port of the Prometheus /metrics endpoint (0 disables it)"),
    _Flag("max-batch-size", _int_range(1, 4096), 8, "most images run through the model at once"),
    _Flag("max-queue-delay-ms", _non_negative_float, 5.0,
          "longest wait for more images of the same size before a partial batch runs"),
    _Flag("max-queue-size", _int_range(1), 64,
          "most images waiting for the model; beyond it requests get RESOURCE_EXHAUSTED at once"),
    _Flag("max-images-per-request", _int_range(1), 64, "most images in one request"),
    _Flag("max-message-bytes", _int_range(1024), 64 * MIB, "largest gRPC message accepted or sent"),
    _Flag("max-image-pixels", _int_range(NETWORK_MIN_SIDE**2), 4096 * 4096,
          "largest image (height x width), checked from the file header before decoding"),
    _Flag("min-image-side", _int_range(NETWORK_MIN_SIDE), NETWORK_MIN_SIDE,
          "smallest image height or width accepted"),
    _Flag("resize", parse_resize, Resize(),
          "default resize policy when a request gives none: keep, or fit:N (longest side N px)"),
    _Flag("decode-threads", _int_range(1, 256), min(4, os.cpu_count() or 1),
          "threads decoding images in parallel"),
    _Flag("precision", _choice(PRECISIONS, str.lower), "auto",
          "precision of the convolutions (NetVLAD and whitening stay float32); auto: bfloat16 on "
          "CPUs with avx512_bf16/AMX and GPUs from compute capability 8.0, float16 on 7.x GPUs, "
          "else float32", PRECISIONS),
    _Flag("xla", _parse_bool, False, "compile the forward pass with XLA"),
    _Flag("intra-op-threads", _int_range(0, 1024), 0,
          "threads one TensorFlow operation may use (0: one per core)"),
    _Flag("inter-op-threads", _int_range(0, 1024), 1,
          "TensorFlow operations run at once (0: TensorFlow's choice); the network is a chain, "
          "so 1 avoids oversubscribing the cores"),
    _Flag("gpu-memory-growth", _parse_bool, True,
          "allocate GPU memory as needed rather than all of it at start"),
    _Flag("warmup-sizes", parse_sizes, ((480, 640),),
          "image sizes HEIGHTxWIDTH (comma-separated) run once before reporting SERVING"),
    _Flag("max-stream-inflight", _int_range(1), 16,
          "most frames of one stream being described at once (more are read as answers leave)"),
    _Flag("shutdown-grace-s", _non_negative_float, 30.0,
          "on SIGTERM, how long admitted requests may take to finish"),
    _Flag("log-level", _choice(LOG_LEVELS, str.upper), "INFO", "logging level", LOG_LEVELS),
    _Flag("tls-cert", _path_or_none, None, "PEM certificate chain: with --tls-key, the gRPC port "
          "speaks TLS only"),
    _Flag("tls-key", _path_or_none, None, "PEM private key of --tls-cert"),
    _Flag("tls-client-ca", _path_or_none, None, "PEM CA bundle: require client certificates "
          "signed by it (mutual TLS; needs --tls-cert)"),
    _Flag("token-file", _path_or_none, None, "file of accepted bearer tokens, one per line: calls "
          "without one get UNAUTHENTICATED (the health service stays open)"),
)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of netvlad-server; every default is resolved later (flag > env)."""
    parser = argparse.ArgumentParser(
        prog="netvlad-server",
        description="Serve NetVLAD place-recognition descriptors over gRPC with dynamic batching.",
        epilog="Every flag --some-name falls back to the environment variable NETVLAD_SOME_NAME.",
    )
    for flag in _FLAGS:
        shown = str(flag.default) if not isinstance(flag.default, tuple) else _sizes_text(
            flag.default)
        help_text = f"{flag.help} [env {flag.env}" + (
            "]" if flag.default is None else f"; default {shown}]")
        if flag.convert is _parse_bool:
            parser.add_argument(f"--{flag.name}", dest=flag.dest, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(f"--{flag.name}", dest=flag.dest, default=None, help=help_text,
                                metavar=flag.dest.upper())
    return parser


def _sizes_text(sizes: tuple[tuple[int, int], ...]) -> str:
    """Render sizes the way --warmup-sizes takes them."""
    return ",".join(f"{h}x{w}" for h, w in sizes) or "none"


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
    values: dict[str, Any] = {}
    for flag in _FLAGS:
        given = flags.get(flag.dest)
        source = f"--{flag.name}"
        if given is None and flag.env in environ:
            given, source = environ[flag.env], flag.env
        if given is None:
            values[flag.dest] = flag.default
            continue
        try:
            values[flag.dest] = given if isinstance(given, bool) else flag.convert(str(given))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    values["model_is_default"] = values["model"] is None
    if values["model"] is None:
        values["model"] = default_model()
    config = ServerConfig(**values)
    _validate(config)
    return config


def _validate(config: ServerConfig) -> None:
    """Reject combinations of settings that cannot work together."""
    if config.max_images_per_request > config.max_queue_size:
        raise ConfigError(
            f"--max-images-per-request ({config.max_images_per_request}) exceeds --max-queue-size "
            f"({config.max_queue_size}): such a request could never be admitted; lower the first "
            "or raise the second")
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
    for height, width in config.warmup_sizes:
        if min(height, width) < config.min_image_side:
            raise ConfigError(
                f"--warmup-sizes {height}x{width}: smaller than --min-image-side "
                f"({config.min_image_side})")
