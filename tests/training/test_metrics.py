"""Metrics, bootstrap intervals and the validation threshold."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import bootstrap_metrics, choose_threshold, point_metrics, subgroup_table


def test_point_metrics_on_a_hand_counted_example() -> None:
    labels = np.array([1, 1, 1, 0, 0])
    probs = np.array([0.9, 0.8, 0.3, 0.6, 0.1])
    m = point_metrics(labels, probs, np.full(5, 0.5))  # TP 2, FN 1, FP 1, TN 1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["auc"] == pytest.approx(5 / 6)  # 5 of 6 (pos, neg) pairs ordered correctly


def test_per_sample_thresholds_are_used() -> None:
    labels = np.array([1, 0])
    probs = np.array([0.4, 0.4])
    m = point_metrics(labels, probs, np.array([0.3, 0.5]))
    assert m["accuracy"] == 1.0


def test_threshold_sits_inside_the_separating_gap() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([0.05, 0.1, 0.2, 0.7, 0.8, 0.9])
    threshold = choose_threshold(labels, probs)
    assert 0.2 < threshold < 0.7


def test_bootstrap_interval_brackets_the_point_estimate() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    stats = bootstrap_metrics(labels, probs, np.full(200, 0.5), n_boot=200, seed=1)
    for entry in stats.values():
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    assert stats["auc"]["ci_high"] - stats["auc"]["ci_low"] < 0.2


def test_subgroups_count_and_skip_auc_for_one_class_groups() -> None:
    labels = np.array([1, 0, 1, 1])
    probs = np.array([0.9, 0.2, 0.8, 0.7])
    rows = subgroup_table(labels, probs, np.full(4, 0.5), ["a", "a", "b", "b"], n_boot=20)
    assert [(r["group"], r["n"], r["n_anemic"]) for r in rows] == [("a", 2, 1), ("b", 2, 2)]
    assert rows[1]["auc"] is None and rows[0]["auc"] == 1.0
