"""One pipeline for both stages: the run, as a story.

    lock the run directory -> plan (new / resume / overwrite / done) -> prepare (data, model)
        -> open the run directory -> args.json, provenance.json
        -> fit (the epoch loop) -> tau sweep -> final evaluation -> finished mark

What differs between stage 1 and stage 2 is data, not code: which parameters train, where
the initial weights come from, and which post-hoc adjustments (logit adjustment, classifier
normalisation, MaxNorm) the classifier gets.  Every check that can fail (config, stage-1 run,
data files, run directory) happens before the run directory is created.  Figures are drawn
by the command line after ``run`` returns (training code does not plot).
"""
from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from utils import distributed

from utils.run import runlog
from utils.data.batches import make_splits
from utils.run.checkpoint import RunCheckpoint, _settle_best
from utils.config.rules import recorded_form, unused_optim_keys
from utils.config.schema import Config
from utils.run.determinism import apply_determinism
from utils.errors import CheckpointError, ConfigError, RunDirError, UserError
from utils.engine.evaluation import EvalPasses
from utils.run.fit import fit
from utils.names import ARGS_FILE, BEST_PARAM_FILE, FINAL_EVENTS_SUFFIX, METRICS_FILE, TRACK_RECORDS_FILE
from utils.run.outputs import final_evaluation, write_hparams
from utils.run.prepare import Prepared, is_out_of_memory, memory_message, prepare
from utils.run.provenance import record_start
from utils.run.open_dir import delete_old_copy, open_run
from utils.run.plan import RunPlan, plan_run, run_directory
from utils.run.rundir import FollowerRunDir, RunDir, load_state_dict
from utils.run.runlock import RunLock
from utils.run.runlog import log
from utils.run.tau_sweep import run_sweep


def run(cfg: Config, stage: str, exp_root: str | Path = "exp", resume: Optional[bool] = None,
        overwrite: bool = False, allow_unfinished_stage1: bool = False) -> Path:
    """Train and/or evaluate one seed; returns the run directory.

    An existing run directory is only touched with ``resume`` (default: the
    config's ``load_checkpoint``) or ``overwrite`` (see utils/run/plan.py).
    The run holds the directory's lock (utils/run/runlock.py) from before it plans
    until it ends, whatever ends it: rank 0 holds it for a torchrun launch.
    """
    resume = cfg.load_checkpoint if resume is None else resume
    lock = runlog.on_speaking_rank(lambda: RunLock(run_directory(cfg, exp_root)).acquire(), "lock the run directory")
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
    distributed.agree((plan.action, plan.first_epoch), f"what to do with {plan.path}")
    if plan.action == "done":
        runlog.say(plan.note)
        return plan.path
    apply_determinism(cfg.deterministic)
    if cfg.compile != "off":
        torch.compiler.reset()  # each seed compiles afresh: no graph, guard or CUDA graph of the previous one
    p = prepare(cfg, stage, allow_unfinished_stage1)
    rundir = (runlog.on_speaking_rank(lambda: open_run(plan, exp_root, cfg), "open the run directory")
              or FollowerRunDir(plan.path))
    distributed.barrier()
    ckpt = RunCheckpoint(rundir, cfg, stage, plan.checkpoint)
    with runlog.logging_to(rundir):
        try:
            _train_and_evaluate(p, plan, rundir, ckpt, lock)
            ckpt.finish()
        except Exception as exc:
            failure = _failure(exc, p, plan, rundir, ckpt)
            if failure is exc:
                raise
            raise failure from None
        log.info(f"finished in {time.perf_counter() - started:.1f} s")
    distributed.barrier()  # no rank starts the next seed before rank 0 has finished writing this one
    return rundir.path


def _train_and_evaluate(p: Prepared, plan: RunPlan, rundir: RunDir, ckpt: RunCheckpoint,
                        lock: Optional[RunLock]) -> None:
    cfg = p.cfg
    recorded = _start(p, plan, rundir, lock)
    train, val, test, augment = make_splits(p.data, p.device, cfg.data.num_workers)
    passes = EvalPasses(augment, p.eval_batch_size, p.fast)
    writer = rundir.summary_writer(purge_step=plan.first_epoch if ckpt.resuming else None)
    final_writer = None
    try:
        track = None
        if cfg.optim.total_epoch_num > 0:
            track = fit(p, rundir, writer, train, val, passes, ckpt)
            _reload_best_weights(p, rundir)
        else:
            # Evaluation only: the adjusted model is what this run stands for.
            rundir.save_torch(BEST_PARAM_FILE, p.model.state_dict())
            rundir.write_csv(METRICS_FILE, ["epoch"], [])
        chosen_tau = None
        if cfg.model.logit_adjustment_tau_sweep:
            splits = {"val": val} if cfg.param_search else {"val": val, "test": test}
            chosen_tau = run_sweep(p.model, cfg.model, p.data, splits, passes, cfg.data.eval_hflip, rundir)["tau"]
        val_acc = passes.evaluate(p.model, val, p.data.n_classes).class_avg_acc
        log.info(f"validation class-averaged accuracy of the final model: {val_acc:.4f}")
        # the final evaluation's events go to their own file, which a resumed run replaces whole
        final_writer = rundir.summary_writer(filename_suffix=FINAL_EVENTS_SUFFIX)
        evaluated = ("val", val) if cfg.param_search else ("test", test)
        final = final_evaluation(p.model, p.data, train, evaluated[1], evaluated[0], passes, rundir, final_writer,
                                 hflip=cfg.data.eval_hflip, save_features=cfg.save_features)
        if track is not None:
            rundir.save_torch(TRACK_RECORDS_FILE, track)
        write_hparams(final_writer, cfg.seeds, cfg.exp_name, p.stage, final)
        if chosen_tau is not None:  # where a reader looks first: the run's own config
            recorded["model"] = {**recorded["model"], "logit_adjustment_tau": chosen_tau}
            rundir.write_json(ARGS_FILE, recorded)
            log.info(f"args.json records the chosen tau {chosen_tau:g} as model.logit_adjustment_tau "
                     f"(configured: {cfg.model.logit_adjustment_tau:g})")
    finally:
        for w in (writer, final_writer):
            if w is not None:
                _close_quietly(w)


def _start(p: Prepared, plan: RunPlan, rundir: RunDir, lock: Optional[RunLock]) -> dict:
    """args.json and provenance.json, and the run log's first lines; returns what args.json records."""
    cfg = p.cfg
    if lock is not None and lock.taken_over is not None:
        owner = lock.taken_over
        log.info(f"took over the lock of {owner.describe()} ({owner.command or 'command unknown'}), which is no "
                 "longer running")
    recorded = args_record(cfg, p.eval_batch_size)
    rundir.write_json(ARGS_FILE, recorded)
    record_start(rundir, p.device, resumed_after=plan.first_epoch - 1 if plan.action == "resume" else None)
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
    _log_setup(p)
    return recorded


def args_record(cfg: Config, eval_batch_size: int) -> dict:
    """The config as args.json records it: re-loadable with --json_path (re-running it starts
    afresh), the evaluation batch as resolved for this run, an evaluation-only run's unread
    optimiser keys at their defaults."""
    recorded = {**recorded_form(cfg.to_dict()), "load_checkpoint": False}
    recorded["data"] = {**recorded["data"], "eval_batch_size": eval_batch_size}
    return recorded


def _log_setup(p: Prepared) -> None:
    cfg, dist = p.cfg, distributed.context()
    log.info(f"python {sys.version.split()[0]}, torch {torch.__version__}, device {p.device}")
    log.info(f"{p.fast.describe()}, {torch.get_num_threads()} CPU threads ({p.threads.reason or 'num_threads'})")
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


def _reload_best_weights(p: Prepared, rundir: RunDir) -> None:
    """The final evaluation is of the best epoch's weights: rank 0 reads them, every rank gets
    them from it (no shared filesystem needed)."""
    if runlog.speaks():
        path = rundir.file(BEST_PARAM_FILE)
        try:
            state = {k: v.to(p.device) for k, v in load_state_dict(path).items()}
        except (OSError, ValueError, pickle.UnpicklingError) as exc:
            raise CheckpointError(f"cannot reload the best weights {path} for the final evaluation ({exc}); "
                                  "rerun with --resume once the file is back, or --overwrite") from None
        p.model.load_state_dict(state)
    distributed.broadcast_module(p.model)


def _failure(exc: Exception, p: Prepared, plan: RunPlan, rundir: RunDir, ckpt: RunCheckpoint) -> BaseException:
    """What a failed run raises, and what it leaves.

    Bad input found late (a full disk, a file system that went away, memory too small for the
    batch): one line.  A new run that fails so before its first checkpoint holds nothing worth
    keeping and is removed (nothing written, as for any bad input; the next attempt needs no
    flag).  Otherwise the last checkpoint and its best weights stay, and --resume continues."""
    oom = is_out_of_memory(exc)
    if not (isinstance(exc, (UserError, OSError)) or oom):
        return exc  # a bug, a diverged loss, an interrupt: handled by the command line as they are
    fresh = plan.action != "resume" and ckpt.saved_epoch == 0
    if fresh and plan.created:
        rundir.remove_all()
    else:
        _settle_after_failure(rundir, ckpt)
    if oom:
        if fresh:
            return ConfigError(memory_message(p.cfg, p.device, "in the first epoch", p.eval_batch_size))
        return ConfigError(memory_message(p.cfg, p.device, "during the run", p.eval_batch_size)
                           + "; the last checkpoint is kept: rerun with --resume and a smaller data.eval_batch_size")
    if isinstance(exc, OSError):
        kept = ("nothing of the run was kept" if fresh else
                "the last checkpoint and the best weights are kept")
        return RunDirError(f"cannot write {exc.filename or rundir.path}: {exc.strerror or exc} ({kept}; free space or "
                           "fix the file system, then rerun" + ("" if fresh else " with --resume") + ")")
    return exc


def _settle_after_failure(rundir: RunDir, ckpt: RunCheckpoint) -> None:
    """After a failed write: the best weights are those of the last checkpoint; the pending file
    of an epoch whose checkpoint never landed is removed (as --resume would)."""
    if rundir.path.is_dir():
        try:
            _settle_best(rundir, {"best_epoch": ckpt.best_epoch})
        except OSError:
            pass


def _close_quietly(writer) -> None:
    """Close a TensorBoard writer whose disk may be full: its error must not hide the run's own
    (every epoch's events were flushed before its checkpoint)."""
    try:
        writer.close()
    except Exception:  # noqa: BLE001 - see the docstring
        pass
