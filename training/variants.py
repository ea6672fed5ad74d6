"""Side by side: training variants on the same grouped folds, validation first, out of fold second.

Each variant is a ``python -m training.train ... --run-dir DIR --cv-dir DIR/cv --no-final`` run
on the committed folds; its CV folder holds ``val_predictions.csv`` and ``cv_metrics.json``. The choice between variants is made on the **validation** figure (mean
over folds of the validation-split AUC of each fold's selected weights); the pooled out-of-fold
figure, with its photograph-bootstrap interval, is reported beside it and never used to choose.

``python -m training.variants NAME=CV_DIR ... --out models/cv/variants.json`` writes the table
the model card shows (``--markdown`` prints it).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from training.metrics import point_metrics


def _rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def summarize_run(name: str, cv_dir: Path) -> Dict[str, Any]:
    """Validation and pooled-OOF figures of one variant's cross-validation run (its CV folder)."""
    cv_dir = Path(cv_dir)
    val = _rows(cv_dir / "val_predictions.csv")
    folds = sorted({row["fold"] for row in val}, key=int)
    val_auc = []
    for fold in folds:
        part = [row for row in val if row["fold"] == fold]
        labels = np.asarray([int(row["label"]) for row in part])
        probs = np.asarray([float(row["probability"]) for row in part])
        val_auc.append(float(point_metrics(labels, probs, np.full(probs.shape, 0.5))["auc"]))
    metrics = json.loads((cv_dir / "cv_metrics.json").read_text())
    pooled = metrics["pooled_oof"]
    config = metrics.get("config", {})
    return {
        "name": name,
        "folds": len(folds),
        "val_auc_mean": round(float(np.mean(val_auc)), 4),
        "val_auc_per_fold": [round(v, 4) for v in val_auc],
        "oof_auc": [round(pooled["auc"][k], 4) for k in ("value", "ci_low", "ci_high")],
        "oof_accuracy": [round(pooled["accuracy"][k], 4) for k in ("value", "ci_low", "ci_high")],
        "best_epochs": [int(f["best_epoch"]) for f in metrics.get("per_fold", [])],
        "config": {k: config.get(k) for k in ("input_size", "input_height", "train_from", "colour_hidden", "colour_pretrain_steps", "head_lr_mult", "select_on", "max_epochs", "bf16")},
    }


def markdown(variants: Sequence[Dict[str, Any]]) -> str:
    lines = [
        "| variant | canvas | mean validation AUC (per fold) | pooled OOF AUC [95% CI] | OOF accuracy | best epochs |",
        "|---|---|---|---|---|---|",
    ]
    for v in variants:
        c = v["config"]
        canvas = "{}x{}".format(c.get("input_height") or c.get("input_size"), c.get("input_size"))
        auc, low, high = v["oof_auc"]
        per_fold = " ".join("{:.2f}".format(a) for a in v["val_auc_per_fold"])
        epochs = ",".join(str(e) for e in v["best_epochs"])
        lines.append(
            "| {} | {} | {:.3f} ({}) | {:.3f} [{:.3f}, {:.3f}] | {:.3f} | {} |".format(
                v["name"], canvas, v["val_auc_mean"], per_fold, auc, low, high, v["oof_accuracy"][0], epochs
            )
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.variants", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=CV_DIR, one per variant")
    parser.add_argument("--out", type=Path, default=None, help="write the summaries as JSON")
    parser.add_argument("--markdown", action="store_true", help="print the model card's table")
    args = parser.parse_args(argv)
    variants = []
    for spec in args.runs:
        name, _, cv_dir = spec.rpartition("=")
        if not name or not cv_dir:
            parser.error("expected NAME=CV_DIR, got {!r}".format(spec))
        variants.append(summarize_run(name, Path(cv_dir)))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"chosen_on": "mean validation AUC", "variants": variants}, indent=2) + "\n")
    if args.markdown or args.out is None:
        print(markdown(variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
