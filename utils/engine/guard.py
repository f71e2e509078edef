"""NaN and infinite losses in training (``optim.nonfinite``): stop the run, or skip the step."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from utils.errors import TrainingDiverged


class NonFiniteLoss(TrainingDiverged):
    """A training step's loss was not finite (``stop``); utils/run/fit.py turns it into the run's
    message, which says what was kept."""

    def __init__(self, value: str, epoch: int, step: Optional[int]):
        super().__init__(f"training loss became {value} at epoch {epoch}, step {step}")
        self.value, self.epoch, self.step = value, epoch, step


class NonFiniteGuard:
    """The training step's check of its loss (``TrainState.guard``; utils/engine/train.py ``train_step``
    calls :meth:`check_terms` on the loss terms and :meth:`step` instead of ``optimizer.step()``).

    ``stop``: the first non-finite loss raises :class:`NonFiniteLoss` with its epoch and step,
    before the optimizer applies it; on CUDA the flag stays on the device and is read every
    ``sync_every`` steps (the epoch's mean loss catches the rest: utils/run/fit.py), so the check
    costs no host synchronisation per step.
    ``skip``: a step whose loss or gradients are not finite is not applied (its
    loss counts as 0 in the epoch's mean).  The check is computed on the device;
    a fused optimizer (fused SGD, the CUDA default) receives it as its
    ``found_inf`` attribute, the flag torch.amp's GradScaler uses (1 = do not
    apply this step), and skipped steps are counted on the device and read once
    per epoch, so no step waits; other optimizers read the flag every step.
    """

    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        self.sync_every = 1 if device.type == "cpu" else 25
        self.epoch, self.steps = 1, 0  # the epoch, and the steps of it checked so far
        self.skipped_epoch = self.skipped_total = 0
        self._bad_step: Optional[torch.Tensor] = None
        self._step_t: Optional[torch.Tensor] = None
        self._last_ok: Optional[torch.Tensor] = None
        self._params: Optional[list] = None  # the optimizer's, at its first step
        self._skipped_on_device: Optional[torch.Tensor] = None
        self._buffers_ready = False

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.steps, self.skipped_epoch, self._bad_step, self._step_t = epoch, 0, 0, None, None
        self._skipped_on_device = None

    def end_epoch(self) -> int:
        """The number of steps this epoch skipped (one host read, at the end of the epoch)."""
        if self._skipped_on_device is not None:
            self.skipped_epoch += int(self._skipped_on_device)
            self._skipped_on_device = None
        self.skipped_total += self.skipped_epoch
        return self.skipped_epoch

    def first_bad_step(self) -> Optional[int]:
        return int(self._bad_step) if self._bad_step is not None and int(self._bad_step) > 0 else None

    def check_terms(self, terms: dict) -> dict:
        self.steps += 1
        loss = sum(terms.values())
        ok = torch.isfinite(loss) if isinstance(loss, torch.Tensor) else torch.tensor(bool(np.isfinite(loss)))
        if self.mode == "skip":
            self._last_ok = ok
            return {k: torch.where(ok, v, torch.zeros_like(v)) for k, v in terms.items()}
        if self.sync_every == 1:
            if not bool(ok):
                raise NonFiniteLoss(str(float(loss.detach())), self.epoch, self.steps)
            return terms
        if self._bad_step is None:  # device counters: no host-to-device copy, no sync per step
            self._bad_step = torch.zeros((), dtype=torch.long, device=ok.device)
            self._step_t = torch.zeros((), dtype=torch.long, device=ok.device)
        self._step_t += 1
        self._bad_step = torch.where((self._bad_step == 0) & ~ok, self._step_t, self._bad_step)
        if self.steps % self.sync_every == 0 and int(self._bad_step) > 0:
            raise NonFiniteLoss("nan or inf", self.epoch, int(self._bad_step))
        return terms

    def bad_step(self) -> Optional[torch.Tensor]:
        """A 0-d bool on the device: the loss or a gradient is not finite (None: nothing to check).

        One norm per gradient in multi-tensor kernels (``torch._foreach_norm``, in every
        supported torch; ``torch.nn.utils.get_total_norm`` needs 2.6); NaN and inf propagate
        through the sums, and a gradient whose norm overflows float32 counts as non-finite."""
        bad = None if self._last_ok is None else ~self._last_ok
        grads = [p.grad for p in self._params or () if p.grad is not None]
        if grads:
            grads_bad = ~torch.stack(torch._foreach_norm(grads)).isfinite().all()
            bad = grads_bad if bad is None else bad | grads_bad
        return bad

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; with ``skip``, not applied when the loss or a gradient is not finite."""
        if self.mode != "skip":
            optimizer.step()
            return
        if self._params is None:
            self._params = [p for group in optimizer.param_groups for p in group["params"]]
        bad = self.bad_step()
        if bad is None:
            optimizer.step()
        elif all(group.get("fused") for group in optimizer.param_groups):
            self._prepare_fused(optimizer)
            optimizer.found_inf = bad.float()
            self._skipped_on_device = bad.long() if self._skipped_on_device is None else self._skipped_on_device + bad
            optimizer.step()
        elif bool(bad):  # a host read per step: only fused optimizers take the flag on the device
            self.skipped_epoch += 1
        else:
            optimizer.step()

    def _prepare_fused(self, optimizer) -> None:
        """Zero momentum buffers before the first fused SGD step.

        Fused SGD allocates them with ``torch.empty_like`` on its first step and, when
        ``found_inf`` skips that step, leaves them uninitialised for the next.  A zero
        buffer gives the identical first update (buf = 0.9 * 0 + grad, dampening 0)."""
        if self._buffers_ready:
            return
        self._buffers_ready = True
        if not isinstance(optimizer, torch.optim.SGD):
            return  # fused Adam/AdamW initialise their moments with zeros themselves
        for group in optimizer.param_groups:
            if group["momentum"] == 0:
                continue
            for param in group["params"]:
                state = optimizer.state[param]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(param)
