"""Finding host synchronisations in training steps.

A training step on a GPU should only queue work: anything that makes the host wait for the
device (reading a value back, an output whose size depends on the data) stalls the queue
and costs a full round trip per step.  Two ways to see them:

* on CUDA, torch's own ``torch.cuda.set_sync_debug_mode`` reports every synchronising call;
* on any device, :class:`HostReads` records the aten operators that need the device's data
  on the host: ``.item()`` / ``int()`` / ``float()`` / ``bool()`` of a tensor
  (``_local_scalar_dense``), ``nonzero``, indexing with a boolean mask, ``bincount``,
  ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``, ``equal``.
  On the CPU nothing waits, but the same code would on CUDA, so a CPU test can catch a
  reintroduced one.  It cannot see a ``.cpu()`` copy (a no-op between CPU tensors).

:func:`syncs_in_steps` runs a few steps of :func:`utils.engine.train.train_step` under either and
returns what it found (tests/test_host_syncs.py; the device check).
"""
from __future__ import annotations

import contextlib
import itertools
import traceback
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten operators whose result (or output size) the host must read from the device
READ_BACK_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "masked_select", "bincount", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "equal", "is_nonzero",
})
_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
_ROOT = Path(__file__).resolve().parents[2]  # the checkout (this file is utils/engine/host_syncs.py)


def _mask_index(args) -> bool:
    """Whether an indexing operator got a boolean (or uint8) mask among its indices."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


def _project_caller() -> str:
    """file:line of the innermost frame in this project's code (not this file)."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if _ROOT in path.parents and path != Path(__file__).resolve():
            return f"{path.relative_to(_ROOT)}:{frame.lineno} ({frame.line})"
    return "outside the project"


class HostReads(TorchDispatchMode):
    """Records (operator, where) for every operator run while active that reads device data back."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_back(func, args, kwargs):
            self.found.append((func.overloadpacket.__name__, _project_caller()))
        return func(*args, **kwargs)


def _reads_back(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in READ_BACK_OPS:
        return True
    if name in _INDEX_OPS:
        return _mask_index(args)
    if name == "repeat_interleave":  # repeats given as a tensor: the output size is their sum
        return func._overloadname != "self_int" and kwargs.get("output_size") is None
    return False


@contextlib.contextmanager
def cuda_sync_warnings(mode: str = "warn"):
    """Yields a list that receives the message of every synchronising CUDA call made inside
    (``mode="error"`` raises at the first one instead)."""
    previous = torch.cuda.get_sync_debug_mode()
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield messages
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    messages.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))


def syncs_in_steps(model, split, state, steps: int = 3, warmup: int = 2, mode: Optional[str] = None) -> list:
    """What made the host wait during ``steps`` training steps after ``warmup`` (which lets
    cuDNN's autotuner and the first allocations happen outside).

    Each step is the training loop's own: the augmented batch (drawn and copied inside the
    watched region), :func:`utils.engine.train.train_step` and the epoch's accumulation.  On CUDA:
    the messages of ``torch.cuda.set_sync_debug_mode`` (``mode`` "warn" by default, "error"
    to raise); elsewhere: :class:`HostReads`' (operator, where) pairs.
    """
    from utils.engine.train import EpochTotals, train_batches, train_step

    state.set_train_mode(model)
    n_batches, batches = train_batches(split, state, warmup + steps)
    if n_batches < warmup + steps:
        raise ValueError(f"the split has {n_batches} batches, fewer than warmup + steps = {warmup + steps}")
    totals = EpochTotals(len(split), n_batches, state.n_classes, split.labels.device)
    numbered = enumerate(batches, start=1)

    def run(n):
        for step, (x, y, idx) in itertools.islice(numbered, n):
            loss, terms, logits = train_step(model, state, x, y)
            totals.add(step, loss, terms, logits, y, idx)

    run(warmup)
    if split.labels.device.type == "cuda":
        torch.cuda.synchronize()
        with cuda_sync_warnings(mode or "warn") as found:
            run(steps)
        return found
    with HostReads() as reads:
        run(steps)
    return reads.found
