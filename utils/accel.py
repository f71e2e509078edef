"""The fast path: numeric precision, memory layout, torch.compile, optimiser
implementation and CPU threads, resolved once from the config.

Every choice here changes how fast a step runs, not what it computes (up to
rounding): bf16 autocast rounds activations to 8 significant bits, the other
settings only reorder floating-point work.  ``auto`` picks what measurably
paid on the machines measured (see bench/throughput.py and the README's
Performance section):

* CUDA: bf16 autocast (where the GPU supports it), channels_last, fused SGD.
* CPU: fp32, contiguous, torch's default SGD.  On the 2-core Xeon with
  avx512_bf16 used for development, bf16 autocast made ResNet34 training at
  batch 64 20-30% *slower* (18-20 vs 25-26 images/s) and channels_last was
  within noise, so ``auto`` keeps the CPU numbers bit-identical to fp32 eager.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SGD_IMPLS = ("auto", "fused", "foreach", "for-loop")
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


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


def resolve_threads(num_threads: int) -> int:
    """0 = OMP_NUM_THREADS when set, else the cores available to this process."""
    if num_threads > 0:
        return num_threads
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return available_cores()


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # CPU: bf16 autocast measured slower (module docstring)


def resolve_channels_last(memory_format: str, device: torch.device) -> bool:
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    if memory_format == "auto":
        return device.type == "cuda"
    return memory_format == "channels_last"


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


@dataclass
class FastPath:
    """How forward passes run: autocast dtype, input layout, compiled forward."""
    device_type: str = "cpu"
    amp_dtype: Optional[torch.dtype] = None      # None = fp32
    channels_last: bool = False
    compile_mode: str = "off"
    forward_fn: Optional[Callable] = None        # compiled (features, logits) = f(x)

    @property
    def precision(self) -> str:
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
        """(features, logits) of an input batch, under this path's layout and autocast.

        The caller computes the loss inside ``autocast()`` too; backward and the
        optimiser step run outside it, as torch.autocast's documentation asks.
        """
        x = self.layout(x)
        if self.forward_fn is not None:
            if self.compile_mode in _CUDAGRAPH_MODES and self.device_type == "cuda":
                # CUDA graphs reuse their output buffers: a new step starts here
                torch.compiler.cudagraph_mark_step_begin()
            return self.forward_fn(x)
        h = model.features(x)
        return h, model.classify(h)

    def describe(self) -> str:
        return (f"precision {self.precision}, memory format "
                f"{'channels_last' if self.channels_last else 'contiguous'}, compile {self.compile_mode}")


def make_fast_path(model: nn.Module, device: torch.device, precision: str = "fp32",
                   memory_format: str = "contiguous", compile_mode: str = "off") -> FastPath:
    """Resolve the settings for ``device`` and prepare ``model`` (layout, compiled forward).

    torch.compile wraps a function of the batch rather than the module, so the
    state_dict keys, ``model.features``/``model.classify`` and checkpoints stay
    as they are.  Train and eval mode and each new batch shape compile once.
    """
    fast = FastPath(device_type=device.type, amp_dtype=resolve_precision(precision, device),
                    channels_last=resolve_channels_last(memory_format, device), compile_mode=compile_mode)
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile_mode!r}")
    if compile_mode != "off":
        def forward(x):
            h = model.features(x)
            return h, model.classify(h)
        fast.forward_fn = torch.compile(forward, mode=None if compile_mode == "default" else compile_mode)
    return fast
