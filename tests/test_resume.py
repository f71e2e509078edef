"""Runs that survive: SIGKILL mid-epoch and Ctrl-C, then --resume, give the outputs of an
uninterrupted run; finished runs are never touched; NaN losses stop or are skipped.

The kill tests run real subprocesses on tiny Digits-LT data (the tiny network, 3 epochs of
4 steps): the reference and the resumed runs are first.py itself, the interrupted ones
first.py's main with each optimiser step held 0.2 s (tests/paced_cli.py) so that the signals
land inside an epoch on any machine.  metrics.csv is compared byte for byte except its
`seconds` column, which is wall-clock time and differs between any two runs, interrupted or
not (a resumed run keeps the seconds measured before the interruption for the epochs it
restored).  Resuming in another memory layout needs a conv net: ResNet18 there.
"""
import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL, digits_config
from utils.run.checkpoint import FORMAT, read_checkpoint
from utils.run.determinism import apply_determinism
from utils.run.signals import GracefulStop
from utils.cli import main

ROOT = Path(__file__).resolve().parents[1]
RUN = Path("Digits/BNMLP/first/resume/0")
RESNET_RUN = Path("Digits/ResNet18/first/resume/0")
EPOCHS = 3
STEP_PAUSE_S = "0.2"  # tests/paced_cli.py: an epoch of 4 steps lasts about 0.8 s


def _config(model=None, **optim):
    cfg = digits_config("resume", epochs=EPOCHS, model=model or dict(TINY_MODEL), optim={"fdr_every": 0, **optim})
    cfg["data"]["imb_factor"] = 0.01  # 250 training images: 4 steps of 64 per epoch
    return cfg


def _start(cwd: Path, exp_root: str, *extra: str, paced: bool = False) -> subprocess.Popen:
    """first.py (a run that finishes: without figures), or, paced, a run to interrupt (its
    command line as the user typed it, since the resume command it prints repeats it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = open(cwd / f"{exp_root}.{time.monotonic_ns()}.log", "w+")
    command = ([str(ROOT / "tests" / "paced_cli.py"), STEP_PAUSE_S, "first"] if paced
               else [str(ROOT / "first.py"), "--no_figures"])
    proc = subprocess.Popen([sys.executable, *command, "--json_path", "cfg.json", "--exp_root", exp_root, *extra],
                            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log = out
    return proc


def _output(proc: subprocess.Popen) -> str:
    proc.wait(timeout=300)
    proc.log.seek(0)
    text = proc.log.read()
    proc.log.close()
    return text


def _checkpoint_epoch(path: Path) -> int:
    return int(read_checkpoint(path, mmap=True)["epoch"])


def _full_checkpoint_seconds(proc: subprocess.Popen, run: Path):
    """Once the run has saved the checkpoint of an epoch >= 1: that epoch's seconds (else None)."""
    if proc.poll() is not None:
        raise AssertionError("the run ended before it could be interrupted:\n" + _output(proc))
    ckpt = run / "checkpoint.ckpt"
    try:  # the start marker (epoch 0) first, then a full checkpoint after every epoch
        if not (ckpt.is_file() and _checkpoint_epoch(ckpt) >= 1):
            return None
    except Exception:  # noqa: BLE001 - being replaced right now; look again
        return None
    rows = list(csv.DictReader(io.StringIO((run / "metrics.csv").read_text())))
    return float(rows[-1]["seconds"])


def _metrics_without_seconds(run: Path) -> list:
    rows = list(csv.reader(io.StringIO((run / "metrics.csv").read_text())))
    col = rows[0].index("seconds")
    return [r[:col] + r[col + 1:] for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run killed with SIGKILL mid-epoch and one stopped with Ctrl-C (side by side), both
    then resumed, and an uninterrupted run (in-process, while the resumed ones start up)."""
    cwd = tmp_path_factory.mktemp("resume")
    (cwd / "cfg.json").write_text(json.dumps(_config()))
    killed = _start(cwd, "killed", paced=True)
    stopped = _start(cwd, "stopped", paced=True)
    out = {"cwd": cwd}

    kill_at, signalled = None, set()
    deadline = time.monotonic() + 240
    while len(signalled) < 2:  # poll both; never block on one while the other runs on
        assert time.monotonic() < deadline, "no checkpoint appeared"
        if kill_at is None:
            seconds = _full_checkpoint_seconds(killed, cwd / "killed" / RUN)
            if seconds is not None:
                kill_at = time.monotonic() + seconds / 2  # mid-way through the next epoch
        elif "killed" not in signalled and time.monotonic() >= kill_at:
            assert killed.poll() is None, "the run ended before it could be killed"
            killed.send_signal(signal.SIGKILL)
            signalled.add("killed")
        if "stopped" not in signalled and _full_checkpoint_seconds(stopped, cwd / "stopped" / RUN) is not None:
            stopped.send_signal(signal.SIGINT)
            signalled.add("stopped")
        time.sleep(0.02)
    out["killed_output"], out["stopped_output"] = _output(killed), _output(stopped)
    out["killed_rc"], out["stopped_rc"] = killed.returncode, stopped.returncode
    out["killed_at"] = _checkpoint_epoch(cwd / "killed" / RUN / "checkpoint.ckpt")
    out["killed_files"] = sorted(p.name for p in (cwd / "killed" / RUN).iterdir())
    out["stopped_at"] = _checkpoint_epoch(cwd / "stopped" / RUN / "checkpoint.ckpt")

    # the same command again without --resume (in-process: no second start-up): refused, nothing touched
    before = _snapshot(cwd / "killed")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out["again_rc"] = main("first", ["--json_path", str(cwd / "cfg.json"), "--exp_root", str(cwd / "killed")])
    out["again_output"] = err.getvalue()
    out["again_unchanged"] = _snapshot(cwd / "killed") == before

    resumed = _start(cwd, "killed", "--resume")
    resumed_stop = _start(cwd, "stopped", "--resume")
    # the reference, with the subprocesses' one thread (OMP_NUM_THREADS=1): the same float reductions
    ref = io.StringIO()
    with contextlib.redirect_stdout(ref), contextlib.redirect_stderr(ref):
        out["ref_rc"] = main("first", ["--json_path", str(cwd / "cfg.json"), "--exp_root", str(cwd / "ref"),
                                       "--num_threads", "1"])
    out["ref_output"] = ref.getvalue()
    out["resumed_output"], out["resumed_rc"] = _output(resumed), resumed.returncode
    out["resumed_stop_output"], out["resumed_stop_rc"] = _output(resumed_stop), resumed_stop.returncode
    return out


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_outputs(ref: Path, other: Path) -> None:
    assert (ref / "acc.json").read_bytes() == (other / "acc.json").read_bytes()
    assert (ref / "best.paramOnly").read_bytes() == (other / "best.paramOnly").read_bytes()
    assert _metrics_without_seconds(ref) == _metrics_without_seconds(other)
    assert len(_metrics_without_seconds(ref)) == EPOCHS + 1
    assert (ref / "note_bestModel.log").read_text() == (other / "note_bestModel.log").read_text()
    for name in ("confMat.npy", "fdr.json", "per_class.csv"):
        assert (ref / name).read_bytes() == (other / name).read_bytes(), name
    t_ref = torch.load(ref / "trackRecords.ckpt", weights_only=True)
    t_other = torch.load(other / "trackRecords.ckpt", weights_only=True)
    assert t_ref.keys() == t_other.keys()
    for key in t_ref:
        assert torch.equal(torch.as_tensor(t_ref[key]), torch.as_tensor(t_other[key])), key


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(runs):
    cwd = runs["cwd"]
    assert runs["ref_rc"] == 0, runs["ref_output"]
    assert runs["killed_rc"] == -signal.SIGKILL, runs.get("killed_output")
    assert 1 <= runs["killed_at"] < EPOCHS, "killed after a completed epoch and before the last"
    assert "acc.json" not in runs["killed_files"]
    # re-running the command as it was is refused and names both ways forward
    assert runs["again_rc"] == 2
    assert "holds an unfinished run (last completed epoch" in runs["again_output"]
    assert "--resume" in runs["again_output"] and "--overwrite" in runs["again_output"]
    assert runs["again_unchanged"]
    # --resume continues from the last completed epoch and says so
    assert runs["resumed_rc"] == 0, runs["resumed_output"]
    assert f"after epoch {runs['killed_at']} of {EPOCHS}" in runs["resumed_output"]
    assert f"epoch {runs['killed_at']}/{EPOCHS} " not in runs["resumed_output"], "no completed epoch is redone"
    _assert_same_outputs(cwd / "ref" / RUN, cwd / "killed" / RUN)
    # save_checkpoint false: the finished run keeps only a small marker
    marker = read_checkpoint(cwd / "killed" / RUN / "checkpoint.ckpt")
    assert marker["finished"] is True and "model" not in marker
    assert not list((cwd / "killed" / RUN).glob(".*pending"))


@pytest.mark.slow
def test_ctrl_c_stops_after_the_epoch_and_says_how_to_resume(runs):
    cwd = runs["cwd"]
    assert runs["stopped_rc"] == 130, runs["stopped_output"]
    assert "finishing this epoch and saving its checkpoint" in runs["stopped_output"]
    epoch = runs["stopped_at"]
    # the epoch running at Ctrl-C is completed and saved (epoch 1 when the signal came as its checkpoint landed)
    assert 1 <= epoch <= EPOCHS
    assert f"stopped after epoch {epoch} of {EPOCHS}" in runs["stopped_output"]
    assert "Resume with: python first.py --json_path cfg.json --exp_root stopped --resume" in runs["stopped_output"]
    assert "Traceback" not in runs["stopped_output"]
    assert runs["resumed_stop_rc"] == 0, runs["resumed_stop_output"]
    _assert_same_outputs(cwd / "ref" / RUN, cwd / "stopped" / RUN)


@pytest.mark.slow
def test_finished_run_is_refused_untouched_and_resume_is_a_no_op(runs, capsys, monkeypatch):
    cwd = runs["cwd"]
    monkeypatch.chdir(cwd)
    before = _snapshot(cwd / "ref")
    assert main("first", ["--json_path", "cfg.json", "--exp_root", "ref"]) == 2
    err = capsys.readouterr().err
    assert "already holds a finished run and was left untouched" in err
    assert "--overwrite" in err and "--resume" in err
    assert main("first", ["--json_path", "cfg.json", "--exp_root", "ref", "--resume"]) == 0
    assert "holds a finished run; nothing to do" in capsys.readouterr().out
    assert _snapshot(cwd / "ref") == before


# ---------------------------------------------------------------------------
# In-process: NaN losses, the checkpoint's contents, overwrite, determinism
# ---------------------------------------------------------------------------

@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _inject_nan(monkeypatch, epoch: int, step: int, steps_applied: list):
    """The objective returns NaN at (epoch, step); count the optimizer steps applied."""
    import utils.run.prepare as prepare
    real_objective, real_optimizer = prepare.make_objective, prepare.make_optimizer
    calls = {"n": 0}

    class Objective:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, logits, labels, features):
            calls["n"] += 1
            terms = self.inner(logits, labels, features)
            if calls["n"] == (epoch - 1) * 4 + step:
                name = next(iter(terms))
                terms[name] = terms[name] * float("nan")
            return terms

        def __getattr__(self, name):  # whatever else the objective offers (set_epoch...)
            return getattr(self.inner, name)

    def make_objective(*args, **kwargs):
        return Objective(real_objective(*args, **kwargs))

    def make_optimizer(*args, **kwargs):
        opt = real_optimizer(*args, **kwargs)
        real_step = opt.step

        def step(*a, **k):
            steps_applied.append(1)
            return real_step(*a, **k)
        opt.step = step
        return opt

    monkeypatch.setattr(prepare, "make_objective", make_objective)
    monkeypatch.setattr(prepare, "make_optimizer", make_optimizer)
    return calls


@pytest.mark.parametrize("sync_every", [1, 1000], ids=["cpu-check-every-step", "cuda-style-device-flag"])
def test_nan_loss_stops_with_epoch_and_step_keeping_last_checkpoint(in_tmp, write_json, capsys, monkeypatch,
                                                                    sync_every):
    """CPU: checked at every step. CUDA reads a device-side flag every 25 steps; with 1000 here the
    training loop's own end-of-epoch check fires and the step is still reported."""
    from utils.engine import guard
    real_init = guard.NonFiniteGuard.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.sync_every = sync_every
    monkeypatch.setattr(guard.NonFiniteGuard, "__init__", init)
    steps = []
    _inject_nan(monkeypatch, epoch=2, step=3, steps_applied=steps)
    cfg = write_json("cfg.json", _config(total_epoch_num=2))
    assert main("first", ["--json_path", cfg]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: training loss became nan at epoch 2, step 3; the run stopped")
    assert "the checkpoint of epoch 1 and the best weights (epoch 1) are kept" in err
    assert "optim.nonfinite" in err and "--resume" in err and "\n" not in err
    assert len(steps) == (4 + 2 if sync_every == 1 else 4 + 4), "on the CPU the NaN step was never applied"
    run = in_tmp / "exp" / RUN
    ckpt = read_checkpoint(run / "checkpoint.ckpt")
    assert ckpt["epoch"] == 1 and ckpt["best_epoch"] == 1
    best = torch.load(run / "best.paramOnly", weights_only=True)
    assert all(torch.equal(best[k], ckpt["model"][k]) for k in best)
    assert not (run / "acc.json").exists()


def test_nonfinite_skip_skips_only_that_step(in_tmp, write_json, capsys, monkeypatch):
    steps = []
    _inject_nan(monkeypatch, epoch=1, step=2, steps_applied=steps)
    cfg = write_json("cfg.json", _config(nonfinite="skip", total_epoch_num=1))
    assert main("first", ["--json_path", cfg]) == 0, capsys.readouterr().err
    assert len(steps) == 4 - 1
    log = (in_tmp / "exp" / RUN / "train.log").read_text()
    assert "epoch 1: skipped 1 steps with a non-finite loss or gradient" in log
    rows = list(csv.DictReader(open(in_tmp / "exp" / RUN / "metrics.csv")))
    assert all(float(r["train_loss"]) == float(r["train_loss"]) for r in rows), "finite records"


def test_checkpoint_contents_and_overwrite(in_tmp, write_json, capsys):
    cfg = write_json("cfg.json", _config(total_epoch_num=1))
    assert main("first", ["--json_path", cfg, "--save_checkpoint", "true"]) == 0
    run = in_tmp / "exp" / RUN
    ckpt = read_checkpoint(run / "checkpoint.ckpt")  # weights_only=True
    assert ckpt["format"] == FORMAT and ckpt["finished"] is True and ckpt["epoch"] == 1
    assert {"model", "optimizer", "scheduler", "best_acc", "best_epoch", "rng", "config", "records", "track",
            "best_log"} <= set(ckpt)
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch", "generators"}
    assert set(ckpt["rng"]["generators"]) == {"shuffle", "augment"}
    cpu_state = torch.Generator().get_state().numel()  # both are CPU generators, whatever the device
    assert [g.numel() for g in ckpt["rng"]["generators"].values()] == [cpu_state, cpu_state]
    assert "precision fp32 (auto: CPU), memory format contiguous (auto: CPU), compile off" in \
        (run / "train.log").read_text()
    assert ckpt["optimizer"]["state"], "SGD momentum buffers are saved"
    assert ckpt["config"]["optim"]["total_epoch_num"] == 1 and len(ckpt["records"]) == 1
    assert json.loads((run / "args.json").read_text())["load_checkpoint"] is False
    # --overwrite replaces the finished run
    (run / "stray.txt").write_text("from the old run")
    capsys.readouterr()
    assert main("first", ["--json_path", cfg, "--overwrite"]) == 0
    assert not (run / "stray.txt").exists() and (run / "acc.json").is_file()
    assert main("first", ["--json_path", cfg, "--overwrite", "--resume"]) == 2
    assert "--resume and --overwrite exclude each other" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_of_another_config(in_tmp, write_json, capsys):
    cfg = write_json("cfg.json", _config())
    run = in_tmp / "exp" / RUN
    run.mkdir(parents=True)
    from utils.config import from_dict
    from utils.run.checkpoint import _marker
    torch.save(_marker(from_dict(_config(base_lr=0.1)), None, finished=False), run / "checkpoint.ckpt")
    assert main("first", ["--json_path", cfg, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "optim.base_lr = 0.1 in the checkpoint but 0.05 now" in err and "--overwrite" in err


def test_graceful_stop_first_signal_defers_second_interrupts():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run as a background job
    stop = GracefulStop()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


def test_deterministic_switch_and_bare_flag(in_tmp, write_json, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    from utils.cli import build_parser
    from utils.config import overrides_from_flags
    args = build_parser("first").parse_args(["--deterministic", "--seeds", "3"])
    assert overrides_from_flags(args) == {"deterministic": True}
    seen = []
    import utils.run.pipeline as pipeline
    monkeypatch.setattr(pipeline, "apply_determinism", lambda on: (seen.append(on), apply_determinism(on)))
    cfg = write_json("cfg.json", _config(total_epoch_num=1))
    try:
        assert main("first", ["--json_path", cfg, "--deterministic"]) == 0
        assert seen == [True] and torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8"
    finally:
        apply_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_checkpoint_every_and_a_crash_between_checkpoints(in_tmp, write_json, capsys, monkeypatch):
    """checkpoint_every 2: a crash in epoch 3 resumes after epoch 2 (epoch 1 had no checkpoint)."""
    import utils.run.fit as fit
    real = fit.train_one_epoch

    def crash_in_epoch_3(model, split, state, epoch, total, *args, **kwargs):
        if epoch == 3:
            raise SystemExit("simulated crash")
        return real(model, split, state, epoch, total, *args, **kwargs)
    monkeypatch.setattr(fit, "train_one_epoch", crash_in_epoch_3)
    cfg = write_json("cfg.json", _config(total_epoch_num=3))
    with pytest.raises(SystemExit):
        main("first", ["--json_path", cfg, "--checkpoint_every", "2"])
    run = in_tmp / "exp" / RUN
    ckpt = read_checkpoint(run / "checkpoint.ckpt")
    assert ckpt["epoch"] == 2 and len(ckpt["records"]) == 2
    assert not list(run.glob(".best.epoch*")), "the best weights of epochs 1-2 were committed with the checkpoint"
    best = torch.load(run / "best.paramOnly", weights_only=True)
    if ckpt["best_epoch"] == 2:
        assert all(torch.equal(best[k], ckpt["model"][k]) for k in best)
    monkeypatch.setattr(fit, "train_one_epoch", real)
    capsys.readouterr()
    assert main("first", ["--json_path", cfg, "--checkpoint_every", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "after epoch 2 of 3" in out and "epoch 3/3" in out and "epoch 2/3" not in out
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 3


def test_pending_best_weights_are_promoted_or_discarded(tmp_path):
    """A kill between a checkpoint and the rename of its best weights, or after a lost epoch."""
    from utils.run.checkpoint import _settle_best
    from utils.run.rundir import RunDir
    rundir = RunDir(tmp_path)
    (tmp_path / "best.paramOnly").write_text("epoch 2")
    (tmp_path / ".best.epoch4.pending").write_text("epoch 4")   # written before checkpoint 5 (best epoch 4)
    (tmp_path / ".best.epoch6.pending").write_text("epoch 6")   # from an epoch lost to the kill
    _settle_best(rundir, {"epoch": 5, "best_epoch": 4})
    assert (tmp_path / "best.paramOnly").read_text() == "epoch 4"
    assert not list(tmp_path.glob(".best.*"))
    (tmp_path / ".best.epoch6.pending").write_text("epoch 6")
    _settle_best(rundir, {"epoch": 5, "best_epoch": 4})
    assert (tmp_path / "best.paramOnly").read_text() == "epoch 4" and not list(tmp_path.glob(".best.*"))


def test_best_weights_wait_in_memory_and_are_the_improving_epochs(tmp_path):
    """checkpoint_every 3: the improvement of epoch 1 touches no file until epoch 3's checkpoint,
    which commits epoch 1's weights (not the weights trained since), BatchNorm metadata included."""
    from utils.config import resolve
    from utils.run.checkpoint import RunCheckpoint, read_checkpoint
    from utils.run.fit import LoopState
    from utils.run.rundir import RunDir
    cfg = resolve("first", str(ROOT / "jsons" / "Digits" / "naive.json"),
                  {"checkpoint_every": 3, "optim": {"total_epoch_num": 10}})
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt = RunCheckpoint(RunDir(tmp_path), cfg, "first")
    ckpt.bind(model, optimizer, {})
    loop = LoopState()
    loop.epoch, loop.best_epoch = 1, 1
    ckpt.save_best(model, 1)
    at_epoch_1 = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.save(loop)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing written before the checkpoint is due"
    with torch.no_grad():
        model[0].weight.add_(1.0)      # training goes on
    loop.epoch = 2
    ckpt.save(loop)
    loop.epoch = 3
    ckpt.save(loop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.paramOnly", "checkpoint.ckpt"]
    best = torch.load(tmp_path / "best.paramOnly", weights_only=True)
    assert best.keys() == at_epoch_1.keys() and all(torch.equal(best[k], at_epoch_1[k]) for k in best)
    assert best._metadata[""] == model.state_dict()._metadata[""] and "1" in best._metadata
    assert not torch.equal(best["0.weight"], model[0].weight)
    assert read_checkpoint(tmp_path / "checkpoint.ckpt")["best_epoch"] == 1


# ---------------------------------------------------------------------------
# Resuming on another device or memory layout (in-process)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """An uninterrupted 3-epoch run with fused SGD and two copies of its run directory as a crash
    right after epoch 1's checkpoint would leave it (contiguous layout), for the tests below.
    (The last epoch runs at learning rate 0, so two epochs would not show the momentum.)"""
    import shutil

    from utils.run.checkpoint import RunCheckpoint
    cwd = tmp_path_factory.mktemp("moved")
    (cwd / "cfg.json").write_text(json.dumps(_config({"name": "ResNet18", "use_etf": False}, total_epoch_num=3,
                                                     sgd_impl="fused")))
    real_save = RunCheckpoint.save

    def save_and_copy_after_epoch_1(self, loop, *args, **kwargs):
        real_save(self, loop, *args, **kwargs)
        if loop.epoch == 1:
            for name in ("moved", "cuda_generator"):
                shutil.copytree(self.rundir.path, cwd / name / RESNET_RUN)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RunCheckpoint, "save", save_and_copy_after_epoch_1)
        assert main("first", ["--json_path", str(cwd / "cfg.json"), "--memory_format", "contiguous",
                              "--num_threads", "1", "--exp_root", str(cwd / "ref")]) == 0
    return cwd


def test_resume_on_another_device_and_memory_format_gives_the_uninterrupted_numbers(moved):
    """A checkpoint written on a GPU holds each device's RNG state: the CPU ignores them (training
    draws only from the CPU generators).  Momentum buffers saved in the contiguous layout are
    re-laid for channels_last weights (CPU fused SGD silently computes nonsense when a buffer's
    strides differ from its weight's; test_engine_units.py shows the step itself is then exact).

    channels_last convolutions round differently, and these tiny, fast-moving runs amplify it:
    epoch 2's loss moved by 1.0e-3 (relative) against the uninterrupted run, and by 2.2e-2
    without the re-laid buffers.  We allow 5e-3."""
    run = moved / "moved" / RESNET_RUN
    ckpt = read_checkpoint(run / "checkpoint.ckpt")
    assert ckpt["epoch"] == 1
    ckpt["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    torch.save(ckpt, run / "checkpoint.ckpt")
    assert main("first", ["--json_path", str(moved / "cfg.json"), "--exp_root", str(moved / "moved"),
                          "--memory_format", "channels_last", "--num_threads", "1", "--resume"]) == 0
    assert "memory format channels_last" in (run / "train.log").read_text()
    ref, got = _metrics_without_seconds(moved / "ref" / RESNET_RUN), _metrics_without_seconds(run)
    assert got[:2] == ref[:2], "epoch 1 comes from the checkpoint"
    header = ref[0]
    for row in (2, 3):
        for name, tolerance in (("train_loss", {"rel": 5e-3}), ("train_ce", {"rel": 5e-3}), ("val_acc", {"abs": 0.02})):
            col = header.index(name)
            assert float(got[row][col]) == pytest.approx(float(ref[row][col]), **tolerance), (row, name)


def test_checkpoint_with_a_cuda_generator_state_is_refused_in_one_line(moved, capsys):
    root = moved / "cuda_generator"
    run = root / RESNET_RUN
    ckpt = read_checkpoint(run / "checkpoint.ckpt")
    assert ckpt["rng"]["generators"]["augment"].numel() == torch.Generator().get_state().numel()
    ckpt["rng"]["generators"]["augment"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA Philox seed + offset
    torch.save(ckpt, run / "checkpoint.ckpt")
    before = _snapshot(root)
    capsys.readouterr()
    assert main("first", ["--json_path", str(moved / "cfg.json"), "--exp_root", str(root), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert "its augment generator state (16 bytes) is not a CPU generator's (5056 bytes)" in err
    assert "--overwrite" in err
    assert _snapshot(root) == before, "nothing written"
