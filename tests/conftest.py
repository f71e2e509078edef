import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("MPLBACKEND", "Agg")


def digits_config(exp_name, project_name="first", epochs=2, model=None, optim=None, **top):
    """A small Digits-LT config in the original's layout."""
    cfg = {
        "exp_name": exp_name, "project_name": project_name, "seeds": 0, "description": "test",
        "data": {"name": "Digits", "imb_type": "exp", "imb_factor": 0.05, "n_classes": 10, "batch_size": 64},
        "model": {"name": "ResNet18", "use_etf": False},
        "optim": {"total_epoch_num": epochs, "base_lr": 0.05, "weight_decay": 0.0, "fdr_every": 1},
    }
    cfg["model"].update(model or {})
    cfg["optim"].update(optim or {})
    cfg.update(top)
    return cfg


@pytest.fixture
def write_json(tmp_path):
    def _write(name, obj):
        path = tmp_path / name
        path.write_text(json.dumps(obj))
        return str(path)
    return _write
