"""What a run is made of, built from its config before anything is written: the device, the
data, the model (with stage 2's weights loaded), the fast path, the resolved evaluation batch
(:func:`prepare`); and what trains it: objective, optimizer and generators
(:func:`make_train_state`).

Every check that can fail on bad input happens here or earlier; models raise plain
ValueErrors, which become one-line ConfigErrors here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from models import build_model
from utils import distributed
from utils.engine.accel import Choice, FastPath, choose_threads, keep_freed_memory, make_fast_path, resolve_eval_batch_size
from utils.data.augment import BatchAugment
from utils.config.schema import Config, ModelConfig
from utils.data.datasets import load_dataset
from utils.engine.ddp import convert_sync_batchnorm, wrap_ddp
from utils.run.determinism import seed_everything
from utils.errors import ConfigError
from utils.data.lt_data import LTData
from utils.names import BEST_PARAM_FILE, IMAGE_FILE_DATASETS, LARGE_INPUT_MODELS, MLP_MODELS, SMALL_MODELS
from utils.engine.objective import init_classifier_bias, make_objective, norm_param
from utils.engine.params import decayed_parameters, describe_parameters, make_optimizer, trained_parameters
from utils.engine.regularizers import MaxNorm, normalise_classifier
from utils.run.init_weights import load_init_weights
from utils.run.runlog import log
from utils.run.stage1 import Stage1Run, adapt_state_dict, apply_bn_weight_init, load_into, read_stage1
from utils.config.sweep_spec import parse_taus
from utils.engine.train import StepGuard, TrainState


@dataclass
class Prepared:
    cfg: Config
    stage: str
    device: torch.device
    data: LTData
    model: nn.Module
    stage1: Optional[Stage1Run]
    fast: FastPath = field(default_factory=FastPath)
    eval_batch_size: int = 64  # data.eval_batch_size resolved for this device (0 = auto)
    threads: Choice = field(default_factory=lambda: Choice("1"))  # num_threads resolved, and why


# ---------------------------------------------------------------------------
# The device
# ---------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    rank_device = distributed.device_for(name)  # under torchrun on CUDA: the GPU of LOCAL_RANK
    if rank_device is not None:
        return rank_device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r} but CUDA is not available on this machine; use auto or cpu")
    return device


def use_device(name: str) -> torch.device:
    """:func:`resolve_device`, and ``cuda:N`` made the current CUDA device, so that kernels,
    NCCL and ``torch.cuda.*`` calls without a device argument also go to GPU N."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


# ---------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------

def prepare(cfg: Config, stage: str, allow_unfinished_stage1: bool = False) -> Prepared:
    """Everything that can fail on bad input, before anything is written."""
    device = use_device(cfg.device)
    threads = choose_threads(cfg.num_threads)
    torch.set_num_threads(int(threads.value))
    if device.type == "cpu":
        keep_freed_memory()
    seed_everything(cfg.seeds)
    stage1 = (read_stage1(cfg, allow_unfinished=allow_unfinished_stage1)
              if (stage == "second" and cfg.model.is_pretrained) else None)
    d = cfg.data
    data = load_dataset(d.name, d.root, d.imb_type, d.imb_factor, d.n_classes, download=d.download,
                        helena_counts=d.helena_counts)
    # resolved once, here, so every evaluation pass and args.json see the same number
    eval_batch_size = resolve_eval_batch_size(d.eval_batch_size, device, data.input_size)
    check_adjustment_range(cfg.model, data)
    model = _model_on_device(cfg, data, stage1, device)
    if distributed.context().enabled and cfg.sync_bn:
        convert_sync_batchnorm(model)  # training-mode statistics over the global batch
    if cfg.optim.norm_type in ("L2", "tau"):
        normalise_classifier(model.classifier, cfg.optim.norm_type, norm_param(cfg.optim))
    fast = make_fast_path(model, device, cfg.precision, cfg.memory_format, cfg.compile)
    return Prepared(cfg, stage, device, data, model, stage1, fast, eval_batch_size, threads)


def _model_on_device(cfg: Config, data: LTData, stage1: Optional[Stage1Run], device: torch.device) -> nn.Module:
    """The model of the config, with stage 1's weights when stage 2 loads them, on ``device``."""
    try:
        model = make_model(cfg.model, data, cfg.seeds)
        init_classifier_bias(cfg.optim, model)  # sigmoid losses: -log(K-1); stage-1 weights loaded below win
        if stage1 is not None:
            _load_stage1(model, cfg.model, stage1)
        model.to(device)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise ConfigError(memory_message(cfg, device, "building the model")) from None
        raise
    return model


def make_model(m: ModelConfig, data: LTData, seed: int = 0) -> nn.Module:
    """The network of ``model.*`` for ``data`` (class counts, input channels and size)."""
    try:
        model = build_model(
            m.name, data.n_classes,
            in_channels=data.in_channels,
            # the original picks the 224-pixel stem by dataset; IMResNet names ask for it too
            small_input=not (m.name in LARGE_INPUT_MODELS or data.name in IMAGE_FILE_DATASETS),
            use_etf=m.use_etf, train_etf_norm=m.train_etf_norm, etf_norm_rate=m.etf_norm_rate,
            normalize_feature=m.normalize_feature, last_relu=m.last_relu,
            use_feature_bias=m.use_feature_bias, logit_normalization=m.logit_normalization,
            bn_eps=m.bn_eps, class_counts=data.class_counts,
            la_tau=m.logit_adjustment_tau, la_for_training=m.logit_adjustment_for_training,
            la_additive=m.use_additive_logit_adjustment,
            **_backbone_options(m, data),
        )
    except ValueError as exc:  # an option the network cannot take (the config rules refuse most first)
        raise ConfigError(f"model.name = {m.name!r}: {exc}") from None
    if m.init_weights:
        loaded = load_init_weights(model, Path(m.init_weights), m.name)
        log.info(f"model.init_weights: {loaded} backbone tensors from {m.init_weights} (classifier fresh)")
    if m.modify_bn_weight:
        apply_bn_weight_init(model, m, seed)
    return model


def _backbone_options(m: ModelConfig, data: LTData) -> dict:
    """The build_model keywords of the model's family: the small networks' input shape and
    MLP size, or the ResNets' options."""
    if m.name not in SMALL_MODELS:
        return dict(activation_type=m.activation_type, activation_param=m.activation_param,
                    identity_skip=m.identity_skip, one_param_bn=m.one_param_bn, use_dr_balancer=m.use_dr_balancer)
    shape = (3, 224, 224) if data.train_images is None else tuple(data.train_images.shape[1:])
    if m.name == "BNLeNet5" and (len(shape) != 3 or min(shape[1:]) < 16):
        raise ConfigError(f"model.name = 'BNLeNet5' needs images of at least 16 x 16 pixels; "
                          f"data.name = {data.name!r} has inputs of shape {' x '.join(map(str, shape))}")
    return {"input_shape": shape, "mlp_hlayer_n": m.mlp_hlayer_n, "mlp_features_d": m.mlp_features_d}


def _load_stage1(model: nn.Module, m: ModelConfig, stage1: Stage1Run) -> None:
    """Stage 2: the stage-1 weights, the classifier converted (ETF <-> Linear) or left fresh."""
    prefix = model.classifier_prefix
    fresh_classifier = m.load_only_representation or not m.load_last_linear
    state = adapt_state_dict(stage1.state_dict, stage1.config.model.use_etf, m.use_etf, fresh_classifier,
                             prefix=prefix)
    stage1.skipped_keys = load_into(model, state, strict=not fresh_classifier, source=stage1.path / BEST_PARAM_FILE,
                                    prefix=prefix, ignore_restrict_load=m.ignore_restrict_load)


def check_adjustment_range(m: ModelConfig, data: LTData) -> None:
    """Multiplicative logit adjustment scales logit c by 1 / pi_c^tau = exp(-tau log pi_c): with
    the rarest class of this dataset, a tau whose factor overflows float32 would turn logits into
    inf and NaN.  Refused before any work, naming the largest tau that fits."""
    if m.use_additive_logit_adjustment:
        return
    counts = data.class_counts
    taus = [m.logit_adjustment_tau] + parse_taus(m.logit_adjustment_tau_sweep)
    rarest = -math.log(min(counts) / sum(counts))
    limit = math.log(float(torch.finfo(torch.float32).max)) / 2  # half the exponent range: logits keep room too
    worst = max(taus)
    if rarest > 0 and worst * rarest > limit:
        key = ("model.logit_adjustment_tau_sweep" if worst != m.logit_adjustment_tau
               else "model.logit_adjustment_tau")
        raise ConfigError(f"{key}: tau {worst:g} with multiplicative adjustment scales the rarest class's logit by "
                          f"1/pi^tau = e^{worst * rarest:.0f}, beyond float32; on {data.name} tau must stay "
                          f"<= {limit / rarest:.2f}")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, the CPU allocator's failure, or Python's MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                  if t is not None)
    if types and isinstance(exc, types):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def memory_message(cfg: Config, device: torch.device, phase: str, eval_batch_size: Optional[int] = None) -> str:
    """Which keys made a run too big for the memory of its device, in one line."""
    m = cfg.model
    if phase == "building the model":
        if m.name in MLP_MODELS:
            keys = f"model.mlp_features_d = {m.mlp_features_d}, model.mlp_hlayer_n = {m.mlp_hlayer_n}"
        else:
            keys = f"model.name = {m.name!r}, data.n_classes = {cfg.data.n_classes}"
        return f"out of memory on {device} {phase} ({keys}); choose a smaller model, or another device"
    shown = cfg.data.eval_batch_size if eval_batch_size is None else eval_batch_size
    return (f"out of memory on {device} {phase} (data.batch_size = {cfg.data.batch_size}, data.eval_batch_size = "
            f"{shown}, model.name = {m.name!r}); lower data.batch_size or data.eval_batch_size")


# ---------------------------------------------------------------------------
# What trains it
# ---------------------------------------------------------------------------

def make_train_state(p: Prepared, augment: BatchAugment, guard: Optional[StepGuard] = None) -> TrainState:
    """What trains, with what objective and optimizer, from which generators: the state
    utils/engine/train.py ``train_one_epoch`` needs (under torchrun, with the DDP forward); ``guard``
    checks every step's loss (utils/engine/guard.py)."""
    cfg, model, o = p.cfg, p.model, p.cfg.optim
    named = trained_parameters(model, p.stage, o)
    trained_ids = {id(prm) for _, prm in named}
    for prm in model.parameters():
        prm.requires_grad_(id(prm) in trained_ids)
    decayed = decayed_parameters(model, named, o, p.data.groups())
    log.info(describe_parameters(o, named, decayed))
    if o.drw > 0:
        log.info(f"DRW: epochs 1-{o.drw} train with plain CE, {o.loss_type} from epoch {o.drw + 1}")
    objective = make_objective(o, p.data.class_counts, decayed, p.device, classifier=model.classifier)
    optimizer = make_optimizer(o, [prm for _, prm in named], objective)  # SGD applies the objective's coupled decay
    project = _maxnorm_projection(model, o)
    # both on the CPU whatever the device: one seed shuffles and augments alike on CPU and CUDA,
    # and checkpoints hold CPU generator states only (a run may resume on another device)
    return TrainState(optimizer=optimizer, objective=objective, augment=augment,
                      batch_size=cfg.data.batch_size, n_classes=p.data.n_classes,
                      shuffle_generator=torch.Generator().manual_seed(cfg.seeds),
                      augment_generator=torch.Generator().manual_seed(cfg.seeds + 1),
                      after_step=project if (project and o.maxnorm_every == "step") else None,
                      set_train_mode=_train_mode(p.stage, o.frozen_bn_mode), fast=p.fast,
                      forward=_distributed_forward(p), guard=guard,
                      project_every_epoch=project if (project and o.maxnorm_every == "epoch") else None)


def _maxnorm_projection(model: nn.Module, o):
    if o.norm_type != "maxnorm":
        return None
    maxnorm = MaxNorm(model.classifier, norm_param(o))
    log.info(f"MaxNorm threshold {maxnorm.threshold:.5f} (fixed at load), projected every {o.maxnorm_every}")
    return lambda: maxnorm.project(model.classifier)


def _train_mode(stage: str, frozen_bn_mode: str):
    """How the model enters training: stage-2 retraining may keep the frozen backbone's BN in eval mode."""
    def set_train_mode(m: nn.Module) -> None:
        m.train()
        if stage == "second" and frozen_bn_mode == "eval":
            for module in m.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
    return set_train_mode


def _distributed_forward(p: Prepared):
    """Under torchrun: the DDP module around features + classify (every rank draws the same
    shuffle and augmentation numbers: utils/distributed.py); None in one process."""
    if not distributed.context().enabled:
        return None
    forward = wrap_ddp(p.model, p.device, p.cfg.sync_bn)
    if p.cfg.compile != "off":
        forward = torch.compile(forward, mode=None if p.cfg.compile == "default" else p.cfg.compile)
    return forward
