"""CP-AnemiC reading, label checks, and tensor augmentation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Tuple

import cv2
import numpy as np
import pytest
import torch

from service.preprocess import PreprocessSpec
from training.data import CSV_NAME, AugmentConfig, DataError, Record, augment_batch, load_dataset, read_records

HEADER = "IMAGE_ID,HB_LEVEL,Severity,Age(Months),GENDER,REMARK,HOSPITAL,CITY/TOWN,MUNICIPALITY/DISTRICT,REGION\n"


def _write_crop(path: Path, colour: Tuple[int, int, int], size: Tuple[int, int] = (60, 30)) -> None:
    """An RGBA crop like CP-AnemiC's: an opaque ellipse (the conjunctiva) on transparent pixels."""
    width, height = size
    bgra = np.zeros((height, width, 4), np.uint8)
    cv2.ellipse(bgra, (width // 2, height // 2), (width // 2 - 2, height // 2 - 2), 0, 0, 360, colour[::-1] + (255,), -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), bgra)


def _make_dataset(root: Path, rows: List[Tuple[str, str, float, str]]) -> Path:
    """rows: (folder, image id, Hb, REMARK as written in the sheet)."""
    lines = [HEADER]
    for folder, image_id, hb, remark in rows:
        _write_crop(root / folder / (image_id + ".png"), (200, 80, 90) if folder == "Anemic" else (150, 40, 50))
        lines.append("{},{},Mild,24,Female ,{} ,Some Hospital ,Town,District,Region\n".format(image_id, hb, remark))
    (root / CSV_NAME).write_text("".join(lines))
    return root


def test_reads_and_strips_fields(tmp_path: Path) -> None:
    root = _make_dataset(tmp_path, [("Anemic", "Image_001", 9.5, "Anemic"), ("Non-anemic", "Image_002", 12.0, "Non-anemic")])
    records = read_records(root)
    assert [(r.image_id, r.label, r.gender, r.hospital) for r in records] == [
        ("Image_001", 1, "Female", "Some Hospital"),
        ("Image_002", 0, "Female", "Some Hospital"),
    ]
    assert records[0].age_band == "24-36 mo"


def test_reports_every_label_mismatch_by_file(tmp_path: Path) -> None:
    root = _make_dataset(
        tmp_path,
        [
            ("Anemic", "Image_001", 9.5, "Anemic"),
            ("Anemic", "Image_002", 11.5, "Anemic"),  # Hb says non-anemic
            ("Non-anemic", "Image_003", 12.0, "Anemic"),  # REMARK disagrees with the folder
        ],
    )
    with pytest.raises(DataError) as info:
        read_records(root)
    message = str(info.value)
    assert "Image_002.png" in message and "Image_003.png" in message and "Image_001.png" not in message


def test_image_without_sheet_row_is_reported(tmp_path: Path) -> None:
    root = _make_dataset(tmp_path, [("Anemic", "Image_001", 9.5, "Anemic")])
    _write_crop(root / "Non-anemic" / "Image_009.png", (1, 2, 3))
    with pytest.raises(DataError, match="Image_009.png: no row"):
        read_records(root)


def test_load_dataset_uses_the_service_preprocessing_and_caches(tmp_path: Path) -> None:
    root = _make_dataset(tmp_path / "data", [("Anemic", "Image_001", 9.5, "Anemic"), ("Non-anemic", "Image_002", 12.0, "Non-anemic")])
    spec = PreprocessSpec(input_size=32)
    first = load_dataset(root, spec, cache_dir=tmp_path / "cache")
    assert first.images.shape == (2, 3, 32, 32)
    assert list(first.roi_width_px) == [57.0, 57.0]  # the ellipse: 2 * 28 + 1 pixels wide
    # the anemic crop's red channel (200) normalizes to (200 - 127.5) / 127.5 at the centre
    assert float(first.images[0, 0, 16, 16]) == pytest.approx((200 - 127.5) / 127.5, abs=0.02)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    second = load_dataset(root, spec, cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, second.images) and first.sha256 == second.sha256


def test_flip_only_augmentation_is_an_exact_mirror_or_identity() -> None:
    images = torch.randn(8, 3, 16, 16)
    out = augment_batch(images, AugmentConfig(rotation_degrees=0, shift_fraction=0, scale_range=(1.0, 1.0)), torch.Generator().manual_seed(0))
    flipped = 0
    for original, augmented in zip(images, out):
        if torch.allclose(augmented, original, atol=1e-5):
            continue
        assert torch.allclose(augmented, original.flip(-1), atol=1e-5)
        flipped += 1
    assert 0 < flipped < 8


def test_geometric_augmentation_fills_with_zero_and_keeps_colour() -> None:
    # a constant-colour image: wherever the warp samples inside, the colour is unchanged;
    # outside it is 0, the normalized letterbox fill
    images = torch.full((4, 3, 32, 32), 0.5)
    out = augment_batch(images, AugmentConfig(rotation_degrees=30, shift_fraction=0.2, scale_range=(0.8, 0.8)), torch.Generator().manual_seed(1))
    values = out.flatten()
    assert float(values.min()) >= 0.0 and float(values.max()) <= 0.5 + 1e-5
    assert float((out == 0).float().mean()) > 0.05  # the zoom-out leaves a border of fill
    assert float((out - 0.5).abs().lt(1e-4).float().mean()) > 0.4


def test_colour_augmentation_is_off_by_default_and_leaves_fill_alone() -> None:
    assert AugmentConfig().color is False
    images = torch.zeros(2, 3, 16, 16)
    images[:, :, 4:12, 4:12] = 0.3
    static = AugmentConfig(hflip=False, rotation_degrees=0, shift_fraction=0, scale_range=(1.0, 1.0), color=True)
    out = augment_batch(images, static, torch.Generator().manual_seed(2))
    assert torch.all(out[:, :, :4] == 0)  # fill stays fill
    inside = out[:, :, 4:12, 4:12]
    assert not torch.allclose(inside, images[:, :, 4:12, 4:12]) and float((inside - 0.3).abs().max()) < 0.3 * 0.08 + 0.05 + 1e-5
