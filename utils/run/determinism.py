"""Reproducibility: the seeds every run applies, and the switch to deterministic algorithms."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Python's ``random``, NumPy and torch (every device).  The training loop's shuffling and
    augmentation generators are seeded on their own (utils/run/prepare.py ``make_train_state``)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def apply_determinism(enabled: bool) -> None:
    """``deterministic: true``: deterministic algorithms everywhere (CPU and CUDA).

    Seeds are applied in every case (``seed_everything`` and the training
    generators); this switch also removes the run-to-run variation of
    non-deterministic kernels (cuDNN algorithm choice, atomics in CUDA
    reductions).  cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` set before its first
    use, which is why this runs before the model reaches the device.

    It is also the one place that sets cuDNN's autotuner, for runs and the
    benchmark alike: ``cudnn.benchmark = not enabled`` (timing the candidate
    convolution algorithms at each new input shape picks the fastest, but which
    one wins may differ from run to run).
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not enabled
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
