"""Does the CNN lean on the crop's shape? Two checks on the out-of-fold predictions.

1. Silhouette test: every test image's ROI is painted one constant colour (the mean ROI colour
   of the fold's *training* images), so only the crop's outline, size and position remain. Each
   fold's exported model scores its own test fold; the AUC of those scores against the labels
   says how much the model can get from shape alone (0.5 = nothing; the shape-only gradient
   boosting baseline gets about 0.75).
2. Agreement: Spearman correlation between the CNN's OOF probability and the shape-only
   baseline's OOF probability, and the CNN's AUC within tertiles of the shape-only score (if the
   CNN merely re-used shape, its AUC inside a shape stratum would collapse).

``python -m training.shortcut`` writes ``models/cv/shortcut.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnxruntime as ort
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from service.model_info import INPUT_NAME, OUTPUT_NAME, ModelInfo
from training.baselines import folds_from_json
from training.data import DEFAULT_DATA_DIR, Dataset, load_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]


def silhouettes(images: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Replace every non-fill pixel (fill normalizes to exactly 0) with ``colour`` (3 normalized values)."""
    inside = images.abs().sum(1, keepdim=True) > 0
    return torch.where(inside, colour.view(1, 3, 1, 1).to(images.dtype), torch.zeros_like(images))


def mean_roi_colour(images: torch.Tensor) -> torch.Tensor:
    inside = (images.abs().sum(1, keepdim=True) > 0).to(images.dtype)
    return (images * inside).sum((0, 2, 3)) / inside.sum()


def _read_column(path: Path, column: str) -> Dict[str, float]:
    with open(path) as handle:
        return {row["image_id"]: float(row[column]) for row in csv.DictReader(handle)}


def run(data_dir: Path, cv_dir: Path, fold_models: Sequence[Path], cache_dir: Optional[Path] = None) -> Dict[str, object]:
    info = ModelInfo.from_onnx(fold_models[0])
    data = load_dataset(data_dir, info.spec, cache_dir=cache_dir)
    folds = folds_from_json(cv_dir / "folds.json", data)
    labels = data.labels
    scores = np.full(len(labels), np.nan)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for fold, model_path in zip(folds, fold_models):
        colour = mean_roi_colour(data.images[fold["train"]])
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        test = silhouettes(data.images[fold["test"]], colour).numpy()
        out = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: test[i : i + 16]})[0][:, 0] for i in range(0, len(test), 16)])
        scores[fold["test"]] = out
    cnn = _read_column(cv_dir / "oof_predictions.csv", "probability")
    shape = _read_column(cv_dir / "baseline_oof.csv", "shape_only_hgb")
    ids = data.image_ids
    cnn_p = np.asarray([cnn[i] for i in ids])
    shape_p = np.asarray([shape[i] for i in ids])
    tertiles = np.quantile(shape_p, [1 / 3, 2 / 3])
    strata: List[Dict[str, object]] = []
    bins = np.digitize(shape_p, tertiles)
    for b in range(3):
        mask = bins == b
        strata.append(
            {
                "shape_score_tertile": b + 1,
                "n": int(mask.sum()),
                "cnn_auc": float(roc_auc_score(labels[mask], cnn_p[mask])) if len(set(labels[mask])) == 2 else None,
            }
        )
    result = {
        "silhouette_auc": float(roc_auc_score(labels, scores)),
        "silhouette_prob_range": [float(scores.min()), float(scores.max())],
        "cnn_auc": float(roc_auc_score(labels, cnn_p)),
        "shape_only_auc": float(roc_auc_score(labels, shape_p)),
        "spearman_cnn_vs_shape": float(spearmanr(cnn_p, shape_p).correlation),
        "cnn_auc_within_shape_tertiles": strata,
    }
    (cv_dir / "shortcut.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.shortcut", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--cv-dir", type=Path, default=REPO_ROOT / "models" / "cv")
    p.add_argument("--run-dir", type=Path, default=REPO_ROOT / "runs")
    a = p.parse_args(argv)
    n_folds = len(json.loads((a.cv_dir / "folds.json").read_text())["folds"])
    models = [a.run_dir / "cv" / "fold{}".format(k) / "model.onnx" for k in range(n_folds)]
    run(a.data_dir, a.cv_dir, models, cache_dir=a.run_dir / "cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
