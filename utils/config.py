"""Typed, validated run configuration.

The JSON layout is the published implementation's (sections ``data``,
``model``, ``optim`` plus top-level keys), so its files load unchanged.  The
difference is that everything is checked once, here, before any work starts:
an unknown key, a value of the wrong type or a value outside its choices is a
:class:`ConfigError` naming the key, the value and what is allowed.  Nothing
downstream reads raw dicts or asks whether a key exists.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from utils.errors import ConfigError  # noqa: F401  (re-exported)


# ---------------------------------------------------------------------------
# Sections.  Field metadata: ``choices`` (allowed values), ``help`` (flag and
# README text), ``check`` (a range rule, see _RANGE_RULES).
# ---------------------------------------------------------------------------

def _f(default, help: str, choices: Optional[tuple] = None, check: Optional[str] = None):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if check is not None:
        meta["check"] = check
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


DATASETS = ("Cifar10", "Cifar100", "Digits", "ImageNet", "MiniImagenet", "Helena", "MNIST")
MODELS = ("ResNet34", "ResNet18", "ResNeXt50", "IMResNet34", "IMResNet18",
          "TableMLP", "BNLeNet5", "BNMLP", "MLResBlock")


@dataclass
class DataConfig:
    name: str = _f("Cifar100", "dataset", DATASETS)
    imb_type: str = _f("exp", "imbalance profile: exp | step | anything else = balanced")
    imb_factor: float = _f(0.01, "tail/head count ratio (0.01 = imbalance ratio 100)", check="unit_open0")
    n_classes: int = _f(100, "number of classes; must match the dataset", check="ge2")
    batch_size: int = _f(64, "training mini-batch size", check="ge1")
    # --- keys of this project (defaults keep the original's behaviour) ---
    root: str = _f("datasets", "data root folder (downloads land here)")
    download: bool = _f(True, "download CIFAR with torchvision when absent")
    eval_batch_size: int = _f(0, "batch size for evaluation passes, per process (0 = auto: on CUDA the largest "
                              "power of two <= 1024 x 64 x 64 / input pixels, at most 1024: 1024 for CIFAR, 64 at "
                              "224 x 224; on CPU 64, where small batches stay in cache and run 1.4x faster)",
                              check="ge0")
    num_workers: int = _f(4, "DataLoader workers decoding image files (ImageNet, MiniImagenet; 0 = in the main process)",
                          check="ge0")
    helena_counts: str = _f("all", "Helena class sizes (groups, prior, CB weights): all = whole file as the original, "
                            "train = training rows", ("all", "train"))
    eval_hflip: bool = _f(False, "final evaluation averages the logits of each image and its horizontal flip (WB's notebooks)")


@dataclass
class ModelConfig:
    name: str = _f("ResNet34", "backbone", MODELS)
    is_pretrained: bool = _f(False, "stage 2: initialise from the stage-1 run")
    pretrained_path: str = _f("", "stage-1 run directory without the seed (the seed is appended)")
    load_last_linear: bool = _f(True, "stage 2: load the stage-1 classifier too (false: fresh classifier)")
    load_only_representation: bool = _f(False, "stage 2: load only the backbone, new classifier")
    use_etf: bool = _f(False, "ETF classifier (fixed simplex directions, per-class norms)")
    use_dr_balancer: bool = _f(False, "scale ETF norms by N/(K n_c)")
    train_etf_norm: bool = _f(False, "train the ETF per-class norms")
    normalize_feature: bool = _f(False, "L2-normalise penultimate features")
    etf_norm_rate: float = _f(1.0, "head/tail ratio of the initial ETF norms", check="gt0")
    logit_adjustment_tau: float = _f(0.0, "logit adjustment strength tau (0 = off)", check="ge0")
    logit_adjustment_tau_sweep: str = _f("", "tau sweep: 'start:stop:num' or 'a,b,c'; the best tau on validation is used ('' = off)")
    logit_adjustment_for_training: bool = _f(False, "additive LA applied in training (z + tau log pi) instead of at evaluation")
    logit_normalization: bool = _f(False, "L2-normalise logits")
    use_additive_logit_adjustment: bool = _f(True, "additive LA (z - tau log pi); false = multiplicative (z / pi^tau)")
    activation_type: str = _f("relu", "activation replacing every ReLU of the backbone (mrelu = max(x, -1))", ("relu", "lrelu", "selu", "elu", "mrelu"))
    activation_param: float = _f(0.03, "negative slope of lrelu (not read by the other activations)")
    use_feature_bias: bool = _f(False, "learned bias added to the features")
    bn_weight_init_val: float = _f(1.0, "initial BN weight (legacy)")
    bn_eps: float = _f(1e-5, "BatchNorm epsilon", check="gt0")
    last_relu: bool = _f(False, "ReLU on the pooled features")
    one_param_bn: bool = _f(False, "one shared scale/shift per BN layer (stem and block BNs; gradient = mean over channels)")
    modify_bn_weight: bool = _f(False, "re-initialise BN weights from a distribution")
    bn_weight_init_distribution: Optional[str] = _f(
        None, "distribution for modify_bn_weight", ("uniform", "gauss", "rectified_gauss", "pretrained"))
    pretrained_gamma: Optional[float] = _f(None, "modify_bn_weight=pretrained: scale")
    pretrained_beta: Optional[float] = _f(None, "modify_bn_weight=pretrained: shift")
    bn_weight_init_mean: Optional[float] = _f(None, "modify_bn_weight gauss: mean")
    bn_weight_init_std: Optional[float] = _f(None, "modify_bn_weight gauss: std")
    bn_weight_init_min: Optional[float] = _f(None, "modify_bn_weight uniform: min")
    bn_weight_init_max: Optional[float] = _f(None, "modify_bn_weight uniform: max")
    init_identity_bn: bool = _f(True, "modify_bn_weight also on identity-path BNs (stem, downsample)")
    identity_skip: bool = _f(False, "pre-activation residual blocks (BN-act-conv x2, no activation after the sum)")
    mlp_hlayer_n: int = _f(3, "MLP hidden layers (tabular/MNIST models)", check="ge1")
    mlp_features_d: int = _f(1024, "MLP width (tabular/MNIST models)", check="ge1")
    dropout: float = _f(0.0, "dropout (MLP models of the original; only 0 is supported)")
    use_bn: bool = _f(True, "BatchNorm in MLP models (only true is supported)")
    add_skip: bool = _f(False, "skip connections in TableMLP")
    ignore_restrict_load: bool = _f(False, "stage 2: load the state dict non-strictly (skipped keys are logged)")


@dataclass
class OptimConfig:
    total_epoch_num: int = _f(320, "training epochs (stage 2: 0 = evaluate only)", check="ge0")
    base_lr: float = _f(0.01, "initial learning rate (cosine-annealed to 0)", check="ge0")
    optimizer: str = _f("SGD", "optimizer (AdamW: decoupled decay on every trained parameter)", ("SGD", "AdamW"))
    momentum: float = _f(0.9, "SGD momentum", check="ge0")
    loss_type: str = _f("CE", "loss: CE; CB class-balanced (cb_type); FL sigmoid focal; DR dot regression; NC CE + feature terms", ("CE", "CB", "FL", "DR", "NC"))
    cb_type: str = _f("softmax", "CB variant (sigmoid and focal set the classifier bias to -log(K-1))", ("softmax", "sigmoid", "focal", "dr"))
    cb_beta: float = _f(0.9999, "class-balanced beta (1 = inverse frequency)", check="unit_closed")
    cb_gamma: float = _f(2.0, "focal gamma (CB focal and FL)", check="ge0")
    drw: int = _f(0, "deferred re-weighting: the first drw epochs train with plain CE, then loss_type", check="ge0")
    nc_lambda1: float = _f(0.0, "NC loss: weight of the within-class feature term", check="ge0")
    nc_lambda2: float = _f(0.0, "NC loss: weight of the between-class-mean angle term (subtracted)", check="ge0")
    weight_decay: float = _f(0.0, "weight decay, as the explicit penalty wd*||w||^2/2 (AdamW: its decoupled decay)", check="ge0")
    weight_decay_conv: bool = _f(True, "decay conv weights")
    weight_decay_bn: bool = _f(True, "decay BN weights and biases")
    weight_decay_identity_bn: bool = _f(True, "decay identity-path BNs (stem, downsample)")
    weight_decay_limit: bool = _f(False, "decay only weight_decay_target_modules")
    weight_decay_target_modules: Optional[list] = _f(None, "module indices decayed when weight_decay_limit (0 stem, 1-4 layers, 5 fc)")
    weight_decay_target: Optional[list] = _f(None, "[many, medium, few]: which classifier rows decay (default all)")
    norm_type: str = _f("none", "classifier normalisation", ("none", "L2", "tau", "maxnorm"))
    norm_param: Optional[float] = _f(None, "L2: norm rate (1); tau: tau (1.9); maxnorm: threshold (0.1)")
    train_bn_bias: bool = _f(True, "train BN biases")
    train_bn_weight: bool = _f(True, "train BN weights")
    features_regularization: float = _f(0.0, "feature regularisation fr*mean ||h||^2/2", check="ge0")
    # --- keys of this project ---
    maxnorm_every: str = _f("epoch", "MaxNorm projection after every epoch (WB's code) or step", ("epoch", "step"))
    frozen_bn_mode: str = _f("train", "stage-2 retraining: frozen backbone BN in train mode (original) or eval", ("train", "eval"))
    nonfinite: str = _f("stop", "a NaN/inf training loss: stop the run (keeping the last checkpoint) or skip the step",
                        ("stop", "skip"))
    fdr_every: int = _f(5, "log train/val FDR to TensorBoard every N epochs (0 = never)", check="ge0")
    sgd_impl: str = _f("auto", "SGD implementation, same update (auto = fused on CUDA, torch's default on CPU)",
                       ("auto", "fused", "foreach", "for-loop"))


@dataclass
class Config:
    exp_name: str = _f("naive", "experiment name (a folder under exp/.../<project_name>/)")
    project_name: str = _f("first", "stage", ("first", "second"))
    seeds: int = _f(0, "random seed", check="seed")
    description: str = _f("", "free text")
    save_features: bool = _f(False, "save penultimate features (.npy)")
    param_search: bool = _f(False, "evaluate on the validation set; run folder named by param_search_id")
    param_search_id: int = _f(0, "run folder name when param_search", check="ge0")
    save_checkpoint: bool = _f(False, "keep the full checkpoint.ckpt after the run finishes (it is written during "
                                      "the run anyway, see checkpoint_every; false shrinks it to a small marker at the end)")
    load_checkpoint: bool = _f(False, "resume from checkpoint.ckpt (same as --resume)")
    checkpoint_every: int = _f(0, "write checkpoint.ckpt every N epochs; 0 = auto: every epoch on CPU, on a GPU once "
                                  "the time since the last save is >= 20x its duration (saving < 5 % of the time); "
                                  "always after the last epoch and on Ctrl-C", check="ge0")
    checkpoint_every_s: float = _f(0.0, "also write checkpoint.ckpt once this many seconds have passed since the "
                                        "last one (0 = off): bounds the time a crash can cost", check="ge0")
    deterministic: bool = _f(False, "deterministic algorithms (repeatable CPU and CUDA runs; slower on CUDA)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    # --- speed (README "Performance"); none changes what is computed beyond rounding ---
    precision: str = _f("auto", "autocast dtype of forward passes (auto = bf16 on CUDA with compute capability >= 8.0, "
                                "else fp32; fp32 allows TF32 convolutions on such GPUs, fp32-strict does not)",
                        ("auto", "fp32", "fp32-strict", "bf16"))
    memory_format: str = _f("auto", "layout of images and conv weights (auto = channels_last on CUDA with compute "
                                    "capability >= 8.0, else contiguous)",
                            ("auto", "channels_last", "contiguous"))
    compile: str = _f("off", "torch.compile mode of the forward pass (off = eager)",
                      ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    num_threads: int = _f(0, "CPU threads (0 = OMP_NUM_THREADS if set, else the cores available)", check="ge0")
    sync_bn: bool = _f(True, "under torchrun: BatchNorm statistics of the global batch, over all processes "
                             "(false: each process's own part; one process: no effect)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_subdir(self) -> Path:
        """<data.name>/<model.name>/<project_name>/<exp_name>/<seed>, relative to exp/."""
        leaf = str(self.param_search_id) if self.param_search else str(self.seeds)
        return Path(self.data.name) / self.model.name / self.project_name / self.exp_name / leaf


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig}

# Keys that the original's own JSON files carry but its code never reads.
LEGACY_KEYS = {("model", "encoder_num_layers")}

# What the original's scripts used when no JSON was given (their argparse
# defaults), applied on top of the dataclass defaults in that case only.  Both scripts also set
# weight_decay_target = [False, False, False] there: no classifier row decays.
STAGE_FLAG_DEFAULTS = {
    "first": {
        "exp_name": "naive",
        "model": {"use_etf": True, "logit_adjustment_tau": 1.0, "logit_adjustment_for_training": True},
        "optim": {"total_epoch_num": 320, "base_lr": 0.01, "cb_beta": 0.1,
                  "weight_decay_target": [False, False, False]},
    },
    "second": {
        "exp_name": "WB", "project_name": "second",
        "model": {"is_pretrained": True, "pretrained_path": "./exp/Cifar10/ResNet34/first/wd_5e-3",
                  "use_etf": False, "train_etf_norm": True},
        "optim": {"total_epoch_num": 10, "base_lr": 0.0, "norm_type": "L2", "norm_param": 1 / 15.5,
                  "weight_decay_target": [False, False, False]},
    },
}

# Features whose keys are accepted but whose code is not built yet: setting
# one of them away from the value shown is refused (never silently ignored).
NOT_BUILT = {
    ("model", "dropout"): (0.0,),
    ("model", "use_bn"): (True,),
    ("model", "add_skip"): (False,),
}


# ---------------------------------------------------------------------------
# Value parsing and checking
# ---------------------------------------------------------------------------

def _key(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _type_of(cls, name: str):
    hints = typing.get_type_hints(cls)
    return hints[name]


def _base_type(tp):
    """(base type, optional?) for the annotations used above."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])[0], True
    if origin is list:
        return list, False
    return tp, False


def _coerce(value: Any, tp, key: str) -> Any:
    """Check a JSON value against a field type; return it normalised."""
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} = null is not allowed; expected {base.__name__}")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r} has the wrong type; expected true or false")
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} = {value!r} has the wrong type; expected an integer")
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key} = {_short(value)} must be a finite number")
        return number
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} = {value!r} has the wrong type; expected a string")
    if base is list:
        if isinstance(value, list):
            return list(value)
        raise ConfigError(f"{key} = {value!r} has the wrong type; expected a list")
    raise AssertionError(f"unhandled type for {key}: {tp}")  # pragma: no cover


_RANGE_RULES = {
    "ge0": (lambda v: v >= 0, "must be >= 0"),
    "gt0": (lambda v: v > 0, "must be > 0"),
    "ge1": (lambda v: v >= 1, "must be >= 1"),
    "ge2": (lambda v: v >= 2, "must be >= 2"),
    "unit_open0": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "unit_closed": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "must be an integer in [0, 2**32 - 1]"),
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + "..." + text[-10:]


def _check_field(section: str, f: dataclasses.Field, value: Any) -> None:
    key = _key(section, f.name)
    choices = f.metadata.get("choices")
    if choices is not None and value is not None and value not in choices:
        allowed = ", ".join(str(c) for c in choices)
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of: {allowed}")
    rule = f.metadata.get("check")
    if rule is not None and value is not None:
        ok, text = _RANGE_RULES[rule]
        if not ok(value):
            raise ConfigError(f"{key} = {_short(value)} {text}")


def _build_section(cls, section: str, raw: dict, source: str):
    known = {f.name: f for f in fields(cls)}
    values = {}
    for name, value in raw.items():
        if name not in known:
            if (section, name) in LEGACY_KEYS:
                warnings.warn(f"{source}: ignoring legacy key {_key(section, name)} (never read by the original either)",
                              stacklevel=3)
                continue
            raise ConfigError(_unknown_key_message(section, name, known))
        values[name] = _coerce(value, _type_of(cls, name), _key(section, name))
    return cls(**values)


def _unknown_key_message(section: str, name: str, known) -> str:
    import difflib
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {_key(section, close[0])!r}?" if close else ""
    where = f"section '{section}'" if section else "the top level"
    return f"unknown key {_key(section, name)!r} in {where}{hint}"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(raw: dict, source: str = "config") -> Config:
    """Build and validate a Config from a JSON-like dict (the original's layout)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    top_known = {f.name for f in fields(Config)} - set(SECTIONS)
    top_values = {}
    sections = {}
    for name, value in raw.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{name} = {value!r} has the wrong type; expected a JSON object (section)")
            sections[name] = _build_section(SECTIONS[name], name, value, source)
        elif name in top_known:
            top_values[name] = _coerce(value, _type_of(Config, name), name)
        else:
            raise ConfigError(_unknown_key_message("", name, top_known | set(SECTIONS)))
    cfg = Config(**top_values, **sections)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Field choices and ranges, cross-field rules, and not-yet-built features."""
    for section, obj in (("", cfg), ("data", cfg.data), ("model", cfg.model), ("optim", cfg.optim)):
        for f in fields(obj):
            if f.name in SECTIONS and section == "":
                continue
            _check_field(section, f, getattr(obj, f.name))
    _check_model_options(cfg)
    for (section, name), allowed in NOT_BUILT.items():
        obj = getattr(cfg, section) if section else cfg
        value = getattr(obj, name)
        if value not in allowed:
            shown = ", ".join(json.dumps(a) for a in allowed)
            raise ConfigError(f"{_key(section, name)} = {json.dumps(value)} is not implemented in this version "
                              f"(supported: {shown})")
    if (cfg.data.name == "Helena") != (cfg.model.name == "TableMLP"):
        raise ConfigError(f"data.name = {cfg.data.name!r} with model.name = {cfg.model.name!r}: Helena is a feature "
                          "table and needs model.name TableMLP; TableMLP is for Helena only")
    if cfg.data.eval_hflip and cfg.data.name == "Helena":
        raise ConfigError("data.eval_hflip = true flips images; Helena is a feature table (set it to false)")
    _check_optim(cfg.optim)
    from utils.tau_sweep import check_sweep
    check_sweep(cfg)
    _check_exp_name(cfg.exp_name)
    for key, value in (("data.root", cfg.data.root), ("model.pretrained_path", cfg.model.pretrained_path)):
        if "\x00" in value:
            raise ConfigError(f"{key} = {value!r} contains a NUL character; give a plain path")
    if cfg.project_name == "second" and cfg.model.is_pretrained and not cfg.model.pretrained_path:
        raise ConfigError("model.pretrained_path is empty; stage 2 needs the stage-1 run directory "
                          "(e.g. exp/Cifar100/ResNet34/first/<exp_name>)")


RESNET_MODELS = ("ResNet34", "ResNet18", "ResNeXt50", "IMResNet34", "IMResNet18")
BASIC_BLOCK_MODELS = ("ResNet34", "ResNet18", "IMResNet34", "IMResNet18")
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


def _check_exp_name(name: str) -> None:
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("~")
           or any(ord(ch) < 32 or ord(ch) == 127 for ch in name) or len(name.encode("utf-8", "replace")) > 200)
    if bad:
        raise ConfigError(f"exp_name = {name!r} is not allowed; use a plain folder name "
                          "(no '/', '\\', '..'), it becomes a folder under exp/")


def load_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--json_path {str(path)!r}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--json_path {str(path)!r}: cannot read ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit number, arrays nested thousands deep
        raise ConfigError(f"{path}: unreadable JSON ({type(exc).__name__}: {str(exc)[:80]})") from None


# ---------------------------------------------------------------------------
# Command-line flags: every field is a flag, named as the original named them
# (--exp_name, --data_imb_factor, --model_use_etf, --optim_weight_decay, ...).
# Flags given together with --json_path override the JSON value.
# ---------------------------------------------------------------------------

def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "y", "on"):
        return True
    if low in ("false", "0", "no", "n", "off"):
        return False
    raise ValueError(f"expected true/false/1/0, got {text!r}")


def _parse_flag_value(text: str, tp, key: str) -> Any:
    base, optional = _base_type(tp)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            return parse_bool(text)
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is list:
            text = text.strip()
            if text.startswith("["):
                return json.loads(text)
            return [json.loads(t) if t.strip() not in ("",) else t for t in text.split(",")]
        return text
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--{key.replace('.', '_')} {text!r}: {exc}") from None


def flag_specs():
    """(flag name, section, field) for every configurable field."""
    for f in fields(Config):
        if f.name in SECTIONS:
            continue
        if f.name == "seeds":
            continue  # handled by the entry points (several seeds allowed)
        yield f.name, "", f
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            yield f"{section}_{f.name}", section, f


def add_config_flags(parser) -> None:
    import argparse
    groups = {"": parser.add_argument_group("run"),
              "data": parser.add_argument_group("data (JSON section 'data')"),
              "model": parser.add_argument_group("model (JSON section 'model')"),
              "optim": parser.add_argument_group("optim (JSON section 'optim')")}
    for flag, section, f in flag_specs():
        base, _ = _base_type(_type_of(SECTIONS.get(section, Config), f.name))
        meta = {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR", list: "LIST"}[base]
        choices = f.metadata.get("choices")
        help_text = f.metadata["help"]
        if choices:
            help_text += f" {{{', '.join(map(str, choices))}}}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text += f" (default: {default})"
        bare = {"nargs": "?", "const": "true"} if base is bool else {}  # --deterministic alone means true
        groups[section].add_argument(f"--{flag}", metavar=meta, default=argparse.SUPPRESS,
                                     help=help_text.replace("%", "%%"), **bare)


def overrides_from_flags(namespace) -> dict:
    """Nested dict of the flags the user actually gave."""
    given = vars(namespace)
    out: dict = {}
    for flag, section, f in flag_specs():
        if flag not in given:
            continue
        cls = SECTIONS.get(section, Config)
        value = _parse_flag_value(given[flag], _type_of(cls, f.name), _key(section, f.name))
        if section:
            out.setdefault(section, {})[f.name] = value
        else:
            out[f.name] = value
    return out


def resolve(stage: str, json_path: Optional[str], overrides: dict) -> Config:
    """JSON (or the original's flag defaults for this stage) + given flags -> validated Config."""
    if json_path:
        raw = load_json(json_path)
        source = str(json_path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{json_path}: the top level must be a JSON object {{...}}, not {type(raw).__name__}")
        if isinstance(raw, dict) and raw.get("project_name", stage) != stage:
            raise ConfigError(f"project_name = {raw.get('project_name')!r} in {json_path}, "
                              f"but this is the {stage} stage ({stage}.py)")
    else:
        raw = STAGE_FLAG_DEFAULTS[stage]
        source = f"{stage}.py defaults"
    if overrides.get("project_name", stage) != stage:
        raise ConfigError(f"--project_name {overrides['project_name']!r} does not match this script; "
                          f"{stage}.py always runs project_name {stage!r}")
    raw = _merge(raw, overrides)
    raw = _merge(raw, {"project_name": stage})
    return from_dict(raw, source)


_RANGE_TEXT = {"ge0": "number >= 0", "gt0": "number > 0", "ge1": "integer >= 1", "ge2": "integer >= 2",
               "unit_open0": "(0, 1]", "unit_closed": "[0, 1]", "seed": "integer in [0, 2**32 - 1]"}


def field_table() -> list[tuple[str, str, str, str]]:
    """(key, default, allowed, meaning) rows for the README's config table."""
    rows = []
    specs = list(flag_specs())
    seeds = next(f for f in fields(Config) if f.name == "seeds")
    specs.insert(2, ("seeds", "", seeds))
    for flag, section, f in specs:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        base, optional = _base_type(_type_of(SECTIONS.get(section, Config), f.name))
        choices = f.metadata.get("choices")
        if choices:
            allowed = " \\| ".join(map(str, choices))
        elif f.metadata.get("check"):
            allowed = _RANGE_TEXT[f.metadata["check"]]
            if base is int:
                allowed = allowed.replace("number", "integer")
        else:
            allowed = {bool: "true \\| false", int: "integer", float: "number", str: "string", list: "list"}[base]
        if optional:
            allowed += " or null"
        built = NOT_BUILT.get((section, f.name))
        if built is not None:
            allowed += " (this version: " + ", ".join(json.dumps(b) for b in built) + ")"
        rows.append((_key(section, f.name), json.dumps(default), allowed, f.metadata["help"]))
    return rows


if __name__ == "__main__":  # python -m utils.config  -> the README's config table
    print("| key | default | allowed | meaning |")
    print("|---|---|---|---|")
    for row in field_table():
        key, default, allowed, meaning = row
        print(f"| `{key}` | `{default}` | {allowed} | {meaning.replace('|', chr(92) + '|')} |")
