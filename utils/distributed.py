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
* BatchNorm statistics are computed over the global batch (utils/engine/ddp.py);
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
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from utils.errors import ConfigError, RunDirError

__all__ = ["Dist", "context", "setup", "teardown", "chunk_bounds", "chunk_sizes", "gather_rows",
           "gather_rows_autograd", "all_gather_stacked", "all_gather_autograd", "all_reduce_sum", "any_rank",
           "barrier", "broadcast_module", "agree", "FORCE_ENV"]

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
    world = launched_world_size()
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


def all_gather_stacked(t: torch.Tensor) -> torch.Tensor:
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
    gathered = all_gather_stacked(_padded(t, max(sizes)))
    return torch.cat([part[:s] for part, s in zip(gathered, sizes)])


def all_gather_autograd(t: torch.Tensor) -> torch.Tensor:
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
    gathered = all_gather_autograd(_padded(t, rows))
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
