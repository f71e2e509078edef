"""The distributed code on one device, in a process group of one process (WB_FORCE_DISTRIBUTED).

    python bench/dist_check.py --device cuda   # NCCL and torch's SyncBatchNorm kernels (what a GPU run uses)
    python bench/dist_check.py --device cpu    # gloo, tests/bn_kernels.py in the kernels' place (CI-sized)

Rows (PASS/FAIL and a figure each):

* global-batch BatchNorm, the fused path (utils/distributed.py ``_FusedGlobalBatchNorm``)
  against the composed one on the same input, forward and backward: the largest
  difference of the outputs, the input gradients, the affine gradients and the running
  statistics, relative to the largest magnitude of the composed result.  Tolerance 1e-4
  for float32 inputs (the two accumulate the same sums in float32 in different orders:
  about 1e-6 measured on CPU), 2e-2 for bfloat16 inputs (both round their results to
  bfloat16, 2^-9 relative, and the input gradient goes through a few such roundings);
* under bfloat16, the peak memory and the time of a forward + backward of each path on
  CUDA (the fused one keeps no float32 copy of the activation);
* the collectives of a run (gathers, ``agree``, ``any_rank``, ``barrier``) under the backend;
* an evaluation batch of no rows (what a process with an empty shard runs) through a
  ResNet34 in eval mode, under bf16 autocast and channels_last on CUDA.

``batchnorm_rows`` and ``collective_rows`` can be called by another check inside its own
process group; ``main`` makes one.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from utils.engine import ddp as global_bn  # noqa: E402
from utils import distributed as ddp  # noqa: E402

Row = tuple[str, bool, str]


def _cases(device: torch.device):
    from models.backbone_options import OneParamBN

    big = device.type == "cuda"
    n, c, side = (64, 64, 32) if big else (6, 8, 5)
    yield "BatchNorm2d fp32", nn.BatchNorm2d(c), (n, c, side, side), torch.float32, False
    yield "BatchNorm2d fp32 channels_last", nn.BatchNorm2d(c), (n, c, side, side), torch.float32, True
    yield "BatchNorm2d bf16 channels_last", nn.BatchNorm2d(c), (n, c, side, side), torch.bfloat16, True
    yield "BatchNorm2d bf16 channels_last, contiguous gradient", nn.BatchNorm2d(c), (n, c, side, side), \
        torch.bfloat16, "input only"
    yield "BatchNorm1d fp32", nn.BatchNorm1d(4 * c), (n, 4 * c), torch.float32, False
    yield "OneParamBN fp32 channels_last", OneParamBN(c), (n, c, side, side), torch.float32, True


def _pass(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, fused: bool) -> dict:
    m = copy.deepcopy(module).train()
    xi = x.clone().requires_grad_()
    y = m.global_batch_forward(xi, fused=fused)
    (y.float() * dy.float()).sum().backward()
    return {"output": y.detach(), "input grad": xi.grad, "weight grad": m.weight.grad, "bias grad": m.bias.grad,
            "running mean": m.running_mean, "running var": m.running_var}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.float().abs().max().clamp_min(1e-30)
    return float((a.float() - b.float()).abs().max() / scale)


def _peak_and_time(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, fused: bool) -> tuple[float, float]:
    """(peak MiB above the inputs, ms) of one forward + backward on CUDA."""
    _pass(module, x, dy, fused)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(10):
        _pass(module, x, dy, fused)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20, (time.perf_counter() - start) * 100


def batchnorm_rows(device: torch.device) -> list[Row]:
    """Fused against composed global-batch BatchNorm (needs a process group: ddp.setup)."""
    rows: list[Row] = []
    torch.manual_seed(0)
    for name, module, shape, dtype, channels_last in _cases(device):
        module = module.to(device)
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)
        global_bn.convert_sync_batchnorm(module)
        x = (3 * torch.randn(shape, device=device) + 1).to(dtype)
        dy = torch.randn(shape, device=device).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if channels_last is True:
            dy = dy.contiguous(memory_format=torch.channels_last)
        fused, composed = _pass(module, x, dy, True), _pass(module, x, dy, False)
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        worst = {key: _relative(fused[key], composed[key]) for key in composed}
        key = max(worst, key=worst.get)
        layout_kept = fused["output"].is_contiguous(memory_format=torch.channels_last) == bool(channels_last)
        rows.append((f"global-batch BN fused = composed: {name}", max(worst.values()) <= tolerance and layout_kept,
                     f"max rel diff {worst[key]:.1e} ({key}; tol {tolerance:g})"
                     + ("" if layout_kept else "; output layout changed")))
        if device.type == "cuda" and dtype == torch.bfloat16:
            (peak_f, ms_f), (peak_c, ms_c) = (_peak_and_time(module, x, dy, f) for f in (True, False))
            rows.append((f"global-batch BN memory and time: {name}", peak_f <= peak_c,
                         f"fused {peak_f:.0f} MiB {ms_f:.2f} ms, composed {peak_c:.0f} MiB {ms_c:.2f} ms"))
    return rows


def collective_rows(device: torch.device) -> list[Row]:
    """The run's collectives and an empty evaluation batch on ``device`` (needs ddp.setup)."""
    from models import build_model

    rows: list[Row] = []
    t = torch.arange(12.0, device=device).reshape(6, 2)
    try:
        same = torch.equal(ddp.gather_rows(t, 6), t) and torch.equal(ddp.gather_rows_autograd(t, 6), t)
        same = same and ddp.agree(("x", 1), "check") == ("x", 1) and ddp.any_rank(True) and not ddp.any_rank(False)
        ddp.barrier()
        rows.append((f"collectives ({ddp.context().backend})", same, "gather_rows(_autograd), agree, any_rank, barrier"))
    except Exception as exc:  # noqa: BLE001 - a row, not a crash
        rows.append((f"collectives ({ddp.context().backend})", False, f"{type(exc).__name__}: {exc}"[:200]))
    model = build_model("ResNet34", 100).to(device).eval()
    x = torch.zeros(1, 3, 32, 32, device=device)[:0]
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            h = model.features(x)
            logits = model.classify(h)
        rows.append(("evaluation batch of no rows (an empty shard)", tuple(h.shape) == (0, 512)
                     and tuple(logits.shape) == (0, 100), f"features {tuple(h.shape)}, logits {tuple(logits.shape)}"))
    except Exception as exc:  # noqa: BLE001
        rows.append(("evaluation batch of no rows (an empty shard)", False, f"{type(exc).__name__}: {exc}"[:200]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    os.environ[ddp.FORCE_ENV] = "1"
    ddp.setup(args.device)
    try:
        if device.type != "cuda":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from bn_kernels import KERNELS
            global_bn._FUSED_KERNELS = KERNELS  # the CUDA kernels' contracts in tensor operations
        rows = batchnorm_rows(device) + collective_rows(device)
    finally:
        ddp.teardown()
    width = max(len(name) for name, _, _ in rows)
    for name, ok, figure in rows:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<{width}}  {figure}")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
