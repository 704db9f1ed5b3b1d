"""TensorFlow runtime choices made once at start-up: precision for `auto`, CPU threads, GPU memory.

`resolve_precision` is a pure function of what the machine offers (CPU flags from /proc/cpuinfo,
the GPU's CUDA compute capability, whether oneDNN is on), so every branch is testable on any host.
Thread counts and GPU memory growth must be set before TensorFlow runs its first operation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# CPU flags naming native bfloat16 arithmetic that oneDNN turns into fast convolutions: the AVX-512
# dot-product instructions (Intel Cooper Lake and later, AMD Zen 4 and later) and the AMX tiles
# (Intel Sapphire Rapids and later). Without them oneDNN emulates bf16 and is slower than float32.
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
GPU_BF16_CAPABILITY = (8, 0)  # Ampere and later: bf16 tensor cores
GPU_FP16_CAPABILITY = (7, 0)  # Volta and Turing: fp16 tensor cores, no bf16


@dataclass(frozen=True)
class Hardware:
    """What `auto` precision looks at: CPU flags, GPU 0's compute capability, oneDNN on or off."""

    cpu_flags: frozenset[str]
    gpu_capability: tuple[int, int] | None = None  # None: no GPU visible to TensorFlow
    onednn: bool = True


def read_cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """The `flags` of the first processor listed in /proc/cpuinfo (empty when unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def onednn_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether TensorFlow uses oneDNN kernels (x86 default; TF_ENABLE_ONEDNN_OPTS=0 turns off)."""
    value = (os.environ if environ is None else environ).get("TF_ENABLE_ONEDNN_OPTS", "1")
    return value.strip().lower() not in ("0", "false", "no", "off")


def resolve_precision(requested: str, hardware: Hardware) -> str:
    """The precision to run: `requested` itself, or for "auto" the fastest accurate one here.

    GPU: bfloat16 from compute capability 8.0 (same exponent range as float32, no overflow risk),
    float16 on 7.x (tensor cores, but no bf16), float32 below (no tensor cores). CPU: bfloat16
    when oneDNN is on and the CPU has native bf16 instructions, else float32.
    """
    if requested != "auto":
        return requested
    if hardware.gpu_capability is not None:
        if hardware.gpu_capability >= GPU_BF16_CAPABILITY:
            return "bfloat16"
        return "float16" if hardware.gpu_capability >= GPU_FP16_CAPABILITY else "float32"
    if hardware.onednn and CPU_BF16_FLAGS & hardware.cpu_flags:
        return "bfloat16"
    return "float32"


def detect_hardware(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> Hardware:
    """Inspect this machine: CPU flags, the first visible GPU's compute capability, oneDNN."""
    import tensorflow as tf

    capability = None
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        capability = tuple(details.get("compute_capability") or (0, 0))
    return Hardware(read_cpu_flags(cpuinfo), capability, onednn_enabled())


def configure_tensorflow(intra_op_threads: int, inter_op_threads: int,
                         gpu_memory_growth: bool = True) -> None:
    """Set TensorFlow's thread pools (0 = TensorFlow's choice) and GPU memory growth.

    Must run before the first TensorFlow operation; later calls raise RuntimeError from
    TensorFlow. Memory growth makes each GPU allocate as needed instead of all at once, so a
    second process (or a metrics exporter) can share the card.
    """
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, gpu_memory_growth)


def thread_settings() -> dict[str, int]:
    """TensorFlow's current intra-op and inter-op thread settings (0 = its own choice)."""
    import tensorflow as tf

    return {"intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()}

