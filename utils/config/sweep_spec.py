"""What ``model.logit_adjustment_tau_sweep`` may say: ``'start:stop:num'`` or ``'a,b,c'``.

The parsing rules of the tau sweep (utils/run/tau_sweep.py runs it), kept with the config so that
a bad specification is refused with the other keys, before any work.
"""
from __future__ import annotations

import math

from utils.errors import ConfigError

MAX_TAUS = 10_000   # each value re-classifies the validation and test features once
MAX_TAU = 100.0     # the range of model.logit_adjustment_tau
_SPEC_CHARS = 100_000


def parse_taus(text: str) -> list[float]:
    """'start:stop:num' -> num evenly spaced values from start to stop (both included, as
    numpy.linspace); 'a,b,c' -> those values; '' -> [].  The values come back sorted without
    repeats (ties between taus then go to the smaller one, as the README says).  At most
    MAX_TAUS values, each finite and in [0, MAX_TAU]; anything else is a one-line ConfigError."""
    key = "model.logit_adjustment_tau_sweep"
    usage = "use 'start:stop:num' (e.g. '0:2:21') or comma-separated values (e.g. '0.25,0.5,1')"
    if len(text) > _SPEC_CHARS:
        raise ConfigError(f"{key} is {len(text)} characters long; {usage}, at most {MAX_TAUS} values")
    shown = text if len(text) <= 60 else text[:40] + "..." + text[-10:]
    text = text.strip()
    if not text:
        return []
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError("expected start:stop:num")
            start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
            if not 1 <= num <= MAX_TAUS:
                raise ValueError(f"num must be >= 1 and <= {MAX_TAUS}, got {num}")
            taus = [start] if num == 1 else [start + (stop - start) * i / (num - 1) for i in range(num)]
        else:
            items = text.split(",")
            if len(items) > MAX_TAUS:
                raise ValueError(f"{len(items)} values, at most {MAX_TAUS}")
            if any(not t.strip() for t in items):
                raise ValueError("an empty value between commas")
            taus = [float(t) for t in items]
    except ValueError as exc:
        raise ConfigError(f"{key} = {shown!r} is not a tau list: {exc}; {usage}") from None
    bad = [t for t in taus if not math.isfinite(t) or not 0 <= t <= MAX_TAU]
    if bad:
        raise ConfigError(f"{key} = {shown!r}: tau must be a finite number >= 0 and <= {MAX_TAU:g}, got {bad[0]}")
    return sorted({round(t, 10) for t in taus})


def check_sweep(model_cfg) -> None:
    """The sweep's rule against the rest of the model section (utils/config/rules.py calls it)."""
    taus = parse_taus(model_cfg.logit_adjustment_tau_sweep)
    if taus and model_cfg.logit_adjustment_for_training:
        raise ConfigError("model.logit_adjustment_tau_sweep is set, but model.logit_adjustment_for_training = true: "
                          "the sweep chooses the tau applied at evaluation, and a logit-adjusted training fixes "
                          "its own (additive: none at evaluation; multiplicative: the trained one); set one of them")
