"""Operating point, Platt calibration, reliability, and folding Platt into the ONNX graph."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
import pytest
from onnx import helper

from service.model_info import KEY_CALIBRATION, KEY_OPERATING_POINT, KEY_THRESHOLD, ModelInfo
from tests.model_factory import make_test_model
from training.calibration import (
    PlattParams,
    apply_platt,
    bootstrap_rates,
    brier_score,
    fit_platt,
    fold_platt_into_onnx,
    logit,
    main,
    onnx_probabilities,
    plot_reliability,
    read_predictions,
    reliability_curve,
    sensitivity_specificity,
    threshold_after_platt,
    threshold_for_sensitivity,
)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# -- threshold for a target sensitivity ----------------------------------------------------------


def test_threshold_for_sensitivity_on_a_hand_counted_example() -> None:
    labels = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.65, 0.5, 0.1])
    # 80 % of 5 positives = 4: the 4th highest positive is 0.6; the next lower probability is 0.5
    threshold = threshold_for_sensitivity(labels, probs, 0.8)
    assert threshold == pytest.approx(0.55)
    sensitivity, specificity = sensitivity_specificity(labels, probs, threshold)
    assert sensitivity == pytest.approx(0.8) and specificity == pytest.approx(2 / 3)  # 0.65 is flagged
    # 100 %: the lowest positive must be flagged too
    assert threshold_for_sensitivity(labels, probs, 1.0) == pytest.approx(0.15)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.7, 0.8, 0.9, 0.95])
def test_threshold_is_the_highest_that_reaches_the_target(seed: int, target: float) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 60))
    labels = (rng.random(n) < 0.5).astype(int)
    labels[:2] = [0, 1]
    # coarse probabilities make ties between and within classes
    probs = np.round(np.clip(0.3 * labels + rng.random(n) * 0.7, 0, 1), 1)
    threshold = threshold_for_sensitivity(labels, probs, target)
    sensitivity, specificity = sensitivity_specificity(labels, probs, threshold)
    assert sensitivity >= target - 1e-12
    assert not np.any(np.isclose(probs, threshold))  # sits on no sample
    # the next distinct probability above misses the target: no higher threshold reaches it
    above = probs[probs > threshold]
    if above.size:
        assert sensitivity_specificity(labels, probs, above.min() + 1e-12)[0] < target
    # and no lower threshold has a better specificity
    for lower in np.unique(probs[probs < threshold]):
        assert sensitivity_specificity(labels, probs, lower)[1] <= specificity


def test_threshold_target_times_positives_is_not_fooled_by_float_rounding() -> None:
    # 0.55 * 100 is 55.00000000000001: a naive ceil would demand 56 of the 100 positives
    labels = np.ones(100, dtype=int)
    probs = np.linspace(0.99, 0.01, 100)
    threshold = threshold_for_sensitivity(labels, probs, 0.55)
    assert sensitivity_specificity(labels, probs, threshold)[0] == pytest.approx(0.55)


def test_threshold_on_ties_and_tiny_sets() -> None:
    # every positive tied: all are flagged together
    assert threshold_for_sensitivity([1, 1, 1, 0], [0.5, 0.5, 0.5, 0.2], 0.5) == pytest.approx(0.35)
    # one positive, nothing lower: halfway to zero
    assert threshold_for_sensitivity([1], [0.4], 0.9) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="no positive"):
        threshold_for_sensitivity([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="target sensitivity"):
        threshold_for_sensitivity([1, 0], [0.9, 0.1], 0.0)


# -- Platt scaling ---------------------------------------------------------------------------------


def test_platt_recovers_a_known_miscalibration() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.5, 40000)
    probs = sigmoid(z)  # an overconfident model: the truth is sigmoid(0.5 z - 0.3)
    labels = (rng.random(z.size) < sigmoid(0.5 * z - 0.3)).astype(int)
    params = fit_platt(labels, probs)
    assert params.slope == pytest.approx(0.5, abs=0.03) and params.intercept == pytest.approx(-0.3, abs=0.05)
    assert brier_score(labels, apply_platt(probs, params)) < brier_score(labels, probs)


def test_platt_is_the_optimum_of_the_smoothed_likelihood() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(0.25 * labels + 0.75 * rng.random(300), 0, 1)
    params = fit_platt(labels, probs)
    n_pos, n_neg = labels.sum(), (1 - labels).sum()
    target = np.where(labels == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    z = logit(probs)
    residual = sigmoid(params.slope * z + params.intercept) - target
    assert abs(np.sum(residual * z)) < 1e-6 and abs(np.sum(residual)) < 1e-6  # gradient zero


def test_platt_stays_finite_on_separable_scores_and_saturated_probabilities() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    params = fit_platt(labels, np.array([0.0, 0.0, 0.1, 0.9, 1.0, 1.0]))
    assert math.isfinite(params.slope) and math.isfinite(params.intercept) and params.slope > 0
    calibrated = apply_platt(np.array([0.0, 1.0]), params)
    assert 0.0 < calibrated[0] < 0.5 < calibrated[1] < 1.0
    with pytest.raises(ValueError, match="both classes"):
        fit_platt([1, 1], [0.2, 0.9])


def test_platt_keeps_every_label_at_the_mapped_threshold() -> None:
    rng = np.random.default_rng(2)
    probs = rng.random(5000)
    params = PlattParams(slope=0.43, intercept=-0.2)
    for threshold in (0.05, 0.3017, 0.5, 0.93):
        mapped = threshold_after_platt(threshold, params)
        assert np.array_equal(probs >= threshold, apply_platt(probs, params) >= mapped)
    with pytest.raises(ValueError, match="positive"):
        threshold_after_platt(0.5, PlattParams(slope=-1.0, intercept=0.0))


# -- Brier, reliability, intervals -------------------------------------------------------------------


def test_brier_and_reliability_on_hand_counted_values() -> None:
    labels = np.array([0, 1, 1, 0, 1])
    probs = np.array([0.05, 0.15, 0.95, 0.92, 1.0])
    assert brier_score(labels, probs) == pytest.approx((0.05**2 + 0.85**2 + 0.05**2 + 0.92**2 + 0.0) / 5)
    curve = reliability_curve(labels, probs, bins=10)
    assert curve.counts == [1, 1, 0, 0, 0, 0, 0, 0, 0, 3]  # 1.0 falls in the last bin
    assert curve.mean_predicted[2] is None and curve.observed_fraction[2] is None
    assert curve.mean_predicted[9] == pytest.approx((0.95 + 0.92 + 1.0) / 3)
    assert curve.observed_fraction[9] == pytest.approx(2 / 3)
    assert curve.bin_edges[0] == 0.0 and curve.bin_edges[-1] == 1.0 and len(curve.bin_edges) == 11


def test_reliability_plot_is_a_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 100)
    probs = rng.random(100)
    path = plot_reliability(tmp_path / "plots" / "reliability.png", labels, {"before": probs, "after": probs ** 2})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_cluster_bootstrap_counts_copies_of_a_photograph_once() -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 60)
    probs = np.clip(0.3 * labels + 0.7 * rng.random(60), 0, 1)
    copies = 10
    dup_labels, dup_probs = np.repeat(labels, copies), np.repeat(probs, copies)
    photograph = np.repeat(np.arange(60), copies)

    def width(rates: object) -> float:
        sens = rates.sensitivity  # type: ignore[attr-defined]
        return float(sens.ci_high - sens.ci_low)

    by_image = bootstrap_rates(dup_labels, dup_probs, 0.5, None, n_boot=1000, seed=0)
    by_photograph = bootstrap_rates(dup_labels, dup_probs, 0.5, photograph.tolist(), n_boot=1000, seed=0)
    originals = bootstrap_rates(labels, probs, 0.5, None, n_boot=1000, seed=0)
    assert by_photograph.units == 60 and by_image.units == 600
    assert by_image.sensitivity.value == by_photograph.sensitivity.value == originals.sensitivity.value
    # ten copies make the image bootstrap about sqrt(10) too narrow; the cluster one is not fooled
    assert width(by_photograph) > 2 * width(by_image)
    assert width(by_photograph) == pytest.approx(width(originals), rel=0.3)


# -- folding Platt into the ONNX graph -----------------------------------------------------------------


def random_images(size: int, count: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (count, 3, size, size)).astype(np.float32)


def rewrite_gemm(path: Path, drop_bias: bool = False, beta: Optional[float] = None, weight_via_identity: bool = False) -> Path:
    model = onnx.load(str(path))
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    if drop_bias:
        del gemm.input[2]
    if beta is not None:
        gemm.attribute.append(helper.make_attribute("beta", beta))
    if weight_via_identity:
        model.graph.node.insert(0, helper.make_node("Identity", [gemm.input[1]], ["fc_w_computed"]))
        gemm.input[1] = "fc_w_computed"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "variant", [{}, {"drop_bias": True}, {"beta": 0.5}, {"beta": 0.0}], ids=["bias", "no-bias", "beta-0.5", "beta-0"]
)
def test_folded_model_equals_platt_on_the_original(tmp_path: Path, variant: Dict[str, object]) -> None:
    source = rewrite_gemm(make_test_model(tmp_path / "model.onnx", input_size=32, extra_metadata={"cv_fold": "3"}), **variant)  # type: ignore[arg-type]
    images = random_images(32)
    before = onnx_probabilities(source, images)
    assert np.ptp(before) > 0.05  # the check means something only if the outputs vary
    params = PlattParams(slope=0.43, intercept=-0.7)
    target = tmp_path / "calibrated.onnx"
    fold_platt_into_onnx(source, target, params, {"note": "added"})
    after = onnx_probabilities(target, images)
    assert np.max(np.abs(after - apply_platt(before, params))) < 1e-5
    kept = {p.key: p.value for p in onnx.load(str(source)).metadata_props}
    written = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    assert written == dict(kept, note="added")  # every prop kept, the update added
    assert [n.op_type for n in onnx.load(str(target)).graph.node] == [n.op_type for n in onnx.load(str(source)).graph.node]


def test_folding_refuses_what_it_cannot_fold(tmp_path: Path) -> None:
    params = PlattParams(slope=0.5, intercept=0.1)
    computed = rewrite_gemm(make_test_model(tmp_path / "computed.onnx", input_size=32), weight_via_identity=True)
    with pytest.raises(ValueError, match="not a constant"):
        fold_platt_into_onnx(computed, tmp_path / "out.onnx", params)
    plain = make_test_model(tmp_path / "plain.onnx", input_size=32)
    fold_platt_into_onnx(plain, plain, params, {KEY_CALIBRATION: "{}"})
    with pytest.raises(ValueError, match="calibrate twice"):
        fold_platt_into_onnx(plain, plain, params)
    with pytest.raises(ValueError, match="positive"):
        fold_platt_into_onnx(make_test_model(tmp_path / "other.onnx", input_size=32), tmp_path / "x.onnx", PlattParams(0.0, 0.0))
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "x.onnx").exists()


# -- the apply command, end to end -------------------------------------------------------------------


FOLDS = 5


def synthetic_cv(tmp_path: Path, seed: int = 0) -> Tuple[Path, Path, Path, List[Dict[str, object]]]:
    """OOF and validation CSVs of an overconfident model, and a cluster file with copies.

    Each photograph has 1 to 3 copies, all in one test fold (grouped folds).
    """
    rng = np.random.default_rng(seed)
    oof: List[Dict[str, object]] = []
    clusters = []
    image = 0
    for photograph in range(150):
        label = int(rng.random() < 0.55)
        fold = photograph % FOLDS
        score = rng.normal(1.0 if label else -1.0, 1.3) * 2.0  # logit twice what it should be
        members = []
        for _ in range(int(rng.integers(1, 4))):
            image += 1
            image_id = "Image_{:03d}".format(image)
            members.append(image_id)
            oof.append({"image_id": image_id, "fold": fold, "label": label, "hb": 10.0,
                        "probability": float(sigmoid(np.array(score + rng.normal(0, 0.05)))), "threshold": 0.5})
        if len(members) > 1:
            clusters.append({"id": len(clusters), "members": members, "how": ["exact pixels"]})
    validation: List[Dict[str, object]] = []
    for fold in range(FOLDS):
        for i in range(40):
            label = int(rng.random() < 0.55)
            score = rng.normal(1.0 if label else -1.0, 1.3) * 2.0
            validation.append({"image_id": "Val_{}_{}".format(fold, i), "fold": fold, "label": label,
                               "probability": float(sigmoid(np.array(score)))})
    oof_path, val_path, clusters_path = tmp_path / "oof.csv", tmp_path / "val.csv", tmp_path / "clusters.json"
    write_csv(oof_path, oof)
    write_csv(val_path, validation)
    clusters_path.write_text(json.dumps({"clusters": clusters}))
    return oof_path, val_path, clusters_path, oof


def write_csv(path: Path, rows: List[Dict[str, object]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_apply_folds_calibration_and_writes_the_operating_point(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    oof_path, val_path, clusters_path, oof = synthetic_cv(tmp_path)
    model = make_test_model(tmp_path / "model.onnx", input_size=32)
    original = model.read_bytes()
    report_path, plot_path = tmp_path / "cv" / "calibration.json", tmp_path / "reliability.png"
    argv = ["apply", "--model", str(model), "--oof", str(oof_path), "--val", str(val_path), "--target-sensitivity", "0.9",
            "--clusters", str(clusters_path), "--out", str(model), "--report", str(report_path), "--plot", str(plot_path),
            "--n-boot", "500"]
    assert main(argv) == 0
    report = json.loads(report_path.read_text())
    params = PlattParams(**report["platt"])
    assert 0.3 < params.slope < 0.8  # the synthetic model's logits are twice too large

    # The served model: threshold == operating_point.threshold, calibration folded in.
    info = ModelInfo.from_onnx(model)
    assert info.operating_point is not None and info.calibration is not None
    assert info.threshold == info.operating_point.threshold == report["threshold"]["calibrated"]
    assert info.calibration.slope == params.slope and info.calibration.folded_into == "final Gemm"
    assert info.calibration.brier_after < info.calibration.brier_before
    images = random_images(32)
    assert np.max(np.abs(onnx_probabilities(model, images) - apply_platt(onnx_probabilities(original, images), params))) < 1e-5

    # The threshold: per fold on validation, the median mapped through Platt.
    per_fold = report["per_fold"]
    assert len(per_fold) == FOLDS and all(f["validation_sensitivity"] >= 0.9 for f in per_fold)
    median = float(np.median([f["threshold_uncalibrated"] for f in per_fold]))
    assert report["threshold"]["uncalibrated"] == pytest.approx(median)
    assert info.threshold == pytest.approx(threshold_after_platt(median, params))

    # The rates: out of fold, each image at its own fold's validation threshold.
    own = {f["fold"]: f["threshold_uncalibrated"] for f in per_fold}
    labels = np.array([row["label"] for row in oof])
    probs = np.array([row["probability"] for row in oof])
    thresholds = np.array([own[row["fold"]] for row in oof])
    sensitivity, specificity = sensitivity_specificity(labels, probs, thresholds)
    assert info.operating_point.sensitivity.value == pytest.approx(sensitivity)
    assert info.operating_point.specificity.value == pytest.approx(specificity)
    assert info.operating_point.sensitivity.ci_low < sensitivity < info.operating_point.sensitivity.ci_high
    assert "150 photographs" in info.operating_point.interval and "cluster bootstrap" in info.operating_point.interval
    assert "grouped out-of-fold" in info.operating_point.measured_on and "{} images".format(len(oof)) in info.operating_point.measured_on

    # Per image, before and after, in the report; and the plot.
    rows = {row["image_id"]: row for row in report["oof"]}
    assert len(rows) == len(oof)
    for source in oof[:20]:
        row = rows[str(source["image_id"])]
        assert row["calibrated_probability"] == pytest.approx(float(apply_platt(np.array([source["probability"]]), params)[0]))
        assert row["flagged"] == (row["probability"] >= row["threshold"]) == (row["calibrated_probability"] >= row["calibrated_threshold"])
    assert set(report["brier"]["cross_fold"]) == {"uncalibrated", "platt", "isotonic"}
    assert sum(report["reliability"]["after"]["counts"]) == len(oof)
    assert plot_path.read_bytes()[:4] == b"\x89PNG"
    assert "threshold" in capsys.readouterr().out

    # Running it again on the calibrated model would calibrate twice: refused, the model untouched.
    calibrated = model.read_bytes()
    assert main(argv) == 2
    assert "calibrate twice" in capsys.readouterr().err
    assert model.read_bytes() == calibrated


def test_apply_without_clusters_says_the_interval_resamples_images(tmp_path: Path) -> None:
    oof_path, val_path, _clusters, oof = synthetic_cv(tmp_path, seed=1)
    model = make_test_model(tmp_path / "model.onnx", input_size=32)
    out = tmp_path / "calibrated.onnx"
    assert main(["apply", "--model", str(model), "--oof", str(oof_path), "--val", str(val_path), "--out", str(out),
                 "--report", str(tmp_path / "report.json"), "--n-boot", "200"]) == 0
    point = ModelInfo.from_onnx(out).operating_point
    assert point is not None and point.target_sensitivity == 0.9
    assert "over {} images".format(len(oof)) in point.interval and "too narrow" in point.interval
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert float(props[KEY_THRESHOLD]) == json.loads(props[KEY_OPERATING_POINT])["threshold"]
    assert ModelInfo.from_onnx(model).operating_point is None  # the source was left as it was


def test_apply_refuses_a_validation_split_that_overlaps_its_test_fold(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    oof_path, val_path, _clusters, oof = synthetic_cv(tmp_path, seed=2)
    leaked = dict(oof[0])
    leaked.pop("hb")
    leaked.pop("threshold")
    rows = list(csv.DictReader(open(val_path))) + [leaked]
    write_csv(val_path, rows)  # type: ignore[arg-type]
    model = make_test_model(tmp_path / "model.onnx", input_size=32)
    assert main(["apply", "--model", str(model), "--oof", str(oof_path), "--val", str(val_path), "--out", str(model),
                 "--report", str(tmp_path / "report.json")]) == 2
    assert "both its validation and its test split" in capsys.readouterr().err
    assert ModelInfo.from_onnx(model).calibration is None


def test_predict_scores_each_fold_models_splits_and_feeds_apply(tmp_path: Path) -> None:
    import cv2

    from service.preprocess import PreprocessSpec, preprocess_roi
    from training.data import CSV_NAME

    # A CP-AnemiC-like folder: RGBA crops whose redness varies, a sheet, two folds.
    header = "IMAGE_ID,HB_LEVEL,Severity,Age(Months),GENDER,REMARK,HOSPITAL,CITY/TOWN,MUNICIPALITY/DISTRICT,REGION\n"
    lines = [header]
    ids = []
    for i in range(16):
        anemic = i % 2 == 0
        image_id = "Image_{:03d}".format(i + 1)
        ids.append(image_id)
        bgra = np.zeros((30, 60, 4), np.uint8)
        colour = (90 + 7 * i, 80 + 3 * i, 200 - 5 * i, 255)
        cv2.ellipse(bgra, (30, 15), (28, 13), 0, 0, 360, colour, -1)
        folder = tmp_path / "data" / ("Anemic" if anemic else "Non-anemic")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / (image_id + ".png")), bgra)
        lines.append("{},{},Mild,24,Female,{},Hospital,Town,District,Region\n".format(image_id, 9.5 if anemic else 12.0, "Anemic" if anemic else "Non-anemic"))
    (tmp_path / "data" / CSV_NAME).write_text("".join(lines))
    folds = {"folds": [
        {"fold": 0, "train_ids": ids[8:12], "val_ids": ids[12:], "test_ids": ids[:8]},
        {"fold": 1, "train_ids": ids[:4], "val_ids": ids[4:8], "test_ids": ids[8:]},
    ]}
    (tmp_path / "folds.json").write_text(json.dumps(folds))
    spec = PreprocessSpec(input_size=32)
    for fold in (0, 1):
        make_test_model(tmp_path / "runs" / "fold{}".format(fold) / "model.onnx", seed=fold, spec=spec)

    oof_csv, val_csv = tmp_path / "cv" / "oof.csv", tmp_path / "cv" / "val.csv"
    assert main(["predict", "--folds", str(tmp_path / "folds.json"), "--fold-models", str(tmp_path / "runs"),
                 "--data-dir", str(tmp_path / "data"), "--val-out", str(val_csv), "--oof-out", str(oof_csv)]) == 0
    oof = list(csv.DictReader(open(oof_csv)))
    validation = list(csv.DictReader(open(val_csv)))
    assert sorted(row["image_id"] for row in oof) == ids  # every image once, out of fold
    assert {(row["fold"], row["image_id"]) for row in validation} == {(str(f["fold"]), i) for f in folds["folds"] for i in f["val_ids"]}
    # each probability is the fold model's, through the service's preprocessing
    row = next(r for r in validation if r["image_id"] == ids[5])
    path = tmp_path / "data" / "Non-anemic" / (ids[5] + ".png")
    tensor = preprocess_roi(path.read_bytes(), None, spec).tensor
    expected = onnx_probabilities(tmp_path / "runs" / "fold1" / "model.onnx", tensor)[0]
    assert float(row["probability"]) == pytest.approx(expected, abs=1e-7)
    assert row["fold"] == "1" and row["label"] == "0"
    assert len({row["probability"] for row in oof}) > 8  # the pictures really differ to the model

    # what apply reads (the random test models do not rank the classes, so apply itself would refuse)
    read = read_predictions(val_csv)
    assert [(r.image_id, r.fold, r.label) for r in read] == [(v["image_id"], int(v["fold"]), int(v["label"])) for v in validation]


def test_measured_on_says_when_copies_of_a_photograph_sit_in_several_test_folds(tmp_path: Path) -> None:
    from training.calibration import calibrate_predictions

    oof_path, val_path, _clusters, oof = synthetic_cv(tmp_path, seed=3)
    rows, validation = read_predictions(oof_path), read_predictions(val_path)
    by_fold: Dict[int, List[str]] = {}
    for row in rows:
        by_fold.setdefault(row.fold, []).append(row.image_id)
    # two photographs whose copies were split across test folds, as random folds do
    leaky = {by_fold[0][0]: 1000, by_fold[1][0]: 1000, by_fold[2][0]: 1001, by_fold[3][0]: 1001}
    outcome = calibrate_predictions(rows, validation, 0.9, leaky, "leaky.json", n_boot=100)
    assert "NOT grouped by photograph (2 photographs have copies in several test folds)" in outcome.operating_point.measured_on
    assert outcome.report["grouping"]["photographs_in_several_test_folds"] == 2
    assert outcome.report["grouping"]["photographs"] == len(oof) - 2
