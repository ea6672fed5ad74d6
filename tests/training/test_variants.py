"""The variants table: validation AUC per fold from the validation predictions, OOF from cv_metrics."""

from __future__ import annotations

import json
from pathlib import Path

from training.variants import markdown, summarize_run


def _fake_run(run_dir: Path) -> None:
    cv = run_dir / "cv"
    cv.mkdir(parents=True)
    # fold 0 ranks its validation images perfectly (AUC 1), fold 1 exactly backwards (AUC 0)
    rows = ["image_id,fold,label,probability"]
    rows += ["a{},0,{},{}".format(i, label, p) for i, (label, p) in enumerate([(0, 0.1), (0, 0.2), (1, 0.8), (1, 0.9)])]
    rows += ["b{},1,{},{}".format(i, label, p) for i, (label, p) in enumerate([(0, 0.9), (0, 0.8), (1, 0.2), (1, 0.1)])]
    (cv / "val_predictions.csv").write_text("\n".join(rows) + "\n")
    pooled = {name: {"value": v, "ci_low": v - 0.1, "ci_high": v + 0.1} for name, v in (("auc", 0.7), ("accuracy", 0.65))}
    per_fold = [{"fold": 0, "best_epoch": 0}, {"fold": 1, "best_epoch": 7}]
    config = {"input_size": 224, "input_height": 96, "colour_hidden": 64}
    (cv / "cv_metrics.json").write_text(json.dumps({"pooled_oof": pooled, "per_fold": per_fold, "config": config}))


def test_summary_reads_validation_per_fold_and_pooled_oof(tmp_path: Path) -> None:
    _fake_run(tmp_path / "run")
    summary = summarize_run("fused", tmp_path / "run" / "cv")
    assert summary["val_auc_per_fold"] == [1.0, 0.0] and summary["val_auc_mean"] == 0.5
    assert summary["oof_auc"] == [0.7, 0.6, 0.8] and summary["best_epochs"] == [0, 7]
    row = markdown([summary]).splitlines()[-1]
    assert row.startswith("| fused | 96x224 | 0.500 (1.00 0.00) | 0.700 [0.600, 0.800] |")
