"""Reference implementations, in plain tensor operations, of the five CUDA kernels that
utils/distributed.py's fused global-batch BatchNorm calls (``_FUSED_KERNELS``).

Each follows the contract written beside ``_FUSED_KERNELS`` (and torch's CUDA source,
aten/src/ATen/native/cuda/Normalization.cuh): statistics in float32, the combination
over ranks weighted by counts, the sums of the backward over this rank's part.  Put in
place of the CUDA kernels, they let a CPU run the fused path's bookkeeping (the
collectives, the empty rank, the counts, the gradients of the affine parameters).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch


def _dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view([1, -1] + [1] * (x.dim() - 2))


def stats(x, eps):
    var, mean = torch.var_mean(x.float(), dim=_dims(x), correction=0)
    return mean, torch.rsqrt(var + eps)


def combine(selector, means, invstds, running_mean, running_var, momentum, eps, counts):
    counts = counts.float()[:, None]
    total = counts.sum()
    # as the CUDA kernel: a part of count 0 adds 0 only if its placeholders are finite (1 / invstd)
    variances = 1 / invstds ** 2 - eps
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(momentum * mean)
        running_var.mul_(1 - momentum).add_(momentum * var * total / (total - 1))
    return mean, torch.rsqrt(var + eps)


def normalize(x, weight, bias, mean, invstd, eps):
    y = (x.float() - _channel(mean, x)) * _channel(invstd, x)
    if weight is not None:
        y = y * _channel(weight.float(), x)
    if bias is not None:
        y = y + _channel(bias.float(), x)
    return y.to(x.dtype)


def backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
    dy = dy.float()
    sum_dy = dy.sum(_dims(x))
    sum_dy_xmu = (dy * (x.float() - _channel(mean, x))).sum(_dims(x))
    return (sum_dy if input_g else None, sum_dy_xmu if input_g else None,
            (sum_dy_xmu * invstd).to(weight.dtype) if weight_g else None,
            sum_dy.to(weight.dtype) if bias_g else None)


def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts):
    total = counts.sum().float()
    scale = invstd * (weight.float() if weight is not None else 1)
    centred = x.float() - _channel(mean, x)
    grad = (dy.float() - _channel(sum_dy / total, x)
            - centred * _channel(invstd ** 2 * sum_dy_xmu / total, x)) * _channel(scale, x)
    return grad.to(x.dtype)


KERNELS = SimpleNamespace(stats=stats, combine=combine, normalize=normalize, backward_reduce=backward_reduce,
                          backward_elemt=backward_elemt)
