"""What a sweep leaves in ``<exp_root>/sweeps/<study>/``: ``trials.csv``, ``best.json``, and the
table of the best trials it prints.

``best.json`` is a complete config (the sweep's JSON with the best trial's values, resolved
and validated) that first.py / second.py run as they are: ``param_search`` off, so that run
reports the test set, once, for the chosen values; ``exp_name`` ``<study>_best``.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Optional

from utils.config.rules import recorded_form
from utils.config.search_space import Param, nested_overrides
from utils.config.load import resolve
from utils.run.rundir import atomic_write_bytes

TRIALS_FILE = "trials.csv"
BEST_FILE = "best.json"


def trial_rows(study, params: list[Param]) -> list[dict]:
    """One dict per trial, in trial order: number, state, value, the searched values, seeds' scores."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name,
               "value": t.value if t.value is not None else math.nan}
        for p in params:
            row[p.key] = t.params.get(p.key, "")
        scores = t.user_attrs.get("seed_scores", {})
        row["seed_scores"] = " ".join(f"{s}:{v:.4f}" for s, v in scores.items())
        row["run_name"] = t.user_attrs.get("run_name", "")
        row["seconds"] = t.user_attrs.get("seconds", "")
        row["failure"] = t.user_attrs.get("failure", "")
        rows.append(row)
    return rows


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def write_trials_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(rows[0]))
    writer.writerows([_cell(v) for v in r.values()] for r in rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def best_rows(rows: list[dict], top: int = 5) -> list[dict]:
    done = [r for r in rows if r["state"] == "COMPLETE"]
    return sorted(done, key=lambda r: (-r["value"], r["number"]))[:top]


def markdown_table(rows: list[dict], params: list[Param]) -> str:
    """The best trials, best first (value = mean validation class-averaged accuracy, in %)."""
    header = ["trial", "val All %"] + [p.key for p in params] + ["seeds", "run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["number"]), f"{100 * r['value']:.2f}"]
        cells += [f"{r[p.key]:.4g}" if isinstance(r[p.key], float) else str(r[p.key]) for p in params]
        cells += [r["seed_scores"], r["run_name"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_config(stage: str, json_path: str, values: dict, study_name: str, seed: int,
                extra: Optional[dict] = None) -> dict:
    """The config best.json holds: validated now, so that first.py / second.py run it as is."""
    overrides = {**nested_overrides({**(extra or {}), **values}), "exp_name": f"{study_name}_best",
                 "seeds": seed, "param_search": False, "param_search_id": 0, "load_checkpoint": False}
    return recorded_form(resolve(stage, json_path, overrides).to_dict())


def write_best(path: Path, config: dict) -> None:
    atomic_write_bytes(path, (json.dumps(config, indent=2) + "\n").encode())
