"""Calibration images for int8 quantization and the cache of calibrated models (docs/INT8.md).

int8 convolutions need each layer's activation range, measured by running float32 over
representative images. The built-in set is generated (runtime.synthetic_scene), so it ships
with the code and never changes; `--calibration DIR` takes the user's own images instead, what
a user of trained weights should give (frames like those the server will describe). The
calibrated model is computed once and cached next to the weights, under a name holding the
weights' fingerprint and the calibration set's digest: changed weights or images miss the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from netvlad_server.config import NETWORK_MIN_SIDE as MIN_SIDE
from netvlad_server.images import ImageError, ImageLimits, fit_longest_side, prepare_encoded

BUILTIN = "builtin"
BUILTIN_IMAGES = 16  # synthetic scenes, seeds BUILTIN_SEED.. (the agreement check uses others)
BUILTIN_SEED = 1000
BUILTIN_SIZE = (240, 320)
LONGEST_SIDE = 320  # folder images are fitted to this (calibration cost, not range, grows with it)
MAX_IMAGES = 64  # at most this many folder images, spread evenly over the sorted file list
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pbm",
                            ".pgm", ".ppm", ".pnm"})
log = logging.getLogger("netvlad_server")


class CalibrationError(ValueError):
    """A calibration folder or image that cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration images (uint8 RGB [H, W, 3]), where they came from and a digest of them."""

    images: tuple[np.ndarray, ...]
    source: str  # "builtin" or the folder
    digest: str  # sha256 over shapes and pixels: part of the cache key


def _digest(images: list[np.ndarray]) -> str:
    """sha256 over every image's shape and pixels, in order."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.shape}".encode())
        digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def builtin_images(count: int = BUILTIN_IMAGES, size: tuple[int, int] = BUILTIN_SIZE,
                   first_seed: int = BUILTIN_SEED) -> list[np.ndarray]:
    """The built-in set: `count` generated street-like scenes (smooth colour, edges, noise)."""
    from netvlad_server.runtime import synthetic_scene

    return [synthetic_scene(*size, seed=first_seed + i) for i in range(count)]


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """Gray [H, W, 1] repeated to RGB, as the network broadcasts it."""
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def folder_images(folder: str | os.PathLike, longest_side: int = LONGEST_SIDE,
                  max_images: int = MAX_IMAGES) -> list[np.ndarray]:
    """Decode the images of `folder` (not its subfolders), larger ones fitted to `longest_side`."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise CalibrationError(f"calibration folder {folder}: does not exist; give a folder of "
                               "images like those the server will describe")
    if not path.is_dir():
        raise CalibrationError(f"calibration folder {folder}: not a folder; give the folder "
                               "that holds the calibration images")
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(
            f"calibration folder {folder}: holds no images ({', '.join(sorted(IMAGE_SUFFIXES))});"
            " put in some frames like those the server will describe (16 to 64 is enough)")
    if len(files) > max_images:
        files = [files[i] for i in np.linspace(0, len(files) - 1, max_images).round().astype(int)]
    limits = ImageLimits(max_pixels=8192 * 8192, min_side=MIN_SIDE)
    images = []
    for file in files:
        try:
            data = file.read_bytes()
            image = prepare_encoded(data, 0, limits, str(file))  # checks the smallest side
        except (ImageError, OSError) as exc:
            raise CalibrationError(f"calibration image {exc}; remove or replace that file "
                                   f"(calibration folder {folder})") from None
        if max(image.shape[:2]) > longest_side:
            image = fit_longest_side(image, longest_side)
        images.append(_to_rgb(image))
    return images


def calibration_set(folder: str | None) -> CalibrationSet:
    """The built-in set (folder None or "builtin") or the images of `folder`."""
    if folder is None or folder == BUILTIN:
        images = builtin_images()
        return CalibrationSet(tuple(images), BUILTIN, _digest(images))
    images = folder_images(folder)
    return CalibrationSet(tuple(images), str(folder), _digest(images))


def user_cache_dir() -> Path:
    """Where calibrated models of weights without a folder (the demo weights) are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "netvlad-service"


def cache_dir_for(model: str) -> Path:
    """The folder next to the weights: the weight file's folder, a checkpoint folder itself."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.parent.is_dir() and (path.exists() or Path(f"{path}.index").exists()):
        return path.parent
    return user_cache_dir()


class ModelCache:
    """Calibrated models on disk: `<stem>.<kind>-<fingerprint>-<calibration>.tflite`.

    Writing one removes the others of the same stem and kind: those belong to weights or a
    calibration set no longer in use.
    """

    def __init__(self, folder: Path, stem: str) -> None:
        self.folder = folder
        self.stem = stem

    def path(self, kind: str, fingerprint: str, calibration: str) -> Path:
        """Where the model for these weights and this calibration set lives."""
        return self.folder / f"{self.stem}.{kind}-{fingerprint[:16]}-{calibration[:12]}.tflite"

    def get_or_make(self, kind: str, fingerprint: str, calibration: str,
                    make: Callable[[], bytes]) -> tuple[bytes, bool]:
        """(model bytes, True if read from the cache); `make` runs only on a miss."""
        path = self.path(kind, fingerprint, calibration)
        try:
            return path.read_bytes(), True
        except FileNotFoundError:
            pass
        content = make()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temporary.write_bytes(content)
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("cannot cache the calibrated model at %s (%s): it will be computed "
                        "again at the next start", path, exc)
            return content, False
        for stale in self.folder.glob(f"{self.stem}.{kind}-*.tflite"):
            if stale != path:
                log.info("removing %s: made for other weights or calibration images", stale)
                stale.unlink(missing_ok=True)
        return content, False
