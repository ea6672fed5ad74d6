"""Model-card material from the CV outputs: markdown tables and the ROC curve image.

``python -m training.report`` reads ``models/cv/{cv_metrics,baselines,shortcut}.json`` and the
OOF csv files, writes ``models/roc.png`` and prints the tables that ``models/MODEL_CARD.md`` shows.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from training.metrics import METRIC_NAMES, format_ci

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE_TITLES = {
    "colour_hgb": "Colour statistics + gradient boosting",
    "frozen_mobilenetv2_logreg": "Frozen ImageNet MobileNetV2 features + logistic regression",
    "shape_only_hgb": "Crop size/shape only + gradient boosting (shortcut)",
}


def metrics_row(title: str, metrics: Dict[str, Dict[str, float]]) -> str:
    return "| {} | ".format(title) + " | ".join(format_ci(metrics[name]) for name in METRIC_NAMES) + " |"


def cv_table(cv: Dict[str, Any]) -> str:
    header = "| | " + " | ".join(METRIC_NAMES) + " |\n|---|" + "---|" * len(METRIC_NAMES)
    rows = [
        metrics_row("fold {} (n={}, thr {:.3f}, best epoch {})".format(f["fold"], f["n"], f["threshold"], f["best_epoch"]), f["metrics"])
        for f in cv["per_fold"]
    ]
    rows.append(metrics_row("**pooled OOF (n={})**".format(cv["n_images"]), cv["pooled_oof"]))
    return "\n".join([header] + rows)


def baselines_table(cv: Dict[str, Any], baselines: Dict[str, Any]) -> str:
    header = "| model | " + " | ".join(METRIC_NAMES) + " |\n|---|" + "---|" * len(METRIC_NAMES)
    rows = [metrics_row("**MobileNetV2 fine-tuned (this model, CV)**", cv["pooled_oof"])]
    for key, metrics in baselines["results"].items():
        rows.append(metrics_row(BASELINE_TITLES.get(key, key), metrics))
    return "\n".join([header] + rows)


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else "{:.3f}".format(value)


def _fmt_ci(value: Optional[float], ci: Optional[List[float]]) -> str:
    if value is None or ci is None:
        return _fmt(value)
    return "{:.3f} [{:.3f}, {:.3f}]".format(value, ci[0], ci[1])


def subgroup_tables(cv: Dict[str, Any]) -> str:
    parts = []
    for key, rows in cv["subgroups"].items():
        lines = ["**{}**".format(key.replace("_", " ")), "", "| group | n | anemic | accuracy [95% CI] | sensitivity | specificity | AUC [95% CI] |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                "| {} | {} | {} | {} | {} | {} | {} |".format(
                    r["group"], r["n"], r["n_anemic"], _fmt_ci(r["accuracy"], r["accuracy_ci"]), _fmt(r["recall"]),
                    _fmt(r["specificity"]), _fmt_ci(r["auc"], r["auc_ci"]),
                )
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _column(path: Path, column: str) -> Dict[str, float]:
    with open(path) as handle:
        return {row["image_id"]: float(row[column]) for row in csv.DictReader(handle)}


def roc_figure(cv_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _column(cv_dir / "oof_predictions.csv", "label")
    ids = sorted(labels)
    y = np.asarray([labels[i] for i in ids])
    curves = {"MobileNetV2 fine-tuned (OOF)": _column(cv_dir / "oof_predictions.csv", "probability")}
    baseline_path = cv_dir / "baseline_oof.csv"
    if baseline_path.is_file():
        for key, title in BASELINE_TITLES.items():
            curves[title] = _column(baseline_path, key)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    for title, scores in curves.items():
        s = np.asarray([scores[i] for i in ids])
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=2 if title.startswith("MobileNetV2") else 1.2, label="{} — AUC {:.3f}".format(title, roc_auc_score(y, s)))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("CP-AnemiC, stratified 5-fold out-of-fold ROC (n={})".format(len(ids)))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--cv-dir", type=Path, default=REPO_ROOT / "models" / "cv")
    p.add_argument("--roc", type=Path, default=REPO_ROOT / "models" / "roc.png")
    a = p.parse_args(argv)
    cv = json.loads((a.cv_dir / "cv_metrics.json").read_text())
    print("## CV\n\n" + cv_table(cv) + "\n")
    baselines_path = a.cv_dir / "baselines.json"
    if baselines_path.is_file():
        print("## Baselines\n\n" + baselines_table(cv, json.loads(baselines_path.read_text())) + "\n")
    print("## Subgroups\n\n" + subgroup_tables(cv) + "\n")
    roc_figure(a.cv_dir, a.roc)
    print("ROC curve written to {}".format(a.roc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
