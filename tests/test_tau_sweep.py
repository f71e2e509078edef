"""Logit-adjustment tau sweep: parsing, choice by validation, the CSV, and
agreement with single-tau runs."""
import csv
import json

import pytest

from tests.conftest import digits_config
from utils.cli import main
from utils.config import ConfigError, from_dict
from utils.run.tau_sweep import best_row, parse_taus


def test_parse_taus():
    assert parse_taus("") == []
    assert parse_taus("0:1:5") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_taus("0.5:0.5:1") == [0.5]
    assert parse_taus("0.25, 1,2") == [0.25, 1.0, 2.0]
    for bad, message in [("0:1", "use 'start:stop:num'"), ("a,b", "is not a tau list"),
                         ("0:1:0", "num must be >= 1"), ("-1,1", "tau must be a finite number >= 0")]:
        with pytest.raises(ConfigError, match=message):
            parse_taus(bad)


def test_config_checks_the_sweep():
    cfg = digits_config("x", model={"logit_adjustment_tau_sweep": "0:2:3"})
    assert from_dict(cfg).model.logit_adjustment_tau_sweep == "0:2:3"
    with pytest.raises(ConfigError, match="model.logit_adjustment_tau_sweep = '0:x:3' is not a tau list"):
        from_dict(digits_config("x", model={"logit_adjustment_tau_sweep": "0:x:3"}))
    with pytest.raises(ConfigError, match="logit_adjustment_for_training = true"):
        from_dict(digits_config("x", model={"logit_adjustment_tau_sweep": "0,1",
                                            "logit_adjustment_for_training": True}))


def test_best_row_by_validation_smaller_tau_on_ties():
    rows = [{"tau": 0.0, "val_All": 0.5}, {"tau": 0.5, "val_All": 0.7},
            {"tau": 1.0, "val_All": 0.7}, {"tau": 1.5, "val_All": 0.6}]
    assert best_row(rows)["tau"] == 0.5


def _read(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.figures(runs=("sweep",))
def test_sweep_picks_best_validation_tau_and_matches_single_runs(tmp_path, write_json):
    exp = tmp_path / "exp"
    first = write_json("s1.json", digits_config("s1", epochs=1, model={"name": "ResNet32"}))  # a small conv net
    assert main("first", ["--json_path", first, "--exp_root", str(exp)]) == 0
    stage1 = exp / "Digits/ResNet32/first/s1"

    def second(name, **model):
        cfg = digits_config(name, "second", epochs=0, optim={"base_lr": 0.0},
                            model={"name": "ResNet32", "is_pretrained": True, "pretrained_path": str(stage1),
                                   "use_additive_logit_adjustment": False, **model})
        assert main("second", ["--json_path", write_json(f"{name}.json", cfg), "--exp_root", str(exp)]) == 0
        return exp / "Digits/ResNet32/second" / name / "0"

    run = second("sweep", logit_adjustment_tau_sweep="0:1.5:4")
    rows = _read(run / "tau_sweep.csv")
    assert [float(r["tau"]) for r in rows] == [0.0, 0.5, 1.0, 1.5]
    assert list(rows[0]) == ["tau"] + [f"{s}_{g}" for s in ("val", "test")
                                       for g in ("All", "Many", "Medium", "Few", "ECE")]
    val_all = [float(r["val_All"]) for r in rows]
    best = rows[val_all.index(max(val_all))]
    choice = json.loads((run / "tau_sweep.json").read_text())
    assert choice["best_tau"] == float(best["tau"])
    assert (run / "imgs/tau_sweep.png").read_bytes()[:4] == b"\x89PNG"
    # the run continues at the chosen tau: acc.json is the sweep's test row there
    acc = json.loads((run / "acc.json").read_text())
    for g in ("All", "Many", "Medium", "Few"):
        assert acc[g] == pytest.approx(float(best[f"test_{g}"]), abs=1e-6)
    # and the sweep's ECE column at that tau is the run's calibration.json
    assert json.loads((run / "calibration.json").read_text())["ECE"] == pytest.approx(float(best["test_ECE"]),
                                                                                       abs=1e-6)
    assert "best tau" in (run / "train.log").read_text()

    # a swept tau gives what a single-tau run at that tau gives
    r = rows[2]
    single = second("tau_1", logit_adjustment_tau=float(r["tau"]))
    acc = json.loads((single / "acc.json").read_text())
    for g in ("All", "Many", "Medium", "Few"):
        assert acc[g] == pytest.approx(float(r[f"test_{g}"]), abs=1e-6), g
