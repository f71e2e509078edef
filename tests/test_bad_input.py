"""Every bad input, one table (issues 6 and 16): exit code 2, a one-line message naming the
problem, and nothing written anywhere (no partial run directory; a stage-1 run, a lock file or
a finished run is never modified).

Each case builds its inputs in a fresh folder, snapshots the whole folder (every directory,
every file's bytes and modification time), runs the command line in-process, and compares.
The rows are grouped by the class of input of issue 16 (README "Robustness"); most are refused
before any model is built, and the few that build one use a tiny MLP, so the table stays fast.
"""
import json
import os
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import digits_config, fill_disk
from utils.cli import main

MODEL = {"name": "BNMLP", "mlp_features_d": 16, "mlp_hlayer_n": 1}  # 1 k weights: built in milliseconds
EXP = "exp/Digits/BNMLP"
STAGE1 = f"{EXP}/first/s1"
RUN = f"{EXP}/first/bad/0"


@dataclass
class Ctx:
    tmp: Path
    state: dict            # a stage-1 state_dict of MODEL
    mp: pytest.MonkeyPatch


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

def _json(c, obj, name="cfg.json"):
    (c.tmp / name).write_text(json.dumps(obj))
    return ["--json_path", name]


def _config(**changes):
    cfg = digits_config("bad", epochs=2, model=dict(MODEL))
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition("__")
        (cfg[section] if section else cfg)[key] = value
    return cfg


def _first(c, **changes):
    return _json(c, _config(**changes))


@pytest.fixture(scope="module")
def stage1_state():
    from models import build_model
    torch.manual_seed(0)
    return build_model("BNMLP", 10, input_shape=(1, 8, 8), mlp_hlayer_n=1, mlp_features_d=16).state_dict()


def _stage1(c, args_change=None, finished=True):
    """A stage-1 run directory as first.py leaves it (args.json, best.paramOnly, the finished marker)."""
    run = c.tmp / STAGE1 / "0"
    run.mkdir(parents=True)
    args = digits_config("s1", epochs=2, model=dict(MODEL))
    if args_change:
        args_change(args)
    (run / "args.json").write_text(json.dumps(args))
    torch.save(c.state, run / "best.paramOnly")
    if finished is not None:
        _marker(run / "checkpoint.ckpt", args, finished=finished)
    return run


def _marker(path, raw, finished, **extra):
    from utils.run.checkpoint import _marker as marker
    from utils.config import from_dict
    cfg = from_dict(raw)
    torch.save(marker(cfg, None, finished=finished, **extra), path)


def _second(c, pretrained=STAGE1, exp_name="s2", **model):
    cfg = digits_config(exp_name, "second", epochs=0,
                        model={**MODEL, "is_pretrained": True, "pretrained_path": pretrained, **model})
    return _json(c, cfg, "s2.json")


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


def _cifar_cfg(c):
    cfg = _config()
    cfg["data"].update(name="Cifar10", root="data", download=False)
    return _json(c, cfg)


def _truncate(path: Path, keep: int = 100):
    path.write_bytes(path.read_bytes()[:keep])


def _unfinished_run(c, checkpoint_bytes: bytes):
    run = c.tmp / RUN
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps(_config()))
    (run / "checkpoint.ckpt").write_bytes(checkpoint_bytes)
    return run


def _exploit_bytes(c):
    torch.save({"format": "x", "model": {"w": _Exploit()}}, c.tmp / "x.ckpt")
    data = (c.tmp / "x.ckpt").read_bytes()
    (c.tmp / "x.ckpt").unlink()
    return data


def _lock(c, run_rel, host=None, pid=None):
    """A lock file as a run holding the directory writes it (this process: alive)."""
    from utils.run.runlock import LockOwner, lock_path
    me = LockOwner.me()
    owner = LockOwner(pid=pid or me.pid, host=host or me.host, started="2025-01-01T00:00:00+00:00",
                      process_start=me.process_start if pid is None else None, command="first.py ...")
    path = lock_path(c.tmp / run_rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(owner.to_bytes())


def _raise_oom(*args, **kwargs):
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 1099511627776 bytes")


# ---------------------------------------------------------------------------
# Setups that need a few lines
# ---------------------------------------------------------------------------

def _malformed(c):
    (c.tmp / "cfg.json").write_text('{\n  "exp_name": "x",\n  "seeds": ,\n}')
    return ["--json_path", "cfg.json"]


def _unwritable_dir(c):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (c.tmp / "ro").mkdir()
    (c.tmp / "ro").chmod(0o500)
    return _first(c) + ["--exp_root", "ro"]


def _escaping_exp_link(c):
    (c.tmp / "elsewhere").mkdir()
    (c.tmp / "exp").mkdir()
    (c.tmp / "exp" / "Digits").symlink_to(c.tmp / "elsewhere")
    return _first(c)


def _escaping_data_link(c):
    _write_cifar10(c.tmp / "outside")
    (c.tmp / "data").mkdir()
    (c.tmp / "data" / "cifar-10-batches-py").symlink_to(c.tmp / "outside" / "cifar-10-batches-py")
    return _cifar_cfg(c)


def _missing_batch(c):
    (_write_cifar10(c.tmp / "data") / "data_batch_3").unlink()
    return _cifar_cfg(c)


def _truncated_batch(c):
    _truncate(_write_cifar10(c.tmp / "data") / "data_batch_2")
    return _cifar_cfg(c)


def _exploit_batch(c):
    folder = _write_cifar10(c.tmp / "data")
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": _Exploit(), b"labels": [0]}, fh)
    return _cifar_cfg(c)


def _bad_args(content):
    def setup(c):
        run = _stage1(c)
        if content is None:
            (run / "args.json").unlink()
        else:
            (run / "args.json").write_bytes(content(run / "args.json"))
        return _second(c)
    return setup


def _bad_weights(content):
    def setup(c):
        run = _stage1(c)
        if content is None:
            (run / "best.paramOnly").unlink()
        else:
            (run / "best.paramOnly").write_bytes(content(run / "best.paramOnly"))
        return _second(c)
    return setup


def _exploit_weights(path):
    torch.save({"fc.weight": _Exploit()}, path)
    return path.read_bytes()


def _nan_weights(path):
    state = torch.load(path, weights_only=True)
    state["linearList.0.weight"][0, 0] = float("nan")
    torch.save(state, path)
    return path.read_bytes()


def _other(section, key, value):
    def setup(c):
        _stage1(c, lambda args: args[section].update({key: value}))
        return _second(c)
    return setup


def _fifo_config(c):
    os.mkfifo(c.tmp / "cfg.json")  # opening it for reading would wait for a writer: it must not be opened so
    return ["--json_path", "cfg.json"]


def _big_config(c):
    cfg = _config(description="x" * (2 << 20))
    return _json(c, cfg)


def _duplicate_key(c):
    text = json.dumps(_config())
    (c.tmp / "cfg.json").write_text(text[:-1] + ', "optim": {"base_lr": 0.1}}')
    return ["--json_path", "cfg.json"]


def _nan_literal(c):
    (c.tmp / "cfg.json").write_text(json.dumps(_config()).replace('"base_lr": 0.05', '"base_lr": NaN'))
    return ["--json_path", "cfg.json"]


def _surrogate(key_path):
    def setup(c):
        cfg = _config()
        section, _, key = key_path.rpartition(".")
        (cfg[section] if section else cfg)[key] = "a\ud800b"
        (c.tmp / "cfg.json").write_text(json.dumps(cfg))  # ensure_ascii: a valid JSON escape
        return ["--json_path", "cfg.json"]
    return setup


def _with_env(env, argv_of=_first):
    def setup(c):
        for name, value in env.items():
            c.mp.setenv(name, value)
        return argv_of(c)
    return setup


def _finished_run(c, base_lr):
    run = c.tmp / RUN
    run.mkdir(parents=True)
    raw = _config(optim__base_lr=base_lr)
    (run / "args.json").write_text(json.dumps(raw))
    (run / "acc.json").write_text('{"All": 0.5, "Many": 0.5, "Medium": 0.5, "Few": 0.5}')
    _marker(run / "checkpoint.ckpt", raw, finished=True, epoch=2)
    return run


_CPU_STATE = torch.Generator().get_state()
# a full checkpoint's keys (CPU generator states: a resume checks them before the best weights)
_FULL = {"model": {}, "optimizer": {}, "best_acc": 0.5, "records": [], "track": {},
         "rng": {"torch": _CPU_STATE, "generators": {"shuffle": _CPU_STATE, "augment": _CPU_STATE}}}


def _killed_in_final_evaluation(c):
    """acc.json written, the checkpoint not marked finished (a kill during the final evaluation)."""
    run = c.tmp / RUN
    run.mkdir(parents=True)
    raw = _config()
    (run / "args.json").write_text(json.dumps(raw))
    (run / "acc.json").write_text('{"All": 0.5, "Many": 0.5, "Medium": 0.5, "Few": 0.5}')
    _marker(run / "checkpoint.ckpt", raw, finished=False, epoch=2, best_epoch=1, **_FULL)
    return _first(c)


def _best_weights_gone(c):
    run = c.tmp / RUN
    run.mkdir(parents=True)
    raw = _config()
    (run / "args.json").write_text(json.dumps(raw))
    _marker(run / "checkpoint.ckpt", raw, finished=False, epoch=2, best_epoch=1, **_FULL)
    return _first(c) + ["--resume"]


def _oom_at_build(c):
    import utils.run.prepare as prepare
    c.mp.setattr(prepare, "build_model", _raise_oom)
    return _first(c)


def _oom_at_first_step(c):
    import utils.run.fit as fit
    c.mp.setattr(fit, "train_one_epoch", _raise_oom)
    return _first(c)


def _disk_full(name):
    def setup(c):
        fill_disk(c.mp, name, after_bytes=10)
        return _first(c)
    return setup


# ---------------------------------------------------------------------------
# The table: (id, stage, setup(ctx) -> argv, message)
# ---------------------------------------------------------------------------

CASES = [
    # --- the config file and flags ---
    ("malformed JSON", "first", _malformed, "cfg.json': malformed JSON at line 3, column 12"),
    ("unknown key", "first", lambda c: _first(c, optim__weight_decy=0.1),
     "unknown key 'optim.weight_decy' in section 'optim'; did you mean 'optim.weight_decay'?"),
    ("wrong type", "first", lambda c: _first(c, data__batch_size="64"),
     "data.batch_size = '64' has the wrong type; expected an integer"),
    ("wrong type (flag)", "first", lambda c: _first(c) + ["--model_use_etf", "maybe"],
     "--model_use_etf 'maybe': expected true/false/1/0"),
    ("imb_factor 0", "first", lambda c: _first(c, data__imb_factor=0),
     "data.imb_factor = 0.0 must be > 0 (a number in (0, 1])"),
    ("imb_factor > 1", "first", lambda c: _first(c) + ["--data_imb_factor", "1.5"],
     "data.imb_factor = 1.5 must be <= 1 (a number in (0, 1])"),
    ("batch_size < 1", "first", lambda c: _first(c, data__batch_size=0),
     "data.batch_size = 0 must be >= 1 (an integer in [1, 2**20])"),
    ("negative lr", "first", lambda c: _first(c, optim__base_lr=-0.01),
     "optim.base_lr = -0.01 must be >= 0 (a number in [0, 100])"),
    ("negative weight decay", "first", lambda c: _first(c, optim__weight_decay=-5e-3),
     "optim.weight_decay = -0.005 must be >= 0 (a number in [0, 100])"),
    ("n_classes not the data's", "first", lambda c: _first(c, data__n_classes=9),
     "data.n_classes = 9 does not match Digits (10 classes)"),
    ("seed out of range", "first", lambda c: _first(c) + ["--seeds", "-1"],
     "seeds = -1 must be >= 0 (an integer in [0, 2**32 - 1])"),
    # --- paths that would escape their roots ---
    ("exp_name with ..", "first", lambda c: _first(c, exp_name="../../outside"),
     "exp_name = '../../outside' is not allowed; use a plain folder name"),
    ("absolute exp_name", "first", lambda c: _first(c) + ["--exp_name", "/tmp/x"], "exp_name = '/tmp/x' is not allowed"),
    ("exp sub-folder linked outside exp/", "first", _escaping_exp_link, "would escape exp (it resolves to"),
    ("dataset folder linked outside the data root", "first", _escaping_data_link,
     "dataset folder cifar-10-batches-py would escape data (it resolves to"),
    ("data root is a file", "first", lambda c: ((c.tmp / "data").write_text("x"), _cifar_cfg(c))[1],
     "data.root = 'data' is a file, not a folder"),
    # --- dataset files ---
    ("dataset folder missing", "first", _cifar_cfg, "CIFAR-10 not found under data/cifar-10-batches-py (download=False)"),
    ("dataset file missing", "first", _missing_batch, "data_batch_3 is missing"),
    ("truncated CIFAR pickle", "first", _truncated_batch, "data_batch_2 is corrupt or truncated"),
    ("CIFAR pickle that would run code", "first", _exploit_batch,
     "data_batch_1 is corrupt or truncated (UnpicklingError: it names posix.system, which a dataset file"),
    # --- the output directory ---
    ("exp root is a file", "first", lambda c: ((c.tmp / "out").write_text("x"), _first(c) + ["--exp_root", "out"])[1],
     "is a file, not a folder (check --exp_root 'out')"),
    ("exp root not writable", "first", _unwritable_dir, "no write permission"),
    # --- stage 2 and its stage-1 run ---
    ("stage-1 directory missing", "second", _second, f"stage-1 run directory {STAGE1}/0 not found"),
    ("stage-1 args.json missing", "second", _bad_args(None), "args.json is missing"),
    ("stage-1 args.json truncated", "second", _bad_args(lambda p: p.read_bytes()[:40]), "args.json is unreadable"),
    ("stage-1 args.json unreadable", "second", _bad_args(lambda p: b"\xff\xfe\x00garbage"), "args.json is unreadable"),
    ("stage-1 checkpoint missing", "second", _bad_weights(None), "best.paramOnly is missing"),
    ("stage-1 checkpoint truncated", "second", _bad_weights(lambda p: p.read_bytes()[:500]),
     "best.paramOnly is unreadable or truncated"),
    ("stage-1 checkpoint not a torch file", "second", _bad_weights(lambda p: b"hello world" * 10),
     "best.paramOnly is unreadable or truncated"),
    ("stage-1 checkpoint would run code", "second", _bad_weights(_exploit_weights),
     "best.paramOnly was refused: it is not a plain weights-only state_dict (it holds pickled objects"),
    ("stage-1 run of another model", "second", _other("model", "name", "MLResBlock"),
     "trained model MLResBlock, but model.name = 'BNMLP'"),
    ("stage-1 run of another class count", "second", _other("data", "n_classes", 100),
     "has 100 classes, but data.n_classes = 10"),
    ("stage 2 writing into the stage-1 run", "second",
     lambda c: (_stage1(c), _second(c, pretrained=f"{EXP}/second/s1", exp_name="s1"))[1], "overlaps the stage-1 run"),
    # --- resuming from checkpoint.ckpt ---
    ("checkpoint.ckpt that would run code", "first",
     lambda c: (_unfinished_run(c, _exploit_bytes(c)), _first(c) + ["--resume"])[1],
     "checkpoint.ckpt was refused: it holds pickled objects other than tensors"),
    ("truncated checkpoint.ckpt", "first",
     lambda c: (_unfinished_run(c, pickle.dumps(c.state)[:300]), _first(c) + ["--resume"])[1],
     "checkpoint.ckpt is unreadable or truncated"),

    # === issue 16, class 1: device strings ===
    ("device mps", "first", lambda c: _first(c) + ["--device", "mps"],
     "device = 'mps' is not allowed; choose auto, cpu, cuda or cuda:N"),
    ("device meta", "first", lambda c: _first(c, device="meta"), "device = 'meta' is not allowed"),
    ("device empty", "first", lambda c: _first(c) + ["--device", ""], "device = '' is not allowed"),
    ("device malformed index", "first", lambda c: _first(c) + ["--device", "cuda:-1"],
     "device = 'cuda:-1' is not allowed"),
    ("device index of an absent GPU", "first", lambda c: _first(c, device="cuda:999"), "device = 'cuda:999' but "),
    # === class 2: numbers too large or too small for what consumes them ===
    ("batch beyond 2**20", "first", lambda c: _first(c, data__batch_size=2 ** 40),
     "data.batch_size = 1099511627776 must be <= 2**20 (an integer in [1, 2**20])"),
    ("threads beyond a C long", "first", lambda c: _first(c) + ["--num_threads", str(10 ** 30)],
     "num_threads = 1000000000000000000000000000000 must be <= 4096 (an integer in [0, 4096])"),
    ("epochs that never end", "first", lambda c: _first(c, optim__total_epoch_num=10 ** 9),
     "optim.total_epoch_num = 1000000000 must be <= 100000 (an integer in [0, 100000])"),
    ("MLP of terabytes", "first", lambda c: _first(c, model__mlp_features_d=16384, model__mlp_hlayer_n=64),
     "model.mlp_features_d = 16384 with model.mlp_hlayer_n = 64 asks BNMLP for"),
    ("batch of 1 cannot train BatchNorm", "first", lambda c: _first(c, data__batch_size=1),
     "data.batch_size = 1 cannot train: every model here has BatchNorm"),
    ("L2 normalisation rate 0 (divides)", "second", lambda c: (_stage1(c), _second(c))[1] + [
        "--optim_norm_type", "L2", "--optim_norm_param", "0"],
     "optim.norm_param = 0.0 must be >= 0.0001 (a number in [0.0001, 10000]) with optim.norm_type = 'L2'"),
    ("learning rate 0 in float32", "first", lambda c: _first(c, optim__base_lr=1e-45),
     "optim.base_lr = 1e-45 is below the smallest normal float32"),
    ("ETF norm rate that overflows", "first", lambda c: _first(c, model__etf_norm_rate=1e-30),
     "model.etf_norm_rate = 1e-30 must be >= 0.0001 (a number in [0.0001, 10000])"),
    ("multiplicative tau beyond float32", "first",
     lambda c: _first(c, model__logit_adjustment_tau=50.0, model__use_additive_logit_adjustment=False),
     "model.logit_adjustment_tau: tau 50 with multiplicative adjustment scales the rarest class's logit"),
    ("out of memory building the model", "first", _oom_at_build,
     "out of memory on cpu building the model (model.mlp_features_d = 16, model.mlp_hlayer_n = 1)"),
    ("out of memory at the first step", "first", _oom_at_first_step,
     "out of memory on cpu in the first epoch (data.batch_size = 64, data.eval_batch_size = 64"),
    ("parameter_search_id beyond its range", "first", lambda c: _first(c, param_search_id=2 ** 63),
     "param_search_id = 9223372036854775808 must be <= 2**32 - 1 (an integer in [0, 2**32 - 1])"),
    ("NaN in the JSON", "first", _nan_literal, "optim.base_lr = nan must be a finite number"),
    # === class 3: unbounded inputs ===
    ("config from /dev/zero", "first", lambda c: ["--json_path", "/dev/zero"],
     "--json_path '/dev/zero': not a regular file (a device, FIFO or socket), not a JSON file"),
    ("config from a FIFO", "first", _fifo_config, "--json_path 'cfg.json': not a regular file"),
    ("config is a directory", "first", lambda c: ((c.tmp / "d").mkdir(), ["--json_path", "d"])[1],
     "--json_path 'd': a directory, not a JSON file"),
    ("config over 1 MiB", "first", _big_config, "more than the 1048576 (1 MiB) a JSON file may have"),
    ("tau sweep ','", "second", lambda c: (_stage1(c), _second(c, logit_adjustment_tau_sweep=","))[1],
     "model.logit_adjustment_tau_sweep = ',' is not a tau list: an empty value between commas"),
    ("tau sweep of 10^8 points", "second", lambda c: _second(c, logit_adjustment_tau_sweep="0:1:100000000"),
     "num must be >= 1 and <= 10000, got 100000000"),
    ("tau sweep beyond the tau range", "second", lambda c: _second(c, logit_adjustment_tau_sweep="0,1e300"),
     "tau must be a finite number >= 0 and <= 100, got 1e+300"),
    # === class 4: text that cannot be encoded ===
    ("lone surrogate in exp_name", "first", _surrogate("exp_name"),
     "exp_name = 'a\\ud800b' contains U+D800, a lone surrogate"),
    ("lone surrogate in data.root", "first", _surrogate("data.root"), "data.root = 'a\\ud800b' contains U+D800"),
    ("lone surrogate in --exp_root", "first", lambda c: _first(c) + ["--exp_root", "out\udcff"],
     "--exp_root 'out\\udcff' contains U+DCFF, a lone surrogate"),
    ("NUL in the stage-1 path", "second", lambda c: _second(c, pretrained="exp/a\x00b"),
     "model.pretrained_path = 'exp/a\\x00b' contains a NUL character"),
    # === class 5: one run directory, two writers ===
    ("run directory in use by a live process", "first", lambda c: (_lock(c, RUN), _first(c))[1],
     f"is in use by pid {os.getpid()} on host {socket.gethostname()} since 2025-01-01T00:00:00+00:00"),
    ("run directory locked from another host", "first", lambda c: (_lock(c, RUN, host="elsewhere", pid=1), _first(c))[1],
     "is locked by pid 1 on host elsewhere since 2025-01-01T00:00:00+00:00 (lock file"),
    ("--overwrite of a run in use", "first", lambda c: (_finished_run(c, 0.05), _lock(c, RUN), _first(c))[2]
     + ["--overwrite"], "is in use by pid"),
    ("stage 1 still training", "second", lambda c: (_stage1(c, finished=False), _lock(c, f"{STAGE1}/0"), _second(c))[2],
     f"is still running (pid {os.getpid()} on host"),
    ("stage 1 not finished", "second", lambda c: (_stage1(c, finished=False), _second(c))[1],
     "has not finished (last completed epoch 0 of 2); let it finish (or --resume it), or add --allow_unfinished_stage1"),
    ("stage 1 without a finished marker", "second", lambda c: (_stage1(c, finished=None), _second(c))[1],
     "has not finished (no checkpoint.ckpt and no acc.json)"),
    # === class 6: a full disk ===
    ("disk full at the start marker", "first", _disk_full("checkpoint.ckpt"),
     "checkpoint.ckpt: No space left on device (its previous version, if any, is kept"),
    ("disk full writing args.json", "first", _disk_full("args.json"), "args.json: No space left on device"),
    ("disk full writing the initial best weights", "first", _disk_full("best.paramOnly"),
     "best.paramOnly: No space left on device"),
    # === class 8: runs damaged or trusted wrongly ===
    ("--seeds 0 0", "first", lambda c: _first(c) + ["--seeds", "0", "0"], "seeds 0 and 0 would both write to"),
    ("param_search with several seeds", "first", lambda c: _first(c, param_search=True) + ["--seeds", "0", "1"],
     "param_search names the folder by param_search_id = 0"),
    ("resume after the last epoch without best.paramOnly", "first", _best_weights_gone,
     "best.paramOnly (the weights of best epoch 1) is missing and the checkpoint holds those of epoch 2"),
    ("damaged checkpoint.ckpt", "first",
     lambda c: (_marker(_unfinished_run(c, b"") / "checkpoint.ckpt", _config(), finished="yes"),
                _first(c) + ["--resume"])[1], "checkpoint.ckpt is damaged: its 'finished' is of the wrong type"),
    ("acc.json of a run killed in its final evaluation", "first", _killed_in_final_evaluation,
     "holds an unfinished run (last completed epoch 2 of 2) and was left untouched; add --resume"),
    ("NaN stage-1 weights", "second", _bad_weights(_nan_weights),
     "best.paramOnly holds non-finite weights (linearList.0.weight has NaN or inf)"),
    # === class 9: silently accepted or misleading ===
    ("duplicate JSON key", "first", _duplicate_key, "key 'optim' appears twice in one object"),
    ("imb_type of another case", "first", lambda c: _first(c, data__imb_type="Exp"),
     "data.imb_type = 'Exp' is not allowed; choose one of: exp, step, none"),
    ("drw beyond the last epoch", "first", lambda c: _first(c, optim__loss_type="CB", optim__drw=5),
     "optim.drw = 5 with optim.total_epoch_num = 2: the first drw epochs train with plain CE"),
    ("--exp_root ''", "first", lambda c: _first(c) + ["--exp_root", ""], "--exp_root '' is empty"),
    ("exp_name of spaces", "first", lambda c: _first(c, exp_name="   "), "exp_name = '   ' is not allowed"),
    ("--resume of a finished run with other keys", "first",
     lambda c: (_finished_run(c, 0.1), _first(c) + ["--resume"])[1],
     "holds a finished run of another config (optim.base_lr = 0.1 in the checkpoint but 0.05 now)"),
    # === our own classes: flags, environment ===
    ("seed that is not an integer", "first", lambda c: _first(c) + ["--seeds", "1e3"],
     "argument --seeds: invalid int value: '1e3' (see first.py --help)"),
    ("misspelt flag", "first", lambda c: _first(c) + ["--optim_weight_decy", "0.1"],
     "unrecognized arguments: --optim_weight_decy 0.1; did you mean --optim_weight_decay?"),
    ("--exp_root longer than a file name may be", "first", lambda c: _first(c) + ["--exp_root", "x" * 300],
     "File name too long (check --exp_root)"),
    ("lock file that is a folder", "first", lambda c: ((c.tmp / EXP / "first/bad/.0.lock").mkdir(parents=True),
                                                       _first(c))[1], ".0.lock cannot be opened (Is a directory)"),
    ("exp_name over 200 bytes", "first", lambda c: _first(c, exp_name="é" * 101), "is not allowed"),
    ("OMP_NUM_THREADS not a number", "first", _with_env({"OMP_NUM_THREADS": "lots"}),
     "environment variable OMP_NUM_THREADS = 'lots' is not allowed"),
    ("OMP_NUM_THREADS beyond 4096", "first", _with_env({"OMP_NUM_THREADS": "99999999999999999999"}),
     "give a number of threads in [1, 4096]"),
    ("WORLD_SIZE without torchrun", "first", _with_env({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}),
     "WORLD_SIZE = 2 but MASTER_ADDR and MASTER_PORT not set"),
    ("RANK not a number", "first", _with_env({"RANK": "zero"}), "environment variable RANK = 'zero' is not a process"),
]


def _snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        out[str(d.relative_to(root))] = "dir"
        for name in filenames:
            p = d / name
            if p.is_symlink():
                out[str(p.relative_to(root))] = "link"
            elif p.is_file():
                out[str(p.relative_to(root))] = (p.read_bytes(), p.lstat().st_mtime_ns)
            else:
                out[str(p.relative_to(root))] = "special"
    return out


@pytest.mark.parametrize("case_id, stage, setup, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case_id, stage, setup, message, stage1_state,
                                                            tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import utils.run.pipeline as pipeline
    monkeypatch.setattr("utils.cli.draw_figures", lambda run_dir: None)  # no row gets there; if one did, fast
    argv = setup(Ctx(tmp_path, stage1_state, monkeypatch))
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(stage, argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert message in err
    assert _snapshot(tmp_path) == before, "nothing may be written (no run directory, stage-1 run untouched)"
    assert "pwned" not in captured.out and not (tmp_path / "pwned.txt").exists()

