"""Pictures built in code: well-formed ones and the malformed ones clients really send."""

from __future__ import annotations

import struct
import zlib
from typing import Optional, Sequence

import cv2
import numpy as np


def conjunctiva_rgba(width: int = 228, height: int = 88, seed: int = 0, red: int = 200) -> np.ndarray:
    """An RGBA crop like CP-AnemiC's: a reddish ellipse, transparent outside (RGBA order)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 4), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((xx - width / 2) / (width / 2)) ** 2 + ((yy - height / 2) / (height / 2)) ** 2 <= 1.0
    noise = rng.integers(0, 30, size=(height, width))
    image[..., 0] = np.clip(red + noise, 0, 255)
    image[..., 1] = np.clip(60 + noise, 0, 255)
    image[..., 2] = np.clip(70 + noise, 0, 255)
    image[..., 3] = np.where(inside, 255, 0)
    return image


def rgb_photo(width: int = 320, height: int = 240, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def encode(image: np.ndarray, ext: str = ".png", params: Sequence[int] = ()) -> bytes:
    """Encode an RGB(A), gray or 16-bit array with OpenCV (which expects BGR(A))."""
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    ok, buffer = cv2.imencode(ext, image, list(params))
    assert ok, "OpenCV could not encode {}".format(ext)
    return buffer.tobytes()


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_from_chunks(width: int, height: int, bit_depth: int, color_type: int, idat: bytes, plte: Optional[bytes] = None) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = png_chunk(b"IHDR", header)
    if plte is not None:
        body += png_chunk(b"PLTE", plte)
    return b"\x89PNG\r\n\x1a\n" + body + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def palette_png(indices: np.ndarray, palette_rgb: np.ndarray) -> bytes:
    """An 8-bit palette PNG (colour type 3), which OpenCV cannot write itself."""
    rows = b"".join(b"\x00" + row.astype(np.uint8).tobytes() for row in indices)
    height, width = indices.shape
    return png_from_chunks(width, height, 8, 3, zlib.compress(rows), plte=palette_rgb.astype(np.uint8).tobytes())


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims a huge image: the body is a few rows of zeros."""
    rows = zlib.compress(b"\x00" * (1 + width) * 4)
    return png_from_chunks(width, height, 8, 0, rows)


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert an APP1 Exif segment carrying only the orientation tag after the SOI marker."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + segment + jpeg[2:]
