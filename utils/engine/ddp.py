"""The model under several processes: DistributedDataParallel around the forward, and
BatchNorm whose training statistics are those of the global batch.

Both keep the single-process semantics of utils/distributed.py: one process with the global
batch.  Without a process group nothing here changes the model or the forward.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from utils import distributed
from utils.engine.accel import features_and_logits

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
        if not (self.training and distributed.context().enabled):
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
    gathered = distributed.all_gather_autograd(stats).view(distributed.context().world_size, -1)  # W x (2C + 1)
    means, variances, counts = gathered[:, :channels], gathered[:, channels:2 * channels], gathered[:, -1:]
    total = counts.sum()  # > 1: the batches never hold a single sample (utils.data.batches.batch_slices)
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
        gathered = distributed.all_gather_stacked(local)  # W x (2C + 1)
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
            sums = distributed.all_reduce_sum(sums)
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
