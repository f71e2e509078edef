"""The epoch loop of both stages: schedule, train, project, validate, keep the best, record.

    for epoch in first .. total:
        lr = cosine_lr(epoch); train one epoch; MaxNorm; validate
        an improving epoch's weights wait for its checkpoint (RunCheckpoint.save_best)
        records -> metrics.csv, trackRecords, TensorBoard, train.log
        checkpoint (when due, after the last epoch, on Ctrl-C)

Everything the loop carries from epoch to epoch is one :class:`LoopState`, which the
checkpoint saves and a resumed run restores (utils/run/checkpoint.py).  The non-finite guard is
part of every training step (``TrainState.guard``); Ctrl-C is honoured between epochs
(utils/run/signals.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from utils.run.checkpoint import RunCheckpoint
from utils.engine.evaluation import EvalPasses
from utils.engine.guard import NonFiniteGuard, NonFiniteLoss
from utils.errors import TrainingDiverged
from utils.engine.metrics import fisher_discriminant_ratio
from utils.names import BEST_LOG_FILE, BEST_PARAM_FILE, METRICS_FILE
from utils.run.prepare import Prepared, make_train_state
from utils.engine.records import class_mean
from utils.run.rundir import RunDir
from utils.run.runlog import log, speaks
from utils.run.signals import GracefulStop
from utils.engine.train import TrainState, cosine_lr, train_one_epoch

# The per-epoch records of trackRecords.ckpt (one entry per epoch each).
TRACK_KEYS = ("acc_train", "acc_val", "weight_norm", "correct", "class_loss", "step_loss")


@dataclass
class LoopState:
    """What the loop carries from one epoch to the next; its keys are the checkpoint's."""
    epoch: int = 0             # the last completed epoch
    best_acc: float = 0.0      # validation class-averaged accuracy of the best epoch (0: the initial weights)
    best_epoch: int = 0
    records: list = field(default_factory=list)   # metrics.csv rows
    track: dict = field(default_factory=lambda: {k: [] for k in TRACK_KEYS})
    skipped_steps: int = 0     # steps optim.nonfinite = skip did not apply

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "best_acc": float(self.best_acc), "best_epoch": int(self.best_epoch),
                "records": list(self.records), "track": {k: list(v) for k, v in self.track.items()},
                "skipped_steps": int(self.skipped_steps)}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's loop state; ValueError when its records are not this version's."""
        track = dict(state["track"])
        if "step_loss" not in track:  # checkpoints from before the per-step losses
            track["step_loss"] = [torch.empty(0) for _ in track.get("acc_val", [])]
        if set(track) != set(TRACK_KEYS):
            raise ValueError(f"records {sorted(track)}, expected {sorted(TRACK_KEYS)}")
        self.epoch, self.best_acc, self.best_epoch = int(state["epoch"]), float(state["best_acc"]), int(state["best_epoch"])
        self.records = list(state["records"])
        self.track = {k: list(track[k]) for k in TRACK_KEYS}
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def track_records(self, train_labels: torch.Tensor) -> dict:
        """trackRecords.ckpt: the per-epoch records stacked (E x K, E x N, E x steps)."""
        t = self.track
        return {
            "acc_train": torch.tensor(t["acc_train"]),
            "acc_val": torch.tensor(t["acc_val"]),
            "weight_norm": torch.stack(t["weight_norm"]),
            "correct": torch.stack(t["correct"]),
            "class_loss": torch.stack(t["class_loss"]),  # E x K mean per-image CE of the training batches
            "step_loss": _stack_padded(t["step_loss"]),  # E x steps: the loss of every training step
            "labels": train_labels.cpu(),
            "best_epoch": self.best_epoch,
        }


def fit(p: Prepared, rundir: RunDir, writer, train, val, passes: EvalPasses, ckpt: RunCheckpoint) -> dict:
    """Train ``p.model`` for the config's epochs (from the checkpoint's, when resuming);
    returns trackRecords.ckpt's content.  The best weights are in best.paramOnly."""
    guard = NonFiniteGuard(p.cfg.optim.nonfinite, p.device)
    state = make_train_state(p, passes.augment, guard)
    loop = LoopState()
    ckpt.bind(p.model, state.optimizer, {"shuffle": state.shuffle_generator, "augment": state.augment_generator},
              p.device)
    if ckpt.resuming:
        ckpt.restore(loop)
    else:
        rundir.save_torch(BEST_PARAM_FILE, p.model.state_dict())  # the initial weights: a run always has a best
    with GracefulStop() as stop:
        for epoch in range(loop.epoch + 1, p.cfg.optim.total_epoch_num + 1):
            _epoch(p, rundir, writer, train, val, passes, state, guard, loop, ckpt, epoch)
            ckpt.save(loop, stop.requested)
    log.info(f"best epoch {loop.best_epoch} with validation class-averaged accuracy {loop.best_acc:.4f}")
    return loop.track_records(p.data.train_labels)


def _epoch(p: Prepared, rundir: RunDir, writer, train, val, passes: EvalPasses, state: TrainState,
           guard: NonFiniteGuard, loop: LoopState, ckpt: RunCheckpoint, epoch: int) -> None:
    """One epoch: train, validate, keep the best, record; ``loop`` then holds it."""
    t0 = time.perf_counter()
    o, model = p.cfg.optim, p.model
    lr = cosine_lr(o.base_lr, epoch, o.total_epoch_num)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.objective.set_epoch(epoch)
    out = _train(model, train, state, guard, ckpt, epoch, o.total_epoch_num)
    if state.project_every_epoch is not None:
        state.project_every_epoch()
    val_acc = passes.evaluate(model, val, p.data.n_classes).class_avg_acc
    record = {"epoch": epoch, "lr": lr, **out["record"], "val_acc": val_acc}
    improved = val_acc > loop.best_acc
    if improved:
        loop.best_acc, loop.best_epoch = val_acc, epoch
        ckpt.save_best(model, epoch)
        rundir.append_line(BEST_LOG_FILE, f"The best model is achieved at epoch-{epoch}: loss{record['train_loss']:.5f}, "
                                          f"acc-all:{record['train_acc']:.5f}, acc-avg-cls:{val_acc:.5f}.")
    record["best_val_acc"] = loop.best_acc
    record["seconds"] = time.perf_counter() - t0
    weight_norm = model.classifier_weight().norm(dim=1).cpu()
    _record(loop, record, out, weight_norm, p)
    writer.add_histogram("classifier/weight_norm_per_class", weight_norm, epoch)
    write_epoch(writer, record)
    if o.fdr_every and (epoch - 1) % o.fdr_every == 0:
        log_fdr(model, passes, writer, {"train": train, "val": val}, p.data.n_classes, epoch)
    rundir.write_csv(METRICS_FILE, list(loop.records[0].keys()), [list(r.values()) for r in loop.records])
    log.info(_epoch_line(record, o.total_epoch_num, improved))
    writer.flush()  # the events of every epoch the checkpoint covers are on disk before it is
    skipped = guard.end_epoch()
    loop.skipped_steps += skipped
    if skipped:
        log.info(f"epoch {epoch}: skipped {skipped} steps with a non-finite loss or gradient (optim.nonfinite = skip)")
    loop.epoch = epoch


def _train(model, train, state: TrainState, guard: NonFiniteGuard, ckpt: RunCheckpoint, epoch: int,
           total: int) -> dict:
    """One training epoch; a non-finite loss ends the run with what it kept (TrainingDiverged)."""
    guard.start_epoch(epoch)
    try:
        return train_one_epoch(model, train, state, epoch, total, show_progress=speaks())
    except NonFiniteLoss as exc:
        raise TrainingDiverged(ckpt.diverged_message(exc.value, exc.epoch, exc.step)) from None
    except FloatingPointError as exc:  # the epoch's mean loss: a step the device-side flag had not reported yet
        value = str(exc).split(" in epoch")[0].replace("training loss became ", "")
        raise TrainingDiverged(ckpt.diverged_message(value, epoch, guard.first_bad_step())) from None


def _record(loop: LoopState, record: dict, out: dict, weight_norm: torch.Tensor, p: Prepared) -> None:
    loop.records.append(record)
    t = loop.track
    t["acc_train"].append(record["train_acc_cls"])
    t["acc_val"].append(record["val_acc"])
    t["weight_norm"].append(weight_norm)
    t["correct"].append(out["correct"])
    t["class_loss"].append(class_mean(out["sample_loss"], p.data.train_labels, p.data.n_classes))
    t["step_loss"].append(out["step_loss"])


def _epoch_line(record: dict, total: int, improved: bool) -> str:
    terms = " ".join(f"{k[6:]}={v:.4f}" for k, v in record.items()
                     if k.startswith("train_") and k not in ("train_loss", "train_acc", "train_acc_cls"))
    return (f"epoch {record['epoch']}/{total} lr {record['lr']:.5f} loss {record['train_loss']:.4f} ({terms}) "
            f"train acc {record['train_acc']:.4f} val acc-avg-cls {record['val_acc']:.4f}"
            f"{' *best*' if improved else ''} [{record['seconds']:.1f}s]")


def _stack_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """E x max-length, NaN where an epoch has fewer values (a run resumed from an older checkpoint)."""
    width = max((r.numel() for r in rows), default=0)
    out = torch.full((len(rows), width), float("nan"))
    for i, r in enumerate(rows):
        out[i, :r.numel()] = r
    return out


def write_epoch(writer, record: dict) -> None:
    """An epoch's scalars in TensorBoard: the rate, each loss term, the accuracies."""
    epoch = record["epoch"]
    writer.add_scalar("lr", record["lr"], epoch)
    for key, value in record.items():
        if key.startswith("train_") and key not in ("train_acc", "train_acc_cls"):
            writer.add_scalar(f"loss/{key[6:]}", value, epoch)
    writer.add_scalar("acc/train", record["train_acc"], epoch)
    writer.add_scalar("acc/train_class_avg", record["train_acc_cls"], epoch)
    writer.add_scalar("acc/val_class_avg", record["val_acc"], epoch)


def log_fdr(model, passes: EvalPasses, writer, splits: dict, n_classes: int, epoch: int) -> None:
    """The FDR of each split's features in TensorBoard (``optim.fdr_every``); computed on the CPU."""
    for name, split in splits.items():
        result = passes.evaluate(model, split, n_classes, want_features=True)
        writer.add_scalar(f"FDR/{name}", fisher_discriminant_ratio(result.features, split.labels, n_classes), epoch)
