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
import functools
import json
import math
import os
import re
import stat
import typing
import unicodedata
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np

from utils.errors import ConfigError  # noqa: F401  (re-exported)


# ---------------------------------------------------------------------------
# Sections.  Field metadata: ``choices`` (allowed values), ``help`` (flag and
# README text), ``check`` (the name of a rule in RANGES or TEXT_RULES).
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


IMB_TYPES = ("exp", "step", "none")
DATASETS = ("Cifar10", "Cifar100", "Digits", "ImageNet", "MiniImagenet", "Helena", "MNIST")
MODELS = ("ResNet34", "ResNet18", "ResNeXt50", "IMResNet34", "IMResNet18",
          "TableMLP", "BNLeNet5", "BNMLP", "MLResBlock")


@dataclass
class DataConfig:
    name: str = _f("Cifar100", "dataset", DATASETS)
    imb_type: str = _f("exp", "imbalance profile: exp (exponential), step (two halves), none (balanced; the original took any other text to mean balanced)", IMB_TYPES)
    imb_factor: float = _f(0.01, "tail/head count ratio (0.01 = imbalance ratio 100)", check="unit_open0")
    n_classes: int = _f(100, "number of classes; must match the dataset", check="classes")
    batch_size: int = _f(64, "training mini-batch size (training needs >= 2: BatchNorm cannot train on one image)",
                         check="batch")
    # --- keys of this project (defaults keep the original's behaviour) ---
    root: str = _f("datasets", "data root folder (downloads land here)", check="path")
    download: bool = _f(True, "download CIFAR with torchvision when absent")
    eval_batch_size: int = _f(0, "batch size for evaluation passes, per process (0 = auto: on CUDA the largest "
                              "power of two <= 1024 x 64 x 64 / input pixels, at most 1024: 1024 for CIFAR, 64 at "
                              "224 x 224; on CPU 64, where small batches stay in cache and run 1.4x faster)",
                              check="batch0")
    num_workers: int = _f(4, "DataLoader workers decoding image files (ImageNet, MiniImagenet; 0 = in the main process)",
                          check="workers")
    helena_counts: str = _f("all", "Helena class sizes (groups, prior, CB weights): all = whole file as the original, "
                            "train = training rows", ("all", "train"))
    eval_hflip: bool = _f(False, "final evaluation averages the logits of each image and its horizontal flip (WB's notebooks)")


@dataclass
class ModelConfig:
    name: str = _f("ResNet34", "backbone", MODELS)
    is_pretrained: bool = _f(False, "stage 2: initialise from the stage-1 run")
    pretrained_path: str = _f("", "stage-1 run directory without the seed (the seed is appended)", check="path")
    load_last_linear: bool = _f(True, "stage 2: load the stage-1 classifier too (false: fresh classifier)")
    load_only_representation: bool = _f(False, "stage 2: load only the backbone, new classifier")
    use_etf: bool = _f(False, "ETF classifier (fixed simplex directions, per-class norms)")
    use_dr_balancer: bool = _f(False, "scale ETF norms by N/(K n_c)")
    train_etf_norm: bool = _f(False, "train the ETF per-class norms")
    normalize_feature: bool = _f(False, "L2-normalise penultimate features")
    etf_norm_rate: float = _f(1.0, "head/tail ratio of the initial ETF norms", check="ratio")
    logit_adjustment_tau: float = _f(0.0, "logit adjustment strength tau (0 = off)", check="tau")
    logit_adjustment_tau_sweep: str = _f("", "tau sweep: 'start:stop:num' or 'a,b,c' (at most 10000 values in [0, 100]); "
                                         "the best tau on validation is used and recorded in args.json ('' = off)")
    logit_adjustment_for_training: bool = _f(False, "additive LA applied in training (z + tau log pi) instead of at evaluation")
    logit_normalization: bool = _f(False, "L2-normalise logits")
    use_additive_logit_adjustment: bool = _f(True, "additive LA (z - tau log pi); false = multiplicative (z / pi^tau)")
    activation_type: str = _f("relu", "activation replacing every ReLU of the backbone (mrelu = max(x, -1))", ("relu", "lrelu", "selu", "elu", "mrelu"))
    activation_param: float = _f(0.03, "negative slope of lrelu (not read by the other activations)", check="unit_closed")
    use_feature_bias: bool = _f(False, "learned bias added to the features")
    bn_weight_init_val: float = _f(1.0, "initial BN weight (legacy; not read)", check="init")
    bn_eps: float = _f(1e-5, "BatchNorm epsilon", check="eps")
    last_relu: bool = _f(False, "ReLU on the pooled features")
    one_param_bn: bool = _f(False, "one shared scale/shift per BN layer (stem and block BNs; gradient = mean over channels)")
    modify_bn_weight: bool = _f(False, "re-initialise BN weights from a distribution")
    bn_weight_init_distribution: Optional[str] = _f(
        None, "distribution for modify_bn_weight", ("uniform", "gauss", "rectified_gauss", "pretrained"))
    pretrained_gamma: Optional[float] = _f(None, "modify_bn_weight=pretrained: scale", check="init")
    pretrained_beta: Optional[float] = _f(None, "modify_bn_weight=pretrained: shift", check="init")
    bn_weight_init_mean: Optional[float] = _f(None, "modify_bn_weight gauss: mean", check="init")
    bn_weight_init_std: Optional[float] = _f(None, "modify_bn_weight gauss: std", check="init_std")
    bn_weight_init_min: Optional[float] = _f(None, "modify_bn_weight uniform: min", check="init")
    bn_weight_init_max: Optional[float] = _f(None, "modify_bn_weight uniform: max", check="init")
    init_identity_bn: bool = _f(True, "modify_bn_weight also on identity-path BNs (stem, downsample)")
    identity_skip: bool = _f(False, "pre-activation residual blocks (BN-act-conv x2, no activation after the sum)")
    mlp_hlayer_n: int = _f(3, "MLP hidden layers (BNMLP, MLResBlock)", check="layers")
    mlp_features_d: int = _f(1024, "MLP width (BNMLP, MLResBlock; at most 2**30 weights in all)", check="width")
    dropout: float = _f(0.0, "dropout (MLP models of the original; only 0 is supported)", check="unit_closed")
    use_bn: bool = _f(True, "BatchNorm in MLP models (only true is supported)")
    add_skip: bool = _f(False, "skip connections in TableMLP")
    ignore_restrict_load: bool = _f(False, "stage 2: load the state dict non-strictly (skipped keys are logged)")


@dataclass
class OptimConfig:
    total_epoch_num: int = _f(320, "training epochs (stage 2: 0 = evaluate only)", check="epochs")
    base_lr: float = _f(0.01, "initial learning rate (cosine-annealed to 0; a rate that is 0 in float32 is refused)",
                       check="lr")
    optimizer: str = _f("SGD", "optimizer (AdamW: decoupled decay on every trained parameter)", ("SGD", "AdamW"))
    momentum: float = _f(0.9, "SGD momentum", check="momentum")
    loss_type: str = _f("CE", "loss: CE; CB class-balanced (cb_type); FL sigmoid focal; DR dot regression; NC CE + feature terms", ("CE", "CB", "FL", "DR", "NC"))
    cb_type: str = _f("softmax", "CB variant (sigmoid and focal set the classifier bias to -log(K-1))", ("softmax", "sigmoid", "focal", "dr"))
    cb_beta: float = _f(0.9999, "class-balanced beta (1 = inverse frequency)", check="unit_closed")
    cb_gamma: float = _f(2.0, "focal gamma (CB focal and FL)", check="gamma")
    drw: int = _f(0, "deferred re-weighting: the first drw epochs train with plain CE, then loss_type "
                        "(below total_epoch_num)", check="epochs")
    nc_lambda1: float = _f(0.0, "NC loss: weight of the within-class feature term", check="weight")
    nc_lambda2: float = _f(0.0, "NC loss: weight of the between-class-mean angle term (subtracted)", check="weight")
    weight_decay: float = _f(0.0, "weight decay, as the explicit penalty wd*||w||^2/2 (AdamW: its decoupled decay)",
                             check="weight")
    weight_decay_conv: bool = _f(True, "decay conv weights")
    weight_decay_bn: bool = _f(True, "decay BN weights and biases")
    weight_decay_identity_bn: bool = _f(True, "decay identity-path BNs (stem, downsample)")
    weight_decay_limit: bool = _f(False, "decay only weight_decay_target_modules")
    weight_decay_target_modules: Optional[list] = _f(None, "module indices decayed when weight_decay_limit (0 stem, 1-4 layers, 5 fc)")
    weight_decay_target: Optional[list] = _f(None, "[many, medium, few]: which classifier rows decay (default all)")
    norm_type: str = _f("none", "classifier normalisation", ("none", "L2", "tau", "maxnorm"))
    norm_param: Optional[float] = _f(None, "L2: norm rate in [1e-4, 1e4] (1); tau: tau in [0, 10] (1.9); maxnorm: "
                                           "threshold in [0, 1] (0.1); null = the value in brackets", check="norm")
    train_bn_bias: bool = _f(True, "train BN biases")
    train_bn_weight: bool = _f(True, "train BN weights")
    features_regularization: float = _f(0.0, "feature regularisation fr*mean ||h||^2/2", check="weight")
    # --- keys of this project ---
    maxnorm_every: str = _f("epoch", "MaxNorm projection after every epoch (WB's code) or step", ("epoch", "step"))
    frozen_bn_mode: str = _f("train", "stage-2 retraining: frozen backbone BN in train mode (original) or eval", ("train", "eval"))
    nonfinite: str = _f("stop", "a NaN/inf training loss: stop the run (keeping the last checkpoint) or skip the step",
                        ("stop", "skip"))
    fdr_every: int = _f(5, "log train/val FDR to TensorBoard every N epochs (0 = never)", check="epochs")
    sgd_impl: str = _f("auto", "SGD implementation, same update (auto = fused on CUDA, torch's default on CPU)",
                       ("auto", "fused", "foreach", "for-loop"))


@dataclass
class Config:
    exp_name: str = _f("naive", "experiment name (a folder under exp/.../<project_name>/: a plain name, no '/', "
                                "no leading or trailing space)", check="name")
    project_name: str = _f("first", "stage", ("first", "second"))
    seeds: int = _f(0, "random seed", check="seed")
    description: str = _f("", "free text (any text; written escaped where it cannot be encoded)")
    save_features: bool = _f(False, "save penultimate features (.npy)")
    param_search: bool = _f(False, "evaluate on the validation set; run folder named by param_search_id")
    param_search_id: int = _f(0, "run folder name when param_search", check="seed")
    save_checkpoint: bool = _f(False, "keep the full checkpoint.ckpt after the run finishes (it is written during "
                                      "the run anyway, see checkpoint_every; false shrinks it to a small marker at the end)")
    load_checkpoint: bool = _f(False, "resume from checkpoint.ckpt (same as --resume)")
    checkpoint_every: int = _f(0, "write checkpoint.ckpt every N epochs; 0 = auto: every epoch on CPU, on a GPU once "
                                  "the time since the last save is >= 20x its duration (saving < 5 % of the time); "
                                  "always after the last epoch and on Ctrl-C", check="epochs")
    checkpoint_every_s: float = _f(0.0, "also write checkpoint.ckpt once this many seconds have passed since the "
                                        "last one (0 = off): bounds the time a crash can cost", check="seconds")
    deterministic: bool = _f(False, "deterministic algorithms (repeatable CPU and CUDA runs; slower on CUDA)")
    device: str = _f("auto", "training device: auto (cuda when available, else cpu), cpu, cuda, or cuda:N "
                              "(N a visible GPU)", check="device")
    # --- speed (README "Performance"); none changes what is computed beyond rounding ---
    precision: str = _f("auto", "autocast dtype of forward passes (auto = bf16 on CUDA with compute capability >= 8.0, "
                                "else fp32; fp32 allows TF32 convolutions on such GPUs, fp32-strict does not)",
                        ("auto", "fp32", "fp32-strict", "bf16"))
    memory_format: str = _f("auto", "layout of images and conv weights (auto = channels_last on CUDA with compute "
                                    "capability >= 8.0, else contiguous)",
                            ("auto", "channels_last", "contiguous"))
    compile: str = _f("off", "torch.compile mode of the forward pass (off = eager)",
                      ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    num_threads: int = _f(0, "CPU threads (0 = OMP_NUM_THREADS if set, else the cores available)", check="threads")
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


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)  # evaluates every annotation: once per class, not per field


def _type_of(cls, name: str):
    return _type_hints(cls)[name]


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
        raise ConfigError(f"{key} = {_short(value)} has the wrong type; expected true or false")
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {_short(value)} has the wrong type; expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} = {_short(value)} has the wrong type; expected an integer")
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {_short(value)} has the wrong type; expected a number")
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
        raise ConfigError(f"{key} = {_short(value)} has the wrong type; expected a string")
    if base is list:
        if isinstance(value, list):
            return list(value)
        raise ConfigError(f"{key} = {_short(value)} has the wrong type; expected a list")
    raise AssertionError(f"unhandled type for {key}: {tp}")  # pragma: no cover


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of allowed values, and how messages and the README show it."""
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    high_shown: str = ""  # the upper bound as written for a reader ("2**20"); default: the number

    def __contains__(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def text(self, integer: bool) -> str:
        kind = "integer" if integer else "number"
        high = self.high_shown or _num(self.high)
        return f"{kind} in {'(' if self.low_open else '['}{_num(self.low)}, {high}{')' if self.high_open else ']'}"

    def violation(self, value, integer: bool) -> str:
        """'must be >= 1 (an integer in [1, 2**20])': the side it missed, then the whole range."""
        if value < self.low or (self.low_open and value == self.low):
            side = f"must be {'>' if self.low_open else '>='} {_num(self.low)}"
        else:
            side = f"must be {'<' if self.high_open else '<='} {self.high_shown or _num(self.high)}"
        return f"{side} ({'an' if integer else 'a'} {self.text(integer)})"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e6 else f"{x:g}"


INT64_MAX = 2 ** 63 - 1

# Every numeric key's allowed values, by the name its field gives in ``check``.  The bounds keep
# what consumes a value working: C longs (threads, seeds), allocations (batch sizes, MLP widths),
# divisions (ratios), float32 (rates that round to 0, exponents that overflow), runs that end.
RANGES = {
    "ge0": Range(0, INT64_MAX, high_shown="2**63 - 1"),
    "gt0": Range(0, 1e6, low_open=True),
    "ge1": Range(1, INT64_MAX, high_shown="2**63 - 1"),
    "ge2": Range(2, INT64_MAX, high_shown="2**63 - 1"),
    "unit_open0": Range(0, 1, low_open=True),
    "unit_closed": Range(0, 1),
    "seed": Range(0, 2 ** 32 - 1, high_shown="2**32 - 1"),
    "threads": Range(0, 4096),
    "classes": Range(2, 100_000),
    "batch": Range(1, 2 ** 20, high_shown="2**20"),
    "batch0": Range(0, 2 ** 20, high_shown="2**20"),
    "workers": Range(0, 256),
    "epochs": Range(0, 100_000),
    "seconds": Range(0, 1e9),
    "ratio": Range(1e-4, 1e4),           # divides: 1 - (r-1) i / ((K-1) r)
    "tau": Range(0, 100),
    "eps": Range(1e-12, 1),
    "init": Range(-1000, 1000),
    "init_std": Range(0, 1000),
    "layers": Range(1, 64),
    "width": Range(1, 16_384),
    "lr": Range(0, 100),
    "momentum": Range(0, 1, high_open=True),  # 1 never forgets a gradient, > 1 diverges
    "gamma": Range(0, 20),
    "weight": Range(0, 100),
    "norm": Range(0, 1e4),               # narrowed by norm_type (_check_norm_param)
}

# Text keys: names and paths must be writable as they are; free text (description) is anything.
TEXT_RULES = {"name": "a plain folder name", "path": "a path", "device": "auto, cpu, cuda or cuda:N"}
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]{1,4})?")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + "..." + text[-10:]


def _check_field(section: str, f: dataclasses.Field, value: Any) -> None:
    key = _key(section, f.name)
    choices = f.metadata.get("choices")
    if choices is not None and value is not None and value not in choices:
        allowed = ", ".join(str(c) for c in choices)
        raise ConfigError(f"{key} = {_short(value)} is not allowed; choose one of: {allowed}")
    rule = f.metadata.get("check")
    if rule is None or value is None:
        return
    if rule in TEXT_RULES:
        _check_text(key, value, rule)
    elif value not in RANGES[rule]:
        raise ConfigError(f"{key} = {_short(value)} {RANGES[rule].violation(value, isinstance(value, int))}")


def unencodable(text: str) -> Optional[str]:
    """The first character that cannot be written as UTF-8 (a lone surrogate), as U+XXXX; else None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return f"U+{ord(text[exc.start]):04X}"


def has_control_character(text: str) -> bool:
    """A newline, tab, escape... (Unicode category Cc): legal in a Linux path, never meant in one."""
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def _check_text(key: str, value: str, rule: str) -> None:
    bad = unencodable(value)
    if bad is not None:
        raise ConfigError(f"{key} = {_short(value)} contains {bad}, a lone surrogate that cannot be written to a "
                          f"file name or a log; give {TEXT_RULES[rule]} in valid Unicode")
    if "\x00" in value:
        raise ConfigError(f"{key} = {_short(value)} contains a NUL character; give {TEXT_RULES[rule]}")
    if rule == "path" and has_control_character(value):
        raise ConfigError(f"{key} = {_short(value)} contains a control character; give {TEXT_RULES[rule]}")
    if rule == "name":
        _check_exp_name(value)
    elif rule == "device" and not DEVICE_PATTERN.fullmatch(value):
        raise ConfigError(f"device = {_short(value)} is not allowed; choose auto, cpu, cuda or cuda:N "
                          "(N = the index of a visible GPU, e.g. cuda:0)")


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
                raise ConfigError(f"{name} = {_short(value)} has the wrong type; expected a JSON object (section)")
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
    _check_norm_param(cfg.optim)
    _check_sizes(cfg)
    _check_schedule(cfg.optim)
    from utils.tau_sweep import check_sweep
    check_sweep(cfg)
    if not cfg.data.root.strip():
        raise ConfigError(f"data.root = {cfg.data.root!r} is empty; give the folder that holds the datasets "
                          "(default: datasets)")
    if cfg.project_name == "second" and cfg.model.is_pretrained and not cfg.model.pretrained_path:
        raise ConfigError("model.pretrained_path is empty; stage 2 needs the stage-1 run directory "
                          "(e.g. exp/Cifar100/ResNet34/first/<exp_name>)")


# norm_param by norm_type (SPEC 7.1, 7.3): the L2 rate divides, tau is an exponent of the row
# norms, the MaxNorm threshold is a fraction of the way from the smallest row norm to the largest.
NORM_PARAM_RANGES = {"L2": RANGES["ratio"], "tau": Range(0, 10), "maxnorm": Range(0, 1)}


def _check_norm_param(o: "OptimConfig") -> None:
    allowed = NORM_PARAM_RANGES.get(o.norm_type)
    if o.norm_param is not None and allowed is not None and o.norm_param not in allowed:
        raise ConfigError(f"optim.norm_param = {_short(o.norm_param)} {allowed.violation(o.norm_param, False)} with "
                          f"optim.norm_type = {o.norm_type!r}")


# Inputs of each dataset as the MLP models see them (flattened C x H x W, or Helena's features).
INPUT_FEATURES = {"Digits": 64, "MNIST": 784, "Cifar10": 3072, "Cifar100": 3072, "ImageNet": 3 * 224 * 224,
                  "MiniImagenet": 3 * 224 * 224, "Helena": 27}
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
    if m.name in ("BNMLP", "MLResBlock"):
        weights = mlp_weights(m.name, cfg.data.name, m.mlp_hlayer_n, m.mlp_features_d)
        if weights > MAX_MLP_WEIGHTS:
            raise ConfigError(f"model.mlp_features_d = {m.mlp_features_d} with model.mlp_hlayer_n = {m.mlp_hlayer_n} "
                              f"asks {m.name} for {weights:.3g} weights ({weights * 4 / 2 ** 30:.0f} GiB of float32, "
                              f"several times that in training); at most 2**30: lower the width or the layers")


def _check_schedule(o: "OptimConfig") -> None:
    """Learning rates that cannot train, and a schedule that never does."""
    if 0 < o.base_lr and float(np.float32(o.base_lr)) < np.finfo(np.float32).tiny:
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
    # a leading '.' would hide the runs (the report skips hidden folders, where --overwrite keeps an old copy)
    bad = (not name.strip() or name.startswith((".", "~")) or "/" in name or "\\" in name
           or name != name.strip() or any(ord(ch) < 32 or ord(ch) == 127 for ch in name)
           or len(name.encode("utf-8")) > 200)
    if bad:
        raise ConfigError(f"exp_name = {_short(name)} is not allowed; use a plain folder name "
                          "(no '/', '\\', control characters, leading '.' or '~', leading or trailing spaces; at most "
                          "200 bytes): "
                          "it becomes a folder under exp/")


MAX_JSON_BYTES = 1 << 20  # a config is a few kB; the limit keeps /dev/zero-like inputs from filling memory


def _refuse_duplicates(pairs: list) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def read_json_file(path: str | Path, label: str = "", error: type = ConfigError) -> Any:
    """The one reader of JSON files (configs, a stage-1 run's args.json, a run's results).

    Only a regular file is read (a FIFO, a device such as /dev/zero or a directory is refused
    before anything is read), at most MAX_JSON_BYTES of it, as UTF-8 (a byte-order mark is
    allowed); a key repeated in one object is refused by name, where ``json`` would silently
    keep the last.  Every problem is one line: ``error(f"{label}: ...")``.
    """
    path = Path(path)
    label = label or str(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then names what it is
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error(f"{label}: file not found") from None
    except (OSError, ValueError) as exc:
        raise error(f"{label}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a device, FIFO or socket)"
            raise error(f"{label}: {kind}, not a JSON file")
        if info.st_size > MAX_JSON_BYTES:
            raise error(f"{label}: {info.st_size} bytes, more than the {MAX_JSON_BYTES} (1 MiB) a JSON file may have")
        with os.fdopen(fd, "rb") as fh:
            fd = -1
            data = fh.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise error(f"{label}: cannot read ({exc.strerror or exc})") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > MAX_JSON_BYTES:
        raise error(f"{label}: it grew beyond {MAX_JSON_BYTES} bytes while it was read (a JSON file may have 1 MiB)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{label}: cannot read (not UTF-8 text: byte {exc.start} is {data[exc.start]:#04x})") from None
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as exc:
        raise error(f"{label}: key {_short(exc.key)} appears twice in one object (JSON keeps only the last, "
                    "silently); keep one") from None
    except json.JSONDecodeError as exc:
        raise error(f"{label}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit number, arrays nested thousands deep
        raise error(f"{label}: unreadable JSON ({type(exc).__name__}: {str(exc)[:80]})") from None


def load_json(path: str | Path) -> Any:
    """A --json_path config file (see read_json_file)."""
    return read_json_file(path, f"--json_path {str(path)!r}")


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
            raise ConfigError(f"project_name = {_short(raw.get('project_name'))} in {json_path}, "
                              f"but this is the {stage} stage ({stage}.py)")
    else:
        raw = STAGE_FLAG_DEFAULTS[stage]
        source = f"{stage}.py defaults"
    if overrides.get("project_name", stage) != stage:
        raise ConfigError(f"--project_name {_short(overrides['project_name'])} does not match this script; "
                          f"{stage}.py always runs project_name {stage!r}")
    raw = _merge(raw, overrides)
    raw = _merge(raw, {"project_name": stage})
    return from_dict(raw, source)


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
        elif f.metadata.get("check") in RANGES:
            allowed = RANGES[f.metadata["check"]].text(base is int)
        elif f.metadata.get("check") in TEXT_RULES:
            allowed = {"name": "folder name (at most 200 bytes)", "path": "path (valid Unicode)",
                       "device": "auto \\| cpu \\| cuda \\| cuda:N"}[f.metadata["check"]]
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
