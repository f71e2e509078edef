"""One trial of a hyper-parameter search: ordinary runs, one per seed, scored on validation.

Each seed is a run of the project's own run function (in this process, as first.py would
start it), with ``param_search: true``: the final evaluation and any tau sweep use the
validation set, so nothing a trial writes or scores has looked at the test set.  The run
folder is ``<exp_name = run_name>/<param_search_id = seed>``: trials and seeds never share
one.  Runs start with ``resume``: a trial queued again after Ctrl-C continues its runs, and
a seed that already finished is read, not redone.  The trial's score is the mean over its
seeds of the class-averaged validation accuracy (``acc.json`` "All").
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from utils.config.load import read_json_file, resolve
from utils.config.schema import Config
from utils.config.search_space import nested_overrides
from utils.errors import ConfigError, RunInterrupted, TrainingDiverged, UserError
from utils.names import ACC_FILE


@dataclass
class TrialOutcome:
    """What a trial gave: a score, or why it failed; ``interrupted``: Ctrl-C stopped it."""
    score: Optional[float] = None
    seed_scores: dict = field(default_factory=dict)
    run_dirs: list = field(default_factory=list)
    failure: str = ""
    interrupted: bool = False
    seconds: float = 0.0


def trial_configs(stage: str, json_path: str, values: dict, run_name: str, seeds: list[int],
                  extra: Optional[dict] = None) -> list[Config]:
    """One validated config per seed: the JSON, the trial's values, and the sweep's own keys.
    A combination the config rules refuse raises ConfigError (the trial then fails)."""
    configs = []
    for seed in seeds:
        overrides = {**nested_overrides({**(extra or {}), **values}), "exp_name": run_name, "seeds": seed,
                     "param_search": True, "param_search_id": seed, "load_checkpoint": False}
        configs.append(resolve(stage, json_path, overrides))
    return configs


def validation_score(run_dir: Path) -> float:
    """acc.json's class-averaged accuracy of a param_search run (validation)."""
    acc = read_json_file(Path(run_dir) / ACC_FILE, f"{Path(run_dir) / ACC_FILE}")
    return float(acc["All"])


def run_trial(stage: str, json_path: str, values: dict, run_name: str, seeds: list[int], exp_root: str,
              extra: Optional[dict] = None) -> TrialOutcome:
    """Run every seed of one trial; any failure of a seed fails the trial (the other seeds are
    not run), and is described in one line."""
    from utils.run.pipeline import run

    out = TrialOutcome()
    started = time.perf_counter()
    try:
        configs = trial_configs(stage, json_path, values, run_name, seeds, extra)
        for cfg in configs:
            path = run(cfg, stage, exp_root=exp_root, resume=True)
            out.run_dirs.append(str(Path(exp_root) / cfg.run_subdir()))  # as the user names exp_root
            score = validation_score(path)
            if not math.isfinite(score):
                raise TrainingDiverged(f"the validation accuracy of {path} is {score}")
            out.seed_scores[cfg.seeds] = score
        out.score = sum(out.seed_scores.values()) / len(out.seed_scores)
    except (RunInterrupted, KeyboardInterrupt):
        out.interrupted, out.failure = True, "interrupted (Ctrl-C or SIGTERM)"
    except ConfigError as exc:
        out.failure = f"refused: {exc}"
    except (TrainingDiverged, FloatingPointError) as exc:
        out.failure = f"diverged: {exc}"
    except UserError as exc:
        out.failure = f"error: {exc}"
    except Exception as exc:  # noqa: BLE001 - one trial's crash must not end a sweep of many; it is reported
        out.failure = f"crashed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    out.seconds = time.perf_counter() - started
    return out
