"""The rules between keys, checked once on a loaded config (:func:`validate`).

Each field's own value was checked against its range or choices (utils/config/values.py);
here: combinations that cannot work (refused, as the original asserts or ignores them),
combinations in which a key has no effect (a warning: an old args.json may carry one, so it
stays loadable), sizes against what consumes them, and what an evaluation-only run records.
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct
import warnings
from dataclasses import fields

from utils.config.schema import NOT_BUILT, SECTIONS, Config, OptimConfig, key_of
from utils.config.values import RANGES, Range, check_field, short
from utils.errors import ConfigError
from utils.names import (BASIC_BLOCK_MODELS, FEATURE_DIMS, MLP_MODELS, RESNET_MODELS, TABLE_DATASETS,
                         TORCHVISION_MODELS)
from utils.config.sweep_spec import check_sweep

FLOAT32_TINY = 2.0 ** -126  # the smallest normal float32 (1.2e-38)


def _as_float32(x: float) -> float:
    """x rounded to the nearest float32, as a float32 weight would hold it."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def validate(cfg: Config) -> None:
    """Field choices and ranges, cross-field rules, and not-yet-built features."""
    _check_fields(cfg)
    _check_model_options(cfg)
    _check_etf_size(cfg)
    _check_init_weights(cfg)
    _check_stages(cfg)
    _check_not_built(cfg)
    _check_table_data(cfg)
    _check_optim(cfg.optim)
    _check_norm_param(cfg.optim)
    _check_sizes(cfg)
    _check_schedule(cfg.optim)
    check_sweep(cfg.model)
    if not cfg.data.root.strip():
        raise ConfigError(f"data.root = {cfg.data.root!r} is empty; give the folder that holds the datasets "
                          "(default: datasets)")
    if cfg.project_name == "second" and cfg.model.is_pretrained and not cfg.model.pretrained_path:
        raise ConfigError("model.pretrained_path is empty; stage 2 needs the stage-1 run directory "
                          "(e.g. exp/Cifar100/ResNet34/first/<exp_name>)")


def _check_fields(cfg: Config) -> None:
    for section, obj in (("", cfg), ("data", cfg.data), ("model", cfg.model), ("optim", cfg.optim)):
        for f in fields(obj):
            if f.name in SECTIONS and section == "":
                continue
            check_field(section, f, getattr(obj, f.name))


def _check_not_built(cfg: Config) -> None:
    for (section, name), allowed in NOT_BUILT.items():
        obj = getattr(cfg, section) if section else cfg
        value = getattr(obj, name)
        if value not in allowed:
            shown = ", ".join(json.dumps(a) for a in allowed)
            raise ConfigError(f"{key_of(section, name)} = {json.dumps(value)} is not implemented in this version "
                              f"(supported: {shown})")


def _check_table_data(cfg: Config) -> None:
    if (cfg.data.name in TABLE_DATASETS) != (cfg.model.name == "TableMLP"):
        raise ConfigError(f"data.name = {cfg.data.name!r} with model.name = {cfg.model.name!r}: Helena is a feature "
                          "table and needs model.name TableMLP; TableMLP is for Helena only")
    if cfg.data.eval_hflip and cfg.data.name in TABLE_DATASETS:
        raise ConfigError("data.eval_hflip = true flips images; Helena is a feature table (set it to false)")


# norm_param by norm_type (SPEC 7.1, 7.3): the L2 rate divides, tau is an exponent of the row
# norms, the MaxNorm threshold is a fraction of the way from the smallest row norm to the largest.
NORM_PARAM_RANGES = {"L2": RANGES["ratio"], "tau": Range(0, 10), "maxnorm": Range(0, 1)}


def _check_norm_param(o: OptimConfig) -> None:
    allowed = NORM_PARAM_RANGES.get(o.norm_type)
    if o.norm_param is not None and allowed is not None and o.norm_param not in allowed:
        raise ConfigError(f"optim.norm_param = {short(o.norm_param)} {allowed.violation(o.norm_param, False)} with "
                          f"optim.norm_type = {o.norm_type!r}")


# Inputs of each dataset as the MLP models see them (flattened C x H x W, or Helena's features).
INPUT_FEATURES = {"Digits": 64, "MNIST": 784, "Cifar10": 3072, "Cifar100": 3072, "ImageNet": 3 * 224 * 224,
                  "MiniImagenet": 3 * 224 * 224, "Helena": 27, "INat2018": 3 * 224 * 224, "PlacesLT": 3 * 224 * 224}
MAX_MLP_WEIGHTS = 2 ** 30  # 4 GiB of float32 weights; training holds 3-4 times that


def mlp_weights(model_name: str, data_name: str, layers: int, width: int) -> int:
    """Weights of the Linear layers of BNMLP / MLResBlock (models/small.py), classifier excluded."""
    first = INPUT_FEATURES[data_name] * width
    if model_name == "BNMLP":
        return first + (layers - 1) * width * width
    return first + 2 * layers * width * width  # MLResBlock: two Linear layers per block


def _check_sizes(cfg: Config) -> None:
    """Sizes against what consumes them: BatchNorm in training, the memory of the MLP models."""
    if cfg.optim.total_epoch_num > 0 and cfg.data.batch_size < 2:
        raise ConfigError(f"data.batch_size = {cfg.data.batch_size} cannot train: every model here has BatchNorm, "
                          "whose batch statistics need at least 2 images; use 2 or more")
    m = cfg.model
    if m.name in MLP_MODELS:
        weights = mlp_weights(m.name, cfg.data.name, m.mlp_hlayer_n, m.mlp_features_d)
        if weights > MAX_MLP_WEIGHTS:
            raise ConfigError(f"model.mlp_features_d = {m.mlp_features_d} with model.mlp_hlayer_n = {m.mlp_hlayer_n} "
                              f"asks {m.name} for {weights:.3g} weights ({weights * 4 / 2 ** 30:.0f} GiB of float32, "
                              f"several times that in training); at most 2**30: lower the width or the layers")


def _check_schedule(o: OptimConfig) -> None:
    """Learning rates that cannot train, and a schedule that never does."""
    if 0 < o.base_lr and _as_float32(o.base_lr) < FLOAT32_TINY:
        raise ConfigError(f"optim.base_lr = {o.base_lr!r} is below the smallest normal float32 (1.2e-38): on float32 "
                          "weights every step would round to no change; use 0 to mean no training, or a larger rate")
    if o.loss_type != "CE" and o.drw >= o.total_epoch_num > 0:
        raise ConfigError(f"optim.drw = {o.drw} with optim.total_epoch_num = {o.total_epoch_num}: the first drw epochs "
                          f"train with plain CE, so optim.loss_type = {o.loss_type!r} would never be used; set drw "
                          "below total_epoch_num (0 = re-weight from the start)")
    # SPEC 6.3: the cosine schedule is stepped at the start of every epoch, so epoch 1 runs at
    # 0.5 * base_lr * (1 + cos(pi / total)); the rates only fall from there.
    if o.total_epoch_num > 0 and 0.5 * o.base_lr * (1 + math.cos(math.pi / o.total_epoch_num)) == 0:
        why = ("optim.base_lr = 0" if o.base_lr == 0 else
               "optim.total_epoch_num = 1 and the cosine schedule, stepped at the start of each epoch as in the "
               "original, is already at 0 for its only epoch")
        _no_effect(f"{why}: every epoch runs at lr 0 and the weights never change (BatchNorm statistics still "
                   "move); use 2 or more epochs and a rate > 0 to train")


# The original's ResNets assert these keys keep their defaults (they belong to its MLPs).
_MLP_ONLY_KEYS = {"dropout": 0.0, "use_bn": True, "add_skip": False}
# modify_bn_weight: the keys each distribution reads.
_BN_INIT_KEYS = {"uniform": ("bn_weight_init_min", "bn_weight_init_max"),
                 "gauss": ("bn_weight_init_mean", "bn_weight_init_std"),
                 "rectified_gauss": ("bn_weight_init_mean", "bn_weight_init_std"),
                 "pretrained": ("pretrained_gamma", "pretrained_beta")}


def _check_model_options(cfg: Config) -> None:
    """Cross-key rules of the model options (the original asserted or ignored these)."""
    m = cfg.model
    if m.name in RESNET_MODELS:
        for key, default in _MLP_ONLY_KEYS.items():
            if getattr(m, key) != default:
                raise ConfigError(f"model.{key} = {json.dumps(getattr(m, key))} does not apply to {m.name}: the "
                                  f"original's ResNets support only {json.dumps(default)} (the key belongs to its MLP models)")
    else:
        if m.activation_type != "relu":
            raise ConfigError(f"model.activation_type = {m.activation_type!r} is built for the ResNet backbones "
                              f"({', '.join(RESNET_MODELS)}), not {m.name}")
        if m.use_dr_balancer:
            raise ConfigError(f"model.use_dr_balancer = true is built for the ResNet backbones "
                              f"({', '.join(RESNET_MODELS)}), not {m.name}")
    for key in ("identity_skip", "one_param_bn"):
        if getattr(m, key) and m.name not in BASIC_BLOCK_MODELS:
            raise ConfigError(f"model.{key} = true is built for {', '.join(BASIC_BLOCK_MODELS)} (basic blocks), "
                              f"not {m.name}")
    if m.use_dr_balancer and not m.use_etf:
        raise ConfigError("model.use_dr_balancer = true scales the ETF classifier's norms; set model.use_etf = true")
    if m.modify_bn_weight:
        dist = m.bn_weight_init_distribution
        if dist is None:
            raise ConfigError("model.modify_bn_weight = true needs model.bn_weight_init_distribution: "
                              "uniform, gauss, rectified_gauss or pretrained")
        for key in _BN_INIT_KEYS[dist]:
            if getattr(m, key) is None:
                raise ConfigError(f"model.bn_weight_init_distribution = {dist!r} needs model.{key} (a number)")
        if dist == "uniform" and m.bn_weight_init_min > m.bn_weight_init_max:
            raise ConfigError(f"model.bn_weight_init_min = {m.bn_weight_init_min} is above "
                              f"model.bn_weight_init_max = {m.bn_weight_init_max}")
        if dist in ("gauss", "rectified_gauss") and m.bn_weight_init_std < 0:
            raise ConfigError(f"model.bn_weight_init_std = {m.bn_weight_init_std} must be >= 0")
        if dist == "pretrained" and not m.pretrained_path:
            raise ConfigError("model.bn_weight_init_distribution = 'pretrained' reads the BN weights of "
                              "<model.pretrained_path>/<seed>/best.paramOnly; model.pretrained_path is empty")


def feature_dim(m) -> int:
    """D, the size of the features the classifier of ``model.name`` reads."""
    return m.mlp_features_d if m.name in MLP_MODELS else FEATURE_DIMS[m.name]


def _check_etf_size(cfg: Config) -> None:
    """SPEC 5: the ETF's K directions are orthogonal columns in D dimensions, so D >= K."""
    m, k = cfg.model, cfg.data.n_classes
    d = feature_dim(m)
    if m.use_etf and k > d:
        raise ConfigError(f"model.use_etf = true needs D >= K, but model.name = {m.name!r} has D = {d} features "
                          f"and data.n_classes = {k} (K): an ETF classifier has K orthogonal directions in D "
                          f"dimensions; set model.use_etf = false (a Linear classifier) or use a model with D >= {k}")


def _check_stages(cfg: Config) -> None:
    """ResNet-32 has three stages: weight_decay_target_modules' index 4 (layer4) names nothing in it."""
    modules = cfg.optim.weight_decay_target_modules
    if cfg.model.name == "ResNet32" and cfg.optim.weight_decay_limit and modules and 4 in modules:
        raise ConfigError(f"optim.weight_decay_target_modules = {json.dumps(modules)} names module 4 (layer4), which "
                          "model.name = 'ResNet32' does not have; its modules are 0 stem, 1-3 layer1-3, 5 classifier")


def _check_init_weights(cfg: Config) -> None:
    m = cfg.model
    if not m.init_weights:
        return
    if m.name not in TORCHVISION_MODELS:
        raise ConfigError(f"model.init_weights loads a torchvision state_dict; model.name = {m.name!r} is not a "
                          f"torchvision architecture (choose one of {', '.join(TORCHVISION_MODELS)})")
    if cfg.project_name == "second" and m.is_pretrained:
        raise ConfigError("model.init_weights with model.is_pretrained = true: stage 2 loads the stage-1 weights, "
                          "which would replace them; set model.init_weights = '' (give it to stage 1)")


def _check_optim(o: OptimConfig) -> None:
    """Loss / optimiser / weight-decay combinations: refuse what cannot work (as the original
    does), warn about a value that has no effect in this combination (an old args.json may
    carry one, so it stays loadable)."""
    if o.drw > 0 and o.loss_type == "CE":
        _no_effect(f"optim.drw = {o.drw} has no effect with optim.loss_type = 'CE' "
                   "(DRW defers a re-weighted loss: CB, FL, DR or NC)")
    for name in ("nc_lambda1", "nc_lambda2"):
        if getattr(o, name) > 0 and o.loss_type != "NC":
            _no_effect(f"optim.{name} = {getattr(o, name)} has no effect with optim.loss_type = {o.loss_type!r} "
                       "(only NC reads it)")
    target = o.weight_decay_target
    if target is not None and (len(target) != 3 or not all(isinstance(t, bool) for t in target)):
        raise ConfigError(f"optim.weight_decay_target = {json.dumps(target)} is not allowed; "
                          "expected [many, medium, few] as three true/false values, or null (all classes)")
    modules = o.weight_decay_target_modules
    if modules is not None and (not all(isinstance(m, int) and not isinstance(m, bool) and 0 <= m <= 5
                                        for m in modules)):
        raise ConfigError(f"optim.weight_decay_target_modules = {json.dumps(modules)} is not allowed; expected "
                          "module indices 0-5 (0 stem, 1-4 layer1-4, 5 classifier)")
    if o.weight_decay_limit and modules is None:
        raise ConfigError("optim.weight_decay_limit = true needs optim.weight_decay_target_modules "
                          "(module indices 0-5: 0 stem, 1-4 layer1-4, 5 classifier)")
    if modules is not None and not o.weight_decay_limit:
        _no_effect(f"optim.weight_decay_target_modules = {json.dumps(modules)} has no effect with "
                   "optim.weight_decay_limit = false")
    if o.optimizer == "AdamW":
        why = "AdamW's decay is the optimiser's decoupled decay, applied to every trained parameter"
        if o.weight_decay_limit:
            raise ConfigError(f"optim.weight_decay_limit = true is not supported with optim.optimizer = 'AdamW' "
                              f"({why}); use SGD")
        for name in ("weight_decay_conv", "weight_decay_bn", "weight_decay_identity_bn"):
            if not getattr(o, name):
                raise ConfigError(f"optim.{name} = false is not supported with optim.optimizer = 'AdamW' "
                                  f"({why}); use SGD")
        if target is not None and not all(target):
            raise ConfigError(f"optim.weight_decay_target = {json.dumps(target)} is not supported with "
                              f"optim.optimizer = 'AdamW' ({why}); use SGD, or null for all classes")
        if o.momentum != 0.9:
            _no_effect(f"optim.momentum = {o.momentum} has no effect with AdamW (only SGD reads it)")


def _no_effect(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)


# What a run without training epochs (optim.total_epoch_num = 0) reads of the optim section: the
# classifier normalisation applied at load, and the loss (a sigmoid loss initialises a fresh
# classifier's bias).  Every other optim key has no effect there.
EVAL_ONLY_OPTIM_KEYS = frozenset({"total_epoch_num", "norm_type", "norm_param", "loss_type", "cb_type"})


def unused_optim_keys(config: dict) -> dict:
    """{"optim.<key>": value} of the keys a run without training epochs never reads, set away
    from their defaults (empty for a training run)."""
    optim = config.get("optim", {})
    if optim.get("total_epoch_num", 1) != 0:
        return {}
    defaults = dataclasses.asdict(OptimConfig())
    return {f"optim.{k}": v for k, v in optim.items() if k not in EVAL_ONLY_OPTIM_KEYS and v != defaults.get(k, v)}


def recorded_form(config: dict) -> dict:
    """A config (``Config.to_dict()``) as args.json records it: in a run without training epochs,
    the optim keys it never reads are recorded at their defaults, so that nobody reads a value
    into the run that had no effect on it."""
    unused = unused_optim_keys(config)
    if not unused:
        return config
    defaults = dataclasses.asdict(OptimConfig())
    out = dict(config)
    out["optim"] = {k: (defaults[k] if f"optim.{k}" in unused else v) for k, v in config["optim"].items()}
    return out
