"""Evaluation after training and periodic analysis: accuracy by group, FDR,
sparsity, confusion matrix and the per-class table."""
from __future__ import annotations

from typing import TYPE_CHECKING

from utils.augment import BatchAugment
from utils.metrics import GROUPS, fisher_discriminant_ratio, group_accuracy, hoyer_sparsity, per_class_accuracy
from utils.rundir import ACC_FILE, CONFMAT_FILE, FDR_FILE, PER_CLASS_FILE, SPARSITY_FILE, RunDir
from utils.train import SplitTensors, evaluate

if TYPE_CHECKING:  # pragma: no cover
    from utils.pipeline import Prepared, RunLog


def log_fdr(p: Prepared, writer, train: SplitTensors, val: SplitTensors, augment: BatchAugment,
            epoch: int) -> None:
    k = p.data.n_classes
    bs = p.cfg.data.eval_batch_size
    for name, split in (("train", train), ("val", val)):
        result = evaluate(p.model, split, augment, k, bs, want_features=True, fast=p.fast, features_on_device=True)
        writer.add_scalar(f"FDR/{name}", fisher_discriminant_ratio(result.features, split.labels, k), epoch)


def final_evaluation(p: Prepared, rundir: RunDir, writer, log: RunLog, train: SplitTensors,
                     test: SplitTensors, augment: BatchAugment) -> dict:
    k = p.data.n_classes
    bs = p.cfg.data.eval_batch_size
    test_result = evaluate(p.model, test, augment, k, bs, want_features=True, fast=p.fast)
    train_result = evaluate(p.model, train, augment, k, bs, want_features=True, fast=p.fast)
    per_class = per_class_accuracy(test_result.counts)
    groups = p.data.groups()
    acc = group_accuracy(per_class.tolist(), groups)
    rundir.write_json(ACC_FILE, acc)
    conf = (test_result.counts.double() / test_result.counts.sum(dim=1, keepdim=True).clamp_min(1)).numpy()
    rundir.save_npy(CONFMAT_FILE, conf)
    fdr = {"train": fisher_discriminant_ratio(train_result.features, train.labels.cpu(), k),
           "test": fisher_discriminant_ratio(test_result.features, test.labels.cpu(), k)}
    rundir.write_json(FDR_FILE, fdr)
    sparsity = {"train": float(hoyer_sparsity(train_result.features).mean()),
                "test": float(hoyer_sparsity(test_result.features).mean())}
    rundir.write_json(SPARSITY_FILE, sparsity)
    weight_norm = p.model.classifier_weight().norm(dim=1).cpu()
    feat_norm = test_result.features.norm(dim=1)
    labels = test.labels.cpu()
    rows = []
    for c in range(k):
        mask = labels == c
        rows.append([c, p.data.class_names[c], p.data.class_counts[c], groups[c], float(per_class[c]),
                     float(weight_norm[c]), float(feat_norm[mask].mean()) if mask.any() else float("nan")])
    rundir.write_csv(PER_CLASS_FILE, ["class", "name", "n_train", "group", "test_acc", "weight_norm",
                                      "test_feature_norm"], rows)
    log.info("test accuracy: " + ", ".join(f"{g} {acc[g]:.4f}" for g in ("All",) + GROUPS))
    log.info(f"FDR train {fdr['train']:.3f} test {fdr['test']:.3f}; "
             f"Hoyer sparsity train {sparsity['train']:.3f} test {sparsity['test']:.3f}")
    for g in ("All",) + GROUPS:
        writer.add_scalar(f"test/acc_{g}", acc[g], 0)
    writer.add_scalar("test/FDR_train", fdr["train"], 0)
    writer.add_scalar("test/FDR_test", fdr["test"], 0)
    return acc
