"""The fast path: numeric precision, memory layout, torch.compile, optimiser
implementation and CPU threads, resolved once from the config.

Every choice here changes how fast a step runs, not what it computes (up to
rounding): bf16 autocast rounds activations to 8 significant bits, the other
settings only reorder floating-point work.  ``auto`` picks what measurably
paid on the machines measured (see bench/throughput.py and the README's
Performance section):

* CUDA with compute capability >= 8.0 (Ampere and later): bf16 autocast,
  channels_last, fused SGD.  Older GPUs (V100, T4, RTX 20xx) have no bf16
  tensor cores (``torch.cuda.is_bf16_supported()`` counts emulation there), so
  ``auto`` keeps them on fp32 and contiguous tensors.
* CPU: fp32, contiguous, torch's default SGD.  On the 2-core Xeon with
  avx512_bf16 used for development, bf16 autocast made ResNet34 training at
  batch 64 20-30% *slower* (18-20 vs 25-26 images/s) and channels_last was
  within noise, so ``auto`` keeps the CPU numbers bit-identical to fp32 eager.

``fp32`` keeps torch's defaults: on Ampere and later, cuDNN convolutions run in
TF32 (10-bit mantissa inputs, fp32 accumulation) while matmuls stay fp32.
``fp32-strict`` turns TF32 off for both.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "fp32-strict", "bf16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SGD_IMPLS = ("auto", "fused", "foreach", "for-loop")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
# bf16 tensor cores (and the channels_last convolutions that pay with them) start with Ampere
FAST_CAPABILITY = (8, 0)


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


EVAL_BATCH_CPU = 64
EVAL_BATCH_CUDA_MAX = 1024
_EVAL_PIXELS_CUDA = 1024 * 64 * 64  # images x pixels per evaluation batch on CUDA


def resolve_eval_batch_size(eval_batch_size: int, device: torch.device,
                            input_size: Optional[tuple[int, int]] = None) -> int:
    """0 = auto: on CPU 64 (a ResNet34 evaluates 1.4x faster at batch 64 than at 1024:
    the activations stay in cache; bench/throughput.py); on CUDA the largest power of
    two <= 1024 * (64 * 64) / (H * W), at most 1024, so the activations of a batch stay
    the same size: 1024 for 32- and 8-pixel images, 64 at 224 x 224 (ResNeXt50 at 1024
    would need tens of GB).  ``input_size`` = (H, W) of the input images, None for a
    feature table (1024 on CUDA)."""
    if eval_batch_size > 0:
        return eval_batch_size
    if device.type != "cuda":
        return EVAL_BATCH_CPU
    if input_size is None:
        return EVAL_BATCH_CUDA_MAX
    fits = max(1, _EVAL_PIXELS_CUDA // (input_size[0] * input_size[1]))
    return min(EVAL_BATCH_CUDA_MAX, 1 << (fits.bit_length() - 1))


def keep_freed_memory() -> bool:
    """On CPU, let glibc keep freed blocks instead of returning them to the system.

    A training step allocates and frees hundreds of MB of activations; with
    glibc's defaults the large blocks are unmapped after each step and mapped
    (page-faulted) again in the next.  Raising the mmap and trim thresholds keeps
    them in the heap (what jemalloc/tcmalloc do, as PyTorch's CPU tuning guide
    recommends); measured +7-12% training images/s for ResNet34 on 2 cores.
    Returns whether it applied (glibc on Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 34))
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False


def others_running(reads: int = 5, interval_s: float = 0.004) -> int:
    """How many threads of other work are running now: the kernel's count of runnable
    threads (``procs_running`` in /proc/stat, which counts this reader) less one, the
    median of a few reads; 0 where /proc/stat cannot be read (not Linux)."""
    counts = []
    for i in range(reads):
        try:
            with open("/proc/stat") as fh:
                line = next(l for l in fh if l.startswith("procs_running"))
        except (OSError, StopIteration):
            return 0
        counts.append(int(line.split()[1]) - 1)
        if i + 1 < reads:
            time.sleep(interval_s)
    return max(0, sorted(counts)[len(counts) // 2])


def choose_threads(num_threads: int) -> "Choice":
    """The CPU thread count (``num_threads``; 0 = auto) and why.

    Auto: OMP_NUM_THREADS when set; else this process's share of its cores (the processes
    torchrun started on this machine share them), less the threads of other work running
    now, at least 1.  Why: a thread count above the free cores makes every parallel
    kernel wait for its slowest thread, which the other work holds.  On a 2-core machine
    with one core busy, a 3-epoch Digits stage-1 run took 21.7 s with 2 threads and
    15.3 s with 1; on a quiet one, 11.3 s with 2 and 14.4 s with 1 (README "Performance")."""
    if num_threads > 0:
        return Choice(str(num_threads))
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return Choice(env, "OMP_NUM_THREADS")
    cores = available_cores()
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    share = max(1, cores // processes)
    busy = others_running()
    threads = max(1, min(share, cores - busy))
    why = f"auto: {cores} cores" + (f" shared by {processes} processes" if processes > 1 else "")
    return Choice(str(threads), why + (f", {busy} threads of other work running" if busy else ""))


def resolve_threads(num_threads: int) -> int:
    """The thread count :func:`choose_threads` chooses."""
    return int(choose_threads(num_threads).value)


@dataclass(frozen=True)
class Choice:
    """A resolved setting and, for ``auto`` (or a caveat), why: for train.log."""
    value: str
    reason: str = ""

    def text(self) -> str:
        return f"{self.value} ({self.reason})" if self.reason else self.value


def _fast_gpu(device: torch.device) -> tuple[bool, str]:
    """(whether ``device`` is a CUDA GPU with compute capability >= 8.0, the words saying so)."""
    if device.type != "cuda":
        return False, device.type.upper()
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    relation = ">=" if (major, minor) >= FAST_CAPABILITY else "<"
    return (major, minor) >= FAST_CAPABILITY, f"{name}, compute {major}.{minor} {relation} {FAST_CAPABILITY[0]}.{FAST_CAPABILITY[1]}"


def choose_precision(precision: str, device: torch.device) -> Choice:
    """fp32 | fp32-strict | bf16, with the reason when ``auto`` decided (or TF32 applies)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    fast, why = _fast_gpu(device)
    if precision == "auto":
        # CPU: bf16 autocast measured slower (module docstring)
        return Choice("bf16" if fast else "fp32", f"auto: {why}")
    if precision == "fp32" and fast:
        return Choice("fp32", "cuDNN convolutions in TF32, torch's default; fp32-strict turns it off")
    if precision == "bf16" and device.type == "cuda" and not fast:
        return Choice("bf16", f"no bf16 tensor cores: {why}; expect it slower than fp32")
    return Choice(precision)


def choose_memory_format(memory_format: str, device: torch.device) -> Choice:
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    if memory_format != "auto":
        return Choice(memory_format)
    fast, why = _fast_gpu(device)
    return Choice("channels_last" if fast else "contiguous", f"auto: {why}")


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32 (fp32-strict included)."""
    return torch.bfloat16 if choose_precision(precision, device).value == "bf16" else None


def resolve_channels_last(memory_format: str, device: torch.device) -> bool:
    return choose_memory_format(memory_format, device).value == "channels_last"


def set_tf32(convolutions: bool) -> None:
    """TF32 for cuDNN convolutions on (torch's default) or off; cuBLAS matmuls always in fp32
    (torch's default too).

    Process-wide flags, set on every run so that a strict run does not leak into the next
    one in the same process.  The ``allow_tf32`` attributes exist in every supported torch;
    the newer ``fp32_precision`` settings (torch 2.9+) are not mixed in, as torch objects to
    both being used."""
    torch.backends.cudnn.allow_tf32 = convolutions
    torch.backends.cuda.matmul.allow_tf32 = False


def sgd_kwargs(sgd_impl: str, device: torch.device) -> dict:
    """Keyword arguments selecting torch.optim.SGD's implementation.

    All three compute ``buf = momentum * buf + grad; w -= lr * buf``; they
    differ in how many kernels they launch (one per tensor, one per group of
    tensors, one fused kernel), which matters on a GPU and hardly on a CPU.
    """
    if sgd_impl == "auto":
        return {"fused": True} if device.type == "cuda" else {}
    if sgd_impl == "fused":
        return {"fused": True}
    if sgd_impl == "foreach":
        return {"foreach": True}
    if sgd_impl == "for-loop":
        return {"foreach": False}
    raise ValueError(f"sgd_impl must be one of {SGD_IMPLS}, got {sgd_impl!r}")


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits): the backbone under whatever autocast is active, the classifier in fp32.

    Model selection (validation accuracy), the tau sweep and the logged accuracies read
    these logits; running the classifier outside autocast on float32 features keeps them
    free of bf16 rounding of the classifier weights (its cost is one K x D matmul).  With
    fp32 inputs and no autocast this is exactly ``classify(features(x))``."""
    h = model.features(x)
    with torch.autocast(x.device.type, enabled=False):
        logits = model.classify(h.float())
    return h, logits


@dataclass
class FastPath:
    """How forward passes run: autocast dtype, input layout, compiled forward."""
    device_type: str = "cpu"
    amp_dtype: Optional[torch.dtype] = None      # None = fp32
    channels_last: bool = False
    compile_mode: str = "off"
    forward_fn: Optional[Callable] = None        # compiled (features, logits) = f(x)
    precision_choice: Optional[Choice] = None    # what train.log says (None: from amp_dtype)
    memory_format_choice: Optional[Choice] = None

    @property
    def precision(self) -> str:
        if self.precision_choice is not None:
            return self.precision_choice.value
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, str(self.amp_dtype))

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of an input batch, under this path's layout and autocast
        (the logits always in fp32: :func:`features_and_logits`).

        The caller computes the loss inside ``autocast()`` too; backward and the
        optimiser step run outside it, as torch.autocast's documentation asks.
        """
        x = self.layout(x)
        if self.forward_fn is not None:
            if self.compile_mode in CUDAGRAPH_MODES and self.device_type == "cuda":
                # CUDA graphs reuse their output buffers: a new step starts here
                torch.compiler.cudagraph_mark_step_begin()
            return self.forward_fn(x)
        return features_and_logits(model, x)

    def describe(self) -> str:
        precision = self.precision_choice.text() if self.precision_choice is not None else self.precision
        layout = "channels_last" if self.channels_last else "contiguous"
        if self.memory_format_choice is not None:
            layout = self.memory_format_choice.text()
        return f"precision {precision}, memory format {layout}, compile {self.compile_mode}"


def make_fast_path(model: nn.Module, device: torch.device, precision: str = "fp32",
                   memory_format: str = "contiguous", compile_mode: str = "off") -> FastPath:
    """Resolve the settings for ``device`` and prepare ``model`` (layout, compiled forward).

    Also sets the process-wide TF32 flags (``fp32-strict`` turns TF32 off).
    torch.compile wraps a function of the batch rather than the module, so the
    state_dict keys, ``model.features``/``model.classify`` and checkpoints stay
    as they are.  Train and eval mode and each new batch shape compile once.
    """
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile_mode!r}")
    precision_choice = choose_precision(precision, device)
    layout_choice = choose_memory_format(memory_format, device)
    set_tf32(precision_choice.value != "fp32-strict")
    fast = FastPath(device_type=device.type,
                    amp_dtype=torch.bfloat16 if precision_choice.value == "bf16" else None,
                    channels_last=layout_choice.value == "channels_last", compile_mode=compile_mode,
                    precision_choice=precision_choice, memory_format_choice=layout_choice)
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_mode != "off":
        def forward(x):
            return features_and_logits(model, x)
        fast.forward_fn = torch.compile(forward, mode=None if compile_mode == "default" else compile_mode)
    return fast
