"""Reading a stage-1 run for stage 2 (SPEC 7), with clear errors.

Accepts runs of this project and of the published implementation: a plain
state_dict in ``best.paramOnly`` and an ``args.json`` beside it.  Nothing in
the stage-1 directory is ever written.
"""
from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.backbone_options import reinit_bn_weights
from models.classifiers import etf_state_to_linear, linear_state_to_etf
from utils.config.load import from_dict, read_json_file
from utils.config.schema import Config, ModelConfig
from utils.errors import ConfigError, Stage1Error
from utils.names import ARGS_FILE, BEST_PARAM_FILE
from utils.run.rundir import load_state_dict
from utils.run.plan import run_state
from utils.run.runlock import live_owner

CLASSIFIER_PREFIX = "encoder.fc."


@dataclass
class Stage1Run:
    path: Path
    config: Config
    state_dict: dict
    skipped_keys: list = field(default_factory=list)  # set by ignore_restrict_load
    unfinished_note: str = ""  # --allow_unfinished_stage1: what was loaded, for the run log


def read_stage1(cfg: Config, allow_unfinished: bool = False) -> Stage1Run:
    run = Path(cfg.model.pretrained_path) / str(cfg.seeds)
    if not run.is_dir():
        raise Stage1Error(f"stage-1 run directory {run} not found (model.pretrained_path = "
                          f"{cfg.model.pretrained_path!r} plus the seed {cfg.seeds}); run first.py with that seed first")
    args_path = run / ARGS_FILE
    if not args_path.exists():
        raise Stage1Error(f"{args_path} is missing; it is written by first.py beside best.paramOnly")
    raw = read_json_file(args_path, f"{args_path} is unreadable", Stage1Error)
    if isinstance(raw, dict):
        raw = dict(raw)
        raw.pop("project_name", None)  # the original may store anything here
    try:
        with warnings.catch_warnings():  # notes about stage 1's own config are not this run's
            warnings.simplefilter("ignore")
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
    _check_same_architecture(stage1_cfg, cfg, run)
    note = _check_finished(run, allow_unfinished)
    state = _load_checkpoint(run / BEST_PARAM_FILE)
    _check_finite(state, run / BEST_PARAM_FILE)
    return Stage1Run(path=run, config=stage1_cfg, state_dict=state, unfinished_note=note)


def _check_finished(run: Path, allow_unfinished: bool) -> str:
    """A stage-1 run still training (its lock is live) or not finished is refused unless asked;
    with ``allow_unfinished`` returns what is loaded, for the run log."""
    owner = live_owner(run)
    state = run_state(run)
    if owner is None and state.finished:
        return ""
    if owner is not None:
        why = f"is still running ({owner.describe()})"
    else:
        why = f"has not finished ({state.describe_unfinished()})"
    if not allow_unfinished:
        raise Stage1Error(f"stage-1 run {run} {why}; let it finish (or --resume it), or add "
                          "--allow_unfinished_stage1 to use its best weights so far")
    if state.epoch is None or state.best_epoch is None:
        what = "its best weights so far"
    elif state.best_epoch == 0:
        what = f"its initial weights (no epoch improved on them; {state.describe_unfinished()})"
    else:
        what = f"the weights of its best epoch {state.best_epoch} ({state.describe_unfinished()})"
    return f" (--allow_unfinished_stage1: the stage-1 run {why}; loaded {what})"


def _check_finite(state: dict, path: Path) -> None:
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise Stage1Error(f"{path} holds non-finite weights ({key} has NaN or inf): the stage-1 run diverged; "
                              "retrain stage 1 (e.g. with a lower optim.base_lr)")


# Options that change what the stage-1 weights compute: stage 2 must build the same
# network, or it would silently evaluate other features.
_ARCHITECTURE_KEYS = ("identity_skip", "one_param_bn", "activation_type")


def _check_same_architecture(stage1_cfg: Config, cfg: Config, run: Path) -> None:
    keys = list(_ARCHITECTURE_KEYS)
    if cfg.model.activation_type == "lrelu":
        keys.append("activation_param")
    for key in keys:
        theirs, ours = getattr(stage1_cfg.model, key), getattr(cfg.model, key)
        if theirs != ours:
            raise Stage1Error(f"stage-1 run {run} used model.{key} = {theirs!r}, but this run has {ours!r}; "
                              f"set model.{key} to {theirs!r} so that stage 2 builds the network stage 1 trained")


def _load_checkpoint(ckpt: Path) -> dict:
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
    return dict(state)


def apply_bn_weight_init(model: torch.nn.Module, m: ModelConfig, seed: int) -> list[str]:
    """``model.modify_bn_weight``: re-draw the BN scales of a freshly built model.

    The ``pretrained`` distribution reads ``<pretrained_path>/<seed>/best.paramOnly``
    (any earlier run of the same network) and sets ``w = pretrained_gamma * w_run
    + pretrained_beta`` for every BN.  Returns the BN modules changed.
    """
    source = Path(m.pretrained_path) / str(seed) / BEST_PARAM_FILE
    state = None
    if m.bn_weight_init_distribution == "pretrained":
        state = _load_checkpoint(source)
    groups = model.named_parameter_groups()
    identity = {name.rsplit(".", 1)[0] for name, _ in groups.get("identity_bn", [])}
    try:
        return reinit_bn_weights(
            model, m.bn_weight_init_distribution,
            low=m.bn_weight_init_min, high=m.bn_weight_init_max,
            mean=m.bn_weight_init_mean, std=m.bn_weight_init_std,
            include_identity=m.init_identity_bn, identity_bn_names=identity,
            pretrained_state=state, gamma=m.pretrained_gamma, beta=m.pretrained_beta)
    except (KeyError, ValueError) as exc:
        raise Stage1Error(f"model.modify_bn_weight from {source}: {exc.args[0]}") from None


def adapt_state_dict(state: dict, stage1_etf: bool, want_etf: bool, only_representation: bool,
                     prefix: str = CLASSIFIER_PREFIX) -> dict:
    """Convert the classifier between ETF and Linear as stage 2 asks, or drop it
    (``only_representation``: ``load_only_representation`` or not
    ``load_last_linear``; the model then keeps its freshly initialised classifier)."""
    if only_representation:
        return {k: v for k, v in state.items() if not k.startswith(prefix)}
    if stage1_etf and not want_etf:
        return dict(etf_state_to_linear(state, prefix))
    if want_etf and not stage1_etf:
        return dict(linear_state_to_etf(state, prefix))
    return state


def load_into(model: torch.nn.Module, state: dict, strict: bool, source: Path,
              prefix: str = CLASSIFIER_PREFIX, ignore_restrict_load: bool = False) -> list[str]:
    """Load ``state``; ``strict=False`` lets the classifier keys be missing.

    With ``ignore_restrict_load`` (the original's non-strict load) missing,
    unexpected and wrongly shaped keys are skipped instead of refused; the
    skipped keys are returned so that the run log can name them.
    """
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if mismatched and not ignore_restrict_load:
        k = mismatched[0]
        raise Stage1Error(f"{source} does not fit the model: {len(mismatched)} tensors have another shape "
                          f"(e.g. {k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model)")
    state = {k: v for k, v in state.items() if k not in mismatched}
    result = model.load_state_dict(state, strict=False)
    missing = list(result.missing_keys)
    if not strict:
        missing = [k for k in missing if not k.startswith(prefix)]
    if ignore_restrict_load:
        return sorted(set(mismatched) | set(missing) | set(result.unexpected_keys))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} keys (e.g. {result.unexpected_keys[0]})")
    if problems:
        raise Stage1Error(f"{source} does not fit the model: " + "; ".join(problems))
    return []
