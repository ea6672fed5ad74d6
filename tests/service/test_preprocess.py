from __future__ import annotations

import json
import math

import numpy as np
from typing import Optional

import cv2
import pytest

from service.errors import ImageTooLarge, InvalidRoi, UnsupportedImage
from service.preprocess import (
    PreprocessLimits,
    PreprocessSpec,
    Roi,
    decode_image,
    jpeg_exif_orientation,
    parse_roi_json,
    preprocess_roi,
)
import service.preprocess as pp
from tests.images import bomb_png, conjunctiva_rgba, encode, palette_png, rgb_photo, with_exif_orientation

SPEC = PreprocessSpec()


def test_spec_round_trips_through_model_metadata() -> None:
    spec = PreprocessSpec(input_size=160, fill=(0.0, 0.0, 0.0), mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0))
    assert PreprocessSpec.from_metadata(spec.to_metadata()) == spec


def test_spec_from_metadata_names_missing_keys() -> None:
    with pytest.raises(ValueError, match="preprocess.std"):
        PreprocessSpec.from_metadata({k: v for k, v in SPEC.to_metadata().items() if k != "preprocess.std"})


def test_alpha_channel_is_the_roi_and_outside_gets_the_fill() -> None:
    rgba = conjunctiva_rgba(228, 88)
    result = preprocess_roi(encode(rgba), None, SPEC)
    assert result.roi_source == "alpha"
    assert result.roi_pixels == int((rgba[..., 3] >= 128).sum())
    assert result.tensor.shape == (1, 3, 224, 224) and result.tensor.dtype == np.float32
    # Letterbox: 228x88 scales to 224x86, centred; rows above it are fill, which normalizes to 0.
    assert np.allclose(result.tensor[0, :, :60, :], 0.0)
    # The ellipse's corners inside its bbox are transparent, hence fill too.
    assert np.allclose(result.tensor[0, :, 70, 0], 0.0)
    centre = result.tensor[0, :, 112, 112]
    assert centre[0] > centre[1] and centre[0] > 0.4  # red dominates the conjunctiva


def test_normalization_uses_the_specs_mean_and_std() -> None:
    flat = np.full((50, 50, 3), (255, 0, 127), dtype=np.uint8)
    result = preprocess_roi(encode(flat), None, SPEC)
    assert result.roi_source == "full"
    assert np.allclose(result.tensor[0, :, 112, 112], [1.0, -1.0, -0.5 / 127.5], atol=1e-5)


def test_bgr_channel_order_swaps_channels() -> None:
    flat = np.full((50, 50, 3), (255, 0, 127), dtype=np.uint8)
    result = preprocess_roi(encode(flat), None, PreprocessSpec(channel_order="BGR"))
    assert np.allclose(result.tensor[0, :, 112, 112], [-0.5 / 127.5, -1.0, 1.0], atol=1e-5)


def test_polygon_roi_masks_outside_and_crops_to_its_bbox() -> None:
    image = np.zeros((200, 300, 3), dtype=np.uint8)
    image[:, :150] = (255, 0, 0)
    image[:, 150:] = (0, 0, 255)
    roi = Roi(polygon=np.array([[10.0, 20.0], [140.0, 20.0], [140.0, 180.0], [10.0, 180.0]]))
    result = preprocess_roi(encode(image), roi, SPEC)
    assert result.roi_source == "polygon"
    assert result.roi_bbox == (10, 20, 131, 161)
    # Only red pixels were inside: no blue anywhere in the tensor.
    assert result.tensor[0, 2].max() <= 0.0 + 1e-6


def test_bbox_roi() -> None:
    result = preprocess_roi(encode(rgb_photo(320, 240)), Roi(bbox=(100.0, 50.0, 60.0, 40.0)), SPEC)
    assert result.roi_source == "bbox" and result.roi_bbox == (100, 50, 60, 40) and result.roi_pixels == 2400


def test_jpeg_exif_orientation_is_honoured() -> None:
    image = np.zeros((40, 100, 3), dtype=np.uint8)  # landscape as stored
    image[:, :50] = 255
    jpeg = with_exif_orientation(encode(image, ".jpg"), 6)
    assert jpeg_exif_orientation(jpeg) == 6
    decoded = decode_image(jpeg)
    assert decoded.rgb.shape[:2] == (100, 40)  # shown rotated 90° clockwise: portrait
    assert decoded.rgb[:50].mean() > 200 and decoded.rgb[50:].mean() < 50


def test_sixteen_bit_png_decodes_to_eight_bit() -> None:
    image16 = np.full((30, 40, 3), 65535, dtype=np.uint16)
    image16[:, :20] = 256 * 100
    decoded = decode_image(encode(image16))
    assert decoded.rgb.dtype == np.uint8
    assert decoded.rgb[0, 0, 0] == 100 and decoded.rgb[0, 39, 0] == 255


def test_grayscale_jpeg_becomes_rgb() -> None:
    gray = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
    decoded = decode_image(encode(gray, ".jpg"))
    assert decoded.rgb.shape == (48, 64, 3)
    assert np.array_equal(decoded.rgb[..., 0], decoded.rgb[..., 2])


def test_palette_png_decodes() -> None:
    palette = np.array([[255, 0, 0], [0, 255, 0]], dtype=np.uint8)
    indices = np.zeros((10, 12), dtype=np.uint8)
    indices[:, 6:] = 1
    decoded = decode_image(palette_png(indices, palette))
    assert tuple(decoded.rgb[0, 0]) == (255, 0, 0) and tuple(decoded.rgb[0, 11]) == (0, 255, 0)


@pytest.mark.parametrize("ext", [".webp", ".bmp"])
def test_webp_and_bmp_decode(ext: str) -> None:
    image = rgb_photo(64, 48)
    decoded = decode_image(encode(image, ext))
    assert decoded.rgb.shape == (48, 64, 3)
    assert decoded.format == ext[1:]
    if ext == ".bmp":  # lossless
        assert np.array_equal(decoded.rgb, image)


def test_opaque_alpha_is_not_a_mask() -> None:
    rgba = conjunctiva_rgba()
    rgba[..., 3] = 255
    assert decode_image(encode(rgba)).alpha is None


@pytest.mark.parametrize(
    "data, error",
    [
        (b"", UnsupportedImage),
        (b"hello, this is text", UnsupportedImage),
        (b"<html><body>not an image</body></html>", UnsupportedImage),
        (encode(rgb_photo())[:200], UnsupportedImage),  # truncated PNG
        (encode(rgb_photo(), ".jpg")[:300], UnsupportedImage),  # truncated JPEG
        (b"\x89PNG\r\n\x1a\n", UnsupportedImage),  # signature only
        (bomb_png(), ImageTooLarge),  # 100000 x 100000 claimed in the header
    ],
    ids=["empty", "text", "html", "truncated-png", "truncated-jpeg", "png-signature-only", "bomb"],
)
def test_bad_bytes_raise_the_projects_errors(data: bytes, error: type) -> None:
    with pytest.raises(error):
        preprocess_roi(data, None, SPEC)


def test_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(ImageTooLarge, match="320x240"):
        decode_image(encode(rgb_photo(320, 240)), max_pixels=320 * 240 - 1)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"polygon": [[0, 0], [1, 1]]}', "at least 3"),
        ('{"polygon": [[0, 0], [1, NaN], [2, 2]]}', "finite"),
        ('{"polygon": [[0, 0], [1, Infinity], [2, 2]]}', "finite"),
        ('{"polygon": [[0, 0], [1, "a"], [2, 2]]}', "numbers"),
        ('{"polygon": [[0, 0, 1], [1, 1], [2, 2]]}', "[x, y]"),
        ('{"bbox": [0, 0, -5, 10]}', "positive"),
        ('{"bbox": [0, 0, 5]}', "[x, y, w, h]"),
        ('{"polygon": [[0,0],[1,0],[1,1]], "bbox": [0,0,1,1]}', "exactly one"),
    ],
)
def test_malformed_roi_json(text: str, fragment: str) -> None:
    with pytest.raises(InvalidRoi) as raised:
        parse_roi_json(text)
    assert fragment in raised.value.message


def test_polygon_point_limit() -> None:
    points = [[i % 100, i // 100] for i in range(2001)]
    with pytest.raises(InvalidRoi, match="at most 2000"):
        parse_roi_json(json.dumps({"polygon": points}), max_polygon_points=2000)


def test_polygon_outside_the_image_is_rejected() -> None:
    roi = parse_roi_json('{"polygon": [[1000, 1000], [1100, 1000], [1100, 1100]]}')
    with pytest.raises(InvalidRoi, match="outside"):
        preprocess_roi(encode(rgb_photo(320, 240)), roi, SPEC)


def test_too_small_roi_is_rejected() -> None:
    roi = parse_roi_json('{"bbox": [10, 10, 4, 4]}')
    with pytest.raises(InvalidRoi, match="16 pixels"):
        preprocess_roi(encode(rgb_photo()), roi, SPEC, PreprocessLimits(min_roi_pixels=100))


def test_fully_transparent_png_is_an_empty_roi() -> None:
    rgba = conjunctiva_rgba()
    rgba[..., 3] = 0
    with pytest.raises(InvalidRoi, match="covers 0 pixels"):
        preprocess_roi(encode(rgba), None, SPEC)


def test_blank_roi_field_means_no_roi() -> None:
    assert parse_roi_json("  ") is None and parse_roi_json(None) is None


def test_output_is_finite_for_extreme_aspect_ratios() -> None:
    for width, height in ((2000, 3), (3, 2000), (1, 1)):
        result = preprocess_roi(encode(rgb_photo(width, height)), None, SPEC, PreprocessLimits(min_roi_pixels=1))
        assert result.tensor.shape == (1, 3, 224, 224)
        assert math.isfinite(float(result.tensor.sum()))


def _reference_tensor(crop: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The step-by-step formula: fill canvas, paste the resized crop, (x - mean) / std, CHW."""
    from service.preprocess import resize_to_fit

    resized, top, left = resize_to_fit(crop, spec.input_size, spec.resize_mode)
    if spec.resize_mode == "stretch":
        canvas = resized.astype(np.float32)
    else:
        canvas = np.empty((spec.input_size, spec.input_size, 3), np.float32)
        canvas[:] = np.asarray(spec.fill, np.float32)
        canvas[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    if spec.channel_order == "BGR":
        canvas, mean, std = canvas[:, :, ::-1], mean[::-1], std[::-1]
    return np.ascontiguousarray(((canvas - mean) / std).transpose(2, 0, 1)[np.newaxis])


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(),
        PreprocessSpec(resize_mode="stretch"),
        PreprocessSpec(channel_order="BGR"),
        PreprocessSpec(input_size=160, fill=(0.0, 10.0, 20.0), mean=(120.0, 110.0, 100.0), std=(60.0, 70.0, 80.0)),
    ],
    ids=["letterbox", "stretch", "bgr", "other-constants"],
)
def test_one_pass_normalization_equals_the_step_by_step_formula(spec: PreprocessSpec) -> None:
    from service.preprocess import normalized_chw

    for width, height in ((228, 88), (700, 10), (50, 50), (320, 240)):
        crop = rgb_photo(width, height, seed=width).astype(np.float32)
        assert np.array_equal(normalized_chw(crop, spec), _reference_tensor(crop, spec))


def smooth_photo(width: int, height: int) -> np.ndarray:
    """A camera-like picture: low-frequency content, a little noise (JPEG-friendly)."""
    import cv2

    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, size=(max(2, height // 50), max(2, width // 50), 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def test_reduction_factor_keeps_twice_the_input_size_of_the_roi() -> None:
    from service.preprocess import Roi, jpeg_reduction

    assert jpeg_reduction(4000, 3000, None, 224) == 4  # 4000 / 4 = 1000 >= 4 x 224, 500 is not
    assert jpeg_reduction(1800, 1200, None, 224) == 2  # 900 >= 896
    assert jpeg_reduction(1600, 1200, None, 224) == 1
    assert jpeg_reduction(4000, 3000, Roi(bbox=(0, 0, 2000, 300)), 224) == 2
    polygon = np.array([[100.0, 100.0], [2100.0, 120.0], [1000.0, 300.0], [-1e9, 5.0]])  # far vertex clipped to the image
    assert jpeg_reduction(4000, 3000, Roi(polygon=polygon), 224) == 2
    assert jpeg_reduction(4000, 3000, None, 0) == 1  # no target: full decode


@pytest.mark.parametrize("roi_text", [None, '{"bbox": [400, 500, 1800, 700]}', '{"polygon": [[300, 400], [2300, 450], [2200, 1300], [350, 1200]]}'])
def test_a_large_jpeg_is_decoded_reduced_with_the_roi_in_upload_pixels(roi_text: Optional[str]) -> None:
    import service.preprocess as pp

    data = encode(smooth_photo(3200, 2400), ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95])
    roi = parse_roi_json(roi_text)
    spec = PreprocessSpec()
    assert pp.decode_image(data, roi=roi, target_size=spec.input_size).scale == 2
    reduced = preprocess_roi(data, roi, spec)
    full = pp.preprocess_decoded(pp.decode_image(data), roi, spec)  # no target size: full decode
    assert reduced.image_size == full.image_size == (3200, 2400)
    # the bbox and pixel count are reported in the upload's pixels, within one reduced pixel
    assert all(abs(a - b) <= 2 for a, b in zip(reduced.roi_bbox, full.roi_bbox)), (reduced.roi_bbox, full.roi_bbox)
    assert abs(reduced.roi_pixels - full.roi_pixels) <= 0.02 * full.roi_pixels
    # In normalized units (range 2). A polygon's edge is drawn on the reduced grid, still over 2
    # pixels per model pixel: the few edge pixels that flip between fill and picture dominate.
    difference = np.abs(reduced.tensor - full.tensor)
    assert float(difference.mean()) < 0.02 and float(np.percentile(difference, 95)) < 0.05


def test_reduced_decode_still_honours_exif_orientation() -> None:
    import service.preprocess as pp

    image = smooth_photo(3600, 1200)
    image[:, :900] = (255, 0, 0)  # left quarter red
    jpeg = with_exif_orientation(encode(image, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]), 6)  # shown rotated 90 degrees clockwise
    decoded = pp.decode_image(jpeg, target_size=224)
    assert decoded.scale == 4 and decoded.upload_size == (1200, 3600)
    assert decoded.rgb.shape[:2] == (900, 300)
    top = decoded.rgb[:100].reshape(-1, 3).mean(axis=0)  # the left edge is now on top
    assert top[0] > 200 and top[1] < 60 and top[2] < 60
    assert preprocess_roi(jpeg, None, PreprocessSpec()).image_size == (1200, 3600)


def test_rectangular_canvas_letterboxes_wide_and_tall_rois() -> None:
    spec = PreprocessSpec(input_size=224, input_height=96)
    assert spec.chw == (3, 96, 224) and spec.longer_side == 224
    # a 2.6:1 crop nearly fills the wide canvas: resolution kept, little fill
    wide = np.full((88, 228, 3), 200, np.uint8)
    tensor = pp.preprocess_decoded(pp.DecodedImage(rgb=wide), None, spec).tensor
    assert tensor.shape == (1, 3, 96, 224)
    filled_columns = np.flatnonzero(np.abs(tensor[0]).sum((0, 1)) > 0)
    assert len(filled_columns) == 224
    # a tall ROI (a tablet photo held upright) is scaled by its height and centred, not stretched
    tall = np.full((300, 100, 3), 200, np.uint8)
    tall_tensor = pp.preprocess_decoded(pp.DecodedImage(rgb=tall), None, spec).tensor
    columns = np.flatnonzero(np.abs(tall_tensor[0]).sum((0, 1)) > 0)
    assert len(columns) == 32 and abs((columns[0] + columns[-1]) / 2 - 111.5) <= 1
    assert np.all(np.abs(tall_tensor[0]).sum((0, 2)) > 0)  # every row holds picture


def test_spec_metadata_round_trip_and_models_without_a_height() -> None:
    spec = PreprocessSpec(input_size=224, input_height=96)
    assert PreprocessSpec.from_metadata(spec.to_metadata()) == spec
    old = {k: v for k, v in PreprocessSpec(input_size=224).to_metadata().items() if not k.endswith("input_height")}
    assert PreprocessSpec.from_metadata(old).chw == (3, 224, 224)  # models exported before the key existed
    with pytest.raises(ValueError, match="input_height"):
        PreprocessSpec(input_height=4)
