"""One command that proves the CUDA path: every CUDA-only code path once, one summary table.

    PYTHONUNBUFFERED=1 python bench/gpu_check.py --out $OUT     # a CUDA machine: < 8 min on one H100/H200
    python bench/gpu_check.py --device cpu --quick               # tiny sizes, in CI (< 60 s on 2 cores)

Needs no network and no real CIFAR: the first rows write synthetic CIFAR-100 in the
official pickle format (cifar-100-python/train, test, meta; class-coloured blocks plus
noise, so training learns something) under a temporary data root, and the real loader
reads it.  Each row below runs in its own try/except under its own time limit, so a
failing row never stops the others; the table at the end has one row per check
(PASS / FAIL / SKIP, with a figure or the reason).  Exit status 0 only when no row
FAILs.  ``--out`` (default: a new temporary folder) receives summary.md (the table),
gpu_check.log (every run's output and each failure's traceback) and figures.json;
the runs and the data live in ``--work`` (a temporary folder, removed at the end
unless ``--keep-work``).

``--quick`` shrinks every row (30 images per class, exp imbalance 0.1, a BNMLP or a
BNLeNet5 instead of the ResNets, an epoch or two, one CPU thread) so the script cannot
rot: torchrun then forces a gloo group instead of NCCL, and the rows that need CUDA
(host syncs, resume on another device, compile) report SKIP with the reason, as the
speed targets do beside the CPU figure.

GPU budget: expected seconds of each row on one H200, eager ResNet34 at batch 64 on
CIFAR-100-LT size (10,457 training images, 164 steps an epoch) unless said otherwise.
The rows that always run sum to 270 s; compile is the most uncertain figure
(40-150 s per mode), so the compile rows come last and report SKIP when less of
``--budget-s`` (default 420) is left than they are expected to need.

    row                                      s   what takes the time
    environment                              2   CUDA initialisation
    synthetic CIFAR-100 pickles              5   50,000 + 10,000 images, 184 MB written and read back
    stage 1: first.py, 3 epochs             30   3 x (train ~1.5 s + validation + checkpoint), final
                                                 evaluation, FDR, figures (~8 s of matplotlib)
    stage 2: second.py --retrain, 2 epochs  20   classifier retraining; the backbone still runs forward
    stage 2: logit adjustment + tau sweep   15   0 epochs; features once, 11 taus re-classify them
    bf16 vs fp32 losses                     15   2 x (load + 20 steps)
    channels_last vs contiguous              8   1 x (load + 20 steps); the fp32 reference is reused
    host syncs per step                     10   load + 3 short epochs under set_sync_debug_mode
    throughput A vs B                       45   A: warm-up, 164 timed steps, eval, one real epoch;
                                                 B: the same with 4 PIL workers
    SIGKILL mid-epoch, --resume             50   deterministic 3-epoch runs: the reference and the
                                                 killed child side by side, then the resume
    resume with another memory format       10   BNLeNet5, 2 epochs
    resume on another device                20   BNLeNet5: CUDA -> CPU and CPU -> CUDA
    torchrun, 1 process, NCCL vs plain      40   2 epochs each, side by side; torchrun start-up
    compile default vs eager                90   (40-150) train-mode graph, two batch shapes
    compile reduce-overhead vs eager        90   (40-150) CUDA graphs; usually SKIPped by the budget
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Deterministic cuBLAS needs this before its first use in the process; the in-process
# --deterministic runs (the SIGKILL row) come after other rows have used cuBLAS.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.staged_run import stop_at  # noqa: E402

FIRST_JSON = ROOT / "jsons/Cifar100/first.json"           # stage 1: WD + FR + ETF
RETRAIN_JSON = ROOT / "jsons/Cifar100/wb_second.json"     # stage 2: CB + WD + MaxNorm
LA_JSON = ROOT / "jsons/Cifar100/second.json"             # stage 2: multiplicative logit adjustment

# Loss agreement: the largest relative difference |a - b| / |b| of the per-step losses.
# bf16 keeps 8 significant bits: a rounding is off by up to 2^-8 = 0.4% relatively.
# Measured on the CPU: 0.011 on losses near 4.8 (0.23%) for a ResNet18 under bf16
# autocast (tests/test_fastpath.py).  2% is five roundings' worth, 9x that measurement;
# a real defect moves the loss far more (a 10x learning rate moves the second step by 4
# there; a wrong layout or a missing term changes the first loss outright).
BF16_RTOL = 0.02
# TF32 ("fp32" convolutions and matmuls on compute capability >= 8 unless fp32-strict)
# keeps 11 bits: 2^-11 a rounding, the same five roundings' margin, doubled for cuDNN
# choosing other algorithms.
TF32_RTOL = 5e-3
# Plain float32 only reorders sums (1.2e-7 a rounding); after a few SGD steps ReLU
# kinks amplify that (test_fastpath.py: 2e-5 at the fourth step).  1e-3 leaves 50x for
# ResNet34, twenty steps and cuDNN's algorithm choice.
FP32_RTOL = 1e-3
# torchrun with one process against a plain run, both --deterministic in (strict) fp32:
# before the first update only the BatchNorm statistics' kernels differ (float32
# rounding), so the first step's loss agrees to 1e-4.  Over hundreds of steps those
# roundings move the two trajectories apart through ReLU kinks (tests/test_distributed.py),
# and only the per-epoch mean losses stay close: within 2%, the bf16 margin.
DIST_STEP1_RTOL = 1e-4
DIST_EPOCH_RTOL = 2e-2
# The targets for ResNet34 at batch 64 on CIFAR-100-LT, on one H100/H200.
TARGET_TRAIN_IPS = 15_000
TARGET_STAGE1_S = 180.0  # 320 epochs with per-epoch validation
TARGET_A_OVER_B = 4.0    # epoch time, B over A
# Every row ends by --budget-s + this: 420 + 120 s leaves a 600 s device call a minute for
# the start-up and the output.
HARD_STOP_AFTER_BUDGET_S = 120.0


# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    train_per_class: int            # in the synthetic "official" training file
    test_per_class: int
    imb_factor: float               # exp profile
    model_flags: tuple              # stage rows (first.json's ResNet34 unless overridden)
    stage1_epochs: int
    stage2_epochs: int
    tau_sweep: str
    numerics_flags: tuple           # the loss-agreement rows
    numerics_steps: int
    kill_step: int                  # the SIGKILL lands at this step of epoch 2 (of 3)
    small_flags: tuple              # the memory-format and cross-device resume rows
    bench_argv: tuple               # bench/throughput.py
    sync_steps: tuple               # (k1, k2): syncs per step = (count(k2) - count(k1)) / (k2 - k1)
    # torch CPU threads of the runs (0 = the cores).  --quick: 1, as its tensors are tiny and
    # on a shared 2-core machine a second thread waiting for a busy core made every
    # operation 5x slower (the tau-sweep row: 10 s with 2 threads, 1.9 s with 1, load 4).
    threads: int = 0


FULL = Sizes(train_per_class=500, test_per_class=100, imb_factor=0.01, model_flags=(),
             stage1_epochs=3, stage2_epochs=2, tau_sweep="0:2:11", numerics_flags=(), numerics_steps=20,
             kill_step=80, small_flags=("--model_name", "BNLeNet5", "--model_use_etf", "false"),
             bench_argv=("--model", "ResNet34", "--rounds", "1"), sync_steps=(5, 25))
QUICK = Sizes(train_per_class=30, test_per_class=10, imb_factor=0.1,
              model_flags=("--model_name", "BNMLP", "--model_mlp_features_d", "128"),
              stage1_epochs=2, stage2_epochs=1, tau_sweep="0:1:3",
              numerics_flags=("--model_name", "BNLeNet5", "--model_use_etf", "false"), numerics_steps=3,
              kill_step=3, small_flags=("--model_name", "BNLeNet5", "--model_use_etf", "false"),
              bench_argv=("--model", "BNMLP", "--batch-size", "8", "--steps", "2", "--warmup", "1",
                          "--rounds", "1", "--eval-images", "16", "--workers", "1", "--threads", "1"),
              sync_steps=(2, 4), threads=1)


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------

class Skip(Exception):
    """The row cannot run here (the reason is its figure)."""


class Fail(Exception):
    """The row ran and its check failed (the message is its figure)."""


class RowTimeout(BaseException):
    """The row ran past its own time limit (a BaseException, so the runs' handlers let it pass)."""


@dataclass
class Row:
    name: str
    status: str        # PASS | FAIL | SKIP
    figure: str
    seconds: float = 0.0


@dataclass
class RowSpec:
    name: str
    check: Callable[["Context"], str]   # returns the figure of a PASS; raises Skip or Fail
    expected_s: float                   # on one H200 (the budget in the module docstring)
    optional: bool = False              # SKIPped when less budget is left than expected_s
    cuda_only: str = ""                 # why the row needs CUDA (SKIPped elsewhere)

    def limit_s(self, quick: bool) -> float:
        return 60.0 if quick else max(60.0, 3 * self.expected_s)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise RowTimeout in the main thread after ``seconds`` (SIGALRM; none where it is missing)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise RowTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------
# The context the rows share
# ---------------------------------------------------------------------------

@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    quick: bool
    work: Path
    log_path: Path
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    figures: dict = field(default_factory=dict)     # figures.json
    shared: dict = field(default_factory=dict)      # what a row leaves for later rows
    children: list = field(default_factory=list)    # processes the current row started
    row_deadline: float = 0.0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def data_root(self) -> Path:
        return self.work / "data"

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def log(self, text: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(text.rstrip("\n") + "\n")

    @contextlib.contextmanager
    def captured(self):
        """stdout and stderr of in-process work go to the log, not the terminal."""
        with open(self.log_path, "a", encoding="utf-8", buffering=1) as fh, \
                contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            yield

    # --- runs -------------------------------------------------------------

    def device_flags(self) -> list[str]:
        return ["--device", str(self.device)]

    def stage_argv(self, json_path: Path, exp_root: Path, *flags: str) -> list[str]:
        return ["--json_path", str(json_path), "--exp_root", str(exp_root), "--data_root", str(self.data_root),
                "--data_imb_factor", str(self.sizes.imb_factor), "--seeds", "0", "--num_threads",
                str(self.sizes.threads), *self.device_flags(), *flags]

    def run_stage(self, stage: str, argv: list[str], figures: bool = False) -> int:
        """first.py / second.py in this process (no start-up cost); its output goes to the log."""
        from utils.cli import main
        self.log(f"$ {stage}.py {' '.join(argv)}")
        try:
            return main(stage, argv + ([] if figures else ["--no_figures"]))
        except SystemExit as exc:  # argparse
            return int(exc.code or 0)

    def start(self, cmd: list[str], name: str, env: Optional[dict] = None) -> subprocess.Popen:
        """A child process in its own session (so a timeout ends it and its children), output to a log."""
        log = open(self.work / f"{name.replace(' ', '_')}.log", "w+", encoding="utf-8")
        if self.sizes.threads:
            env = {"OMP_NUM_THREADS": str(self.sizes.threads), **(env or {})}
        self.log(f"$ {' '.join(cmd)}  (output below, when it ends)")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        proc.log_file, proc.name = log, name
        self.children.append(proc)
        return proc

    def wait(self, proc: subprocess.Popen) -> int:
        """Its exit status (negative: the signal); its output is appended to the log."""
        try:
            proc.wait(timeout=max(1.0, self.row_deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.end(proc)
            raise Fail(f"{proc.name} did not finish within the row's time limit") from None
        finally:
            proc.log_file.seek(0)
            self.log(f"--- output of {proc.name} (exit status {proc.returncode}) ---\n{proc.log_file.read()}")
            proc.log_file.close()
        return proc.returncode

    def end(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its session: torchrun's workers too
            proc.wait()

    def end_children(self) -> None:
        for proc in self.children:
            self.end(proc)
            with contextlib.suppress(Exception):
                proc.log_file.close()
        self.children = []


def run_row(ctx: Context, spec: RowSpec) -> Row:
    if spec.cuda_only and not ctx.cuda:
        return Row(spec.name, "SKIP", f"needs CUDA: {spec.cuda_only}")
    left = ctx.budget_s - ctx.elapsed()
    if spec.optional and left < spec.expected_s:
        return Row(spec.name, "SKIP", f"budget: {left:.0f} s of --budget-s {ctx.budget_s:.0f} left, "
                                      f"the row needs ~{spec.expected_s:.0f} s")
    # past the budget, rows still run but all end by the hard stop (so a 10-minute device call
    # keeps its summary), after which the rest SKIP
    hard_left = ctx.budget_s + HARD_STOP_AFTER_BUDGET_S - ctx.elapsed()
    if hard_left < 5:
        return Row(spec.name, "SKIP", f"out of time: {ctx.elapsed():.0f} s, past --budget-s "
                                      f"{ctx.budget_s:.0f} + {HARD_STOP_AFTER_BUDGET_S:.0f} s")
    limit = min(spec.limit_s(ctx.quick), hard_left)
    ctx.log(f"\n===== {spec.name} (limit {limit:.0f} s) =====")
    t0 = time.monotonic()
    ctx.row_deadline = t0 + limit
    try:
        with time_limit(limit), ctx.captured():
            row = Row(spec.name, "PASS", spec.check(ctx))
    except Skip as exc:
        row = Row(spec.name, "SKIP", one_line(exc))
    except Fail as exc:
        row = Row(spec.name, "FAIL", one_line(exc))
    except RowTimeout:
        row = Row(spec.name, "FAIL", f"ran past its time limit of {limit:g} s")
    except Exception as exc:  # noqa: BLE001 - any error is this row's failure, not the script's
        row = Row(spec.name, "FAIL", one_line(f"{type(exc).__name__}: {exc}"))
        ctx.log(traceback.format_exc())
    finally:
        ctx.end_children()
        if ctx.cuda:
            with contextlib.suppress(Exception):
                torch.cuda.set_sync_debug_mode("default")
    row.seconds = time.monotonic() - t0
    ctx.log(f"===== {row.status}: {row.figure} ({row.seconds:.1f} s)")
    return row


# ---------------------------------------------------------------------------
# Shared helpers of the rows
# ---------------------------------------------------------------------------

def read_acc(run: Path) -> dict:
    """acc.json of a finished run, checked: every value a number in [0, 1]."""
    path = run / "acc.json"
    if not path.is_file():
        raise Fail(f"{path} was not written")
    acc = json.loads(path.read_text())
    bad = {k: v for k, v in acc.items() if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0)}
    if bad:
        raise Fail(f"{path}: values outside [0, 1]: {bad}")
    return acc


def run_dir(exp_root: Path, stage: str) -> Path:
    """The one seed-0 run directory under ``exp_root`` (exp/<data>/<model>/<stage>/<exp_name>/0)."""
    found = sorted(exp_root.glob(f"*/*/{stage}/*/0"))
    if len(found) != 1:
        raise Fail(f"expected one {stage} run under {exp_root}, found {len(found)}")
    return found[0]


def expect_rc(rc: int, wanted: int, what: str, run: Optional[Path] = None) -> None:
    if rc != wanted:
        where = f"; see train.log in {run}" if run else "; see gpu_check.log"
        raise Fail(f"{what} exited with {rc}, expected {wanted}{where}")


def metrics_rows(run: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO((run / "metrics.csv").read_text())))


def strict_fp32() -> str:
    """The precision that turns TF32 off where this checkout has it (else plain fp32)."""
    from utils.engine.accel import PRECISIONS
    return "fp32-strict" if "fp32-strict" in PRECISIONS else "fp32"


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.shape != b.shape or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


def step_losses(ctx: Context, flags: list[str], steps: int) -> tuple[torch.Tensor, float]:
    """(per-step losses, seconds) of the first ``steps`` steps of stage 1, built as a run builds
    it (prepare, make_train_state) from the seed-0 weights and generators: two calls with
    different speed settings train the same weights on the same augmented batches."""
    from utils.run.determinism import apply_determinism
    from utils.cli import build_parser
    from utils.config import overrides_from_flags, resolve
    from utils.data.batches import make_splits
    from utils.run.prepare import make_train_state, prepare
    from utils.engine.train import cosine_lr, train_one_epoch
    argv = ctx.stage_argv(FIRST_JSON, ctx.work / "unused", *ctx.sizes.numerics_flags, *flags)
    cfg = resolve("first", str(FIRST_JSON), overrides_from_flags(build_parser("first").parse_args(argv)))
    apply_determinism(False)
    p = prepare(cfg, "first")
    train, _, _, augment = make_splits(p.data, p.device, cfg.data.num_workers)
    state = make_train_state(p, augment)
    for group in state.optimizer.param_groups:  # as fit() sets epoch 1
        group["lr"] = cosine_lr(cfg.optim.base_lr, 1, cfg.optim.total_epoch_num)
    state.objective.set_epoch(1)
    t0 = time.perf_counter()
    out = train_one_epoch(p.model, train, state, 1, cfg.optim.total_epoch_num, show_progress=False,
                          max_steps=steps)
    seconds = time.perf_counter() - t0
    losses = out["step_loss"][:steps]
    ctx.log(f"{' '.join(flags) or 'defaults'}: {p.fast.describe()}; losses {losses.tolist()}")
    return losses, seconds


def compare_losses(name: str, losses: torch.Tensor, reference: torch.Tensor, rtol: float) -> str:
    diff = relative_difference(losses, reference)
    figure = (f"max rel. diff {diff:.2e} over {reference.numel()} steps (tol {rtol:g}); "
              f"last loss {float(losses[-1]):.4f} vs {float(reference[-1]):.4f}")
    if not diff <= rtol:
        raise Fail(f"{name}: {figure}")
    return figure


def fp32_reference(ctx: Context) -> tuple[torch.Tensor, float]:
    """Losses in (strict) fp32, contiguous, eager: the reference of the agreement rows."""
    if "fp32_losses" not in ctx.shared:
        ctx.shared["fp32_losses"] = step_losses(ctx, ["--precision", strict_fp32(), "--memory_format", "contiguous"],
                                                ctx.sizes.numerics_steps)[0]
    return ctx.shared["fp32_losses"], fp32_rtol(ctx)


def fp32_rtol(ctx: Context) -> float:
    tf32 = (ctx.cuda and strict_fp32() == "fp32" and torch.cuda.get_device_capability(ctx.device) >= (8, 0)
            and torch.backends.cudnn.allow_tf32)
    return TF32_RTOL if tf32 else FP32_RTOL


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------

def check_environment(ctx: Context) -> str:
    from utils.engine.accel import resolve_channels_last, resolve_eval_batch_size, resolve_precision, sgd_kwargs
    from utils.run.determinism import apply_determinism
    d = ctx.device
    apply_determinism(False)
    auto = {"precision": {None: "fp32", torch.bfloat16: "bf16"}.get(resolve_precision("auto", d), "?"),
            "memory_format": "channels_last" if resolve_channels_last("auto", d) else "contiguous",
            "sgd": next(iter(sgd_kwargs("auto", d)), "default"),
            "eval_batch_size": resolve_eval_batch_size(0, d)}
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": str(d), "cpu_cores": os.cpu_count(), "auto": auto,
           "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(d)
        env.update(gpu=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(d))),
                   gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    ctx.figures["environment"] = env
    where = f"{env['gpu']} (cc {env['capability']})" if ctx.cuda else f"CPU, {env['cpu_cores']} cores"
    return (f"{where}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; auto = {auto['precision']}, "
            f"{auto['memory_format']}, {auto['sgd']} SGD, eval batch {auto['eval_batch_size']}; "
            f"cudnn.benchmark {env['cudnn_benchmark']}")


def write_synthetic_cifar100(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """cifar-100-python/{train,test,meta} as the official pickles hold them: uint8 N x 3072
    rows (channel-major 32 x 32), b"fine_labels", b"fine_label_names".  Each class has a
    colour pattern of 4 x 4 blocks; images are that pattern plus uniform noise."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, (100, 3, 4, 4), dtype=np.int16).repeat(8, axis=2).repeat(8, axis=3)

    def images(labels: np.ndarray) -> np.ndarray:
        noisy = patterns[labels] + rng.integers(-80, 81, (len(labels), 3, 32, 32), dtype=np.int16)
        return np.clip(noisy, 0, 255).astype(np.uint8).reshape(len(labels), 3072)

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(100), per_class))
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": images(labels), b"fine_labels": labels.tolist()}, fh, protocol=4)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"class{i:02d}".encode() for i in range(100)]}, fh)
    return folder


def check_synthetic_data(ctx: Context) -> str:
    from utils.data.datasets import VAL_PER_CLASS, load_dataset, long_tailed_counts
    s = ctx.sizes
    folder = write_synthetic_cifar100(ctx.data_root, s.train_per_class, s.test_per_class)
    data = load_dataset("Cifar100", ctx.data_root, "exp", s.imb_factor, 100, download=False)
    expected = long_tailed_counts(s.train_per_class - VAL_PER_CLASS, 100, "exp", s.imb_factor)
    if data.class_counts != expected:
        raise Fail(f"the loader's class counts {data.class_counts[:3]}... differ from {expected[:3]}...")
    mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    ctx.shared["data_ok"] = True
    return (f"{len(data.train_labels):,} train / {len(data.val_labels):,} val / {len(data.test_labels):,} test "
            f"images (exp {s.imb_factor}, head {expected[0]}, tail {expected[-1]}), {mb:.0f} MB in {folder.name}/")


def _needs_data(ctx: Context) -> None:
    if not ctx.shared.get("data_ok"):
        raise Skip("no synthetic data (its row failed)")


def check_stage1(ctx: Context) -> str:
    _needs_data(ctx)
    exp = ctx.work / "exp"
    t0 = time.perf_counter()
    rc = ctx.run_stage("first", ctx.stage_argv(FIRST_JSON, exp, "--optim_total_epoch_num",
                                               str(ctx.sizes.stage1_epochs), *ctx.sizes.model_flags),
                       figures=not ctx.quick)  # --quick: tests/test_plots.py draws them on the CPU
    seconds = time.perf_counter() - t0
    expect_rc(rc, 0, "first.py")
    run = run_dir(exp, "first")
    acc = read_acc(run)
    if not ctx.quick and not (run / "imgs").is_dir():
        raise Fail(f"{run}/imgs/ (the figures) was not written")
    epochs = [float(r["seconds"]) for r in metrics_rows(run)]
    ctx.shared["stage1"] = run.parent  # model.pretrained_path of stage 2 (the seed is appended)
    ctx.figures["stage1"] = {"acc": acc, "epoch_s": epochs, "seconds": seconds}
    return (f"{len(epochs)} epochs ({', '.join(f'{e:.1f}' for e in epochs)} s), test All {acc['All']:.4f}; "
            f"{seconds:.0f} s in all")


def _stage2(ctx: Context, json_path: Path, name: str, *flags: str) -> tuple[Path, dict, float]:
    stage1 = ctx.shared.get("stage1")
    if stage1 is None:
        raise Skip("no stage-1 run (its row failed)")
    exp = ctx.work / name
    t0 = time.perf_counter()
    rc = ctx.run_stage("second", ctx.stage_argv(json_path, exp, "--model_pretrained_path", str(stage1),
                                                *ctx.sizes.model_flags, *flags))
    seconds = time.perf_counter() - t0
    expect_rc(rc, 0, "second.py")
    run = run_dir(exp, "second")
    return run, read_acc(run), seconds


def check_stage2_retrain(ctx: Context) -> str:
    run, acc, seconds = _stage2(ctx, RETRAIN_JSON, "exp_retrain", "--retrain", "--optim_total_epoch_num",
                                str(ctx.sizes.stage2_epochs))
    epochs = len(metrics_rows(run))
    ctx.figures["stage2_retrain"] = {"acc": acc, "seconds": seconds}
    return f"{epochs} epoch(s) of CB + WD + MaxNorm, test All {acc['All']:.4f}; {seconds:.0f} s"


def check_stage2_tau_sweep(ctx: Context) -> str:
    run, acc, seconds = _stage2(ctx, LA_JSON, "exp_la", "--model_logit_adjustment_tau_sweep", ctx.sizes.tau_sweep)
    sweep = run / "tau_sweep.json"
    if not sweep.is_file():
        raise Fail(f"{sweep} was not written")
    chosen = json.loads(sweep.read_text())
    ctx.figures["stage2_tau_sweep"] = {"acc": acc, "sweep": chosen, "seconds": seconds}
    tau = chosen.get("best_tau", chosen.get("tau", "?"))
    return f"taus {ctx.sizes.tau_sweep}: best {tau}, test All {acc['All']:.4f}; {seconds:.0f} s"


def check_bf16(ctx: Context) -> str:
    _needs_data(ctx)
    reference, _ = fp32_reference(ctx)
    bf16, _ = step_losses(ctx, ["--precision", "bf16", "--memory_format", "contiguous"], ctx.sizes.numerics_steps)
    ctx.figures["bf16_vs_fp32"] = {"bf16": bf16.tolist(), "fp32": reference.tolist(), "rtol": BF16_RTOL}
    return f"bf16 vs {strict_fp32()}: " + compare_losses("bf16 vs fp32", bf16, reference, BF16_RTOL)


def check_channels_last(ctx: Context) -> str:
    _needs_data(ctx)
    reference, rtol = fp32_reference(ctx)
    losses, _ = step_losses(ctx, ["--precision", strict_fp32(), "--memory_format", "channels_last"],
                            ctx.sizes.numerics_steps)
    ctx.figures["channels_last"] = {"channels_last": losses.tolist(), "contiguous": reference.tolist(), "rtol": rtol}
    return f"{strict_fp32()}: " + compare_losses("channels_last vs contiguous", losses, reference, rtol)


def _check_compile(ctx: Context, mode: str) -> str:
    import torch._dynamo
    _needs_data(ctx)
    torch._dynamo.reset()  # no graph of an earlier row is reused
    steps = max(8, ctx.sizes.numerics_steps // 2)
    eager, eager_s = step_losses(ctx, [], steps)
    try:
        compiled, compiled_s = step_losses(ctx, ["--compile", mode], steps)
    finally:
        torch._dynamo.reset()
    from utils.engine.accel import resolve_precision
    rtol = BF16_RTOL if resolve_precision("auto", ctx.device) is not None else fp32_rtol(ctx)
    compile_s = compiled_s - eager_s
    ctx.figures[f"compile_{mode}"] = {"compiled": compiled.tolist(), "eager": eager.tolist(), "rtol": rtol,
                                      "compile_s": compile_s}
    return f"compile ~{compile_s:.0f} s; " + compare_losses(f"compile {mode} vs eager", compiled, eager, rtol)


def check_compile_default(ctx: Context) -> str:
    return _check_compile(ctx, "default")


def check_compile_cudagraphs(ctx: Context) -> str:
    return _check_compile(ctx, "reduce-overhead")


def check_host_syncs(ctx: Context) -> str:
    """Synchronising CUDA calls per training step: counted over two short epochs, so the
    per-epoch read-back (the losses, the confusion matrix) cancels out."""
    _needs_data(ctx)
    from utils.run.determinism import apply_determinism
    from utils.cli import build_parser
    from utils.config import overrides_from_flags, resolve
    from utils.data.batches import make_splits
    from utils.run.prepare import make_train_state, prepare
    from utils.engine.train import train_one_epoch
    argv = ctx.stage_argv(FIRST_JSON, ctx.work / "unused")
    cfg = resolve("first", str(FIRST_JSON), overrides_from_flags(build_parser("first").parse_args(argv)))
    apply_determinism(False)
    p = prepare(cfg, "first")
    train, _, _, augment = make_splits(p.data, p.device, cfg.data.num_workers)
    state = make_train_state(p, augment)
    train_one_epoch(p.model, train, state, 1, 2, show_progress=False, max_steps=3)  # warm-up
    torch.cuda.synchronize(ctx.device)

    def count(steps: int) -> tuple[int, list]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_one_epoch(p.model, train, state, 1, 2, show_progress=False, max_steps=steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in seen if "synchroniz" in str(w.message)]
        return len(syncs), syncs

    k1, k2 = ctx.sizes.sync_steps
    (c1, _), (c2, syncs) = count(k1), count(k2)
    per_step = (c2 - c1) / (k2 - k1)
    places: dict = {}
    for w in syncs:
        key = f"{Path(w.filename).name}:{w.lineno}"
        places[key] = places.get(key, 0) + 1
    ctx.log(f"syncs: {c1} in {k1} steps, {c2} in {k2} steps; where (in {k2} steps): {places}")
    ctx.figures["host_syncs"] = {"steps": [k1, k2], "syncs": [c1, c2], "per_step": per_step, "places": places}
    figure = f"{per_step:g} per step ({c1} in an epoch of {k1} steps, {c2} of {k2}: the rest is per epoch)"
    if per_step > 0:
        top = sorted(places.items(), key=lambda kv: -kv[1])[:3]
        raise Fail(f"{figure}; most at {', '.join(f'{k} ({v}x)' for k, v in top)}")
    return figure


def check_throughput(ctx: Context) -> str:
    from bench import throughput
    args = throughput.parse_args(["--device", str(ctx.device), *ctx.sizes.bench_argv])
    throughput.prepare_process(args)
    data = throughput.synthetic_cifar100_lt(args.seed)
    model = args.model.split(",")[0]
    variants, baseline = throughput.compare(args, data, model)
    throughput.print_table(model, variants, baseline, args, args.device, len(data["train"].labels))
    a = throughput.summarise(next(v for v in variants if v is not baseline))
    b = throughput.summarise(baseline)
    ctx.shared["throughput"] = (a, b, throughput.ratios(a, b))
    ctx.figures["throughput"] = {"model": model, "batch_size": args.batch_size, "A": a, "B": b,
                                 "ratios": ctx.shared["throughput"][2],
                                 "timed_steps": throughput.timed_steps(args, len(data["train"].labels))}
    return (f"{model} b{args.batch_size}: A {a['train']:,.0f} / B {b['train']:,.0f} train img/s, "
            f"A {a['eval']:,.0f} / B {b['eval']:,.0f} eval img/s, epoch A {a['epoch']:.2f} s / B {b['epoch']:.2f} s")


def _measured(ctx: Context) -> tuple[dict, dict, dict]:
    """(A, B, A over B) of the throughput row."""
    if "throughput" not in ctx.shared:
        raise Skip("no measurement (the throughput row failed)")
    return ctx.shared["throughput"]


def _against_target(ctx: Context, figure: str, met: bool) -> str:
    if not ctx.cuda:
        raise Skip(f"{figure}; the target is for an H100/H200")
    if not met:
        raise Fail(figure)
    return figure


def check_train_target(ctx: Context) -> str:
    a, _, r = _measured(ctx)
    return _against_target(ctx, f"A {a['train']:,.0f} img/s (target >= {TARGET_TRAIN_IPS:,}), {r['train']:.1f}x B",
                           a["train"] >= TARGET_TRAIN_IPS)


def check_stage1_target(ctx: Context) -> str:
    a, _, _ = _measured(ctx)
    return _against_target(ctx, f"epoch {a['epoch']:.2f} s x 320 = {a['stage1_320']:.0f} s "
                                f"(target <= {TARGET_STAGE1_S:.0f} s)", a["stage1_320"] <= TARGET_STAGE1_S)


def check_ratio_target(ctx: Context) -> str:
    _, _, r = _measured(ctx)
    return _against_target(ctx, f"epoch {r['epoch']:.1f}x faster than B (target >= {TARGET_A_OVER_B:g}x); "
                                f"train {r['train']:.1f}x, eval {r['eval']:.1f}x", r["epoch"] >= TARGET_A_OVER_B)


def check_peak_memory(ctx: Context) -> str:
    a, b, _ = _measured(ctx)
    what = "max_memory_allocated" if ctx.cuda else "peak RSS incl. workers"
    return f"{what}: A {a['peak'] / 2 ** 20:,.0f} MiB, B {b['peak'] / 2 ** 20:,.0f} MiB"


def check_kill_resume(ctx: Context) -> str:
    """A run SIGKILLed mid-epoch 2 and resumed gives the acc.json of an uninterrupted run."""
    _needs_data(ctx)
    base = ["--deterministic", "true", "--checkpoint_every", "1", "--optim_total_epoch_num", "3",
            "--optim_fdr_every", "0", *ctx.sizes.model_flags]
    ref_exp, killed_exp = ctx.work / "kill_ref", ctx.work / "kill_resumed"
    killed = ctx.start([sys.executable, str(ROOT / "bench/staged_run.py"), "--kill-at", f"2:{ctx.sizes.kill_step}",
                        "--no-figures", "first", *ctx.stage_argv(FIRST_JSON, killed_exp, *base)], "killed run")
    expect_rc(ctx.run_stage("first", ctx.stage_argv(FIRST_JSON, ref_exp, *base)), 0, "the uninterrupted run")
    expect_rc(ctx.wait(killed), -signal.SIGKILL, "the killed run")
    from utils.run.checkpoint import read_checkpoint
    run = run_dir(killed_exp, "first")
    if (run / "acc.json").exists():
        raise Fail("the killed run wrote acc.json: it was not killed mid-run")
    saved = int(read_checkpoint(run / "checkpoint.ckpt", mmap=True)["epoch"])
    if saved != 1:
        raise Fail(f"the killed run's checkpoint holds epoch {saved}, expected 1 (killed in epoch 2)")
    expect_rc(ctx.run_stage("first", ctx.stage_argv(FIRST_JSON, killed_exp, *base, "--resume")), 0, "--resume", run)
    ref_run = run_dir(ref_exp, "first")
    ref_acc, resumed = (ref_run / "acc.json").read_bytes(), (run / "acc.json").read_bytes()
    read_acc(run)
    if ref_acc != resumed:
        raise Fail(f"acc.json differs: uninterrupted {ref_acc.decode()[:80]} vs resumed {resumed.decode()[:80]}")
    same_weights = (ref_run / "best.paramOnly").read_bytes() == (run / "best.paramOnly").read_bytes()
    return (f"killed at epoch 2 step {ctx.sizes.kill_step}, resumed from epoch 1: acc.json identical "
            f"(All {json.loads(resumed)['All']:.4f}); best weights {'identical' if same_weights else 'DIFFER'}")


def _interrupted_then_resumed(ctx: Context, name: str, first: list[str], then: list[str]) -> str:
    """Start a 2-epoch run with ``first``, stop it at the start of epoch 2 (Ctrl-C), resume with ``then``."""
    exp = ctx.work / name
    base = ["--checkpoint_every", "1", "--optim_total_epoch_num", "2", "--optim_fdr_every", "0",
            *ctx.sizes.small_flags]

    def interrupt():
        raise KeyboardInterrupt

    with stop_at(2, 1, interrupt):
        rc = ctx.run_stage("first", ctx.stage_argv(FIRST_JSON, exp, *base, *first))
    expect_rc(rc, 130, f"the run with {' '.join(first)} (Ctrl-C in epoch 2)")
    argv = ctx.stage_argv(FIRST_JSON, exp, *base, *then, "--resume")
    expect_rc(ctx.run_stage("first", argv), 0, f"--resume with {' '.join(then)}")
    run = run_dir(exp, "first")
    acc = read_acc(run)
    log = (run / "train.log").read_text()
    if "epoch 2/2" not in log:
        raise Fail(f"{run}/train.log shows no epoch 2 after the resume")
    return f"All {acc['All']:.4f}"


def check_resume_memory_format(ctx: Context) -> str:
    _needs_data(ctx)
    figure = _interrupted_then_resumed(ctx, "resume_layout", ["--memory_format", "channels_last"],
                                       ["--memory_format", "contiguous"])
    return f"BNLeNet5 on {ctx.device}: channels_last -> contiguous after epoch 1, finished: {figure}"


def check_resume_device(ctx: Context) -> str:
    _needs_data(ctx)
    gpu = str(ctx.device)
    there = _interrupted_then_resumed(ctx, "resume_to_cpu", ["--device", gpu], ["--device", "cpu"])
    back = _interrupted_then_resumed(ctx, "resume_to_cuda", ["--device", "cpu"], ["--device", gpu])
    return f"BNLeNet5: {gpu} -> cpu finished ({there}); cpu -> {gpu} finished ({back})"


def check_torchrun(ctx: Context) -> str:
    """torchrun --nproc_per_node=1 with WB_FORCE_DISTRIBUTED=1 (process group, DDP, global-batch
    BatchNorm, gathers) against a plain run of the same config."""
    from utils import distributed
    if "WB_FORCE_DISTRIBUTED" not in Path(distributed.__file__).read_text():
        raise Skip("this checkout's utils/distributed.py does not read WB_FORCE_DISTRIBUTED yet")
    _needs_data(ctx)
    backend = "nccl" if ctx.cuda else "gloo"
    base = ["--deterministic", "true", "--precision", strict_fp32(), "--optim_total_epoch_num", "2",
            "--optim_fdr_every", "0", *ctx.sizes.model_flags]
    dist_exp, plain_exp = ctx.work / "torchrun_dist", ctx.work / "torchrun_plain"
    env = {"WB_FORCE_DISTRIBUTED": "1"}
    if not ctx.cuda:
        env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    child = ctx.start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                       str(ROOT / "bench/staged_run.py"), "--no-figures", "first",
                       *ctx.stage_argv(FIRST_JSON, dist_exp, *base)], "torchrun", env=env)
    expect_rc(ctx.run_stage("first", ctx.stage_argv(FIRST_JSON, plain_exp, *base)), 0, "the plain run")
    expect_rc(ctx.wait(child), 0, "torchrun")
    dist_run, plain_run = run_dir(dist_exp, "first"), run_dir(plain_exp, "first")
    log = (dist_run / "train.log").read_text()
    if "distributed:" not in log or backend not in log:
        raise Fail(f"{dist_run}/train.log does not say the {backend} process group ran ('distributed: ...')")
    losses = [torch.tensor([float(r["train_loss"]) for r in metrics_rows(run)]) for run in (dist_run, plain_run)]
    first = [torch.load(run / "trackRecords.ckpt", weights_only=True)["step_loss"][0, :1]
             for run in (dist_run, plain_run)]
    step1, epochs = relative_difference(*first), relative_difference(*losses)
    figure = (f"{backend}: step-1 loss rel. diff {step1:.1e} (tol {DIST_STEP1_RTOL:g}), per-epoch losses "
              f"{epochs:.1e} (tol {DIST_EPOCH_RTOL:g}) over {losses[1].numel()} epochs")
    ctx.figures["torchrun"] = {"step1_rel": step1, "epoch_rel": epochs, "dist": losses[0].tolist(),
                               "plain": losses[1].tolist()}
    if not (step1 <= DIST_STEP1_RTOL and epochs <= DIST_EPOCH_RTOL):
        raise Fail(figure)
    return figure


_COMPILE_ON_CPU = "torch.compile of a small ResNet takes minutes on 2 CPU cores (README: 134 s for a ResNet18)"

ROWS = [
    RowSpec("environment", check_environment, 2),
    RowSpec("synthetic CIFAR-100 (official pickles)", check_synthetic_data, 5),
    RowSpec("stage 1: first.py WD + FR + ETF", check_stage1, 30),
    RowSpec("stage 2: second.py --retrain CB + WD + MaxNorm", check_stage2_retrain, 20),
    RowSpec("stage 2: second.py LA + tau sweep", check_stage2_tau_sweep, 15),
    RowSpec("bf16 vs fp32 losses (same weights, batches)", check_bf16, 15),
    RowSpec("channels_last vs contiguous losses", check_channels_last, 8),
    RowSpec("host syncs per training step", check_host_syncs, 10,
            cuda_only="torch.cuda.set_sync_debug_mode counts CUDA synchronisations"),
    RowSpec("throughput A vs B (measurement)", check_throughput, 45),
    RowSpec("target: train img/s >= 15,000", check_train_target, 0),
    RowSpec("target: 320-epoch stage 1 <= 3 min", check_stage1_target, 0),
    RowSpec("target: A >= 4x B per epoch", check_ratio_target, 0),
    RowSpec("peak memory A, B", check_peak_memory, 0),
    RowSpec("SIGKILL mid-epoch, --resume: same acc.json", check_kill_resume, 50),
    RowSpec("resume with another memory format", check_resume_memory_format, 10),
    RowSpec("resume on another device", check_resume_device, 20,
            cuda_only="a run started on CUDA is resumed on the CPU, and the reverse"),
    RowSpec("torchrun 1 process (forced DDP) vs plain", check_torchrun, 40),
    RowSpec("compile default vs eager", check_compile_default, 90, optional=True, cuda_only=_COMPILE_ON_CPU),
    RowSpec("compile reduce-overhead vs eager", check_compile_cudagraphs, 90, optional=True,
            cuda_only=_COMPILE_ON_CPU),
]


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def table_lines(rows: list[Row]) -> list[str]:
    width = max(len(r.name) for r in rows)
    lines = [f"{'check':{width}s}  result  {'s':>6s}  figure / reason", "-" * (width + 100)]
    lines += [f"{r.name:{width}s}  {r.status:6s}  {r.seconds:6.1f}  {r.figure}" for r in rows]
    return lines


def summary_markdown(rows: list[Row], ctx: Context, command: str) -> str:
    env = ctx.figures.get("environment", {})
    where = env.get("gpu") or f"CPU ({env.get('cpu_cores')} cores)"
    counts = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    out = [f"# gpu_check: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP",
           "", f"`{command}` on {where}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
               f"{time.strftime('%Y-%m-%d %H:%M')}, {ctx.elapsed():.0f} s in all.", "",
           "| check | result | s | figure / reason |", "|---|---|---|---|"]
    out += [f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.figure.replace('|', '/')} |" for r in rows]
    return "\n".join(out) + "\n"


def write_outputs(out: Path, rows: list[Row], ctx: Context, command: str) -> None:
    """summary.md and figures.json, rewritten after every row: a run cut short keeps what it did."""
    (out / "summary.md").write_text(summary_markdown(rows, ctx, command))
    figures = {**ctx.figures, "rows": [vars(r) for r in rows], "seconds": ctx.elapsed()}
    (out / "figures.json").write_text(json.dumps(figures, indent=1, default=str))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one) | cuda | cuda:N | cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI): a few images per class, tiny epochs")
    p.add_argument("--out", default="", help="summary.md, gpu_check.log, figures.json (default: a new temp folder)")
    p.add_argument("--work", default="", help="data and runs (default: a temp folder, removed at the end)")
    p.add_argument("--keep-work", action="store_true", help="keep --work after the end")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the whole check (default 420; --quick 60); the optional rows "
                        "(compile) are skipped when less is left than they need")
    return p.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device {name}: use auto, cuda, cuda:N or cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu --quick")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.quick:
        print("error: --device cpu needs --quick (the full sizes take hours on a CPU)", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check_out_"))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s if args.budget_s is not None else (60.0 if args.quick else 420.0)
    ctx = Context(device=device, sizes=QUICK if args.quick else FULL, quick=args.quick, work=work,
                  log_path=out / "gpu_check.log", budget_s=budget)
    ctx.log_path.write_text("")
    command = "python bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"gpu_check on {device}{' (quick)' if args.quick else ''}: logs in {ctx.log_path}", flush=True)
    rows = []
    try:
        for spec in ROWS:
            row = run_row(ctx, spec)
            rows.append(row)
            print(f"[{ctx.elapsed():6.1f} s] {row.status:4s} {row.name}: {row.figure}", flush=True)
            write_outputs(out, rows, ctx, command)
    finally:
        if not args.keep_work and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + "\n".join(table_lines(rows)), flush=True)
    failed = sum(r.status == "FAIL" for r in rows)
    print(f"\n{len(rows)} checks, {failed} FAIL, {ctx.elapsed():.0f} s; summary.md, gpu_check.log and figures.json "
          f"in {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
