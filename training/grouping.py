"""Folds grouped by photograph: no duplicate cluster ever spans train, validation and test.

The clusters come from :mod:`training.duplicates` (``models/cv/duplicate_clusters.json``). Test
folds are stratified over clusters (``StratifiedGroupKFold``); inside each fold's training part,
the validation split is carved by cluster too, so early stopping, thresholds and calibration never
see a copy of a test photograph, nor the training loss a copy of a validation one.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

SPLITS = ("train", "val", "test")


def cluster_ids(image_ids: Sequence[str], clusters: Mapping[str, int]) -> np.ndarray:
    """The cluster id of each image; an image missing from the cluster file is an error."""
    missing = [i for i in image_ids if i not in clusters]
    if missing:
        raise ValueError(
            "{} images have no duplicate cluster (first: {}); rerun `python -m training.duplicates`".format(len(missing), ", ".join(missing[:5]))
        )
    return np.asarray([clusters[i] for i in image_ids], dtype=np.int64)


def grouped_folds(labels: np.ndarray, groups: np.ndarray, n_folds: int, val_fraction: float, seed: int) -> List[Dict[str, List[int]]]:
    """``n_folds`` folds of {"train", "val", "test"} image indices, every split a union of whole clusters.

    The validation split is one of ``round(1 / val_fraction)`` stratified group splits of the
    fold's training part (about ``val_fraction`` of it).
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    outer = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds: List[Dict[str, List[int]]] = []
    for k, (train_all, test) in enumerate(outer.split(np.zeros(len(labels)), labels, groups)):
        # never more splits than either class has clusters (tiny subsets in tests)
        per_class = min(len(np.unique(groups[train_all][labels[train_all] == c])) for c in np.unique(labels))
        inner_splits = max(2, min(int(round(1.0 / val_fraction)), per_class))
        inner = StratifiedGroupKFold(n_splits=inner_splits, shuffle=True, random_state=seed + k)
        fit_part, val_part = next(inner.split(np.zeros(len(train_all)), labels[train_all], groups[train_all]))
        folds.append(
            {
                "train": sorted(int(i) for i in train_all[fit_part]),
                "val": sorted(int(i) for i in train_all[val_part]),
                "test": sorted(int(i) for i in test),
            }
        )
    check_grouped(folds, groups)
    return folds


def check_grouped(folds: Sequence[Mapping[str, Sequence[int]]], groups: np.ndarray) -> None:
    """Raise if any cluster has images in two splits of one fold, or in two test folds."""
    groups = np.asarray(groups)
    test_fold_of: Dict[int, int] = {}
    for k, fold in enumerate(folds):
        seen: Dict[int, str] = {}
        for split in SPLITS:
            for index in fold[split]:
                cluster = int(groups[index])
                if seen.setdefault(cluster, split) != split:
                    raise ValueError("fold {}: cluster {} is in both {} and {}".format(k, cluster, seen[cluster], split))
        for index in fold["test"]:
            cluster = int(groups[index])
            if test_fold_of.setdefault(cluster, k) != k:
                raise ValueError("cluster {} is in the test part of folds {} and {}".format(cluster, test_fold_of[cluster], k))


def one_per_cluster(indices: Sequence[int], groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One randomly chosen image of each cluster among ``indices``: a photograph counts once per epoch."""
    indices = np.asarray(indices)
    cluster_of = np.asarray(groups)[indices]
    order = rng.permutation(len(indices))  # random member first, then keep the first of each cluster
    _unique, first = np.unique(cluster_of[order], return_index=True)
    return np.sort(indices[order][first])
