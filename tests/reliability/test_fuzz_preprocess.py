"""Property tests of the one preprocessing function: valid in, finite tensor out; invalid in,
the project's own PreprocessError out — never a numpy, OpenCV or struct exception."""

from __future__ import annotations

import json
from typing import Optional, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import InvalidRoi, PreprocessError
from service.preprocess import (
    PreprocessLimits,
    PreprocessSpec,
    Roi,
    decode_image,
    parse_roi_json,
    preprocess_decoded,
    preprocess_roi,
)
from tests.images import encode

SPEC = PreprocessSpec()
LIMITS = PreprocessLimits(min_roi_pixels=1, max_pixels=4_000_000)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
FORMATS = (".png", ".jpg", ".bmp", ".webp")


@st.composite
def pictures(draw: st.DrawFn) -> Tuple[bytes, int, int]:
    """An encoded picture: any size from 1x1, gray, RGB or RGBA with a partly opaque alpha."""
    width = draw(st.integers(1, 160))
    height = draw(st.integers(1, 160))
    kind = draw(st.sampled_from(("gray", "rgb", "rgba", "rgb16")))
    ext = draw(st.sampled_from(FORMATS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "gray":
        image = rng.integers(0, 256, (height, width), dtype=np.uint8)
    elif kind == "rgb16":
        image = rng.integers(0, 65536, (height, width, 3), dtype=np.uint16)
        ext = ".png"  # the only format here that keeps 16 bits
    else:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind == "rgba":
        alpha = np.zeros((height, width), dtype=np.uint8)
        alpha[: max(1, height // 2), : max(1, width // 2)] = 255  # the ROI: never empty
        image = np.dstack([image, alpha])
        ext = ".png"
    return encode(image, ext), width, height


@st.composite
def rois_inside(draw: st.DrawFn, width: int, height: int) -> Optional[Roi]:
    kind = draw(st.sampled_from(("none", "bbox", "polygon")))
    if kind == "none":
        return None
    if kind == "bbox":
        x = draw(st.floats(0, width - 1))
        y = draw(st.floats(0, height - 1))
        w = draw(st.floats(0.5, width - x + 0.5))
        h = draw(st.floats(0.5, height - y + 0.5))
        return Roi(bbox=(x, y, w, h))
    count = draw(st.integers(3, 12))
    xs = draw(st.lists(st.integers(0, width - 1), min_size=count, max_size=count))
    ys = draw(st.lists(st.integers(0, height - 1), min_size=count, max_size=count))
    return Roi(polygon=np.array(list(zip(xs, ys)), dtype=np.float64))


def assert_model_input(tensor: np.ndarray) -> None:
    assert tensor.shape == (1, 3, SPEC.input_size, SPEC.input_size) and tensor.dtype == np.float32
    assert np.all(np.isfinite(tensor))
    assert float(np.abs(tensor).max()) <= 1.0 + 1e-5  # (x - 127.5) / 127.5 for x in 0..255


@FUZZ
@given(st.data())
def test_any_decodable_picture_with_a_valid_roi_gives_a_finite_tensor(data: st.DataObject) -> None:
    encoded, width, height = data.draw(pictures())
    decoded = decode_image(encoded, LIMITS.max_pixels)
    assert decoded.rgb.shape == (height, width, 3) and decoded.rgb.dtype == np.uint8
    roi = data.draw(rois_inside(width, height))
    result = preprocess_decoded(decoded, roi, SPEC, LIMITS)
    assert_model_input(result.tensor)
    x, y, w, h = result.roi_bbox
    assert 0 <= x and 0 <= y and x + w <= width and y + h <= height and 1 <= result.roi_pixels <= w * h


coordinate = st.one_of(st.floats(-1e9, 1e9, allow_nan=False), st.integers(-(10**9), 10**9))


@FUZZ
@given(
    st.sampled_from(("polygon", "bbox")),
    st.lists(st.tuples(coordinate, coordinate), min_size=3, max_size=8),
    st.tuples(coordinate, coordinate, st.floats(1e-3, 2e9), st.floats(1e-3, 2e9)),
)
def test_any_roi_in_the_accepted_range_gives_a_tensor_or_invalid_roi(kind: str, points: list, bbox: tuple) -> None:
    roi = Roi(polygon=np.array(points, dtype=np.float64)) if kind == "polygon" else Roi(bbox=bbox)
    try:
        result = preprocess_roi(encode(np.full((40, 60, 3), 90, dtype=np.uint8)), roi, SPEC, PreprocessLimits())
    except InvalidRoi:
        return
    assert_model_input(result.tensor)
    assert result.roi_pixels >= PreprocessLimits().min_roi_pixels


@FUZZ
@given(st.floats(60, 1e9), st.floats(40, 1e9))
def test_a_polygon_around_the_whole_picture_covers_every_pixel(reach_x: float, reach_y: float) -> None:
    """Far-away vertices are legal (up to 1e9): the mask must not wrap around in fixed point."""
    polygon = np.array([[-reach_x, -reach_y], [reach_x, -reach_y], [reach_x, reach_y], [-reach_x, reach_y]])
    try:
        result = preprocess_roi(encode(np.full((40, 60, 3), 90, dtype=np.uint8)), Roi(polygon=polygon), SPEC)
    except InvalidRoi as exc:
        # Refusing coordinates beyond a stated bound is fine; a wrong mask is not.
        assert "coordinates" in exc.message
        return
    assert result.roi_pixels == 40 * 60 and result.roi_bbox == (0, 0, 60, 40)


@st.composite
def damaged_pictures(draw: st.DrawFn) -> bytes:
    """Valid pictures cut short, bit-flipped or with a foreign header, and plain noise."""
    how = draw(st.sampled_from(("noise", "truncate", "flip", "splice")))
    if how == "noise":
        return draw(st.binary(max_size=3000))
    encoded, _, _ = draw(pictures())
    if how == "truncate":
        return encoded[: draw(st.integers(0, max(0, len(encoded) - 1)))]
    if how == "flip":
        data = bytearray(encoded)
        for _ in range(draw(st.integers(1, 8))):
            index = draw(st.integers(0, len(data) - 1))
            data[index] ^= draw(st.integers(1, 255))
        return bytes(data)
    header = draw(st.sampled_from((b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"RIFF\x00\x00\x00\x00WEBPVP8X", b"BM")))
    return header + encoded[draw(st.integers(0, len(encoded))) :]


@FUZZ
@given(damaged_pictures())
def test_any_damaged_bytes_give_a_tensor_or_a_preprocess_error(data: bytes) -> None:
    try:
        result = preprocess_roi(data, None, SPEC, LIMITS)
    except PreprocessError as exc:
        assert exc.http_status in (415, 422) and exc.message
        return
    assert_model_input(result.tensor)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.sampled_from(("polygon", "bbox", "x")), children, max_size=3),
    max_leaves=30,
)


@FUZZ
@given(st.one_of(st.text(max_size=200), json_values.map(json.dumps)))
def test_any_roi_text_parses_or_raises_invalid_roi(text: str) -> None:
    try:
        roi = parse_roi_json(text)
    except InvalidRoi as exc:
        assert exc.message
        return
    if roi is not None:
        assert (roi.polygon is None) != (roi.bbox is None)
        values = roi.polygon if roi.polygon is not None else np.array(roi.bbox)
        assert np.all(np.isfinite(values))


@pytest.mark.parametrize("size", [(1, 1), (1, 500), (500, 1)])
def test_extreme_aspect_ratios_letterbox_to_a_finite_tensor(size: Tuple[int, int]) -> None:
    width, height = size
    result = preprocess_roi(encode(np.full((height, width, 3), 200, dtype=np.uint8)), None, SPEC, LIMITS)
    assert_model_input(result.tensor)



def even_odd_inside(polygon: np.ndarray, width: int, height: int) -> np.ndarray:
    """Exact point-in-polygon for every pixel position (OpenCV puts pixel (x, y) at integer x, y)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    inside = np.zeros((height, width), dtype=bool)
    for (ax, ay), (bx, by) in zip(polygon, np.roll(polygon, -1, axis=0)):
        if ay == by:
            continue
        straddles = (ay > yy) != (by > yy)
        with np.errstate(over="ignore"):  # a nearly flat edge 1e9 px long: inf compares correctly
            x_cross = ax + (yy - ay) * (bx - ax) / (by - ay)
        inside ^= straddles & (xx < x_cross)
    return inside


def distance_to_edges(polygon: np.ndarray, width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    best = np.full((height, width), np.inf)
    for a, b in zip(polygon, np.roll(polygon, -1, axis=0)):
        ab = b - a
        length = float(ab @ ab)
        t = np.zeros_like(xx) if length == 0 else np.clip(((xx - a[0]) * ab[0] + (yy - a[1]) * ab[1]) / length, 0, 1)
        best = np.minimum(best, np.hypot(xx - (a[0] + t * ab[0]), yy - (a[1] + t * ab[1])))
    return best


@st.composite
def simple_polygons(draw: st.DrawFn) -> np.ndarray:
    """Star-shaped (hence simple) polygons, near the 60x40 picture or with vertices up to 1e9 away."""
    reach = draw(st.sampled_from((300.0, 1e5, 1e9)))
    count = draw(st.integers(3, 30))
    coords = st.floats(-reach, reach, allow_nan=False)
    points = np.array(draw(st.lists(st.tuples(coords, coords), min_size=count, max_size=count)), dtype=np.float64)
    centre = points.mean(axis=0)
    return points[np.argsort(np.arctan2(points[:, 1] - centre[1], points[:, 0] - centre[0]))]


@FUZZ
@given(simple_polygons())
def test_polygon_mask_matches_exact_containment_up_to_its_edges(polygon: np.ndarray) -> None:
    """Whatever the coordinates' size, the mask is the polygon: off by at most 2 px at its edges."""
    from service.preprocess import DecodedImage, roi_mask

    width, height = 60, 40
    decoded = DecodedImage(rgb=np.zeros((height, width, 3), dtype=np.uint8))
    try:
        mask, _ = roi_mask(decoded, Roi(polygon=polygon), PreprocessLimits())
    except InvalidRoi:
        assert not even_odd_inside(polygon, width, height)[distance_to_edges(polygon, width, height) > 2.0].any()
        return
    wrong = (mask > 0) != even_odd_inside(polygon, width, height)
    assert not (wrong & (distance_to_edges(polygon, width, height) > 2.0)).any()


def test_a_million_point_polygon_is_refused_before_parsing_and_a_verbose_valid_one_is_not() -> None:
    import time

    from tests.reliability.corpus import huge_polygon

    text = huge_polygon(compact=True)
    started = time.perf_counter()
    with pytest.raises(InvalidRoi, match="characters"):
        parse_roi_json(text)
    assert time.perf_counter() - started < 0.05  # json.loads of it took 0.5-1.4 s, holding the GIL
    verbose = json.dumps({"polygon": [[1234.56789012345, 678.123456789012]] * 10_000}, indent=4)
    roi = parse_roi_json(verbose)
    assert roi is not None and roi.polygon is not None and roi.polygon.shape == (10_000, 2)
