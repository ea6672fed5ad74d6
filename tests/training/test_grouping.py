"""Grouped folds: no cluster spans train, validation and test; a photograph counts once per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from training.grouping import check_grouped, cluster_ids, grouped_folds, one_per_cluster
from training.metrics import bootstrap_metrics


def synthetic_clusters(n_clusters: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 1, 1, 2, 3, 8], n_clusters)
    groups = np.repeat(np.arange(n_clusters), sizes)
    labels = np.repeat(rng.integers(0, 2, n_clusters), sizes)
    return labels, groups


def test_no_cluster_spans_two_splits_of_any_fold() -> None:
    labels, groups = synthetic_clusters()
    folds = grouped_folds(labels, groups, n_folds=5, val_fraction=0.15, seed=42)
    tested = sorted(i for fold in folds for i in fold["test"])
    assert tested == list(range(len(labels)))  # every image tested exactly once
    for fold in folds:
        split_of = {}
        for split in ("train", "val", "test"):
            for index in fold[split]:
                assert split_of.setdefault(groups[index], split) == split
        assert fold["val"] and set(labels[fold["val"]]) == {0, 1}


def test_check_grouped_refuses_a_leaky_fold() -> None:
    groups = np.array([0, 0, 1, 2])
    with pytest.raises(ValueError, match="cluster 0 is in both train and test"):
        check_grouped([{"train": [0, 2], "val": [], "test": [1, 3]}], groups)


def test_cluster_ids_names_missing_images() -> None:
    with pytest.raises(ValueError, match="Image_9"):
        cluster_ids(["Image_1", "Image_9"], {"Image_1": 0})


def test_one_per_cluster_draws_each_photograph_once() -> None:
    groups = np.array([0, 0, 0, 1, 2, 2])
    seen = set()
    for seed in range(20):
        drawn = one_per_cluster([0, 1, 2, 3, 4, 5], groups, np.random.default_rng(seed))
        assert sorted(groups[drawn].tolist()) == [0, 1, 2]
        seen.update(drawn.tolist())
    assert seen == {0, 1, 2, 3, 4, 5}  # every copy gets its turn


def test_cluster_bootstrap_is_wider_than_image_bootstrap_when_copies_repeat() -> None:
    rng = np.random.default_rng(1)
    labels_one = rng.integers(0, 2, 40)
    probs_one = np.clip(labels_one * 0.2 + rng.uniform(0, 0.8, 40), 0, 1)
    # every photograph listed 10 times: 400 images, the same 40 pieces of evidence
    labels, probs, groups = np.repeat(labels_one, 10), np.repeat(probs_one, 10), np.repeat(np.arange(40), 10)
    by_image = bootstrap_metrics(labels, probs, np.full(400, 0.5), n_boot=300, seed=0)["auc"]
    by_cluster = bootstrap_metrics(labels, probs, np.full(400, 0.5), n_boot=300, seed=0, groups=groups)["auc"]
    assert by_cluster["value"] == by_image["value"]
    width = lambda e: e["ci_high"] - e["ci_low"]  # noqa: E731
    assert width(by_cluster) > 2 * width(by_image)


def test_the_memorising_baseline_recalls_copies_and_nothing_else() -> None:
    from training.baselines import NearestNeighbourMemoriser

    rng = np.random.default_rng(3)
    train = rng.normal(size=(30, 20))
    train_labels = rng.integers(0, 2, 30)
    model = NearestNeighbourMemoriser().fit(train, train_labels)
    copies = model.predict_proba(train + rng.normal(scale=1e-3, size=train.shape))[:, 1]
    assert ((copies > 0.5) == (train_labels == 1)).all()  # a copy gets its twin's label
    assert np.allclose(model.predict_proba(train).sum(1), 1.0)


def test_the_committed_folds_never_split_a_photograph() -> None:
    import json
    from pathlib import Path

    from training.duplicates import DEFAULT_OUTPUT, load_clusters

    folds_path = Path(__file__).resolve().parents[2] / "models" / "cv" / "folds.json"
    clusters = load_clusters(DEFAULT_OUTPUT)
    payload = json.loads(folds_path.read_text())
    ids = sorted(clusters)
    position = {image_id: i for i, image_id in enumerate(ids)}
    groups = cluster_ids(ids, clusters)
    folds = [{split: [position[i] for i in fold[split + "_ids"]] for split in ("train", "val", "test")} for fold in payload["folds"]]
    check_grouped(folds, groups)
    assert sorted(i for fold in folds for i in fold["test"]) == list(range(len(ids)))
