"""python -m utils.reproduce: the commands of the papers' comparison and the table beside the
published numbers (against hand-made runs)."""
import json
from pathlib import Path

import pytest

from tests.conftest import ROOT

from utils import reproduce


def test_dry_run_prints_every_command_in_order(capsys):
    assert reproduce.main(["cifar100", "--dry-run", "--seeds", "0", "1", "--json_root", str(ROOT / "jsons")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 20  # 5 methods x (ResNet-34, ResNet-32) x 2 seeds
    j = ROOT / "jsons/Cifar100"
    assert lines[:5] == [
        f"python first.py --json_path {j}/naive.json --seeds 0 --resume",
        f"python first.py --json_path {j}/wb_first.json --seeds 0 --resume",
        f"python second.py --json_path {j}/wb_second.json --seeds 0 --retrain --resume",
        f"python first.py --json_path {j}/first.json --seeds 0 --resume",
        f"python second.py --json_path {j}/second.json --seeds 0 --resume"]
    assert lines[5] == f"python first.py --json_path {j}/naive_resnet32.json --seeds 0 --resume"
    assert lines[7] == f"python second.py --json_path {j}/wb_second_resnet32.json --seeds 0 --retrain --resume"
    assert all("--seeds 1" in line for line in lines[10:])


def test_digits_has_the_five_demo_commands(capsys):
    assert reproduce.main(["digits", "--seeds", "0"]) == 0
    assert [line.split()[3] for line in capsys.readouterr().out.splitlines()] == [
        f"jsons/Digits/{n}.json" for n in ("naive", "wb_first", "wb_second", "first", "second")]


def test_emit_slurm_writes_a_job_array_per_seed(tmp_path):
    target = tmp_path / "r.sbatch"
    assert reproduce.main(["cifar10", "--emit", "slurm", "--seeds", "0", "1", "2", "--out", str(target)]) == 0
    text = target.read_text()
    assert "#SBATCH --array=0-2" in text and "SEEDS=(0 1 2)" in text
    assert 'python second.py --json_path jsons/Cifar10/wb_second.json --seeds "$seed" --retrain --resume' in text


def _fake_run(root: Path, model: str, stage: str, exp_name: str, seed: int, acc: dict) -> None:
    run = root / "Cifar100" / model / stage / exp_name / str(seed)
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"exp_name": exp_name, "project_name": stage, "seeds": seed,
                                               "data": {"name": "Cifar100"}, "model": {"name": model}}))
    (run / "acc.json").write_text(json.dumps(acc))


def test_table_shows_the_published_numbers_and_the_differences(tmp_path, capsys):
    exp = tmp_path / "exp"
    for seed, all_ in ((0, 0.40), (1, 0.42)):
        _fake_run(exp, "ResNet34", "first", "naive", seed, {"All": all_, "Many": 0.65, "Medium": 0.37, "Few": 0.12})
    _fake_run(exp, "ResNet34", "second", "wd_5e-3_WB", 0, {"All": 0.5, "Many": 0.7, "Medium": 0.5, "Few": 0.3})
    assert reproduce.main(["cifar100", "--table", "--exp_root", str(exp), "--json_root", str(ROOT / "jsons")]) == 0
    out = capsys.readouterr().out
    # one row per method and backbone (ResNet-34, then ResNet-32): the ResNet-34 rows here
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in out.splitlines()
            if line.startswith("| ") and line.split(" | ")[1] == "ResNet34"}
    naive = rows["naive CE"]
    assert naive[2:7] == ["2", "41.00 ± 1.41", "65.00 ± 0.00", "37.00 ± 0.00", "12.00 ± 0.00"]
    assert naive[7:] == ["38.38 (64.05 / 35.80 / 11.43)", "+2.62", "40.00 (67.40 / 38.10 / 10.40)", "+1.00 |"]
    wb = rows["WB (WD, then CB + WD + MaxNorm)"]
    assert wb[3] == "50.00" and wb[8] == "-3.35" and wb[10] == "-3.10 |"
    wd = rows["WD (CE + WD)"]
    assert wd[3] == "not run" and wd[7] == "46.08" and wd[8] == "–"
    assert rows["paper (WD + FR + ETF, then multiplicative LA)"][7] == "not given"
    assert "No published number is given here for: paper stage 1" in out


def test_run_needs_every_config_file(tmp_path, capsys):
    (tmp_path / "Cifar100").mkdir()
    assert reproduce.main(["cifar100", "--run", "--json_root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 10 config file(s) are missing") and err.count("\n") == 1
