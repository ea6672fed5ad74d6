from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evaluation import metrics as ev
from engine_build.quantization.int8 import Int8Options, quantize_int8
from evaluation.summary import bit_counts, layer_summary, summary_markdown
from tests.model_factory import make_test_model


def test_auc_matches_the_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.uniform(0, 1, 200) + 0.3 * y, 1)  # coarse: many ties
    pos, neg = p[y == 1], p[y == 0]
    pairwise = (np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])) / (len(pos) * len(neg))
    assert ev.roc_auc(y, p) == pytest.approx(pairwise)


def test_the_bootstrap_resamples_photographs_when_given_their_groups(tmp_path: Path) -> None:
    # two photographs listed 6 times each: one always judged right, one always wrong
    y = np.array([1, 0] * 6)
    p = np.array([0.9, 0.9] * 6)  # every anemic copy right, every other copy wrong
    ids = ["a{}".format(i) for i in range(12)]
    clusters = tmp_path / "clusters.json"
    clusters.write_text('{"clusters": [{"id": 7, "members": %s}, {"id": 3, "members": %s}]}' % (
        str(ids[0::2]).replace("'", '"'), str(ids[1::2][:-1]).replace("'", '"')))
    groups = ev.photograph_groups(clusters, ids)
    assert len(set(groups.tolist())) == 3 and groups[11] not in (3, 7)  # the last image is in no cluster: its own
    by_image = ev.bootstrap_intervals(y, p, 0.5, resamples=400, seed=1)["accuracy"]
    by_photograph = ev.bootstrap_intervals(y, p, 0.5, resamples=400, seed=1, groups=groups)["accuracy"]
    # three photographs: a resample's accuracy is the share of the right one's copies, often 0 or 1
    assert by_photograph[0] < 0.1 and by_photograph[1] > 0.9
    assert 0.15 < by_image[0] < 0.5 < by_image[1] < 0.85


def test_binary_metrics_on_a_hand_counted_case() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.8, 0.4, 0.3, 0.6, 0.1, 0.2, 0.7])
    m = ev.binary_metrics(y, p, 0.5)  # TP 3, FN 1, FP 1, TN 3
    assert (m["accuracy"], m["precision"], m["recall"], m["specificity"]) == (0.75, 0.75, 0.75, 0.75)
    assert m["f1"] == pytest.approx(0.75)
    per_image = ev.binary_metrics(y, p, np.array([0.5] * 4 + [0.65] * 4))  # per-fold thresholds
    assert per_image["specificity"] == 1.0


def test_bootstrap_interval_brackets_the_estimate_and_agreement_counts_flips() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 300), 0, 1)
    point = ev.binary_metrics(y, p, 0.5)
    intervals = ev.bootstrap_intervals(y, p, 0.5, resamples=200)
    for key in ("accuracy", "auc", "f1"):
        low, high = intervals[key]
        assert low <= point[key] <= high and high - low < 0.2
    shifted = p.copy()
    shifted[:3] = 1 - shifted[:3]
    agree = ev.agreement(p, shifted, 0.5)
    assert agree["max_abs_dp"] == pytest.approx(np.max(np.abs(1 - 2 * p[:3])))
    assert agree["same_label"] >= 1 - 3 / 300


def test_latency_measurement_reports_batch1_percentiles_and_throughput() -> None:
    calls = []

    def infer(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return np.zeros(len(batch), np.float32)

    out = ev.measure_latency(infer, np.zeros((4, 3, 8, 8), np.float32), warmup=2, runs_batch1=10, runs_batched=2)
    assert out["batch1_p90_ms"] >= out["batch1_median_ms"] >= 0
    assert out["batch8_images_per_s"] > 0 and out["batch32_images_per_s"] > 0
    assert calls.count(1) == 12 and calls.count(8) == 3 and calls.count(32) == 3


def test_layer_summary_reads_bits_granularity_and_ranges(tmp_path: Path) -> None:
    model = make_test_model(tmp_path / "m.onnx", width=8, input_size=32)
    x = np.random.default_rng(0).uniform(-1, 1, (8, 3, 32, 32)).astype(np.float32)
    q = quantize_int8(model, tmp_path / "q.onnx", x, Int8Options(method="minmax", keep_float=("classifier",))).path
    rows = {r["layer"]: r for r in layer_summary(q)}
    assert rows["block_project"]["weight_bits"] == 8 and rows["block_project"]["granularity"] == "per-channel"
    assert 0 < rows["block_project"]["weight_scale_min"] <= rows["block_project"]["weight_scale_max"]
    assert rows["block_project"]["input_amax"] > 0
    assert rows["classifier"]["weight_bits"] == 32
    assert bit_counts(list(rows.values())) == {"8-bit": 3, "32-bit": 1}
    assert "| block_project | Conv | 8 | per-channel |" in summary_markdown(list(rows.values()))
