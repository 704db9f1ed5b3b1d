"""Request images to uint8 arrays [H, W, C]: header checks, decoding, raw buffers, resizing.

Encoded files (JPEG, PNG, BMP, TIFF, WebP, PBM/PGM/PPM) have width and height read from the
header first, so an image declaring more pixels than allowed (a decompression bomb) is refused
before OpenCV allocates anything. Colour images come out RGB with 3 channels; grayscale images
keep their single channel (the network replicates it), so the batching key of a gray image is
[H, W, 1]. Alpha is dropped and 16-bit files are scaled to 8 bits by OpenCV. Every failure is an
`ImageError` naming the image and the reason.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WebP", "PNM")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01, 0xD8}
_TIFF_WIDTH, _TIFF_LENGTH = 256, 257
_TIFF_VALUE_FORMATS = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8
_PNM_KINDS = frozenset(b"123456"[i:i + 1] for i in range(6))  # P1-P6: PBM, PGM, PPM (text, binary)
_ID_SHOWN = 64  # characters of an image id quoted in messages


class ImageError(ValueError):
    """A request image that cannot be described; `reason` is a short code used as a metric label."""

    def __init__(self, label: str, reason: str, detail: str) -> None:
        super().__init__(f"{label}: {detail}")
        self.label = label
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageLimits:
    """Bounds every image must respect: most pixels (height x width) and the smallest side."""

    max_pixels: int
    min_side: int = 16


@dataclass(frozen=True)
class ImageHeader:
    """What a file header declares: the format and the image size."""

    format: str
    width: int
    height: int


def image_label(index: int, image_id: str = "") -> str:
    """How messages name an image: its position in the request and, if given, its id."""
    if not image_id:
        return f"image {index}"
    shown = image_id if len(image_id) <= _ID_SHOWN else image_id[:_ID_SHOWN] + "..."
    return f"image {index} (id {shown!r})"


def sniff_format(data: bytes) -> str | None:
    """The format named by the file's first bytes, or None when it is none of FORMATS."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[:4] == b"RIFF" and (data[8:12] == b"WEBP" or len(data) < 12):  # short: truncated
        return "WebP"
    if data[:1] == b"P" and data[1:2] in _PNM_KINDS and data[2:3].isspace():
        return "PNM"
    return None


def read_header(data: bytes, label: str = "image") -> ImageHeader:
    """Read format, width and height from the header alone, without decoding any pixels."""
    if not data:
        raise ImageError(label, "empty", "the encoded image is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(
            label, "unknown_format",
            f"not a {', '.join(FORMATS)} file (first bytes {data[:8].hex(' ')}); send one of "
            "those formats or raw pixels")
    try:
        width, height = _SIZE_READERS[fmt](data)
    except (_HeaderError, struct.error, IndexError) as exc:
        raise ImageError(label, "corrupt_header",
                         f"corrupt or truncated {fmt} header: {exc}") from None
    if width <= 0 or height <= 0:
        raise ImageError(label, "corrupt_header", f"{fmt} header declares a {width}x{height} image")
    return ImageHeader(fmt, width, height)


class _HeaderError(ValueError):
    """A header that does not hold what its format requires."""


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which must come first."""
    if data[12:16] != b"IHDR":
        raise _HeaderError("the first chunk is not IHDR")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Width and height from the first start-of-frame segment, walking the marker segments."""
    pos, end = 2, len(data)
    while pos < end:
        if data[pos] != 0xFF:
            raise _HeaderError(f"expected a marker at byte {pos}")
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end:
            break
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):
            raise _HeaderError("image data starts before any frame header (SOF)")
        if pos + 2 > end:
            break
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            raise _HeaderError(f"segment length {length} at byte {pos}")
        if marker in _JPEG_SOF:
            if pos + 7 > end:
                break
            height, width = struct.unpack(">HH", data[pos + 3:pos + 7])
            return width, height
        pos += length
    raise _HeaderError("the file ends before the frame header (SOF)")


def _bmp_size(data: bytes) -> tuple[int, int]:
    """Width and height from the DIB header (OS/2 core header or BITMAPINFOHEADER and later)."""
    (dib_size,) = struct.unpack("<I", data[14:18])
    if dib_size == 12:
        width, height = struct.unpack("<HH", data[18:22])
    elif dib_size >= 16:
        width, height = struct.unpack("<ii", data[18:26])
    else:
        raise _HeaderError(f"DIB header size {dib_size}")
    return width, abs(height)  # negative height means top-down rows


def _tiff_size(data: bytes) -> tuple[int, int]:
    """ImageWidth and ImageLength from the first IFD (TIFF or BigTIFF, either byte order)."""
    order = "<" if data[:2] == b"II" else ">"
    (version,) = struct.unpack(order + "H", data[2:4])
    if version == 42:
        (ifd,) = struct.unpack(order + "I", data[4:8])
        count_format, entry_size, value_at = "H", 12, 8
    else:  # 43: BigTIFF, 8-byte offsets
        (ifd,) = struct.unpack(order + "Q", data[8:16])
        count_format, entry_size, value_at = "Q", 20, 12
    count_size = struct.calcsize(count_format)
    (count,) = struct.unpack(order + count_format, data[ifd:ifd + count_size])
    count = min(count, max(0, (len(data) - ifd - count_size) // entry_size))
    found: dict[int, int] = {}
    for i in range(count):
        entry = ifd + count_size + i * entry_size
        tag, kind = struct.unpack(order + "HH", data[entry:entry + 4])
        if tag in (_TIFF_WIDTH, _TIFF_LENGTH):
            if tag in found:  # decoders disagree on which copy wins: a way around the size check
                raise _HeaderError(f"the first directory holds tag {tag} twice")
            value_format = _TIFF_VALUE_FORMATS.get(kind)
            if value_format is None:
                raise _HeaderError(f"tag {tag} has field type {kind}")
            start = entry + value_at
            (found[tag],) = struct.unpack(
                order + value_format, data[start:start + struct.calcsize(value_format)])
    if len(found) < 2:
        raise _HeaderError("the first directory lacks ImageWidth or ImageLength")
    return found[_TIFF_WIDTH], found[_TIFF_LENGTH]


def _webp_size(data: bytes) -> tuple[int, int]:
    """Canvas size from the first chunk: VP8 (lossy), VP8L (lossless) or VP8X (extended)."""
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise _HeaderError("missing VP8 start code")
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise _HeaderError("missing VP8L signature")
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        if len(data) < 30:
            raise _HeaderError("VP8X chunk truncated")
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise _HeaderError(f"unknown first chunk {chunk!r}")


def _pnm_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PBM/PGM/PPM (P1-P6): whitespace-separated after the magic, with
    '#' comments allowed between the fields."""
    fields: list[bytes] = []
    position = 2
    while len(fields) < 2:
        while position < len(data) and data[position:position + 1].isspace():
            position += 1
        if data[position:position + 1] == b"#":
            end = data.find(b"\n", position)
            if end < 0:
                raise _HeaderError("the header ends inside a comment")
            position = end + 1
            continue
        start = position
        while position < len(data) and data[position:position + 1].isdigit():
            position += 1
        if start == position:
            raise _HeaderError("width and height must be decimal numbers after the magic")
        fields.append(data[start:position])
    return int(fields[0]), int(fields[1])


_SIZE_READERS = {"PNG": _png_size, "JPEG": _jpeg_size, "BMP": _bmp_size, "TIFF": _tiff_size,
                 "WebP": _webp_size, "PNM": _pnm_size}


def _check_pixels(height: int, width: int, limits: ImageLimits, label: str, what: str) -> None:
    """Refuse images with more than limits.max_pixels pixels."""
    if height * width > limits.max_pixels:
        raise ImageError(
            label, "too_large",
            f"{what} {height}x{width} = {height * width} pixels, over the limit of "
            f"{limits.max_pixels} (--max-image-pixels); send a smaller image")


def decode_encoded(data: bytes, limits: ImageLimits, label: str = "image") -> np.ndarray:
    """Decode a JPEG/PNG/BMP/TIFF/WebP/PNM file to uint8 [H, W, 1 or 3] (RGB), header first."""
    header = read_header(data, label)
    _check_pixels(header.height, header.width, limits, label,
                  f"the {header.format} header declares")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYCOLOR)
    except cv2.error:
        image = None
    if image is None:
        raise ImageError(
            label, "undecodable",
            f"the {header.format} data ({len(data)} bytes, declaring {header.height}x"
            f"{header.width}) could not be decoded; the file is truncated or corrupt")
    _check_pixels(image.shape[0], image.shape[1], limits, label, "decoded image is")
    if image.ndim == 2:
        return image[:, :, None]
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def from_raw(
    data: bytes, height: int, width: int, channels: int, limits: ImageLimits, label: str = "image"
) -> np.ndarray:
    """View a raw row-major uint8 buffer as [height, width, channels] without copying."""
    if channels not in (1, 3):
        raise ImageError(label, "raw_channels",
                         f"raw image has {channels} channels; expected 1 (grayscale) or 3 (RGB)")
    if height <= 0 or width <= 0:
        raise ImageError(label, "raw_shape",
                         f"raw image declares {height}x{width}; height and width must be positive")
    _check_pixels(height, width, limits, label, "raw image declares")
    expected = height * width * channels
    if len(data) != expected:
        raise ImageError(
            label, "raw_length",
            f"raw image holds {len(data)} bytes but {height}x{width}x{channels} needs {expected}")
    return np.frombuffer(data, np.uint8).reshape(height, width, channels)


def fit_longest_side(image: np.ndarray, longest_side: int) -> np.ndarray:
    """Scale [H, W, C] so that max(H, W) == longest_side, keeping the aspect ratio (INTER_AREA)."""
    height, width = image.shape[:2]
    if max(height, width) == longest_side:
        return image
    scale = longest_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # OpenCV wants (w, h)
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return resized[:, :, None] if resized.ndim == 2 else resized


def finish(image: np.ndarray, longest_side: int, limits: ImageLimits, label: str) -> np.ndarray:
    """Apply the resize policy (0 keeps the size) and check the final size against the minimum."""
    if longest_side:
        original = image.shape[:2]
        image = fit_longest_side(image, longest_side)
        resized = f" after fitting {original[0]}x{original[1]} to {longest_side} px"
    else:
        resized = ""
    height, width = image.shape[:2]
    if min(height, width) < limits.min_side:
        raise ImageError(
            label, "too_small",
            f"image is {height}x{width}{resized}; both sides must be at least {limits.min_side} px")
    return image


def prepare_encoded(
    data: bytes, longest_side: int, limits: ImageLimits, label: str = "image"
) -> np.ndarray:
    """Decode an encoded file and apply the resize policy: the array the model will see."""
    return finish(decode_encoded(data, limits, label), longest_side, limits, label)


def prepare_raw(
    data: bytes, height: int, width: int, channels: int, longest_side: int, limits: ImageLimits,
    label: str = "image",
) -> np.ndarray:
    """Check a raw buffer and apply the resize policy: the array the model will see."""
    image = from_raw(data, height, width, channels, limits, label)
    return finish(image, longest_side, limits, label)
