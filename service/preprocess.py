"""Decode an uploaded picture, isolate the conjunctiva and make the model's input tensor.

This is the only preprocessing in the project: the server, training, calibration and evaluation
all call :func:`preprocess_roi` (or its two halves, :func:`decode_image` and
:func:`preprocess_decoded`). Its constants come from the ONNX model's metadata
(:class:`PreprocessSpec`), written there at export, so a model always travels with the
preprocessing it was trained with.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from service.errors import ImageTooLarge, InvalidRoi, UnsupportedImage

# Preprocessing runs in the service's small thread pool; OpenCV's own threads would oversubscribe.
cv2.setNumThreads(1)
# Corrupt uploads are answered with a 415; OpenCV's own warnings on stderr would only be noise.
try:
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
except AttributeError:  # builds without the logging utilities
    pass

ALPHA_OPAQUE_THRESHOLD = 128
RESIZE_MODES = ("letterbox", "stretch")
METADATA_PREFIX = "preprocess."


@dataclass(frozen=True)
class PreprocessSpec:
    """How pixels become the model's input; stored in the ONNX model's ``metadata_props``.

    The canvas is ``input_height`` x ``input_size`` (H x W); ``input_height`` 0 means a square
    ``input_size`` canvas (models exported before rectangular canvases carry no such key). A
    conjunctiva crop is about 2.6:1, so a canvas such as 96 x 224 keeps its resolution at less than
    half the pixels, and half the compute, of 224 x 224 letterboxed.
    """

    input_size: int = 224  # canvas width (and height, unless input_height is set)
    resize_mode: str = "letterbox"
    # In 0..255 RGB, before normalization; the ImageNet weights expect x / 127.5 - 1.
    fill: Tuple[float, float, float] = (127.5, 127.5, 127.5)
    mean: Tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: Tuple[float, float, float] = (127.5, 127.5, 127.5)
    channel_order: str = "RGB"
    input_height: int = 0

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError("resize_mode must be one of {}, got {!r}".format(RESIZE_MODES, self.resize_mode))
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError("channel_order must be RGB or BGR, got {!r}".format(self.channel_order))
        if self.input_size < 8:
            raise ValueError("input_size must be at least 8, got {}".format(self.input_size))
        if self.input_height != 0 and self.input_height < 8:
            raise ValueError("input_height must be 0 (square) or at least 8, got {}".format(self.input_height))
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive, got {}".format(self.std))

    @property
    def height(self) -> int:
        return self.input_height or self.input_size

    @property
    def width(self) -> int:
        return self.input_size

    @property
    def longer_side(self) -> int:
        return max(self.height, self.width)

    @property
    def chw(self) -> Tuple[int, int, int]:
        """The model's input shape without the batch axis."""
        return (3, self.height, self.width)

    def to_metadata(self) -> Dict[str, str]:
        return {METADATA_PREFIX + key: json.dumps(value) for key, value in asdict(self).items()}

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> "PreprocessSpec":
        missing = [k for k in cls.__dataclass_fields__ if METADATA_PREFIX + k not in props and k not in _OPTIONAL_METADATA]
        if missing:
            raise ValueError(
                "model metadata lacks preprocessing keys: {}".format(", ".join(METADATA_PREFIX + k for k in missing))
            )
        values = {k: json.loads(props[METADATA_PREFIX + k]) for k in cls.__dataclass_fields__ if METADATA_PREFIX + k in props}
        for key in ("fill", "mean", "std"):
            values[key] = tuple(float(v) for v in values[key])
        return cls(**values)


#: Keys added after the first models were exported; a model without them keeps the old meaning.
_OPTIONAL_METADATA = ("input_height",)


@dataclass(frozen=True)
class Roi:
    """A client-drawn region: a polygon or a bbox ``(x, y, w, h)``, in pixels of the upload."""

    polygon: Optional[np.ndarray] = None
    bbox: Optional[Tuple[float, float, float, float]] = None


@dataclass(frozen=True)
class PreprocessLimits:
    max_pixels: int = 40_000_000
    min_roi_pixels: int = 256
    max_polygon_points: int = 10_000


@dataclass
class DecodedImage:
    rgb: np.ndarray  # H x W x 3 uint8
    alpha: Optional[np.ndarray] = None  # H x W uint8, only when it carries a mask
    format: str = ""
    #: Upload pixels per decoded pixel along each axis: 1, or 2/4/8 when a JPEG much larger than
    #: the model needs was decoded at reduced size (see :func:`jpeg_reduction`).
    scale: int = 1
    #: The upload's width and height after orientation (``rgb``'s own when ``scale`` is 1).
    upload_size: Optional[Tuple[int, int]] = None


@dataclass
class PreprocessResult:
    tensor: np.ndarray  # 1 x 3 x H x W float32
    roi_source: str  # alpha | polygon | bbox | full
    roi_bbox: Tuple[int, int, int, int]  # x, y, w, h in the (orientation-corrected) upload
    roi_pixels: int
    image_size: Tuple[int, int] = field(default=(0, 0))  # width, height


# ---------------------------------------------------------------------------------------------
# ROI parsing


def parse_roi_json(text: Optional[str], max_polygon_points: int = 10_000) -> Optional[Roi]:
    """Parse the ``roi`` form field; ``None`` or blank means no ROI."""
    if text is None or not text.strip():
        return None
    # Parsing megabytes of JSON holds the GIL for a second or more: refuse what cannot be valid first.
    max_chars = 100 * max_polygon_points + 1000
    if len(text) > max_chars:
        raise InvalidRoi("roi is {} characters; at most {} are accepted".format(len(text), max_chars))
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidRoi("roi is not valid JSON: {}".format(exc)) from None
    if not isinstance(payload, dict):
        raise InvalidRoi('roi must be a JSON object: {"polygon": [[x, y], ...]} or {"bbox": [x, y, w, h]}')
    keys = set(payload) & {"polygon", "bbox"}
    if len(keys) != 1:
        raise InvalidRoi('roi must have exactly one of "polygon" or "bbox"')
    if "polygon" in payload:
        return Roi(polygon=_parse_polygon(payload["polygon"], max_polygon_points))
    return Roi(bbox=_parse_bbox(payload["bbox"]))


def _finite_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRoi("roi coordinates must be numbers, got {!r}".format(value))
    number = float(value)
    if not math.isfinite(number) or abs(number) > 1e9:
        raise InvalidRoi("roi coordinates must be finite, got {!r}".format(value))
    return number


def _parse_polygon(points: object, max_points: int) -> np.ndarray:
    if not isinstance(points, list):
        raise InvalidRoi("polygon must be a list of [x, y] points")
    if len(points) < 3:
        raise InvalidRoi("polygon needs at least 3 points, got {}".format(len(points)))
    if len(points) > max_points:
        raise InvalidRoi("polygon has {} points; at most {} are accepted".format(len(points), max_points))
    coords: List[Tuple[float, float]] = []
    for point in points:
        if not isinstance(point, list) or len(point) != 2:
            raise InvalidRoi("each polygon point must be [x, y], got {!r}".format(point)[:200])
        coords.append((_finite_number(point[0]), _finite_number(point[1])))
    return np.asarray(coords, dtype=np.float64)


def _parse_bbox(values: object) -> Tuple[float, float, float, float]:
    if not isinstance(values, list) or len(values) != 4:
        raise InvalidRoi("bbox must be [x, y, w, h]")
    x, y, w, h = (_finite_number(v) for v in values)
    if w <= 0 or h <= 0:
        raise InvalidRoi("bbox width and height must be positive")
    return (x, y, w, h)


# ---------------------------------------------------------------------------------------------
# Decoding


def sniff_format(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM"):
        return "bmp"
    return ""


def read_header_size(data: bytes, fmt: str) -> Tuple[int, int]:
    """Width and height from the file header, without decoding pixels (decompression bombs)."""
    try:
        if fmt == "png":
            if data[12:16] != b"IHDR":
                raise UnsupportedImage("PNG without an IHDR header")
            width, height = struct.unpack(">II", data[16:24])
            return width, height
        if fmt == "bmp":
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if fmt == "webp":
            return _webp_size(data)
        if fmt == "jpeg":
            return _jpeg_size(data)
    except struct.error:
        raise UnsupportedImage("the {} header is truncated".format(fmt.upper())) from None
    raise UnsupportedImage("unknown image format")


def _webp_size(data: bytes) -> Tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return width, height
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    raise UnsupportedImage("unknown WebP chunk {!r}".format(chunk))


_JPEG_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_segments(data: bytes):  # type: ignore[no-untyped-def]
    """Yield (marker, payload offset, payload length) up to the start of scan."""
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            raise UnsupportedImage("corrupt JPEG marker stream")
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            offset += 2
            continue
        (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
        if length < 2:
            raise UnsupportedImage("corrupt JPEG segment length")
        yield marker, offset + 4, length - 2
        if marker == 0xDA:
            return
        offset += 2 + length


def _jpeg_size(data: bytes) -> Tuple[int, int]:
    for marker, start, _length in _jpeg_segments(data):
        if marker in _JPEG_SOF_MARKERS:
            height, width = struct.unpack(">HH", data[start + 1 : start + 5])
            return width, height
    raise UnsupportedImage("JPEG without a frame header (truncated?)")


def jpeg_exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1..8) of a JPEG, 1 when absent or unreadable."""
    try:
        for marker, start, length in _jpeg_segments(data):
            if marker == 0xE1 and data[start : start + 6] == b"Exif\x00\x00":
                return _tiff_orientation(data[start + 6 : start + length])
    except (UnsupportedImage, struct.error):
        return 1
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    if tiff[:2] == b"II":
        endian = "<"
    elif tiff[:2] == b"MM":
        endian = ">"
    else:
        return 1
    (ifd_offset,) = struct.unpack(endian + "I", tiff[4:8])
    (count,) = struct.unpack(endian + "H", tiff[ifd_offset : ifd_offset + 2])
    for index in range(min(count, 512)):
        entry = ifd_offset + 2 + 12 * index
        tag, _type, _n = struct.unpack(endian + "HHI", tiff[entry : entry + 8])
        if tag == 0x0112:
            (value,) = struct.unpack(endian + "H", tiff[entry + 8 : entry + 10])
            return value if 1 <= value <= 8 else 1
    return 1


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip as a viewer would show an image with this EXIF orientation."""
    if orientation == 2:
        return cv2.flip(image, 1)
    if orientation == 3:
        return cv2.rotate(image, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(image, 0)
    if orientation == 5:
        return cv2.flip(cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE), 1)
    if orientation == 6:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE), 1)
    if orientation == 8:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image


#: A JPEG is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling, far cheaper than a
#: full decode) only while the region that matters keeps at least this many times the model's
#: input size on its longer side: the final resize still shrinks 4x or more with INTER_AREA, and
#: the ROI's edges, drawn on the coarser grid, move by at most 1/4 of a model pixel.
REDUCED_DECODE_MARGIN = 4
_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def jpeg_reduction(width: int, height: int, roi: Optional[Roi], target_size: int) -> int:
    """The largest of 8, 4, 2 by which a width x height JPEG can be decoded smaller while the ROI's
    bounding box (the whole image without one) keeps REDUCED_DECODE_MARGIN x target_size pixels
    on its longer side; 1 when none can. Orientation does not matter: the longer side is kept."""
    if target_size <= 0:
        return 1
    extent = float(max(width, height))
    if roi is not None:
        if roi.bbox is not None:
            extent = max(roi.bbox[2], roi.bbox[3])
        elif roi.polygon is not None and len(roi.polygon):
            # Clipped to the (either way oriented) image: far-away vertices do not count.
            side = float(max(width, height))
            xs = np.clip(roi.polygon[:, 0], 0.0, side)
            ys = np.clip(roi.polygon[:, 1], 0.0, side)
            extent = max(float(xs.max() - xs.min()), float(ys.max() - ys.min()))
    for factor in (8, 4, 2):
        if extent / factor >= REDUCED_DECODE_MARGIN * target_size:
            return factor
    return 1


def decode_image(data: bytes, max_pixels: int = 40_000_000, roi: Optional[Roi] = None, target_size: int = 0) -> DecodedImage:
    """Decode PNG, JPEG, WebP or BMP bytes to RGB (+ alpha mask), honouring EXIF orientation.

    With ``target_size`` (the model's input size), a JPEG much larger than its ROI needs is decoded
    at reduced size (``DecodedImage.scale``); :func:`preprocess_decoded` maps the ROI and the
    reported bbox between the two."""
    if not data:
        raise UnsupportedImage("the image is empty (0 bytes)")
    fmt = sniff_format(data)
    if not fmt:
        raise UnsupportedImage("not a PNG, JPEG, WebP or BMP image")
    width, height = read_header_size(data, fmt)
    if width <= 0 or height <= 0:
        raise UnsupportedImage("the image header declares a size of {}x{}".format(width, height))
    if width * height > max_pixels:
        raise ImageTooLarge(
            "the image is {}x{} = {} pixels; at most {} are accepted".format(width, height, width * height, max_pixels)
        )
    if fmt == "png" and data.rfind(b"IEND") < 0:
        # The usual broken upload; caught here, libpng would also print a non-JSON line to stderr.
        raise UnsupportedImage("the PNG is truncated (no IEND chunk)")
    buffer = np.frombuffer(data, dtype=np.uint8)
    factor = jpeg_reduction(width, height, roi, target_size) if fmt == "jpeg" else 1
    # IMREAD_REDUCED_* implies IMREAD_COLOR, which would apply the EXIF orientation itself: it is
    # applied below, as for full-size decodes.
    flags = cv2.IMREAD_UNCHANGED if factor == 1 else _REDUCED_FLAGS[factor] | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        image = cv2.imdecode(buffer, flags)
    except cv2.error:
        image = None
    if image is None or image.size == 0:
        raise UnsupportedImage("the {} data could not be decoded (truncated or corrupt?)".format(fmt.upper()))
    upload_size = (width, height)
    if fmt == "jpeg":
        orientation = jpeg_exif_orientation(data)
        image = apply_orientation(image, orientation)
        if orientation >= 5:  # a quarter turn
            upload_size = (height, width)
    rgb, alpha = _to_rgb_and_alpha(image)
    return DecodedImage(rgb=rgb, alpha=alpha, format=fmt, scale=factor, upload_size=upload_size)


def _to_rgb_and_alpha(image: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype == np.float32:
        image = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise UnsupportedImage("unsupported sample type {}".format(image.dtype))
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB), None
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB), None
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), None
    if channels == 4:
        alpha = np.ascontiguousarray(image[:, :, 3])
        rgb = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
        # An opaque alpha channel says nothing about the ROI.
        return rgb, (alpha if int(alpha.min()) < 255 else None)
    raise UnsupportedImage("unsupported channel count {}".format(channels))


# ---------------------------------------------------------------------------------------------
# ROI mask, crop, resize, normalize


def _clip_polygon(points: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Sutherland-Hodgman clipping to a rectangle: the same area inside it, bounded coordinates."""
    for axis, bound, keep_above in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        if len(points) == 0:
            break
        previous = np.roll(points, 1, axis=0)
        inside = points[:, axis] >= bound if keep_above else points[:, axis] <= bound
        crossing = inside != np.roll(inside, 1)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # only crossing edges are used: their fraction is in [0, 1]
            fraction = (bound - previous[:, axis]) / (points[:, axis] - previous[:, axis])
            crossings = previous + fraction[:, np.newaxis] * (points - previous)
        crossings[:, axis] = bound
        # Per edge previous -> current: its crossing point if it crosses, then current if inside.
        candidates = np.stack([crossings, points], axis=1)
        points = candidates[np.stack([crossing, inside], axis=1)]
    return points


def roi_mask(decoded: DecodedImage, roi: Optional[Roi], limits: PreprocessLimits) -> Tuple[np.ndarray, str]:
    """The ROI as a uint8 mask (255 inside) and its source: alpha, polygon, bbox or full."""
    height, width = decoded.rgb.shape[:2]
    if decoded.alpha is not None:
        # alpha >= 128 -> 255, else 0, in one pass (np.where + astype made two full-size arrays)
        _, mask = cv2.threshold(decoded.alpha, ALPHA_OPAQUE_THRESHOLD - 1, 255, cv2.THRESH_BINARY)
        return mask, "alpha"
    if roi is None:
        return np.full((height, width), 255, dtype=np.uint8), "full"
    mask = np.zeros((height, width), dtype=np.uint8)
    if roi.polygon is not None:
        points = roi.polygon
        if len(points) > limits.max_polygon_points:
            raise InvalidRoi("polygon has {} points; at most {} are accepted".format(len(points), limits.max_polygon_points))
        xs, ys = points[:, 0], points[:, 1]
        if xs.max() < 0 or ys.max() < 0 or xs.min() >= width or ys.min() >= height:
            raise InvalidRoi("the polygon lies outside the {}x{} image".format(width * decoded.scale, height * decoded.scale))
        # fillPoly walks every edge's full length and its fixed point is int32: far-away vertices
        # (legal up to 1e9) would cost seconds of CPU each or wrap around, so clip to the image first.
        points = _clip_polygon(points, -2.0, -2.0, width + 1.0, height + 1.0)
        if len(points) == 0:
            return mask, "polygon"
        # Sub-pixel precision keeps small polygons honest.
        shift = 4
        fixed = np.round(points * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(mask, [fixed], 255, lineType=cv2.LINE_8, shift=shift)
        return mask, "polygon"
    assert roi.bbox is not None
    x, y, w, h = roi.bbox
    x0, y0 = max(0, int(math.floor(x))), max(0, int(math.floor(y)))
    x1, y1 = min(width, int(math.ceil(x + w))), min(height, int(math.ceil(y + h)))
    if x1 <= x0 or y1 <= y0:
        raise InvalidRoi("the bbox lies outside the {}x{} image".format(width * decoded.scale, height * decoded.scale))
    mask[y0:y1, x0:x1] = 255
    return mask, "bbox"


def resize_to_fit(image: np.ndarray, size: int, mode: str = "letterbox", height: int = 0) -> Tuple[np.ndarray, int, int]:
    """The image resized for a ``height`` x ``size`` canvas (square when ``height`` is 0) and its
    (top, left) offset on it.

    ``letterbox`` keeps the aspect ratio (the rest of the canvas is fill); ``stretch`` fills it.
    """
    canvas_h, canvas_w = (height or size), size
    image_h, image_w = image.shape[:2]
    if mode == "stretch":
        interpolation = cv2.INTER_AREA if image_w * image_h > canvas_w * canvas_h else cv2.INTER_LINEAR
        return cv2.resize(image, (canvas_w, canvas_h), interpolation=interpolation), 0, 0
    scale = min(canvas_w / image_w, canvas_h / image_h)
    new_w = max(1, min(canvas_w, int(round(image_w * scale))))
    new_h = max(1, min(canvas_h, int(round(image_h * scale))))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    return resized, (canvas_h - new_h) // 2, (canvas_w - new_w) // 2


def normalized_chw(crop: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize, pad with the fill, normalize and lay out as 1 x 3 x H x W in one pass.

    Each plane is written once, straight into the output: no full-size HWC canvas, transpose
    or copy (three times faster than doing those steps one by one, with the same arithmetic).
    """
    resized, top, left = resize_to_fit(crop, spec.width, spec.resize_mode, spec.height)
    new_h, new_w = resized.shape[:2]
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    fill = (np.asarray(spec.fill, np.float32) - mean) / std
    out = np.empty((1,) + spec.chw, np.float32)
    order = (2, 1, 0) if spec.channel_order == "BGR" else (0, 1, 2)
    for plane_index, channel in enumerate(order):
        plane = out[0, plane_index]
        plane[...] = fill[channel]
        region = plane[top : top + new_h, left : left + new_w]
        np.subtract(resized[:, :, channel], mean[channel], out=region)
        np.divide(region, std[channel], out=region)
    return out


def preprocess_decoded(
    decoded: DecodedImage,
    roi: Optional[Roi],
    spec: PreprocessSpec,
    limits: PreprocessLimits = PreprocessLimits(),
) -> PreprocessResult:
    """Mask, crop, letterbox and normalize a decoded image into a 1x3xHxW float32 tensor."""
    scale = decoded.scale
    if scale != 1 and roi is not None:  # the ROI is in upload pixels, the image decoded smaller
        roi = Roi(
            polygon=None if roi.polygon is None else roi.polygon / scale,
            bbox=None if roi.bbox is None else tuple(v / scale for v in roi.bbox),  # type: ignore[arg-type]
        )
    mask, source = roi_mask(decoded, roi, limits)
    # Pixel count and bounding box without np.nonzero's two full-size index arrays.
    roi_pixels = int(cv2.countNonZero(mask)) * scale * scale
    if roi_pixels < limits.min_roi_pixels:
        raise InvalidRoi(
            "the {} ROI covers {} pixels; at least {} are needed".format(source, roi_pixels, limits.min_roi_pixels)
        )
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x0, x1, y0, y1 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
    crop = decoded.rgb[y0:y1, x0:x1].astype(np.float32)
    if source != "full":
        outside = (mask[y0:y1, x0:x1] == 0)[:, :, np.newaxis]
        np.copyto(crop, np.asarray(spec.fill, dtype=np.float32), where=outside)
    tensor = normalized_chw(crop, spec)
    height, width = decoded.rgb.shape[:2]
    if scale != 1:
        width, height = decoded.upload_size or (width * scale, height * scale)
        x0, y0, x1, y1 = x0 * scale, y0 * scale, min(width, x1 * scale), min(height, y1 * scale)
    return PreprocessResult(
        tensor=tensor,
        roi_source=source,
        roi_bbox=(x0, y0, x1 - x0, y1 - y0),
        roi_pixels=roi_pixels,
        image_size=(width, height),
    )


def preprocess_roi(
    data: bytes,
    roi: Optional[Roi],
    spec: PreprocessSpec,
    limits: PreprocessLimits = PreprocessLimits(),
) -> PreprocessResult:
    """Bytes of an uploaded picture (+ optional client ROI) to the model's input tensor."""
    return preprocess_decoded(decode_image(data, limits.max_pixels, roi, spec.longer_side), roi, spec, limits)
