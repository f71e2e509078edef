"""Evaluation passes, in eval mode (BatchNorm running statistics, no augmentation).

:func:`evaluate` gives a split's confusion counts (and, when asked, its features);
:func:`extract_features` gives the penultimate features of a split, also of its flipped
images, which :func:`logits_of` re-classifies (WB's flip TTA; the tau sweep classifies the
same features again for every tau).  Under torchrun each rank runs a contiguous shard of the
split and the results are combined, so every rank gets the single-process result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from utils import distributed
from utils.engine.accel import FastPath
from utils.data.augment import BatchAugment
from utils.data.batches import SplitTensors
from utils.engine.metrics import class_averaged_accuracy, confusion_counts, group_accuracy, per_class_accuracy


def eval_batches(split, augment: BatchAugment, batch_size: int):
    """(x, y) of the split in order, without augmentation."""
    if isinstance(split, SplitTensors):
        for start in range(0, len(split), batch_size):
            yield augment.eval(split.images[start:start + batch_size]), split.labels[start:start + batch_size]
    else:
        for x, y, _ in split.eval_batches(batch_size):
            yield x, y


def shard_eval_batches(split, augment: BatchAugment, batch_size: int):
    """(this rank's shard of the split, its (x, y) batches in order): the whole split in one process.

    A rank whose shard is empty (a split smaller than the number of processes) gets one
    batch of no rows, cut from the split's first image, so that its outputs still have the
    feature size and dtype that the gathers pad to."""
    shard = distributed.my_shard(split)
    if len(shard) > 0 or len(split) == 0:
        return shard, eval_batches(shard, augment, batch_size)
    x, y = next(eval_batches(split.subset(0, 1), augment, 1))
    return shard, iter([(x[:0], y[:0])])


@dataclass
class EvalResult:
    counts: torch.Tensor                      # K x K confusion counts (cpu)
    features: Optional[torch.Tensor] = None   # N x D float32 (cpu, or the device), when asked
    preds: Optional[torch.Tensor] = None      # N predictions in split order (cpu), when asked

    @property
    def class_avg_acc(self) -> float:
        return class_averaged_accuracy(self.counts)


@torch.inference_mode()
def evaluate(model: nn.Module, split, augment: BatchAugment, n_classes: int,
             batch_size: int, want_features: bool = False, fast: Optional[FastPath] = None,
             features_on_device: bool = False, want_preds: bool = False) -> EvalResult:
    """One pass in eval mode (BN running statistics, no augmentation).

    ``features_on_device`` keeps the N x D features where they were computed
    (for statistics such as the FDR that reduce them on the device).  Under
    torchrun each rank evaluates a contiguous shard (every image once, no
    padding); the confusion counts are summed and, when asked, the features and
    the per-image predictions gathered, so every rank returns the single-process result.
    """
    fast = fast or FastPath(device_type=split.labels.device.type)
    n_total = len(split)
    labels = split.labels
    split, batches = shard_eval_batches(split, augment, batch_size)
    was_training = model.training
    model.eval()
    preds, feats = [], []
    for x, _ in batches:
        with fast.autocast():
            h, logits = fast.forward(model, x)
        preds.append(logits.argmax(dim=1))
        if want_features:
            feats.append(h.to(torch.float32, copy=True))  # a compiled forward may reuse h's buffer
    model.train(was_training)
    pred = torch.cat(preds) if preds else labels.new_zeros(0)
    counts = distributed.all_reduce_sum(confusion_counts(pred, split.labels, n_classes)).cpu()
    features = None
    if want_features:
        features = distributed.gather_rows(torch.cat(feats), n_total)
        if not features_on_device:
            features = features.cpu()
    preds = distributed.gather_rows(pred, n_total).cpu() if want_preds else None
    return EvalResult(counts=counts, features=features, preds=preds)



@dataclass
class Features:
    """Penultimate features of a split (eval mode), and of its flipped images when asked."""
    plain: torch.Tensor              # N x D on the model's device
    flipped: Optional[torch.Tensor]  # N x D or None
    labels: torch.Tensor             # N on the model's device


@torch.inference_mode()
def extract_features(model, split, augment: BatchAugment, batch_size: int, hflip: bool = False,
                     fast: Optional[FastPath] = None) -> Features:
    """Under torchrun each rank computes a contiguous shard and the shards are gathered:
    every rank returns the features of the whole split, in order."""
    fast = fast or FastPath(device_type=split.labels.device.type)
    labels, n = split.labels, len(split)
    _, batches = shard_eval_batches(split, augment, batch_size)
    was_training = model.training
    model.eval()
    plain, flipped = [], []
    for x, _ in batches:
        with fast.autocast():
            plain.append(model.features(fast.layout(x)).float())
            if hflip:
                flipped.append(model.features(fast.layout(x.flip(3))).float())
    model.train(was_training)
    return Features(distributed.gather_rows(torch.cat(plain), n),
                    distributed.gather_rows(torch.cat(flipped), n) if hflip else None, labels)


@torch.inference_mode()
def logits_of(classify: Callable[[torch.Tensor], torch.Tensor], feats: Features) -> torch.Tensor:
    """Logits of the features; with flipped features, the mean of both logits (WB's flip TTA)."""
    logits = classify(feats.plain).float()
    if feats.flipped is not None:
        logits = (logits + classify(feats.flipped).float()) / 2
    return logits


def accuracy_by_group(logits: torch.Tensor, labels: torch.Tensor, groups: list[str]) -> tuple[dict, torch.Tensor]:
    """({"All","Many","Medium","Few"}, K x K confusion counts) of the argmax predictions."""
    counts = confusion_counts(logits.argmax(dim=1), labels, len(groups)).cpu()
    return group_accuracy(per_class_accuracy(counts).tolist(), groups), counts


@dataclass(frozen=True)
class EvalPasses:
    """How a run's evaluation passes run: unaugmented batches of ``augment`` (its normalisation),
    ``batch_size`` images at a time, under the fast path."""
    augment: BatchAugment
    batch_size: int
    fast: FastPath

    def evaluate(self, model: nn.Module, split, n_classes: int, want_features: bool = False) -> EvalResult:
        return evaluate(model, split, self.augment, n_classes, self.batch_size, want_features=want_features,
                        fast=self.fast)

    def features(self, model: nn.Module, split, hflip: bool = False) -> Features:
        return extract_features(model, split, self.augment, self.batch_size, hflip=hflip, fast=self.fast)
