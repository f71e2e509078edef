"""Several processes, one run: torchrun + DistributedDataParallel helpers.

``torchrun --nproc_per_node=N first.py ...`` starts N copies of the script with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in their environment.  :func:`setup` joins
them into one process group (NCCL on CUDA, gloo on CPU); without torchrun (or with
one process) nothing is initialised and every helper here is the identity, so a
single process runs exactly the code it always ran.

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
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from utils.accel import features_and_logits

__all__ = ["Dist", "context", "setup", "teardown", "chunk_bounds", "chunk_sizes", "gather_rows",
           "gather_rows_autograd", "all_reduce_sum", "any_rank", "barrier", "broadcast_module",
           "convert_sync_batchnorm", "agree", "FeaturesAndLogits"]


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (f"{self.world_size} processes ({self.backend}, {self.world_size // max(self.local_world_size, 1)} "
                f"node(s) x {self.local_world_size})")


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


def setup(device_name: str, timeout_s: float = 1800.0) -> Dist:
    """Join torchrun's process group, once per process; returns the context.

    The backend follows the device: NCCL when the run uses CUDA (``auto`` with a GPU,
    ``cuda``), gloo on CPU.  Each rank uses the GPU of its ``LOCAL_RANK``.
    """
    global _CONTEXT
    if _CONTEXT.enabled or launched_world_size() <= 1:
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


def gather_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's part (sizes :func:`chunk_sizes` of ``n``), concatenated in rank order.

    Collectives need equal shapes: each part is padded to the largest and trimmed after."""
    c = _CONTEXT
    if not c.enabled:
        return t
    sizes = chunk_sizes(n, c.world_size)
    if t.shape[0] != sizes[c.rank]:
        raise RuntimeError(f"rank {c.rank} holds {t.shape[0]} rows, expected {sizes[c.rank]} of {n}")
    parts = [torch.empty((max(sizes),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
             for _ in sizes]
    dist.all_gather(parts, _padded(t, max(sizes)))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def _all_gather_autograd(t: torch.Tensor) -> torch.Tensor:
    """All ranks' equal-shaped ``t`` stacked along dim 0 (W*rows), differentiable: the
    backward gives each rank the sum over ranks of the gradients of its rows."""
    t = t.contiguous()
    try:
        from torch.distributed._functional_collectives import all_gather_single_autograd
    except ImportError:  # pragma: no cover - older torch: the (now deprecated) public one
        import torch.distributed.nn.functional as dist_nn
        return torch.cat(dist_nn.all_gather(t))
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
    """The sum over ranks (in place; returned for chaining)."""
    if _CONTEXT.enabled:
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

    Each rank computes its part's mean and (biased) variance in float32; the parts
    are all-gathered (differentiably) and combined with the parallel-variance
    formula; the running statistics are updated as ``F.batch_norm`` does (unbiased
    variance, ``momentum`` or the cumulative average).  Eval mode and single
    processes use the class's own forward.  The effective per-channel scale and
    shift come from ``affine_params()`` when the module has one (OneParamBN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not (self.training and _CONTEXT.enabled):
            return super().forward(x)  # type: ignore[misc]
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
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(g_mean.detach(), alpha=factor)
                unbiased = g_var.detach() * (total / (total - 1).clamp_min(1))
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        scale = torch.rsqrt(g_var + self.eps)
        weight, bias = self.affine_params() if hasattr(self, "affine_params") else (self.weight, self.bias)
        if weight is not None:
            scale = scale * weight.float()
        shift = -g_mean * scale
        if bias is not None:
            shift = shift + bias.float()
        shape = [1, channels] + [1] * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), xf, scale.view(shape)).to(x.dtype)


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
    runs.  torch's own ``nn.SyncBatchNorm`` is not used: it runs on GPUs only and
    replaces the module types the parameter groups are built from."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _GlobalBatchStats):
            module.__class__ = _synced_class(type(module))
            n += 1
    return n
