"""torchrun + DistributedDataParallel on CPU (gloo), against one process with the same global batch.

Tolerances.  Two processes compute the same mathematics as one: the loss of the
global batch, BatchNorm statistics of the global batch, the mean gradient.  What
differs is the order of float32 additions (BatchNorm statistics summed from two
parts, gradients summed by the all-reduce), which moves results by about 1e-7
relatively per operation.  The test network uses ELU: with ReLU, a pre-activation
within 1e-7 of zero may land on the other side of the kink in one run, which
changes that position's gradient outright and, through the following SGD steps,
makes two runs drift apart by far more than rounding (measured: 0.5% of a layer's
gradient after one step).  Measured with ELU over 6 steps: per-step losses agree to
1.2e-7 relatively, and each weight tensor's distance to the one-process result is
6e-6 of how far training moved it.  The tolerances (1e-5 on the losses, 1e-3 on the
weights) leave room for other CPUs and thread counts, and the control run shows
they still catch a real difference: without synchronised BatchNorm the losses
differ by 3e-3 and the weights by 57% of their update.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.conftest import ROOT, TINY_MODEL, digits_config
from utils.engine import ddp as global_bn
from utils import distributed as ddp
from utils.run.rundir import FollowerRunDir

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORKER = str(ROOT / "tests" / "dist_worker.py")
LOSS_RTOL = 1e-5
WEIGHT_TOL = 1e-3
TINY = {**TINY_MODEL, "activation_type": "relu"}  # the small networks are built with ReLU only
STAGE1 = Path("Digits/BNMLP/first/first")  # exp_name "first" and "second" under each exp root
STAGE2 = Path("Digits/BNMLP/second/second")
STEP_PAUSE_S = "0.2"  # tests/paced_cli.py: the crashed launch's epoch of 6 steps lasts about 1.2 s


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONWARNINGS="ignore", **extra)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no need for the host name to resolve
    for name in (ddp.FORCE_ENV, "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if name not in extra:
            env.pop(name, None)
    return env


def _torchrun(args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None, **kwargs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(**(env or {})), capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def _launch(args: list[str], nproc: int, timeout: int = 300) -> None:
    """``nproc`` processes with torchrun's environment, started directly (no torchrun agent)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=_env(RANK=str(r), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                                                  MASTER_PORT=str(port), LOCAL_RANK=str(r),
                                                  LOCAL_WORLD_SIZE=str(nproc)))
             for r in range(nproc)]
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank}: {output[-3000:]}"


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _config(tmp_path: Path, name: str, **kwargs) -> str:
    cfg = digits_config(name, **kwargs)
    cfg["num_threads"] = 1
    cfg["model"].setdefault("activation_type", "elu")  # smooth: see the module docstring
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _update_distance(one: dict, other: dict, initial: dict) -> float:
    """The largest ||w_other - w_one|| / ||w_one - w_initial|| over the float tensors that trained."""
    worst = 0.0
    for key, w in one.items():
        if not w.is_floating_point():
            continue
        moved = (w.double() - initial[key].double()).norm()
        if moved > 0:
            worst = max(worst, float((other[key].double() - w.double()).norm() / moved))
    return worst


# ---------------------------------------------------------------------------
# Without torchrun: the helpers are the identity and the chunking rule
# ---------------------------------------------------------------------------

def test_chunks_cover_every_row_once_in_order():
    for n in (0, 1, 5, 21, 64, 597):
        for world in (1, 2, 3, 8):
            sizes = ddp.chunk_sizes(n, world)
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
            bounds = [ddp.chunk_bounds(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert ddp.chunk_sizes(21, 2) == [11, 10]


def test_single_process_helpers_are_the_identity():
    assert not ddp.context().enabled
    t = torch.arange(6.0).reshape(3, 2)
    assert ddp.gather_rows(t, 3) is t and ddp.gather_rows_autograd(t, 3) is t
    assert ddp.all_reduce_sum(t) is t and ddp.any_rank(True) and not ddp.any_rank(False)
    assert ddp.agree(("new", 1), "x") == ("new", 1)
    assert ddp.my_bounds(7) == (0, 7)


def test_global_batch_batchnorm_keeps_types_keys_and_single_process_numbers():
    from models import build_model

    torch.manual_seed(0)
    model = build_model("ResNet18", 10, in_channels=1, small_input=True, one_param_bn=True)
    reference = build_model("ResNet18", 10, in_channels=1, small_input=True, one_param_bn=True)
    reference.load_state_dict(model.state_dict())
    groups_before = {k: [n for n, _ in v] for k, v in model.named_parameter_groups().items()}
    n = global_bn.convert_sync_batchnorm(model)
    assert n == sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in reference.modules()) > 0
    assert all(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    assert {k: [n for n, _ in v] for k, v in model.named_parameter_groups().items()} == groups_before
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(8, 1, 8, 8)
    model.train(), reference.train()
    assert torch.equal(model(x), reference(x))  # one process: the class's own forward


@pytest.fixture
def forced_group(monkeypatch):
    """A process group of this one process (gloo, in-process store), as WB_FORCE_DISTRIBUTED=1
    makes it without torchrun."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(ddp.FORCE_ENV, "1")
    try:
        yield ddp.setup("cpu")
    finally:
        ddp.teardown()


def test_forced_single_process_group_runs_the_distributed_helpers(forced_group):
    assert forced_group.enabled and forced_group.world_size == 1 and forced_group.backend == "gloo"
    assert dist.is_initialized() and "forced by WB_FORCE_DISTRIBUTED=1" in forced_group.describe()
    t = torch.arange(6.0).reshape(3, 2).requires_grad_()
    gathered = ddp.gather_rows_autograd(t, 3)
    assert gathered is not t and torch.equal(gathered, t)  # through the collective, not the identity
    gathered.sum().backward()
    assert torch.equal(t.grad, torch.ones(3, 2))
    assert torch.equal(ddp.gather_rows(t.detach(), 3), t.detach()) and ddp.agree(5, "x") == 5


def test_force_variable_takes_only_0_or_1(monkeypatch):
    from utils.config import ConfigError

    monkeypatch.setenv(ddp.FORCE_ENV, "yes")
    with pytest.raises(ConfigError, match=r"WB_FORCE_DISTRIBUTED = 'yes'; use 1 .* or 0 / unset"):
        ddp.setup("cpu")
    monkeypatch.setenv(ddp.FORCE_ENV, "0")
    assert not ddp.setup("cpu").enabled


@pytest.mark.parametrize("make,shape,channels_last", [
    (lambda: torch.nn.BatchNorm2d(6), (5, 6, 4, 3), False),
    (lambda: torch.nn.BatchNorm2d(6), (5, 6, 4, 3), True),
    (lambda: torch.nn.BatchNorm1d(7), (9, 7), False),
])
def test_fused_global_batchnorm_bookkeeping_matches_batchnorm(forced_group, monkeypatch, make, shape, channels_last):
    """The fused path (tests/bn_kernels.py standing for the CUDA kernels) and the composed one,
    against the module's own training-mode forward and backward: outputs, gradients of the input
    and of the affine parameters, running statistics, the layout of the output."""
    from tests.bn_kernels import KERNELS

    monkeypatch.setattr(global_bn, "_FUSED_KERNELS", KERNELS)
    torch.manual_seed(1)
    plain = make()
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-1, 1)
    x, dy = 3 * torch.randn(shape) + 1, torch.randn(shape)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)

    def run(module, fused):
        xi = x.clone().requires_grad_()
        y = module(xi) if fused is None else module.global_batch_forward(xi, fused=fused)
        (y * dy).sum().backward()
        return y, xi.grad, module

    ref_y, ref_dx, ref = run(plain, None)
    for fused in (False, True):
        module = make()  # fresh running statistics, the trained module's affine parameters
        module.load_state_dict({**module.state_dict(), "weight": plain.weight.detach(), "bias": plain.bias.detach()})
        global_bn.convert_sync_batchnorm(module)
        y, dx, module = run(module.train(), fused)
        for got, want in ((y, ref_y), (dx, ref_dx), (module.weight.grad, ref.weight.grad),
                          (module.bias.grad, ref.bias.grad), (module.running_mean, ref.running_mean),
                          (module.running_var, ref.running_var)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert int(module.num_batches_tracked) == 1
        if fused:  # a channels_last input goes to the kernels as it is
            assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_device_check_of_the_distributed_code_passes_on_cpu(monkeypatch, capsys):
    """bench/dist_check.py (what a GPU runs with NCCL and the CUDA kernels) in its CPU mode."""
    import importlib.util

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(ddp.FORCE_ENV, "1")
    monkeypatch.setattr(global_bn, "_FUSED_KERNELS", global_bn._FUSED_KERNELS)  # restored after the check replaces them
    spec = importlib.util.spec_from_file_location("dist_check", ROOT / "bench" / "dist_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.main(["--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("PASS") for line in lines)
    assert sum("fused = composed" in line for line in lines) == 6 and any("collectives" in line for line in lines)
    assert not ddp.context().enabled and not dist.is_initialized()


def test_an_empty_evaluation_shard_gets_one_batch_of_no_rows(monkeypatch, tmp_path):
    from PIL import Image
    from torchvision.transforms import PILToTensor
    from utils.data.augment import BatchAugment
    from utils.data.batches import FeatureSplit, FileSplit
    from utils.data.batches import SplitTensors
    from utils.engine.evaluation import shard_eval_batches

    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((5, 4, 3), 40 * i, dtype=np.uint8)).save(paths[-1])
    splits = {(1, 8, 8): SplitTensors(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1])),
              (6,): FeatureSplit(torch.randn(2, 6), torch.tensor([0, 1])),
              (3, 5, 4): FileSplit(paths, torch.tensor([0, 1]), PILToTensor(), [0.5] * 3, [0.5] * 3,
                                   torch.device("cpu"), 0)}
    augment = BatchAugment([0.5], [0.25], 0, False)
    for rank, rows in ((0, 1), (2, 0)):  # 2 images over 3 ranks: 1 + 1 + 0
        _as_rank(monkeypatch, rank, world=3)
        for trailing, split in splits.items():
            shard, batches = shard_eval_batches(split, augment, 4)
            (x, y), = list(batches)
            assert len(shard) == rows and x.shape == (rows,) + trailing and x.is_floating_point()
            assert y.shape == (rows,) and y.dtype == torch.int64


def test_follower_run_directory_writes_nothing(tmp_path):
    run = FollowerRunDir(tmp_path / "run")
    run.write_json("acc.json", {"All": 1.0})
    run.save_torch("best.paramOnly", {"w": torch.zeros(1)})
    run.save_npy("x.npy", np.zeros(2))
    run.append_line("train.log", "hello")
    run.write_csv("metrics.csv", ["epoch"], [[1]])
    assert not (tmp_path / "run").exists() and not run.writes


def test_batch_that_does_not_divide_is_refused(monkeypatch):
    from utils.cli import check_global_batch
    from utils.config import ConfigError, from_dict

    cfg = from_dict(digits_config("x"))
    cfg.data.batch_size = 63
    monkeypatch.setattr(ddp, "_CONTEXT", ddp.Dist(rank=0, world_size=2, local_world_size=2, backend="gloo"))
    with pytest.raises(ConfigError, match=r"data.batch_size = 63 is the global batch and must divide by the 2 "
                                          r"processes .*use 62 or 64"):
        check_global_batch(cfg, ddp.context().world_size)
    cfg.data.batch_size = 64
    check_global_batch(cfg, ddp.context().world_size)


def test_resume_command_repeats_the_torchrun_launch(monkeypatch):
    from utils.cli import resume_command

    assert resume_command("first", ["--json_path", "a.json"]) == "python first.py --json_path a.json --resume"
    monkeypatch.setattr(ddp, "_CONTEXT", ddp.Dist(rank=0, world_size=4, local_world_size=2, backend="nccl"))
    assert resume_command("first", ["--json_path", "a.json", "--overwrite"]) == \
        "torchrun --nnodes=2 --nproc_per_node=2 first.py --json_path a.json --resume"


def _as_rank(monkeypatch, rank: int, world: int = 2) -> None:
    monkeypatch.setattr(ddp, "_CONTEXT", ddp.Dist(rank=rank, world_size=world, local_world_size=world, backend="gloo"))


def _epoch(make_batches, monkeypatch, world: int):
    """[(x parts of every rank, y, idx)] of one epoch, each rank's batches drawn from fresh generators."""
    per_rank = []
    for rank in range(world):
        if world > 1:
            _as_rank(monkeypatch, rank, world)
        per_rank.append(list(make_batches()))
    monkeypatch.setattr(ddp, "_CONTEXT", ddp.Dist())
    return [([b[0] for b in step], step[0][1], step[0][2]) for step in zip(*per_rank)]


def _assert_shards_reassemble(make_batches, monkeypatch, world: int = 3) -> None:
    one = _epoch(make_batches, monkeypatch, 1)
    many = _epoch(make_batches, monkeypatch, world)
    assert len(one) == len(many) > 1
    for (x1, y1, i1), (xs, y, i) in zip(one, many):
        assert torch.equal(i, i1) and torch.equal(y, y1)  # every rank knows the global batch
        assert [x.shape[0] for x in xs] == ddp.chunk_sizes(i1.shape[0], world)
        assert torch.equal(torch.cat(xs), x1[0])  # the parts, in rank order, are the one-process batch


def test_augmented_image_batches_split_into_the_one_process_batch(monkeypatch):
    from utils.data.augment import BatchAugment
    from utils.engine.train import SplitTensors, TrainState, train_batches

    gen = torch.Generator().manual_seed(0)
    split = SplitTensors(torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=gen),
                         torch.randint(0, 5, (50,), generator=gen))

    def batches():
        state = TrainState(optimizer=None, objective=None, augment=BatchAugment([0.5] * 3, [0.25] * 3, 2, True),
                           batch_size=12, n_classes=5, shuffle_generator=torch.Generator().manual_seed(3),
                           augment_generator=torch.Generator().manual_seed(4))
        return train_batches(split, state)[1]

    _assert_shards_reassemble(batches, monkeypatch)  # 50 = 4 x 12 + 2: the last batch is 1 + 1 + 0


def test_feature_and_file_batches_split_into_the_one_process_batch(monkeypatch, tmp_path):
    from PIL import Image
    from torchvision.transforms import PILToTensor
    from utils.data.batches import FeatureSplit, FileSplit

    gen = torch.Generator().manual_seed(0)
    table = FeatureSplit(torch.randn(40, 6, generator=gen), torch.randint(0, 4, (40,), generator=gen))
    _assert_shards_reassemble(lambda: table.epoch_batches(16, torch.Generator().manual_seed(5)), monkeypatch)
    paths = []
    for i in range(23):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((4, 4, 3), i * 10, dtype=np.uint8)).save(path)
        paths.append(str(path))
    files = FileSplit(paths, torch.arange(23) % 3, PILToTensor(), [0.5] * 3, [0.5] * 3, torch.device("cpu"), 0)
    _assert_shards_reassemble(lambda: files.epoch_batches(8, torch.Generator().manual_seed(6)), monkeypatch)
    # 23 = 2 x 9 + 5 over 6 processes: the last batch leaves the sixth without images
    _assert_shards_reassemble(lambda: files.epoch_batches(9, torch.Generator().manual_seed(6)), monkeypatch, world=6)
    shard = files.subset(*ddp.chunk_bounds(23, 2, 1))
    assert len(shard) == 11 and torch.equal(shard.labels, files.labels[12:])


# ---------------------------------------------------------------------------
# Under torchrun --nproc_per_node=2 (gloo): four launches for the whole module
# ---------------------------------------------------------------------------

def _plan(tmp: Path, name: str, jobs: list) -> str:
    path = tmp / f"{name}.plan.json"
    path.write_text(json.dumps(jobs))
    return str(path)


def _cli_result(out: str, world: int) -> SimpleNamespace:
    """A CLI job of tests/dist_worker.py: rank 0's exit status, every rank's output in rank order."""
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]
    return SimpleNamespace(returncode=ranks[0]["rc"], stdout="".join(r["stdout"] for r in ranks),
                           stderr="".join(r["stderr"] for r in ranks))


def _crash(tmp: Path, first: str) -> dict:
    """A torchrun launch of stage 1 (each step held, tests/paced_cli.py) whose every process is
    killed (SIGKILL) once epoch 1's checkpoint exists."""
    from utils.run.checkpoint import read_checkpoint

    root = tmp / "crash"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "paced_cli.py"), STEP_PAUSE_S, "first", "--json_path", first, "--exp_root", str(root)]
    run = root / STAGE1 / "0"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ckpt = run / "checkpoint.ckpt"
            if ckpt.is_file():
                try:
                    if read_checkpoint(ckpt, mmap=True).get("epoch", 0) >= 1:
                        break
                except Exception:  # noqa: BLE001 - being replaced; look again
                    pass
            time.sleep(0.05)
        alive = proc.poll() is None
        ended = "" if alive else proc.stderr.read()[-2000:]
    finally:
        victims = [proc.pid] + _descendants(proc.pid)  # torchrun starts its workers in their own sessions
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
    time.sleep(0.5)
    return {"root": root, "run": run, "alive_at_kill": alive, "ended": ended,
            "acc_after_kill": (run / "acc.json").exists()}


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Every launch of the module's torchrun tests, each a list of jobs (tests/dist_worker.py):

    * a torchrun launch of stage 1 killed after epoch 1 (the crash, resumed below);
    * torchrun --nproc_per_node=1, one process: 6 training steps, stage 1, stage 2 (CB + MaxNorm
      retraining), then with WB_FORCE_DISTRIBUTED=1 the 6 steps through the distributed code;
    * torchrun --nproc_per_node=2: a global batch that does not divide (refused), 6 steps with
      and without synchronised BatchNorm (the control), stage 1, stage 2, the crashed run's --resume.

    The steps run ResNet32 (BatchNorm2d over the global batch, ELU: see the module docstring);
    the stages run the tiny network (2 epochs each)."""
    tmp = tmp_path_factory.mktemp("ddp")
    # ResNet-32: BatchNorm2d in a conv net, as ResNet18, at a tenth of its arithmetic
    steps = _config(tmp, "steps", model={"name": "ResNet32"}, optim={"base_lr": 0.05, "weight_decay": 5e-3})
    control = _config(tmp, "nosync", model={"name": "ResNet32"}, optim={"base_lr": 0.05, "weight_decay": 5e-3},
                      sync_bn=False)
    first = _config(tmp, "first", epochs=2, model=dict(TINY),
                    optim={"base_lr": 0.05, "weight_decay": 5e-3, "fdr_every": 2})
    second = _config(tmp, "second", project_name="second", epochs=2,
                     model={**TINY, "is_pretrained": True, "pretrained_path": "unused"},
                     optim={"base_lr": 0.05, "weight_decay": 1e-3, "loss_type": "CB", "norm_type": "maxnorm",
                            "norm_param": 1.0, "fdr_every": 0})
    odd = _config(tmp, "odd")
    crash = _crash(tmp, first)

    def stages(name: str) -> list:
        root = tmp / name
        stage1 = root / STAGE1
        return [{"cli": "first", "argv": ["--json_path", first, "--exp_root", str(root), "--no_figures"],
                 "out": str(tmp / f"{name}.first")},
                {"cli": "second", "argv": ["--json_path", second, "--exp_root", str(root), "--retrain",
                                           "--model_pretrained_path", str(stage1), "--no_figures"],
                 "out": str(tmp / f"{name}.second")}]
    one, two, nosync, forced = (str(tmp / f) for f in ("one.pt", "two.pt", "nosync.pt", "forced.pt"))
    _ok(_torchrun([WORKER, _plan(tmp, "one", [{"steps": 6, "config": steps, "out": one}, *stages("one"),
                                              {"force": True}, {"steps": 6, "config": steps, "out": forced}])],
                  nproc=1))
    _ok(_torchrun([WORKER, _plan(tmp, "two", [
        {"cli": "first", "argv": ["--json_path", odd, "--exp_root", str(tmp / "odd"), "--data_batch_size", "63"],
         "out": str(tmp / "odd")},
        {"steps": 6, "config": steps, "out": two}, {"steps": 6, "config": control, "out": nosync},
        *stages("two"),
        {"cli": "first", "argv": ["--json_path", first, "--exp_root", str(crash["root"]), "--resume", "--no_figures"],
         "out": str(tmp / "resumed")}])]))
    out = {"tmp": tmp, "first": first, "crash": crash,
           "workers": tuple(torch.load(p, weights_only=True) for p in (one, two, nosync, forced)),
           "odd": _cli_result(str(tmp / "odd"), 2), "resumed": _cli_result(str(tmp / "resumed"), 2)}
    for name, world in (("one", 1), ("two", 2)):
        root = tmp / name
        first_run, second_run = (_ok_run(_cli_result(str(tmp / f"{name}.{stage}"), world))
                                 for stage in ("first", "second"))
        out[name] = {"first": root / STAGE1 / "0", "second": root / STAGE2 / "0",
                     "stdout": first_run.stdout + second_run.stdout}
    return out


@pytest.fixture(scope="module")
def worker_runs(launches):
    """tests/dist_worker.py's steps (evaluate, then 6 training steps) with one process, with two,
    with two without synchronised BatchNorm (the control), and with one forced through the
    distributed code."""
    return launches["workers"]


@pytest.fixture(scope="module")
def runs(launches):
    """Stage 1 (2 epochs) and stage 2 (CB + MaxNorm retraining, 2 epochs) with one process and
    with torchrun --nproc_per_node=2."""
    return launches


@pytest.mark.slow
def test_training_steps_match_one_process_with_the_same_global_batch(worker_runs):
    # Digits-LT at imb_factor 0.05 has 341 training images: 5 batches of 64 and one of 21,
    # which the two ranks split 11 / 10 (the uneven path).
    a, b, c, _ = worker_runs
    assert int(a["world_size"]) == 1 and int(b["world_size"]) == 2
    assert a["step_loss"].shape == (6,) and torch.isfinite(a["step_loss"]).all()
    torch.testing.assert_close(b["step_loss"], a["step_loss"], rtol=LOSS_RTOL, atol=0)
    assert torch.equal(b["correct"], a["correct"])  # the same images, the same predictions
    assert _update_distance(a["weights"], b["weights"], a["initial"]) < WEIGHT_TOL
    for key in a["weights"]:  # running statistics too (global-batch BatchNorm)
        torch.testing.assert_close(b["weights"][key], a["weights"][key], rtol=1e-4, atol=1e-5)
    # the control: per-rank BatchNorm statistics are a different computation, and the tolerances see it
    assert (c["step_loss"][1:] - a["step_loss"][1:]).abs().max() / a["step_loss"].abs().max() > 10 * LOSS_RTOL
    assert _update_distance(a["weights"], c["weights"], a["initial"]) > 10 * WEIGHT_TOL


@pytest.mark.slow
def test_forced_one_process_launch_runs_the_distributed_code_with_the_plain_numbers(worker_runs):
    """WB_FORCE_DISTRIBUTED=1 in a torchrun --nproc_per_node=1 launch: DDP, global-batch BatchNorm,
    the gathers and sharded evaluation run, and give the plain run's numbers."""
    plain, forced = worker_runs[0], worker_runs[3]
    assert int(forced["world_size"]) == 1 and bool(forced["ddp_forward"]) and int(forced["global_batch_bn"]) > 0
    assert not bool(plain["ddp_forward"]) and int(plain["global_batch_bn"]) == 0
    torch.testing.assert_close(forced["step_loss"], plain["step_loss"], rtol=LOSS_RTOL, atol=0)
    assert torch.equal(forced["correct"], plain["correct"])
    assert _update_distance(plain["weights"], forced["weights"], plain["initial"]) < WEIGHT_TOL
    assert torch.equal(forced["eval"]["counts"], plain["eval"]["counts"])


@pytest.mark.slow
def test_global_batchnorm_and_evaluation_with_a_rank_that_gets_nothing(tmp_path):
    """Three processes: a BatchNorm batch of 2 rows (1 + 1 + 0) and a test split of 2 images
    (the third rank's shard is empty), with both BatchNorm implementations (tests/shard_worker.py)."""
    out = tmp_path / "shard.pt"
    _launch([str(ROOT / "tests" / "shard_worker.py"), str(out)], nproc=3)
    r = torch.load(out, weights_only=True)
    assert int(r["world_size"]) == 3
    for case in ("bn2d", "bn2d_7", "bn1d", "one_param"):
        reference = r[case]["reference"]
        for path in ("composed", "fused"):
            for key, want in reference.items():
                torch.testing.assert_close(r[case][path][key], want, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{case} {path} {key}: {m}")
    e, ref = r["eval"], r["eval_reference"]
    assert int(e["counts"].sum()) == 2 and torch.equal(e["preds"], ref["preds"])
    for got, want in ((e["features"], ref["plain"]), (e["plain"], ref["plain"]), (e["flipped"], ref["flipped"])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_distributed_evaluation_counts_every_test_image_once(worker_runs):
    # the Digits-LT test split has 597 images: 299 + 298 on two ranks
    a, b = worker_runs[0]["eval"], worker_runs[1]["eval"]
    assert int(a["n"]) == 597 and 597 % 2 == 1
    assert int(b["counts"].sum()) == 597  # no image dropped, none counted twice (no padding)
    assert torch.equal(b["counts"], a["counts"]) and torch.equal(b["preds"], a["preds"])
    for key in ("features", "plain", "flipped"):  # gathered in dataset order
        assert b[key].shape == a[key].shape
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _ok_run(result):
    _ok(result)
    return result


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return [{k: float(v) for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def _assert_same_results(a: Path, b: Path) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert [list(r) for r in ma] == [list(r) for r in mb] and len(ma) > 0
    for ra, rb in zip(ma, mb):
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key
    acc_a = json.loads((a / "acc.json").read_text())
    assert json.loads((b / "acc.json").read_text()) == pytest.approx(acc_a, abs=1e-9)
    np.testing.assert_array_equal(np.load(b / "confMat.npy"), np.load(a / "confMat.npy"))
    wa = torch.load(a / "best.paramOnly", weights_only=True)
    wb = torch.load(b / "best.paramOnly", weights_only=True)
    assert list(wa) == list(wb)  # checkpoints are interchangeable between launches
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_both_stages_under_torchrun_give_the_single_process_results(runs):
    for stage in ("first", "second"):
        _assert_same_results(runs["one"][stage], runs["two"][stage])
    ta = torch.load(runs["one"]["first"] / "trackRecords.ckpt", weights_only=True)
    tb = torch.load(runs["two"]["first"] / "trackRecords.ckpt", weights_only=True)
    assert ta["step_loss"].shape == (2, 6)  # 2 epochs x 6 steps, every step's loss
    torch.testing.assert_close(tb["step_loss"], ta["step_loss"], rtol=LOSS_RTOL, atol=0)
    assert torch.equal(tb["correct"], ta["correct"])


@pytest.mark.slow
def test_only_rank_zero_writes_and_speaks(runs):
    for stage in ("first", "second"):
        one, two = runs["one"][stage], runs["two"][stage]
        names = lambda run: sorted(p.relative_to(run).as_posix() for p in run.rglob("*")  # noqa: E731
                                   if not p.name.startswith("events.out"))
        assert names(two) == names(one)  # the same files, no per-rank copies
        assert len(list(two.glob("events.out*"))) == len(list(one.glob("events.out*")))
        log = (two / "train.log").read_text().splitlines()
        assert sum(line.startswith("epoch 1/") for line in log) == 1
        assert any(line.startswith("distributed: 2 processes (gloo") for line in log)
    assert runs["two"]["stdout"].count("run directory:") == 2  # one per stage, from rank 0 only


@pytest.mark.slow
def test_resume_under_torchrun_after_a_crash(runs):
    """Every process of a torchrun launch is killed (SIGKILL) once epoch 1's checkpoint exists;
    ``--resume`` under torchrun then finishes with the results of the uninterrupted launch."""
    crash = runs["crash"]
    assert crash["alive_at_kill"], "the launch ended before it could be killed: " + crash["ended"]
    assert not crash["acc_after_kill"]
    resumed = runs["resumed"]
    _ok(resumed)
    assert "resuming" in resumed.stdout and resumed.stdout.count("resuming") == 1
    _assert_same_results(runs["two"]["first"], crash["run"])


@pytest.mark.slow
def test_global_batch_that_does_not_divide_is_refused_once(runs):
    result = runs["odd"]
    assert result.returncode != 0
    message = "error: data.batch_size = 63 is the global batch and must divide by the 2 processes"
    assert result.stderr.count(message) == 1, result.stderr[-2000:]  # rank 0 says it, once
    assert not (runs["tmp"] / "odd").exists()
