import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("MPLBACKEND", "Agg")

# The tiny network of the tests of the run machinery (resume, bad input, outputs, locks, the tau
# sweep...): about 3 k weights, built and trained in milliseconds. ResNet18 stays where its
# state-dict keys or the BatchNorm of a conv net are what a test checks.
TINY_MODEL = {"name": "BNMLP", "mlp_features_d": 32, "mlp_hlayer_n": 1}
TINY_EXP = Path("exp/Digits/BNMLP")


def digits_config(exp_name, project_name="first", epochs=2, model=None, optim=None, **top):
    """A small Digits-LT config in the original's layout.  It writes a checkpoint after every
    epoch: the tests of resume and of crashes count on one (the default schedule goes by
    measured save times, see CheckpointSchedule)."""
    cfg = {
        "exp_name": exp_name, "project_name": project_name, "seeds": 0, "description": "test",
        "checkpoint_every": 1,
        "data": {"name": "Digits", "imb_type": "exp", "imb_factor": 0.05, "n_classes": 10, "batch_size": 64},
        "model": {"name": "ResNet18", "use_etf": False},
        "optim": {"total_epoch_num": epochs, "base_lr": 0.05, "weight_decay": 0.0, "fdr_every": 1},
    }
    cfg["model"].update(model or {})
    cfg["optim"].update(optim or {})
    cfg.update(top)
    return cfg


def tiny_config(exp_name, project_name="first", epochs=2, model=None, optim=None, **top):
    """digits_config with the tiny network."""
    return digits_config(exp_name, project_name, epochs, model={**TINY_MODEL, **(model or {})}, optim=optim, **top)


# Figures: first.py/second.py draw a dozen figures after every run (seconds a run); only the
# tests marked `figures` look at them, so every other in-process run skips them as --no_figures
# would (subprocess runs pass --no_figures themselves).  ``@pytest.mark.figures(runs=("name",))``
# draws them only for the runs of those experiment names (the figures of one run take seconds).
_FIGURES = {"draw": False, "runs": None}


@pytest.fixture(scope="session", autouse=True)
def _figures_switch():
    import utils.cli as cli
    real = cli.draw_figures

    def draw_figures(run_dir):
        runs = _FIGURES["runs"]
        if _FIGURES["draw"] and (runs is None or Path(run_dir).parent.name in runs):
            real(run_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "draw_figures", draw_figures)
        yield


@pytest.fixture(autouse=True)
def _figures_where_marked(request):
    marker = request.node.get_closest_marker("figures")
    _FIGURES["draw"], _FIGURES["runs"] = marker is not None, marker.kwargs.get("runs") if marker else None
    yield
    _FIGURES["draw"], _FIGURES["runs"] = False, None


@pytest.fixture(scope="session")
def stage1_run(tmp_path_factory):
    """One finished stage-1 run (first.py in-process: the tiny network, 2 epochs, features saved),
    shared by the tests that only read it; a test that damages or extends it works on a copy."""
    from utils.cli import main
    cwd = tmp_path_factory.mktemp("stage1")
    (cwd / "s1.json").write_text(json.dumps(tiny_config("s1", save_features=True)))
    assert main("first", ["--json_path", str(cwd / "s1.json"), "--exp_root", str(cwd / "exp"), "--no_figures"]) == 0
    return cwd / "exp/Digits/BNMLP/first/s1/0"


@pytest.fixture
def write_json(tmp_path):
    def _write(name, obj):
        path = tmp_path / name
        path.write_text(json.dumps(obj))
        return str(path)
    return _write


def fill_disk(monkeypatch, name: str, nth: int = 1, after_bytes: int = 4096) -> None:
    """The nth write of the run file ``name`` through the one write path (utils/run/rundir.py) fails
    with ENOSPC once ``after_bytes`` are written, as a full disk would part-way through."""
    import errno
    import io

    from utils.run import rundir
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
