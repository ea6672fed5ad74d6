"""The duplicate finder merges synthetic copies (crop, shift, flip, re-encode, rescale) and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.duplicates import DuplicateConfig, Picture, UnionFind, cluster, find_links, load_clusters, patch_keys, read_picture


def conjunctiva(seed: int, height: int = 90, width: int = 240) -> np.ndarray:
    """An RGBA 'photograph': smooth reddish texture with fine noise inside a lens-shaped alpha mask."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 1, (height // 8 + 2, width // 8 + 2, 3))
    smooth = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    rgb = np.clip(np.array([170, 80, 80]) + 60 * (smooth - 0.5) + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((xx - width / 2) / (width / 2)) ** 2 + ((yy - height / 2) / (height / 2.2)) ** 2 < 1
    alpha = np.where(inside, 255, 0).astype(np.uint8)
    alpha = cv2.GaussianBlur(alpha, (5, 5), 0)  # a soft, anti-aliased edge as in CP-AnemiC
    return np.dstack([rgb, alpha])


def picture(image_id: str, rgba: np.ndarray) -> Picture:
    return Picture(image_id, np.ascontiguousarray(rgba), image_id)  # distinct "file hashes"


def png_roundtrip(rgba: np.ndarray) -> np.ndarray:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    assert ok
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)


def re_encode(rgba: np.ndarray, seed: int) -> np.ndarray:
    """A lossy re-encode: colours moved by at most a couple of levels, mask kept."""
    noise = np.random.default_rng(seed).integers(-2, 3, rgba[..., :3].shape)
    return np.dstack([np.clip(rgba[..., :3].astype(int) + noise, 0, 255).astype(np.uint8), rgba[..., 3]])


def clusters_of(pictures):
    links = find_links(pictures, DuplicateConfig())
    groups = cluster([p.image_id for p in pictures], links)
    return {frozenset(g) for g in groups}, links


def test_copies_of_one_photograph_are_merged_and_distinct_photographs_are_not() -> None:
    original = conjunctiva(1)
    copies = {
        "original": original,
        "exact": original.copy(),
        "crop": original[10:80, 30:200],  # re-crop: a smaller window of the same pixels
        "shift": np.pad(original[:, 12:], ((0, 0), (0, 12), (0, 0))),  # shifted inside a same-sized canvas
        "mirror": original[:, ::-1],
        "mirrored_crop": original[5:85, 40:230][:, ::-1],
        "re_encoded": re_encode(original, 3),
        "rescaled": np.dstack([cv2.resize(original[..., :3], (300, 112), interpolation=cv2.INTER_AREA), cv2.resize(original[..., 3], (300, 112))]),
    }
    pictures = [picture(name, rgba) for name, rgba in copies.items()]
    pictures += [picture("other{}".format(seed), conjunctiva(seed)) for seed in (2, 3, 4)]
    # a distinct photograph with the same mask and similar colours is not a copy
    lookalike = conjunctiva(5)
    lookalike[..., 3] = original[..., 3]
    pictures.append(picture("lookalike", lookalike))
    groups, links = clusters_of(pictures)
    assert frozenset(copies) in groups
    for other in ("other2", "other3", "other4", "lookalike"):
        assert frozenset([other]) in groups
    how = {frozenset((l.a, l.b)): l.how for l in links}
    assert how[frozenset(("exact", "original"))] == "exact_pixels"
    assert how[frozenset(("crop", "original"))] == "shared_region"
    assert how[frozenset(("mirror", "original"))] == "mirrored"
    assert how[frozenset(("original", "re_encoded"))] == "re_encoded"
    assert how[frozenset(("original", "shift"))] == "shared_region"
    assert how[frozenset(("mirrored_crop", "original"))] == "shared_region_mirrored"
    assert how[frozenset(("original", "rescaled"))] == "rescaled"


def test_mask_edges_and_flat_regions_are_not_evidence() -> None:
    # Two different photographs whose only common pixels are a flat (saturated) area and the
    # transparent background: the patch search must not link them.
    first, second = conjunctiva(10), conjunctiva(11)
    for rgba in (first, second):
        rgba[30:60, 60:180, :3] = 255  # a specular highlight, identical and flat in both
        rgba[..., :3][rgba[..., 3] == 0] = 0
    groups, _links = clusters_of([picture("a", first), picture("b", second)])
    assert groups == {frozenset(["a"]), frozenset(["b"])}


def test_patch_keys_find_a_region_at_any_offset() -> None:
    original = conjunctiva(7)
    keys, _ = patch_keys(original, DuplicateConfig())
    inner, _ = patch_keys(np.ascontiguousarray(original[17:77, 41:190]), DuplicateConfig())
    assert len(inner) > 50
    assert np.isin(inner, keys).all()  # every patch of the re-crop occurs in the original
    unrelated, _ = patch_keys(conjunctiva(8), DuplicateConfig())
    assert not np.isin(unrelated, keys).any()


def test_union_find_merges_transitively_with_order_independent_roots() -> None:
    forward = UnionFind(["a", "b", "c", "d"])
    forward.union("c", "b")
    forward.union("b", "a")
    assert forward.groups() == [["a", "b", "c"], ["d"]]
    assert forward.find("c") == "a"


def test_run_writes_clusters_that_load_back(tmp_path: Path) -> None:
    from training import duplicates

    base = conjunctiva(20)
    data = tmp_path / "data"
    for folder in ("Anemic", "Non-anemic"):
        (data / folder).mkdir(parents=True)
    images = {"Image_001": ("Anemic", base), "Image_002": ("Anemic", base[5:80, 20:220]), "Image_003": ("Non-anemic", conjunctiva(21))}
    rows = ["IMAGE_ID,HB_LEVEL,Severity,Age(Months),GENDER,REMARK,HOSPITAL,CITY/TOWN,MUNICIPALITY/DISTRICT,REGION"]
    for image_id, (folder, rgba) in images.items():
        cv2.imwrite(str(data / folder / (image_id + ".png")), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
        hb = 9.0 if folder == "Anemic" else 12.0
        rows.append("{},{},x,24,M,{},H{},c,d,r".format(image_id, hb, folder, image_id[-1]))
    (data / "Anemia_Data_Collection_Sheet.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "clusters.json"
    report = duplicates.run(data, out)
    assert report["n_clusters"] == 2
    assert report["clusters_spanning_hospitals"] == 1
    ids = load_clusters(out)
    assert ids["Image_001"] == ids["Image_002"] != ids["Image_003"]
    saved = json.loads(out.read_text())
    assert saved["links"][0]["how"] == "shared_region"
    assert read_picture("x", data / "Anemic" / "Image_001.png").rgba.shape == base.shape
    assert np.array_equal(png_roundtrip(base), base)


def test_committed_clusters_cover_the_data_set() -> None:
    from training.data import DEFAULT_DATA_DIR, read_records
    from training.duplicates import DEFAULT_OUTPUT

    if not (DEFAULT_DATA_DIR / "Anemia_Data_Collection_Sheet.csv").is_file():
        pytest.skip("CP-AnemiC not found")
    records = read_records(DEFAULT_DATA_DIR)
    ids = load_clusters(DEFAULT_OUTPUT)
    assert sorted(ids) == sorted(r.image_id for r in records)
    # the pairs the dataset's README names are one photograph each
    for a, b in (("Image_173", "Image_174"), ("Image_204", "Image_205"), ("Image_317", "Image_319"), ("Image_420", "Image_421")):
        assert ids[a] == ids[b]
