"""CP-AnemiC: read the standard layout, check the labels, preprocess once, augment on tensors.

Layout (as the public dataset ships it): ``Anemic/*.png``, ``Non-anemic/*.png`` (RGBA crops whose
alpha is the conjunctiva mask) and ``Anemia_Data_Collection_Sheet.csv`` with one row per image,
joined on ``IMAGE_ID`` (the file stem). The label is the folder; it must agree with ``REMARK`` and
with the WHO rule Hb < 11 g/dL, and every disagreement is reported by file.

Each image goes through :func:`service.preprocess.preprocess_roi` exactly once (the service's own
preprocessing, no second copy); the tensors are cached on disk keyed by the data's hash and the
preprocessing spec. Augmentation then works on batches of those tensors in torch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from service.preprocess import PreprocessSpec, preprocess_roi

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cp-anemic"
CSV_NAME = "Anemia_Data_Collection_Sheet.csv"
CLASS_FOLDERS = (("Non-anemic", 0), ("Anemic", 1))
HB_ANEMIA_THRESHOLD_G_DL = 11.0  # WHO, children 6-59 months
AGE_BANDS_MONTHS = ((6, 12), (12, 24), (24, 36), (36, 60))  # [low, high); 60 itself goes in the last band


class DataError(ValueError):
    """The dataset's files, sheet and labels disagree."""


@dataclass(frozen=True)
class Record:
    image_id: str
    path: Path
    label: int  # 1 = anemic
    hb_g_dl: float
    age_months: float
    gender: str
    hospital: str
    remark: str

    @property
    def age_band(self) -> str:
        for low, high in AGE_BANDS_MONTHS:
            if low <= self.age_months < high or (high == AGE_BANDS_MONTHS[-1][1] and self.age_months == high):
                return "{}-{} mo".format(low, high)
        return "other"


@dataclass
class Dataset:
    records: List[Record]
    images: torch.Tensor  # N x 3 x S x S float32, normalized
    roi_width_px: np.ndarray  # N, crop (ROI bbox) size in the original picture
    roi_height_px: np.ndarray
    roi_pixels: np.ndarray  # N, pixels inside the mask
    sha256: str  # of the sheet and every image file (names + bytes)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([r.label for r in self.records], dtype=np.int64)

    @property
    def image_ids(self) -> List[str]:
        return [r.image_id for r in self.records]

    def subset(self, indices: Sequence[int]) -> "Dataset":
        index = list(indices)
        return Dataset(
            records=[self.records[i] for i in index],
            images=self.images[index],
            roi_width_px=self.roi_width_px[index],
            roi_height_px=self.roi_height_px[index],
            roi_pixels=self.roi_pixels[index],
            sha256=self.sha256,
        )


def read_records(data_dir: Path) -> List[Record]:
    """Join the folders with the sheet; raise :class:`DataError` listing every inconsistent file."""
    data_dir = Path(data_dir)
    sheet_path = data_dir / CSV_NAME
    if not sheet_path.is_file():
        raise DataError("{} not found: is {} a CP-AnemiC folder?".format(sheet_path, data_dir))
    with open(sheet_path, newline="", encoding="utf-8-sig") as handle:
        rows: Dict[str, Dict[str, str]] = {}
        for row in csv.DictReader(handle):
            clean = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            rows[clean["IMAGE_ID"]] = clean
    problems: List[str] = []
    records: List[Record] = []
    seen = set()
    for folder, label in CLASS_FOLDERS:
        folder_path = data_dir / folder
        if not folder_path.is_dir():
            raise DataError("{} not found".format(folder_path))
        for path in sorted(folder_path.iterdir()):
            if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
                continue
            image_id = path.stem
            if image_id in seen:
                problems.append("{}: {} appears in both class folders".format(path, image_id))
                continue
            seen.add(image_id)
            entry = rows.get(image_id)
            if entry is None:
                problems.append("{}: no row with IMAGE_ID {} in {}".format(path, image_id, CSV_NAME))
                continue
            try:
                hb = float(entry["HB_LEVEL"])
                age = float(entry["Age(Months)"])
            except ValueError:
                problems.append("{}: unreadable HB_LEVEL {!r} or age {!r}".format(path, entry["HB_LEVEL"], entry["Age(Months)"]))
                continue
            remark_label = {"anemic": 1, "non-anemic": 0}.get(entry["REMARK"].lower())
            hb_label = int(hb < HB_ANEMIA_THRESHOLD_G_DL)
            if remark_label != label or hb_label != label:
                problems.append(
                    "{}: folder {} but REMARK {!r} and HB_LEVEL {} (Hb<11 -> {})".format(
                        path, folder, entry["REMARK"], hb, "Anemic" if hb_label else "Non-anemic"
                    )
                )
                continue
            records.append(
                Record(image_id, path, label, hb, age, entry["GENDER"], entry["HOSPITAL"], entry["REMARK"])
            )
    missing = sorted(set(rows) - seen)
    if missing:
        problems.append("{} sheet rows have no image: {}".format(len(missing), ", ".join(missing[:20])))
    if problems:
        raise DataError("CP-AnemiC at {} is inconsistent:\n  {}".format(data_dir, "\n  ".join(problems)))
    if not records:
        raise DataError("no images under {}".format(data_dir))
    records.sort(key=lambda r: r.image_id)
    return records


def data_sha256(data_dir: Path, records: Sequence[Record]) -> str:
    digest = hashlib.sha256()
    digest.update((Path(data_dir) / CSV_NAME).read_bytes())
    for record in records:
        digest.update("{}/{}\n".format(record.path.parent.name, record.path.name).encode())
        digest.update(hashlib.sha256(record.path.read_bytes()).digest())
    return digest.hexdigest()


def load_dataset(
    data_dir: Path = DEFAULT_DATA_DIR,
    spec: PreprocessSpec = PreprocessSpec(),
    cache_dir: Optional[Path] = None,
    limit: Optional[int] = None,
) -> Dataset:
    """Records + preprocessed tensors; ``limit`` keeps a stratified-ish first-N subset (tests)."""
    records = read_records(Path(data_dir))
    if limit is not None:
        # alternate classes so that a tiny subset still has both
        by_class = [[r for r in records if r.label == c] for c in (0, 1)]
        interleaved = [r for pair in zip(*by_class) for r in pair]
        records = sorted(interleaved[:limit], key=lambda r: r.image_id)
    sha = data_sha256(Path(data_dir), records)
    key = hashlib.sha256((sha + json.dumps(asdict(spec), sort_keys=True)).encode()).hexdigest()[:16]
    cache_path = Path(cache_dir) / "cpanemic-{}.pt".format(key) if cache_dir else None
    if cache_path is not None and cache_path.is_file():
        cached = torch.load(cache_path, weights_only=False)
        return Dataset(records, cached["images"], cached["w"], cached["h"], cached["pixels"], sha)
    tensors: List[np.ndarray] = []
    widths, heights, pixels = [], [], []
    for record in records:
        result = preprocess_roi(record.path.read_bytes(), None, spec)
        tensors.append(result.tensor[0])
        widths.append(result.roi_bbox[2])
        heights.append(result.roi_bbox[3])
        pixels.append(result.roi_pixels)
    images = torch.from_numpy(np.stack(tensors))
    dataset = Dataset(records, images, np.asarray(widths, float), np.asarray(heights, float), np.asarray(pixels, float), sha)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        torch.save({"images": images, "w": dataset.roi_width_px, "h": dataset.roi_height_px, "pixels": dataset.roi_pixels}, tmp)
        tmp.replace(cache_path)
    return dataset


# ---------------------------------------------------------------------------------------------
# Augmentation on normalized tensors. The letterbox fill normalizes to 0 (fill == mean), so
# zero-padding in grid_sample fills new border with exactly the service's fill value.


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = True
    rotation_degrees: float = 15.0
    shift_fraction: float = 0.1
    scale_range: Tuple[float, float] = (0.9, 1.1)
    # Pallor is a colour signal: off by default; when on, mild gain/offset inside the ROI only.
    color: bool = False
    color_gain: float = 0.08  # multiplicative, per channel, on (x - fill)
    color_brightness: float = 0.05  # additive, same for all channels, in normalized units


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random flip / rotation / shift / scale (one affine warp per image), optional mild colour."""
    n = images.shape[0]

    def uniform(low: float, high: float, shape: Tuple[int, ...] = (n,)) -> torch.Tensor:
        return torch.rand(shape, generator=generator) * (high - low) + low

    angle = uniform(-1, 1) * math.radians(config.rotation_degrees)
    scale = uniform(*config.scale_range)
    shift = uniform(-1, 1, (n, 2)) * config.shift_fraction * 2  # affine_grid works in [-1, 1]
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if config.hflip else torch.ones(n)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # theta maps output coords to input coords: inverse of zoom, flip along x
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if config.color:
        inside = (out.abs().sum(1, keepdim=True) > 1e-6).to(out.dtype)
        gain = 1 + uniform(-1, 1, (n, 3)) * config.color_gain
        offset = uniform(-1, 1, (n,)) * config.color_brightness
        out = (out * gain[:, :, None, None] + offset[:, None, None, None]) * inside
    return out
