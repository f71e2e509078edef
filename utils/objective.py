"""The objective and the optimiser: which parameters train, which decay, and
the loss as a sum of named terms (each logged on its own)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from utils.accel import sgd_kwargs
from utils.config import Config
from utils.losses import class_balanced_softmax, class_balanced_weights, cross_entropy
from utils.regularizers import DEFAULT_NORM_PARAM, feature_penalty, weight_decay_penalty


def norm_param(cfg: Config) -> float:
    o = cfg.optim
    return DEFAULT_NORM_PARAM[o.norm_type] if o.norm_param is None else o.norm_param


def make_objective(cfg: Config, class_counts: list[int], decayed: list[nn.Parameter],
                   device: torch.device) -> Callable:
    """A function (logits, labels, features) -> {term name: value}; the loss is their sum."""
    o = cfg.optim
    if o.loss_type == "CB":
        weights = class_balanced_weights(class_counts, o.cb_beta).to(device)
        main_name = "cb"

        def main(logits, labels):
            return class_balanced_softmax(logits, labels, weights)
    else:
        main_name = "ce"
        main = cross_entropy

    def objective(logits, labels, features):
        terms = {main_name: main(logits, labels)}
        if o.weight_decay > 0:
            terms["weight_decay"] = o.weight_decay * weight_decay_penalty(decayed)
        if o.features_regularization > 0:
            terms["feature_reg"] = o.features_regularization * feature_penalty(features)
        return terms

    return objective


def trained_parameters(model: nn.Module, stage: str) -> list[tuple[str, nn.Parameter]]:
    """Stage 1: every parameter except the frozen ETF directions (a buffer) and,
    unless train_etf_norm, the ETF norms.  Stage 2: the classifier only."""
    groups = model.named_parameter_groups()
    if stage == "second":
        return list(groups["classifier"])
    return groups["conv"] + groups["bn"] + groups["classifier"] + groups["feature_bias"]


def make_optimizer(cfg: Config, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.optim.base_lr, momentum=cfg.optim.momentum,
                           **sgd_kwargs(cfg.optim.sgd_impl, params[0].device))
