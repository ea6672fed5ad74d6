"""Find the images of CP-AnemiC that show the same photograph, and cluster them.

CP-AnemiC lists one photograph many times under different ids (and different hospitals and Hb
values): exact copies, re-crops and shifts of one crop, mirrors, re-encodings. A split that puts two
copies on both sides of a train/test line measures memory, not screening. This module links every
pair of images that shares a photograph and merges the links with union-find into *clusters*; the
folds, the intervals and the training weights all work on clusters (``training/grouping.py``).

How a link is found (each is recorded on the link, ``how``):

- ``exact_bytes``: the files are byte-identical;
- ``exact_pixels``: the decoded RGBA arrays are identical (a re-save);
- ``mirrored``: identical after a horizontal or vertical flip or a half turn;
- ``re_encoded``: same size and mask, RGB within a small mean absolute difference inside both masks
  (a lossy re-encode or a colour-preserving re-save), also after a flip;
- ``shared_region``: a 16 x 32 pixel patch of one image occurs pixel-identical inside the other,
  at any offset (re-crops and shifts), also against the other's flips. Only patches that lie wholly
  inside the *eroded* alpha mask count (mask edges and the transparent background match
  everything), and only textured ones (a flat patch is not evidence). Found with a 2-D rolling hash
  of every patch position of every image, so no pair is compared pixel by pixel;
- ``rescaled``: the ROI's thumbnails (aspect within a few percent) agree within a small mean
  absolute difference: a resized copy of the same framing.

``python -m training.duplicates`` prints the counts and writes ``models/cv/duplicate_clusters.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from training.data import DEFAULT_DATA_DIR, Record, read_records

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "models" / "cv" / "duplicate_clusters.json"

# Two independent 31-bit polynomial hashes, combined into one 62-bit key per patch position:
# collisions between the ~10^7 positions of the data set are then practically impossible.
_HASH_MODULI = (2_147_483_647, 2_147_483_629)  # primes below 2**31
_ROW_BASES = (1_000_003, 998_244_353 % 2_147_483_629)
_COL_BASES = (911_382_323 % 2_147_483_647, 972_663_749 % 2_147_483_629)

ORIENTATIONS = ("identity", "fliplr", "flipud", "rot180")


@dataclass(frozen=True)
class DuplicateConfig:
    """Thresholds of the duplicate search; the defaults are the ones the committed clusters use."""

    patch_height_px: int = 16
    patch_width_px: int = 32
    # Patches must lie wholly in the mask's core (alpha == 255), which already leaves out the
    # soft, anti-aliased edge and the transparent background; erode_px shrinks the core further.
    # Measured on CP-AnemiC: eroding by 1 px loses 14 true re-crop links of small crops (checked by
    # eye) and adds no protection, since nothing outside the core is compared.
    erode_px: int = 0
    # a patch counts only if its grey-level standard deviation is at least this (flat regions match anything)
    min_patch_std: float = 1.0
    # at least this many patch positions of one image must occur in the other
    min_shared_patches: int = 4
    # re-encoded: same size, masks agreeing on this fraction, RGB mean |diff| inside both masks at most
    re_encoded_mask_iou: float = 0.95
    re_encoded_max_mean_abs_diff: float = 4.0
    # rescaled: ROI thumbnails of equal aspect (within this relative difference), mean |diff| at most
    thumbnail_size_px: Tuple[int, int] = (24, 64)  # height, width
    rescaled_max_aspect_diff: float = 0.04
    rescaled_max_mean_abs_diff: float = 3.0
    rescaled_min_mask_iou: float = 0.9

    def __post_init__(self) -> None:
        if self.patch_height_px < 4 or self.patch_width_px < 4:
            raise ValueError("patches must be at least 4 x 4 pixels")
        if self.min_shared_patches < 1:
            raise ValueError("min_shared_patches must be >= 1")
        if self.erode_px < 0:
            raise ValueError("erode_px must be >= 0")


@dataclass(frozen=True)
class Link:
    a: str
    b: str
    how: str
    evidence: str


@dataclass
class Picture:
    """One image as the search sees it: straight RGBA from the file, no preprocessing."""

    image_id: str
    rgba: np.ndarray  # H x W x 4 uint8
    file_sha256: str

    @property
    def core_mask(self) -> np.ndarray:
        return self.rgba[..., 3] == 255


def read_picture(image_id: str, path: Path) -> Picture:
    data = Path(path).read_bytes()
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise ValueError("{}: not a decodable image".format(path))
    return Picture(image_id, to_rgba(decoded), hashlib.sha256(data).hexdigest())


def to_rgba(decoded: np.ndarray) -> np.ndarray:
    """8-bit RGBA from what ``cv2.imdecode(..., IMREAD_UNCHANGED)`` returns (BGR/BGRA/grey, 8/16 bit)."""
    if decoded.dtype == np.uint16:
        decoded = (decoded >> 8).astype(np.uint8)
    if decoded.ndim == 2:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_GRAY2BGRA)
    elif decoded.shape[2] == 3:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGR2BGRA)
    return np.ascontiguousarray(cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGBA))


def oriented(array: np.ndarray, orientation: str) -> np.ndarray:
    if orientation == "identity":
        return array
    if orientation == "fliplr":
        return array[:, ::-1]
    if orientation == "flipud":
        return array[::-1]
    if orientation == "rot180":
        return array[::-1, ::-1]
    raise ValueError("unknown orientation {!r}".format(orientation))


# ---------------------------------------------------------------------------------------------
# union-find


class UnionFind:
    def __init__(self, items: Iterable[str]) -> None:
        self.parent: Dict[str, str] = {item: item for item in items}

    def find(self, item: str) -> str:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: str, b: str) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            # the smaller id becomes the root: cluster ids do not depend on the order of the links
            low, high = sorted((root_a, root_b))
            self.parent[high] = low

    def groups(self) -> List[List[str]]:
        by_root: Dict[str, List[str]] = defaultdict(list)
        for item in self.parent:
            by_root[self.find(item)].append(item)
        return sorted((sorted(members) for members in by_root.values()), key=lambda m: m[0])


# ---------------------------------------------------------------------------------------------
# exact, mirrored and re-encoded copies


def _pixel_key(rgba: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rgba).tobytes() + repr(rgba.shape).encode()).hexdigest()


def exact_links(pictures: Sequence[Picture]) -> List[Link]:
    """Byte-identical files, pixel-identical decodes, and pixel-identical flips."""
    links: List[Link] = []
    first_by_bytes: Dict[str, str] = {}
    first_by_pixels: Dict[str, str] = {}
    for picture in pictures:
        key = _pixel_key(picture.rgba)
        same_bytes = first_by_bytes.setdefault(picture.file_sha256, picture.image_id)
        same_pixels = first_by_pixels.setdefault(key, picture.image_id)
        if same_bytes != picture.image_id:
            links.append(Link(same_bytes, picture.image_id, "exact_bytes", "sha256 {}".format(picture.file_sha256[:12])))
        elif same_pixels != picture.image_id:
            links.append(Link(same_pixels, picture.image_id, "exact_pixels", "decoded RGBA identical"))
    for picture in pictures:
        for orientation in ORIENTATIONS[1:]:
            other = first_by_pixels.get(_pixel_key(oriented(picture.rgba, orientation)))
            if other is not None and other < picture.image_id:
                links.append(Link(other, picture.image_id, "mirrored", orientation))
    return links


def distinct_pictures(pictures: Sequence[Picture]) -> List[Picture]:
    """One picture per exact pixel content (the exact links already join the rest)."""
    seen: Dict[str, Picture] = {}
    for picture in pictures:
        seen.setdefault(_pixel_key(picture.rgba), picture)
    return list(seen.values())


def _masked_mean_abs_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    if not mask.any():
        return float("inf")
    return float(np.abs(a[..., :3].astype(np.int16) - b[..., :3].astype(np.int16))[mask].mean())


def re_encoded_links(pictures: Sequence[Picture], config: DuplicateConfig) -> List[Link]:
    """Same size, same mask, nearly the same colours: a lossy re-encode of one file (also flipped)."""
    links: List[Link] = []
    by_shape: Dict[Tuple[int, int], List[Picture]] = defaultdict(list)
    for picture in pictures:
        by_shape[picture.rgba.shape[:2]].append(picture)
    for group in by_shape.values():
        for i, first in enumerate(group):
            for second in group[i + 1 :]:
                for orientation in ORIENTATIONS:
                    other = oriented(second.rgba, orientation)
                    mask_a, mask_b = first.rgba[..., 3] > 0, other[..., 3] > 0
                    union = np.logical_or(mask_a, mask_b).sum()
                    both = np.logical_and(mask_a, mask_b)
                    iou = both.sum() / union if union else 0.0
                    if iou < config.re_encoded_mask_iou:
                        continue
                    diff = _masked_mean_abs_diff(first.rgba, other, both)
                    if diff <= config.re_encoded_max_mean_abs_diff:
                        a, b = sorted((first.image_id, second.image_id))
                        links.append(Link(a, b, "re_encoded", "{} mask IoU {:.3f}, mean |dRGB| {:.2f}".format(orientation, iou, diff)))
                        break
    return links


# ---------------------------------------------------------------------------------------------
# shared regions: every textured patch position of every image, hashed with a 2-D rolling hash


def _window_sums(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Sum over every ``height x width`` window (valid positions only), from an integral image."""
    integral = np.pad(values, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return integral[height:, width:] - integral[:-height, width:] - integral[height:, :-width] + integral[:-height, :-width]


def patch_keys(rgba: np.ndarray, config: DuplicateConfig) -> Tuple[np.ndarray, np.ndarray]:
    """(62-bit keys, flat positions) of the patches that lie inside the eroded mask and have texture."""
    ph, pw = config.patch_height_px, config.patch_width_px
    height, width = rgba.shape[:2]
    if height < ph or width < pw:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    core = (rgba[..., 3] == 255).astype(np.uint8)
    if config.erode_px:
        size = 2 * config.erode_px + 1
        core = cv2.erode(core, np.ones((size, size), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    inside = _window_sums(core.astype(np.int64), ph, pw) == ph * pw
    grey = rgba[..., :3].astype(np.float64).mean(2)
    area = float(ph * pw)
    mean = _window_sums(grey, ph, pw) / area
    variance = _window_sums(grey * grey, ph, pw) / area - mean * mean
    keep = inside & (variance >= config.min_patch_std ** 2)
    if not keep.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rgb = rgba[..., :3].astype(np.int64)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # < 2**24
    keys = np.zeros(keep.shape, np.int64)
    for modulus, row_base, col_base in zip(_HASH_MODULI, _ROW_BASES, _COL_BASES):
        rows = np.zeros((height, width - pw + 1), np.int64)
        for k in range(pw):
            rows = (rows * row_base + packed[:, k : k + width - pw + 1]) % modulus
        cols = np.zeros((height - ph + 1, width - pw + 1), np.int64)
        for k in range(ph):
            cols = (cols * col_base + rows[k : k + height - ph + 1]) % modulus
        keys = (keys << 31) | cols
    positions = np.flatnonzero(keep)
    return keys.ravel()[positions], positions


def shared_region_links(pictures: Sequence[Picture], config: DuplicateConfig) -> List[Link]:
    """Pairs where at least ``min_shared_patches`` patch positions of one occur in the other.

    Every image is hashed as it is; its three flips are hashed too, and matched only against the
    others' unflipped patches (a flip on both sides is the unflipped match again).
    """
    key_parts: List[np.ndarray] = []
    owner_parts: List[np.ndarray] = []  # picture index * 4 + orientation index
    for index, picture in enumerate(pictures):
        for o, orientation in enumerate(ORIENTATIONS):
            keys, _positions = patch_keys(np.ascontiguousarray(oriented(picture.rgba, orientation)), config)
            keys = np.unique(keys)
            key_parts.append(keys)
            owner_parts.append(np.full(len(keys), index * 4 + o, np.int64))
    if not key_parts:
        return []
    keys = np.concatenate(key_parts)
    owners = np.concatenate(owner_parts)
    order = np.argsort(keys, kind="stable")
    keys, owners = keys[order], owners[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(keys)) + 1])
    lengths = np.diff(np.concatenate([starts, [len(keys)]]))
    shared: Counter = Counter()
    for start, length in zip(starts[lengths > 1].tolist(), lengths[lengths > 1].tolist()):
        run = owners[start : start + length].tolist()
        straight = sorted({o // 4 for o in run if o % 4 == 0})
        for position, i in enumerate(straight):
            for j in straight[position + 1 :]:
                shared[(i, j, 0)] += 1
        for o in run:
            if o % 4:
                for j in straight:
                    if j != o // 4:
                        a, b = sorted((o // 4, j))
                        shared[(a, b, o % 4)] += 1
    links: List[Link] = []
    best: Dict[Tuple[int, int], Tuple[int, int]] = {}
    for (i, j, o), count in shared.items():
        if count >= config.min_shared_patches and count > best.get((i, j), (-1, 0))[1]:
            best[(i, j)] = (o, count)
    for (i, j), (o, count) in sorted(best.items()):
        how = "shared_region" if o == 0 else "shared_region_mirrored"
        evidence = "{} patch positions of {}x{} px identical{}".format(
            count, config.patch_height_px, config.patch_width_px, "" if o == 0 else " ({})".format(ORIENTATIONS[o])
        )
        links.append(Link(pictures[i].image_id, pictures[j].image_id, how, evidence))
    return links


# ---------------------------------------------------------------------------------------------
# rescaled copies: thumbnails of the ROI's bounding box


def _thumbnail(rgba: np.ndarray, size_hw: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray, float]:
    """(RGB thumbnail float32, mask thumbnail bool, aspect w/h) of the alpha bounding box."""
    alpha = rgba[..., 3]
    ys, xs = np.nonzero(alpha)
    if len(ys) == 0:
        ys, xs = np.array([0, rgba.shape[0] - 1]), np.array([0, rgba.shape[1] - 1])
    crop = rgba[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = size_hw
    small = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    return small[..., :3], small[..., 3] >= 250, crop.shape[1] / crop.shape[0]


def rescaled_links(pictures: Sequence[Picture], config: DuplicateConfig) -> List[Link]:
    """Same framing at another size: thumbnails of equal aspect whose colours agree closely."""
    thumbs = [_thumbnail(p.rgba, config.thumbnail_size_px) for p in pictures]
    links: List[Link] = []
    for i in range(len(pictures)):
        rgb_i, mask_i, aspect_i = thumbs[i]
        for j in range(i + 1, len(pictures)):
            rgb_j, mask_j, aspect_j = thumbs[j]
            if abs(aspect_i - aspect_j) / max(aspect_i, aspect_j) > config.rescaled_max_aspect_diff:
                continue
            if pictures[i].rgba.shape[:2] == pictures[j].rgba.shape[:2]:
                continue  # same size: re_encoded's business, with its stricter mask test
            for orientation in ORIENTATIONS:
                rgb_o, mask_o = oriented(rgb_j, orientation), oriented(mask_j, orientation)
                both = mask_i & mask_o
                union = (mask_i | mask_o).sum()
                if not union or both.sum() / union < config.rescaled_min_mask_iou:
                    continue
                diff = float(np.abs(rgb_i - rgb_o)[both].mean())
                if diff <= config.rescaled_max_mean_abs_diff:
                    links.append(Link(pictures[i].image_id, pictures[j].image_id, "rescaled", "{} thumbnail mean |dRGB| {:.2f}, mask IoU {:.3f}".format(orientation, diff, both.sum() / union)))
                    break
    return links


# ---------------------------------------------------------------------------------------------
# all together


def find_links(pictures: Sequence[Picture], config: DuplicateConfig = DuplicateConfig()) -> List[Link]:
    """Every pair of images that shares a photograph, once, by the strongest evidence found for it.

    The searches after the exact one run on one picture per pixel content: an exact copy shares
    every link of its twin through the exact link.
    """
    distinct = distinct_pictures(pictures)
    found = exact_links(pictures) + re_encoded_links(distinct, config) + shared_region_links(distinct, config) + rescaled_links(distinct, config)
    strongest: Dict[Tuple[str, str], Link] = {}
    for link in found:  # in order of strength: exact, mirrored, re-encoded, shared region, rescaled
        strongest.setdefault(tuple(sorted((link.a, link.b))), link)  # type: ignore[arg-type]
    return list(strongest.values())


def cluster(image_ids: Sequence[str], links: Sequence[Link]) -> List[List[str]]:
    union_find = UnionFind(image_ids)
    for link in links:
        union_find.union(link.a, link.b)
    return union_find.groups()


def cluster_report(records: Sequence[Record], links: Sequence[Link], clusters: Sequence[Sequence[str]], config: DuplicateConfig) -> Dict[str, object]:
    by_id = {r.image_id: r for r in records}
    cluster_rows = []
    for index, members in enumerate(clusters):
        labels = sorted({by_id[m].label for m in members})
        cluster_rows.append(
            {
                "id": index,
                "members": list(members),
                "labels": [by_id[m].label for m in members],
                "hb_g_dl": [by_id[m].hb_g_dl for m in members],
                "hospitals": [by_id[m].hospital for m in members],
                "label_conflict": len(labels) > 1,
            }
        )
    sizes = Counter(len(m) for m in clusters)
    multi = [c for c in cluster_rows if len(c["members"]) > 1]  # type: ignore[arg-type]
    return {
        "description": "Images of CP-AnemiC that show the same photograph (python -m training.duplicates).",
        "config": asdict(config),
        "n_images": len(records),
        "n_clusters": len(clusters),
        "n_images_with_a_copy": sum(len(c["members"]) for c in multi),  # type: ignore[arg-type,misc]
        "n_clusters_with_copies": len(multi),
        "largest_cluster": max(sizes) if sizes else 0,
        "cluster_sizes": {str(k): v for k, v in sorted(sizes.items())},
        "links_by_kind": dict(sorted(Counter(link.how for link in links).items())),
        "clusters_with_label_conflict": sum(1 for c in cluster_rows if c["label_conflict"]),
        "clusters_spanning_hospitals": sum(1 for c in multi if len(set(c["hospitals"])) > 1),  # type: ignore[arg-type]
        "clusters": cluster_rows,
        "links": [asdict(link) for link in links],
    }


def load_clusters(path: Path = DEFAULT_OUTPUT) -> Dict[str, int]:
    """image id -> cluster id, from a file written by this module."""
    report = json.loads(Path(path).read_text())
    return {member: int(c["id"]) for c in report["clusters"] for member in c["members"]}


def run(data_dir: Path, output: Optional[Path], config: DuplicateConfig = DuplicateConfig()) -> Dict[str, object]:
    records = read_records(Path(data_dir))
    pictures = [read_picture(r.image_id, r.path) for r in records]
    links = find_links(pictures, config)
    clusters = cluster([r.image_id for r in records], links)
    report = cluster_report(records, links, clusters, config)
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(output)
    return report


def summary_lines(report: Mapping[str, object]) -> List[str]:
    return [
        "{n_images} images -> {n_clusters} clusters (distinct photographs); {n_images_with_a_copy} images lie in {n_clusters_with_copies} clusters of 2 or more, the largest {largest_cluster}".format(**report),
        "links by kind: {}".format(", ".join("{} {}".format(k, v) for k, v in report["links_by_kind"].items())),  # type: ignore[union-attr]
        "cluster sizes: {}".format(", ".join("{}: {}".format(k, v) for k, v in report["cluster_sizes"].items())),  # type: ignore[union-attr]
        "clusters with conflicting labels: {clusters_with_label_conflict}; clusters spanning hospitals: {clusters_spanning_hospitals}".format(**report),
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.duplicates", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="cluster file (JSON)")
    args = parser.parse_args(argv)
    report = run(args.data_dir, args.output)
    print("\n".join(summary_lines(report)))
    print("wrote {}".format(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
