"""The final evaluation's files: accuracy by group (top-1 in acc.json, top-1 and top-5 in
topk.json), calibration (calibration.json: ECE, NLL, Brier and the 15 bins), FDR, sparsity, the confusion matrix, the
classifier weights, the per-class table, the saved features, and the run's TensorBoard
record (test scalars and HParams).

The final evaluation runs on the test set, or on the validation set when ``param_search``
is set (hyper-parameters are then chosen without looking at the test set).  With
``data.eval_hflip`` the logits of each image and of its horizontal flip are averaged (WB's
notebooks average logits, not probabilities); features, FDR and sparsity are always those of
the plain image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.engine.calibration import TOP_K, calibration, per_class_topk
from utils.engine.evaluation import EvalPasses, accuracy_by_group, logits_of
from utils.data.lt_data import LTData
from utils.engine.metrics import fisher_discriminant_ratio, group_accuracy, hoyer_sparsity, per_class_accuracy
from utils.names import (ACC_FILE, CALIBRATION_FILE, CLASSIFIER_WEIGHT_FILE, CONFMAT_FILE, FDR_FILE, GROUPS,
                         PER_CLASS_FILE, SPARSITY_FILE, TOPK_FILE)
from utils.engine.records import class_mean
from utils.run.rundir import RunDir
from utils.run.runlog import log


def final_evaluation(model, data: LTData, train, evaluated, split_name: str, passes: EvalPasses, rundir: RunDir,
                     writer, hflip: bool = False, save_features: bool = False) -> dict:
    """Metrics and files of the final model on ``evaluated`` (``split_name``: "test", or "val"
    with param_search); returns {"acc": {...}, "fdr": {...}}."""
    model.eval()
    eval_feats = passes.features(model, evaluated, hflip=hflip)
    logits = logits_of(model.classify, eval_feats)
    train_feats = passes.features(model, train).plain.cpu()
    feats = eval_feats.plain.cpu()
    acc, counts = accuracy_by_group(logits, evaluated.labels, data.groups())
    rundir.write_json(ACC_FILE, acc)  # the original's layout, which its tools read: unchanged
    top5 = group_accuracy(per_class_topk(logits, evaluated.labels, data.n_classes, TOP_K).tolist(), data.groups())
    rundir.write_json(TOPK_FILE, {"top1": acc, f"top{TOP_K}": top5})
    calib = calibration(logits, evaluated.labels)
    rundir.write_json(CALIBRATION_FILE, calib)
    rundir.save_npy(CONFMAT_FILE, (counts.double() / counts.sum(dim=1, keepdim=True).clamp_min(1)).numpy())
    k, labels, train_labels = data.n_classes, evaluated.labels.cpu(), train.labels.cpu()
    fdr = {"train": fisher_discriminant_ratio(train_feats, train_labels, k),
           split_name: fisher_discriminant_ratio(feats, labels, k)}
    rundir.write_json(FDR_FILE, fdr)
    sparsity = {"train": float(hoyer_sparsity(train_feats).mean()),
                split_name: float(hoyer_sparsity(feats).mean())}
    rundir.write_json(SPARSITY_FILE, sparsity)
    weight = model.classifier_weight().float().cpu()
    rundir.save_npy(CLASSIFIER_WEIGHT_FILE, weight.numpy())
    write_per_class(rundir, data, split_name, per_class_accuracy(counts), weight, (train_feats, train_labels),
                    (feats, labels))
    if save_features:
        for name, (h, y) in (("train", (train_feats, train_labels)), (split_name, (feats, labels))):
            rundir.save_npy(f"features_{name}.npy", h.numpy())
            rundir.save_npy(f"labels_{name}.npy", y.numpy())
    log.info(f"{split_name} accuracy{' (flip TTA)' if hflip else ''}: "
             + ", ".join(f"{g} {acc[g]:.4f}" for g in ("All",) + GROUPS))
    log.info(f"{split_name} top-{TOP_K}: " + ", ".join(f"{g} {top5[g]:.4f}" for g in ("All",) + GROUPS)
             + f"; ECE {calib['ECE']:.4f}, NLL {calib['NLL']:.4f}, Brier {calib['Brier']:.4f}")
    log.info(f"FDR train {fdr['train']:.3f} {split_name} {fdr[split_name]:.3f}; "
             f"Hoyer sparsity train {sparsity['train']:.3f} {split_name} {sparsity[split_name]:.3f}")
    for g in ("All",) + GROUPS:
        writer.add_scalar(f"{split_name}/acc_{g}", acc[g], 0)
    writer.add_scalar(f"{split_name}/top{TOP_K}_All", top5["All"], 0)
    for name in ("ECE", "NLL", "Brier"):
        writer.add_scalar(f"{split_name}/{name}", calib[name], 0)
    writer.add_scalar(f"{split_name}/FDR_train", fdr["train"], 0)
    writer.add_scalar(f"{split_name}/FDR_{split_name}", fdr[split_name], 0)
    return {"acc": acc, "fdr": fdr}


def write_per_class(rundir: RunDir, data: LTData, split_name: str, per_class: torch.Tensor, weight: torch.Tensor,
                    train: tuple, evaluated: tuple) -> None:
    """per_class.csv: per class its size and group, accuracy, classifier weight norm, and the
    mean norm of its features and their cosine to its own classifier row (train and evaluated)."""
    k = data.n_classes

    def own_class_cosine(h, y):
        return F.cosine_similarity(h, weight[y.long()], dim=1)

    (train_feats, train_labels), (feats, labels) = train, evaluated
    columns = {
        f"{split_name}_acc": per_class,
        "weight_norm": weight.norm(dim=1),
        "train_feature_norm": class_mean(train_feats.norm(dim=1), train_labels, k),
        f"{split_name}_feature_norm": class_mean(feats.norm(dim=1), labels, k),
        "train_feature_weight_cos": class_mean(own_class_cosine(train_feats, train_labels), train_labels, k),
        f"{split_name}_feature_weight_cos": class_mean(own_class_cosine(feats, labels), labels, k),
    }
    groups = data.groups()
    rows = [[c, data.class_names[c], data.class_counts[c], groups[c]] + [float(v[c]) for v in columns.values()]
            for c in range(k)]
    rundir.write_csv(PER_CLASS_FILE, ["class", "name", "n_train", "group"] + list(columns), rows)


def write_hparams(writer, seed: int, exp_name: str, stage: str, final: dict) -> None:
    """The HParams tab's record of the run (what SummaryWriter.add_hparams writes, but into the
    final evaluation's own events file rather than a new one)."""
    from torch.utils.tensorboard.summary import hparams
    metrics = {**{f"hparam/acc_{k}": v for k, v in final["acc"].items()},
               **{f"hparam/FDR_{k}": v for k, v in final["fdr"].items()}}
    for summary in hparams({"seed": seed, "exp_name": exp_name, "stage": stage}, metrics):
        writer.file_writer.add_summary(summary)
    for key, value in metrics.items():
        writer.add_scalar(key, value)
