"""Hostile request material for the robustness tests: bombs, broken files, odd ids, raw messages.

Every file here is real: written by OpenCV and then cut, altered or given a lying header, the way
a broken camera driver or an attacker would send it.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Callable

import cv2
import numpy as np
from netvlad_client._proto import netvlad_pb2 as pb

RNG = np.random.default_rng(11)
PICTURE = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)  # RGB
FORMATS = {  # name: (extension, OpenCV parameters)
    "JPEG": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]),
    "PNG": (".png", []),
    "BMP": (".bmp", []),
    "TIFF": (".tiff", []),
    "WebP": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
}


def encode(pixels: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    """A real file written by OpenCV from RGB (or single-channel) pixels."""
    bgr = pixels[:, :, ::-1] if pixels.ndim == 3 and pixels.shape[2] == 3 else pixels
    ok, data = cv2.imencode(ext, np.ascontiguousarray(bgr), params or [])
    assert ok, ext
    return data.tobytes()


def good_files() -> dict[str, bytes]:
    """PICTURE in every accepted format."""
    return {name: encode(PICTURE, ext, params) for name, (ext, params) in FORMATS.items()}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring width x height, and no pixel data."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


def jpeg_header_only(width: int, height: int) -> bytes:
    """SOI and a baseline SOF0 segment declaring width x height (3 components), nothing else."""
    sof = struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return b"\xff\xd8\xff\xc0" + sof


def tiff_with_second_width(data: bytes, width: int) -> bytes:
    """A TIFF whose first directory repeats ImageWidth with another value after the real one.

    The copy goes into a new directory appended at the end (the old one stays as dead bytes), so
    every offset in the file remains valid. libtiff obeys the first copy, a naive reader the last.
    """
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[ifd:ifd + 2])
    entries = [data[ifd + 2 + 12 * i:ifd + 14 + 12 * i] for i in range(count)]
    tags = [struct.unpack(order + "H", entry[:2])[0] for entry in entries]
    extra = struct.pack(order + "HHII", 256, 4, 1, width)
    entries.insert(tags.index(256) + 1, extra)
    padded = data + b"\x00" * (len(data) % 2)
    directory = struct.pack(order + "H", len(entries)) + b"".join(entries) + bytes(4)
    return padded[:4] + struct.pack(order + "I", len(padded)) + padded[8:] + directory


def bombs(limit_pixels: int) -> dict[str, bytes]:
    """Small files declaring more than limit_pixels: complete ones and bare headers."""
    side = int((limit_pixels * 1.5) ** 0.5) + 1  # 1.5x the limit
    blank = np.zeros((side, side), np.uint8)
    tiff = encode(np.zeros((side, side), np.uint8), ".tiff")
    return {
        "PNG (complete, zeros)": encode(blank, ".png", [cv2.IMWRITE_PNG_COMPRESSION, 9]),
        "JPEG (complete, zeros)": encode(blank, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 5]),
        "PNG (header 100000x100000)": png_header_only(100_000, 100_000),
        "JPEG (header 65000x65000)": jpeg_header_only(65_000, 65_000),
        "TIFF (ImageWidth twice)": tiff_with_second_width(tiff, 16),
    }


def truncations(data: bytes) -> list[bytes]:
    """The file cut at a few places, from inside the signature to inside the pixel data."""
    return [data[:cut] for cut in sorted({1, 4, 10, 30, len(data) // 3, len(data) // 2})]


def corruptions(data: bytes) -> list[bytes]:
    """The file with its body overwritten: zeros, 0xFF, and noise after the first 32 bytes."""
    body = len(data) - 32
    noise = np.random.default_rng(len(data)).integers(0, 256, body, dtype=np.uint8).tobytes()
    return [data[:32] + bytes(body), data[:32] + b"\xff" * body, data[:32] + noise]


def raw_image(pixels: np.ndarray, image_id: str = "") -> pb.Image:
    """An Image carrying raw pixels."""
    height, width, channels = pixels.shape
    return pb.Image(id=image_id, raw=pb.RawImage(data=pixels.tobytes(), height=height,
                                                  width=width, channels=channels))


def raw_lies() -> dict[str, pb.RawImage]:
    """Raw buffers whose byte count disagrees with (or cannot fit) the declared shape."""
    data = PICTURE.tobytes()
    return {
        "empty": pb.RawImage(data=b"", height=48, width=64, channels=3),
        "one byte short": pb.RawImage(data=data[:-1], height=48, width=64, channels=3),
        "one byte long": pb.RawImage(data=data + b"\x00", height=48, width=64, channels=3),
        "gray shape, colour bytes": pb.RawImage(data=data, height=48, width=64, channels=1),
        "huge shape": pb.RawImage(data=data, height=2**32 - 1, width=2**32 - 1, channels=3),
        "zero height": pb.RawImage(data=b"", height=0, width=64, channels=3),
        "no channels": pb.RawImage(data=data, height=48, width=64, channels=0),
        "4 channels": pb.RawImage(data=data + data[:3072], height=48, width=64, channels=4),
    }


class DecodeSpy:
    """Counts cv2.imdecode calls made anywhere in this process (the real function still runs)."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()
        self._real: Callable[..., object] = cv2.imdecode

    def __call__(self, *args: object, **kwargs: object) -> object:
        with self._lock:
            self.calls += 1
        return self._real(*args, **kwargs)
