"""Stage-1 training throughput: this project's pipeline (A) against a naive reference (B).

    python bench/throughput.py --device cpu                 # A vs B, ResNet34, batch 64
    python bench/throughput.py --device cuda --model ResNet34,ResNet18
    python bench/throughput.py --device cpu --ablation      # each optimisation on its own

Data: synthetic CIFAR-format uint8 images of CIFAR-100-LT size (10,457
training images in the exp/0.01 long-tailed profile over 100 classes, 2,000
validation images), the model and objective of jsons/Cifar100/first.json
(ETF classifier, weight decay 5e-3, feature regularisation 1e-2).

A = utils/engine/train.py as the runs use it: the dataset resident on the device as
uint8, batched on-device augmentation, the FastPath (precision, memory
format, compile), the configured SGD implementation, loss and accuracy
accumulated on the device.  B = bench/naive.py (PIL per image in DataLoader
workers, fp32, host syncs every step).  The two alternate A, B, A, B, ...
(``--rounds``) so both see the same background load.

Figures per pipeline: training images/s after ``--warmup`` steps (median over
rounds, min-max in brackets; medians resist a passing load spike), evaluation
images/s, seconds for one full epoch (train pass + validation) and the
projected 320-epoch stage 1 (the epoch x 320, per-epoch validation included),
peak memory (CUDA: max_memory_allocated; CPU: the resident set size of the
process plus its DataLoader workers, sampled every 50 ms), and the ratios A/B.
``--epoch estimate`` (the CPU default, where a real epoch takes minutes)
computes the epoch from the measured rates plus B's measured worker start-up;
``--epoch measure`` (the CUDA default) runs one real epoch of each.

Images/s credit the images actually trained.  The timed steps run in one
fresh epoch and are capped at its batches (164 for CIFAR-100-LT at batch 64:
163 x 64 + 25), since an epoch's loop stops at the epoch's end whatever
``--steps`` asks for.  With ``--compile`` the warm-up also trains on the last,
smaller batch shape, so its recompilation is not timed.  cuDNN's algorithm
search is set by ``apply_determinism(False)``, as a run without
``deterministic`` sets it.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.naive import NaiveTrainer, eval_transform, make_loader, train_transform  # noqa: E402
from utils.engine.accel import (COMPILE_MODES, MEMORY_FORMATS, PRECISIONS, SGD_IMPLS, FastPath, keep_freed_memory,  # noqa: E402
                         make_fast_path, resolve_channels_last, resolve_eval_batch_size, resolve_precision,
                         resolve_threads, sgd_kwargs)
from utils.data.augment import BatchAugment  # noqa: E402
from utils.run.determinism import apply_determinism  # noqa: E402
from utils.config import from_dict, load_json  # noqa: E402
from utils.data.datasets import long_tailed_counts  # noqa: E402
from utils.data.batches import SplitTensors  # noqa: E402
from utils.engine.evaluation import evaluate  # noqa: E402
from utils.engine.objective import make_objective  # noqa: E402
from utils.engine.params import make_optimizer, trained_parameters  # noqa: E402
from utils.run.prepare import make_model  # noqa: E402
from utils.engine.train import TrainState, train_one_epoch  # noqa: E402

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2023, 0.1994, 0.2010)
N_CLASSES, VAL_PER_CLASS = 100, 20
STAGE1_EPOCHS = 320  # jsons/Cifar100/first.json: the projected stage-1 time is 320 epochs


# ---------------------------------------------------------------------------
# Data, model, memory
# ---------------------------------------------------------------------------

def synthetic_cifar100_lt(seed: int) -> dict:
    counts = long_tailed_counts(480, N_CLASSES, "exp", 0.01)  # 10,457 images, head 480, tail 5
    g = torch.Generator().manual_seed(seed)
    train_labels = torch.repeat_interleave(torch.arange(N_CLASSES), torch.tensor(counts))
    val_labels = torch.arange(N_CLASSES).repeat_interleave(VAL_PER_CLASS)
    return {
        "counts": counts,
        "train": SplitTensors(torch.randint(0, 256, (len(train_labels), 3, 32, 32), generator=g, dtype=torch.uint8),
                              train_labels),
        "val": SplitTensors(torch.randint(0, 256, (len(val_labels), 3, 32, 32), generator=g, dtype=torch.uint8),
                            val_labels),
    }


def stage1_config(args, **overrides):
    raw = load_json(ROOT / "jsons/Cifar100/first.json")
    raw["model"]["name"] = overrides.pop("model")
    raw["data"]["batch_size"] = args.batch_size
    raw["data"]["eval_batch_size"] = overrides.pop("eval_batch_size", args.eval_batch_size)
    raw["optim"]["sgd_impl"] = overrides.pop("sgd_impl", args.sgd_impl)
    raw.update(overrides)
    return from_dict(raw, "bench")


def build(cfg, data, device, seed, couple_decay=True):
    """couple_decay=False: the explicit weight-decay term with its autograd graph, as the published code."""
    torch.manual_seed(seed)
    shape = SimpleNamespace(name=cfg.data.name, n_classes=N_CLASSES, train_images=data["train"].images,
                            class_counts=data["counts"], in_channels=data["train"].images.shape[1])
    model = make_model(cfg.model, shape, cfg.seeds).to(device)
    params = [p for _, p in trained_parameters(model, "first", cfg.optim)]
    objective = make_objective(cfg.optim, data["counts"], params, device, classifier=model.classifier,
                               couple_decay=couple_decay)
    return model, params, objective


def _rss_kib(pid: int) -> int:
    # /proc/<pid>/status is O(1) to read.  (smaps_rollup's PSS walks every page
    # table: ~50 ms per read of a 3 GB process, which slowed the measured
    # training by a quarter when sampled every 50 ms.)
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


class PeakMemory:
    """CUDA: max_memory_allocated. CPU: peak RSS of this process + its children (DataLoader workers;
    pages they share with the parent count in each)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        me = os.getpid()
        while not self._stop.is_set():
            total = _rss_kib(me) + sum(_rss_kib(c) for c in _children(me))
            self.peak = max(self.peak, total * 1024)
            self._stop.wait(0.05)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/status"):
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------
# One measurement of one pipeline
# ---------------------------------------------------------------------------

@dataclass
class Variant:
    """One pipeline configuration (B, A, or an ablation step of A)."""
    label: str
    naive: bool = False
    precision: str = "auto"
    memory_format: str = "auto"
    compile: str = "off"
    sgd_impl: str = "auto"
    eval_batch_size: Optional[int] = None
    results: list = field(default_factory=list)


@dataclass
class Measurement:
    train_ips: float
    eval_ips: float
    epoch_s: float
    peak_bytes: int
    startup_s: float = 0.0
    compile_s: float = 0.0
    timed_images: int = 0  # the images the training figure was timed over


def epoch_batch_sizes(n_images: int, batch_size: int) -> list[int]:
    """The batch sizes of one training epoch, as utils.engine.train.batch_slices cuts it
    (full batches, then the remainder; a trailing batch of one image is dropped)."""
    sizes = [batch_size] * (n_images // batch_size) + ([n_images % batch_size] if n_images % batch_size else [])
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes.pop()
    return sizes


def trained_images(out: dict, n_images: int, batch_size: int) -> int:
    """Images one call of train_one_epoch trained: its own count where it returns one
    (``out["images"]``), else the sizes of the batches it ran (one loss per step)."""
    if "images" in out:
        return int(out["images"])
    steps = out["step_loss"].numel()
    return sum(epoch_batch_sizes(n_images, batch_size)[:steps])


def timed_steps(args, n_images: int) -> int:
    """``--steps``, capped at one epoch's batches (an epoch's loop ends there)."""
    return min(args.steps, len(epoch_batch_sizes(n_images, args.batch_size)))


def fast_state(cfg, data, device, seed: int, batch_size: int):
    """(model, fast path, TrainState) of pipeline A, built as the runs build them."""
    model, params, objective = build(cfg, data, device, seed)
    fast = make_fast_path(model, device, cfg.precision, cfg.memory_format, cfg.compile)
    optimizer = make_optimizer(cfg.optim, params, objective)
    augment = BatchAugment(MEAN, STD, 4, True, device)
    # both generators on the CPU: crops and flips are drawn there and copied to the device
    state = TrainState(optimizer=optimizer, objective=objective, augment=augment, batch_size=batch_size,
                       n_classes=N_CLASSES, shuffle_generator=torch.Generator().manual_seed(seed),
                       augment_generator=torch.Generator().manual_seed(seed + 1), fast=fast)
    return model, fast, state


def measure_fast(v: Variant, args, data, device, n_val_eval) -> Measurement:
    cfg = stage1_config(args, model=args.current_model, precision=v.precision, memory_format=v.memory_format,
                        compile=v.compile, sgd_impl=v.sgd_impl,
                        eval_batch_size=v.eval_batch_size or args.eval_batch_size)
    train = SplitTensors(data["train"].images.to(device), data["train"].labels.to(device))
    val = SplitTensors(data["val"].images.to(device), data["val"].labels.to(device))
    val_part = SplitTensors(val.images[:n_val_eval], val.labels[:n_val_eval])
    eval_bs = cfg.data.eval_batch_size
    with PeakMemory(device) as mem:
        model, fast, state = fast_state(cfg, data, device, args.seed, args.batch_size)
        augment = state.augment
        t0 = time.perf_counter()
        last_batch = epoch_batch_sizes(len(train), args.batch_size)[-1]
        if v.compile != "off" and last_batch != args.batch_size:
            # the epoch's last, smaller batch is a new shape: compile it here, not in the timed steps
            # (twice: CUDA-graph modes record a shape's graph on its second call)
            for _ in range(2):
                train_one_epoch(model, train.subset(0, last_batch), state, 1, 1, show_progress=False)
        train_one_epoch(model, train, state, 1, 1, show_progress=False, max_steps=args.warmup)
        warm_val = SplitTensors(val.images[:eval_bs], val.labels[:eval_bs])
        evaluate(model, warm_val, augment, N_CLASSES, eval_bs, fast=fast)  # warm the eval path
        if v.compile != "off" and n_val_eval % eval_bs:
            evaluate(model, val_part, augment, N_CLASSES, eval_bs, fast=fast)  # the last shape too
        sync(device)
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = train_one_epoch(model, train, state, 1, 1, show_progress=False, max_steps=timed_steps(args, len(train)))
        sync(device)
        timed = trained_images(out, len(train), args.batch_size)
        train_ips = timed / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        evaluate(model, val_part, augment, N_CLASSES, eval_bs, fast=fast)
        sync(device)
        eval_ips = n_val_eval / (time.perf_counter() - t0)
        if args.epoch == "measure":
            t0 = time.perf_counter()
            train_one_epoch(model, train, state, 1, 1, show_progress=False)
            evaluate(model, val, augment, N_CLASSES, eval_bs, fast=fast)
            sync(device)
            epoch_s = time.perf_counter() - t0
        else:
            epoch_s = len(train.labels) / train_ips + len(val.labels) / eval_ips
    del model, fast, state
    gc.collect()
    compile_s = warm_s if v.compile != "off" else 0.0
    return Measurement(train_ips, eval_ips, epoch_s, mem.peak, compile_s=compile_s, timed_images=timed)


def measure_naive(v: Variant, args, data, device, n_val_eval) -> Measurement:
    cfg = stage1_config(args, model=args.current_model, precision="fp32", memory_format="contiguous")
    train_loader = make_loader(data["train"].images, data["train"].labels, train_transform(MEAN, STD),
                               args.batch_size, args.workers, shuffle=True)
    val_part = make_loader(data["val"].images[:n_val_eval], data["val"].labels[:n_val_eval],
                           eval_transform(MEAN, STD), args.batch_size, args.workers, shuffle=False)
    with PeakMemory(device) as mem:
        model, params, objective = build(cfg, data, device, args.seed, couple_decay=False)
        optimizer = torch.optim.SGD(params, lr=cfg.optim.base_lr, momentum=cfg.optim.momentum)
        trainer = NaiveTrainer(model, objective, optimizer, device, N_CLASSES)
        batches = iter(train_loader)  # new workers, as every epoch of a non-persistent DataLoader
        _, startup_s = trainer.train_steps(batches, args.warmup)
        trainer.evaluate(val_part)
        sync(device)
        t0 = time.perf_counter()
        # the steps left in the warm-up's epoch (a fresh iterator would time new workers' start-up)
        timed, _ = trainer.train_steps(batches, timed_steps(args, len(data["train"].labels)))
        sync(device)
        train_ips = timed / (time.perf_counter() - t0)
        del batches
        t0 = time.perf_counter()
        seen = trainer.evaluate(val_part)
        sync(device)
        eval_ips = seen / (time.perf_counter() - t0)
        if args.epoch == "measure":
            val_loader = make_loader(data["val"].images, data["val"].labels, eval_transform(MEAN, STD),
                                     args.batch_size, args.workers, shuffle=False)
            t0 = time.perf_counter()
            trainer.train_steps(iter(train_loader), None)
            trainer.evaluate(val_loader)
            sync(device)
            epoch_s = time.perf_counter() - t0
        else:
            # one worker start-up for the training and one for the validation loader
            epoch_s = 2 * startup_s + len(data["train"].labels) / train_ips + len(data["val"].labels) / eval_ips
    del model, optimizer, trainer, params, objective
    gc.collect()
    return Measurement(train_ips, eval_ips, epoch_s, mem.peak, startup_s=startup_s, timed_images=timed)


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

def machine_line(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    line = f"CPU {cpu}, {os.cpu_count()} cores ({resolve_threads(0)} available), torch {torch.__version__}"
    if device.type == "cuda":
        line += f", GPU {torch.cuda.get_device_name(device)}"
    return line


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:,.0f} MiB" if n else "n/a"


def projected_stage1_s(epoch_s: float) -> float:
    """The full stage 1: one epoch (train pass + per-epoch validation) x 320."""
    return epoch_s * STAGE1_EPOCHS


def summarise(v: Variant) -> dict:
    r = v.results
    tr = [m.train_ips for m in r]
    epoch = statistics.median(m.epoch_s for m in r)
    return {"train": statistics.median(tr), "train_lo": min(tr), "train_hi": max(tr),
            "eval": statistics.median(m.eval_ips for m in r), "epoch": epoch,
            "stage1_320": projected_stage1_s(epoch), "peak": max(m.peak_bytes for m in r),
            "compile": max(m.compile_s for m in r), "timed_images": min(m.timed_images for m in r)}


def ratios(a: dict, b: dict) -> dict:
    """A over B: training and evaluation images/s, and how many times faster A's epoch is."""
    return {"train": a["train"] / b["train"], "eval": a["eval"] / b["eval"], "epoch": b["epoch"] / a["epoch"]}


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def steps_note(args, n_images: int) -> str:
    steps = timed_steps(args, n_images)
    note = f"{steps} timed steps after {args.warmup} warm-up"
    if steps < args.steps:
        note += f" (--steps {args.steps} capped at one epoch: {steps} batches)"
    return note


def print_table(model_name: str, variants: list[Variant], baseline: Variant, args, device, n_images: int) -> None:
    mem = "max_memory_allocated" if device.type == "cuda" else "peak RSS incl. workers"
    print(f"\n{model_name}, batch {args.batch_size}, device {device}, {steps_note(args, n_images)}, "
          f"{args.rounds} round(s), epoch {args.epoch}d")
    head = (f"{'pipeline':58s} {'train img/s':>22s} {'timed img':>9s} {'eval img/s':>11s} {'epoch s':>8s} "
            f"{'320 epochs':>10s} {mem:>22s}")
    print(head)
    print("-" * len(head))
    base = summarise(baseline)
    for v in variants:
        s = summarise(v)
        rng = f"({s['train_lo']:.1f}-{s['train_hi']:.1f})" if len(v.results) > 1 else ""
        extra = f"  [compile + warm-up {s['compile']:.0f} s]" if s["compile"] else ""
        print(f"{v.label:58s} {s['train']:>9.1f} {rng:>12s} {s['timed_images']:>9d} {s['eval']:>11.1f} "
              f"{s['epoch']:>8.2f} {duration(s['stage1_320']):>10s} {_mib(s['peak']):>22s}{extra}")
    for v in variants:
        if v is baseline:
            continue
        r = ratios(summarise(v), base)
        print(f"ratio {v.label.split(':')[0]} / {baseline.label.split(':')[0]}: train {r['train']:.2f}x, "
              f"eval {r['eval']:.2f}x, epoch {r['epoch']:.2f}x faster")
def variants_for(args, device) -> tuple[list[Variant], Variant]:
    b = Variant("B: naive (PIL, %d workers, fp32, .item())" % args.workers, naive=True)
    fast = dict(precision=args.precision, memory_format=args.memory_format, compile=args.compile,
                sgd_impl=args.sgd_impl)
    resolved = FastPath(amp_dtype=resolve_precision(args.precision, device),
                        channels_last=resolve_channels_last(args.memory_format, device))
    impl = sgd_kwargs(args.sgd_impl, device)
    impl = "fused" if impl.get("fused") else "foreach" if impl.get("foreach") else "default"
    a = Variant(f"A: this project ({resolved.precision}, "
                f"{'channels_last' if resolved.channels_last else 'contiguous'}, {impl} SGD"
                f"{', compile ' + args.compile if args.compile != 'off' else ''})", **fast)
    if not args.ablation:
        return [a, b], b
    base = Variant("A0: resident uint8 + batched aug, fp32, contiguous, for-loop SGD", precision="fp32",
                   memory_format="contiguous", sgd_impl="for-loop")
    steps = [b, base,
             replace(base, label="A0 + channels_last", memory_format="channels_last", results=[]),
             replace(base, label="A0 + bf16 autocast", precision="bf16", results=[]),
             replace(base, label="A0 + foreach SGD", sgd_impl="foreach", results=[]),
             replace(base, label="A0 + fused SGD", sgd_impl="fused", results=[]),
             replace(base, label="A0 with eval batch = train batch", eval_batch_size=args.batch_size, results=[])]
    if args.compile != "off":
        steps.append(replace(base, label=f"A0 + compile {args.compile}", compile=args.compile, results=[]))
    steps.append(a)
    return steps, b


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with the device resolved and the per-device defaults filled in."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--model", default="ResNet34", help="ResNet34, ResNet18 or a comma-separated list")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=0,
                   help="pipeline A's evaluation batch (0 = the pipeline's auto: 1024 on CUDA, 64 on CPU)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--memory-format", default="auto", choices=MEMORY_FORMATS, help="channels_last or contiguous")
    p.add_argument("--channels-last", dest="memory_format", action="store_const", const="channels_last",
                   help="same as --memory-format channels_last")
    p.add_argument("--compile", default="off", choices=COMPILE_MODES)
    p.add_argument("--sgd-impl", default="auto", choices=SGD_IMPLS)
    p.add_argument("--steps", type=int, default=None,
                   help="timed training steps per round (cpu 10, cuda 300), capped at one epoch")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (cpu 2, cuda 30)")
    p.add_argument("--rounds", type=int, default=2, help="A/B alternations")
    p.add_argument("--eval-images", type=int, default=None, help="validation images timed (cpu 512, cuda 2000)")
    p.add_argument("--epoch", choices=("estimate", "measure"), default=None,
                   help="full epoch from the rates (cpu default) or one real epoch (cuda default)")
    p.add_argument("--workers", type=int, default=4, help="pipeline B's DataLoader workers")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = OMP_NUM_THREADS or cores available)")
    p.add_argument("--ablation", action="store_true", help="also time each optimisation of A on its own")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    args.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                               "cpu" if args.device == "auto" else args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available")
    gpu = args.device.type == "cuda"
    args.steps = args.steps or (300 if gpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (30 if gpu else 2)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be >= 1 (the first step also starts B's workers)")
    args.eval_images = args.eval_images or (2000 if gpu else 512)
    args.epoch = args.epoch or ("measure" if gpu else "estimate")
    args.eval_batch_size = resolve_eval_batch_size(args.eval_batch_size, args.device)
    return args


def prepare_process(args) -> None:
    """Process-wide settings, as a run makes them."""
    torch.set_num_threads(resolve_threads(args.threads))
    if args.device.type == "cpu":
        keep_freed_memory()  # as the pipeline does on CPU; process-wide, so B gets it too
    apply_determinism(False)  # cuDNN's algorithm choice as in a run without `deterministic`
    # B's 4 workers on a 2-core machine are what the published code does; the warning is expected
    warnings.filterwarnings("ignore", message="This DataLoader will create")


def compare(args, data, model_name: str, say=print) -> tuple[list[Variant], Variant]:
    """Time every variant of ``model_name`` round-robin; returns (variants, the baseline B)."""
    args.current_model = model_name
    variants, baseline = variants_for(args, args.device)
    n_val_eval = min(args.eval_images, len(data["val"].labels))
    for rnd in range(args.rounds):
        for v in variants:
            measure = measure_naive if v.naive else measure_fast
            m = measure(v, args, data, args.device, n_val_eval)
            v.results.append(m)
            say(f"  round {rnd + 1} {v.label.split(':')[0]:40s} train {m.train_ips:8.1f} img/s, "
                f"eval {m.eval_ips:8.1f} img/s (load {os.getloadavg()[0]:.2f})")
    return variants, baseline


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    prepare_process(args)
    print(machine_line(device))
    print(f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f} at start"
          + (f"; cudnn.benchmark {torch.backends.cudnn.benchmark}" if device.type == "cuda" else ""))
    data = synthetic_cifar100_lt(args.seed)
    n_train = len(data["train"].labels)
    print(f"synthetic CIFAR-100-LT: {n_train:,} training / {len(data['val'].labels):,} "
          f"validation images (32x32x3 uint8)")
    for model_name in [m.strip() for m in args.model.split(",") if m.strip()]:
        variants, baseline = compare(args, data, model_name, say=lambda line: print(line, flush=True))
        print_table(model_name, variants, baseline, args, device, n_train)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
