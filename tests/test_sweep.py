"""python -m utils.sweep: trials as param_search runs that never touch the test set, the study's
files, failed and interrupted trials, continuing a study, two workers on one journal."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_config

from utils import sweep
from utils.config.search_space import parse_param
from utils.errors import ConfigError, RunInterrupted

RUNS = Path("exp/Digits/BNMLP/first")


class _NoTestSet:
    """Stands in for the test split: any use of it fails the trial."""

    def __getattr__(self, name):
        raise AssertionError(f"a search trial used the test set ({name})")

    def __len__(self):
        raise AssertionError("a search trial used the test set (len)")


@pytest.fixture
def no_test_set(monkeypatch):
    """Every run's test split replaced by _NoTestSet while ``guard["on"]``."""
    from utils.run import pipeline
    real, guard = pipeline.make_splits, {"on": True}

    def make_splits(*args, **kwargs):
        train, val, test, augment = real(*args, **kwargs)
        return train, val, _NoTestSet() if guard["on"] else test, augment
    monkeypatch.setattr(pipeline, "make_splits", make_splits)
    return guard


@pytest.fixture
def tiny_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def write(name="tiny.json", epochs=2, **kwargs):
        (tmp_path / name).write_text(json.dumps(tiny_config("tiny", epochs=epochs, **kwargs)))
        return name
    return write


def _trials(study: str) -> list[dict]:
    with open(Path("exp/sweeps") / study / "trials.csv") as fh:
        return list(csv.DictReader(fh))


def _sweep(*argv) -> int:
    return sweep.main([str(a) for a in argv])


@pytest.mark.parametrize("spec, message", [
    ("optim.wieght_decay=log:1e-4:1e-2", "did you mean 'optim.weight_decay'"),
    ("optim.weight_decay=log:0:1e-2", "a log range needs LOW > 0"),
    ("model.logit_adjustment_tau=float:0:200", "logit_adjustment_tau = 200.0 must be <= 100"),
    ("optim.loss_type=choice:CE,XX", "choose one of"),
    ("optim.weight_decay=1e-3", "is not KEY=SPEC"),
    ("optim.weight_decay=uniform:0:1", "unknown kind 'uniform'"),
    ("optim.weight_decay=int:0:1", "a number key"),
    ("optim.drw=float:0:3", "an integer key"),
    ("seeds=grid:0,1", "the sweep sets seeds itself"),
    ("optim.weight_decay_target=choice:1,2", "holds a list"),
])
def test_a_bad_space_is_refused_before_any_trial(tiny_json, capsys, spec, message):
    tiny_json()
    assert _sweep("--json_path", "tiny.json", "--space", spec, "--trials", 2) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not Path("exp").exists()


def test_grid_needs_listed_values_and_at_most_its_size(tiny_json, capsys):
    tiny_json()
    assert _sweep("--json_path", "tiny.json", "--sampler", "grid", "--space", "optim.weight_decay=log:1e-4:1e-2") == 2
    assert "is a range" in capsys.readouterr().err
    assert _sweep("--json_path", "tiny.json", "--sampler", "grid", "--trials", 3,
                  "--space", "optim.weight_decay=grid:0,1e-3") == 2
    assert "the grid has 2 combinations" in capsys.readouterr().err
    assert not Path("exp").exists()


def test_parse_param_types_values_by_key():
    assert parse_param("optim.loss_type=choice:CE,CB").values == ("CE", "CB")
    assert parse_param("model.use_etf=grid:true,false").values == (True, False)
    assert parse_param("optim.weight_decay=grid:0,1e-3").values == (0.0, 1e-3)
    p = parse_param("optim.weight_decay=log:1e-4:1e-2")
    assert (p.kind, p.low, p.high) == ("log", 1e-4, 1e-2)
    with pytest.raises(ConfigError, match="listed twice"):
        parse_param("optim.weight_decay=grid:1e-3,0.001")


def test_grid_sweep_writes_its_files_never_looks_at_test_and_best_runs(tiny_json, no_test_set, capsys):
    from utils.cli import main
    tiny_json()
    args = ["--json_path", "tiny.json", "--study", "g", "--sampler", "grid", "--seeds", 0, 1,
            "--space", "optim.weight_decay=grid:0,1e-3,1e-2"]
    assert _sweep(*args) == 0
    out = capsys.readouterr().out
    assert "| trial | val All % | optim.weight_decay |" in out
    trials = _trials("g")
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3
    assert sorted(float(t["optim.weight_decay"]) for t in trials) == [0.0, 1e-3, 1e-2]
    # one run directory per trial and seed, each a param_search run scored on validation
    assert sorted(p.name for p in RUNS.iterdir()) == ["g_t0", "g_t1", "g_t2"]
    for t in trials:
        scores = []
        for seed in (0, 1):
            run = RUNS / t["run_name"] / str(seed)
            args_json = json.loads((run / "args.json").read_text())
            assert args_json["param_search"] and args_json["param_search_id"] == seed == args_json["seeds"]
            assert args_json["optim"]["weight_decay"] == float(t["optim.weight_decay"])
            assert set(json.loads((run / "fdr.json").read_text())) == {"train", "val"}
            assert set(json.loads((run / "sparsity.json").read_text())) == {"train", "val"}
            assert "test" not in (run / "per_class.csv").read_text()
            scores.append(json.loads((run / "acc.json").read_text())["All"])
        assert float(t["value"]) == pytest.approx(sum(scores) / 2, abs=1e-6)
    best = json.loads(Path("exp/sweeps/g/best.json").read_text())
    top = max(trials, key=lambda t: (float(t["value"]), -int(t["number"])))
    assert best["param_search"] is False and best["exp_name"] == "g_best"
    assert best["optim"]["weight_decay"] == float(top["optim.weight_decay"])
    assert Path("exp/sweeps/g/history.png").stat().st_size > 1000
    assert Path("exp/sweeps/g/slices.png").stat().st_size > 1000
    # re-running the finished study runs nothing more
    assert _sweep(*args) == 0
    assert len(_trials("g")) == 3
    # best.json is a config first.py runs as it is (and that run evaluates the test set)
    no_test_set["on"] = False
    assert main("first", ["--json_path", "exp/sweeps/g/best.json", "--no_figures"]) == 0
    assert "Many" in json.loads((RUNS / "g_best/0/acc.json").read_text())


def test_a_diverging_trial_fails_and_the_sweep_goes_on(tiny_json, capsys):
    # lr 100 x weight decay 10: the weights grow ~500x a step until the loss overflows float32
    tiny_json(epochs=3, optim={"weight_decay": 10.0})
    assert _sweep("--json_path", "tiny.json", "--study", "d", "--sampler", "grid",
                  "--space", "optim.base_lr=grid:100,0.05") == 0
    trials = {float(t["optim.base_lr"]): t for t in _trials("d")}
    assert trials[100.0]["state"] == "FAIL" and trials[100.0]["failure"].startswith("diverged")
    assert trials[0.05]["state"] == "COMPLETE"
    assert "trial 0 failed: diverged" in capsys.readouterr().err
    assert json.loads(Path("exp/sweeps/d/best.json").read_text())["optim"]["base_lr"] == 0.05


def test_ctrl_c_queues_the_trial_and_the_same_command_continues(tiny_json, monkeypatch, capsys):
    from utils.run import pipeline
    tiny_json()
    real, calls = pipeline.run, []

    def run(cfg, *a, **k):
        calls.append(cfg.exp_name)
        if len(calls) == 2:  # the run's own Ctrl-C handling: the epoch finished, then it stops
            raise RunInterrupted("interrupted after epoch 1")
        return real(cfg, *a, **k)
    monkeypatch.setattr(pipeline, "run", run)
    args = ["--json_path", "tiny.json", "--study", "c", "--sampler", "random", "--sampler_seed", 3, "--trials", 3,
            "--space", "optim.weight_decay=log:1e-4:1e-2"]
    assert _sweep(*args) == 130
    assert "re-run the same command" in capsys.readouterr().err
    first = _trials("c")
    assert [t["state"] for t in first] == ["COMPLETE", "FAIL", "WAITING"]
    assert _sweep(*args) == 0
    trials = _trials("c")
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(done) == 3 and len(trials) == 4
    # the interrupted trial came back with its values and its run name
    again = next(t for t in done if t["run_name"] == first[1]["run_name"])
    assert again["optim.weight_decay"] == first[1]["optim.weight_decay"]
    assert calls == ["c_t0", "c_t1", "c_t1", "c_t3"]


def test_stage2_sweep_starts_from_the_best_stage1_trial(tiny_json, no_test_set):
    tiny_json()
    assert _sweep("--json_path", "tiny.json", "--study", "s1", "--sampler", "grid",
                  "--space", "optim.weight_decay=grid:0,5e-3") == 0
    best1 = json.loads(Path("exp/sweeps/s1/best.json").read_text())
    stage2 = tiny_config("la", "second", epochs=0, model={"is_pretrained": True, "pretrained_path": "unused",
                                                         "logit_adjustment_tau_sweep": "0:1:3"})
    Path("second.json").write_text(json.dumps(stage2))
    assert _sweep("--json_path", "second.json", "--study", "s2", "--stage1_study", "s1", "--sampler", "grid",
                  "--space", "model.use_additive_logit_adjustment=grid:true,false") == 0
    trials = _trials("s2")
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE"]
    best_stage1 = next(t for t in _trials("s1") if float(t["optim.weight_decay"])
                       == best1["optim"]["weight_decay"])["run_name"]
    for t in trials:
        run = Path("exp/Digits/BNMLP/second") / t["run_name"] / "0"
        args_json = json.loads((run / "args.json").read_text())
        assert args_json["model"]["pretrained_path"] == str(RUNS / best_stage1)
        header = (run / "tau_sweep.csv").read_text().splitlines()[0]
        assert "val_All" in header and "test" not in header
    assert json.loads(Path("exp/sweeps/s2/best.json").read_text())["model"]["pretrained_path"] == str(RUNS / best_stage1)


def test_a_study_made_for_another_space_is_refused(tiny_json, capsys):
    tiny_json()
    assert _sweep("--json_path", "tiny.json", "--study", "x", "--sampler", "grid",
                  "--space", "optim.weight_decay=grid:0") == 0
    assert _sweep("--json_path", "tiny.json", "--study", "x", "--sampler", "grid",
                  "--space", "optim.weight_decay=grid:1e-3") == 2
    assert "was created with space" in capsys.readouterr().err


@pytest.mark.slow
def test_two_workers_on_one_journal_share_the_trials(tiny_json):
    tiny_json()
    command = [sys.executable, "-m", "utils.sweep", "--json_path", "tiny.json", "--study", "w", "--sampler", "grid",
               "--space", "optim.weight_decay=grid:0,1e-4,1e-3,1e-2", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    storage = JournalStorage(JournalFileBackend("exp/sweeps/w/journal.log"))
    trials = optuna.load_study(study_name="w", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert sorted(t.params["optim.weight_decay"] for t in trials) == [0, 1e-4, 1e-3, 1e-2]
    names = [t.user_attrs["run_name"] for t in trials]
    assert sorted(names) == [f"w_t{i}" for i in range(4)] == sorted(p.name for p in RUNS.iterdir())
    # every trial was run by one worker: each run name is started in exactly one log
    started = [line for log in logs for line in log.splitlines() if line.startswith("trial ") and "(w_t" in line]
    assert sorted(started) == sorted(set(started)) and len(started) == 4
    assert all(any("(w_t" in line for line in log.splitlines()) for log in logs)  # both workers took trials


def test_a_trial_left_running_by_a_dead_worker_is_queued_again(tiny_json):
    import socket

    from utils.run import study as studies
    tiny_json()
    args = ["--json_path", "tiny.json", "--study", "k", "--sampler", "grid", "--space", "optim.weight_decay=grid:0,1e-3"]
    assert _sweep(*args, "--trials", 1) == 0
    # a worker killed with SIGKILL while it ran trial 1 (its pid no longer exists)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    storage = studies.make_storage("", Path("exp/sweeps/k"))
    import optuna
    study = optuna.load_study(study_name="k", storage=storage)
    trial = study.ask()
    trial.set_user_attr("run_name", "k_t1")
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": gone.pid})
    assert _sweep(*args) == 0
    trials = _trials("k")
    assert [t["state"] for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "worker" in trials[1]["failure"] and trials[2]["run_name"] == "k_t1"
    assert sorted(float(t["optim.weight_decay"]) for t in trials if t["state"] == "COMPLETE") == [0.0, 1e-3]


def test_a_study_name_that_cannot_name_runs_is_refused(tiny_json, capsys):
    tiny_json()
    assert _sweep("--json_path", "tiny.json", "--study", "a/b", "--trials", 1,
                  "--space", "optim.weight_decay=log:1e-4:1e-2") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --study 'a/b' cannot name its runs") and err.count("\n") == 1
    assert not Path("exp").exists()


def test_a_refused_combination_fails_its_trial_on_an_rdb_storage(tiny_json):
    tiny_json()
    # use_dr_balancer scales ETF norms: without an ETF classifier the config rules refuse it
    assert _sweep("--json_path", "tiny.json", "--study", "q", "--sampler", "grid", "--storage", "sqlite:///q.db",
                  "--space", "model.use_dr_balancer=grid:true,false") == 0
    trials = {t["model.use_dr_balancer"]: t for t in _trials("q")}
    assert trials["True"]["state"] == "FAIL" and "refused: model.use_dr_balancer" in trials["True"]["failure"]
    assert trials["False"]["state"] == "COMPLETE"
    assert Path("q.db").is_file() and not Path("exp/sweeps/q/journal.log").exists()
