"""Issue 16: one writer per run, a full disk survived, a kill in the final evaluation resumed
without duplicates, --overwrite that never half-deletes a run, and what stage 2 trusts.

The runs are tiny (an MLP of 1 k weights on Digits-LT, 3 epochs of 4 steps, no figures) and
in-process, except the concurrency test, where a second process is the point.  One
uninterrupted run (module fixture) is the reference every interrupted one must equal.
"""
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, digits_config, fill_disk
from utils.cli import main
from utils.names import CHECKPOINT_FILE

MODEL = {"name": "BNMLP", "mlp_features_d": 16, "mlp_hlayer_n": 1}
RUN = Path("Digits/BNMLP/first/h/0")
EPOCHS = 3


def _config(**top):
    cfg = digits_config("h", epochs=EPOCHS, model=dict(MODEL), optim={"fdr_every": 1}, num_threads=1, **top)
    cfg["data"]["imb_factor"] = 0.01  # 250 training images: 4 steps of 64 per epoch
    cfg["description"] = "free text with a lone surrogate \ud800 stays writable"
    return cfg


@pytest.fixture
def no_figures(monkeypatch):
    import utils.cli as cli
    monkeypatch.setattr(cli, "draw_figures", lambda run_dir: None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: the outputs every interrupted-and-resumed run must equal."""
    cwd = tmp_path_factory.mktemp("reference")
    (cwd / "cfg.json").write_text(json.dumps(_config()))
    assert main("first", ["--json_path", str(cwd / "cfg.json"), "--exp_root", str(cwd / "exp"), "--no_figures"]) == 0
    return cwd / "exp" / RUN


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(_config()))
    return tmp_path


def _same_results(ref: Path, other: Path) -> None:
    for name in ("acc.json", "best.paramOnly", "confMat.npy", "fdr.json", "note_bestModel.log"):
        assert (ref / name).read_bytes() == (other / name).read_bytes(), name


def _leftovers(run: Path) -> list:
    return sorted(p.name for p in run.iterdir() if p.name.endswith((".tmp", ".pending")))


# ---------------------------------------------------------------------------
# A full disk during a checkpoint save
# ---------------------------------------------------------------------------

def test_disk_full_during_a_checkpoint_then_resume(reference, in_tmp, no_figures, monkeypatch, capsys):
    from utils.run import rundir
    real = rundir._open_temporary
    # writes of checkpoint.ckpt: 1 the start marker, 2 epoch 1, 3 epoch 2 (fails)
    fill_disk(monkeypatch, CHECKPOINT_FILE, nth=3)
    assert main("first", ["--json_path", "cfg.json"]) == 2
    err = capsys.readouterr().err.strip()
    run = in_tmp / "exp" / RUN
    assert err.startswith(f"error: cannot write {run / CHECKPOINT_FILE}: No space left on device") and "\n" not in err
    assert "Traceback" not in err
    from utils.run.checkpoint import read_checkpoint
    ckpt = read_checkpoint(run / CHECKPOINT_FILE)
    assert ckpt["epoch"] == 1, "the last good checkpoint (epoch 1) is intact"
    best = torch.load(run / "best.paramOnly", weights_only=True)
    if ckpt["best_epoch"] == 1:
        assert all(torch.equal(best[k], ckpt["model"][k]) for k in best), "the best weights belong to it"
    assert _leftovers(run) == [], "no temporary or pending file is left"
    assert not (run / "acc.json").exists()
    assert not list(run.parent.glob(".*.lock")), "the lock is released"
    monkeypatch.setattr(rundir, "_open_temporary", real)  # space is back
    assert main("first", ["--json_path", "cfg.json", "--resume"]) == 0
    assert "after epoch 1 of 3" in capsys.readouterr().out
    _same_results(reference, run)


# ---------------------------------------------------------------------------
# A kill during the final evaluation
# ---------------------------------------------------------------------------

def _scalar_events(run: Path) -> list:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    seen = []
    for path in sorted(run.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value") or value.metadata.plugin_data.plugin_name == "scalars":
                    seen.append((value.tag, event.step))
    return seen


def test_kill_during_final_evaluation_then_resume_writes_each_scalar_once(reference, in_tmp, no_figures,
                                                                           monkeypatch, capsys):
    import utils.run.pipeline as pipeline
    real = pipeline.final_evaluation

    def killed_after_writing(*args, **kwargs):
        real(*args, **kwargs)  # acc.json, the confusion matrix and the final scalars are written...
        raise SystemExit("killed")  # ...then the process dies before the run is marked finished
    monkeypatch.setattr(pipeline, "final_evaluation", killed_after_writing)
    with pytest.raises(SystemExit):
        main("first", ["--json_path", "cfg.json"])
    run = in_tmp / "exp" / RUN
    assert (run / "acc.json").is_file()
    from utils.run.plan import run_state
    assert not run_state(run).finished, "acc.json alone does not make the run finished"
    from utils.viz.report import main as report
    assert report([str(in_tmp / "exp")]) == 2  # the only run is skipped: no runs found
    assert "skipping" in capsys.readouterr().err

    monkeypatch.setattr(pipeline, "final_evaluation", real)
    assert main("first", ["--json_path", "cfg.json", "--resume"]) == 0
    assert "after epoch 3 of 3" in capsys.readouterr().out
    events = _scalar_events(run)
    assert ("test/acc_All", 0) in events and ("acc/val_class_avg", EPOCHS) in events
    duplicates = sorted({e for e in events if events.count(e) > 1})
    assert duplicates == [], "each TensorBoard scalar once"
    assert sorted(events) == sorted(_scalar_events(reference)), "the same scalars as an uninterrupted run"
    _same_results(reference, run)
    # the surrogate of the description survives as JSON's escape
    assert json.loads((run / "args.json").read_text())["description"] == _config()["description"]


# ---------------------------------------------------------------------------
# Two runs of one directory at once
# ---------------------------------------------------------------------------

# Runs first.py's main, with the training held at its start until GO exists (so that the
# process that took the lock still holds it when the other one arrives) and no figures.
_DRIVER = """
import pathlib, sys, time
sys.path.insert(0, {root!r})
import utils.run.pipeline as pipeline
go, real = pathlib.Path(sys.argv[1]), pipeline.fit
def held_fit(*args, **kwargs):
    while not go.exists():
        time.sleep(0.02)
    return real(*args, **kwargs)
pipeline.fit = held_fit
from utils.cli import main
sys.exit(main("first", sys.argv[2:] + ["--no_figures"]))
"""


@pytest.mark.slow
def test_two_runs_of_one_directory_at_once(reference, tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps(_config()))
    driver = _DRIVER.format(root=str(ROOT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-c", driver, str(tmp_path / "go"), "--json_path", "cfg.json"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    deadline = time.monotonic() + 120
    while all(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "neither run was refused"
        time.sleep(0.05)
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    out, err = loser.communicate()
    assert loser.returncode == 2, err
    err = err.strip()
    assert err.startswith("error: run directory ") and "\n" not in err, err
    assert f"is in use by pid {winner.pid} on host" in err and "delete" in err and ".0.lock" in err
    (tmp_path / "go").touch()
    out, err = winner.communicate(timeout=120)
    assert winner.returncode == 0, err
    run = tmp_path / "exp" / RUN
    _same_results(reference, run)
    assert not (run.parent / ".0.lock").exists(), "the lock goes with the run"


# ---------------------------------------------------------------------------
# The lock itself
# ---------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path):
    from utils.errors import RunDirError
    from utils.run.runlock import LockOwner, RunLock, live_owner, lock_path
    run = tmp_path / "exp" / "x" / "0"
    first = RunLock(run).acquire()
    owner = LockOwner.from_bytes(lock_path(run).read_bytes())
    assert owner.pid == os.getpid() and live_owner(run) == owner
    with pytest.raises(RunDirError, match=f"is in use by pid {os.getpid()} on host .* since .*delete .*0.lock"):
        RunLock(run).acquire()
    first.release()
    assert not lock_path(run).exists() and not (tmp_path / "exp").exists(), "folders made for the lock go too"

    # a lock left by a process killed with SIGKILL: its flock is gone with it, its pid is dead
    dead = LockOwner(pid=_dead_pid(), host=owner.host, started="2025-01-01T00:00:00+00:00", command="first.py")
    run.parent.mkdir(parents=True)
    lock_path(run).write_bytes(dead.to_bytes())
    assert live_owner(run) is None
    lock = RunLock(run).acquire()
    assert lock.taken_over == dead
    assert LockOwner.from_bytes(lock_path(run).read_bytes()).pid == os.getpid()
    lock.release()

    # unreadable content and a free flock: nobody holds it
    lock_path(run).write_bytes(b"\x00garbage")
    RunLock(run).acquire().release()

    # another host's processes cannot be checked: refused, the lock left as it was
    other = LockOwner(pid=1, host="elsewhere", started="2025-01-01T00:00:00+00:00")
    lock_path(run).write_bytes(other.to_bytes())
    with pytest.raises(RunDirError, match="locked by pid 1 on host elsewhere .* cannot be checked"):
        RunLock(run).acquire()
    assert lock_path(run).read_bytes() == other.to_bytes()


def test_a_reused_pid_does_not_keep_a_lock_alive():
    from utils.run.runlock import LockOwner
    me = LockOwner.me()
    assert me.alive()
    if me.process_start is None:
        pytest.skip("no /proc: the pid alone decides")
    reused = LockOwner(pid=me.pid, host=me.host, started=me.started, process_start=str(int(me.process_start) - 1))
    assert not reused.alive()


def test_resume_after_a_kill_takes_over_the_stale_lock(reference, in_tmp, no_figures, monkeypatch, capsys):
    """SIGKILL leaves the lock file; --resume goes on without a manual step and says so."""
    import utils.run.fit as fit
    from utils.run.runlock import LockOwner, lock_path
    real = fit.train_one_epoch

    def killed_in_epoch_2(model, split, state, epoch, total, *args, **kwargs):
        if epoch == 2:
            raise SystemExit("killed")
        return real(model, split, state, epoch, total, *args, **kwargs)
    monkeypatch.setattr(fit, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(SystemExit):
        main("first", ["--json_path", "cfg.json"])
    run = in_tmp / "exp" / RUN
    dead = LockOwner(pid=_dead_pid(), host=LockOwner.me().host, started="2025-01-01T00:00:00+00:00",
                     command="first.py --json_path cfg.json")
    lock_path(run).write_bytes(dead.to_bytes())  # what the killed process would have left
    monkeypatch.setattr(fit, "train_one_epoch", real)
    assert main("first", ["--json_path", "cfg.json", "--resume"]) == 0
    log = (run / "train.log").read_text()
    assert f"took over the lock of pid {dead.pid} on host {dead.host}" in log and "no longer running" in log
    _same_results(reference, run)


# ---------------------------------------------------------------------------
# --overwrite
# ---------------------------------------------------------------------------

def test_overwrite_moves_the_old_run_aside_and_survives_an_undeletable_file(reference, in_tmp, no_figures,
                                                                             monkeypatch, capsys):
    import shutil
    run = in_tmp / "exp" / RUN
    shutil.copytree(reference, run)
    (run / "stray.txt").write_text("from the old run")
    import utils.run.open_dir as run_open
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):  # one file of the old copy cannot be deleted
        if Path(path).name.startswith(".0.old-"):
            denied = PermissionError(13, "Permission denied")
            if "onexc" in kwargs:
                kwargs["onexc"](os.unlink, str(Path(path) / "stray.txt"), denied)
            else:
                kwargs["onerror"](os.unlink, str(Path(path) / "stray.txt"), (PermissionError, denied, None))
            return
        return real_rmtree(path, *args, **kwargs)
    monkeypatch.setattr(run_open.shutil, "rmtree", rmtree)
    assert main("first", ["--json_path", "cfg.json", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "could not delete the previous run's copy" in out and "the new run is not affected" in out
    assert not (run / "stray.txt").exists(), "the new run is whole"
    _same_results(reference, run)
    copies = list(run.parent.glob(".0.old-*"))
    assert len(copies) == 1 and (copies[0] / "stray.txt").is_file()
    from utils.viz.report import collect_runs
    assert len(collect_runs([in_tmp / "exp"])) == 1, "the hidden copy is not a run of the report"


def test_overwrite_that_cannot_start_puts_the_old_run_back(reference, in_tmp, no_figures, monkeypatch, capsys):
    import shutil
    run = in_tmp / "exp" / RUN
    shutil.copytree(reference, run)
    before = sorted(p.name for p in run.iterdir())
    from utils.run import rundir
    real = rundir._open_temporary

    def full(fd, path):
        if Path(path).name == CHECKPOINT_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, path)
    monkeypatch.setattr(rundir, "_open_temporary", full)
    assert main("first", ["--json_path", "cfg.json", "--overwrite"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before
    assert (run / "acc.json").read_bytes() == (reference / "acc.json").read_bytes()
    assert not list(run.parent.glob(".0.old-*"))


# ---------------------------------------------------------------------------
# What stage 2 trusts, and what args.json records
# ---------------------------------------------------------------------------

def _stage2(tmp: Path, stage1: Path, name: str, **model) -> str:
    cfg = digits_config(name, "second", epochs=0, optim={"base_lr": 0.0, "loss_type": "CB", "weight_decay": 0.1},
                        model={**MODEL, "is_pretrained": True, "pretrained_path": str(stage1.parent),
                               "use_additive_logit_adjustment": False, **model})
    cfg["data"]["imb_factor"] = 0.01
    (tmp / f"{name}.json").write_text(json.dumps(cfg))
    return f"{name}.json"


def test_stage2_on_an_unfinished_stage1_only_when_asked(reference, in_tmp, no_figures, capsys):
    import shutil
    stage1 = in_tmp / "exp" / "Digits/BNMLP/first/h/0"
    shutil.copytree(reference, stage1)
    from utils.run.checkpoint import _marker
    from utils.config import from_dict
    torch.save(_marker(from_dict(_config()), None, finished=False, epoch=2, best_epoch=2, best_acc=0.3, model={},
                       optimizer={}, records=[], track={}, rng={}), stage1 / CHECKPOINT_FILE)
    cfg = _stage2(in_tmp, stage1, "la")
    assert main("second", ["--json_path", cfg]) == 2
    assert "has not finished (last completed epoch 2 of 3)" in capsys.readouterr().err
    assert main("second", ["--json_path", cfg, "--allow_unfinished_stage1"]) == 0
    log = (in_tmp / "exp/Digits/BNMLP/second/la/0/train.log").read_text()
    assert "--allow_unfinished_stage1: the stage-1 run has not finished (last completed epoch 2 of 3); loaded the " \
           "weights of its best epoch 2" in log


def test_args_json_records_the_chosen_tau_and_no_unused_optimiser_value(reference, in_tmp, no_figures, capsys):
    cfg = _stage2(in_tmp, reference, "sweep", logit_adjustment_tau=0.3, logit_adjustment_tau_sweep="1,0,0.5")
    assert main("second", ["--json_path", cfg]) == 0
    run = in_tmp / "exp/Digits/BNMLP/second/sweep/0"
    chosen = json.loads((run / "tau_sweep.json").read_text())
    assert chosen["taus"] == [0.0, 0.5, 1.0], "sorted"
    args = json.loads((run / "args.json").read_text())
    assert args["model"]["logit_adjustment_tau"] == chosen["best_tau"]
    # evaluation only: the optimiser values had no effect; args.json records the defaults
    assert (args["optim"]["base_lr"], args["optim"]["weight_decay"]) == (0.01, 0.0)
    assert args["optim"]["loss_type"] == "CB", "the loss sets a fresh classifier's bias: it is read"
    log = (run / "train.log").read_text()
    assert "evaluation only (optim.total_epoch_num = 0): optim.base_lr = 0.0, optim.weight_decay = 0.1" in log
    assert "had no effect; args.json records the defaults" in log
    # the run's own args.json resumes it (a finished run: nothing to do, no difference named)
    assert main("second", ["--json_path", str(run / "args.json"), "--resume"]) == 0
    assert "holds a finished run; nothing to do" in capsys.readouterr().out


def test_a_schedule_at_lr_0_for_every_epoch_is_warned_about():
    import warnings
    from utils.config import from_dict
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_dict(digits_config("x", epochs=1))
        from_dict(digits_config("y", epochs=2))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "optim.total_epoch_num = 1" in messages[0] and "lr 0" in messages[0]


def test_an_offline_cifar_download_leaves_no_empty_datasets_folder(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    from utils.data.datasets import load_dataset
    from utils.errors import DataError

    def offline(root, train, download):
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"the first bytes")  # a partial download
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(DataError, match="could not be downloaded .*Temporary failure in name resolution"):
        load_dataset("Cifar10", tmp_path / "datasets", "exp", 0.01, 10, download=True)
    assert not (tmp_path / "datasets").exists()
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "README.md").write_text("the data root")
    with pytest.raises(DataError):
        load_dataset("Cifar10", tmp_path / "datasets", "exp", 0.01, 10, download=True)
    assert [p.name for p in (tmp_path / "datasets").iterdir()] == ["README.md"], "what was there stays"


def test_resume_compares_the_keys_that_change_what_is_computed():
    from utils.run.plan import config_differences
    from utils.config import from_dict
    cfg = from_dict(_config()).to_dict()
    older = {k: v for k, v in cfg.items() if k != "sync_bn"}  # written before the key existed
    assert config_differences(older, cfg) == []
    assert config_differences(older, {**cfg, "sync_bn": False}) == [
        "sync_bn = '<absent>' in the checkpoint but False now"]
    assert config_differences(cfg, {**cfg, "description": "other", "device": "cpu"}) == []
    swept = {**cfg, "model": {**cfg["model"], "logit_adjustment_tau_sweep": "0,1"}}
    chosen = {**swept, "model": {**swept["model"], "logit_adjustment_tau": 1.0}}
    assert config_differences(swept, chosen) == [], "args.json records the chosen tau"
    evaluation = {**cfg, "optim": {**cfg["optim"], "total_epoch_num": 0}}
    assert config_differences(evaluation, {**evaluation, "optim": {**evaluation["optim"], "base_lr": 0.5}}) == []
    assert config_differences(cfg, {**cfg, "optim": {**cfg["optim"], "base_lr": 0.5}}) == [
        "optim.base_lr = 0.05 in the checkpoint but 0.5 now"]
