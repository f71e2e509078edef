"""Reading a stage-1 run for stage 2 (SPEC 7), with clear errors.

Accepts runs of this project and of the published implementation: a plain
state_dict in ``best.paramOnly`` and an ``args.json`` beside it.  Nothing in
the stage-1 directory is ever written.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from models.classifiers import etf_state_to_linear, linear_state_to_etf
from utils.config import Config, ConfigError, from_dict
from utils.errors import Stage1Error  # noqa: F401  (re-exported)
from utils.rundir import ARGS_FILE, BEST_PARAM_FILE, load_state_dict

CLASSIFIER_PREFIX = "encoder.fc."


@dataclass
class Stage1Run:
    path: Path
    config: Config
    state_dict: dict


def read_stage1(cfg: Config) -> Stage1Run:
    run = Path(cfg.model.pretrained_path) / str(cfg.seeds)
    if not run.is_dir():
        raise Stage1Error(f"stage-1 run directory {run} not found (model.pretrained_path = "
                          f"{cfg.model.pretrained_path!r} plus the seed {cfg.seeds}); run first.py with that seed first")
    args_path = run / ARGS_FILE
    if not args_path.is_file():
        raise Stage1Error(f"{args_path} is missing; it is written by first.py beside best.paramOnly")
    try:
        raw = json.loads(args_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Stage1Error(f"{args_path} is unreadable: {exc}") from None
    if isinstance(raw, dict):
        raw = dict(raw)
        raw.pop("project_name", None)  # the original may store anything here
    try:
        stage1_cfg = from_dict(raw, str(args_path))
    except ConfigError as exc:
        raise Stage1Error(f"{args_path}: {exc}") from None
    if stage1_cfg.model.name != cfg.model.name:
        raise Stage1Error(f"stage-1 run {run} trained model {stage1_cfg.model.name}, "
                          f"but model.name = {cfg.model.name!r}")
    if stage1_cfg.data.n_classes != cfg.data.n_classes:
        raise Stage1Error(f"stage-1 run {run} has {stage1_cfg.data.n_classes} classes, "
                          f"but data.n_classes = {cfg.data.n_classes}")
    if stage1_cfg.data.name != cfg.data.name:
        raise Stage1Error(f"stage-1 run {run} was trained on {stage1_cfg.data.name}, "
                          f"but data.name = {cfg.data.name!r}")
    for key in ("imb_type", "imb_factor"):
        theirs, ours = getattr(stage1_cfg.data, key), getattr(cfg.data, key)
        if theirs != ours:
            raise Stage1Error(f"stage-1 run {run} used data.{key} = {theirs!r}, but this run has {ours!r}; "
                              "stage 2 must see the same training set (its class counts set the prior)")
    ckpt = run / BEST_PARAM_FILE
    if not ckpt.is_file():
        raise Stage1Error(f"{ckpt} is missing; the stage-1 run has not saved its best weights")
    try:
        state = load_state_dict(ckpt)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise Stage1Error(f"{ckpt} was refused: it is not a plain weights-only state_dict ({first})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Stage1Error(f"{ckpt} is unreadable or truncated: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise Stage1Error(f"{ckpt} does not hold a state_dict of tensors")
    return Stage1Run(path=run, config=stage1_cfg, state_dict=dict(state))


def adapt_state_dict(state: dict, stage1_etf: bool, want_etf: bool, only_representation: bool,
                     prefix: str = CLASSIFIER_PREFIX) -> dict:
    """Convert the classifier between ETF and Linear as stage 2 asks, or drop it."""
    if only_representation:
        return {k: v for k, v in state.items() if not k.startswith(prefix)}
    if stage1_etf and not want_etf:
        return dict(etf_state_to_linear(state, prefix))
    if want_etf and not stage1_etf:
        return dict(linear_state_to_etf(state, prefix))
    return state


def load_into(model: torch.nn.Module, state: dict, strict: bool, source: Path,
              prefix: str = CLASSIFIER_PREFIX) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = list(result.missing_keys)
    if not strict:
        missing = [k for k in missing if not k.startswith(prefix)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} keys (e.g. {result.unexpected_keys[0]})")
    if problems:
        raise Stage1Error(f"{source} does not fit the model: " + "; ".join(problems))
