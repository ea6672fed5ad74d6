"""Model-card material from the CV outputs: markdown tables and the ROC curve image.

``python -m training.report`` reads ``models/cv/{cv_metrics,baselines,shortcut}.json``, the OOF csv
files, the duplicate clusters and ``models/cv/random_split/`` (the old random folds, kept only to
show the leak), writes ``models/roc.png`` and prints the tables that ``models/MODEL_CARD.md`` shows.
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

from training.metrics import METRIC_NAMES, bootstrap_metrics, format_ci

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE_TITLES = {
    "colour_hgb": "Colour statistics + gradient boosting",
    "frozen_mobilenetv2_logreg": "Frozen ImageNet MobileNetV2 features + logistic regression",
    "shape_only_hgb": "Crop size/shape only + gradient boosting (shortcut)",
    "pixel_1nn_memoriser": "1-nearest-neighbour on the pixels (a pure memoriser)",
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


def duplicates_summary(clusters: Dict[str, Any]) -> str:
    kinds = ", ".join("{} {}".format(k.replace("_", " "), v) for k, v in clusters["links_by_kind"].items())
    return (
        "{n_images} images show {n_clusters} distinct photographs: {n_images_with_a_copy} images lie in "
        "{n_clusters_with_copies} clusters of two or more copies (the largest {largest_cluster}); {spanning} of those "
        "clusters list their copies under more than one hospital, {clusters_with_label_conflict} under both labels. "
        "Links found: {kinds}."
    ).format(kinds=kinds, spanning=clusters["clusters_spanning_hospitals"], **clusters)


def oof_metrics(oof_csv: Path, clusters_json: Path, n_boot: int = 2000, seed: int = 42) -> Dict[str, Dict[str, float]]:
    """Pooled metrics of an OOF file at its fold thresholds, with the cluster bootstrap."""
    from training.duplicates import load_clusters

    with open(oof_csv) as handle:
        rows = list(csv.DictReader(handle))
    clusters = load_clusters(clusters_json)
    labels = np.asarray([int(r["label"]) for r in rows])
    probs = np.asarray([float(r["probability"]) for r in rows])
    thresholds = np.asarray([float(r["threshold"]) for r in rows])
    return bootstrap_metrics(labels, probs, thresholds, n_boot=n_boot, seed=seed, groups=[clusters[r["image_id"]] for r in rows])


def leak_table(grouped_cv: Dict[str, Any], random_cv: Dict[str, Any], grouped_baselines: Dict[str, Any], random_baselines: Dict[str, Any]) -> str:
    """Random folds against grouped folds, side by side: what the copies did to every figure."""
    header = "| model | random folds: accuracy | random folds: AUC | grouped folds: accuracy | grouped folds: AUC |\n|---|---|---|---|---|"
    rows = [("MobileNetV2 fine-tuned (the CNN)", random_cv["pooled_oof"], grouped_cv["pooled_oof"])]
    for key, title in BASELINE_TITLES.items():
        if key in grouped_baselines["results"] and key in random_baselines["results"]:
            rows.append((title, random_baselines["results"][key], grouped_baselines["results"][key]))
    lines = [header]
    for title, leaky, honest in rows:
        lines.append("| {} | {} | {} | {} | {} |".format(title, format_ci(leaky["accuracy"]), format_ci(leaky["auc"]), format_ci(honest["accuracy"]), format_ci(honest["auc"])))
    return "\n".join(lines)


def hospital_table(baselines: Dict[str, Any]) -> str:
    views = baselines.get("leave_one_hospital_out")
    if not views:
        return ""
    lines = ["| leave one hospital out | hospitals tested | images tested | mean training images | colour baseline AUC | 1-NN memoriser AUC |", "|---|---|---|---|---|---|"]
    for name, view in views.items():
        lines.append(
            "| {} | {} | {} | {:.0f} | {} | {} |".format(
                name.replace("_", " "), len(view["hospitals_tested"]), view["n_images_tested"], view["mean_training_images"],
                format_ci(view["colour_hgb"]["auc"]), format_ci(view["pixel_1nn_memoriser"]["auc"]),
            )
        )
    return "\n".join(lines)


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
    ax.set_title("CP-AnemiC, 5 folds grouped by photograph, out-of-fold ROC (n={})".format(len(ids)))
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
    clusters_path = a.cv_dir / "duplicate_clusters.json"
    if clusters_path.is_file():
        print("## Duplicates\n\n" + duplicates_summary(json.loads(clusters_path.read_text())) + "\n")
    print("## CV\n\n" + cv_table(cv) + "\n")
    baselines_path = a.cv_dir / "baselines.json"
    if baselines_path.is_file():
        baselines = json.loads(baselines_path.read_text())
        print("## Baselines\n\n" + baselines_table(cv, baselines) + "\n")
        random_dir = a.cv_dir / "random_split"
        if (random_dir / "baselines.json").is_file():
            # the old run's own intervals resampled images; recomputed here over photographs
            random_cv = {"pooled_oof": oof_metrics(random_dir / "oof_predictions.csv", clusters_path)}
            print("## The leak: random folds against grouped folds\n\n" + leak_table(cv, random_cv, baselines, json.loads((random_dir / "baselines.json").read_text())) + "\n")
        if baselines.get("leave_one_hospital_out"):
            print("## Leave one hospital out\n\n" + hospital_table(baselines) + "\n")
    print("## Subgroups\n\n" + subgroup_tables(cv) + "\n")
    roc_figure(a.cv_dir, a.roc)
    print("ROC curve written to {}".format(a.roc), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
