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


def fill_disk(monkeypatch, name: str, nth: int = 1, after_bytes: int = 4096) -> None:
    """The nth write of the run file ``name`` through the one write path (utils/rundir.py) fails
    with ENOSPC once ``after_bytes`` are written, as a full disk would part-way through."""
    import errno
    import io

    from utils import rundir
    real = rundir._open_temporary
    count = {"n": 0}

    class Full(io.RawIOBase):
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def writable(self):
            return True

        def write(self, b):
            self.written += len(b)
            if self.written > after_bytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(b)

        def fileno(self):
            return self.fh.fileno()

        def close(self):
            self.fh.close()
            super().close()

    def open_temporary(fd, path):
        fh = real(fd, path)
        if Path(path).name != name:
            return fh
        count["n"] += 1
        return Full(fh) if count["n"] == nth else fh
    monkeypatch.setattr(rundir, "_open_temporary", open_temporary)
