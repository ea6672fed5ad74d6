"""Baselines on the CNN's own folds (``models/cv/folds.json``), and the crop-shape shortcut check.

- colour: mean, std and 10/50/90th percentiles of the ROI pixels in RGB, Lab and HSV (45 numbers)
  -> sklearn HistGradientBoostingClassifier;
- frozen: ImageNet MobileNetV2 global-pool features (1280) of the preprocessed input
  -> standardized logistic regression;
- shape: ROI width, height, aspect ratio, area and fill fraction only -> gradient boosting
  (the shortcut: a model should not be able to score well from these);
- memorising: 1-nearest-neighbour on the preprocessed pixels (the score is the distance to the
  nearest non-anemic training image over the sum of the distances to the nearest of each class).
  It can only recall training images, so what it scores above chance measures how many test
  images have a copy in training: the leak, in one number. Run it on the grouped folds and on the
  old random folds (``--folds models/cv/random_split/folds.json``) side by side.

Each is fit on a fold's training ids, its threshold chosen on the validation ids (max F1, as for
the CNN), and evaluated on the test ids; metrics are pooled out-of-fold, with intervals from a
bootstrap over duplicate clusters (photographs, ``models/cv/duplicate_clusters.json``).

``python -m training.baselines`` writes ``models/cv/baselines.json`` and
``models/cv/baseline_oof.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from service.preprocess import PreprocessLimits, PreprocessSpec, decode_image, roi_mask
from training.data import DEFAULT_DATA_DIR, Dataset, load_dataset
from training.duplicates import DEFAULT_OUTPUT as DEFAULT_CLUSTERS
from training.duplicates import load_clusters
from training.grouping import cluster_ids
from training.metrics import bootstrap_metrics, choose_threshold
from training.tflite_weights import DEFAULT_TFLITE_PATH, load_imagenet_weights
from training.mobilenetv2 import MobileNetV2

REPO_ROOT = Path(__file__).resolve().parents[1]
PERCENTILES = (10, 50, 90)


def colour_features(data: Dataset) -> np.ndarray:
    """45 colour statistics of the ROI pixels (alpha mask) per image."""
    rows = []
    for record in data.records:
        decoded = decode_image(record.path.read_bytes())
        mask, _source = roi_mask(decoded, None, PreprocessLimits())
        inside = mask > 0
        features: List[float] = []
        for space in (None, cv2.COLOR_RGB2LAB, cv2.COLOR_RGB2HSV):
            image = decoded.rgb if space is None else cv2.cvtColor(decoded.rgb, space)
            pixels = image[inside].astype(np.float64)
            features += list(pixels.mean(0)) + list(pixels.std(0))
            for q in PERCENTILES:
                features += list(np.percentile(pixels, q, axis=0))
        rows.append(features)
    return np.asarray(rows)


def shape_features(data: Dataset) -> np.ndarray:
    w, h, area = data.roi_width_px, data.roi_height_px, data.roi_pixels
    return np.stack([w, h, w / h, area, area / (w * h)], 1)


@torch.no_grad()
def frozen_features(data: Dataset, weights: Path, batch_size: int = 32) -> np.ndarray:
    model = load_imagenet_weights(MobileNetV2(num_classes=1, tf_padding=True), weights).eval()
    out = [model.pooled_features(data.images[i : i + batch_size]).numpy() for i in range(0, len(data.records), batch_size)]
    return np.concatenate(out)


def pixel_features(data: Dataset, pool: int = 4) -> np.ndarray:
    """The preprocessed input, average-pooled ``pool`` x ``pool`` (224 -> 56), flattened."""
    return torch.nn.functional.avg_pool2d(data.images, pool).flatten(1).numpy()


class NearestNeighbourMemoriser:
    """1-NN on the pixels as a scikit-learn style estimator; a pure memoriser, no learning."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> "NearestNeighbourMemoriser":
        self.x_, self.y_ = np.asarray(x, np.float64), np.asarray(y)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        distances = (x ** 2).sum(1)[:, None] - 2 * x @ self.x_.T + (self.x_ ** 2).sum(1)[None, :]
        distances = np.sqrt(np.maximum(distances, 0.0))
        nearest = [distances[:, self.y_ == c].min(1) for c in (0, 1)]
        anemic = nearest[0] / np.maximum(nearest[0] + nearest[1], 1e-12)  # > 0.5 iff the nearest is anemic
        return np.stack([1 - anemic, anemic], 1)


def _hgb() -> object:
    return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=0)


def _logreg() -> object:
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))


def evaluate_on_folds(
    features: np.ndarray,
    labels: np.ndarray,
    folds: Sequence[Dict[str, List[int]]],
    make_estimator: Callable[[], object],
    n_boot: int,
    seed: int,
    groups: Optional[np.ndarray] = None,
) -> Dict[str, object]:
    probs = np.zeros(len(labels))
    thresholds = np.zeros(len(labels))
    for fold in folds:
        estimator = make_estimator()
        estimator.fit(features[fold["train"]], labels[fold["train"]])  # type: ignore[attr-defined]
        val = estimator.predict_proba(features[fold["val"]])[:, 1]  # type: ignore[attr-defined]
        threshold = choose_threshold(labels[fold["val"]], val)
        probs[fold["test"]] = estimator.predict_proba(features[fold["test"]])[:, 1]  # type: ignore[attr-defined]
        thresholds[fold["test"]] = threshold
    tested = np.asarray(sorted(i for fold in folds for i in fold["test"]))  # LOHO leaves one-class hospitals untested
    metrics = bootstrap_metrics(labels[tested], probs[tested], thresholds[tested], n_boot=n_boot, seed=seed, groups=None if groups is None else groups[tested])
    return {"metrics": metrics, "probs": probs, "thresholds": thresholds}


def hospital_folds(hospitals: Sequence[str], labels: np.ndarray, groups: np.ndarray, drop_copies: bool, val_fraction: float = 0.15, seed: int = 42) -> List[Dict[str, List[int]]]:
    """Leave one hospital out: each hospital's images are a test fold.

    With ``drop_copies`` a training image whose photograph (cluster) also appears in the test
    hospital is left out of that fold's training and validation: CP-AnemiC lists the same
    photograph under several hospitals, so without this the "unseen hospital" still shares
    photographs with training. The validation split is carved by cluster from what remains.
    """
    hospitals_array = np.asarray(hospitals)
    folds: List[Dict[str, List[int]]] = []
    for k, hospital in enumerate(sorted(set(hospitals_array.tolist()))):
        test = np.flatnonzero(hospitals_array == hospital)
        if len(np.unique(labels[test])) < 2:
            continue  # a hospital with one class only has no AUC; it stays in training for the others
        rest = np.flatnonzero(hospitals_array != hospital)
        if drop_copies:
            rest = rest[~np.isin(groups[rest], groups[test])]
        splitter = StratifiedGroupKFold(n_splits=int(round(1 / val_fraction)), shuffle=True, random_state=seed + k)
        fit_part, val_part = next(splitter.split(np.zeros(len(rest)), labels[rest], groups[rest]))
        folds.append({"train": sorted(rest[fit_part].tolist()), "val": sorted(rest[val_part].tolist()), "test": sorted(test.tolist()), "hospital": hospital})  # type: ignore[dict-item]
    return folds


def leave_one_hospital_out(data: Dataset, groups: np.ndarray, features: Dict[str, Any], n_boot: int, seed: int) -> Dict[str, Any]:
    """LOHO for the cheap baselines, with and without removing the cross-hospital copies from training."""
    hospitals = [r.hospital for r in data.records]
    labels = data.labels
    out: Dict[str, Any] = {}
    for drop_copies in (False, True):
        folds = hospital_folds(hospitals, labels, groups, drop_copies, seed=seed)
        tested = sorted(i for f in folds for i in f["test"])
        view: Dict[str, Any] = {
            "hospitals_tested": [f["hospital"] for f in folds],  # type: ignore[misc]
            "n_images_tested": len(tested),
            "mean_training_images": float(np.mean([len(f["train"]) + len(f["val"]) for f in folds])),
        }
        for name in ("colour_hgb", "pixel_1nn_memoriser"):
            x, make = features[name]
            view[name] = evaluate_on_folds(x, labels, folds, make, n_boot, seed, groups)["metrics"]
        out["copies_removed" if drop_copies else "copies_kept"] = view
    return out


def folds_from_json(path: Path, data: Dataset) -> List[Dict[str, List[int]]]:
    position = {image_id: i for i, image_id in enumerate(data.image_ids)}
    payload = json.loads(Path(path).read_text())
    return [{part: [position[i] for i in fold[part + "_ids"]] for part in ("train", "val", "test")} for fold in payload["folds"]]


def run(
    data_dir: Path,
    folds_path: Path,
    out_dir: Path,
    weights: Path,
    n_boot: int = 2000,
    seed: int = 42,
    cache_dir: Optional[Path] = None,
    clusters_path: Path = DEFAULT_CLUSTERS,
    hospitals_view: bool = True,
) -> Dict[str, object]:
    torch.set_num_threads(2)
    data = load_dataset(data_dir, PreprocessSpec(), cache_dir=cache_dir)
    folds = folds_from_json(folds_path, data)
    labels = data.labels
    groups = cluster_ids(data.image_ids, load_clusters(clusters_path))
    features = {
        "colour_hgb": (colour_features(data), _hgb),
        "frozen_mobilenetv2_logreg": (frozen_features(data, weights), _logreg),
        "shape_only_hgb": (shape_features(data), _hgb),
        "pixel_1nn_memoriser": (pixel_features(data), NearestNeighbourMemoriser),
    }
    results: Dict[str, Any] = {}
    oof: Dict[str, np.ndarray] = {}
    for name, (x, make) in features.items():
        outcome = evaluate_on_folds(x, labels, folds, make, n_boot, seed, groups)
        results[name] = outcome["metrics"]
        oof[name] = outcome["probs"]  # type: ignore[assignment]
        metrics: Dict[str, Dict[str, float]] = outcome["metrics"]  # type: ignore[assignment]
        print("{:28s} ".format(name) + " ".join("{} {:.3f}".format(k, v["value"]) for k, v in metrics.items()))
    out_dir.mkdir(parents=True, exist_ok=True)
    payload: Dict[str, Any] = {"n_images": len(labels), "n_photographs": int(len(np.unique(groups))), "folds": _relative(folds_path), "interval": "95% bootstrap over duplicate clusters", "results": results}
    if hospitals_view:
        payload["leave_one_hospital_out"] = leave_one_hospital_out(data, groups, features, n_boot, seed)
    (out_dir / "baselines.json").write_text(json.dumps(payload, indent=2) + "\n")
    with open(out_dir / "baseline_oof.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "label"] + list(oof))
        for i, image_id in enumerate(data.image_ids):
            writer.writerow([image_id, int(labels[i])] + ["{:.6f}".format(float(oof[k][i])) for k in oof])
    return results


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--folds", type=Path, default=REPO_ROOT / "models" / "cv" / "folds.json")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "models" / "cv")
    p.add_argument("--weights", type=Path, default=DEFAULT_TFLITE_PATH)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "runs" / "cache")
    p.add_argument("--clusters", type=Path, default=DEFAULT_CLUSTERS, help="duplicate clusters: the bootstrap resamples them")
    p.add_argument("--no-hospitals", dest="hospitals", action="store_false", help="skip the leave-one-hospital-out view")
    a = p.parse_args(argv)
    run(a.data_dir, a.folds, a.out_dir, a.weights, a.bootstrap, cache_dir=a.cache_dir, clusters_path=a.clusters, hospitals_view=a.hospitals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
