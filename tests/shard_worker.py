"""Global-batch BatchNorm and sharded evaluation when a rank gets no samples, for
tests/test_distributed.py (three processes, gloo):

    RANK=r WORLD_SIZE=3 ... python tests/shard_worker.py OUT

1. BatchNorm2d (2 and 7 rows), BatchNorm1d and OneParamBN over a global batch split
   1 + 1 + 0 (or 3 + 2 + 2) rows, with both implementations of the mixin: the composed
   one and the fused one with tests/bn_kernels.py in place of the CUDA kernels.  Each
   rank's loss is sum(dy * y) over its own rows, so the global loss is their sum.
2. ``evaluate`` and ``extract_features`` of a ResNet18 on a split of 2 images, which
   leaves the third rank's shard empty.

Rank 0 saves the gathered results and the one-process reference (``torch.save``).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models import build_model  # noqa: E402
from models.backbone_options import OneParamBN  # noqa: E402
from tests.bn_kernels import KERNELS  # noqa: E402
from utils.engine import ddp as global_bn  # noqa: E402
from utils import distributed as ddp  # noqa: E402
from utils.data.augment import BatchAugment  # noqa: E402
from utils.engine.evaluation import extract_features  # noqa: E402
from utils.data.batches import SplitTensors  # noqa: E402
from utils.engine.evaluation import evaluate  # noqa: E402

CASES = {"bn2d": (lambda: nn.BatchNorm2d(4), (2, 4, 3, 3)),
         "bn2d_7": (lambda: nn.BatchNorm2d(4), (7, 4, 3, 3)),
         "bn1d": (lambda: nn.BatchNorm1d(5), (2, 5)),
         "one_param": (lambda: OneParamBN(4), (2, 4, 3, 3))}


def _batchnorm_pass(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, fused) -> dict:
    """Training-mode forward and backward; ``fused`` None: the module itself, in one process."""
    m = copy.deepcopy(module).train()
    if fused is None:
        part, rows = x.clone().requires_grad_(), None
    else:
        global_bn.convert_sync_batchnorm(m)
        rows = x.shape[0]
        lo, hi = ddp.my_bounds(rows)
        part = x[lo:hi].clone().requires_grad_()
    y = m(part) if fused is None else m.global_batch_forward(part, fused=fused)
    (y * (dy if fused is None else dy[lo:hi])).sum().backward()

    def summed(grad):  # each rank holds the gradient of its own rows' loss
        grad = grad.clone() if grad is not None else torch.zeros_like(m.weight)
        return grad if fused is None else ddp.all_reduce_sum(grad)

    gathered = (lambda t: t) if fused is None else (lambda t: ddp.gather_rows(t, rows))
    dx = part.grad if part.grad is not None else torch.zeros_like(part)
    return {"y": gathered(y.detach()), "dx": gathered(dx), "dw": summed(m.weight.grad), "db": summed(m.bias.grad),
            "running_mean": m.running_mean.clone(), "running_var": m.running_var.clone(),
            "batches": m.num_batches_tracked.clone()}


def main(out: str) -> None:
    ddp.setup("cpu")
    global_bn._FUSED_KERNELS = KERNELS  # the CUDA kernels' contracts, in tensor operations (tests/bn_kernels.py)
    torch.manual_seed(0)  # the same inputs and weights on every rank
    results: dict = {"world_size": torch.tensor(ddp.context().world_size)}
    for name, (make, shape) in CASES.items():
        module = make()
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)
        x, dy = torch.randn(shape) * 2 + 0.5, torch.randn(shape)
        results[name] = {path: _batchnorm_pass(module, x, dy, fused)
                         for path, fused in (("composed", False), ("fused", True))}
        results[name]["reference"] = _batchnorm_pass(module, x, dy, None)
    model = build_model("ResNet18", 3, in_channels=1, small_input=True)
    split = SplitTensors(torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8), torch.tensor([2, 0]))
    augment = BatchAugment([0.5], [0.25], 0, False)
    result = evaluate(model, split, augment, 3, 4, want_features=True, want_preds=True)
    feats = extract_features(model, split, augment, 4, hflip=True)
    results["eval"] = {"counts": result.counts, "preds": result.preds, "features": result.features,
                       "plain": feats.plain, "flipped": feats.flipped}
    if ddp.context().is_main:
        model.eval()
        with torch.no_grad():
            x = augment.eval(split.images)
            h = model.features(x)
            results["eval_reference"] = {"preds": model.classify(h).argmax(1), "plain": h,
                                         "flipped": model.features(x.flip(3))}
        torch.save(results, out)
    ddp.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
