"""Post-hoc / training-time logit adjustment by the class prior."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["LogitAdjuster", "log_prior_from_counts"]


def log_prior_from_counts(class_counts: Sequence[int], strict: bool = True) -> torch.Tensor:
    """``log(n_c / sum n)`` as a float32 tensor of shape (1, K).

    With ``strict`` (default) non-positive counts raise ``ValueError``; otherwise
    empty classes give ``-inf``.
    """
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError("class_counts must be a non-empty list of per-class counts")
    if bool((counts < 0).any()) or (strict and bool((counts <= 0).any())):
        raise ValueError("class_counts must all be positive for logit adjustment")
    return torch.log(counts / counts.sum()).to(torch.float32).unsqueeze(0)


class LogitAdjuster(nn.Module):
    """Adjust logits with the class prior ``pi_c = n_c / sum n``.

    - ``tau <= 0``: identity.
    - additive: eval mode and not ``for_training`` -> ``z - tau * log pi``
      (post-hoc adjustment); training mode and ``for_training`` ->
      ``z + tau * log pi`` (logit-adjusted training); otherwise unchanged.
    - multiplicative (``additive=False``): ``z * exp(-tau * log pi) = z / pi**tau``
      in both modes.

    ``log_prior`` is a non-persistent buffer (absent from the state dict).
    """

    def __init__(
        self,
        tau: float = 0.0,
        class_counts: Sequence[int] | None = None,
        for_training: bool = False,
        additive: bool = True,
    ) -> None:
        super().__init__()
        self.tau = float(tau)
        self.for_training = bool(for_training)
        self.additive = bool(additive)
        if self.tau > 0 and class_counts is None:
            raise ValueError("logit adjustment with tau > 0 requires class_counts")
        log_prior = None
        if class_counts is not None:
            log_prior = log_prior_from_counts(class_counts, strict=self.tau > 0)
        self.register_buffer("log_prior", log_prior, persistent=False)

    @property
    def active(self) -> bool:
        return self.tau > 0 and self.log_prior is not None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return z
        lp = self.log_prior.to(dtype=z.dtype)
        if self.additive:
            if not self.training and not self.for_training:
                return z - self.tau * lp
            if self.training and self.for_training:
                return z + self.tau * lp
            return z
        return z * torch.exp(-self.tau * lp)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, for_training={self.for_training}, additive={self.additive}"
