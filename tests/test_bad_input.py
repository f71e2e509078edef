"""Every bad input of issue 6, one table: exit code 2, a one-line message naming the problem,
and nothing written anywhere (no partial run directory; a stage-1 run is never modified).

Each case builds its inputs in a fresh folder, snapshots the whole folder (every directory,
every file's bytes and modification time), runs the command line in-process, and compares.
"""
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import digits_config
from utils.cli import main

EXP = "exp/Digits/ResNet18"
STAGE1 = f"{EXP}/first/s1"


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

def _json(tmp, obj, name="cfg.json"):
    (tmp / name).write_text(json.dumps(obj))
    return ["--json_path", name]


def _first(tmp, **changes):
    cfg = digits_config("bad", epochs=1)
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition("__")
        (cfg[section] if section else cfg)[key] = value
    return _json(tmp, cfg)


@pytest.fixture(scope="module")
def stage1_state():
    from models import build_model
    torch.manual_seed(0)
    return build_model("ResNet18", 10, in_channels=1, use_etf=False).state_dict()


def _stage1(tmp, state, args_change=None):
    """A stage-1 run directory as first.py leaves it (args.json + best.paramOnly)."""
    run = tmp / STAGE1 / "0"
    run.mkdir(parents=True)
    args = digits_config("s1", epochs=1)
    if args_change:
        args_change(args)
    (run / "args.json").write_text(json.dumps(args))
    torch.save(state, run / "best.paramOnly")
    return run


def _second(tmp, pretrained=STAGE1, exp_name="s2"):
    cfg = digits_config(exp_name, "second", epochs=0, model={"is_pretrained": True, "pretrained_path": pretrained})
    return _json(tmp, cfg, "s2.json")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def _write_cifar10(root: Path, per_file: int = 10) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n):
        return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump(batch(per_file), fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh)
    return folder


def _cifar_cfg(tmp):
    cfg = digits_config("cifar", epochs=1)
    cfg["data"].update(name="Cifar10", root="data", download=False)
    return _json(tmp, cfg)


def _truncate(path: Path, keep: int = 100):
    path.write_bytes(path.read_bytes()[:keep])


def _unfinished_run(tmp, checkpoint_bytes: bytes):
    run = tmp / EXP / "first/bad/0"
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps(digits_config("bad", epochs=1)))
    (run / "checkpoint.ckpt").write_bytes(checkpoint_bytes)


def _exploit_bytes(tmp):
    torch.save({"format": "x", "model": {"w": _Exploit()}}, tmp / "x.ckpt")
    data = (tmp / "x.ckpt").read_bytes()
    (tmp / "x.ckpt").unlink()
    return data


# ---------------------------------------------------------------------------
# The table: (id, stage, setup(tmp, stage1_state) -> argv, message)
# ---------------------------------------------------------------------------

def _malformed(tmp, _):
    (tmp / "cfg.json").write_text('{\n  "exp_name": "x",\n  "seeds": ,\n}')
    return ["--json_path", "cfg.json"]


def _unwritable_dir(tmp, _):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o500)
    return _first(tmp) + ["--exp_root", "ro"]


def _escaping_exp_link(tmp, _):
    (tmp / "elsewhere").mkdir()
    (tmp / "exp").mkdir()
    (tmp / "exp" / "Digits").symlink_to(tmp / "elsewhere")
    return _first(tmp)


def _escaping_data_link(tmp, _):
    _write_cifar10(tmp / "outside")
    (tmp / "data").mkdir()
    (tmp / "data" / "cifar-10-batches-py").symlink_to(tmp / "outside" / "cifar-10-batches-py")
    return _cifar_cfg(tmp)


def _missing_batch(tmp, _):
    (_write_cifar10(tmp / "data") / "data_batch_3").unlink()
    return _cifar_cfg(tmp)


def _truncated_batch(tmp, _):
    _truncate(_write_cifar10(tmp / "data") / "data_batch_2")
    return _cifar_cfg(tmp)


def _exploit_batch(tmp, _):
    folder = _write_cifar10(tmp / "data")
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": _Exploit(), b"labels": [0]}, fh)
    return _cifar_cfg(tmp)


def _bad_args(content):
    def setup(tmp, state):
        run = _stage1(tmp, state)
        if content is None:
            (run / "args.json").unlink()
        else:
            (run / "args.json").write_bytes(content(run / "args.json"))
        return _second(tmp)
    return setup


def _bad_weights(content):
    def setup(tmp, state):
        run = _stage1(tmp, state)
        if content is None:
            (run / "best.paramOnly").unlink()
        else:
            (run / "best.paramOnly").write_bytes(content(run / "best.paramOnly"))
        return _second(tmp)
    return setup


def _exploit_weights(path):
    torch.save({"encoder.conv1.weight": _Exploit()}, path)
    return path.read_bytes()


def _other(section, key, value):
    def setup(tmp, state):
        _stage1(tmp, state, lambda args: args[section].update({key: value}))
        return _second(tmp)
    return setup


CASES = [
    # --- the config file and flags ---
    ("malformed JSON", "first", _malformed, "cfg.json: malformed JSON at line 3, column 12"),
    ("unknown key", "first", lambda t, _: _first(t, optim__weight_decy=0.1),
     "unknown key 'optim.weight_decy' in section 'optim'; did you mean 'optim.weight_decay'?"),
    ("wrong type", "first", lambda t, _: _first(t, data__batch_size="64"),
     "data.batch_size = '64' has the wrong type; expected an integer"),
    ("wrong type (flag)", "first", lambda t, _: _first(t) + ["--model_use_etf", "maybe"],
     "--model_use_etf 'maybe': expected true/false/1/0"),
    ("imb_factor 0", "first", lambda t, _: _first(t, data__imb_factor=0), "data.imb_factor = 0.0 must be in (0, 1]"),
    ("imb_factor > 1", "first", lambda t, _: _first(t) + ["--data_imb_factor", "1.5"],
     "data.imb_factor = 1.5 must be in (0, 1]"),
    ("batch_size < 1", "first", lambda t, _: _first(t, data__batch_size=0), "data.batch_size = 0 must be >= 1"),
    ("negative lr", "first", lambda t, _: _first(t, optim__base_lr=-0.01), "optim.base_lr = -0.01 must be >= 0"),
    ("negative weight decay", "first", lambda t, _: _first(t, optim__weight_decay=-5e-3),
     "optim.weight_decay = -0.005 must be >= 0"),
    ("n_classes not the data's", "first", lambda t, _: _first(t, data__n_classes=9),
     "data.n_classes = 9 does not match Digits (10 classes)"),
    ("seed out of range", "first", lambda t, _: _first(t) + ["--seeds", "-1"],
     "seeds = -1 must be an integer in [0, 2**32 - 1]"),
    # --- paths that would escape their roots ---
    ("exp_name with ..", "first", lambda t, _: _first(t, exp_name="../../outside"),
     "exp_name = '../../outside' is not allowed; use a plain folder name"),
    ("absolute exp_name", "first", lambda t, _: _first(t) + ["--exp_name", "/tmp/x"],
     "exp_name = '/tmp/x' is not allowed"),
    ("exp sub-folder linked outside exp/", "first", _escaping_exp_link, "would escape exp (it resolves to"),
    ("dataset folder linked outside the data root", "first", _escaping_data_link,
     "dataset folder cifar-10-batches-py would escape data (it resolves to"),
    ("data root is a file", "first",
     lambda t, _: ((t / "data").write_text("x"), _cifar_cfg(t))[1],
     "data.root = 'data' is a file, not a folder"),
    # --- dataset files ---
    ("dataset folder missing", "first", lambda t, _: _cifar_cfg(t),
     "CIFAR-10 not found under data/cifar-10-batches-py (download=False)"),
    ("dataset file missing", "first", _missing_batch, "data_batch_3 is missing"),
    ("truncated CIFAR pickle", "first", _truncated_batch, "data_batch_2 is corrupt or truncated"),
    ("CIFAR pickle that would run code", "first", _exploit_batch,
     "data_batch_1 is corrupt or truncated (UnpicklingError: it names posix.system, which a dataset file"),
    # --- the output directory ---
    ("exp root is a file", "first", lambda t, _: ((t / "out").write_text("x"), _first(t) + ["--exp_root", "out"])[1],
     "is a file, not a folder (check --exp_root 'out')"),
    ("exp root not writable", "first", _unwritable_dir, "no write permission"),
    # --- stage 2 and its stage-1 run ---
    ("stage-1 directory missing", "second", lambda t, _: _second(t),
     f"stage-1 run directory {STAGE1}/0 not found"),
    ("stage-1 args.json missing", "second", _bad_args(None), "args.json is missing"),
    ("stage-1 args.json truncated", "second", _bad_args(lambda p: p.read_bytes()[:40]), "args.json is unreadable"),
    ("stage-1 args.json unreadable", "second", _bad_args(lambda p: b"\xff\xfe\x00garbage"),
     "args.json is unreadable"),
    ("stage-1 checkpoint missing", "second", _bad_weights(None), "best.paramOnly is missing"),
    ("stage-1 checkpoint truncated", "second", _bad_weights(lambda p: p.read_bytes()[:500]),
     "best.paramOnly is unreadable or truncated"),
    ("stage-1 checkpoint not a torch file", "second", _bad_weights(lambda p: b"hello world" * 10),
     "best.paramOnly is unreadable or truncated"),
    ("stage-1 checkpoint would run code", "second", _bad_weights(_exploit_weights),
     "best.paramOnly was refused: it is not a plain weights-only state_dict (it holds pickled objects"),
    ("stage-1 run of another model", "second", _other("model", "name", "ResNet34"),
     "trained model ResNet34, but model.name = 'ResNet18'"),
    ("stage-1 run of another class count", "second", _other("data", "n_classes", 100),
     "has 100 classes, but data.n_classes = 10"),
    ("stage 2 writing into the stage-1 run", "second",
     lambda t, s: (_stage1(t, s), _second(t, pretrained=f"{EXP}/second/s1", exp_name="s1"))[1],
     "overlaps the stage-1 run"),
    # --- resuming from checkpoint.ckpt ---
    ("checkpoint.ckpt that would run code", "first",
     lambda t, _: (_unfinished_run(t, _exploit_bytes(t)), _first(t) + ["--resume"])[1],
     "checkpoint.ckpt was refused: it holds pickled objects other than tensors"),
    ("truncated checkpoint.ckpt", "first",
     lambda t, s: (_unfinished_run(t, pickle.dumps(s)[:300]), _first(t) + ["--resume"])[1],
     "checkpoint.ckpt is unreadable or truncated"),
]


def _snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        out[str(d.relative_to(root))] = "dir"
        for name in filenames:
            p = d / name
            out[str(p.relative_to(root))] = (p.read_bytes(), p.lstat().st_mtime_ns) if not p.is_symlink() else "link"
    return out


@pytest.mark.parametrize("case_id, stage, setup, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case_id, stage, setup, message, stage1_state,
                                                            tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = setup(tmp_path, stage1_state)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(stage, argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert message in err
    assert _snapshot(tmp_path) == before, "nothing may be written (no run directory, stage-1 run untouched)"
    assert "pwned" not in captured.out and not (tmp_path / "pwned.txt").exists()
