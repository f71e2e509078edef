"""What a command line loads: ``--help`` answers without torch, and a training run loads no
plotting or table library until its figures are drawn (the command line draws them after the
run; ``--no_figures`` skips them).  Each check runs in a fresh interpreter, since the test
session itself has loaded everything."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, digits_config

PLOTTING = ("matplotlib", "seaborn", "skimage", "pandas")


def _imported(importtime_stderr: str) -> set[str]:
    """The modules a ``python -X importtime`` run imported."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.split("|")[2].strip())
    return names


def test_help_does_not_import_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "first.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: first.py" in done.stdout and "--optim_weight_decay" in done.stdout
    imported = _imported(done.stderr)
    assert "utils.config.flags" in imported, "the flags come from the config dataclasses"
    assert not {m for m in imported if m.split(".")[0] == "torch"}, "torch was imported for --help"


_RUN = """
import json, sys
sys.path.insert(0, {root!r})
from utils.cli import main
code = main("first", ["--json_path", "cfg.json", "--no_figures", "--num_threads", "1"])
print(json.dumps({{"code": code, "loaded": sorted({{m.split(".")[0] for m in sys.modules}})}}))
"""


def test_a_training_run_loads_no_plotting_library(tmp_path):
    cfg = digits_config("no_plots", epochs=1, model={"name": "BNMLP", "mlp_hlayer_n": 1, "mlp_features_d": 16})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, "-c", _RUN.format(root=str(ROOT))], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and "torch" in result["loaded"]
    run = tmp_path / "exp" / "Digits" / "BNMLP" / "first" / "no_plots" / "0"
    assert (run / "acc.json").is_file() and not (run / "imgs").exists()
    assert not set(PLOTTING) & set(result["loaded"]), "the training run imported a plotting library"
