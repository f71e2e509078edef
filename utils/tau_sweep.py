"""Logit-adjustment tau sweep (``model.logit_adjustment_tau_sweep``).

The stage-1 (or retrained) features of the validation and test sets are
computed once; every tau then only re-classifies those features (a K x D
matrix product), so a sweep of many values costs about one evaluation.  The
best tau is the one with the highest class-averaged validation accuracy
(ties: the smaller tau); the run then continues with that tau, so acc.json
holds the test metrics at the chosen tau.  With ``param_search`` the test set
is left out of the sweep as well.  Outputs: ``tau_sweep.csv`` (tau
vs All/Many/Medium/Few on validation and test), ``tau_sweep.json`` (the
choice) and ``imgs/tau_sweep.png``.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING

from models.logit_adjust import LogitAdjuster
from utils.errors import ConfigError
from utils.metrics import GROUPS

if TYPE_CHECKING:  # pragma: no cover
    from utils.pipeline import Prepared, RunLog

SWEEP_CSV = "tau_sweep.csv"
SWEEP_JSON = "tau_sweep.json"
METRICS = ("All",) + GROUPS


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


def check_sweep(cfg) -> None:
    """Config rules (called from config.validate)."""
    taus = parse_taus(cfg.model.logit_adjustment_tau_sweep)
    if taus and cfg.model.logit_adjustment_for_training:
        raise ConfigError("model.logit_adjustment_tau_sweep is set, but model.logit_adjustment_for_training = true: "
                          "the sweep chooses the tau applied at evaluation, and a logit-adjusted training fixes "
                          "its own (additive: none at evaluation; multiplicative: the trained one); set one of them")


@contextlib.contextmanager
def adjusted(model, adjuster: LogitAdjuster):
    """The model's classify() with another logit adjuster, restored afterwards."""
    original = model.logit_adjuster
    model.logit_adjuster = adjuster.to(next(model.parameters()).device).eval()
    try:
        yield model
    finally:
        model.logit_adjuster = original


def sweep_table(model, taus: list[float], class_counts, additive: bool, splits: dict, groups: list[str]) -> list[dict]:
    """One row per tau: {"tau", "<split>_<metric>"...}; ``splits`` maps a name to
    its extracted Features (computed once, before the sweep)."""
    from utils.evaluation import accuracy_by_group, logits_of
    rows = []
    for tau in taus:
        row = {"tau": tau}
        with adjusted(model, LogitAdjuster(tau, class_counts, for_training=False, additive=additive)) as m:
            for name, feats in splits.items():
                acc, _ = accuracy_by_group(logits_of(m.classify, feats), feats.labels, groups)
                row.update({f"{name}_{g}": acc[g] for g in METRICS})
        rows.append(row)
    return rows


def best_row(rows: list[dict]) -> dict:
    """Highest validation All; the first (smallest tau in a sorted list) on ties."""
    return max(rows, key=lambda r: (r["val_All"], -rows.index(r)))


def run_sweep(p: Prepared, rundir, log: RunLog, val, test, augment) -> dict:
    """Sweep, write the curve, and leave the model with the chosen tau."""
    from utils.evaluation import extract_features
    started = time.perf_counter()
    cfg = p.cfg
    taus = parse_taus(cfg.model.logit_adjustment_tau_sweep)
    bs = cfg.data.eval_batch_size
    model = p.model
    model.eval()
    splits = {"val": extract_features(model, val, augment, bs, hflip=cfg.data.eval_hflip, fast=p.fast)}
    if not cfg.param_search:  # a parameter search never looks at the test set
        splits["test"] = extract_features(model, test, augment, bs, hflip=cfg.data.eval_hflip, fast=p.fast)
    additive = cfg.model.use_additive_logit_adjustment
    rows = sweep_table(model, taus, p.data.class_counts, additive, splits, p.data.groups())
    header = list(rows[0].keys())
    rundir.write_csv(SWEEP_CSV, header, [[r[h] for h in header] for r in rows])
    best = best_row(rows)
    rundir.write_json(SWEEP_JSON, {"best_tau": best["tau"], "additive": additive, "taus": taus,
                                   **{name: {g: best[f"{name}_{g}"] for g in METRICS} for name in splits}})
    model.logit_adjuster = LogitAdjuster(best["tau"], p.data.class_counts, for_training=False,
                                         additive=additive).to(next(model.parameters()).device).eval()
    log.info(f"tau sweep over {len(taus)} values ({'additive' if additive else 'multiplicative'}): best tau "
             f"{best['tau']:g} with validation All {best['val_All']:.4f}"
             + (f"; test All {best['test_All']:.4f}" if "test" in splits else "")
             + f" (curve in {SWEEP_CSV}; {time.perf_counter() - started:.1f} s)")
    return best
