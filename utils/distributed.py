"""Several processes, one run: torchrun + DistributedDataParallel helpers.

``torchrun --nproc_per_node=N first.py ...`` starts N copies of the script with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in their environment.  :func:`setup` joins
them into one process group (NCCL on CUDA, gloo on CPU); without torchrun (or with
one process) nothing is initialised and every helper here is the identity, so a
single process runs exactly the code it always ran.  ``WB_FORCE_DISTRIBUTED=1``
initialises the group for a single process too (``torchrun --nproc_per_node=1``, or
plain ``python`` with an in-process store), so that DDP, global-batch BatchNorm, the
gathers and sharded evaluation run with one process and can be compared with a plain run.

The semantics are those of one process with the global batch (README "Several GPUs"):

* ``data.batch_size`` is the global batch; each rank gets a contiguous part of every
  global batch (:func:`chunk_bounds`; equal parts, except that the last, smaller
  batch of an epoch is split as evenly as possible);
* every rank draws the same global permutation and the same augmentation
  parameters for the whole global batch, and applies its own slice of them: the
  ranks' crops and flips differ, and together they are those of one process;
* BatchNorm statistics are computed over the global batch (:func:`convert_sync_batchnorm`);
* the loss is computed on the gathered outputs of the global batch
  (:func:`gather_rows_autograd`), so every loss term, including class-weighted means,
  equals the single-process one, and every rank holds the same per-epoch records;
* evaluation gives each rank a contiguous shard of the split (every image exactly
  once, no padding); confusion counts are summed and features gathered.

Gradients: each rank's loss is the global loss ``L``; the gathers' backward sums the
ranks' contributions, so rank r's gradient is ``W * dL/dtheta`` through its own
samples plus the parameter-only terms (weight decay); DDP's average over ranks then
gives exactly ``dL/dtheta``.

Every collective here exchanges tensors of the same shape on every rank (parts are
padded to the largest and trimmed after), as NCCL requires.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from utils.accel import features_and_logits

__all__ = ["Dist", "context", "setup", "teardown", "chunk_bounds", "chunk_sizes", "gather_rows",
           "gather_rows_autograd", "all_reduce_sum", "any_rank", "barrier", "broadcast_module",
           "convert_sync_batchnorm", "agree", "FeaturesAndLogits", "FORCE_ENV"]

FORCE_ENV = "WB_FORCE_DISTRIBUTED"


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the run (``backend`` empty: no process group)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = ""

    @property
    def enabled(self) -> bool:
        """A process group exists: several processes, or one forced by ``WB_FORCE_DISTRIBUTED=1``."""
        return bool(self.backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        nodes = self.world_size // max(self.local_world_size, 1)
        processes = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        forced = f", forced by {FORCE_ENV}=1" if self.world_size == 1 else ""
        return f"{processes} ({self.backend}{forced}, {nodes} node(s) x {self.local_world_size})"


_CONTEXT = Dist()


def context() -> Dist:
    """The process group this process belongs to (a single process when not launched by torchrun)."""
    return _CONTEXT


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    return int(text) if text.isdigit() else default


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def forced() -> bool:
    """``WB_FORCE_DISTRIBUTED=1``: a process group even for one process ("" or "0": not)."""
    from utils.config import ConfigError

    text = os.environ.get(FORCE_ENV, "").strip()
    if text not in ("", "0", "1"):
        raise ConfigError(f"environment variable {FORCE_ENV} = {text!r}; use 1 (initialise the process group "
                          "even for one process) or 0 / unset")
    return text == "1"


def setup(device_name: str, timeout_s: float = 1800.0) -> Dist:
    """Join torchrun's process group, once per process; returns the context.

    The backend follows the device: NCCL when the run uses CUDA (``auto`` with a GPU,
    ``cuda``), gloo on CPU.  Each rank uses the GPU of its ``LOCAL_RANK``, which also
    becomes the current CUDA device (NCCL and ``all_gather_object`` rely on it).
    """
    global _CONTEXT
    if _CONTEXT.enabled or (launched_world_size() <= 1 and not forced()):
        return _CONTEXT
    from utils.config import ConfigError

    rank, world = _env_int("RANK", 0), launched_world_size()
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    wants_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if wants_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"device = {device_name!r} but CUDA is not available on this machine; use auto or cpu")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} on {socket.gethostname()} but only "
                              f"{torch.cuda.device_count()} GPU(s) are visible: start at most that many processes "
                              "per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if wants_cuda else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if wants_cuda:
        kwargs["device_id"] = torch.device("cuda", local_rank)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        # forced without torchrun: nobody to meet, so an in-process store instead of env://
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(**kwargs)
    _CONTEXT = Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    local_world_size=local_world, backend=backend)
    return _CONTEXT


def check_global_batch(cfg) -> None:
    """``data.batch_size`` is the global batch: it must split evenly over the processes."""
    from utils.config import ConfigError

    world, batch = _CONTEXT.world_size, cfg.data.batch_size
    if cfg.optim.total_epoch_num > 0 and batch % world:
        lower, upper = batch - batch % world, batch + world - batch % world
        hint = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise ConfigError(f"data.batch_size = {batch} is the global batch and must divide by the {world} processes "
                          f"of this torchrun launch (nnodes x nproc_per_node); use {hint}, or another "
                          "number of processes")


def teardown() -> None:
    global _CONTEXT
    if _CONTEXT.enabled and dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = Dist()


def device_for(device_name: str) -> Optional[torch.device]:
    """The device of this rank when distributed on CUDA (its LOCAL_RANK's GPU), else None."""
    c = _CONTEXT
    if c.enabled and c.backend == "nccl":
        return torch.device("cuda", c.local_rank)
    return None


# ---------------------------------------------------------------------------
# Splitting batches and splits
# ---------------------------------------------------------------------------

def chunk_sizes(n: int, world_size: int) -> list[int]:
    """Sizes of ``n`` rows split over ranks: equal, the first ``n % W`` ranks one more
    (``torch.tensor_split``'s rule)."""
    base, extra = divmod(n, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def chunk_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """(start, stop) of rank's contiguous part of ``n`` rows."""
    sizes = chunk_sizes(n, world_size)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def my_bounds(n: int) -> tuple[int, int]:
    c = _CONTEXT
    return chunk_bounds(n, c.world_size, c.rank) if c.enabled else (0, n)


def my_shard(split):
    """This rank's contiguous shard of an evaluation split (the split itself in one process)."""
    return split.subset(*my_bounds(len(split))) if _CONTEXT.enabled else split


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    pad = t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))
    return torch.cat([t, pad]).contiguous()


def _outside_inference(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a normal tensor.  Evaluation runs under ``torch.inference_mode``, and a
    backend may write a collective's outputs from its own thread, outside that mode (gloo
    in torch 2.4: "Inplace update to inference tensor outside InferenceMode"); the
    collectives here therefore allocate and pass normal tensors (call under
    ``torch.inference_mode(False)``)."""
    return t.clone() if t.is_inference() else t


def _all_gather_stacked(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (at least 1-D, the same shape on every rank) stacked: W x t.shape, in rank order."""
    world = _CONTEXT.world_size
    with torch.inference_mode(False):
        t = _outside_inference(t).contiguous()
        if _CONTEXT.backend == "nccl":  # one buffer, NCCL's native all-gather
            out = t.new_empty((world * t.shape[0],) + tuple(t.shape[1:]))
            dist.all_gather_into_tensor(out, t)
            return out.view((world,) + tuple(t.shape))
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        return torch.stack(parts)


def gather_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's part (sizes :func:`chunk_sizes` of ``n``), concatenated in rank order.

    Collectives need equal shapes: each part is padded to the largest and trimmed after."""
    c = _CONTEXT
    if not c.enabled:
        return t
    sizes = chunk_sizes(n, c.world_size)
    if t.shape[0] != sizes[c.rank]:
        raise RuntimeError(f"rank {c.rank} holds {t.shape[0]} rows, expected {sizes[c.rank]} of {n}")
    gathered = _all_gather_stacked(_padded(t, max(sizes)))
    return torch.cat([part[:s] for part, s in zip(gathered, sizes)])


def _all_gather_autograd(t: torch.Tensor) -> torch.Tensor:
    """All ranks' equal-shaped ``t`` stacked along dim 0 (W*rows), differentiable: the
    backward gives each rank the sum over ranks of the gradients of its rows."""
    t = t.contiguous()
    try:
        from torch.distributed._functional_collectives import all_gather_single_autograd
    except ImportError:  # pragma: no cover - older torch (2.4): the (now deprecated) public one
        import torch.distributed.nn.functional as dist_nn
        # the group passed explicitly: the function's default is the WORLD group of the time it
        # was imported, which a later init_process_group replaces
        return torch.cat(dist_nn.all_gather(t, group=dist.group.WORLD))
    return all_gather_single_autograd(t, 0, dist.group.WORLD)


def gather_rows_autograd(t: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`gather_rows` through which gradients flow back to each rank's own rows
    (the backward sums every rank's gradient of its copy: see the module docstring)."""
    c = _CONTEXT
    if not c.enabled:
        return t
    sizes = chunk_sizes(n, c.world_size)
    rows = max(sizes)
    gathered = _all_gather_autograd(_padded(t, rows))
    return torch.cat([gathered[r * rows:r * rows + s] for r, s in enumerate(sizes)])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks: in place, or in a normal copy of an inference tensor (see
    :func:`_outside_inference`); use the returned tensor."""
    if _CONTEXT.enabled:
        with torch.inference_mode(False):
            t = _outside_inference(t)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on at least one (e.g. a Ctrl-C seen by one rank)."""
    c = _CONTEXT
    if not c.enabled:
        return flag
    device = torch.device("cuda", c.local_rank) if c.backend == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    c = _CONTEXT
    if c.enabled:
        if c.backend == "nccl":
            dist.barrier(device_ids=[c.local_rank])
        else:
            dist.barrier()


def agree(value: Any, what: str) -> Any:
    """Check that every rank computed the same (picklable, small) ``value``; returns it.

    Used for decisions each rank takes from files (resume or not, from which epoch):
    ranks that disagree usually do not share the run directory."""
    c = _CONTEXT
    if not c.enabled:
        return value
    values: list = [None] * c.world_size
    dist.all_gather_object(values, (socket.gethostname(), value))
    host0, first = values[0]
    for rank, (host, v) in enumerate(values):
        if v != first:
            from utils.errors import RunDirError
            raise RunDirError(f"{what}: rank 0 on {host0} has {first!r} but rank {rank} on {host} has {v!r}; "
                              "every node must see the same run directory (a shared filesystem) and the "
                              "same config")
    return value


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's module."""
    if not _CONTEXT.enabled:
        return
    for t in list(module.state_dict(keep_vars=True).values()):
        data = t.data if isinstance(t, nn.Parameter) else t
        dist.broadcast(data, src=src)


# ---------------------------------------------------------------------------
# The model under DistributedDataParallel
# ---------------------------------------------------------------------------

class FeaturesAndLogits(nn.Module):
    """``(features, logits)`` in one forward: what DDP wraps (it must see the forward call)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return features_and_logits(self.model, x)  # the classifier in fp32, as FastPath.forward does


def wrap_ddp(model: nn.Module, device: torch.device, sync_bn: bool):
    """DistributedDataParallel over :class:`FeaturesAndLogits` of ``model`` (whose
    ``requires_grad`` flags must already say what trains).

    With synchronised BatchNorm the running statistics are equal on every rank by
    construction and are not broadcast; without, rank 0's are broadcast before every
    forward so that evaluation sees one set of statistics."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # the option's name changed in torch 2.14 (broadcast_buffers is deprecated there)
    sync_name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                 else "broadcast_buffers")
    return DistributedDataParallel(FeaturesAndLogits(model), device_ids=ids, output_device=ids[0] if ids else None,
                                   **{sync_name: not sync_bn})


# ---------------------------------------------------------------------------
# BatchNorm over the global batch
# ---------------------------------------------------------------------------

class _GlobalBatchStats:
    """Mixin for any ``_BatchNorm`` subclass: in training mode under a process group,
    normalise with the mean and variance of the whole global batch.

    Each rank computes its part's per-channel mean and spread; the parts are
    all-gathered and combined with the parallel-variance formula (weighted by each
    part's count, so a rank without samples in the last batch contributes nothing);
    the running statistics are updated as ``F.batch_norm`` does (unbiased variance,
    ``momentum`` or the cumulative average).  Eval mode and runs without a process
    group use the class's own forward.  The effective per-channel scale and shift
    come from ``affine_params()`` when the module has one (OneParamBN).

    Two implementations of the same formula, chosen by the input's device:

    * CUDA: :class:`_FusedGlobalBatchNorm`, torch's own SyncBatchNorm kernels, which
      read bf16/fp16 activations directly and accumulate in float32 (no float32 copy
      of the activation is kept for backward);
    * anywhere else: :func:`_composed_global_batch_norm`, plain differentiable tensor
      operations in float32 (the kernels above exist for CUDA only).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not (self.training and _CONTEXT.enabled):
            return super().forward(x)  # type: ignore[misc]
        return self.global_batch_forward(x, fused=x.is_cuda)

    def global_batch_forward(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        """Training-mode forward over the global batch, with either implementation
        (the device check runs both on the same CUDA input)."""
        momentum = self._count_batch()
        weight, bias = self.affine_params() if hasattr(self, "affine_params") else (self.weight, self.bias)
        tracked = self.track_running_stats and self.running_mean is not None
        running_mean, running_var = (self.running_mean, self.running_var) if tracked else (None, None)
        if fused:
            return _fused_global_batch_norm(x, weight, bias, running_mean, running_var, momentum, self.eps)
        return _composed_global_batch_norm(x, weight, bias, running_mean, running_var, momentum, self.eps)

    def _count_batch(self) -> float:
        """Counts this training batch; returns the running statistics' update factor."""
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # the cumulative average (a host read, as torch's BatchNorm does)
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum


def _composed_global_batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                                momentum: float, eps: float) -> torch.Tensor:
    """Global-batch BatchNorm from differentiable tensor operations, in float32.

    Each rank's (mean, biased variance, count) are all-gathered through autograd, so
    the backward needs no code of its own."""
    channels = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    xf = x.float()
    count = x.numel() // max(channels, 1)
    if count > 0:
        var, mean = torch.var_mean(xf, dim=dims, correction=0)
    else:  # a rank without samples in the last, small batch contributes nothing
        var = mean = xf.new_zeros(channels) + 0 * xf.sum()
    stats = torch.cat([mean, var, xf.new_full((1,), float(count))])
    gathered = _all_gather_autograd(stats).view(_CONTEXT.world_size, -1)  # W x (2C + 1)
    means, variances, counts = gathered[:, :channels], gathered[:, channels:2 * channels], gathered[:, -1:]
    total = counts.sum()  # > 1: the batches never hold a single sample (utils.train.batch_slices)
    g_mean = (counts * means).sum(0) / total
    g_var = (counts * (variances + (means - g_mean) ** 2)).sum(0) / total
    if running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(g_mean.detach(), alpha=momentum)
            unbiased = g_var.detach() * (total / (total - 1).clamp_min(1))
            running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
    scale = torch.rsqrt(g_var + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -g_mean * scale
    if bias is not None:
        shift = shift + bias.float()
    shape = [1, channels] + [1] * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), xf, scale.view(shape)).to(x.dtype)


# torch's SyncBatchNorm kernels (CUDA only).  Their contracts, as torch/nn/modules/_functions.py
# uses them (C channels, statistics in float32 for bf16/fp16/fp32 input):
#   stats(x, eps) -> (mean, invstd) of this rank's part, per channel;
#   combine(dtype_source, means, invstds, running_mean, running_var, momentum, eps, counts) -> (mean,
#       invstd) of the whole batch from every rank's W x C statistics and W counts (a parallel-variance
#       combination, in rank order), updating the running statistics in place (unbiased variance);
#       the counts come in the running statistics' dtype, or without them in dtype_source's;
#   normalize(x, weight, bias, mean, invstd, eps) -> (x - mean) * invstd * weight + bias, x's dtype;
#   backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g)
#       -> (sum dy, sum dy * (x - mean), grad weight, grad bias) over this rank's part;
#   backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts) -> grad x, with the
#       sums over the whole batch and the int32 per-rank counts (whose total is the batch's count).
# A module attribute, so that tests can put reference implementations of the same contracts in
# its place and run the bookkeeping below on a CPU.
_FUSED_KERNELS = SimpleNamespace(stats=torch.batch_norm_stats, combine=torch.batch_norm_gather_stats_with_counts,
                                 normalize=torch.batch_norm_elemt, backward_reduce=torch.batch_norm_backward_reduce,
                                 backward_elemt=torch.batch_norm_backward_elemt)


def _kernel_layout(t: torch.Tensor) -> torch.memory_format:
    """The layout the kernels get ``t`` in: channels_last as it comes, else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _FusedGlobalBatchNorm(torch.autograd.Function):
    """Global-batch BatchNorm with torch's SyncBatchNorm kernels (``_FUSED_KERNELS``).

    Forward: one all-gather of every rank's (mean, invstd, count); backward: one
    all-reduce of the per-channel sums of dy and dy * (x - mean).  The gradients of
    the scale and shift are this rank's part only; DDP's all-reduce adds the rest."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float):  # type: ignore[override]
        k = _FUSED_KERNELS
        ctx.layout = _kernel_layout(x)
        x = x.contiguous(memory_format=ctx.layout)
        channels = x.shape[1]
        count = x.numel() // channels
        stat_dtype = torch.promote_types(x.dtype, torch.float32)  # the kernels' accumulation type
        if count > 0:
            mean, invstd = k.stats(x, eps)
        else:
            # A rank without samples (only the last ranks can be: utils.distributed.chunk_sizes
            # gives the first ranks the extra rows) sends count 0; invstd 1 keeps the combining
            # kernel's 1 / invstd finite, so the part adds exactly 0 to every sum.
            mean = torch.zeros(channels, dtype=stat_dtype, device=x.device)
            invstd = torch.ones(channels, dtype=stat_dtype, device=x.device)
        local = torch.cat([mean, invstd, mean.new_full((1,), float(count))])
        gathered = _all_gather_stacked(local)  # W x (2C + 1)
        means, invstds = gathered[:, :channels], gathered[:, channels:2 * channels]
        counts = gathered[:, -1]
        # The statistics select the dtype of the counts when there are no running statistics (torch's
        # SyncBatchNorm passes x, whose bf16 would round counts beyond 256).
        counts_dtype = running_mean.dtype if running_mean is not None else stat_dtype
        g_mean, g_invstd = k.combine(means, means, invstds, running_mean, running_var, momentum, eps,
                                     counts.to(counts_dtype))
        ctx.save_for_backward(x, weight, g_mean, g_invstd, counts.to(torch.int32))
        if count == 0:
            return torch.empty_like(x)
        return k.normalize(x, weight, bias, g_mean, g_invstd, eps)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        k = _FUSED_KERNELS
        x, weight, mean, invstd, counts = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        channels = x.shape[1]
        grad_x = grad_weight = grad_bias = None
        affine = weight is not None  # the kernel sizes both parameter gradients like weight
        if x.numel() > 0:
            # in x's layout: the channels_last backward kernel reads both in the layout of grad_out
            grad_out = grad_out.contiguous(memory_format=ctx.layout)
            sum_dy, sum_dy_xmu, grad_weight, grad_bias = k.backward_reduce(
                grad_out, x, mean, invstd, weight, needs_x, needs_weight and affine, needs_bias and affine)
        else:
            sum_dy = sum_dy_xmu = torch.zeros(channels, dtype=mean.dtype, device=x.device)
        if needs_x:  # the same on every rank (the same model), so every rank joins the all-reduce
            sums = torch.cat([sum_dy, sum_dy_xmu])
            sums = all_reduce_sum(sums)
            sum_dy, sum_dy_xmu = sums[:channels], sums[channels:]
            if x.numel() > 0:
                grad_x = k.backward_elemt(grad_out, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts)
            else:
                grad_x = torch.zeros_like(x)
        return (grad_x, grad_weight if needs_weight else None, grad_bias if needs_bias else None,
                None, None, None, None)


@torch.compiler.disable
def _fused_global_batch_norm(x, weight, bias, running_mean, running_var, momentum: float, eps: float):
    # eager even inside a compiled forward: collectives and in-place buffer updates in a
    # custom autograd Function are not something to trace
    return _FusedGlobalBatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps)


_SYNCED_CLASSES: dict[type, type] = {}


def _synced_class(cls: type) -> type:
    if cls not in _SYNCED_CLASSES:
        _SYNCED_CLASSES[cls] = type(f"GlobalBatch{cls.__name__}", (_GlobalBatchStats, cls),
                                    {"__module__": __name__, "__doc__": f"{cls.__name__} with global-batch statistics."})
    return _SYNCED_CLASSES[cls]


def convert_sync_batchnorm(model: nn.Module) -> int:
    """Give every BatchNorm of ``model`` global-batch statistics in training; returns how many.

    The modules keep their class as a base (``isinstance(m, nn.BatchNorm2d)`` still
    holds, so the parameter groups by module type are unchanged), their parameters,
    buffers and state-dict keys: checkpoints are interchangeable with single-process
    runs.  torch's own ``nn.SyncBatchNorm`` module is not used (its kernels are, on
    CUDA): it runs on GPUs only and replaces the module types the parameter groups
    are built from."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _GlobalBatchStats):
            module.__class__ = _synced_class(type(module))
            n += 1
    return n
