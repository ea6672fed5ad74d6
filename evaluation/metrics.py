"""Metrics, bootstrap intervals, latency and the report of ``python build_engines.py evaluate``.

Kept free of scikit-learn so that a Jetson with only the service's dependencies (plus
matplotlib for the curves, optional) can run it.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

METRICS = ("loss", "accuracy", "precision", "recall", "specificity", "f1", "auc")


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count half)."""
    labels = np.asarray(labels).astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(probs, kind="mergesort")
    ranks = np.empty(len(probs), np.float64)
    sorted_probs = np.asarray(probs)[order]
    # average ranks over ties
    i = 0
    while i < len(sorted_probs):
        j = i
        while j + 1 < len(sorted_probs) and sorted_probs[j + 1] == sorted_probs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: Any) -> Dict[str, float]:
    """``threshold`` is a scalar or one per image (each fold model has its own)."""
    y = np.asarray(labels).astype(int)
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    pred = (p >= np.asarray(threshold, np.float64)).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
        "accuracy": (tp + tn) / max(1, len(y)),
        "precision": precision,
        "recall": recall,
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "auc": roc_auc(y, p),
    }


def photograph_groups(clusters_path: Path, image_ids: Sequence[str]) -> np.ndarray:
    """Per image, the photograph it shows: its duplicate cluster (``python -m training.duplicates``).

    The file lists ``{"clusters": [{"id": int, "members": [image_id, ...]}, ...]}``; an image in no
    cluster is a photograph of its own.
    """
    cluster_of: Dict[str, int] = {}
    for cluster in json.loads(Path(clusters_path).read_text())["clusters"]:
        for member in cluster["members"]:
            cluster_of[str(member)] = int(cluster["id"])
    own = {image_id: -1 - i for i, image_id in enumerate(image_ids)}  # negative: never a cluster id
    return np.asarray([cluster_of.get(image_id, own[image_id]) for image_id in image_ids], np.int64)


def bootstrap_intervals(
    labels: np.ndarray, probs: np.ndarray, threshold: Any, resamples: int = 1000, seed: int = 0, level: float = 0.95,
    groups: Optional[np.ndarray] = None,
) -> Dict[str, Tuple[float, float]]:
    """Percentile bootstrap intervals, resampling ``groups`` (photographs) with replacement, else images.

    Copies of one photograph are not independent draws: resampling them one by one narrows the
    interval as if there were more photographs than there are.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    thresholds = np.broadcast_to(np.asarray(threshold, np.float64), (n,))
    if groups is None:
        members = [np.asarray([i]) for i in range(n)]
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(int(inverse.max()) + 1)] if n else []
    samples: Dict[str, List[float]] = {m: [] for m in METRICS}
    for _ in range(resamples):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        values = binary_metrics(labels[idx], probs[idx], thresholds[idx])
        for key in METRICS:
            samples[key].append(values[key])
    tail = (1 - level) / 2 * 100
    return {k: (float(np.nanpercentile(v, tail)), float(np.nanpercentile(v, 100 - tail))) for k, v in samples.items()}


def agreement(reference: np.ndarray, probs: np.ndarray, threshold: Any) -> Dict[str, float]:
    t = np.asarray(threshold, np.float64)
    same = (np.asarray(reference) >= t) == (np.asarray(probs) >= t)
    delta = np.abs(np.asarray(probs, np.float64) - np.asarray(reference, np.float64))
    return {"same_label": float(same.mean()), "max_abs_dp": float(delta.max()) if delta.size else 0.0, "mean_abs_dp": float(delta.mean()) if delta.size else 0.0}


def roc_points(labels: np.ndarray, probs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-np.asarray(probs))
    y = np.asarray(labels)[order].astype(int)
    tps, fps = np.cumsum(y), np.cumsum(1 - y)
    tpr = np.concatenate([[0.0], tps / max(1, y.sum())])
    fpr = np.concatenate([[0.0], fps / max(1, (1 - y).sum())])
    return fpr, tpr


def pr_points(labels: np.ndarray, probs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-np.asarray(probs))
    y = np.asarray(labels)[order].astype(int)
    tps = np.cumsum(y)
    precision = tps / np.arange(1, len(y) + 1)
    recall = tps / max(1, y.sum())
    return np.concatenate([[0.0], recall]), np.concatenate([[1.0], precision])


def measure_latency(
    infer: Callable[[np.ndarray], np.ndarray],
    sample: np.ndarray,
    warmup: int = 5,
    runs_batch1: int = 50,
    runs_batched: int = 5,
    batch_sizes: Sequence[int] = (8, 32),
) -> Dict[str, float]:
    """Median and p90 latency at batch 1 (ms) and throughput at larger batches (images/s), after warm-up."""
    one = sample[:1]
    for _ in range(warmup):
        infer(one)
    times: List[float] = []
    for _ in range(runs_batch1):
        start = time.perf_counter()
        infer(one)
        times.append((time.perf_counter() - start) * 1000.0)
    out: Dict[str, float] = {
        "batch1_median_ms": float(statistics.median(times)),
        "batch1_p90_ms": float(np.percentile(times, 90)),
    }
    for size in batch_sizes:
        batch = np.concatenate([sample] * (size // len(sample) + 1))[:size]
        infer(batch)  # warm-up at this shape
        start = time.perf_counter()
        for _ in range(runs_batched):
            infer(batch)
        out["batch{}_images_per_s".format(size)] = float(size * runs_batched / (time.perf_counter() - start))
    return out


def plot_curves(results: Dict[str, Dict[str, Any]], labels: np.ndarray, out_dir: Path, title: str) -> List[Path]:
    """ROC and PR curves of every variant; skipped (empty list) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: List[Path] = []
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for name, result in results.items():
            probs = np.asarray(result["probs"])
            if kind == "roc":
                x, y = roc_points(labels, probs)
                ax.plot(x, y, label="{} (AUC {:.3f})".format(name, result["metrics"]["auc"]))
            else:
                x, y = pr_points(labels, probs)
                ax.plot(x, y, label=name)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
            ax.set_xlabel("false positive rate (1 - specificity)")
            ax.set_ylabel("true positive rate (recall)")
        else:
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
        ax.set_title("{} - {}".format(title, kind.upper()))
        ax.legend(fontsize=8, loc="lower right" if kind == "roc" else "lower left")
        fig.tight_layout()
        path = Path(out_dir) / "{}.png".format(kind)
        fig.savefig(str(path), dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _ci(value: float, interval: Optional[Tuple[float, float]]) -> str:
    if interval is None:
        return "{:.3f}".format(value)
    return "{:.3f} [{:.3f}, {:.3f}]".format(value, interval[0], interval[1])


def markdown_table(results: Dict[str, Dict[str, Any]]) -> str:
    header = (
        "| variant | loss | accuracy | precision | recall | specificity | F1 | AUC | same label as FP32 | max abs dp | size (MB) | size vs FP32 |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for name, result in results.items():
        m, ci = result["metrics"], result.get("intervals", {})
        agree = result.get("agreement", {})
        lines.append(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                name,
                *[_ci(m[k], ci.get(k)) for k in METRICS],
                "{:.1%}".format(agree["same_label"]) if agree else "-",
                "{:.4f}".format(agree["max_abs_dp"]) if agree else "-",
                "{:.2f}".format(result["size_bytes"] / 1e6) if result.get("size_bytes") else "-",
                "{:.0%}".format(result["size_vs_fp32"]) if result.get("size_vs_fp32") else "-",
            )
        )
    return "\n".join(lines)


def latency_table(latency: Dict[str, Dict[str, float]]) -> str:
    lines = ["| variant | batch 1 median (ms) | batch 1 p90 (ms) | batch 8 (images/s) | batch 32 (images/s) |", "|---|---|---|---|---|"]
    for name, row in latency.items():
        lines.append(
            "| {} | {:.2f} | {:.2f} | {:.1f} | {:.1f} |".format(
                name, row["batch1_median_ms"], row["batch1_p90_ms"], row.get("batch8_images_per_s", float("nan")), row.get("batch32_images_per_s", float("nan"))
            )
        )
    return "\n".join(lines)


def write_json(payload: Dict[str, Any], path: Path) -> None:
    def default(value: Any) -> Any:
        if isinstance(value, (np.floating, np.integer)):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, Path):
            return str(value)
        raise TypeError(type(value))

    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True, default=default) + "\n")
