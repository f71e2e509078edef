"""utils.viz.report: mean ± sample std over seeds from hand-made run folders."""
import csv
import json
import math

import pytest

from utils.viz.report import main


def _run(root, dataset, stage, exp, seed, acc, fdr=None, model="ResNet18", param_search=False):
    run = root / dataset / model / stage / exp / str(seed)
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({
        "exp_name": exp, "project_name": stage, "seeds": seed, "param_search": param_search,
        "data": {"name": dataset}, "model": {"name": model}}))
    (run / "acc.json").write_text(json.dumps(dict(zip(["All", "Many", "Medium", "Few"], acc))))
    if fdr is not None:
        (run / "fdr.json").write_text(json.dumps({"train": fdr[0], "test": fdr[1]}))
    return run


@pytest.fixture
def exp(tmp_path):
    root = tmp_path / "exp"
    _run(root, "Digits", "first", "wd", 0, [0.5, 0.8, 0.4, 0.1], (10.0, 4.0))
    _run(root, "Digits", "first", "wd", 1, [0.6, 0.9, 0.4, 0.2], (20.0, 5.0))
    _run(root, "Digits", "first", "wd", 2, [0.7, 0.7, 0.4, 0.6], (30.0, 9.0))
    _run(root, "Digits", "second", "la", 0, [0.75, 0.7, 0.8, 0.72], (20.0, 8.0))
    _run(root, "Cifar100", "first", "naive", 0, [0.40, 0.674, 0.381, 0.104])
    (root / "Digits/ResNet18/first/broken").mkdir(parents=True)  # no acc.json: not a run
    return root


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_mean_and_sample_std_over_seeds(exp, tmp_path, capsys):
    out_csv = tmp_path / "r.csv"
    assert main([str(exp), "--csv", str(out_csv)]) == 0
    text = capsys.readouterr().out
    # All 50/60/70 -> 60 ± 10; Many 80/90/70 -> 80 ± 10; Medium 40 ± 0;
    # Few 10/20/60 -> 30 ± sqrt((400+100+900)/2) = 26.46; FDR train 20 ± 10, test 6 ± sqrt((4+1+9)/2) = 2.65
    assert ("| Digits | ResNet18 | first | wd | 3 | 60.00 ± 10.00 | 80.00 ± 10.00 | 40.00 ± 0.00 | "
            "30.00 ± 26.46 | 20.00 ± 10.00 | 6.00 ± 2.65 |") in text
    # one seed: no std; no fdr.json: a dash
    assert "| Digits | ResNet18 | second | la | 1 | 75.00 | 70.00 | 80.00 | 72.00 | 20.00 | 8.00 |" in text
    assert "| Cifar100 | ResNet18 | first | naive | 1 | 40.00 | 67.40 | 38.10 | 10.40 | – | – |" in text
    rows = {(r["dataset"], r["stage"], r["exp_name"]): r for r in _rows(out_csv)}
    assert len(rows) == 3
    wd = rows[("Digits", "first", "wd")]
    assert wd["n_seeds"] == "3" and wd["seeds"] == "0 1 2"
    assert float(wd["All_mean"]) == pytest.approx(60.0) and float(wd["All_std"]) == pytest.approx(10.0)
    assert float(wd["Few_std"]) == pytest.approx(math.sqrt(700), rel=1e-5)
    assert float(wd["FDR_test_std"]) == pytest.approx(math.sqrt(7), rel=1e-5)
    assert rows[("Digits", "second", "la")]["All_std"] == ""


def test_sort_and_filter(exp, tmp_path, capsys):
    out_csv = str(tmp_path / "r.csv")
    assert main([str(exp), "--csv", out_csv, "--sort", "All"]) == 0
    assert [r["exp_name"] for r in _rows(out_csv)] == ["la", "wd", "naive"]  # best first
    assert main([str(exp), "--csv", out_csv, "--sort", "few", "--ascending"]) == 0
    assert [r["exp_name"] for r in _rows(out_csv)] == ["naive", "wd", "la"]
    assert main([str(exp), "--csv", out_csv, "--filter", "digits"]) == 0
    assert {r["exp_name"] for r in _rows(out_csv)} == {"wd", "la"}
    assert main([str(exp), "--csv", out_csv, "--filter", "Digits/*/first/*"]) == 0
    assert [r["exp_name"] for r in _rows(out_csv)] == ["wd"]
    assert main([str(exp), "--csv", out_csv, "--filter", "Digits", "--filter", "second"]) == 0
    assert [r["exp_name"] for r in _rows(out_csv)] == ["la"]
    capsys.readouterr()
    assert main([str(exp), "--csv", out_csv, "--sort", "accuracy"]) == 2
    assert "--sort 'accuracy' is not a column" in capsys.readouterr().err
    assert main([str(exp), "--csv", out_csv, "--filter", "ImageNet"]) == 2
    assert "no group matches --filter ImageNet" in capsys.readouterr().err


def test_no_runs_and_missing_directory(tmp_path, capsys):
    assert main([str(tmp_path), "--csv", ""]) == 2
    assert "no runs found" in capsys.readouterr().err
    assert main([str(tmp_path / "nope"), "--csv", ""]) == 2
    assert "is not a directory" in capsys.readouterr().err


def _finish_marker(run, finished):
    import torch
    from utils.run.checkpoint import FORMAT, VERSION
    torch.save({"format": FORMAT, "version": VERSION, "stage": "first", "finished": finished, "epoch": 2,
                "total_epochs": 3, "config": {}}, run / "checkpoint.ckpt")


def test_copies_of_a_run_count_once_and_unfinished_runs_are_skipped(exp, tmp_path, capsys):
    import shutil
    wd = exp / "Digits/ResNet18/first/wd"
    shutil.copytree(wd / "0", wd / "0 (copy)")       # the same run twice: seed 0 recorded in both
    shutil.copytree(wd / "1", wd / ".1.old-20250101")  # the copy --overwrite keeps until its run starts
    _finish_marker(wd / "2", finished=True)
    killed = _run(exp, "Digits", "first", "wd", 3, [0.99, 0.99, 0.99, 0.99])
    _finish_marker(killed, finished=False)             # acc.json written, then killed before the end
    assert main([str(exp), "--runs"]) == 0
    captured = capsys.readouterr()
    assert "| Digits | ResNet18 | first | wd | 3 | 60.00 ± 10.00 |" in captured.out, "seeds 0, 1, 2 once each"
    assert f"{wd / '0 (copy)'} records seed 0 of Digits/ResNet18/first/wd, like {wd / '0'}" in captured.err
    assert f"skipping {killed}: it has not finished (last completed epoch 2 of 3)" in captured.err
    assert ".1.old-" not in captured.out and "skipping" not in captured.out


def test_csv_only_when_asked_and_beside_the_runs(exp, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([str(exp)]) == 0
    assert not list(tmp_path.glob("*.csv")) and not (exp / "report.csv").exists(), "no CSV by default"
    assert main([str(exp), "--csv"]) == 0
    assert (exp / "report.csv").is_file() and not list(tmp_path.glob("*.csv"))
    assert f"CSV written to {exp / 'report.csv'}" in capsys.readouterr().out
    assert main([str(exp), "--csv", str(tmp_path / "mine.csv")]) == 0
    assert (tmp_path / "mine.csv").is_file()


def test_top5_and_calibration_columns(tmp_path, capsys):
    root = tmp_path / "exp"
    for seed, (top5_all, ece, nll, brier) in enumerate([(0.80, 0.10, 1.2, 0.50), (0.90, 0.20, 1.4, 0.70)]):
        run = _run(root, "INat2018", "first", "ce", seed, [0.5, 0.6, 0.5, 0.4], (1.0, 2.0), model="ResNet50")
        (run / "topk.json").write_text(json.dumps({"top1": {}, "top5": {"All": top5_all, "Many": 0.9,
                                                                        "Medium": 0.8, "Few": 0.7}}))
        (run / "calibration.json").write_text(json.dumps({"ECE": ece, "NLL": nll, "Brier": brier}))
    _run(root, "Digits", "first", "old", 0, [0.5, 0.5, 0.5, 0.5])  # before topk.json / calibration.json
    assert main([str(root), "--sort", "ECE"]) == 0
    text = capsys.readouterr().out
    assert "| Top5_All | Top5_Many | Top5_Medium | Top5_Few | ECE (%) | NLL | Brier |" in text
    # top-5 All 80/90 -> 85 ± 7.07; ECE 10/20 % -> 15 ± 7.07; NLL 1.3 ± 0.141; Brier 0.6 ± 0.141
    assert ("| 85.00 ± 7.07 | 90.00 ± 0.00 | 80.00 ± 0.00 | 70.00 ± 0.00 | 15.00 ± 7.07 | 1.300 ± 0.141 | "
            "0.600 ± 0.141 |") in text
    assert "| Digits | ResNet18 | first | old | 1 | 50.00 | 50.00 | 50.00 | 50.00 | – | – | – | – | – | – | – | – | – |" in text
    # the lowest ECE first; a run without calibration.json last
    assert text.index("INat2018") < text.index("| Digits")
