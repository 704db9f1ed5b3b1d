"""Image decoding: header sizes of real files of each format, bombs refused, raw buffers, resize."""

from __future__ import annotations

import re
import struct
import zlib

import cv2
import numpy as np
import pytest
from netvlad_server.images import (
    ImageError,
    ImageLimits,
    decode_encoded,
    fit_longest_side,
    image_label,
    prepare_encoded,
    prepare_raw,
    read_header,
)

LIMITS = ImageLimits(max_pixels=4096 * 4096, min_side=16)
RNG = np.random.default_rng(7)
COLOR = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # RGB
GRAY = RNG.integers(0, 256, (41, 29), dtype=np.uint8)


def encode(ext: str, rgb_or_gray: np.ndarray, *params: int) -> bytes:
    """A real file written by OpenCV (which expects BGR)."""
    image = rgb_or_gray[:, :, ::-1] if rgb_or_gray.ndim == 3 else rgb_or_gray
    ok, buffer = cv2.imencode(ext, np.ascontiguousarray(image), list(params))
    assert ok
    return buffer.tobytes()


ENCODINGS = {
    "PNG": (".png",),
    "JPEG": (".jpg", cv2.IMWRITE_JPEG_QUALITY, 95),
    "JPEG-progressive": (".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
    "BMP": (".bmp",),
    "TIFF": (".tiff",),
    "WebP-lossy": (".webp", cv2.IMWRITE_WEBP_QUALITY, 80),
    "WebP-lossless": (".webp", cv2.IMWRITE_WEBP_QUALITY, 101),
    "PNM": (".pnm",),  # P6 (PPM) for colour, P5 (PGM) for gray
    "PNM-text": (".pnm", cv2.IMWRITE_PXM_BINARY, 0),  # P3 / P2
}


@pytest.mark.parametrize("name", sorted(ENCODINGS))
@pytest.mark.parametrize("image", [COLOR, GRAY], ids=["color", "gray"])
def test_header_size_of_real_files(name, image):
    ext, *params = ENCODINGS[name]
    header = read_header(encode(ext, image, *params))
    assert header.format == name.split("-")[0]
    assert (header.height, header.width) == image.shape[:2]


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_decoding_gives_rgb_or_single_channel(name):
    ext, *params = ENCODINGS[name]
    lossless = name in ("PNG", "BMP", "TIFF", "WebP-lossless", "PNM", "PNM-text")
    data = encode(ext, COLOR, *params)
    color = decode_encoded(data, LIMITS)
    assert color.shape == (*COLOR.shape[:2], 3) and color.dtype == np.uint8
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    np.testing.assert_array_equal(color, reference)  # RGB order, not OpenCV's BGR
    if lossless:
        np.testing.assert_array_equal(color, COLOR)
    gray = decode_encoded(encode(ext, GRAY, *params), LIMITS)
    if name.startswith("WebP"):  # WebP has no grayscale mode: it comes back as RGB
        assert gray.shape == (*GRAY.shape, 3)
    else:
        assert gray.shape == (*GRAY.shape, 1)
        if lossless:
            np.testing.assert_array_equal(gray[:, :, 0], GRAY)


def test_pgm_with_comments_and_16_bit_samples_decodes():
    rows = GRAY.astype(">u2") * 257  # 16-bit samples, big-endian as the format stores them
    data = b"P5\n# exposure 1/60\n29 # width\n41\n65535\n" + rows.tobytes()
    assert read_header(data).format == "PNM"
    decoded = decode_encoded(data, LIMITS)
    assert decoded.shape == (41, 29, 1) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[:, :, 0], GRAY)


def test_alpha_is_dropped_and_16_bit_scaled():
    rgba = np.dstack([COLOR, np.full(COLOR.shape[:2], 128, np.uint8)])
    _, png = cv2.imencode(".png", rgba[:, :, [2, 1, 0, 3]])
    np.testing.assert_array_equal(decode_encoded(png.tobytes(), LIMITS), COLOR)
    deep = (GRAY.astype(np.uint16) << 8) | 0xFF
    _, png16 = cv2.imencode(".png", deep)
    np.testing.assert_array_equal(decode_encoded(png16.tobytes(), LIMITS)[:, :, 0], GRAY)


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and a valid IHDR chunk declaring width x height, and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", zlib.crc32(chunk[4:]))


def tiff_header(width: int, height: int, order: str) -> bytes:
    """A minimal TIFF header with one IFD declaring width x height as LONG values."""
    magic = b"II*\x00" if order == "<" else b"MM\x00*"
    bits = 8 << (16 if order == ">" else 0)  # a SHORT sits in the first two bytes of the field
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, bits)]
    ifd = struct.pack(order + "H", len(entries)) + b"".join(
        struct.pack(order + "HHII", *entry) for entry in entries) + b"\x00" * 4
    return magic + struct.pack(order + "I", 8) + ifd


def bigtiff_header(width: int, height: int) -> bytes:
    """A minimal little-endian BigTIFF header declaring width x height as LONG8 values."""
    entries = [(256, 16, 1, width), (257, 16, 1, height)]
    ifd = struct.pack("<Q", len(entries)) + b"".join(
        struct.pack("<HHQQ", *entry) for entry in entries) + b"\x00" * 8
    return b"II+\x00" + struct.pack("<HHQ", 8, 0, 16) + ifd


def jpeg_header(width: int, height: int) -> bytes:
    """SOI, an APP0 segment to skip, then a baseline SOF0 declaring width x height."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof0


def bmp_header(width: int, height: int) -> bytes:
    """A BITMAPFILEHEADER and BITMAPINFOHEADER declaring width x height (bottom-up)."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def webp_vp8x_header(width: int, height: int) -> bytes:
    """A RIFF/WebP file whose VP8X chunk declares a width x height canvas."""
    body = bytes(4) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


BOMBS = {
    "PNG": png_header(100_000, 100_000),
    "JPEG": jpeg_header(60_000, 60_000),
    "BMP": bmp_header(50_000, -50_000),
    "TIFF-le": tiff_header(70_000, 70_000, "<"),
    "TIFF-be": tiff_header(70_000, 70_000, ">"),
    "BigTIFF": bigtiff_header(1 << 20, 1 << 20),
    "WebP-VP8X": webp_vp8x_header(16_000, 16_000),
    "PGM": b"P5\n# a comment between the magic and the size\n70000 70000\n255\n",
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_huge_declared_size_is_refused_from_the_header(name):
    with pytest.raises(ImageError) as caught:
        decode_encoded(BOMBS[name], LIMITS, "image 3 (id 'bomb')")
    assert caught.value.reason == "too_large"
    message = str(caught.value)
    assert message.startswith("image 3 (id 'bomb'): the ") and "header declares" in message
    assert "--max-image-pixels" in message and str(LIMITS.max_pixels) in message


def test_a_real_file_over_the_pixel_limit_is_refused_before_decoding():
    with pytest.raises(ImageError, match=r"37x53 = 1961 pixels, over the limit of 1000"):
        decode_encoded(encode(".png", COLOR), ImageLimits(max_pixels=1000))


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_truncated_files_are_refused_with_a_reason(name):
    ext, *params = ENCODINGS[name]
    data = encode(ext, COLOR, *params)
    for cut in (10, len(data) // 2):
        with pytest.raises(ImageError) as caught:
            decode_encoded(data[:cut], LIMITS, "image 0")
        assert caught.value.reason in ("corrupt_header", "undecodable"), caught.value
        assert str(caught.value).startswith("image 0: ")


def test_corrupt_pixel_data_after_a_good_header_is_undecodable():
    data = bytearray(encode(".png", COLOR))
    data[40:] = bytes(len(data) - 40)  # zero everything after IHDR
    with pytest.raises(ImageError, match="could not be decoded") as caught:
        decode_encoded(bytes(data), LIMITS)
    assert caught.value.reason == "undecodable"


@pytest.mark.parametrize(("data", "reason", "text"), [
    (b"", "empty", "empty (0 bytes)"),
    (b"GIF89a\x10\x00\x10\x00", "unknown_format", "first bytes 47 49 46 38"),
    (b"P7\nWIDTH 16\n", "unknown_format", "not a JPEG, PNG, BMP, TIFF, WebP, PNM file"),
    (b"P5\n# made by a camera\n16 x\n255\n", "corrupt_header", "must be decimal numbers"),
    (b"P6\n# a comment that never ends", "corrupt_header", "ends inside a comment"),
    (png_header(0, 20), "corrupt_header", "declares a 0x20 image"),
    (b"\xff\xd8\xff\xda\x00\x08", "corrupt_header", "before any frame header"),
    (b"RIFF\x00\x00\x00\x00WEBPABCD" + bytes(20), "corrupt_header", "unknown first chunk"),
])
def test_unusable_files_name_the_reason(data, reason, text):
    with pytest.raises(ImageError, match=re.escape(text)) as caught:
        decode_encoded(data, LIMITS, image_label(2, "cam/7"))
    assert caught.value.reason == reason
    assert str(caught.value).startswith("image 2 (id 'cam/7'): ")


def test_raw_buffers_are_viewed_without_copy_and_checked():
    data = COLOR.tobytes()
    image = prepare_raw(data, 37, 53, 3, 0, LIMITS, "image 0")
    np.testing.assert_array_equal(image, COLOR)
    assert not image.flags.owndata  # a view on the request's bytes
    gray = prepare_raw(GRAY.tobytes(), 41, 29, 1, 0, LIMITS)
    assert gray.shape == (41, 29, 1)
    cases = [
        ((data[:-1], 37, 53, 3), "raw_length", "holds 5882 bytes but 37x53x3 needs 5883"),
        ((data, 37, 53, 4), "raw_channels", "4 channels; expected 1 (grayscale) or 3"),
        ((data, 0, 53, 3), "raw_shape", "declares 0x53"),
        ((b"", 5000, 5000, 3), "too_large", "5000x5000 = 25000000 pixels"),
        ((bytes(10 * 53 * 3), 10, 53, 3), "too_small", "image is 10x53; both sides must be"),
    ]
    for args, reason, text in cases:
        with pytest.raises(ImageError, match=re.escape(text)) as caught:
            prepare_raw(*args, 0, LIMITS, "image 4")
        assert caught.value.reason == reason


def test_fit_longest_side_keeps_aspect_and_uses_area_interpolation():
    image = RNG.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    small = fit_longest_side(image, 160)
    expected = cv2.resize(image, (160, 120), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(small, expected)
    assert fit_longest_side(image, 320) is image
    tall = fit_longest_side(RNG.integers(0, 256, (300, 100, 1), dtype=np.uint8), 60)
    assert tall.shape == (60, 20, 1)
    encoded = prepare_encoded(encode(".png", image), 64, LIMITS)
    assert encoded.shape == (48, 64, 3)


def test_small_images_may_be_enlarged_but_must_end_big_enough():
    tiny = RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    assert prepare_raw(tiny.tobytes(), 10, 12, 3, 48, LIMITS).shape == (40, 48, 3)
    with pytest.raises(ImageError, match="image is 10x12; both sides") as caught:
        prepare_raw(tiny.tobytes(), 10, 12, 3, 0, LIMITS)
    assert caught.value.reason == "too_small"
    strip = bytes(20 * 400 * 3)
    with pytest.raises(ImageError, match="after fitting 20x400 to 100 px"):
        prepare_raw(strip, 20, 400, 3, 100, LIMITS)


def test_labels_name_index_and_a_shortened_id():
    assert image_label(0) == "image 0"
    assert image_label(5, "front") == "image 5 (id 'front')"
    assert image_label(1, "x" * 500) == f"image 1 (id '{'x' * 64}...')"
