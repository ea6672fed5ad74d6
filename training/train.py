"""Fine-tune MobileNetV2 with an in-graph colour branch on CP-AnemiC: grouped 5-fold CV, then a final fit.

``python -m training.train`` with its defaults reproduces ``models/MODEL_CARD.md``:

1. Five folds grouped by photograph (duplicate clusters, seed 42); in each fold a grouped 15% of
   the training folds is carved out as validation. Early stopping (patience 10), the best epoch
   (validation AUC) and the decision threshold (max F1 on validation) use only it, never the test
   fold.
2. The model: MobileNetV2 on a 96 x 224 canvas (the crops are about 2.6:1), ImageNet weights,
   ``features.0..6`` frozen (a feature bank of augmented views), and a colour branch
   (:mod:`training.colour_head`) whose 22 ROI statistics are computed inside the graph. The
   branch is fitted first on the training split (``colour_pretrain_steps``), so epoch 0 is the
   colour model alone; the CNN's epochs must then beat it on validation to be kept.
3. The test fold's probabilities form the out-of-fold (OOF) predictions; metrics per fold and
   pooled, with 95% intervals from a bootstrap over photographs, and subgroups.
4. Final model: all images, the colour branch fitted the same way, then the median of the folds'
   best epoch counts, with the median of the folds' validation thresholds; exported to ONNX with
   the service's contract.

Every epoch writes a checkpoint; an interrupted run continues where it stopped when started
again with the same arguments (``--no-resume`` starts over). Seeds are fixed per fold and epoch,
so a resumed run draws the same batches and augmentations as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from service.preprocess import PreprocessSpec
from training.colour_head import ColourBranch, colour_statistics
from training.data import DEFAULT_DATA_DIR, AugmentConfig, Dataset, augment_batch, load_dataset
from training.duplicates import DEFAULT_OUTPUT as DEFAULT_CLUSTERS
from training.duplicates import load_clusters
from training.export import export_onnx
from training.grouping import cluster_ids, grouped_folds, one_per_cluster
from training.metrics import bootstrap_metrics, choose_threshold, point_metrics, subgroup_table
from training.mobilenetv2 import MobileNetV2
from training.tflite_weights import DEFAULT_TFLITE_PATH, load_imagenet_weights, unfold_batchnorm

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("training")


@dataclass
class TrainConfig:
    data_dir: str = str(DEFAULT_DATA_DIR)
    weights: str = str(DEFAULT_TFLITE_PATH)
    run_dir: str = str(REPO_ROOT / "runs")  # checkpoints, per-fold models, logs (git-ignored)
    cv_dir: str = str(REPO_ROOT / "models" / "cv")  # folds.json, oof_predictions.csv, cv_metrics.json
    output: str = str(REPO_ROOT / "models" / "anemia_mobilenetv2.onnx")
    # duplicate clusters (python -m training.duplicates): folds, intervals and epochs work on them
    clusters: str = str(DEFAULT_CLUSTERS)
    version: str = "1.0.0"
    folds: int = 5
    seed: int = 42
    val_fraction: float = 0.15
    max_epochs: int = 40  # the study allows 150; 2 shared CPU cores allow this many (see the card)
    patience: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    width: float = 1.0
    input_size: int = 224  # canvas width
    # canvas height; 0: square. 96 x 224 fits the ~2.6:1 crops at 0.26 GFLOPs (224 x 224: 0.60)
    input_height: int = 96
    # hidden width of the in-graph colour-statistics branch (training.colour_head); 0: none
    colour_hidden: int = 64
    # the colour branch and the final Linear learn this many times faster than the CNN tail
    # (they start from scratch; the tail starts from ImageNet)
    head_lr_mult: float = 1.0
    # early stopping and the best epoch: validation F1 at 0.5 (the study's) or validation AUC
    select_on: str = "auc"
    # full-batch Adam steps that fit the colour branch (with a head that ignores the CNN) before
    # the CNN trains; the CNN then starts from a model that is already the colour model, and the
    # validation split decides whether its epochs add anything (epoch 0 is a candidate)
    colour_pretrain_steps: int = 1500
    subset: Optional[int] = None
    pretrained: bool = True
    color_aug: bool = False
    # bf16 autocast: ~1.7x faster on CPUs with AMX/AVX512-BF16 (see card), 27x SLOWER without them
    # (measured on a 2-core AVX2 EPYC: 6.4 s against 0.23 s per step), so it follows the hardware
    bf16: bool = field(default_factory=lambda: bf16_is_fast())
    channels_last: bool = True
    threads: int = 2
    # features.0..6 (to 28x28) stay ImageNet and frozen; 7..18 + head train (0 = everything)
    train_from: int = 7
    bank_views: int = 8  # augmented views per image precomputed through the frozen trunk
    final: bool = True
    resume: bool = True
    bootstrap: int = 2000
    calibration_images: int = 256  # BN statistics of the folded ImageNet weights (training images)
    progress: bool = True
    schedule: str = "study"  # see SCHEDULES; the model card compares them

    @property
    def stages(self) -> List["Stage"]:
        return schedule_stages(self)

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec(input_size=self.input_size, input_height=self.input_height)

    def __post_init__(self) -> None:
        if self.select_on not in SELECTION_METRICS:
            raise ValueError("select_on must be one of {}, got {!r}".format(SELECTION_METRICS, self.select_on))


@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    epochs_run: int
    threshold: float
    val_f1: float
    test_indices: List[int]
    test_probs: List[float]
    seconds: float
    # the validation split's predictions by the returned weights (operating point and calibration use them)
    val_indices: List[int] = field(default_factory=list)
    val_probs: List[float] = field(default_factory=list)
    history: List[Dict[str, float]] = field(default_factory=list)
    # per stage, the stage epoch of its last improvement of the validation best (final fit replays these)
    stage_epochs: List[int] = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    """One phase of training: which parameters learn, at what rate, for how many epochs."""

    name: str
    trains: str  # "tail": every parameter after the frozen trunk; "head": the classifier alone
    lr: float
    max_epochs: int
    patience: int
    warmup_epochs: int = 0
    cosine: bool = False  # linear warm-up, then cosine decay to 1% of lr at max_epochs

    def lr_at(self, stage_epoch: int) -> float:
        """Learning rate of 1-based ``stage_epoch``; a function of the epoch alone, so resuming needs no scheduler state."""
        if not self.cosine:
            return self.lr
        if stage_epoch <= self.warmup_epochs:
            return self.lr * stage_epoch / (self.warmup_epochs + 1)
        progress = (stage_epoch - self.warmup_epochs - 1) / max(1, self.max_epochs - self.warmup_epochs - 1)
        return self.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


SCHEDULES = ("study", "three-stage")
SELECTION_METRICS = ("f1", "auc")


def schedule_stages(cfg: "TrainConfig") -> List[Stage]:
    """``study``: the published recipe, Adam at ``lr`` until validation F1 stalls.

    ``three-stage`` (the MRI study's): the head alone on the frozen backbone at 10x ``lr``, then
    the whole trainable tail at ``lr``/10, then a longer run with warm-up to 3x ``lr`` and cosine
    decay. Each stage starts from the best validation weights so far.
    """
    if cfg.schedule == "study":
        return [Stage("study", "tail", cfg.lr, cfg.max_epochs, cfg.patience)]
    if cfg.schedule == "three-stage":
        return [
            Stage("head", "head", cfg.lr * 10, max(1, cfg.max_epochs // 4), max(1, cfg.patience // 2)),
            Stage("fine-tune", "tail", cfg.lr / 10, max(1, cfg.max_epochs // 2), max(1, cfg.patience // 2)),
            Stage("aggressive", "tail", cfg.lr * 3, cfg.max_epochs, cfg.patience, warmup_epochs=2, cosine=True),
        ]
    raise ValueError("unknown schedule {!r}; choose from {}".format(cfg.schedule, ", ".join(SCHEDULES)))


# ---------------------------------------------------------------------------------------------
# model and one epoch


def bf16_is_fast() -> bool:
    """True on a GPU and on CPUs with bf16 instructions (AMX or AVX512-BF16); else emulated and slow."""
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def make_model(cfg: TrainConfig) -> MobileNetV2:
    """The binary MobileNetV2 with the ImageNet backbone (BN still folded) and a fresh head."""
    colour = ColourBranch(cfg.spec, cfg.colour_hidden) if cfg.colour_hidden else None
    model = MobileNetV2(num_classes=1, width_mult=cfg.width, tf_padding=True, colour=colour)
    if cfg.pretrained:
        if cfg.width != 1.0:
            raise ValueError("ImageNet weights exist for width 1.0 only; use --no-pretrained with --width")
        load_imagenet_weights(model, cfg.weights)
    return model


class Tail(nn.Module):
    """What is trained: ``features[train_from:]``, pooling and the head, plus the colour branch.

    It shares its modules with the model it was split from. The colour branch reads statistics of
    the full input image, which the feature bank precomputes (``FeatureBank.colour``), so the tail
    takes them beside the trunk's output.
    """

    def __init__(self, model: MobileNetV2, train_from: int) -> None:
        super().__init__()
        self.blocks = model.features[train_from:]
        self.colour = model.colour
        self.cnn_dropout = model.cnn_dropout
        self.head = model.classifier

    def forward(self, x: torch.Tensor, colour_stats: Optional[torch.Tensor] = None) -> torch.Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool2d(self.blocks(x), 1), 1)
        if self.colour is not None:
            if colour_stats is None:
                raise ValueError("this model has a colour branch: pass the images' colour statistics")
            pooled = torch.cat([self.cnn_dropout(pooled), self.colour.from_stats(colour_stats)], 1)
        return self.head(pooled)


def split_model(model: MobileNetV2, train_from: int) -> Tuple[nn.Sequential, Tail]:
    """(frozen trunk ``features[:train_from]``, the trained :class:`Tail`); shared modules."""
    return model.features[:train_from], Tail(model, train_from)  # type: ignore[return-value]


@dataclass
class FeatureBank:
    """What the tail is trained on: the frozen trunk's outputs, computed once per image.

    ``clean`` holds the outputs for the unaugmented inputs (validation, test, BN statistics);
    ``augmented`` K more per image, each from an independent random augmentation of the input, so
    every epoch can draw a different view without running the trunk again. With ``train_from = 0``
    there is no trunk: ``clean`` is the images and augmentation happens on the fly.
    """

    clean: torch.Tensor  # N x C x H x W
    augmented: Optional[torch.Tensor]  # K x N x C x H x W, or None
    #: N x S colour statistics of the clean input images (training.colour_head); the geometric
    #: augmentations move pixels, not colours, so every view of an image shares them.
    colour: Optional[torch.Tensor] = None

    def colour_of(self, index: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self.colour is None else self.colour[index]


@torch.no_grad()
def build_feature_bank(cfg: TrainConfig, data: Dataset) -> FeatureBank:
    colour = colour_statistics(data.images, cfg.spec) if cfg.colour_hidden else None
    if cfg.train_from == 0:
        return FeatureBank(clean=data.images, augmented=None, colour=colour)
    key_source = json.dumps(
        [data.sha256, asdict(cfg.spec), cfg.train_from, cfg.bank_views, cfg.seed, cfg.color_aug, cfg.width, cfg.pretrained, Path(cfg.weights).name]
    )
    cache = Path(cfg.run_dir) / "cache" / "bank-{}.pt".format(hashlib.sha256(key_source.encode()).hexdigest()[:16])
    if cache.is_file():
        saved = torch.load(cache, weights_only=False)
        LOG.info("feature bank: read %s", cache)
        return FeatureBank(clean=saved["clean"], augmented=saved["augmented"], colour=colour)
    trunk, _tail = split_model(make_model(cfg), cfg.train_from)
    trunk.eval()
    augment = AugmentConfig(color=cfg.color_aug)
    n = len(data.records)
    chunks: List[List[torch.Tensor]] = [[] for _ in range(cfg.bank_views + 1)]
    started = time.time()
    batch = 32
    for start in tqdm(range(0, n, batch), desc="feature bank", disable=not cfg.progress, file=sys.stderr):
        images = data.images[start : start + batch]
        chunks[0].append(trunk(images))
        for view in range(cfg.bank_views):
            # one generator per (view, batch start): the bank does not depend on the batch loop order
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + view * 10_007 + start)
            chunks[view + 1].append(trunk(augment_batch(images, augment, generator)))
    clean = torch.cat(chunks[0])
    augmented = torch.stack([torch.cat(c) for c in chunks[1:]]) if cfg.bank_views else None
    LOG.info("feature bank: %d images x %d views of %s in %.0f s", n, cfg.bank_views + 1, tuple(clean.shape[1:]), time.time() - started)
    _save_atomic({"clean": clean, "augmented": augmented}, cache)
    return FeatureBank(clean=clean, augmented=augmented, colour=colour)


def _autocast(cfg: TrainConfig, dev: torch.device) -> Any:
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16)


def _prepare(x: torch.Tensor, cfg: TrainConfig, dev: torch.device) -> torch.Tensor:
    x = x.to(dev)
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def train_one_epoch(
    tail: nn.Module,
    optimizer: torch.optim.Optimizer,
    bank: FeatureBank,
    train_idx: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    seed: int,
    bar_label: str,
    frozen: Optional[nn.Module] = None,
) -> float:
    dev = next(tail.parameters()).device
    tail.train()
    if frozen is not None:
        frozen.eval()  # a frozen backbone keeps its BatchNorm statistics too
    torch.manual_seed(seed)  # dropout
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_idx), generator=generator)
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    batches = [b for b in batches if len(b) > 1]  # BatchNorm needs two samples in train mode
    augment = AugmentConfig(color=cfg.color_aug)
    total_loss, seen = 0.0, 0
    for batch in tqdm(batches, desc=bar_label, leave=False, disable=not cfg.progress, file=sys.stderr):
        index = train_idx[batch]
        if bank.augmented is not None:
            views = bank.augmented.shape[0]
            view = torch.randint(0, views + 1, (len(index),), generator=generator)  # views = clean
            x = bank.augmented[view.clamp(max=views - 1), index]
            x[view == views] = bank.clean[index[view == views]]
        else:
            x = augment_batch(bank.clean[index], augment, generator)
        y = labels[batch].to(dev).float().unsqueeze(1)
        stats = bank.colour_of(index)
        with _autocast(cfg, dev):
            logits = tail(_prepare(x, cfg, dev), None if stats is None else stats.to(dev))
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * len(batch)
        seen += len(batch)
    return total_loss / max(seen, 1)


@torch.no_grad()
def predict(tail: nn.Module, inputs: torch.Tensor, cfg: TrainConfig, batch_size: int = 64, colour_stats: Optional[torch.Tensor] = None) -> np.ndarray:
    """Probabilities in float32 (no autocast), as the exported model computes them."""
    dev = next(tail.parameters()).device
    tail.eval()
    out = []
    for start in range(0, len(inputs), batch_size):
        stats = None if colour_stats is None else colour_stats[start : start + batch_size].to(dev)
        out.append(torch.sigmoid(tail(_prepare(inputs[start : start + batch_size], cfg, dev), stats).float()).cpu().numpy()[:, 0])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def predict_bank(tail: nn.Module, bank: FeatureBank, indices: Sequence[int], cfg: TrainConfig) -> np.ndarray:
    """:func:`predict` on these images of the bank: their clean inputs and their colour statistics."""
    index = torch.as_tensor(list(indices), dtype=torch.long)
    return predict(tail, bank.clean[index], cfg, colour_stats=bank.colour_of(index))


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _trainable(tail: Tail, stage: Stage, cfg: TrainConfig) -> List[Dict[str, Any]]:
    """Set requires_grad for ``stage`` and return its optimizer parameter groups.

    The head and the colour branch start from scratch, so they may learn ``head_lr_mult`` times
    faster than the ImageNet-initialised blocks.
    """
    for parameter in tail.parameters():
        parameter.requires_grad_(False)
    fresh = list(tail.head.parameters()) + (list(tail.colour.parameters()) if tail.colour is not None else [])
    blocks = [] if stage.trains == "head" else list(tail.blocks.parameters())
    for parameter in fresh + blocks:
        parameter.requires_grad_(True)
    groups: List[Dict[str, Any]] = [{"params": fresh, "lr_mult": cfg.head_lr_mult}]
    if blocks:
        groups.append({"params": blocks, "lr_mult": 1.0})
    return groups


def pretrain_colour_branch(tail: Tail, stats: torch.Tensor, labels: np.ndarray, weights: np.ndarray, cfg: TrainConfig, seed: int) -> float:
    """Fit the colour branch and the head's colour part on ``stats``; the CNN part of the head is zeroed.

    Full-batch Adam (lr 1e-3, L2 1e-4 on the weights) for ``cfg.colour_pretrain_steps`` steps,
    each image weighted by ``weights`` (1 / its photograph's copies, so a photograph counts once).
    Returns the final weighted training loss.
    """
    assert tail.colour is not None
    torch.manual_seed(seed)
    colour = tail.colour
    linear: nn.Linear = tail.head[-1]  # type: ignore[assignment]
    cnn_width = linear.in_features - colour.hidden
    probe = nn.Linear(colour.hidden, 1)
    parameters = list(colour.parameters()) + list(probe.parameters())
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    x = stats.float()
    y = torch.as_tensor(labels, dtype=torch.float32).unsqueeze(1)
    w = torch.as_tensor(weights, dtype=torch.float32).unsqueeze(1)
    w = w / w.sum()
    colour.train()
    loss = torch.zeros(())
    for _step in range(cfg.colour_pretrain_steps):
        logits = probe(colour.from_stats(x))
        loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum()
        penalty = sum((p ** 2).sum() for name, p in list(colour.named_parameters()) + list(probe.named_parameters()) if name.endswith("weight"))
        optimizer.zero_grad(set_to_none=True)
        (loss + 1e-4 * penalty).backward()
        optimizer.step()
    with torch.no_grad():
        linear.weight[:, :cnn_width] = 0.0
        linear.weight[:, cnn_width:] = probe.weight
        linear.bias.copy_(probe.bias)
    return float(loss.detach())


def fit(
    cfg: TrainConfig,
    data: Dataset,
    bank: FeatureBank,
    train_idx: Sequence[int],
    val_idx: Optional[Sequence[int]],
    stage_epochs: Optional[Sequence[int]],
    checkpoint: Path,
    seed: int,
    label: str,
) -> Tuple[MobileNetV2, nn.Module, Dict[str, Any]]:
    """Train the tail through the schedule's stages.

    With ``val_idx``: each stage runs until validation F1 has not improved for its patience (or its
    maximum), the next stage starts from the best weights so far, and the best weights are returned.
    Without: stage ``s`` runs exactly ``stage_epochs[s]`` epochs (the final fit).
    """
    dev = device()
    stages = cfg.stages
    validating = val_idx is not None
    if not validating and (stage_epochs is None or len(stage_epochs) != len(stages)):
        raise ValueError("a fit without validation needs one epoch count per stage")
    torch.manual_seed(seed)  # the fresh head's initial weights
    model = make_model(cfg)
    trunk, tail = split_model(model, cfg.train_from)
    for parameter in trunk.parameters():
        parameter.requires_grad_(False)
    train_index = torch.as_tensor(list(train_idx), dtype=torch.long)
    groups = cluster_ids(data.image_ids, load_clusters(Path(cfg.clusters)))
    resuming = cfg.resume and checkpoint.is_file()
    if cfg.pretrained and not resuming:
        # a resumed run overwrites these weights with the checkpoint's, so skip the pass then
        unfold_batchnorm(tail.blocks, bank.clean[train_index[: cfg.calibration_images]])
    if model.colour is not None and bank.colour is not None and not resuming:
        model.colour.set_standardization(bank.colour[train_index])
        if cfg.colour_pretrain_steps:
            _unique, inverse, counts = np.unique(groups[train_index.numpy()], return_inverse=True, return_counts=True)
            loss = pretrain_colour_branch(tail, bank.colour[train_index], data.labels[train_index.numpy()], 1.0 / counts[inverse], cfg, seed)
            LOG.info("%s: colour branch pre-trained, %d steps, weighted loss %.4f", label, cfg.colour_pretrain_steps, loss)
    model = model.to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    state: Dict[str, Any] = {
        "epoch": 0, "stage": 0, "stage_epoch": 0, "best_f1": -1.0, "best_loss": math.inf, "best_epoch": 0,
        "bad_epochs": 0, "stage_epochs": [0] * len(stages), "history": [],
    }
    best_weights: Optional[Dict[str, torch.Tensor]] = None
    optimizer_state: Optional[Dict[str, Any]] = None
    if resuming:
        saved = torch.load(checkpoint, map_location=dev, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer_state = saved["optimizer"]
        best_weights = saved["best_weights"]
        state.update(saved["state"])
        LOG.info("%s: resumed from %s at epoch %d", label, checkpoint, state["epoch"])
    val_inputs = bank.clean[list(val_idx)] if val_idx is not None else None
    val_stats = bank.colour_of(torch.as_tensor(list(val_idx), dtype=torch.long)) if val_idx is not None else None
    val_labels = data.labels[list(val_idx)] if val_idx is not None else None
    total = sum(s.max_epochs for s in stages) if validating else sum(stage_epochs or [])
    bar = tqdm(total=total, initial=state["epoch"], desc=label, disable=not cfg.progress, file=sys.stderr)

    def save(optimizer: Optional[torch.optim.Optimizer]) -> None:
        _save_atomic(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None, "best_weights": best_weights, "state": state},
            checkpoint,
        )

    if validating and state["epoch"] == 0 and cfg.colour_pretrain_steps and model.colour is not None and val_inputs is not None and val_labels is not None:
        # epoch 0, the colour model alone, is a candidate: the CNN's epochs must beat it on validation
        probs = predict(tail, val_inputs, cfg, colour_stats=val_stats)
        val = point_metrics(val_labels, probs, np.full(probs.shape, 0.5))
        state.update(best_f1=val[cfg.select_on], best_loss=val["loss"], best_epoch=0)
        best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        LOG.info("%s epoch 0 (colour branch only): val_%s=%.4f val_auc=%.4f", label, cfg.select_on, val[cfg.select_on], val["auc"])

    while state["stage"] < len(stages):
        stage = stages[state["stage"]]
        limit = stage.max_epochs if validating else int((stage_epochs or [])[state["stage"]])
        optimizer = torch.optim.Adam(_trainable(tail, stage, cfg), lr=stage.lr)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
            optimizer_state = None
        frozen = tail.blocks if stage.trains == "head" else None
        while state["stage_epoch"] < limit and (not validating or state["bad_epochs"] < stage.patience):
            epoch, stage_epoch = state["epoch"] + 1, state["stage_epoch"] + 1
            started = time.time()
            for group in optimizer.param_groups:
                group["lr"] = stage.lr_at(stage_epoch) * group.get("lr_mult", 1.0)
            tag = "{} ep{}".format(label, epoch)
            # each photograph once per epoch, through a randomly chosen copy of it
            epoch_index = torch.as_tensor(one_per_cluster(train_idx, groups, np.random.default_rng(seed * 1000 + epoch)), dtype=torch.long)
            epoch_labels = torch.from_numpy(data.labels[epoch_index.numpy()])
            train_loss = train_one_epoch(tail, optimizer, bank, epoch_index, epoch_labels, cfg, seed * 1000 + epoch, tag, frozen)
            record: Dict[str, float] = {"epoch": epoch, "train_loss": train_loss}
            if len(stages) > 1:
                record.update({"stage": state["stage"], "lr": stage.lr_at(stage_epoch)})
            if val_inputs is not None and val_labels is not None:
                probs = predict(tail, val_inputs, cfg, colour_stats=val_stats)
                val = point_metrics(val_labels, probs, np.full(probs.shape, 0.5))
                record.update({"val_loss": val["loss"], "val_f1": val["f1"], "val_acc": val["accuracy"], "val_auc": val["auc"]})
                # "best_f1" holds the selection metric (F1 at 0.5, or AUC with select_on="auc")
                score = val[cfg.select_on]
                improved = score > state["best_f1"] + 1e-9 or (
                    abs(score - state["best_f1"]) <= 1e-9 and val["loss"] < state["best_loss"]
                )
                if improved:
                    state.update(best_f1=score, best_loss=val["loss"], best_epoch=epoch, bad_epochs=0)
                    state["stage_epochs"][state["stage"]] = stage_epoch
                    best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    state["bad_epochs"] += 1
            else:
                state["stage_epochs"][state["stage"]] = stage_epoch
            record["seconds"] = time.time() - started
            state["epoch"], state["stage_epoch"] = epoch, stage_epoch
            state["history"].append(record)
            save(optimizer)
            LOG.info("%s epoch %d: %s", label, epoch, " ".join("{}={:.4g}".format(k, v) if k == "lr" else "{}={:.4f}".format(k, v) for k, v in record.items() if k != "epoch"))
            bar.update(1)
            bar.set_postfix({k: round(v, 3) for k, v in record.items() if k in ("train_loss", "val_f1", "val_auc")})
        state.update(stage=state["stage"] + 1, stage_epoch=0, bad_epochs=0)
        if validating and best_weights is not None:
            model.load_state_dict(best_weights)  # the next stage starts from the best so far
        save(None)
    bar.close()
    if validating and best_weights is not None:
        model.load_state_dict(best_weights)
    else:
        state["best_epoch"] = state["epoch"]
    return model, tail, state


# ---------------------------------------------------------------------------------------------
# cross-validation


def make_folds(data: Dataset, cfg: TrainConfig) -> List[Dict[str, List[int]]]:
    """k folds grouped by photograph (duplicate cluster), validation carved by cluster too."""
    groups = cluster_ids(data.image_ids, load_clusters(Path(cfg.clusters)))
    return grouped_folds(data.labels, groups, cfg.folds, cfg.val_fraction, cfg.seed)


def write_folds(data: Dataset, folds: List[Dict[str, List[int]]], cfg: TrainConfig, path: Path) -> None:
    ids = data.image_ids
    _write_json(
        {
            "seed": cfg.seed,
            "n_folds": cfg.folds,
            "val_fraction": cfg.val_fraction,
            "grouped_by": "duplicate clusters ({}, {} clusters)".format(_relative(Path(cfg.clusters)), len(set(load_clusters(Path(cfg.clusters)).values()))),
            "training_data_sha256": data.sha256,
            "folds": [
                {
                    "fold": k,
                    "train_ids": [ids[i] for i in fold["train"]],
                    "val_ids": [ids[i] for i in fold["val"]],
                    "test_ids": [ids[i] for i in fold["test"]],
                }
                for k, fold in enumerate(folds)
            ],
        },
        path,
    )


def write_oof(data: Dataset, results: List[FoldResult], path: Path) -> None:
    rows = []
    for result in results:
        for index, prob in zip(result.test_indices, result.test_probs):
            record = data.records[index]
            rows.append((record.image_id, result.fold, record.label, record.hb_g_dl, prob, result.threshold))
    rows.sort()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "fold", "label", "hb", "probability", "threshold"])
        for image_id, fold, label, hb, prob, threshold in rows:
            writer.writerow([image_id, fold, label, "{:.1f}".format(hb), "{:.6f}".format(prob), "{:.6f}".format(threshold)])
    os.replace(tmp, path)


def write_val_predictions(data: Dataset, results: List[FoldResult], path: Path) -> None:
    """Each fold's validation split scored by that fold's model: what the operating point is chosen on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "fold", "label", "probability"])
        for result in results:
            for index, prob in sorted(zip(result.val_indices, result.val_probs)):
                writer.writerow([data.records[index].image_id, result.fold, data.records[index].label, "{:.6f}".format(prob)])
    os.replace(tmp, path)


def run_fold(cfg: TrainConfig, data: Dataset, bank: FeatureBank, k: int, fold: Dict[str, List[int]]) -> FoldResult:
    fold_dir = Path(cfg.run_dir) / "cv" / "fold{}".format(k)
    result_path = fold_dir / "result.json"
    if cfg.resume and result_path.is_file():
        LOG.info("fold %d: already done (%s)", k, result_path)
        return FoldResult(**json.loads(result_path.read_text()))
    started = time.time()
    model, tail, state = fit(cfg, data, bank, fold["train"], fold["val"], None, fold_dir / "checkpoint.pt", cfg.seed + 100 * (k + 1), "fold {}".format(k))
    val_probs = predict_bank(tail, bank, fold["val"], cfg)
    threshold = choose_threshold(data.labels[fold["val"]], val_probs)
    test_probs = predict_bank(tail, bank, fold["test"], cfg)
    result = FoldResult(
        fold=k,
        best_epoch=int(state["best_epoch"]),
        epochs_run=int(state["epoch"]),
        threshold=threshold,
        val_f1=float(state["best_f1"]),
        test_indices=list(fold["test"]),
        test_probs=[float(p) for p in test_probs],
        seconds=time.time() - started,
        history=state["history"],
        stage_epochs=[int(e) for e in state["stage_epochs"]],
        val_indices=list(fold["val"]),
        val_probs=[float(p) for p in val_probs],
    )
    diff = export_onnx(
        model.cpu(), fold_dir / "model.onnx", cfg.spec, threshold, "{}-fold{}".format(cfg.version, k), data.sha256,
        extra_metadata={"cv_fold": str(k)},
    )
    LOG.info("fold %d: best epoch %d of %d, threshold %.4f, exported (|ORT-torch| %.1e)", k, result.best_epoch, result.epochs_run, threshold, diff)
    _write_json(asdict(result), result_path)
    return result


def summarize(data: Dataset, results: List[FoldResult], cfg: TrainConfig) -> Dict[str, Any]:
    per_fold = []
    all_idx: List[int] = []
    all_probs: List[float] = []
    all_thr: List[float] = []
    groups = cluster_ids(data.image_ids, load_clusters(Path(cfg.clusters)))
    for result in results:
        labels = data.labels[result.test_indices]
        probs = np.asarray(result.test_probs)
        stats = bootstrap_metrics(labels, probs, np.full(probs.shape, result.threshold), n_boot=cfg.bootstrap, seed=cfg.seed, groups=groups[result.test_indices])
        per_fold.append({"fold": result.fold, "n": len(labels), "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "threshold": result.threshold, "metrics": stats})
        all_idx += result.test_indices
        all_probs += result.test_probs
        all_thr += [result.threshold] * len(labels)
    labels = data.labels[all_idx]
    probs, thresholds = np.asarray(all_probs), np.asarray(all_thr)
    records = [data.records[i] for i in all_idx]
    clusters = groups[all_idx]
    pooled = bootstrap_metrics(labels, probs, thresholds, n_boot=cfg.bootstrap, seed=cfg.seed, groups=clusters)
    pooled_at_half = point_metrics(labels, probs, np.full(probs.shape, 0.5))
    subgroups = {
        name: subgroup_table(labels, probs, thresholds, [getattr(r, name) for r in records], n_boot=cfg.bootstrap // 2, seed=cfg.seed, clusters=clusters)
        for name in ("gender", "age_band", "hospital")
    }
    return {
        "n_images": len(all_idx),
        "n_photographs": int(len(np.unique(clusters))),
        "interval": "95% percentile bootstrap over duplicate clusters (photographs), {} resamples".format(cfg.bootstrap),
        "per_fold": per_fold,
        "pooled_oof": pooled,
        "pooled_oof_at_0.5": pooled_at_half,
        "subgroups": subgroups,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("data_dir", "weights", "run_dir", "cv_dir", "output", "progress", "resume")},
        "training_data_sha256": data.sha256,
    }


# settings that do not change what is trained
_RUN_IRRELEVANT = ("progress", "resume", "threads", "bootstrap", "cv_dir", "output", "version", "final", "run_dir")


def _check_run_config(cfg: TrainConfig) -> None:
    """Refuse to resume checkpoints written by a different configuration."""
    path = Path(cfg.run_dir) / "cv" / "config.json"
    current = {k: v for k, v in asdict(cfg).items() if k not in _RUN_IRRELEVANT}
    # the folds depend on the clusters' contents, not on where the file lies
    current["clusters"] = hashlib.sha256(Path(cfg.clusters).read_bytes()).hexdigest()
    if path.is_file() and cfg.resume:
        previous = {k: v for k, v in json.loads(path.read_text()).items() if k not in _RUN_IRRELEVANT}
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed:
            raise SystemExit(
                "{} holds a run with other settings ({}); pass --no-resume to start over or use another --run-dir".format(
                    Path(cfg.run_dir) / "cv", ", ".join(changed)
                )
            )
    if not cfg.resume and (Path(cfg.run_dir) / "cv").is_dir():
        for stale in sorted((Path(cfg.run_dir) / "cv").glob("fold*/*")) + sorted((Path(cfg.run_dir) / "final").glob("*")):
            if stale.name in ("checkpoint.pt", "result.json"):
                stale.unlink()
    _write_json(current, path)


def cross_validate(cfg: TrainConfig, data: Dataset, bank: FeatureBank) -> Tuple[List[FoldResult], Dict[str, Any]]:
    cv_dir = Path(cfg.cv_dir)
    folds = make_folds(data, cfg)
    write_folds(data, folds, cfg, cv_dir / "folds.json")
    _check_run_config(cfg)
    results: List[FoldResult] = []
    for k, fold in enumerate(tqdm(folds, desc="folds", disable=not cfg.progress, file=sys.stderr)):
        results.append(run_fold(cfg, data, bank, k, fold))
        write_oof(data, results, cv_dir / "oof_predictions.csv")
        write_val_predictions(data, results, cv_dir / "val_predictions.csv")
    summary = summarize(data, results, cfg)
    _write_json(summary, cv_dir / "cv_metrics.json")
    return results, summary


def final_stage_epochs(results: List[FoldResult], n_stages: int) -> List[int]:
    """Per stage, the median over folds of the epochs that stage ran before its last improvement."""
    per_fold = [r.stage_epochs if r.stage_epochs else [r.best_epoch] for r in results]
    if any(len(e) != n_stages for e in per_fold):
        raise ValueError("the folds were trained with another number of stages")
    return [int(round(float(np.median([e[s] for e in per_fold])))) for s in range(n_stages)]


def final_fit(cfg: TrainConfig, data: Dataset, bank: FeatureBank, results: List[FoldResult], summary: Dict[str, Any]) -> Path:
    stage_epochs = final_stage_epochs(results, len(cfg.stages))
    epochs = sum(stage_epochs)
    threshold = float(np.median([r.threshold for r in results]))
    LOG.info(
        "final fit: %d images, %d epochs (median best epoch per stage: %s), threshold %.4f (median validation threshold)",
        len(data.records), epochs, stage_epochs, threshold,
    )
    model, _tail, _state = fit(cfg, data, bank, list(range(len(data.records))), None, stage_epochs, Path(cfg.run_dir) / "final" / "checkpoint.pt", cfg.seed, "final")
    pooled = summary["pooled_oof"]
    cv_metrics = {
        "folds": cfg.folds,
        "seed": cfg.seed,
        "pooled_oof": {name: [round(v["value"], 4), round(v["ci_low"], 4), round(v["ci_high"], 4)] for name, v in pooled.items()},
        "final_epochs": epochs,
    }
    diff = export_onnx(
        model.cpu(), Path(cfg.output), cfg.spec, threshold, cfg.version, data.sha256, cv_metrics,
        extra_metadata={"training": json.dumps({"images": len(data.records), "epochs": epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed, "color_aug": cfg.color_aug, "schedule": cfg.schedule, "stage_epochs": stage_epochs})},
    )
    LOG.info("final model exported to %s (|ORT-torch| %.1e)", cfg.output, diff)
    _write_json({"epochs": epochs, "stage_epochs": stage_epochs, "schedule": cfg.schedule, "threshold": threshold, "ort_max_abs_diff": diff, "output": _relative(Path(cfg.output))}, Path(cfg.cv_dir) / "final.json")
    return Path(cfg.output)


def _relative(path: Path) -> str:
    """A path relative to the repository when inside it (committed files should not name a machine)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def setup_logging(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    LOG.setLevel(logging.INFO)
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == (run_dir / "progress.log").resolve() for h in LOG.handlers):
        handler = logging.FileHandler(run_dir / "progress.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        LOG.addHandler(handler)


def run(cfg: TrainConfig) -> Dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    setup_logging(Path(cfg.run_dir))
    LOG.info("config: %s", json.dumps(asdict(cfg)))
    data = load_dataset(Path(cfg.data_dir), cfg.spec, cache_dir=Path(cfg.run_dir) / "cache", limit=cfg.subset)
    LOG.info("data: %d images (%d anemic), sha256 %s", len(data.records), int(data.labels.sum()), data.sha256)
    bank = build_feature_bank(cfg, data)
    results, summary = cross_validate(cfg, data, bank)
    pooled = summary["pooled_oof"]
    LOG.info("pooled OOF: %s", " ".join("{}={:.4f}".format(k, v["value"]) for k, v in pooled.items()))
    if cfg.final:
        final_fit(cfg, data, bank, results, summary)
    return summary


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=d.data_dir, help="CP-AnemiC folder (Anemic/, Non-anemic/, the CSV sheet)")
    p.add_argument("--weights", default=d.weights, help="ImageNet MobileNetV2 .tflite")
    p.add_argument("--run-dir", default=d.run_dir, help="checkpoints, per-fold ONNX models, progress.log")
    p.add_argument("--cv-dir", default=d.cv_dir, help="folds.json, oof_predictions.csv, cv_metrics.json")
    p.add_argument("--output", default=d.output, help="final ONNX model")
    p.add_argument("--clusters", default=d.clusters, help="duplicate clusters (python -m training.duplicates); folds never split one")
    p.add_argument("--version", default=d.version)
    p.add_argument("--folds", type=int, default=d.folds)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--epochs", type=int, default=d.max_epochs, help="maximum epochs per fold")
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--width", type=float, default=d.width, help="width multiplier (tiny models need --no-pretrained)")
    p.add_argument("--input-size", type=int, default=d.input_size, help="canvas width (and height unless --input-height)")
    p.add_argument("--input-height", type=int, default=d.input_height, help="canvas height; 0: square. 96 with --input-size 224 fits the 2.6:1 crops")
    p.add_argument("--colour-hidden", type=int, default=d.colour_hidden, help="width of the in-graph colour-statistics branch; 0: none")
    p.add_argument("--head-lr-mult", type=float, default=d.head_lr_mult, help="learning-rate multiplier of the head and the colour branch")
    p.add_argument("--colour-pretrain-steps", type=int, default=d.colour_pretrain_steps, help="full-batch steps fitting the colour branch before the CNN trains (epoch 0 becomes a candidate)")
    p.add_argument("--select-on", choices=SELECTION_METRICS, default=d.select_on, help="validation metric for early stopping and the best epoch")
    p.add_argument("--subset", type=int, default=None, help="use only N images (tests, smoke runs)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    p.add_argument("--color-aug", action="store_true", help="mild colour jitter inside the ROI")
    p.add_argument("--fp32", dest="bf16", action="store_false", default=d.bf16, help="train without bf16 autocast (the default where the CPU has no bf16 instructions)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--train-from", type=int, default=d.train_from, help="first trained features.N block (0 = full fine-tune)")
    p.add_argument("--bank-views", type=int, default=d.bank_views, help="augmented views per image in the feature bank")
    p.add_argument("--no-final", dest="final", action="store_false", help="cross-validate only")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore existing checkpoints")
    p.add_argument("--bootstrap", type=int, default=d.bootstrap, help="bootstrap resamples for the intervals")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="study: one stage at --lr; three-stage: head, fine-tune, aggressive")
    a = p.parse_args(argv)
    return TrainConfig(
        data_dir=a.data_dir, weights=a.weights, run_dir=a.run_dir, cv_dir=a.cv_dir, output=a.output, clusters=a.clusters, version=a.version,
        folds=a.folds, seed=a.seed, max_epochs=a.epochs, patience=a.patience, batch_size=a.batch_size, lr=a.lr,
        width=a.width, input_size=a.input_size, input_height=a.input_height, colour_hidden=a.colour_hidden,
        head_lr_mult=a.head_lr_mult, select_on=a.select_on, colour_pretrain_steps=a.colour_pretrain_steps, subset=a.subset, pretrained=a.pretrained, color_aug=a.color_aug,
        bf16=a.bf16, channels_last=a.channels_last, threads=a.threads, train_from=a.train_from, bank_views=a.bank_views, final=a.final, resume=a.resume,
        bootstrap=a.bootstrap, progress=a.progress, schedule=a.schedule,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_args(argv)
    summary = run(cfg)
    pooled = summary["pooled_oof"]
    print("pooled out-of-fold ({} images): ".format(summary["n_images"]) + ", ".join("{} {:.4f}".format(k, v["value"]) for k, v in pooled.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
