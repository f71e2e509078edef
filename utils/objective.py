"""The objective and the optimiser: which parameters train, which decay, and
the loss as a sum of named terms (each logged on its own).

Losses (SPEC 6.2): CE; CB with cb_type softmax | sigmoid | focal | dr; FL
(sigmoid focal, all class weights 1); DR (dot regression); NC (CE + the
within-class and between-class-angle feature terms).  DRW: during the first
``drw`` epochs every loss but CE falls back to plain CE (the original's
0-based ``drw <= epoch`` test), the term keeping its name so that the logged
columns stay the same.

Weight decay (SPEC 6.1) is the term ``weight_decay * sum ||w||^2 / 2`` over the
*decayed* parameters, a subset of the trained ones narrowed by
``weight_decay_conv/bn/identity_bn/limit/target``; with AdamW it is the
optimiser's decoupled decay on every trained parameter instead.  With SGD, the
gradient of the term on whole decayed tensors, ``weight_decay * w``, is what
SGD's own (coupled) ``weight_decay`` adds to the gradient before momentum, so
those tensors get it there, in one fused or multi-tensor kernel, and the term's
value is computed without a graph (SPEC 6.1 allows exactly this;
tests/test_weight_decay.py shows that the loss, the gradients and the SGD steps
agree to float32 rounding).  Only classifier rows picked by
``weight_decay_target`` keep a term with a gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from utils.accel import sgd_kwargs
from utils.config import Config
from utils.losses import (class_balanced_focal, class_balanced_sigmoid, class_balanced_softmax,
                          class_balanced_weights, cross_entropy, dot_regression, nc_terms, sigmoid_bias_init)
from utils.regularizers import (DEFAULT_NORM_PARAM, classifier_weight, feature_penalty, weight_decay_penalty,
                                weight_decay_penalty_value)

GROUP_NAMES = ("Many", "Medium", "Few")


def norm_param(cfg: Config) -> float:
    o = cfg.optim
    return DEFAULT_NORM_PARAM[o.norm_type] if o.norm_param is None else o.norm_param


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------

def main_loss_name(cfg: Config) -> str:
    """Name of the loss term in the logs / metrics.csv (``train_<name>``)."""
    o = cfg.optim
    if o.loss_type == "CB":
        return "cb" if o.cb_type == "softmax" else f"cb_{o.cb_type}"
    return {"CE": "ce", "FL": "focal", "DR": "dr", "NC": "ce"}[o.loss_type]


def uses_sigmoid(cfg: Config) -> bool:
    """The sigmoid-based losses: CB sigmoid / focal and FL."""
    o = cfg.optim
    return o.loss_type == "FL" or (o.loss_type == "CB" and o.cb_type in ("sigmoid", "focal"))


@torch.no_grad()
def init_classifier_bias(cfg: Config, model: nn.Module) -> Optional[float]:
    """The sigmoid losses start every class at probability 1/K: bias = -log(K-1).
    Done on the freshly built model, so stage-1 weights loaded afterwards win
    (as in the original, where the weights are loaded after the model is built)."""
    if not uses_sigmoid(cfg):
        return None
    value = sigmoid_bias_init(model.n_classes)
    model.classifier.bias.fill_(value)
    return value


def drw_active(cfg: Config, epoch: int) -> bool:
    """True while the re-weighted loss is replaced by plain CE (1-based ``epoch`` <= drw)."""
    return cfg.optim.loss_type != "CE" and epoch <= cfg.optim.drw


@dataclass
class DecayEntry:
    """One decayed tensor; ``rows`` indexes classifier rows (None = the whole tensor).

    The row indices are a long tensor on the parameter's device, fixed once: selecting
    with them is a gather (a boolean mask would make every step wait for the device)."""
    name: str
    param: nn.Parameter
    rows: Optional[torch.Tensor] = None

    def tensor(self) -> torch.Tensor:
        return self.param if self.rows is None else self.param.index_select(0, self.rows)

    def numel(self) -> int:
        if self.rows is None:
            return self.param.numel()
        return self.rows.numel() * (self.param.numel() // max(self.param.shape[0], 1))


def coupled_decay(cfg: Config, decayed: Sequence[DecayEntry]) -> list[nn.Parameter]:
    """The decayed tensors whose decay gradient SGD applies through its ``weight_decay``:
    the whole ones, when the optimiser is SGD and the decay is on."""
    o = cfg.optim
    if o.optimizer != "SGD" or o.weight_decay <= 0:
        return []
    return [d.param for d in decayed if d.rows is None]


class Objective:
    """``objective(logits, labels, features) -> {term name: value}``; the loss is the sum.

    ``set_epoch(epoch)`` (1-based) is called by the training loop before each
    epoch; it switches DRW.  ``classifier`` is needed by the DR losses.
    ``couple_decay=False`` keeps the whole weight-decay term with its gradient (the
    published code's way; for references and the benchmark's naive pipeline).
    """

    def __init__(self, cfg: Config, class_counts: Sequence[int], decayed: Sequence, device: torch.device,
                 classifier: Optional[nn.Module] = None, couple_decay: bool = True):
        o = cfg.optim
        self.cfg = cfg
        self.main_name = main_loss_name(cfg)
        self.decayed = [d if isinstance(d, DecayEntry) else DecayEntry("", d) for d in decayed]
        self.classifier = classifier
        self.n_classes = len(class_counts)
        # no term at all when nothing decays (e.g. stage 2 with weight_decay_target all false)
        self.decay_term = o.weight_decay > 0 and o.optimizer != "AdamW" and len(self.decayed) > 0
        # the optimiser applies these tensors' decay gradient (make_optimizer reads this list)
        self.coupled_decay = coupled_decay(cfg, self.decayed) if couple_decay else []
        coupled = {id(p) for p in self.coupled_decay}
        self.explicit_decay = [d for d in self.decayed if id(d.param) not in coupled]
        self.fallback_to_ce = False
        self.weights = None
        if o.loss_type == "CB":
            self.weights = class_balanced_weights(class_counts, o.cb_beta).to(device)
        elif o.loss_type in ("FL", "DR"):
            self.weights = torch.ones(len(class_counts), device=device)
        if (o.loss_type == "DR" or (o.loss_type == "CB" and o.cb_type == "dr")) and classifier is None:
            raise ValueError("the dot-regression losses need the classifier")

    def set_epoch(self, epoch: int) -> None:
        self.fallback_to_ce = drw_active(self.cfg, epoch)

    def main(self, logits, labels, features) -> dict:
        o = self.cfg.optim
        if o.loss_type == "CE" or self.fallback_to_ce:
            terms = {self.main_name: cross_entropy(logits, labels)}
            if o.loss_type == "NC":
                zero = logits.new_zeros((), dtype=torch.float32)
                terms.update(nc_within=zero, nc_angle=zero)
            return terms
        kind = o.cb_type if o.loss_type == "CB" else {"FL": "focal", "DR": "dr", "NC": "nc"}[o.loss_type]
        w = self.weights
        if kind == "softmax":
            return {self.main_name: class_balanced_softmax(logits, labels, w)}
        if kind == "sigmoid":
            return {self.main_name: class_balanced_sigmoid(logits, labels, w)}
        if kind == "focal":
            return {self.main_name: class_balanced_focal(logits, labels, w, o.cb_gamma)}
        if kind == "dr":
            return {self.main_name: dot_regression(logits, labels, features, classifier_weight(self.classifier), w)}
        within, angle = nc_terms(labels, features, self.n_classes)
        return {self.main_name: cross_entropy(logits, labels),
                "nc_within": o.nc_lambda1 * within, "nc_angle": -o.nc_lambda2 * angle}

    def __call__(self, logits, labels, features) -> dict:
        o = self.cfg.optim
        terms = self.main(logits, labels, features)
        if self.decay_term:
            terms["weight_decay"] = o.weight_decay * self.decay_penalty()
        if o.features_regularization > 0:
            terms["feature_reg"] = o.features_regularization * feature_penalty(features)
        return terms


    def decay_penalty(self) -> torch.Tensor:
        """sum ||w||^2 / 2 over the decayed set: with a gradient only where the optimiser
        does not apply the decay itself (row-selected classifier tensors, a few at most)."""
        penalty = None
        if self.explicit_decay:
            penalty = weight_decay_penalty([d.tensor() for d in self.explicit_decay])
        if self.coupled_decay:
            coupled = weight_decay_penalty_value(self.coupled_decay)
            penalty = coupled if penalty is None else penalty + coupled
        return penalty


def make_objective(cfg: Config, class_counts: list[int], decayed: list, device: torch.device,
                   classifier: Optional[nn.Module] = None, couple_decay: bool = True) -> Objective:
    """``decayed``: DecayEntry items (or bare parameters, decayed whole).  Build the optimizer
    with :func:`make_optimizer` from this objective: it applies the coupled part of the decay."""
    return Objective(cfg, class_counts, decayed, device, classifier, couple_decay)


# ---------------------------------------------------------------------------
# Which parameters train, which decay
# ---------------------------------------------------------------------------

def trained_parameters(model: nn.Module, stage: str, cfg: Optional[Config] = None) -> list[tuple[str, nn.Parameter]]:
    """Stage 1: every parameter except the frozen ETF directions (a buffer), the ETF
    norms unless train_etf_norm, and BN weights / biases when train_bn_weight /
    train_bn_bias is false.  Stage 2: the classifier only."""
    groups = model.named_parameter_groups()
    if stage == "second":
        return list(groups["classifier"])
    bn = groups["bn"]
    if cfg is not None:
        bn = [(n, p) for n, p in bn
              if (cfg.optim.train_bn_weight or not n.endswith(".weight"))
              and (cfg.optim.train_bn_bias or not n.endswith(".bias"))]
    return groups["conv"] + bn + groups["classifier"] + groups["feature_bias"]


def module_index(name: str) -> int:
    """weight_decay_target_modules numbering: 0 stem (conv1, bn1), 1-4 layer1-4, 5 classifier
    (and the feature bias, which sits right before it)."""
    if name.startswith("encoder.layer"):
        return int(name[len("encoder.layer")])
    if name.startswith("encoder.fc.") or name == "feature_bias":
        return 5
    return 0


def decayed_rows(cfg: Config, groups: Sequence[str], device=None) -> Optional[torch.Tensor]:
    """Indices (long) of the classifier rows that decay, in class order (None = all rows)."""
    target = cfg.optim.weight_decay_target
    if target is None or all(target):
        return None
    chosen = {g for g, on in zip(GROUP_NAMES, target) if on}
    return torch.tensor([c for c, g in enumerate(groups) if g in chosen], dtype=torch.long, device=device)


def decayed_parameters(model: nn.Module, trained: list[tuple[str, nn.Parameter]], cfg: Config,
                       groups: Sequence[str]) -> list[DecayEntry]:
    """The subset of the trained parameters that the explicit weight-decay term covers.

    Everything trained decays, except: conv weights when not weight_decay_conv; BN weights
    and biases when not weight_decay_bn; the identity-path BNs (stem bn1 and every
    downsample BN) when not weight_decay_identity_bn; with weight_decay_limit, anything
    outside weight_decay_target_modules.  weight_decay_target picks the classifier rows
    (weight rows, ETF norms, bias entries) of the Many / Medium / Few classes.
    """
    o = cfg.optim
    g = model.named_parameter_groups()
    conv = {id(p) for _, p in g["conv"]}
    bn = {id(p) for _, p in g["bn"]}
    identity_bn = {id(p) for _, p in g["identity_bn"]}
    classifier = {id(p) for _, p in g["classifier"]}
    out = []
    for name, p in trained:
        if id(p) in conv and not o.weight_decay_conv:
            continue
        if id(p) in bn and not o.weight_decay_bn:
            continue
        if id(p) in identity_bn and not o.weight_decay_identity_bn:
            continue
        if o.weight_decay_limit and module_index(name) not in (o.weight_decay_target_modules or []):
            continue
        rows = decayed_rows(cfg, groups, p.device) if id(p) in classifier else None
        if rows is not None and rows.numel() == 0:
            continue
        out.append(DecayEntry(name, p, rows))
    return out


def describe_parameters(cfg: Config, trained: list[tuple[str, nn.Parameter]], decayed: list[DecayEntry]) -> str:
    """The run-log line: how many tensors / parameters train and how many decay."""
    o = cfg.optim
    n_trained = sum(p.numel() for _, p in trained)
    text = f"trained tensors: {len(trained)} ({n_trained:,} parameters); "
    if o.weight_decay == 0:
        text += "no weight decay"
    elif o.optimizer == "AdamW":
        text += f"weight decay {o.weight_decay} (AdamW, decoupled) on all of them"
    else:
        n_decayed = sum(d.numel() for d in decayed)
        text += f"weight decay {o.weight_decay} on {len(decayed)} tensors ({n_decayed:,} parameters)"
        if o.weight_decay_target is not None and not all(o.weight_decay_target):
            rows = [g for g, on in zip(GROUP_NAMES, o.weight_decay_target) if on]
            text += f", classifier rows of {'/'.join(rows) if rows else 'no'} classes"
        n_coupled = len(coupled_decay(cfg, decayed))
        if n_coupled:
            text += f" ({n_coupled} whole tensors through SGD's weight_decay)"
    return text + f"; feature regularisation {o.features_regularization}"


def make_optimizer(cfg: Config, params: list[nn.Parameter], objective: Objective) -> torch.optim.Optimizer:
    """AdamW (decoupled decay on every parameter) or SGD with two groups: the objective's
    ``coupled_decay`` tensors with ``weight_decay``, the other parameters without."""
    o = cfg.optim
    if o.optimizer == "AdamW":
        return torch.optim.AdamW(params, lr=o.base_lr, weight_decay=o.weight_decay)
    coupled = {id(p) for p in objective.coupled_decay}
    if not coupled <= {id(p) for p in params}:
        raise ValueError("the objective decays tensors that the optimiser does not train")
    groups = [{"params": list(objective.coupled_decay), "weight_decay": o.weight_decay},
              {"params": [p for p in params if id(p) not in coupled], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=o.base_lr, momentum=o.momentum, **sgd_kwargs(o.sgd_impl, params[0].device))
