"""The bad-input corpus, built in code: what broken tablets, bugs and attackers send.

Each :class:`Upload` is one multipart request to ``POST /v1/predict`` and the answer the service
owes it: a specific 4xx code for what it cannot use, a 200 for odd-but-valid pictures.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np

from tests.images import bomb_png, conjunctiva_rgba, encode, palette_png, rgb_photo, with_exif_orientation

# name, (filename or None for a text field, content, content type or None)
Part = Tuple[str, Tuple[Optional[str], bytes, Optional[str]]]

POLYGON_POINTS_HUGE = 1_000_000


@dataclass
class Upload:
    name: str
    build: Callable[[], List[Part]]  # built when sent: some bodies are megabytes
    status: int
    code: str = ""  # the error code when status is not 200
    note: str = ""
    expect_roi: Optional[dict] = field(default=None)  # checked on a 200


def image_part(data: bytes, filename: str = "upload", content_type: str = "application/octet-stream") -> Part:
    return ("image", (filename, data, content_type))


def roi_part(text: str) -> Part:
    return ("roi", (None, text.encode(), None))


def roi_file_part(text: str) -> Part:
    """The ROI as a file part: the multipart parser's 1 MiB limit for text fields does not apply."""
    return ("roi", ("roi.json", text.encode(), "application/json"))


# -- pictures -----------------------------------------------------------------------------------


def valid_png() -> bytes:
    return encode(conjunctiva_rgba())


def photo_jpeg(width: int = 320, height: int = 240) -> bytes:
    return encode(rgb_photo(width, height), ".jpg")


def truncated_png() -> bytes:
    data = encode(rgb_photo())
    return data[: len(data) // 2]


def truncated_jpeg() -> bytes:
    data = photo_jpeg()
    return data[: len(data) // 2]


def jpeg_headers_only() -> bytes:
    """Cut inside the marker segments, before the frame header."""
    return photo_jpeg()[:120]


def png16() -> bytes:
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    data = encode(np.stack([ramp, ramp // 2, ramp // 3], axis=-1))
    assert data[24] == 16, "not a 16-bit PNG"  # IHDR bit depth
    return data


def grayscale_png() -> bytes:
    data = encode(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1)))
    assert data[25] == 0, "not a grayscale PNG"  # IHDR colour type
    return data


def palette() -> bytes:
    indices = (np.arange(48 * 64).reshape(48, 64) % 4).astype(np.uint8)
    colours = np.array([[200, 60, 70], [180, 50, 60], [220, 90, 90], [160, 40, 50]], dtype=np.uint8)
    return palette_png(indices, colours)


def cmyk_jpeg(width: int = 64, height: int = 48) -> bytes:
    """A 4-component JPEG with an Adobe APP14 marker, as print workflows and some scanners write."""
    from PIL import Image

    cmyk = np.zeros((height, width, 4), dtype=np.uint8)
    cmyk[..., 0] = 10  # reddish: little cyan, magenta and yellow
    cmyk[..., 1] = 190
    cmyk[..., 2] = 150
    cmyk[..., 3] = 30
    buffer = io.BytesIO()
    Image.fromarray(cmyk, mode="CMYK").save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    assert b"Adobe" in data[:64], "Pillow did not write the Adobe APP14 marker"
    return data


def animated_gif() -> bytes:
    """A two-frame, looping 1x1 GIF89a written byte by byte."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    frame = b"\x21\xf9\x04\x00\x0a\x00\x00\x00" + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + loop + frame + frame + b"\x3b"


def exif_rotated_jpeg() -> bytes:
    """Stored 100x40 (landscape), EXIF orientation 6: a viewer shows it 40x100."""
    return with_exif_orientation(photo_jpeg(100, 40), 6)


def huge_polygon(compact: bool) -> str:
    if compact:
        return json.dumps({"polygon": [[1, 2]] * POLYGON_POINTS_HUGE}, separators=(",", ":"))
    return json.dumps({"polygon": [[1234.5, 678.25]] * POLYGON_POINTS_HUGE})


# -- the corpus -----------------------------------------------------------------------------------


def corpus() -> List[Upload]:
    png = valid_png()  # small, built once; the big bodies are built by each lambda
    photo = photo_jpeg()
    square = [[40, 30], [280, 40], [270, 200], [50, 190]]
    return [
        Upload("zero-bytes", lambda: [image_part(b"")], 415, "unsupported_image"),
        Upload("text-as-image", lambda: [image_part(b"hello, this is not a picture\n" * 20, "a.png", "image/png")], 415, "unsupported_image"),
        Upload(
            "html-as-image",
            lambda: [image_part(b"<!DOCTYPE html><html><script>alert(1)</script></html>", "x.jpg", "image/jpeg")],
            415,
            "unsupported_image",
        ),
        Upload("truncated-png", lambda: [image_part(truncated_png())], 415, "unsupported_image"),
        Upload("truncated-jpeg", lambda: [image_part(truncated_jpeg())], 415, "unsupported_image"),
        Upload("jpeg-headers-only", lambda: [image_part(jpeg_headers_only())], 415, "unsupported_image"),
        Upload("bomb-png-100000x100000", lambda: [image_part(bomb_png())], 422, "image_too_large"),
        Upload("animated-gif", lambda: [image_part(animated_gif(), "a.gif", "image/gif")], 415, "unsupported_image"),
        Upload("roi-malformed-json", lambda: [image_part(photo), roi_part('{"polygon": [[1, 2], [3')], 422, "invalid_roi"),
        Upload("roi-not-an-object", lambda: [image_part(photo), roi_part("[[1, 2], [3, 4], [5, 6]]")], 422, "invalid_roi"),
        Upload("roi-deeply-nested", lambda: [image_part(photo), roi_part("[" * 100_000 + "]" * 100_000)], 422, "invalid_roi"),
        Upload("roi-nan", lambda: [image_part(photo), roi_part('{"polygon": [[NaN, 1], [200, 10], [150, 200]]}')], 422, "invalid_roi"),
        Upload("roi-infinity", lambda: [image_part(photo), roi_part('{"bbox": [0, 0, Infinity, 100]}')], 422, "invalid_roi"),
        Upload("roi-overflow-1e999", lambda: [image_part(photo), roi_part('{"bbox": [0, 0, 1e999, 100]}')], 422, "invalid_roi"),
        Upload("roi-strings", lambda: [image_part(photo), roi_part('{"bbox": ["0", "0", "50", "50"]}')], 422, "invalid_roi"),
        Upload("roi-polygon-and-bbox", lambda: [image_part(photo), roi_part(json.dumps({"polygon": square, "bbox": [0, 0, 50, 50]}))], 422, "invalid_roi"),
        Upload(
            "roi-polygon-outside",
            lambda: [image_part(photo), roi_part('{"polygon": [[1000, 1000], [1200, 1000], [1100, 1300]]}')],
            422,
            "invalid_roi",
        ),
        Upload(
            "roi-polygon-1e6-points-field",
            lambda: [image_part(photo), roi_part(huge_polygon(compact=True))],
            422,
            "invalid_request",
            note="5.7 MiB text field: the multipart parser's 1 MiB per-field limit answers first",
        ),
        Upload(
            "roi-polygon-1e6-points-file",
            lambda: [image_part(photo), roi_file_part(huge_polygon(compact=True))],
            422,
            "invalid_roi",
            note="the same polygon as a file part reaches the ROI parser, which refuses its length before parsing",
        ),
        Upload(
            "roi-polygon-1e6-points-13MB",
            lambda: [image_part(photo), roi_file_part(huge_polygon(compact=False))],
            413,
            "payload_too_large",
            note="with realistic coordinates the body exceeds the 10 MiB limit",
        ),
        Upload("no-image-field", lambda: [("picture", ("a.png", png, "image/png"))], 422, "invalid_request"),
        Upload("image-as-text-field", lambda: [("image", (None, b"iVBORw0KGgo=", None))], 422, "invalid_request"),
        Upload("duplicated-image", lambda: [image_part(png), image_part(png)], 422, "invalid_request"),
        Upload("duplicated-roi", lambda: [image_part(photo), roi_part('{"bbox": [0, 0, 50, 50]}'), roi_part('{"bbox": [9, 9, 50, 50]}')], 422, "invalid_request"),
        Upload("too-many-fields", lambda: [image_part(png)] + [("x{}".format(i), (None, b"1", None)) for i in range(12)], 422, "invalid_request"),
        # Odd but valid: answered like any picture.
        Upload("png-16-bit", lambda: [image_part(png16())], 200, expect_roi={"source": "full", "bbox": [0, 0, 64, 48]}),
        Upload("png-grayscale", lambda: [image_part(grayscale_png())], 200, expect_roi={"source": "full", "bbox": [0, 0, 64, 48]}),
        Upload("png-palette", lambda: [image_part(palette())], 200, expect_roi={"source": "full", "bbox": [0, 0, 64, 48]}),
        Upload("jpeg-cmyk-adobe", lambda: [image_part(cmyk_jpeg())], 200, expect_roi={"source": "full", "bbox": [0, 0, 64, 48]}),
        Upload("jpeg-exif-rotated", lambda: [image_part(exif_rotated_jpeg())], 200, expect_roi={"source": "full", "bbox": [0, 0, 40, 100]}),
        Upload(
            "roi-polygon-far-vertices",
            lambda: [image_part(photo), roi_part(json.dumps({"polygon": circle_polygon(10_000, 160, 120, 1e8)}))],
            200,
            note="10 000 vertices 1e8 px away: clipped before rasterizing (minutes of CPU before)",
            expect_roi={"source": "polygon", "bbox": [0, 0, 320, 240]},
        ),
        Upload(
            "roi-polygon-10000-points",
            lambda: [image_part(photo), roi_part(json.dumps({"polygon": circle_polygon(10_000, 160, 120, 100)}))],
            200,
            expect_roi={"source": "polygon"},
        ),
    ]


def circle_polygon(points: int, cx: float, cy: float, radius: float) -> List[List[float]]:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return [[round(cx + radius * float(np.cos(a)), 2), round(cy + radius * float(np.sin(a)), 2)] for a in angles]

