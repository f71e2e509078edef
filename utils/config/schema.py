"""The configuration's schema: one dataclass per JSON section, with the original's key names.

Field metadata: ``choices`` (allowed values), ``help`` (flag and README text), ``check``
(the name of a value rule in utils/config/values.py).  The JSON layout is the published
implementation's (sections ``data``, ``model``, ``optim`` plus top-level keys), so its files
load unchanged.  Loading (utils/config/load.py) and the rules (utils/config/rules.py) check
everything once, before any work starts.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from utils.names import DATASETS, MODELS


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
    num_workers: int = _f(4, "DataLoader workers decoding image files (ImageNet, MiniImagenet, INat2018, PlacesLT; 0 = in the main process)",
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
    init_weights: str = _f("", "stage 1: start the backbone from this torchvision ImageNet state_dict (a .pth of "
                           "torchvision's names, read weights-only; its fc.* classifier is dropped); torchvision "
                           "models only ('' = random init)", check="path")


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
    checkpoint_every: int = _f(0, "write checkpoint.ckpt every N epochs; 0 = auto: after the first epoch, then once "
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
    num_threads: int = _f(0, "CPU threads (0 = OMP_NUM_THREADS if set, else the free cores: this process's share less those busy with other work)", check="threads")
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



def key_of(section: str, name: str) -> str:
    """The dotted key of a field, as messages and the README name it (``optim.base_lr``)."""
    return f"{section}.{name}" if section else name


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)  # evaluates every annotation: once per class, not per field


def field_type(cls, name: str):
    return _type_hints(cls)[name]


def base_type(tp):
    """(base type, optional?) for the annotations used above."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return base_type(args[0])[0], True
    if origin is list:
        return list, False
    return tp, False


def default_of(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()

