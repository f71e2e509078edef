"""Evaluation after training and periodic analysis: accuracy by group, FDR,
sparsity, confusion matrix, the per-class table and the saved features.

The final evaluation runs on the test set, or on the validation set when
``param_search`` is set (hyper-parameters are then chosen without looking at
the test set).  With ``data.eval_hflip`` the logits of each image and of its
horizontal flip are averaged (WB's notebooks average logits, not
probabilities); features, FDR and sparsity are always those of the plain image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F

from utils import distributed as ddp
from utils.accel import FastPath
from utils.augment import BatchAugment
from utils.metrics import (GROUPS, confusion_counts, fisher_discriminant_ratio, group_accuracy, hoyer_sparsity,
                           per_class_accuracy)
from utils.records import class_mean
from utils.rundir import ACC_FILE, CONFMAT_FILE, FDR_FILE, PER_CLASS_FILE, SPARSITY_FILE, RunDir
from utils.train import SplitTensors, evaluate, shard_eval_batches

if TYPE_CHECKING:  # pragma: no cover
    from utils.pipeline import Prepared, RunLog

CLASSIFIER_WEIGHT_FILE = "classifier_weight.npy"


def log_fdr(p: Prepared, writer, train: SplitTensors, val: SplitTensors, augment: BatchAugment,
            epoch: int) -> None:
    k = p.data.n_classes
    bs = p.cfg.data.eval_batch_size
    for name, split in (("train", train), ("val", val)):
        result = evaluate(p.model, split, augment, k, bs, want_features=True, fast=p.fast)  # FDR: on the CPU
        writer.add_scalar(f"FDR/{name}", fisher_discriminant_ratio(result.features, split.labels, k), epoch)


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
    return Features(ddp.gather_rows(torch.cat(plain), n),
                    ddp.gather_rows(torch.cat(flipped), n) if hflip else None, labels)


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


def final_evaluation(p: Prepared, rundir: RunDir, writer, log: RunLog, train: SplitTensors,
                     test: SplitTensors, augment: BatchAugment, val: Optional[SplitTensors] = None) -> dict:
    """Metrics and files of the final model; returns {"acc": {...}, "fdr": {...}}."""
    cfg = p.cfg
    k = p.data.n_classes
    bs = cfg.data.eval_batch_size
    use_val = cfg.param_search and val is not None
    split_name = "val" if use_val else "test"
    evaluated = val if use_val else test
    model = p.model
    model.eval()
    eval_feats = extract_features(model, evaluated, augment, bs, hflip=cfg.data.eval_hflip, fast=p.fast)
    logits = logits_of(model.classify, eval_feats)
    train_feats = extract_features(model, train, augment, bs, fast=p.fast).plain.cpu()
    feats = eval_feats.plain.cpu()
    labels = evaluated.labels.cpu()
    train_labels = train.labels.cpu()
    groups = p.data.groups()
    acc, counts = accuracy_by_group(logits, evaluated.labels, groups)
    per_class = per_class_accuracy(counts)
    rundir.write_json(ACC_FILE, acc)
    conf = (counts.double() / counts.sum(dim=1, keepdim=True).clamp_min(1)).numpy()
    rundir.save_npy(CONFMAT_FILE, conf)
    fdr = {"train": fisher_discriminant_ratio(train_feats, train_labels, k),
           split_name: fisher_discriminant_ratio(feats, labels, k)}
    rundir.write_json(FDR_FILE, fdr)
    sparsity = {"train": float(hoyer_sparsity(train_feats).mean()),
                split_name: float(hoyer_sparsity(feats).mean())}
    rundir.write_json(SPARSITY_FILE, sparsity)
    weight = model.classifier_weight().float().cpu()
    rundir.save_npy(CLASSIFIER_WEIGHT_FILE, weight.numpy())
    weight_norm = weight.norm(dim=1)

    def own_class_cosine(h, y):
        return F.cosine_similarity(h, weight[y.long()], dim=1)

    columns = {
        f"{split_name}_acc": per_class,
        "weight_norm": weight_norm,
        "train_feature_norm": class_mean(train_feats.norm(dim=1), train_labels, k),
        f"{split_name}_feature_norm": class_mean(feats.norm(dim=1), labels, k),
        "train_feature_weight_cos": class_mean(own_class_cosine(train_feats, train_labels), train_labels, k),
        f"{split_name}_feature_weight_cos": class_mean(own_class_cosine(feats, labels), labels, k),
    }
    rows = [[c, p.data.class_names[c], p.data.class_counts[c], groups[c]]
            + [float(v[c]) for v in columns.values()] for c in range(k)]
    rundir.write_csv(PER_CLASS_FILE, ["class", "name", "n_train", "group"] + list(columns), rows)
    if cfg.save_features:
        rundir.save_npy("features_train.npy", train_feats.numpy())
        rundir.save_npy("labels_train.npy", train_labels.numpy())
        rundir.save_npy(f"features_{split_name}.npy", feats.numpy())
        rundir.save_npy(f"labels_{split_name}.npy", labels.numpy())
    tta = " (flip TTA)" if cfg.data.eval_hflip else ""
    log.info(f"{split_name} accuracy{tta}: " + ", ".join(f"{g} {acc[g]:.4f}" for g in ("All",) + GROUPS))
    log.info(f"FDR train {fdr['train']:.3f} {split_name} {fdr[split_name]:.3f}; "
             f"Hoyer sparsity train {sparsity['train']:.3f} {split_name} {sparsity[split_name]:.3f}")
    for g in ("All",) + GROUPS:
        writer.add_scalar(f"{split_name}/acc_{g}", acc[g], 0)
    writer.add_scalar(f"{split_name}/FDR_train", fdr["train"], 0)
    writer.add_scalar(f"{split_name}/FDR_{split_name}", fdr[split_name], 0)
    return {"acc": acc, "fdr": fdr}
