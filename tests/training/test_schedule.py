"""Training schedules: the stages, their learning rates, resume across stages, the final fit's epochs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import List

import pytest

from training.data import DEFAULT_DATA_DIR
from training.train import FoldResult, Stage, TrainConfig, final_stage_epochs, main, schedule_stages


def test_study_schedule_is_one_stage_at_the_configured_rate() -> None:
    (stage,) = schedule_stages(TrainConfig(schedule="study", lr=2e-4, max_epochs=30, patience=7))
    assert (stage.trains, stage.lr, stage.max_epochs, stage.patience) == ("tail", 2e-4, 30, 7)
    assert [stage.lr_at(e) for e in (1, 15, 30)] == [2e-4] * 3


def test_three_stage_schedule_head_then_lower_rate_then_aggressive() -> None:
    head, fine, aggressive = schedule_stages(TrainConfig(schedule="three-stage", lr=1e-4, max_epochs=40, patience=10))
    assert (head.trains, fine.trains, aggressive.trains) == ("head", "tail", "tail")
    assert head.lr == pytest.approx(1e-3) and fine.lr == pytest.approx(1e-5) and aggressive.lr == pytest.approx(3e-4)
    assert aggressive.max_epochs == 40 > fine.max_epochs


def test_cosine_stage_warms_up_peaks_and_decays_to_one_percent() -> None:
    stage = Stage("aggressive", "tail", lr=3e-4, max_epochs=12, patience=5, warmup_epochs=2, cosine=True)
    rates = [stage.lr_at(e) for e in range(1, 13)]
    assert rates[0] == pytest.approx(1e-4) and rates[1] == pytest.approx(2e-4)
    assert rates[2] == pytest.approx(3e-4)  # the peak, right after warm-up
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))
    assert rates[-1] == pytest.approx(3e-6)
    assert stage.lr_at(7) == pytest.approx(3e-4 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 4 / 9))))


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_stages(TrainConfig(schedule="one-cycle"))


def _fold(stage_epochs: List[int], best_epoch: int = 0) -> FoldResult:
    return FoldResult(fold=0, best_epoch=best_epoch, epochs_run=0, threshold=0.5, val_f1=0.0, test_indices=[], test_probs=[], seconds=0.0, stage_epochs=stage_epochs)


def test_final_fit_replays_the_median_epochs_of_each_stage() -> None:
    folds = [_fold([3, 0, 12]), _fold([5, 2, 8]), _fold([4, 6, 20])]
    assert final_stage_epochs(folds, 3) == [4, 2, 12]
    # folds written before stages existed carry only best_epoch
    assert final_stage_epochs([_fold([], best_epoch=11), _fold([], best_epoch=17), _fold([], best_epoch=15)], 1) == [15]
    with pytest.raises(ValueError):
        final_stage_epochs(folds, 1)


@pytest.mark.skipif(not (DEFAULT_DATA_DIR / "Anemia_Data_Collection_Sheet.csv").is_file(), reason="CP-AnemiC not found at {}".format(DEFAULT_DATA_DIR))
def test_three_stage_run_trains_each_stage_and_resumes(tmp_path: Path) -> None:
    run_dir, cv_dir, output = tmp_path / "runs", tmp_path / "cv", tmp_path / "model.onnx"
    args = ["--subset", "16", "--width", "0.35", "--no-pretrained", "--input-size", "64", "--input-height", "32", "--colour-pretrain-steps", "50", "--epochs", "4", "--patience", "2",
            "--folds", "2", "--bootstrap", "20", "--bank-views", "1", "--no-progress", "--threads", "2", "--schedule", "three-stage",
            "--run-dir", str(run_dir), "--cv-dir", str(cv_dir), "--output", str(output), "--no-final"]
    assert main(args) == 0
    result = json.loads((run_dir / "cv" / "fold0" / "result.json").read_text())
    stages_seen = [int(r["stage"]) for r in result["history"]]
    assert stages_seen == sorted(stages_seen) and set(stages_seen) == {0, 1, 2}
    assert len(result["stage_epochs"]) == 3
    # the head stage trains at 10x lr, the fine-tune stage at lr/10
    first_of = {s: next(r for r in result["history"] if int(r["stage"]) == s) for s in (0, 1)}
    assert first_of[0]["lr"] == pytest.approx(1e-3) and first_of[1]["lr"] == pytest.approx(1e-5)

    # an interrupted fold resumes in the stage it stopped in, from its checkpoint
    (run_dir / "cv" / "fold1" / "result.json").unlink()
    assert (run_dir / "cv" / "fold1" / "checkpoint.pt").is_file()
    assert main(args[:-1]) == 0  # and this time with the final fit
    final = json.loads((cv_dir / "final.json").read_text())
    assert final["schedule"] == "three-stage" and len(final["stage_epochs"]) == 3
    assert "fold 1: resumed" in (run_dir / "progress.log").read_text()
    assert output.is_file()


@pytest.mark.skipif(not (DEFAULT_DATA_DIR / "Anemia_Data_Collection_Sheet.csv").is_file(), reason="CP-AnemiC not found at {}".format(DEFAULT_DATA_DIR))
def test_same_arguments_give_the_same_out_of_fold_predictions(tmp_path: Path) -> None:
    """Seeds cover the initial weights, batches, augmentation and dropout.

    Multi-threaded bf16 kernels may still differ in the last bits (seen: 5e-5); an unseeded head
    moves the probabilities by about 0.05.
    """
    oof = []
    for name in ("first", "second"):
        out = tmp_path / name
        args = ["--subset", "16", "--width", "0.35", "--no-pretrained", "--input-size", "64", "--input-height", "32", "--colour-pretrain-steps", "50", "--epochs", "2", "--folds", "2",
                "--bootstrap", "10", "--bank-views", "1", "--no-progress", "--threads", "2", "--no-final",
                "--run-dir", str(out / "runs"), "--cv-dir", str(out / "cv"), "--output", str(out / "m.onnx")]
        assert main(args) == 0
        with open(out / "cv" / "oof_predictions.csv") as handle:
            oof.append({row["image_id"]: float(row["probability"]) for row in csv.DictReader(handle)})
    assert oof[0].keys() == oof[1].keys()
    assert max(abs(oof[0][k] - oof[1][k]) for k in oof[0]) < 1e-3
