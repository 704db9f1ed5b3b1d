"""Images and per-call options as the client accepts them, turned into protobuf messages.

An image is a path (read as an encoded file), encoded bytes, or a numpy pixel array (sent as a
raw uint8 buffer). Nothing here talks to a server; the only IO is reading an image file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from netvlad_client._proto import netvlad_pb2
from netvlad_client.errors import NetVLADInputError

ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray
_ENCODED = (bytes, bytearray, memoryview)
_SINGLE = (str, os.PathLike, *_ENCODED)


def check_dims(dims: int | None) -> None:
    """Reject a negative or non-integer output length before any call (0 or None: all)."""
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 0):
        raise NetVLADInputError(
            f"dims must be a positive integer, or 0 or None for all dimensions; got {dims!r}"
        )


# The priority classes by name, as callers write them; None means the server's default class.
PRIORITIES = {
    "interactive": netvlad_pb2.PRIORITY_INTERACTIVE,
    "bulk": netvlad_pb2.PRIORITY_BULK,
}
PRIORITY_NAMES = {value: name for name, value in PRIORITIES.items()}


def priority_value(priority: str | int | None) -> int:
    """The wire value of a priority: "interactive", "bulk", a `netvlad_pb2.Priority` value, or
    None (also "default" and PRIORITY_UNSPECIFIED): the server's default class."""
    if priority is None:
        return netvlad_pb2.PRIORITY_UNSPECIFIED
    if isinstance(priority, str):
        text = priority.strip().lower().removeprefix("priority_")
        if text in PRIORITIES:
            return PRIORITIES[text]
        if text in ("default", "unspecified"):
            return netvlad_pb2.PRIORITY_UNSPECIFIED
    elif (not isinstance(priority, bool) and isinstance(priority, int)
          and priority in netvlad_pb2.Priority.values()):
        return int(priority)
    raise NetVLADInputError(
        f"priority must be 'interactive', 'bulk', None for the server's default class, or a "
        f"netvlad_pb2.Priority value (0, 1, 2); got {priority!r}"
    )


def priority_name(value: int, default: int = netvlad_pb2.PRIORITY_INTERACTIVE) -> str:
    """The class name a wire value selects; `default` is the server's class for UNSPECIFIED."""
    return PRIORITY_NAMES.get(value) or PRIORITY_NAMES.get(default, "interactive")


def resize_policy(resize: str | int | None) -> netvlad_pb2.ResizePolicy | None:
    """None (the server's default), "keep", or N / "fit:N" (fit the longest side to N px)."""
    if resize is None:
        return None
    text = str(resize).strip().lower()
    if text == "keep":
        return netvlad_pb2.ResizePolicy(mode=netvlad_pb2.RESIZE_MODE_KEEP)
    text = text.removeprefix("fit:")
    if isinstance(resize, bool) or not text.isdigit() or int(text) < 1:
        raise NetVLADInputError(
            f"resize must be 'keep', or N or 'fit:N' to fit the longest side to N pixels; "
            f"got {resize!r}"
        )
    return netvlad_pb2.ResizePolicy(
        mode=netvlad_pb2.RESIZE_MODE_FIT_LONGEST_SIDE, longest_side=int(text)
    )


def _unsupported(image: object, name: str) -> NetVLADInputError:
    """The error for something that is not an image (with a hint for nested lists)."""
    hint = ""
    if isinstance(image, (list, tuple)):
        hint = "; pass pixel rows as one numpy array (np.asarray(...)), not as nested lists"
    return NetVLADInputError(
        f"image {name}: expected a path, encoded bytes or a numpy array, got "
        f"{type(image).__name__}{hint}"
    )


def as_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """A single image (path, bytes, 2-D/3-D array) or a batch (iterable, 4-D array) as a list.

    Every item is checked to be an image of a supported kind, so a wrong argument is reported
    as a NetVLADInputError before any file is read or request sent.
    """
    if isinstance(images, _SINGLE):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):
            return [images]
        if images.ndim != 4:
            raise NetVLADInputError(
                f"images: expected an H x W (x C) array for one image or a B x H x W (x C) "
                f"batch, got shape {images.shape}"
            )
        return list(images)
    if not isinstance(images, Iterable):
        raise NetVLADInputError(
            f"images: expected a path, encoded bytes, a numpy array or an iterable of them, got "
            f"{type(images).__name__}"
        )
    items = list(images)
    for index, image in enumerate(items):
        if not isinstance(image, (*_SINGLE, np.ndarray)):
            raise _unsupported(image, f"#{index}")
    return items


def image_size(image: ImageInput) -> int:
    """Bytes the image will take on the wire, found without reading files."""
    if isinstance(image, np.ndarray):
        return int(image.size)
    if isinstance(image, _ENCODED):
        return len(image)
    try:
        return os.path.getsize(image)
    except OSError:
        return 0  # reported with a clear message when the file is read


def image_id(image: ImageInput, index: int) -> str:
    """The id sent with an image: its path, or its position in the call."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return f"#{index}"


def _pixels_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """uint8 H x W x C pixels from an integer or 0..255 float array; clear errors otherwise."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise NetVLADInputError(
            f"image {name}: expected an H x W, H x W x 1 or H x W x 3 array, got shape "
            f"{array.shape}"
        )
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise NetVLADInputError(f"image {name}: unsupported dtype {array.dtype}; use uint8 pixels")
    if array.size and not np.all(np.isfinite(array)):
        raise NetVLADInputError(f"image {name}: holds NaN or infinite values")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0 or high > 255:
        raise NetVLADInputError(
            f"image {name}: pixel values must lie in 0..255, found {low}..{high} "
            f"(dtype {array.dtype}); scale 0..1 images by 255, and 16-bit images down to 8 bits"
        )
    return np.ascontiguousarray(np.rint(array).astype(np.uint8))


def image_message(image: ImageInput, image_id: str) -> netvlad_pb2.Image:
    """One `Image` message: a path is read as encoded bytes, an array becomes a raw buffer."""
    if isinstance(image, np.ndarray):
        pixels = _pixels_uint8(image, image_id)
        height, width, channels = pixels.shape
        raw = netvlad_pb2.RawImage(
            data=pixels.tobytes(), height=height, width=width, channels=channels
        )
        return netvlad_pb2.Image(id=image_id, raw=raw)
    if isinstance(image, _ENCODED):
        return netvlad_pb2.Image(id=image_id, encoded=bytes(image))
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NetVLADInputError(f"image file not found: {path}") from None
        except IsADirectoryError:
            raise NetVLADInputError(f"{path} is a directory, expected an image file") from None
        except OSError as exc:
            raise NetVLADInputError(f"cannot read image {path}: {exc.strerror}") from None
        return netvlad_pb2.Image(id=image_id, encoded=data)
    raise _unsupported(image, image_id)
