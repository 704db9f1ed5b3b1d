"""TensorFlow runtime choices made once at start-up: precision for `auto`, CPU threads, GPU memory.

`resolve_precision` is a pure function of what the machine offers (CPU flags from /proc/cpuinfo,
the GPU's CUDA compute capability, whether oneDNN is on), so every branch is testable on any host;
`build_network` adds the check that the loaded weights keep their descriptors in that precision.
Thread counts and GPU memory growth must be set before TensorFlow runs its first operation.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from netvlad_server.weights import NetVLADWeights

if TYPE_CHECKING:
    from netvlad_server.network import NetVLADNetwork

# CPU flags naming native bfloat16 arithmetic that oneDNN turns into fast convolutions: the AVX-512
# dot-product instructions (Intel Cooper Lake and later, AMD Zen 4 and later) and the AMX tiles
# (Intel Sapphire Rapids and later). Without them oneDNN emulates bf16 and is slower than float32.
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
GPU_BF16_CAPABILITY = (8, 0)  # Ampere and later: bf16 tensor cores
GPU_FP16_CAPABILITY = (7, 0)  # Volta and Turing: fp16 tensor cores, no bf16
AUTO_MIN_COSINE = 0.9999  # "auto" keeps a lower precision only this close to float32
log = logging.getLogger("netvlad_server")
# oneDNN builds of TensorFlow serve every large tensor from a pool that grows to the largest batch's
# working set and never shrinks (about 0.7-0.8 GiB after batches of 8 at 480x640); the system
# allocator hands a batch's large tensors back when it is done, and MemoryKeeper returns what
# malloc keeps of the smaller ones. With glibc's malloc the price is CPU time to map fresh pages
# for every batch; jemalloc loaded with LD_PRELOAD (as the container image does) keeps them warm
# until MemoryKeeper purges. docs/BENCHMARKS.md has the numbers and the alternatives measured.
MEMORY_ENVIRONMENT = {"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1"}
IDLE_TRIM_SECONDS = 10.0  # MemoryKeeper returns free heap pages after this long without a batch
MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now; clean file pages need no swap
RECENT_SHAPES = 64  # batch shapes MemoryKeeper remembers; a shape not among them trims the heap


@dataclass(frozen=True)
class Hardware:
    """What `auto` precision looks at: CPU flags, GPU 0's compute capability, oneDNN on or off."""

    cpu_flags: frozenset[str]
    gpu_capability: tuple[int, int] | None = None  # None: no GPU visible to TensorFlow
    onednn: bool = True


def _cpuinfo_field(name: str, cpuinfo: str | os.PathLike) -> str | None:
    """The value of the first `name : value` line of /proc/cpuinfo (None when unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def read_cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """The `flags` of the first processor listed in /proc/cpuinfo (empty when unreadable)."""
    return frozenset((_cpuinfo_field("flags", cpuinfo) or "").split())


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU model name from /proc/cpuinfo, or the platform's processor string."""
    return _cpuinfo_field("model name", cpuinfo) or platform.processor() or "unknown"


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
    """Set TensorFlow's thread pools (0 = TensorFlow's choice) and GPU memory growth, and log them.

    Takes effect only before TensorFlow's first operation; in a process where TensorFlow already
    runs (a server embedded in tests) the settings in force are kept and a warning says so.
    Memory growth makes each GPU allocate as needed instead of all at once, so another process
    can share the card; without it TensorFlow reserves nearly all GPU memory up front.
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, gpu_memory_growth)
    except RuntimeError as exc:
        log.warning("TensorFlow already runs in this process, its settings stay as they are "
                    "(%s)", exc)
    threads = thread_settings()
    log.info("TensorFlow threads: intra-op %d, inter-op %d (0: TensorFlow's choice); %d cores",
             threads["intra_op_threads"], threads["inter_op_threads"], os.cpu_count() or 0)
    log.info("heap allocator: %s (MALLOC_CONF %r, TF_ONEDNN_USE_SYSTEM_ALLOCATOR %r)",
             heap_allocator(), os.environ.get("MALLOC_CONF", ""),
             os.environ.get("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", ""))


def synthetic_scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic photo-like RGB image [H, W, 3] uint8: smooth colour, edges, mild noise."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 24), max(2, width // 24), 3), np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    for _ in range(12):  # flat rectangles: sharp edges like buildings and windows
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w = int(rng.integers(width // 16, width // 3 + 1))
        h = int(rng.integers(height // 16, height // 3 + 1))
        image[y:y + h, x:x + w] = rng.integers(0, 256, 3)
    image += rng.normal(0, 3, image.shape).astype(np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def agreement_with_float32(network: NetVLADNetwork, size: tuple[int, int] = (240, 320),
                           images: int = 2) -> float:
    """Smallest cosine between the network's descriptors of synthetic scenes and float32 ones."""
    batch = np.stack([synthetic_scene(*size, seed=seed) for seed in range(images)])
    return float(np.min(np.sum(network(batch) * network.float32_reference(batch), axis=1)))


def build_network(weights: NetVLADWeights, requested: str, xla: bool = False,
                  check_size: tuple[int, int] = (240, 320), hardware: Hardware | None = None,
                  min_cosine: float = AUTO_MIN_COSINE) -> NetVLADNetwork:
    """The network for `weights` in the requested precision; "auto" is checked on these weights.

    "auto" first picks by hardware (resolve_precision); a lower precision is then kept only if
    its descriptors of synthetic scenes at check_size stay within cosine `min_cosine` of
    float32 ones for these very weights, else float32 is used. How close bfloat16 comes depends
    on the weights (see docs/BENCHMARKS.md), so this is measured rather than assumed.
    """
    from netvlad_server.network import NetVLADNetwork

    hardware = detect_hardware() if hardware is None else hardware
    precision = resolve_precision(requested, hardware)
    network = NetVLADNetwork(weights, precision=precision, xla=xla)
    if requested != "auto":
        network.drop_float32_weights()
        return network
    if hardware.gpu_capability is not None:
        major, minor = hardware.gpu_capability
        why = f"GPU compute capability {major}.{minor}"
    else:
        found = sorted(CPU_BF16_FLAGS & hardware.cpu_flags)
        why = (f"CPU flags {', '.join(found) or 'without avx512_bf16/amx_bf16'}, oneDNN "
               f"{'on' if hardware.onednn else 'off'}")
    if precision == "float32":
        log.info("precision auto -> float32 (%s)", why)
        return network
    cosine = agreement_with_float32(network, check_size)
    network.drop_float32_weights()
    height, width = check_size
    if cosine < min_cosine:
        log.warning("precision auto -> float32: %s descriptors of these weights reach only cosine "
                    "%.6f to float32 ones on %dx%d check images (at least %s wanted); pass "
                    "--precision %s to accept that for its speed", precision, cosine, height,
                    width, min_cosine, precision)
        del network
        return NetVLADNetwork(weights, precision="float32", xla=xla)
    log.info("precision auto -> %s (%s; cosine to float32 %.6f on %dx%d check images)",
             precision, why, cosine, height, width)
    return network


def prefer_returning_memory(environ: MutableMapping[str, str] | None = None) -> None:
    """Set MEMORY_ENVIRONMENT's defaults (an operator's own value wins) before TensorFlow loads.

    TensorFlow reads them when it creates its allocator, so in a process where it already runs
    this changes nothing.
    """
    environ = os.environ if environ is None else environ
    for name, value in MEMORY_ENVIRONMENT.items():
        environ.setdefault(name, value)


class _DlInfo(ctypes.Structure):
    """dladdr's answer: the shared object a symbol's address lies in."""

    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def heap_allocator() -> str:
    """Which malloc this process runs with: "jemalloc", "tcmalloc", "glibc" or "unknown".

    Asks the dynamic linker which library the process-wide `malloc` symbol comes from, so a
    library loaded with LD_PRELOAD is seen as what it is and a copy merely present is not.
    """
    try:
        process = ctypes.CDLL(None)
        info = _DlInfo()
        address = ctypes.cast(process.malloc, ctypes.c_void_p)
        found = process.dladdr(address, ctypes.byref(info))
    except (OSError, AttributeError):
        return "unknown"
    library = Path((info.dli_fname or b"").decode(errors="replace")).name if found else ""
    for name in ("jemalloc", "tcmalloc"):
        if name in library:
            return name
    return "glibc" if library.startswith("libc.") else "unknown"


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the system, in the way of the malloc in use.

    glibc: malloc_trim; jemalloc: purge every arena (mallctl); tcmalloc: ReleaseFreeMemory.
    Returns False when the allocator offers no such call. Loading and the first forward passes
    leave free memory inside the heap that would otherwise count in the resident size for the
    process's whole life.
    """
    allocator = heap_allocator()
    try:
        process = ctypes.CDLL(None)
        if allocator == "jemalloc":
            purge_all_arenas = b"arena.4096.purge"  # 4096: MALLCTL_ARENAS_ALL
            return process.mallctl(purge_all_arenas, None, None, None, ctypes.c_size_t(0)) == 0
        if allocator == "tcmalloc":
            process.MallocExtension_ReleaseFreeMemory()
            return True
        if allocator == "glibc":
            process.malloc_trim(ctypes.c_size_t(0))
            return True
    except AttributeError:
        pass
    return False


def resident_mib() -> float:
    """This process's resident size (VmRSS) in MiB; 0.0 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def library_mappings(maps: str) -> list[tuple[int, int]]:
    """(start, end) of the read-only private mappings of loaded code objects in /proc/PID/maps text.

    A file counts as loaded code when one of its mappings is executable (a shared library or
    the interpreter); its writable mappings (relocated data) and every other file (memory-mapped
    data such as a place index) are left out.
    """
    rows = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, _, end = fields[0].partition("-")
            rows.append((int(start, 16), int(end, 16), fields[1], fields[5]))
    code = {path for _, _, perms, path in rows if "x" in perms}
    return [(start, end) for start, end, perms, path in rows
            if path in code and perms.endswith("p") and "w" not in perms]


def release_library_pages(maps: str | os.PathLike = "/proc/self/maps") -> int:
    """Ask the kernel to reclaim the resident pages of loaded libraries' read-only mappings.

    Importing TensorFlow runs the registration code of every operation it has and reads their
    tables: about 0.3 GiB of library pages stay resident although a forward pass uses a
    twentieth of them. madvise(MADV_PAGEOUT) drops them now; whatever is touched again is read
    back on its first use (a fraction of a second once). Nothing is lost: the pages are clean
    copies of files, and pages another process maps too are left alone by the kernel. Returns
    the bytes of mappings advised; 0 where the kernel refuses (before Linux 5.4, or no Linux).
    """
    try:
        text = Path(maps).read_text()
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for start, end in library_mappings(text):
        if madvise(start, end - start, MADV_PAGEOUT) == 0:
            advised += end - start
        elif ctypes.get_errno() == errno.EINVAL and not advised:
            return 0  # MADV_PAGEOUT unknown to this kernel
    return advised


class MemoryKeeper:
    """The forward callable, returning free heap pages when a batch's memory will not be reused.

    glibc malloc keeps the blocks a batch frees inside its arenas, and a new image size rarely
    fits them, so a run through many sizes piles up free memory in the resident size. This
    hands the pages back (release_free_memory) after a batch shape none of the last `recent`
    batches had, and once no batch has run for `idle_seconds`; a steady workload keeps its
    blocks. The trims run on a daemon thread, off the batch's path; it ends with the keeper.
    """

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray],
                 idle_seconds: float = IDLE_TRIM_SECONDS, recent: int = RECENT_SHAPES,
                 trim: Callable[[], bool] = release_free_memory) -> None:
        if idle_seconds <= 0 or recent < 1:
            raise ValueError(f"idle_seconds must be > 0 and recent >= 1; got {idle_seconds!r} "
                             f"and {recent!r}")
        self._forward = forward
        self._trim = trim
        self._recent: OrderedDict[tuple[object, ...], None] = OrderedDict()
        self._capacity = recent
        self._lock = threading.Lock()
        self._wake = threading.Event()  # a new shape ran: trim now
        self._running = 0  # batches in progress
        self._last_end = time.monotonic()
        self._untrimmed = False  # a batch ended since the last trim
        self.trims = 0
        self.idle_seconds = idle_seconds
        threading.Thread(target=MemoryKeeper._watch, args=(weakref.ref(self), self._wake),
                         name="memory-keeper", daemon=True).start()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Run the forward pass; ask for a trim afterwards if this batch shape is new."""
        return self.run(self._forward, images)

    def track(self, function: Callable[[np.ndarray], np.ndarray]
              ) -> Callable[[np.ndarray], np.ndarray]:
        """`function` (another stage of the model) under this keeper's watch, as __call__ is."""
        return lambda images: self.run(function, images)

    def run(self, function: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
        """function(images), counted as a batch: shape remembered, idle clock restarted."""
        with self._lock:
            self._running += 1
        try:
            return function(images)
        finally:
            shape = (*np.shape(images), str(getattr(images, "dtype", "")))
            with self._lock:
                self._running -= 1
                self._last_end = time.monotonic()
                self._untrimmed = True
                new = shape not in self._recent
                self._recent[shape] = None
                self._recent.move_to_end(shape)
                while len(self._recent) > self._capacity:
                    self._recent.popitem(last=False)
            if new:
                self._wake.set()

    def release(self) -> None:
        """Return the heap's free pages now, on the calling thread."""
        with self._lock:
            self._untrimmed = False
            self.trims += 1
        self._trim()

    def _idle_due(self) -> float:
        """Seconds until an idle trim is due (0: due now; idle_seconds when none is pending)."""
        with self._lock:
            if not self._untrimmed or self._running:
                return self.idle_seconds
            return max(0.0, self._last_end + self.idle_seconds - time.monotonic())

    @staticmethod
    def _watch(ref: weakref.ref[MemoryKeeper], wake: threading.Event) -> None:
        """Trim after each new shape and once after each idle spell; exit when the keeper is
        gone (checked at least every second, so a dropped keeper's thread ends promptly)."""
        wait = 1.0
        while True:
            woken = wake.wait(timeout=min(wait, 1.0) + 0.01)
            keeper = ref()
            if keeper is None:
                return
            if woken:
                wake.clear()
                keeper.release()
            wait = keeper._idle_due()
            if wait == 0.0:
                keeper.release()
                wait = keeper.idle_seconds
            del keeper


def thread_settings() -> dict[str, int]:
    """TensorFlow's current intra-op and inter-op thread settings (0 = its own choice)."""
    import tensorflow as tf

    return {"intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()}

