"""Logit-adjustment tau sweep (``model.logit_adjustment_tau_sweep``).

The stage-1 (or retrained) features of the validation and test sets are
computed once; every tau then only re-classifies those features (a K x D
matrix product), so a sweep of many values costs about one evaluation.  The
best tau is the one with the highest class-averaged validation accuracy
(ties: the smaller tau); the run then continues with that tau, so acc.json
holds the test metrics at the chosen tau.  With ``param_search`` the test set
is left out of the sweep as well.  Outputs: ``tau_sweep.csv`` (tau
vs All/Many/Medium/Few and the ECE on validation and test), ``tau_sweep.json`` (the
choice) and ``imgs/tau_sweep.png``.
"""
from __future__ import annotations

import contextlib
import time

from models.logit_adjust import LogitAdjuster
from utils.config.schema import ModelConfig
from utils.engine.calibration import calibration
from utils.engine.evaluation import EvalPasses, accuracy_by_group, logits_of
from utils.data.lt_data import LTData
from utils.names import GROUPS, TAU_SWEEP_CSV, TAU_SWEEP_JSON
from utils.run.rundir import RunDir
from utils.run.runlog import log
from utils.config.sweep_spec import parse_taus

METRICS = ("All",) + GROUPS


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
    rows = []
    for tau in taus:
        row = {"tau": tau}
        with adjusted(model, LogitAdjuster(tau, class_counts, for_training=False, additive=additive)) as m:
            for name, feats in splits.items():
                logits = logits_of(m.classify, feats)
                acc, _ = accuracy_by_group(logits, feats.labels, groups)
                row.update({f"{name}_{g}": acc[g] for g in METRICS})
                row[f"{name}_ECE"] = calibration(logits, feats.labels)["ECE"]
        rows.append(row)
    return rows


def best_row(rows: list[dict]) -> dict:
    """Highest validation All; the first (smallest tau in a sorted list) on ties."""
    return max(rows, key=lambda r: (r["val_All"], -rows.index(r)))


def run_sweep(model, m: ModelConfig, data: LTData, splits: dict, passes: EvalPasses, hflip: bool,
              rundir: RunDir) -> dict:
    """Sweep ``model.logit_adjustment_tau_sweep`` on ``splits`` ({"val": ..., and "test" unless a
    parameter search, which never looks at the test set}), write the curve, and leave the
    model with the chosen tau; returns the chosen row."""
    started = time.perf_counter()
    taus = parse_taus(m.logit_adjustment_tau_sweep)
    model.eval()
    features = {name: passes.features(model, split, hflip=hflip) for name, split in splits.items()}
    additive = m.use_additive_logit_adjustment
    rows = sweep_table(model, taus, data.class_counts, additive, features, data.groups())
    header = list(rows[0].keys())
    rundir.write_csv(TAU_SWEEP_CSV, header, [[r[h] for h in header] for r in rows])
    best = best_row(rows)
    rundir.write_json(TAU_SWEEP_JSON, {"best_tau": best["tau"], "additive": additive, "taus": taus,
                                       **{name: {g: best[f"{name}_{g}"] for g in METRICS} for name in features}})
    model.logit_adjuster = LogitAdjuster(best["tau"], data.class_counts, for_training=False,
                                         additive=additive).to(next(model.parameters()).device).eval()
    log.info(f"tau sweep over {len(taus)} values ({'additive' if additive else 'multiplicative'}): best tau "
             f"{best['tau']:g} with validation All {best['val_All']:.4f}"
             + (f"; test All {best['test_All']:.4f}" if "test" in features else "")
             + f" (curve in {TAU_SWEEP_CSV}; {time.perf_counter() - started:.1f} s)")
    return best
