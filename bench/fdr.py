"""Time Fisher's discriminant ratio (utils/engine/metrics.py) against the formula it replaced.

    python bench/fdr.py                      # D = 512 (ResNet34, CIFAR-100-LT train) and 2048 (ResNeXt50, ImageNet-LT val)
    python bench/fdr.py --threads 1 2 --repeat 3

"before": S_B and S_W explicitly, ``torch.linalg.matrix_rank`` (an SVD), then ``solve`` or
``pinv``; "after": one ``torch.linalg.eigh`` of S_W for the rank cut and the inverse.  Both in
float64 on the CPU, on random features of the given shape; prints seconds (median of
``--repeat``) per shape and thread count, and the two values (equal to 1e-9 relatively).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils.engine.metrics import fisher_discriminant_ratio  # noqa: E402

SHAPES = {512: (10_847, 100), 2048: (20_000, 1000)}  # D: (N, K)


def fdr_before(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> float:
    """utils/engine/metrics.py's fisher_discriminant_ratio before this change, as it was."""
    feats = features.double()
    labels = labels.long().to(feats.device)
    tol = feats.mean().abs() * 1e-3
    varying = ((feats - feats[:1]).abs() > tol).any(dim=0)
    feats = feats[:, varying]
    if feats.shape[1] == 0:
        return float("nan")
    counts = torch.bincount(labels, minlength=n_classes).double()
    sums = torch.zeros(n_classes, feats.shape[1], dtype=torch.float64, device=feats.device)
    sums.index_add_(0, labels, feats)
    present = counts > 0
    class_means = torch.zeros_like(sums)
    class_means[present] = sums[present] / counts[present, None]
    overall = feats.mean(dim=0)
    between = class_means[present] - overall
    s_b = (between.T * counts[present]) @ between
    centred = feats - class_means[labels]
    s_w = centred.T @ centred
    zero_rows = (s_w.abs() <= tol).all(dim=0)
    if zero_rows.any():
        keep = ~zero_rows
        s_w = s_w[keep][:, keep]
        s_b = s_b[keep][:, keep]
    if int(torch.linalg.matrix_rank(s_w)) == s_w.shape[0]:
        ratio = torch.linalg.solve(s_w, s_b)
    else:
        ratio = torch.linalg.pinv(s_w, hermitian=True) @ s_b
    return float(torch.trace(ratio))


def timed(fn, repeat: int) -> tuple[float, float]:
    seconds, value = [], 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=sorted(SHAPES), choices=sorted(SHAPES))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}; seconds, median of {args.repeat}")
    print(f"{'D':>5} {'N':>6} {'K':>5} {'threads':>7} {'before':>8} {'after':>8} {'ratio':>6}  values")
    for d in args.dims:
        n, k = SHAPES[d]
        gen = torch.Generator().manual_seed(d)
        labels = torch.arange(n) % k
        features = (torch.randn(k, d, generator=gen)[labels] + torch.randn(n, d, generator=gen)).relu()
        for threads in args.threads:
            torch.set_num_threads(threads)
            before, v_before = timed(lambda: fdr_before(features, labels, k), args.repeat)
            after, v_after = timed(lambda: fisher_discriminant_ratio(features, labels, k), args.repeat)
            print(f"{d:>5} {n:>6} {k:>5} {threads:>7} {before:>8.2f} {after:>8.2f} {before / after:>6.1f}  "
                  f"{v_before:.6f} {v_after:.6f}", flush=True)


if __name__ == "__main__":
    main()
