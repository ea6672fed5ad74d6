"""Binary classification metrics with bootstrap intervals, threshold choice and subgroup tables."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

METRIC_NAMES = ("loss", "accuracy", "precision", "recall", "specificity", "f1", "auc")
EPS = 1e-7


def point_metrics(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> Dict[str, float]:
    """Metrics at per-sample thresholds (pooled out-of-fold predictions use their fold's threshold)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    preds = (probs >= np.broadcast_to(thresholds, probs.shape)).astype(np.int64)
    tp = float(np.sum((preds == 1) & (labels == 1)))
    tn = float(np.sum((preds == 0) & (labels == 0)))
    fp = float(np.sum((preds == 1) & (labels == 0)))
    fn = float(np.sum((preds == 0) & (labels == 1)))
    clipped = np.clip(probs, EPS, 1 - EPS)
    loss = float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    both = len(np.unique(labels)) == 2
    return {
        "loss": loss,
        "accuracy": (tp + tn) / len(labels) if len(labels) else float("nan"),
        "precision": precision,
        "recall": recall,
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "auc": float(roc_auc_score(labels, probs)) if both else float("nan"),
    }


def _group_members(groups: Sequence[object]) -> List[np.ndarray]:
    _keys, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)


def bootstrap_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    groups: Optional[Sequence[object]] = None,
) -> Dict[str, Dict[str, float]]:
    """Point estimate and percentile bootstrap interval for each metric.

    Without ``groups`` the bootstrap resamples images. With ``groups`` (one duplicate-cluster id per
    image) it resamples clusters, i.e. photographs: copies of one photograph are not independent
    evidence, and resampling them one by one would give intervals that are too narrow.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), probs.shape)
    point = point_metrics(labels, probs, thresholds)
    rng = np.random.default_rng(seed)
    samples: Dict[str, List[float]] = {name: [] for name in METRIC_NAMES}
    n = len(labels)
    members = _group_members(groups) if groups is not None else None
    for _ in range(n_boot):
        if members is None:
            index = rng.integers(0, n, n)
        else:
            index = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if len(np.unique(labels[index])) < 2:
            continue
        values = point_metrics(labels[index], probs[index], thresholds[index])
        for name in METRIC_NAMES:
            samples[name].append(values[name])
    alpha = (1 - level) / 2
    result: Dict[str, Dict[str, float]] = {}
    for name in METRIC_NAMES:
        values_array = np.asarray(samples[name])
        finite = values_array[np.isfinite(values_array)]
        low, high = (float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))) if finite.size else (float("nan"),) * 2
        result[name] = {"value": point[name], "ci_low": low, "ci_high": high}
    return result


def choose_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold that maximizes F1 on (validation) data; the middle of the best plateau.

    Candidates are midpoints between consecutive distinct probabilities, so the threshold never
    sits on a sample; among equally good ones the median candidate is taken, which keeps it away
    from either edge of the plateau when validation separates the classes perfectly.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    unique = np.unique(probs)
    candidates = np.concatenate([[unique[0] / 2], (unique[:-1] + unique[1:]) / 2, [(unique[-1] + 1) / 2]])
    scores = np.asarray([point_metrics(labels, probs, np.full(probs.shape, c))["f1"] for c in candidates])
    best = candidates[np.isclose(scores, scores.max())]
    return float(np.median(best))


def subgroup_table(
    labels: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray,
    groups: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    clusters: Optional[Sequence[object]] = None,
) -> List[Dict[str, object]]:
    """Per-group n, prevalence, accuracy, sensitivity, specificity, AUC (95% bootstrap CI for acc/AUC).

    ``clusters``: duplicate-cluster id per image; the intervals then resample clusters.
    """
    groups_array = np.asarray(groups)
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), np.shape(probs))
    rows: List[Dict[str, object]] = []
    for group in sorted(set(groups_array.tolist())):
        mask = groups_array == group
        g_labels, g_probs, g_thr = np.asarray(labels)[mask], np.asarray(probs)[mask], thresholds[mask]
        g_clusters = [c for c, m in zip(clusters, mask) if m] if clusters is not None else None
        stats = bootstrap_metrics(g_labels, g_probs, g_thr, n_boot=n_boot, seed=seed, groups=g_clusters) if len(np.unique(g_labels)) == 2 else None
        point = point_metrics(g_labels, g_probs, g_thr)
        rows.append(
            {
                "group": group,
                "n": int(mask.sum()),
                "n_anemic": int(g_labels.sum()),
                "accuracy": point["accuracy"],
                "accuracy_ci": [stats["accuracy"]["ci_low"], stats["accuracy"]["ci_high"]] if stats else None,
                "recall": point["recall"] if g_labels.sum() else None,
                "specificity": point["specificity"] if (g_labels == 0).any() else None,
                "auc": point["auc"] if stats else None,
                "auc_ci": [stats["auc"]["ci_low"], stats["auc"]["ci_high"]] if stats else None,
            }
        )
    return rows


def format_ci(entry: Dict[str, float], digits: int = 3) -> str:
    return "{:.{d}f} [{:.{d}f}, {:.{d}f}]".format(entry["value"], entry["ci_low"], entry["ci_high"], d=digits)


def mean_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None
