"""The build_engines.py command line: build, quantize, evaluate (out-of-fold and engines), benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import numpy as np
import pytest

import build_engines
from service.engines import EngineManifest
from service.preprocess import PreprocessSpec
from engine_build.quantization import graph as g
from evaluation.oof import labelled_images
from tests.images import conjunctiva_rgba, encode
from tests.model_factory import make_test_model

SPEC = PreprocessSpec(input_size=32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CP-AnemiC-shaped folder: RGBA crops, anemic ones paler (less red)."""
    root = tmp_path_factory.mktemp("cp")
    for folder, label in (("Anemic", 1), ("Non-anemic", 0)):
        (root / folder).mkdir()
        for i in range(6):
            image = conjunctiva_rgba(width=60, height=30, seed=10 * label + i, red=120 if label else 220)
            (root / folder / "Image_{:03d}.png".format(100 * label + i)).write_bytes(encode(image))
    return root


@pytest.fixture(scope="module")
def folds(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    directory = tmp_path_factory.mktemp("cv")
    ids = sorted(labelled_images(dataset))
    halves = [ids[0::2], ids[1::2]]
    payload = {"folds": [{"fold": k, "train_ids": halves[1 - k][:4], "val_ids": halves[1 - k][4:], "test_ids": halves[k]} for k in range(2)]}
    (directory / "folds.json").write_text(json.dumps(payload))
    for k in range(2):
        make_test_model(directory / "fold{}".format(k) / "model.onnx", seed=k, width=8, spec=SPEC, threshold=0.5)
    return {"folds": directory / "folds.json", "pattern": directory / "fold{k}" / "model.onnx", "dir": directory}


@pytest.mark.slow
def test_build_all_then_if_missing_then_benchmark(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = make_test_model(tmp_path / "anemia.onnx", width=8, spec=SPEC)
    engines = tmp_path / "engines"
    assert build_engines.main(["--model", str(model), "--engine-dir", str(engines), "--precision", "int8"]) == 1
    assert "no calibrated INT8 model" in capsys.readouterr().err
    assert build_engines.main(["quantize", "--model", str(model), "--calibration-dir", str(dataset), "--calibration-limit", "6"]) == 0
    assert (tmp_path / "anemia.int8.onnx").is_file()
    common = ["--model", str(model), "--engine-dir", str(engines), "--calibration-dir", str(dataset), "--calibration-limit", "4"]
    assert build_engines.main(common + ["--precision", "all"]) == 0
    manifest = EngineManifest.load(engines)
    assert sorted(e.precision for e in manifest.entries) == ["fp16", "fp32", "int4", "int8"]
    stamps = {e.file: (engines / e.file).stat().st_mtime_ns for e in manifest.entries}
    assert build_engines.main(common + ["--precision", "all", "--if-missing"]) == 0
    assert {f: (engines / f).stat().st_mtime_ns for f in stamps} == stamps
    capsys.readouterr()
    assert build_engines.main(["benchmark", "--model", str(model), "--engine-dir", str(engines), "--runs", "3", "--threads", "1"]) == 0
    table = capsys.readouterr().out
    for precision in ("fp32", "fp16", "int8", "int4"):
        assert "| {} |".format(precision) in table


def test_defaults_shared_with_the_server_come_from_its_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANEMIA_MODEL", str(tmp_path / "m.onnx"))
    monkeypatch.setenv("ANEMIA_ENGINE_DIR", str(tmp_path / "e"))
    monkeypatch.setenv("ANEMIA_MAX_BATCH", "12")
    monkeypatch.setenv("ANEMIA_INTRA_OP_THREADS", "3")
    parsers = build_engines.build_parser()
    build = parsers["build"].parse_args([])
    assert (build.model, build.engine_dir, build.max_batch) == (tmp_path / "m.onnx", tmp_path / "e", 12)
    assert parsers["benchmark"].parse_args([]).threads == 3


def test_a_bad_setting_stops_the_command_naming_the_variable(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("ANEMIA_MAX_BATCH", "zero")
    assert build_engines.main(["--precision", "fp32"]) == 2
    assert "ANEMIA_MAX_BATCH" in capsys.readouterr().err


def test_quantize_on_one_folds_training_images(dataset: Path, folds: Dict[str, Path], tmp_path: Path) -> None:
    model = Path(str(folds["pattern"]).format(k=0))
    out = tmp_path / "q.onnx"
    argv = ["quantize", "--model", str(model), "--calibration-dir", str(dataset), "--folds", str(folds["folds"]), "--fold", "0",
            "--method", "minmax", "--keep-float", "classifier", "--out", str(out)]
    assert build_engines.main(argv) == 0
    import onnx

    meta = g.quantization_metadata(onnx.load(str(out)))
    assert meta["calibration_images"] == 6 and "fold 0 train+val" in meta["calibration"]
    assert meta["kept_float"] == ["classifier"]


@pytest.mark.slow
def test_out_of_fold_evaluation_scores_each_image_once_with_models_that_never_saw_it(
    dataset: Path, folds: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "report"
    argv = ["evaluate", "--data-dir", str(dataset), "--folds", str(folds["folds"]), "--fold-models", str(folds["pattern"]),
            "--out-dir", str(out), "--bootstrap", "20", "--calibration-limit", "4", "--threads", "1",
            "--oof-csv", str(tmp_path / "none.csv"), "--int8-variants", "minmax+bc"]
    assert build_engines.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["image_ids"]) == sorted(labelled_images(dataset)) and report["folds_used"] == [0, 1]
    assert set(report["results"]) == {"fp32", "fp16", "int8", "int8[qdq-form]", "int4", "int8[minmax+bc]"}
    # FP32 row = each fold model on its own test images, recomputed here independently
    from engine_build.quantization.calibration import load_tensors

    images = labelled_images(dataset)
    payload = json.loads(folds["folds"].read_text())
    y, p = [], []
    for fold in payload["folds"]:
        session = g.session(str(folds["pattern"]).format(k=fold["fold"]))
        p += list(g.run_batches(session, load_tensors([images[i][0] for i in fold["test_ids"]], SPEC)))
        y += [images[i][1] for i in fold["test_ids"]]
    expected = float(np.mean((np.asarray(p) >= 0.5) == np.asarray(y)))
    assert report["results"]["fp32"]["metrics"]["accuracy"] == pytest.approx(expected)
    # INT8's agreement with FP32, recomputed from the per-fold scores the evaluation cached
    cached = {}
    for fold in payload["folds"]:
        for scores in (out / "fold{}".format(fold["fold"])).glob("scores-*.json"):
            entry = json.loads(scores.read_text())
            cached.setdefault(entry["options"]["variant"], []).extend(entry["probs"])
    same = (np.asarray(cached["fp32"]) >= 0.5) == (np.asarray(cached["int8"]) >= 0.5)
    assert report["results"]["int8"]["agreement"]["same_label"] == pytest.approx(float(same.mean()))
    assert set(report["latency"]) == set(report["results"])
    assert report["layers"]["int8"] and (out / "roc.png").stat().st_size > 0 and (out / "pr.png").is_file()
    markdown = (out / "report.md").read_text()
    assert "| int8 |" in markdown
    assert "Command: `{}`".format(build_engines.command_line(argv)) in markdown and report["command"].startswith("python build_engines.py evaluate --data-dir ")
    assert report["command"].endswith("--int8-variants minmax+bc")  # what was run, not pytest's own argv

    # judged at the operating point instead: each fold's own threshold from the calibration report
    fold_thresholds = {0: 0.3, 1: 0.7}
    calibration_report = tmp_path / "calibration.json"
    calibration_report.write_text(json.dumps({"target_sensitivity": 0.9, "per_fold": [
        {"fold": k, "threshold_uncalibrated": t} for k, t in fold_thresholds.items()]}))
    assert build_engines.main(argv + ["--operating-point", str(calibration_report)]) == 0
    at_point = json.loads((out / "report.json").read_text())
    t = np.asarray([fold_thresholds[fold["fold"]] for fold in payload["folds"] for _ in fold["test_ids"]])
    assert at_point["results"]["fp32"]["metrics"]["accuracy"] == pytest.approx(float(np.mean((np.asarray(p) >= t) == np.asarray(y))))
    same_at_point = (np.asarray(cached["fp32"]) >= t) == (np.asarray(cached["int8"]) >= t)
    assert at_point["results"]["int8"]["agreement"]["same_label"] == pytest.approx(float(same_at_point.mean()))
