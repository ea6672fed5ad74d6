"""The screen's operating point and calibrated probabilities, and folding them into the ONNX model.

- :func:`threshold_for_sensitivity`: the threshold for a target sensitivity, chosen on validation data.
- :func:`fit_platt` / :func:`apply_platt`: Platt scaling on the logit, p' = sigmoid(a * logit(p) + b).
- :func:`brier_score`, :func:`reliability_curve`, :func:`plot_reliability`: how well calibrated.
- :func:`fold_platt_into_onnx`: put the Platt scaling into the final ``Gemm`` before the
  ``Sigmoid`` (W * a, bias * a + b), so every engine built from the file serves calibrated
  probabilities without any change to an engine or the server.
- ``python -m training.calibration apply``: all of it on a trained model and its cross-validation
  predictions, writing the ``operating_point`` and ``calibration`` metadata
  (:class:`service.model_info.OperatingPoint`, :class:`service.model_info.Calibration`).

Rules of ``apply`` (see :func:`calibrate_model`):

- Platt is fitted on the pooled out-of-fold (test-fold) predictions of the fold models.
- Fold k's threshold is :func:`threshold_for_sensitivity` on fold k's *validation* predictions
  (never its test fold). The served threshold is the median of the folds' thresholds, taken on
  the uncalibrated scale, then mapped through Platt (:func:`threshold_after_platt`).
- Sensitivity and specificity are measured on the pooled out-of-fold predictions, each test image
  judged at its own fold's validation threshold: this measures the rule "choose the threshold on
  validation for the target", the same way the fold models' other figures are measured.
- Intervals: percentile bootstrap over photographs (duplicate clusters) when a cluster file is
  given, else over images (and ``interval`` says so).

Platt is monotone increasing (the fit must give a positive slope), so calibration changes no
label: an image is flagged after calibration exactly when it was flagged before.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from numpy.typing import ArrayLike
from onnx import numpy_helper

from service.errors import EngineError
from service.model_info import KEY_CALIBRATION, OUTPUT_NAME, Calibration, MeasuredRate, OperatingPoint

# Probabilities are clipped to [EPS, 1 - EPS] before the logit: a float32 sigmoid saturates to
# exactly 0 or 1 beyond |logit| ~ 17, and CSVs round to 6 decimals.
EPS = 1e-7
DEFAULT_TARGET_SENSITIVITY = 0.90
DEFAULT_BOOTSTRAP = 2000
FOLDED_INTO = "final Gemm"


# ---------------------------------------------------------------------------------------------
# Threshold for a target sensitivity


def threshold_for_sensitivity(labels: ArrayLike, probs: ArrayLike, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY) -> float:
    """The highest threshold at which at least ``target_sensitivity`` of the positives are flagged.

    An image is flagged when ``prob >= threshold`` (as the server labels). Sensitivity only falls
    as the threshold rises, so the highest threshold reaching the target is the k-th highest
    positive probability, k = ceil(target * positives); it also has the highest specificity of
    all thresholds reaching the target. Every threshold between that probability and the next
    lower distinct probability (of any image) gives the same labels on this data; the midpoint of
    that gap is returned, so the threshold sits on no sample (ties at the k-th probability are
    all flagged). Below the lowest probability the gap's lower end is 0.
    """
    labels_array = np.asarray(labels, dtype=np.int64)
    probs_array = np.asarray(probs, dtype=np.float64)
    if labels_array.shape != probs_array.shape or labels_array.ndim != 1:
        raise ValueError("labels and probabilities must be 1-D and of one length")
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError("target sensitivity must lie in (0, 1], not {}".format(target_sensitivity))
    positives = np.sort(probs_array[labels_array == 1])[::-1]
    if positives.size == 0:
        raise ValueError("no positive (anemic) image: sensitivity is undefined")
    # 0.55 * 100 is 55.00000000000001 in floats: a hair below the product keeps k = 55.
    k = max(1, int(math.ceil(target_sensitivity * positives.size - 1e-9)))
    kth = float(positives[k - 1])
    below = probs_array[probs_array < kth]
    lower = float(below.max()) if below.size else 0.0
    return (kth + lower) / 2.0


def sensitivity_specificity(labels: ArrayLike, probs: ArrayLike, thresholds: Any) -> Tuple[float, float]:
    """Sensitivity and specificity with per-image thresholds (a scalar applies to all)."""
    counts = confusion_counts(labels, probs, thresholds).sum(axis=0)
    return _rates(counts)


def confusion_counts(labels: ArrayLike, probs: ArrayLike, thresholds: Any) -> np.ndarray:
    """Per image one row [TP, FN, TN, FP] (a one-hot row), flagged when prob >= threshold."""
    labels_array = np.asarray(labels, dtype=np.int64)
    probs_array = np.asarray(probs, dtype=np.float64)
    flagged = probs_array >= np.broadcast_to(np.asarray(thresholds, dtype=np.float64), probs_array.shape)
    positive = labels_array == 1
    return np.stack([positive & flagged, positive & ~flagged, ~positive & ~flagged, ~positive & flagged], axis=1).astype(np.int64)


def _rates(counts: np.ndarray) -> Tuple[float, float]:
    tp, fn, tn, fp = (float(c) for c in counts)
    return (tp / (tp + fn) if tp + fn else float("nan"), tn / (tn + fp) if tn + fp else float("nan"))


@dataclass(frozen=True)
class BootstrapRates:
    sensitivity: MeasuredRate
    specificity: MeasuredRate
    resamples: int  # kept: those with at least one positive and one negative
    units: int  # photographs (clusters) or images resampled


def bootstrap_rates(
    labels: ArrayLike,
    probs: ArrayLike,
    thresholds: Any,
    groups: Optional[Sequence[Any]] = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapRates:
    """Sensitivity and specificity with percentile intervals, resampling ``groups`` (None: images).

    Copies of one photograph are not independent evidence; resampling whole clusters keeps them
    together, so the interval reflects the number of photographs, not of files.
    """
    per_image = confusion_counts(labels, probs, thresholds)
    if groups is None:
        groups = list(range(len(per_image)))
    if len(groups) != len(per_image):
        raise ValueError("one group per image")
    index: Dict[Any, int] = {}
    codes = np.asarray([index.setdefault(g, len(index)) for g in groups], dtype=np.int64)
    per_group: np.ndarray = np.zeros((len(index), 4), dtype=np.int64)
    np.add.at(per_group, codes, per_image)
    point = _rates(per_group.sum(axis=0))
    rng = np.random.default_rng(seed)
    n_groups = len(index)
    sens: List[float] = []
    spec: List[float] = []
    for _ in range(n_boot):
        weights = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        s, p = _rates(weights @ per_group)
        if math.isfinite(s) and math.isfinite(p):
            sens.append(s)
            spec.append(p)
    alpha = (1.0 - level) / 2.0

    def measured(value: float, samples: List[float]) -> MeasuredRate:
        if not samples:
            return MeasuredRate(value=value, ci_low=float("nan"), ci_high=float("nan"))
        bounds: np.ndarray = np.quantile(samples, [alpha, 1.0 - alpha])
        low, high = float(bounds[0]), float(bounds[1])
        # a percentile interval can miss the point estimate on tiny sets; widen it to include it
        return MeasuredRate(value=value, ci_low=min(low, value), ci_high=max(high, value))

    return BootstrapRates(measured(point[0], sens), measured(point[1], spec), len(sens), n_groups)


# ---------------------------------------------------------------------------------------------
# Platt scaling


@dataclass(frozen=True)
class PlattParams:
    """p' = sigmoid(slope * logit(p) + intercept)."""

    slope: float
    intercept: float


def logit(probs: Any) -> np.ndarray:
    clipped = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(clipped) - np.log1p(-clipped)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # the two branches avoid exp overflow for large |z|
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    e = np.exp(z[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def fit_platt(labels: ArrayLike, probs: ArrayLike, max_iter: int = 100, tolerance: float = 1e-12) -> PlattParams:
    """Logistic regression of the label on logit(p), by Newton's method with a backtracking line search.

    The targets are Platt's (1999) smoothed labels, (N+ + 1) / (N+ + 2) for positives and
    1 / (N- + 2) for negatives: a light regularisation that keeps the fit finite when the scores
    separate the classes perfectly (plain maximum likelihood would send the slope to infinity).
    """
    labels_array = np.asarray(labels, dtype=np.int64)
    z = logit(probs)
    if labels_array.shape != z.shape or z.ndim != 1 or z.size == 0:
        raise ValueError("labels and probabilities must be 1-D, non-empty and of one length")
    n_pos = int(np.sum(labels_array == 1))
    n_neg = int(labels_array.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("Platt scaling needs both classes ({} positive, {} negative)".format(n_pos, n_neg))
    target = np.where(labels_array == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    design = np.stack([z, np.ones_like(z)], axis=1)

    def loss(params: np.ndarray) -> float:
        s = design @ params
        # -[t log sigmoid(s) + (1 - t) log(1 - sigmoid(s))] = log(1 + e^s) - t s
        return float(np.sum(np.logaddexp(0.0, s) - target * s))

    params = np.array([1.0, 0.0])
    current = loss(params)
    for _ in range(max_iter):
        p = _sigmoid(design @ params)
        gradient = design.T @ (p - target)
        hessian = design.T @ (design * (p * (1.0 - p))[:, None]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        size = 1.0
        candidate = params - step
        value = loss(candidate)
        while value > current and size > 1e-10:
            size /= 2.0
            candidate = params - size * step
            value = loss(candidate)
        if value > current:
            break  # no step lowers the loss: at the minimum to float precision
        converged = current - value <= tolerance * max(1.0, abs(current))
        params, current = candidate, value
        if converged:
            break
    return PlattParams(slope=float(params[0]), intercept=float(params[1]))


def apply_platt(probs: Any, params: PlattParams) -> np.ndarray:
    return _sigmoid(params.slope * logit(probs) + params.intercept)


def threshold_after_platt(threshold: float, params: PlattParams) -> float:
    """The calibrated-scale threshold that flags exactly the images ``threshold`` flagged before.

    Platt with a positive slope is strictly increasing, so p >= t exactly when
    platt(p) >= platt(t) (up to the last float bits at the boundary).
    """
    _check_increasing(params)
    return float(apply_platt(np.array([threshold]), params)[0])


def _check_increasing(params: PlattParams) -> None:
    if not (math.isfinite(params.slope) and math.isfinite(params.intercept)) or params.slope <= 0.0:
        raise ValueError(
            "Platt slope {} is not a finite positive number: the scores do not rank the classes, "
            "so a calibration would flip labels; do not fold it".format(params.slope)
        )


# ---------------------------------------------------------------------------------------------
# Isotonic regression: compared, never folded (a step function is not a Gemm)


def fit_isotonic(labels: ArrayLike, probs: ArrayLike) -> Any:
    from sklearn.isotonic import IsotonicRegression  # type: ignore[import-untyped]

    model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
    model.fit(np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.float64))
    return model


def cross_fold_brier(labels: ArrayLike, probs: ArrayLike, folds: ArrayLike) -> Dict[str, float]:
    """Brier score of Platt and of isotonic fitted on the other folds' predictions, scored on each fold.

    The fair comparison: fitted and scored on the same predictions, isotonic always looks better.
    """
    labels_array = np.asarray(labels, dtype=np.int64)
    probs_array = np.asarray(probs, dtype=np.float64)
    folds_array = np.asarray(folds)
    platt = np.empty_like(probs_array)
    isotonic = np.empty_like(probs_array)
    for fold in np.unique(folds_array):
        held = folds_array == fold
        platt[held] = apply_platt(probs_array[held], fit_platt(labels_array[~held], probs_array[~held]))
        isotonic[held] = fit_isotonic(labels_array[~held], probs_array[~held]).predict(probs_array[held])
    return {
        "uncalibrated": brier_score(labels_array, probs_array),
        "platt": brier_score(labels_array, platt),
        "isotonic": brier_score(labels_array, isotonic),
    }


# ---------------------------------------------------------------------------------------------
# Reliability


def brier_score(labels: ArrayLike, probs: ArrayLike) -> float:
    labels_array = np.asarray(labels, dtype=np.float64)
    probs_array = np.asarray(probs, dtype=np.float64)
    if labels_array.shape != probs_array.shape or labels_array.size == 0:
        raise ValueError("labels and probabilities must be non-empty and of one shape")
    return float(np.mean((probs_array - labels_array) ** 2))


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per equal-width bin of predicted probability: images, mean predicted, observed anemic share.

    Empty bins have count 0 and None for both means.
    """

    bin_edges: List[float]
    counts: List[int]
    mean_predicted: List[Optional[float]]
    observed_fraction: List[Optional[float]]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def reliability_curve(labels: ArrayLike, probs: ArrayLike, bins: int = 10) -> ReliabilityCurve:
    labels_array = np.asarray(labels, dtype=np.float64)
    probs_array = np.asarray(probs, dtype=np.float64)
    if bins < 1:
        raise ValueError("bins must be at least 1")
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin i holds [edge_i, edge_i+1); the last bin also holds 1.0
    which = np.clip(np.searchsorted(edges, probs_array, side="right") - 1, 0, bins - 1)
    counts: List[int] = []
    predicted: List[Optional[float]] = []
    observed: List[Optional[float]] = []
    for b in range(bins):
        members = which == b
        n = int(members.sum())
        counts.append(n)
        predicted.append(float(probs_array[members].mean()) if n else None)
        observed.append(float(labels_array[members].mean()) if n else None)
    return ReliabilityCurve([float(e) for e in edges], counts, predicted, observed)


def plot_reliability(
    path: Path,
    labels: ArrayLike,
    curves: Mapping[str, ArrayLike],
    bins: int = 10,
    title: str = "Reliability",
) -> Path:
    """Write a PNG: observed anemic share against mean predicted probability per bin, one line per
    entry of ``curves`` (e.g. before / after calibration), the diagonal, and the images per bin."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    width = 1.0 / bins / (len(curves) + 1)
    for i, (name, probs) in enumerate(curves.items()):
        curve = reliability_curve(labels, probs, bins)
        xs = [x for x, n in zip(curve.mean_predicted, curve.counts) if n]
        ys = [y for y, n in zip(curve.observed_fraction, curve.counts) if n]
        label = "{} (Brier {:.3f})".format(name, brier_score(labels, probs))
        line = top.plot(xs, ys, marker="o", linewidth=1.5, label=label)[0]
        lefts = np.asarray(curve.bin_edges[:-1]) + (i + 0.5) * width
        bottom.bar(lefts, curve.counts, width=width, align="edge", color=line.get_color(), label=name)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("observed share anemic")
    top.set_title(title)
    top.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("predicted probability (bin mean)")
    bottom.set_ylabel("images")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(path), dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------
# Folding Platt into the ONNX graph


def fold_platt_into_onnx(
    src_path: Path, dst_path: Path, params: PlattParams, metadata_updates: Optional[Mapping[str, str]] = None
) -> None:
    """Write ``src_path`` with sigmoid(a * z + b) in place of sigmoid(z), z the final Gemm's output.

    Gemm computes z = alpha * A @ op(B) + beta * C, so a * z + b is the same Gemm with
    B' = a * B and C' = a * C + b / beta (C' = b with beta = 1 when it had no bias). Every
    metadata prop is kept; ``metadata_updates`` adds or replaces props in the same write.
    Refuses a graph whose output is not Sigmoid(Gemm) with constant weights (e.g. a quantized
    model: fold into the FP32 model, then quantize), and a model already carrying a calibration
    (folding twice would calibrate twice).
    """
    _check_increasing(params)
    model = onnx.load(str(src_path))
    props = {p.key: p.value for p in model.metadata_props}
    if KEY_CALIBRATION in props:
        raise ValueError(
            "{} already carries a calibration; folding again would calibrate twice. Start from the uncalibrated "
            "export (the training output, or `git checkout` of the model file)".format(src_path)
        )
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    sigmoid = producers.get(OUTPUT_NAME)
    if sigmoid is None or sigmoid.op_type != "Sigmoid":
        raise ValueError("{}: output '{}' is not produced by a Sigmoid".format(src_path, OUTPUT_NAME))
    gemm = producers.get(sigmoid.input[0])
    if gemm is None or gemm.op_type != "Gemm":
        raise ValueError("{}: the Sigmoid's input is not produced by a Gemm".format(src_path))
    logit_name = gemm.output[0]
    readers = [node for node in graph.node if logit_name in node.input]
    if readers != [sigmoid] or any(output.name == logit_name for output in graph.output):
        raise ValueError("{}: the final Gemm's output is read elsewhere too; folding would change it".format(src_path))
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    weight_name = gemm.input[1]
    if weight_name not in initializers:
        raise ValueError(
            "{}: the final Gemm's weight '{}' is not a constant (a quantized model?); fold into the FP32 "
            "model, then quantize".format(src_path, weight_name)
        )
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    beta = float(attributes.get("beta", 1.0))
    weight = numpy_helper.to_array(initializers[weight_name])
    if weight.dtype != np.float32:
        raise ValueError("{}: the final Gemm's weight is {}, not float32".format(src_path, weight.dtype))
    outputs = weight.shape[0] if attributes.get("transB", 0) else weight.shape[1]
    slope, intercept = np.float64(params.slope), np.float64(params.intercept)
    new_weight = (weight.astype(np.float64) * slope).astype(np.float32)
    bias_name = gemm.input[2] if len(gemm.input) > 2 and gemm.input[2] else None
    if bias_name is not None and bias_name not in initializers:
        raise ValueError("{}: the final Gemm's bias '{}' is not a constant".format(src_path, bias_name))
    if bias_name is None or beta == 0.0:
        new_bias = np.full((outputs,), intercept, dtype=np.float32)
        _set_attribute(gemm, "beta", 1.0)
    else:
        bias = numpy_helper.to_array(initializers[bias_name]).astype(np.float64)
        new_bias = (bias * slope + intercept / beta).astype(np.float32)
    gemm_inputs = list(gemm.input) + [""] * (3 - len(gemm.input))
    gemm_inputs[1] = _replace_initializer(graph, weight_name, new_weight, gemm)
    gemm_inputs[2] = _replace_initializer(graph, bias_name, new_bias, gemm)
    del gemm.input[:]
    gemm.input.extend(gemm_inputs)
    if metadata_updates:
        props.update(metadata_updates)
        onnx.helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    dst_path = Path(dst_path)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    # src and dst are often the same file: write beside it and rename, never half a model
    tmp = dst_path.with_name(dst_path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(str(tmp), str(dst_path))


def _set_attribute(node: onnx.NodeProto, name: str, value: float) -> None:
    for attribute in list(node.attribute):
        if attribute.name == name:
            node.attribute.remove(attribute)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _replace_initializer(graph: onnx.GraphProto, name: Optional[str], value: np.ndarray, owner: onnx.NodeProto) -> str:
    """Put ``value`` under ``name`` if only ``owner`` reads it, else under a new name; return the name."""
    shared = name is not None and any(name in node.input for node in graph.node if node is not owner)
    if name is not None and not shared:
        for tensor in graph.initializer:
            if tensor.name == name:
                tensor.CopyFrom(numpy_helper.from_array(value, name))
                return name
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    new_name = (name or owner.name or "gemm") + "_platt"
    while new_name in taken:
        new_name += "_"
    graph.initializer.append(numpy_helper.from_array(value, new_name))
    return new_name


def onnx_probabilities(model: Any, images: np.ndarray) -> np.ndarray:
    """ONNX Runtime's output for a model given as a path or as serialized bytes."""
    import onnxruntime as ort

    from service.model_info import INPUT_NAME

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: images})[0], dtype=np.float64).reshape(-1)


def check_folded(original: bytes, folded_path: Path, params: PlattParams, batch: int = 4, seed: int = 0) -> float:
    """Max |ORT(folded) - apply_platt(ORT(original))| on random inputs, over outputs in [1e-4, 1 - 1e-4].

    Saturated outputs are left out: there the original's float32 probability no longer holds
    the logit to the precision the comparison needs (the folded graph computes from the logit).
    Returns NaN when every output saturated.
    """
    model = onnx.load_from_string(original)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    height = dims[2] if len(dims) == 4 and dims[2] > 0 else 224
    width = dims[3] if len(dims) == 4 and dims[3] > 0 else height
    images = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(batch, 3, height, width)).astype(np.float32)
    before = onnx_probabilities(original, images)
    after = onnx_probabilities(folded_path, images)
    usable = (before >= 1e-4) & (before <= 1.0 - 1e-4)
    if not usable.any():
        return float("nan")
    return float(np.max(np.abs(after[usable] - apply_platt(before[usable], params))))


# ---------------------------------------------------------------------------------------------
# From cross-validation predictions to the served model: ``python -m training.calibration apply``


@dataclass(frozen=True)
class Prediction:
    """One row of a predictions CSV: ``image_id,fold,label,probability`` (other columns ignored)."""

    image_id: str
    fold: int
    label: int
    probability: float


def read_predictions(path: Path) -> List[Prediction]:
    rows: List[Prediction] = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"image_id", "fold", "label", "probability"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError("{} lacks the column(s) {}".format(path, ", ".join(sorted(missing))))
        for line, row in enumerate(reader, start=2):
            try:
                prediction = Prediction(row["image_id"], int(row["fold"]), int(row["label"]), float(row["probability"]))
            except ValueError as exc:
                raise ValueError("{} line {}: {}".format(path, line, exc))
            if prediction.label not in (0, 1) or not 0.0 <= prediction.probability <= 1.0:
                raise ValueError("{} line {}: label must be 0 or 1 and probability in [0, 1]".format(path, line))
            rows.append(prediction)
    if not rows:
        raise ValueError("{} has no rows".format(path))
    return rows


def read_clusters(path: Path) -> Dict[str, int]:
    """image_id -> cluster id from ``{"clusters": [{"id": int, "members": [image_id, ...]}, ...]}``."""
    with open(path) as handle:
        data = json.load(handle)
    cluster_of: Dict[str, int] = {}
    for cluster in data["clusters"]:
        for member in cluster["members"]:
            if member in cluster_of and cluster_of[member] != int(cluster["id"]):
                raise ValueError("{}: {} is in clusters {} and {}".format(path, member, cluster_of[member], cluster["id"]))
            cluster_of[str(member)] = int(cluster["id"])
    return cluster_of


@dataclass(frozen=True)
class CalibrationOutcome:
    params: PlattParams
    threshold: float  # on the calibrated scale: what the served model judges at
    operating_point: OperatingPoint
    calibration: Calibration
    report: Dict[str, Any]


def calibrate_predictions(
    oof: Sequence[Prediction],
    validation: Sequence[Prediction],
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    cluster_of: Optional[Mapping[str, int]] = None,
    clusters_source: str = "",
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    bins: int = 10,
) -> CalibrationOutcome:
    """Platt on the out-of-fold predictions, thresholds on validation, rates measured out of fold.

    ``oof``: each image once, predicted by the fold model that did not train on it (its test
    fold). ``validation``: per fold, that fold model's predictions on its validation split.
    """
    ids = [row.image_id for row in oof]
    if len(set(ids)) != len(ids):
        raise ValueError("the out-of-fold predictions list an image more than once")
    folds = sorted({row.fold for row in oof})
    validation_by_fold: Dict[int, List[Prediction]] = defaultdict(list)
    for row in validation:
        validation_by_fold[row.fold].append(row)
    if sorted(validation_by_fold) != folds:
        raise ValueError(
            "the validation predictions cover folds {} but the out-of-fold ones folds {}".format(sorted(validation_by_fold), folds)
        )
    test_ids = {fold: {row.image_id for row in oof if row.fold == fold} for fold in folds}
    for fold in folds:
        leaked = test_ids[fold] & {row.image_id for row in validation_by_fold[fold]}
        if leaked:
            raise ValueError("fold {}: {} image(s) are in both its validation and its test split, e.g. {}".format(fold, len(leaked), sorted(leaked)[0]))

    labels = np.asarray([row.label for row in oof], dtype=np.int64)
    probs = np.asarray([row.probability for row in oof], dtype=np.float64)
    fold_of = np.asarray([row.fold for row in oof])
    params = fit_platt(labels, probs)
    _check_increasing(params)
    calibrated = apply_platt(probs, params)

    per_fold: List[Dict[str, Any]] = []
    fold_threshold: Dict[int, float] = {}
    for fold in folds:
        val_labels = np.asarray([row.label for row in validation_by_fold[fold]])
        val_probs = np.asarray([row.probability for row in validation_by_fold[fold]])
        try:
            threshold = threshold_for_sensitivity(val_labels, val_probs, target_sensitivity)
        except ValueError as exc:
            raise ValueError("fold {} validation: {}".format(fold, exc))
        fold_threshold[fold] = threshold
        val_sens, val_spec = sensitivity_specificity(val_labels, val_probs, threshold)
        held = fold_of == fold
        test_sens, test_spec = sensitivity_specificity(labels[held], probs[held], threshold)
        per_fold.append(
            {
                "fold": fold,
                "validation_images": int(val_labels.size),
                "validation_anemic": int(val_labels.sum()),
                "threshold_uncalibrated": threshold,
                "threshold_calibrated": threshold_after_platt(threshold, params),
                "validation_sensitivity": val_sens,
                "validation_specificity": val_spec,
                "test_images": int(held.sum()),
                "test_anemic": int(labels[held].sum()),
                "test_sensitivity": _none_if_nan(test_sens),
                "test_specificity": _none_if_nan(test_spec),
            }
        )
    threshold_uncalibrated = float(np.median([fold_threshold[fold] for fold in folds]))
    threshold = threshold_after_platt(threshold_uncalibrated, params)
    own_thresholds = np.asarray([fold_threshold[row.fold] for row in oof])

    if cluster_of is not None:
        groups: List[Any] = [("cluster", cluster_of[i]) if i in cluster_of else ("image", i) for i in ids]
    else:
        groups = [("image", i) for i in ids]
    rates = bootstrap_rates(labels, probs, own_thresholds, groups, n_boot=n_boot, seed=seed)
    for name, rate in (("sensitivity", rates.sensitivity), ("specificity", rates.specificity)):
        if not (math.isfinite(rate.value) and math.isfinite(rate.ci_low) and math.isfinite(rate.ci_high)):
            raise ValueError("the out-of-fold {} or its interval is undefined (too few images of a class)".format(name))
    photographs = len(set(groups))
    spanning = _groups_spanning_folds(groups, fold_of) if cluster_of is not None else None

    k = len(folds)
    if cluster_of is None:
        photographs_text = "photographs not known (no cluster file)"
        grouping_text = "out-of-fold"
        interval = (
            "95% percentile bootstrap over {} images ({} resamples); no cluster file, so copies of one photograph "
            "were resampled independently and the interval is too narrow".format(len(ids), rates.resamples)
        )
    else:
        photographs_text = "{} photographs".format(photographs)
        grouping_text = (
            "grouped out-of-fold" if spanning == 0
            else "out-of-fold, NOT grouped by photograph ({} photographs have copies in several test folds)".format(spanning)
        )
        interval = "95% cluster bootstrap over {} photographs{} ({} resamples)".format(
            photographs, " (duplicate clusters of {})".format(clusters_source) if clusters_source else "", rates.resamples
        )
    chosen_on = (
        "validation splits of the {k} fold models: per fold the highest threshold reaching sensitivity {t:g} on its "
        "validation predictions, the median of the {k} on the uncalibrated scale ({u:.6g}), mapped through the "
        "Platt calibration".format(k=k, t=target_sensitivity, u=threshold_uncalibrated)
    )
    measured_on = (
        "{g} predictions of the {k} fold models, each test image judged at its own fold's validation threshold: "
        "{n} images, {p}".format(g=grouping_text, k=k, n=len(ids), p=photographs_text)
    )
    operating_point = OperatingPoint(
        target_sensitivity=float(target_sensitivity),
        threshold=threshold,
        chosen_on=chosen_on,
        measured_on=measured_on,
        sensitivity=rates.sensitivity,
        specificity=rates.specificity,
        interval=interval,
    )
    cross = cross_fold_brier(labels, probs, fold_of)
    calibration = Calibration(
        method="platt",
        slope=params.slope,
        intercept=params.intercept,
        fitted_on="{} predictions of the {} fold models ({} images, {}); applied unchanged to the final model".format(
            grouping_text, k, len(ids), photographs_text
        ),
        brier_before=brier_score(labels, probs),
        brier_after=brier_score(labels, calibrated),
        folded_into=FOLDED_INTO,
        brier_after_cross_fold=cross["platt"],
    )
    report: Dict[str, Any] = {
        "target_sensitivity": target_sensitivity,
        "rule": {
            "calibration": "Platt scaling (Platt's smoothed targets) fitted on all out-of-fold predictions",
            "threshold": "per fold: threshold_for_sensitivity on its validation predictions; served: median over folds "
            "(uncalibrated scale), mapped through Platt",
            "measurement": "pooled out-of-fold predictions, each at its own fold's validation threshold",
        },
        "platt": asdict(params),
        "threshold": {"uncalibrated": threshold_uncalibrated, "calibrated": threshold},
        "per_fold": per_fold,
        "operating_point": json.loads(operating_point.to_json()),
        "calibration": json.loads(calibration.to_json()),
        "brier": {
            "before": calibration.brier_before,
            "after": calibration.brier_after,
            "cross_fold": cross,
            "note": "cross_fold: each fold scored by a calibration fitted on the other folds (isotonic for comparison; Platt is folded)",
        },
        "reliability": {
            "bins": bins,
            "before": reliability_curve(labels, probs, bins).to_dict(),
            "after": reliability_curve(labels, calibrated, bins).to_dict(),
        },
        "grouping": {
            "clusters_file": clusters_source or None,
            "images": len(ids),
            "photographs": photographs if cluster_of is not None else None,
            "photographs_in_several_test_folds": spanning,
            "bootstrap_resamples_kept": rates.resamples,
            "bootstrap_resamples": n_boot,
            "seed": seed,
        },
        "oof": [
            {
                "image_id": row.image_id,
                "fold": row.fold,
                "label": row.label,
                "probability": row.probability,
                "calibrated_probability": float(q),
                "threshold": fold_threshold[row.fold],
                "calibrated_threshold": threshold_after_platt(fold_threshold[row.fold], params),
                "flagged": bool(row.probability >= fold_threshold[row.fold]),
            }
            for row, q in zip(oof, calibrated)
        ],
    }
    return CalibrationOutcome(params, threshold, operating_point, calibration, report)


def _groups_spanning_folds(groups: Sequence[Any], folds: np.ndarray) -> int:
    seen: Dict[Any, set] = defaultdict(set)
    for group, fold in zip(groups, folds.tolist()):
        seen[group].add(fold)
    return sum(1 for found in seen.values() if len(found) > 1)


def _none_if_nan(value: float) -> Optional[float]:
    return None if math.isnan(value) else value


def apply_to_model(
    model_path: Path,
    out_path: Path,
    outcome: CalibrationOutcome,
) -> Dict[str, Any]:
    """Fold the calibration into ``model_path``, write the metadata, check the result; return what was done."""
    from service.model_info import ModelInfo, file_sha256
    from training.export import operating_metadata

    original = Path(model_path).read_bytes()
    sha_before = file_sha256(Path(model_path))
    props = operating_metadata(outcome.threshold, outcome.operating_point, outcome.calibration)
    out_path = Path(out_path)
    # checked before it replaces anything: --out is often --model itself
    staged = out_path.with_name(out_path.name + ".calibrating")
    try:
        fold_platt_into_onnx(model_path, staged, outcome.params, props)
        difference = check_folded(original, staged, outcome.params)
        if math.isfinite(difference) and difference > 1e-5:
            raise ValueError("the folded model differs from Platt on the original by {:.2e} (> 1e-5)".format(difference))
        info = ModelInfo.from_onnx(staged)  # the service reads it back as it will at start
        if info.operating_point != outcome.operating_point or info.calibration != outcome.calibration:
            raise ValueError("the metadata read back from {} is not what was written".format(staged))
        os.replace(str(staged), str(out_path))
    finally:
        if staged.exists():
            staged.unlink()
    return {
        "src": str(model_path),
        "out": str(out_path),
        "sha256_before": sha_before,
        "sha256_after": info.sha256,
        "max_abs_difference_vs_platt": _none_if_nan(difference),
    }


def predict_folds(folds_path: Path, fold_models_dir: Path, data_dir: Path, batch: int = 32) -> Tuple[List[Prediction], List[Prediction]]:
    """Each fold model's predictions on its test split (out of fold) and on its validation split.

    For runs whose training wrote no validation predictions: the fold models
    (``<fold_models_dir>/fold<k>/model.onnx``, as ``training/train.py`` exports them) score the
    images ``folds.json`` lists, through the service's preprocessing with each model's own
    metadata, on ONNX Runtime, the runtime the service falls back to. Returns (oof, validation).
    """
    import onnxruntime as ort

    from service.model_info import INPUT_NAME, ModelInfo
    from service.preprocess import preprocess_roi
    from training.data import read_records

    folds = json.loads(Path(folds_path).read_text())["folds"]
    records = {record.image_id: record for record in read_records(Path(data_dir))}
    tensors: Dict[Tuple[str, str], np.ndarray] = {}
    oof: List[Prediction] = []
    validation: List[Prediction] = []
    for entry in folds:
        fold = int(entry["fold"])
        model_path = Path(fold_models_dir) / "fold{}".format(fold) / "model.onnx"
        info = ModelInfo.from_onnx(model_path)
        spec_key = json.dumps(info.spec.to_metadata(), sort_keys=True)
        options = ort.SessionOptions()
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for split, out in (("test_ids", oof), ("val_ids", validation)):
            ids = [str(i) for i in entry[split]]
            unknown = [i for i in ids if i not in records]
            if unknown:
                raise ValueError("{} fold {} {}: {} not in {}".format(folds_path, fold, split, unknown[:3], data_dir))
            for start in range(0, len(ids), batch):
                chunk = ids[start : start + batch]
                for image_id in chunk:
                    if (image_id, spec_key) not in tensors:
                        tensors[(image_id, spec_key)] = preprocess_roi(records[image_id].path.read_bytes(), None, info.spec).tensor[0]
                images = np.stack([tensors[(i, spec_key)] for i in chunk]).astype(np.float32)
                probs = np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: images})[0], dtype=np.float64).reshape(-1)
                out.extend(Prediction(i, fold, records[i].label, float(q)) for i, q in zip(chunk, probs))
    return oof, validation


def write_predictions(path: Path, rows: Sequence[Prediction]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "fold", "label", "probability"])
        for row in sorted(rows, key=lambda r: (r.fold, r.image_id)):
            writer.writerow([row.image_id, row.fold, row.label, "{:.8f}".format(row.probability)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.calibration",
        description="Choose the operating point, calibrate, and fold both into the ONNX model.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    apply = commands.add_parser("apply", help="fit Platt, choose the threshold, measure, fold into the model")
    apply.add_argument("--model", type=Path, required=True, help="the final FP32 ONNX model, uncalibrated")
    apply.add_argument("--oof", type=Path, required=True, help="out-of-fold predictions CSV: image_id,fold,label,probability")
    apply.add_argument("--val", type=Path, required=True, help="per-fold validation predictions CSV: image_id,fold,label,probability")
    apply.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY)
    apply.add_argument("--clusters", type=Path, default=None, help="duplicate_clusters.json: bootstrap over photographs")
    apply.add_argument("--out", type=Path, required=True, help="where to write the calibrated model (may be --model)")
    apply.add_argument("--report", type=Path, required=True, help="JSON report (per fold, per image, Brier, reliability)")
    apply.add_argument("--plot", type=Path, default=None, help="reliability plot PNG, before and after")
    apply.add_argument("--n-boot", type=int, default=DEFAULT_BOOTSTRAP)
    apply.add_argument("--seed", type=int, default=0)
    apply.add_argument("--bins", type=int, default=10)
    predict = commands.add_parser("predict", help="score each fold model's test and validation splits (ONNX Runtime)")
    predict.add_argument("--folds", type=Path, required=True, help="folds.json (fold, train_ids, val_ids, test_ids)")
    predict.add_argument("--fold-models", type=Path, required=True, help="directory holding fold<k>/model.onnx (runs/cv)")
    predict.add_argument("--data-dir", type=Path, required=True, help="the CP-AnemiC folder")
    predict.add_argument("--val-out", type=Path, required=True, help="validation predictions CSV for apply --val")
    predict.add_argument("--oof-out", type=Path, required=True, help="out-of-fold predictions CSV for apply --oof")
    args = parser.parse_args(argv)
    if args.command == "predict":
        return predict_command(args)

    try:
        oof = read_predictions(args.oof)
        validation = read_predictions(args.val)
        cluster_of = read_clusters(args.clusters) if args.clusters else None
        outcome = calibrate_predictions(
            oof, validation, args.target_sensitivity, cluster_of, str(args.clusters or ""), args.n_boot, args.seed, args.bins
        )
        outcome.report["model"] = apply_to_model(args.model, args.out, outcome)
    except (ValueError, OSError, KeyError, EngineError) as exc:
        print("calibration apply: {}".format(exc), file=sys.stderr)
        return 2
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(outcome.report, indent=1, sort_keys=True) + "\n")
    if args.plot:
        labels = [row.label for row in oof]
        probs = np.asarray([row.probability for row in oof])
        plot_reliability(
            args.plot, labels, {"before calibration": probs, "after Platt": apply_platt(probs, outcome.params)}, args.bins,
            title="Out-of-fold reliability ({} images)".format(len(oof)),
        )
    point = outcome.operating_point
    print("Platt: slope {:.4f}, intercept {:.4f}; Brier {:.4f} -> {:.4f} (cross-fold {:.4f})".format(
        outcome.params.slope, outcome.params.intercept, outcome.calibration.brier_before,
        outcome.calibration.brier_after, outcome.calibration.brier_after_cross_fold or float("nan")))
    print("threshold {:.6f} (uncalibrated {:.6f}) for target sensitivity {:g}".format(
        outcome.threshold, outcome.report["threshold"]["uncalibrated"], point.target_sensitivity))
    print("sensitivity {:.3f} [{:.3f}, {:.3f}], specificity {:.3f} [{:.3f}, {:.3f}]: {}".format(
        point.sensitivity.value, point.sensitivity.ci_low, point.sensitivity.ci_high,
        point.specificity.value, point.specificity.ci_low, point.specificity.ci_high, point.interval))
    print("wrote {} (sha256 {}), {}{}".format(
        args.out, outcome.report["model"]["sha256_after"][:12], args.report, ", " + str(args.plot) if args.plot else ""))
    print("the engines and the INT8 twin were made from the old file: rebuild them (build_engines.py)")
    return 0


def predict_command(args: argparse.Namespace) -> int:
    from training.data import DataError

    try:
        oof, validation = predict_folds(args.folds, args.fold_models, args.data_dir)
    except (ValueError, OSError, KeyError, EngineError, DataError) as exc:
        print("calibration predict: {}".format(exc), file=sys.stderr)
        return 2
    write_predictions(args.oof_out, oof)
    write_predictions(args.val_out, validation)
    print("wrote {} ({} out-of-fold predictions) and {} ({} validation predictions)".format(
        args.oof_out, len(oof), args.val_out, len(validation)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
