"""The command lines as a user runs them (subprocesses)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _run(script, args, cwd, **env):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_misspelt_key_exits_2_names_key_and_creates_nothing(tmp_path):
    cfg = json.loads((ROOT / "jsons/Digits/first.json").read_text())
    cfg["optim"]["weight_decy"] = cfg["optim"].pop("weight_decay")
    (tmp_path / "typo.json").write_text(json.dumps(cfg))
    proc = _run("first.py", ["--json_path", "typo.json", "--seeds", "0"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: unknown key 'optim.weight_decy' in section 'optim'; "
                                   "did you mean 'optim.weight_decay'?")
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("script, args, message", [
    ("first.py", ["--data_name", "Cifar1000"], "data.name = 'Cifar1000' is not allowed; choose one of"),
    ("first.py", ["--exp_name", "../../outside"], "exp_name = '../../outside' is not allowed"),
    ("first.py", ["--model_use_etf", "maybe"], "--model_use_etf 'maybe': expected true/false/1/0"),
    ("second.py", ["--json_path", str(ROOT / "jsons/Digits/wb_second.json")],
     "optim.total_epoch_num = 10 but --retrain was not given"),
    ("second.py", ["--json_path", str(ROOT / "jsons/Digits/second.json"), "--retrain"],
     "--retrain asks for retraining, but optim.total_epoch_num = 0"),
    ("first.py", ["--json_path", "missing.json"], "--json_path 'missing.json': file not found"),
])
def test_bad_command_lines_exit_2(tmp_path, script, args, message):
    proc = _run(script, args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "exp").exists()


def test_missing_cifar_offline_names_the_folder(tmp_path):
    proc = _run("first.py", ["--json_path", str(ROOT / "jsons/Cifar10/first.json"), "--data_download", "false"],
                tmp_path)
    assert proc.returncode == 2
    assert "cifar-10-batches-py" in proc.stderr
    assert not (tmp_path / "exp").exists()


def test_help_documents_flags():
    proc = subprocess.run([sys.executable, str(ROOT / "second.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--json_path", "--seeds", "--exp_name", "--retrain", "--data_imb_factor", "--optim_weight_decay",
                 "--model_use_etf", "--model_logit_adjustment_tau", "--optim_norm_type"):
        assert flag in proc.stdout


def test_a_display_or_misspelt_mplbackend_does_not_stop_a_run(tmp_path):
    """matplotlib refuses an unknown MPLBACKEND at import; figures are drawn with Agg anyway. The
    run gets past importing the pipeline and stops where it should: no stage-1 run here."""
    proc = _run("second.py", ["--json_path", str(ROOT / "jsons/Digits/second.json")], tmp_path, MPLBACKEND="nonsense")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: stage-1 run directory ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "exp").exists()
