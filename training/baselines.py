"""Baselines on the CNN's own folds (``models/cv/folds.json``), and the crop-shape shortcut check.

- colour: mean, std and 10/50/90th percentiles of the ROI pixels in RGB, Lab and HSV (45 numbers)
  -> sklearn HistGradientBoostingClassifier;
- frozen: ImageNet MobileNetV2 global-pool features (1280) of the preprocessed input
  -> standardized logistic regression;
- shape: ROI width, height, aspect ratio, area and fill fraction only -> gradient boosting
  (the shortcut: a model should not be able to score well from these).

Each is fit on a fold's training ids, its threshold chosen on the validation ids (max F1, as for
the CNN), and evaluated on the test ids; metrics are pooled out-of-fold with bootstrap intervals.

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
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from service.preprocess import PreprocessLimits, PreprocessSpec, decode_image, roi_mask
from training.data import DEFAULT_DATA_DIR, Dataset, load_dataset
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
    return {"metrics": bootstrap_metrics(labels, probs, thresholds, n_boot=n_boot, seed=seed), "probs": probs, "thresholds": thresholds}


def folds_from_json(path: Path, data: Dataset) -> List[Dict[str, List[int]]]:
    position = {image_id: i for i, image_id in enumerate(data.image_ids)}
    payload = json.loads(Path(path).read_text())
    return [{part: [position[i] for i in fold[part + "_ids"]] for part in ("train", "val", "test")} for fold in payload["folds"]]


def run(data_dir: Path, folds_path: Path, out_dir: Path, weights: Path, n_boot: int = 2000, seed: int = 42, cache_dir: Optional[Path] = None) -> Dict[str, object]:
    torch.set_num_threads(2)
    data = load_dataset(data_dir, PreprocessSpec(), cache_dir=cache_dir)
    folds = folds_from_json(folds_path, data)
    labels = data.labels
    features = {
        "colour_hgb": (colour_features(data), _hgb),
        "frozen_mobilenetv2_logreg": (frozen_features(data, weights), _logreg),
        "shape_only_hgb": (shape_features(data), _hgb),
    }
    results: Dict[str, Any] = {}
    oof: Dict[str, np.ndarray] = {}
    for name, (x, make) in features.items():
        outcome = evaluate_on_folds(x, labels, folds, make, n_boot, seed)
        results[name] = outcome["metrics"]
        oof[name] = outcome["probs"]  # type: ignore[assignment]
        metrics: Dict[str, Dict[str, float]] = outcome["metrics"]  # type: ignore[assignment]
        print("{:28s} ".format(name) + " ".join("{} {:.3f}".format(k, v["value"]) for k, v in metrics.items()))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "baselines.json").write_text(json.dumps({"n_images": len(labels), "folds": str(folds_path), "results": results}, indent=2) + "\n")
    with open(out_dir / "baseline_oof.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "label"] + list(oof))
        for i, image_id in enumerate(data.image_ids):
            writer.writerow([image_id, int(labels[i])] + ["{:.6f}".format(float(oof[k][i])) for k in oof])
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--folds", type=Path, default=REPO_ROOT / "models" / "cv" / "folds.json")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "models" / "cv")
    p.add_argument("--weights", type=Path, default=DEFAULT_TFLITE_PATH)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "runs" / "cache")
    a = p.parse_args(argv)
    run(a.data_dir, a.folds, a.out_dir, a.weights, a.bootstrap, cache_dir=a.cache_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
