"""The training pipeline end to end on a tiny subset: CV, OOF files, final export, service contract."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.model_info import INPUT_NAME, OUTPUT_NAME, ModelInfo
from training.data import DEFAULT_DATA_DIR, load_dataset
from training.train import main

pytestmark = pytest.mark.skipif(
    not (DEFAULT_DATA_DIR / "Anemia_Data_Collection_Sheet.csv").is_file(),
    reason="CP-AnemiC not found at {}".format(DEFAULT_DATA_DIR),
)
# The shipped recipe (colour branch, pre-training, selection on AUC) on a tiny canvas with few steps.
TINY = ["--subset", "16", "--width", "0.35", "--no-pretrained", "--input-size", "64", "--input-height", "32", "--epochs", "1",
        "--folds", "2", "--bootstrap", "20", "--bank-views", "2", "--no-progress", "--threads", "2", "--colour-pretrain-steps", "50"]


@pytest.mark.slow
def test_tiny_cross_validation_and_export(tmp_path: Path) -> None:
    run_dir, cv_dir, output = tmp_path / "runs", tmp_path / "cv", tmp_path / "model.onnx"
    args = TINY + ["--run-dir", str(run_dir), "--cv-dir", str(cv_dir), "--output", str(output)]
    assert main(args) == 0

    folds = json.loads((cv_dir / "folds.json").read_text())["folds"]
    assert len(folds) == 2
    tested = [i for fold in folds for i in fold["test_ids"]]
    assert len(tested) == len(set(tested)) == 16  # every image is tested exactly once
    for fold in folds:
        parts = [set(fold["train_ids"]), set(fold["val_ids"]), set(fold["test_ids"])]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])

    with open(cv_dir / "oof_predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image_id"] for r in rows] == sorted(tested)
    assert set(rows[0]) >= {"image_id", "fold", "label", "hb", "probability", "threshold"}
    for row in rows:
        assert (float(row["hb"]) < 11.0) == (row["label"] == "1")
        assert 0.0 <= float(row["probability"]) <= 1.0

    metrics = json.loads((cv_dir / "cv_metrics.json").read_text())
    assert metrics["n_images"] == 16
    assert set(metrics["pooled_oof"]) == {"loss", "accuracy", "precision", "recall", "specificity", "f1", "auc"}
    assert {"gender", "age_band", "hospital"} <= set(metrics["subgroups"])

    # the final model carries the service's contract and serves the subset
    info = ModelInfo.from_onnx(output)
    final = json.loads((cv_dir / "final.json").read_text())
    assert info.name == "anemia-mobilenetv2"
    assert info.threshold == pytest.approx(final["threshold"])
    assert info.spec.chw == (3, 32, 64)
    assert json.loads(info.metadata["cv_metrics"])["folds"] == 2
    assert len(info.metadata["training_data_sha256"]) == 64
    data = load_dataset(DEFAULT_DATA_DIR, info.spec, limit=16)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    probs = session.run([OUTPUT_NAME], {INPUT_NAME: data.images.numpy()})[0]
    assert probs.shape == (16, 1) and probs.dtype == np.float32
    assert session.get_inputs()[0].shape[0] == "N"  # dynamic batch
    for k in range(2):
        assert ModelInfo.from_onnx(run_dir / "cv" / "fold{}".format(k) / "model.onnx").metadata["cv_fold"] == str(k)

    # a second run resumes: the folds are read back, not retrained, and the OOF file is unchanged
    before = (cv_dir / "oof_predictions.csv").read_text()
    assert main(args + ["--no-final"]) == 0
    assert (cv_dir / "oof_predictions.csv").read_text() == before
    assert "already done" in (run_dir / "progress.log").read_text()


@pytest.mark.slow
def test_tiny_run_with_wide_canvas_and_colour_branch(tmp_path: Path) -> None:
    """The variant pieces of issue 13 on tiny data: a 32 x 64 canvas, the in-graph colour branch
    (standardized on the training images), selection on validation AUC, through to the export."""
    run_dir, cv_dir, output = tmp_path / "runs", tmp_path / "cv", tmp_path / "model.onnx"
    args = TINY + ["--input-height", "32", "--colour-hidden", "4", "--head-lr-mult", "10", "--select-on", "auc",
                   "--run-dir", str(run_dir), "--cv-dir", str(cv_dir), "--output", str(output)]
    assert main(args) == 0
    info = ModelInfo.from_onnx(output)
    assert info.spec.chw == (3, 32, 64)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 32, 64]
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(output))
    assert any("/colour/" in node.name for node in proto.graph.node)
    # the standardization constants are the training images' statistics, not the initial 0 / 1
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    std = next(v for k, v in inits.items() if k.endswith("stat_std"))
    assert std.shape == (22,) and not np.allclose(std, 1.0)
    data = load_dataset(DEFAULT_DATA_DIR, info.spec, limit=16)
    probs = session.run([OUTPUT_NAME], {INPUT_NAME: data.images.numpy()})[0]
    assert probs.shape == (16, 1) and np.all((probs >= 0) & (probs <= 1))
    history = json.loads((run_dir / "cv" / "fold0" / "result.json").read_text())["history"]
    assert "val_auc" in history[0]
