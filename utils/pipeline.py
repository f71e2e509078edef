"""One pipeline for both stages.

    config -> data -> model -> objective -> train loop -> evaluation -> outputs

What differs between stage 1 and stage 2 is data, not code: which parameters
train, where the initial weights come from, and which post-hoc adjustments
(logit adjustment, classifier normalisation, MaxNorm) the classifier gets.
Every check that can fail (config, stage-1 run, data files) happens before
the run directory is created.
"""
from __future__ import annotations

import math
import pickle
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from models import build_model
from utils import distributed as ddp
from utils.accel import FastPath, keep_freed_memory, make_fast_path, resolve_eval_batch_size, resolve_threads
from utils.augment import BatchAugment
from utils.checkpoint import (FINAL_EVENTS_SUFFIX, RunCheckpoint, _settle_best, apply_determinism, delete_old_copy,
                              open_run, plan_run, run_directory)
from utils.config import Config, ConfigError, recorded_form, unused_optim_keys
from utils.errors import CheckpointError, RunDirError, UserError
from utils.data import LTData, load_dataset
from utils.evaluation import final_evaluation, log_fdr
from utils.objective import (decayed_parameters, describe_parameters, init_classifier_bias,
                             make_objective, make_optimizer, norm_param, trained_parameters)
from utils.records import class_mean
from utils.regularizers import MaxNorm, normalise_classifier
from utils.rundir import (ARGS_FILE, BEST_LOG_FILE, BEST_PARAM_FILE, METRICS_FILE, TRACK_RECORDS_FILE,
                          TRAIN_LOG_FILE, FollowerRunDir, RunDir, load_state_dict)
from utils.runlock import RunLock
from utils.stage1 import (CLASSIFIER_PREFIX, Stage1Run, adapt_state_dict, apply_bn_weight_init, load_into,
                          read_stage1)
from utils.tau_sweep import parse_taus, run_sweep
from utils.batches import make_splits
from models.small import SMALL_MODELS, small_model_options
from utils.train import SplitTensors, TrainState, cosine_lr, evaluate, train_one_epoch


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    rank_device = ddp.device_for(name)  # under torchrun on CUDA: the GPU of LOCAL_RANK
    if rank_device is not None:
        return rank_device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r} but CUDA is not available on this machine; use auto or cpu")
    return device


def use_device(name: str) -> torch.device:
    """:func:`resolve_device`, and ``cuda:N`` made the current CUDA device, so that kernels,
    NCCL and ``torch.cuda.*`` calls without a device argument also go to GPU N."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)  # also seeds every CUDA device


class RunLog:
    """Human-readable log: to the terminal and to train.log (rank 0 only under torchrun)."""

    def __init__(self, run: RunDir):
        self.run = run

    def info(self, message: str) -> None:
        if not self.run.writes:
            return
        try:
            print(message, flush=True)
        except (BrokenPipeError, ValueError):  # a closed terminal or pipe (| head): train.log still gets it
            pass
        self.run.append_line(TRAIN_LOG_FILE, message)


class NullWriter:
    """TensorBoard's SummaryWriter for the ranks that do not write (everything is a no-op)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


# ---------------------------------------------------------------------------
# Model and objective from the config
# ---------------------------------------------------------------------------

def make_model(cfg: Config, data: LTData) -> nn.Module:
    m = cfg.model
    model = build_model(
        m.name, data.n_classes,
        in_channels=data.in_channels,
        # the original picks the 224-pixel stem by dataset; IMResNet names ask for it too
        small_input=not (m.name.startswith("IM") or cfg.data.name in ("ImageNet", "MiniImagenet")),
        use_etf=m.use_etf, train_etf_norm=m.train_etf_norm, etf_norm_rate=m.etf_norm_rate,
        normalize_feature=m.normalize_feature, last_relu=m.last_relu,
        use_feature_bias=m.use_feature_bias, logit_normalization=m.logit_normalization,
        bn_eps=m.bn_eps, class_counts=data.class_counts,
        la_tau=m.logit_adjustment_tau, la_for_training=m.logit_adjustment_for_training,
        la_additive=m.use_additive_logit_adjustment,
        **(small_model_options(m, data) if m.name in SMALL_MODELS else dict(
            activation_type=m.activation_type, activation_param=m.activation_param,
            identity_skip=m.identity_skip, one_param_bn=m.one_param_bn, use_dr_balancer=m.use_dr_balancer)),
    )
    if m.modify_bn_weight:
        apply_bn_weight_init(model, cfg)
    return model


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

@dataclass
class Prepared:
    cfg: Config
    stage: str
    device: torch.device
    data: LTData
    model: nn.Module
    stage1: Optional[Stage1Run]
    fast: FastPath = field(default_factory=FastPath)


def prepare(cfg: Config, stage: str, allow_unfinished_stage1: bool = False) -> Prepared:
    """Everything that can fail on bad input, before anything is written."""
    device = use_device(cfg.device)
    torch.set_num_threads(resolve_threads(cfg.num_threads))
    if device.type == "cpu":
        keep_freed_memory()
    seed_everything(cfg.seeds)
    stage1 = (read_stage1(cfg, allow_unfinished=allow_unfinished_stage1)
              if (stage == "second" and cfg.model.is_pretrained) else None)
    data = load_dataset(cfg.data.name, cfg.data.root, cfg.data.imb_type, cfg.data.imb_factor,
                        cfg.data.n_classes, download=cfg.data.download, helena_counts=cfg.data.helena_counts)
    # resolved once, here, so every evaluation pass and args.json see the same number
    cfg.data.eval_batch_size = resolve_eval_batch_size(cfg.data.eval_batch_size, device, data.input_size)
    check_adjustment_range(cfg, data.class_counts)
    try:
        model = make_model(cfg, data)
        init_classifier_bias(cfg, model)  # sigmoid losses: -log(K-1); stage-1 weights loaded below win
        if stage1 is not None:
            prefix = getattr(model, "classifier_prefix", CLASSIFIER_PREFIX)  # small models: "fc."
            fresh_classifier = cfg.model.load_only_representation or not cfg.model.load_last_linear
            state = adapt_state_dict(stage1.state_dict, stage1.config.model.use_etf, cfg.model.use_etf,
                                     fresh_classifier, prefix=prefix)
            stage1.skipped_keys = load_into(model, state, strict=not fresh_classifier,
                                            source=stage1.path / BEST_PARAM_FILE, prefix=prefix,
                                            ignore_restrict_load=cfg.model.ignore_restrict_load)
        model.to(device)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise ConfigError(memory_message(cfg, device, "building the model")) from None
        raise
    if ddp.context().enabled and cfg.sync_bn:
        ddp.convert_sync_batchnorm(model)  # training-mode statistics over the global batch
    if cfg.optim.norm_type in ("L2", "tau"):
        normalise_classifier(model.classifier, cfg.optim.norm_type, norm_param(cfg))
    fast = make_fast_path(model, device, cfg.precision, cfg.memory_format, cfg.compile)
    return Prepared(cfg, stage, device, data, model, stage1, fast)


def check_adjustment_range(cfg: Config, class_counts) -> None:
    """Multiplicative logit adjustment scales logit c by 1 / pi_c^tau = exp(-tau log pi_c): with
    the rarest class of this dataset, a tau whose factor overflows float32 would turn logits into
    inf and NaN.  Refused before any work, naming the largest tau that fits."""
    m = cfg.model
    if m.use_additive_logit_adjustment:
        return
    taus = [m.logit_adjustment_tau] + parse_taus(m.logit_adjustment_tau_sweep)
    rarest = -math.log(min(class_counts) / sum(class_counts))
    limit = math.log(float(np.finfo(np.float32).max)) / 2  # half the exponent range: logits keep room too
    worst = max(taus)
    if rarest > 0 and worst * rarest > limit:
        key = ("model.logit_adjustment_tau_sweep" if worst != m.logit_adjustment_tau
               else "model.logit_adjustment_tau")
        raise ConfigError(f"{key}: tau {worst:g} with multiplicative adjustment scales the rarest class's logit by "
                          f"1/pi^tau = e^{worst * rarest:.0f}, beyond float32; on {cfg.data.name} tau must stay "
                          f"<= {limit / rarest:.2f}")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, the CPU allocator's failure, or Python's MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                  if t is not None)
    if types and isinstance(exc, types):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def memory_message(cfg: Config, device: torch.device, phase: str) -> str:
    """Which keys made a run too big for the memory of its device, in one line."""
    m = cfg.model
    if phase == "building the model":
        if m.name in ("BNMLP", "MLResBlock"):
            keys = f"model.mlp_features_d = {m.mlp_features_d}, model.mlp_hlayer_n = {m.mlp_hlayer_n}"
        else:
            keys = f"model.name = {m.name!r}, data.n_classes = {cfg.data.n_classes}"
        return f"out of memory on {device} {phase} ({keys}); choose a smaller model, or another device"
    return (f"out of memory on {device} {phase} (data.batch_size = {cfg.data.batch_size}, data.eval_batch_size = "
            f"{cfg.data.eval_batch_size}, model.name = {m.name!r}); lower data.batch_size or data.eval_batch_size")


def _lock_run_directory(cfg: Config, exp_root) -> Optional[RunLock]:
    """Rank 0 takes the run directory's lock for the whole run; a refusal reaches every rank."""
    failure, lock = None, None
    if ddp.context().is_main:
        try:
            lock = RunLock(run_directory(cfg, exp_root)).acquire()
        except UserError as exc:
            failure = exc
    if ddp.any_rank(failure is not None):
        raise failure if failure is not None else RunDirError("rank 0 could not lock the run directory; see its error")
    return lock


def _open_on_rank0(plan, exp_root, cfg) -> RunDir:
    failure, rundir = None, None
    if ddp.context().is_main:
        try:
            rundir = open_run(plan, exp_root, cfg)
        except UserError as exc:
            failure = exc
    if ddp.any_rank(failure is not None):
        raise failure if failure is not None else RunDirError("rank 0 could not open the run directory; see its error")
    return rundir if rundir is not None else FollowerRunDir(plan.path)


def run(cfg: Config, stage: str, exp_root: str | Path = "exp", resume: Optional[bool] = None,
        overwrite: bool = False, allow_unfinished_stage1: bool = False) -> Path:
    """Train and/or evaluate one seed; returns the run directory.

    An existing run directory is only touched with ``resume`` (default: the
    config's ``load_checkpoint``) or ``overwrite`` (see utils/checkpoint.py).
    The run holds the directory's lock (utils/runlock.py) from before it plans
    until it ends, whatever ends it.
    """
    resume = cfg.load_checkpoint if resume is None else resume
    lock = _lock_run_directory(cfg, exp_root)
    try:
        return _run_locked(cfg, stage, exp_root, resume, overwrite, allow_unfinished_stage1, lock)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(cfg: Config, stage: str, exp_root, resume: bool, overwrite: bool, allow_unfinished_stage1: bool,
                lock: Optional[RunLock]) -> Path:
    started = time.perf_counter()
    plan = plan_run(cfg, stage, exp_root, resume, overwrite, locked=True)
    # under torchrun: every rank has planned (and read any checkpoint) before rank 0 writes
    ddp.agree((plan.action, plan.first_epoch), f"what to do with {plan.path}")
    if plan.action == "done":
        if ddp.context().is_main:
            print(plan.note, flush=True)
        return plan.path
    apply_determinism(cfg.deterministic)
    if cfg.compile != "off":
        torch.compiler.reset()  # each seed compiles afresh: no graph, guard or CUDA graph of the previous one
    p = prepare(cfg, stage, allow_unfinished_stage1)
    rundir = _open_on_rank0(plan, exp_root, cfg)
    ddp.barrier()
    log = RunLog(rundir)
    ckpt = RunCheckpoint(rundir, cfg, stage, plan, log)
    try:
        _train_and_evaluate(p, plan, rundir, log, ckpt, lock)
        ckpt.finish()
    except Exception as exc:
        failure = _failure(exc, p, plan, rundir, ckpt)
        if failure is exc:
            raise
        raise failure from None
    log.info(f"finished in {time.perf_counter() - started:.1f} s")
    ddp.barrier()  # no rank starts the next seed before rank 0 has finished writing this one
    return rundir.path


def _failure(exc: Exception, p: Prepared, plan, rundir: RunDir, ckpt: RunCheckpoint) -> BaseException:
    """What a failed run raises, and what it leaves.

    Bad input found late (a full disk, a file system that went away, memory too small for the
    batch): one line.  A new run that fails so before its first checkpoint holds nothing worth
    keeping and is removed (nothing written, as for any bad input; the next attempt needs no
    flag).  Otherwise the last checkpoint and its best weights stay, and --resume continues."""
    oom = is_out_of_memory(exc)
    if not (isinstance(exc, (UserError, OSError)) or oom):
        return exc  # a bug, a diverged loss, an interrupt: handled by the command line as they are
    fresh = plan.action != "resume" and ckpt.saved_epoch == 0
    if rundir.writes and rundir.path.is_dir():
        if fresh and plan.created:
            shutil.rmtree(rundir.path, ignore_errors=True)
        else:
            _settle_after_failure(rundir, ckpt)
    if oom:
        if fresh:
            return ConfigError(memory_message(p.cfg, p.device, "in the first epoch"))
        return ConfigError(memory_message(p.cfg, p.device, "during the run")
                           + "; the last checkpoint is kept: rerun with --resume and a smaller data.eval_batch_size")
    if isinstance(exc, OSError):
        kept = ("nothing of the run was kept" if fresh else
                "the last checkpoint and the best weights are kept")
        return RunDirError(f"cannot write {exc.filename or rundir.path}: {exc.strerror or exc} ({kept}; free space or "
                           "fix the file system, then rerun" + ("" if fresh else " with --resume") + ")")
    return exc


def _train_and_evaluate(p: Prepared, plan, rundir: RunDir, log: RunLog, ckpt: RunCheckpoint,
                        lock: Optional[RunLock]) -> None:
    cfg, stage, dist = p.cfg, p.stage, ddp.context()
    if lock is not None and lock.taken_over is not None:
        owner = lock.taken_over
        log.info(f"took over the lock of {owner.describe()} ({owner.command or 'command unknown'}), which is no "
                 "longer running")
    recorded = {**recorded_form(cfg.to_dict()), "load_checkpoint": False}  # re-running it starts afresh
    rundir.write_json(ARGS_FILE, recorded)
    log.info(f"run directory: {rundir.path}")
    if plan.note:
        log.info(plan.note)
    problem = delete_old_copy(plan)
    if problem:
        log.info(f"warning: {problem}")
    unused = unused_optim_keys(cfg.to_dict())
    if unused:
        log.info("evaluation only (optim.total_epoch_num = 0): " + ", ".join(f"{k} = {v!r}" for k, v in unused.items())
                 + " had no effect; args.json records the defaults")
    log.info(f"python {sys.version.split()[0]}, torch {torch.__version__}, device {p.device}")
    log.info(f"{p.fast.describe()}, {torch.get_num_threads()} CPU threads")
    if dist.enabled:
        log.info(f"distributed: {dist.describe()}; global batch {cfg.data.batch_size} = {dist.world_size} x "
                 f"{cfg.data.batch_size // dist.world_size}; BatchNorm statistics "
                 f"{'over the global batch' if cfg.sync_bn else 'per process (sync_bn = false)'}")
    if p.stage1 is not None:
        log.info(f"loaded stage-1 weights from {p.stage1.path / BEST_PARAM_FILE}{p.stage1.unfinished_note}")
        if p.stage1.skipped_keys:
            log.info(f"ignore_restrict_load: {len(p.stage1.skipped_keys)} keys not loaded: "
                     + ", ".join(p.stage1.skipped_keys))
    for line in p.data.summary_lines():
        log.info(line)

    from torch.utils.tensorboard import SummaryWriter
    writer = (SummaryWriter(log_dir=str(rundir.path), purge_step=plan.first_epoch if ckpt.resuming else None)
              if rundir.writes else NullWriter())
    final_writer = None
    try:
        train, val, test, augment = make_splits(p.data, p.device, cfg.data.num_workers)
        track = None
        if cfg.optim.total_epoch_num > 0:
            track = fit(p, rundir, writer, log, train, val, augment, ckpt)
            if rundir.writes:
                p.model.load_state_dict(_best_weights(rundir, p.device))
            ddp.broadcast_module(p.model)  # no shared filesystem needed for the other ranks
        else:
            # Evaluation only: the adjusted model is what this run stands for.
            rundir.save_torch(BEST_PARAM_FILE, p.model.state_dict())
            rundir.write_csv(METRICS_FILE, ["epoch"], [])
        chosen_tau = None
        if cfg.model.logit_adjustment_tau_sweep:
            chosen_tau = run_sweep(p, rundir, log, val, test, augment)["tau"]
        val_acc = evaluate(p.model, val, augment, p.data.n_classes, cfg.data.eval_batch_size,
                           fast=p.fast).class_avg_acc
        log.info(f"validation class-averaged accuracy of the final model: {val_acc:.4f}")
        # the final evaluation's events go to their own file, which a resumed run replaces whole
        final_writer = (SummaryWriter(log_dir=str(rundir.path), filename_suffix=FINAL_EVENTS_SUFFIX)
                        if rundir.writes else NullWriter())
        final = final_evaluation(p, rundir, final_writer, log, train, test, augment, val)
        if track is not None:
            rundir.save_torch(TRACK_RECORDS_FILE, track)
        if rundir.writes:
            _write_hparams(final_writer, cfg, stage, final)
        if chosen_tau is not None:  # where a reader looks first: the run's own config
            recorded["model"] = {**recorded["model"], "logit_adjustment_tau": chosen_tau}
            rundir.write_json(ARGS_FILE, recorded)
            log.info(f"args.json records the chosen tau {chosen_tau:g} as model.logit_adjustment_tau "
                     f"(configured: {cfg.model.logit_adjustment_tau:g})")
    finally:
        ckpt.close()  # also names the epoch and step of a FloatingPointError on its way out
        for w in (writer, final_writer):
            if w is not None:
                _close_quietly(w)


def _best_weights(rundir: RunDir, device: torch.device) -> dict:
    path = rundir.file(BEST_PARAM_FILE)
    try:
        return {k: v.to(device) for k, v in load_state_dict(path).items()}
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"cannot reload the best weights {path} for the final evaluation ({exc}); "
                              "rerun with --resume once the file is back, or --overwrite") from None


def _settle_after_failure(rundir: RunDir, ckpt: RunCheckpoint) -> None:
    """After a failed write: the best weights are those of the last checkpoint; the pending file
    of an epoch whose checkpoint never landed is removed (as --resume would)."""
    if rundir.writes and rundir.path.is_dir():
        try:
            _settle_best(rundir, {"best_epoch": ckpt.best_epoch})
        except OSError:
            pass


def _close_quietly(writer) -> None:
    """Close a TensorBoard writer whose disk may be full: its error must not hide the run's own."""
    try:
        writer.close()
    except Exception:
        if sys.exc_info()[0] is None:
            raise


def _write_hparams(writer, cfg: Config, stage: str, final: dict) -> None:
    """The HParams tab's record of the run (what SummaryWriter.add_hparams writes, but into the
    final evaluation's own events file rather than a new one)."""
    from torch.utils.tensorboard.summary import hparams
    metrics = {**{f"hparam/acc_{k}": v for k, v in final["acc"].items()},
               **{f"hparam/FDR_{k}": v for k, v in final["fdr"].items()}}
    for summary in hparams({"seed": cfg.seeds, "exp_name": cfg.exp_name, "stage": stage}, metrics):
        writer.file_writer.add_summary(summary)
    for key, value in metrics.items():
        writer.add_scalar(key, value)


def make_train_state(p: Prepared, augment: BatchAugment, log: Optional[RunLog] = None) -> TrainState:
    """What trains, with what objective and optimizer, from which generators: the
    state :func:`utils.train.train_one_epoch` needs (under torchrun, with the DDP forward)."""
    cfg, model, device = p.cfg, p.model, p.device
    say = log.info if log is not None else (lambda message: None)
    o = cfg.optim
    named = trained_parameters(model, p.stage, cfg)
    trained_ids = {id(prm) for _, prm in named}
    for prm in model.parameters():
        prm.requires_grad_(id(prm) in trained_ids)
    params = [prm for _, prm in named]
    decayed = decayed_parameters(model, named, cfg, p.data.groups())
    say(describe_parameters(cfg, named, decayed))
    if o.drw > 0:
        say(f"DRW: epochs 1-{o.drw} train with plain CE, {o.loss_type} from epoch {o.drw + 1}")
    objective = make_objective(cfg, p.data.class_counts, decayed, device, classifier=model.classifier)
    optimizer = make_optimizer(cfg, params, objective)  # SGD applies the objective's coupled decay

    maxnorm = MaxNorm(model.classifier, norm_param(cfg)) if o.norm_type == "maxnorm" else None
    if maxnorm is not None:
        say(f"MaxNorm threshold {maxnorm.threshold:.5f} (fixed at load), projected every {o.maxnorm_every}")
    project = (lambda: maxnorm.project(model.classifier)) if maxnorm is not None else None

    def set_train_mode(m: nn.Module) -> None:
        m.train()
        if p.stage == "second" and o.frozen_bn_mode == "eval":
            for module in m.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    # both on the CPU whatever the device: one seed shuffles and augments alike on CPU and CUDA,
    # and checkpoints hold CPU generator states only (a run may resume on another device)
    shuffle_gen = torch.Generator().manual_seed(cfg.seeds)
    aug_gen = torch.Generator().manual_seed(cfg.seeds + 1)
    forward = None
    if ddp.context().enabled:
        # every rank draws the same shuffle and augmentation numbers (utils/distributed.py)
        forward = ddp.wrap_ddp(model, device, cfg.sync_bn)
        if cfg.compile != "off":
            forward = torch.compile(forward, mode=None if cfg.compile == "default" else cfg.compile)
    state = TrainState(optimizer=optimizer, objective=objective, augment=augment,
                       batch_size=cfg.data.batch_size, n_classes=p.data.n_classes,
                       shuffle_generator=shuffle_gen, augment_generator=aug_gen,
                       after_step=project if (project and o.maxnorm_every == "step") else None,
                       set_train_mode=set_train_mode, fast=p.fast, forward=forward,
                       project_every_epoch=project if (project and o.maxnorm_every == "epoch") else None)
    return state


def fit(p: Prepared, rundir: RunDir, writer, log: RunLog, train: SplitTensors, val: SplitTensors,
        augment: BatchAugment, ckpt: Optional[RunCheckpoint] = None):
    cfg, model, device = p.cfg, p.model, p.device
    o = cfg.optim
    state = make_train_state(p, augment, log)
    optimizer, objective, project = state.optimizer, state.objective, state.project_every_epoch
    shuffle_gen, aug_gen = state.shuffle_generator, state.augment_generator

    ckpt = ckpt or RunCheckpoint(rundir, cfg, p.stage, log=log)
    ckpt.bind(model, optimizer, {"shuffle": shuffle_gen, "augment": aug_gen}, state, device)

    # The initial weights are saved first, so a run always has a best.
    if not ckpt.resuming:
        rundir.save_torch(BEST_PARAM_FILE, model.state_dict())
    best_acc, best_epoch = 0.0, 0
    records: list[dict] = []
    track = {"acc_train": [], "acc_val": [], "weight_norm": [], "correct": [], "class_loss": [], "step_loss": []}
    total = o.total_epoch_num
    first_epoch, best_acc, best_epoch = ckpt.restore(records, track, best_acc, best_epoch)
    for epoch in range(first_epoch, total + 1):
        t0 = time.perf_counter()
        lr = cosine_lr(o.base_lr, epoch, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        objective.set_epoch(epoch)
        out = train_one_epoch(model, train, state, epoch, total)
        if project is not None:
            project()
        val_result = evaluate(model, val, augment, p.data.n_classes, cfg.data.eval_batch_size, fast=p.fast)
        val_acc = val_result.class_avg_acc
        record = {"epoch": epoch, "lr": lr, **out["record"], "val_acc": val_acc}
        improved = val_acc > best_acc
        if improved:
            best_acc, best_epoch = val_acc, epoch
            ckpt.save_best(model, epoch)
            rundir.append_line(BEST_LOG_FILE,
                               f"The best model is achieved at epoch-{epoch}: loss{record['train_loss']:.5f}, "
                               f"acc-all:{record['train_acc']:.5f}, acc-avg-cls:{val_acc:.5f}.")
        record["best_val_acc"] = best_acc
        record["seconds"] = time.perf_counter() - t0
        records.append(record)
        weight_norm = model.classifier_weight().norm(dim=1).cpu()
        track["acc_train"].append(record["train_acc_cls"])
        track["acc_val"].append(val_acc)
        track["weight_norm"].append(weight_norm)
        track["correct"].append(out["correct"])
        track["class_loss"].append(class_mean(out["sample_loss"], p.data.train_labels, p.data.n_classes))
        track["step_loss"].append(out["step_loss"])
        writer.add_histogram("classifier/weight_norm_per_class", weight_norm, epoch)
        write_epoch(writer, record)
        if cfg.optim.fdr_every and (epoch - 1) % cfg.optim.fdr_every == 0:
            log_fdr(p, writer, train, val, augment, epoch)
        rundir.write_csv(METRICS_FILE, list(records[0].keys()), [list(r.values()) for r in records])
        terms = " ".join(f"{k[6:]}={v:.4f}" for k, v in record.items()
                         if k.startswith("train_") and k not in ("train_loss", "train_acc", "train_acc_cls"))
        log.info(f"epoch {epoch}/{total} lr {lr:.5f} loss {record['train_loss']:.4f} ({terms}) "
                 f"train acc {record['train_acc']:.4f} val acc-avg-cls {val_acc:.4f}"
                 f"{' *best*' if improved else ''} [{record['seconds']:.1f}s]")
        writer.flush()  # the events of every epoch the checkpoint covers are on disk before it is
        ckpt.save(epoch, best_acc, best_epoch, records, track)
    log.info(f"best epoch {best_epoch} with validation class-averaged accuracy {best_acc:.4f}")
    track_out = {
        "acc_train": torch.tensor(track["acc_train"]),
        "acc_val": torch.tensor(track["acc_val"]),
        "weight_norm": torch.stack(track["weight_norm"]),
        "correct": torch.stack(track["correct"]),
        "class_loss": torch.stack(track["class_loss"]),  # E x K mean per-image CE of the training batches
        "step_loss": _stack_padded(track["step_loss"]),  # E x steps: the loss of every training step
        "labels": p.data.train_labels.cpu(),
        "best_epoch": best_epoch,
    }
    return track_out


def _stack_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """E x max-length, NaN where an epoch has fewer values (a run resumed from an older checkpoint)."""
    width = max((r.numel() for r in rows), default=0)
    out = torch.full((len(rows), width), float("nan"))
    for i, r in enumerate(rows):
        out[i, :r.numel()] = r
    return out


def write_epoch(writer, record: dict) -> None:
    epoch = record["epoch"]
    writer.add_scalar("lr", record["lr"], epoch)
    for key, value in record.items():
        if key.startswith("train_") and key not in ("train_acc", "train_acc_cls"):
            writer.add_scalar(f"loss/{key[6:]}", value, epoch)
    writer.add_scalar("acc/train", record["train_acc"], epoch)
    writer.add_scalar("acc/train_class_avg", record["train_acc_cls"], epoch)
    writer.add_scalar("acc/val_class_avg", record["val_acc"], epoch)
