"""The objective: the loss as a sum of named terms (each logged on its own).

Losses (SPEC 6.2): CE; CB with cb_type softmax | sigmoid | focal | dr; FL
(sigmoid focal, all class weights 1); DR (dot regression); NC (CE + the
within-class and between-class-angle feature terms).  DRW: during the first
``drw`` epochs every loss but CE falls back to plain CE (the original's
0-based ``drw <= epoch`` test), the term keeping its name so that the logged
columns stay the same.

Weight decay (SPEC 6.1) is the term ``weight_decay * sum ||w||^2 / 2`` over the
*decayed* parameters, a subset of the trained ones narrowed by
``weight_decay_conv/bn/identity_bn/limit/target`` (utils/engine/params.py); with AdamW it is
the optimiser's decoupled decay on every trained parameter instead.  With SGD, the
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

from utils.config.schema import OptimConfig
from utils.engine.losses import (class_balanced_focal, class_balanced_sigmoid, class_balanced_softmax,
                          class_balanced_weights, cross_entropy, dot_regression, nc_terms, sigmoid_bias_init)
from utils.engine.regularizers import (DEFAULT_NORM_PARAM, classifier_weight, feature_penalty, weight_decay_penalty,
                                weight_decay_penalty_value)


def norm_param(o: OptimConfig) -> float:
    """optim.norm_param, or its default for optim.norm_type (SPEC 7.1, 7.3)."""
    return DEFAULT_NORM_PARAM[o.norm_type] if o.norm_param is None else o.norm_param


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------

def main_loss_name(o: OptimConfig) -> str:
    """Name of the loss term in the logs / metrics.csv (``train_<name>``)."""
    if o.loss_type == "CB":
        return "cb" if o.cb_type == "softmax" else f"cb_{o.cb_type}"
    return {"CE": "ce", "FL": "focal", "DR": "dr", "NC": "ce"}[o.loss_type]


def uses_sigmoid(o: OptimConfig) -> bool:
    """The sigmoid-based losses: CB sigmoid / focal and FL."""
    return o.loss_type == "FL" or (o.loss_type == "CB" and o.cb_type in ("sigmoid", "focal"))


@torch.no_grad()
def init_classifier_bias(o: OptimConfig, model: nn.Module) -> Optional[float]:
    """The sigmoid losses start every class at probability 1/K: bias = -log(K-1).
    Done on the freshly built model, so stage-1 weights loaded afterwards win
    (as in the original, where the weights are loaded after the model is built)."""
    if not uses_sigmoid(o):
        return None
    value = sigmoid_bias_init(model.n_classes)
    model.classifier.bias.fill_(value)
    return value


def drw_active(o: OptimConfig, epoch: int) -> bool:
    """True while the re-weighted loss is replaced by plain CE (1-based ``epoch`` <= drw)."""
    return o.loss_type != "CE" and epoch <= o.drw


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


def coupled_decay(o: OptimConfig, decayed: Sequence[DecayEntry]) -> list[nn.Parameter]:
    """The decayed tensors whose decay gradient SGD applies through its ``weight_decay``:
    the whole ones, when the optimiser is SGD and the decay is on."""
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

    def __init__(self, o: OptimConfig, class_counts: Sequence[int], decayed: Sequence, device: torch.device,
                 classifier: Optional[nn.Module] = None, couple_decay: bool = True):
        self.optim = o
        self.main_name = main_loss_name(o)
        self.decayed = [d if isinstance(d, DecayEntry) else DecayEntry("", d) for d in decayed]
        self.classifier = classifier
        self.n_classes = len(class_counts)
        # no term at all when nothing decays (e.g. stage 2 with weight_decay_target all false)
        self.decay_term = o.weight_decay > 0 and o.optimizer != "AdamW" and len(self.decayed) > 0
        # the optimiser applies these tensors' decay gradient (make_optimizer reads this list)
        self.coupled_decay = coupled_decay(o, self.decayed) if couple_decay else []
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
        self.fallback_to_ce = drw_active(self.optim, epoch)

    def main(self, logits, labels, features) -> dict:
        o = self.optim
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
        o = self.optim
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


def make_objective(o: OptimConfig, class_counts: list[int], decayed: list, device: torch.device,
                   classifier: Optional[nn.Module] = None, couple_decay: bool = True) -> Objective:
    """``decayed``: DecayEntry items (or bare parameters, decayed whole).  Build the optimizer
    with utils/engine/params.py ``make_optimizer`` from this objective: it applies the coupled part of
    the decay."""
    return Objective(o, class_counts, decayed, device, classifier, couple_decay)
