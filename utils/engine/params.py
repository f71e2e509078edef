"""Which parameters train and which decay (SPEC 6.1), and the optimizer that applies both.

The trained set comes from the model's parameter groups (by module type: models/head.py);
the decayed set is a subset of it narrowed by ``weight_decay_conv/bn/identity_bn/limit/
target``.  With SGD the whole decayed tensors get their decay gradient from SGD's own
``weight_decay`` (utils/engine/objective.py ``coupled_decay``); AdamW decays every trained
parameter, decoupled.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from utils.engine.accel import sgd_kwargs
from utils.config.schema import OptimConfig
from utils.names import GROUPS
from utils.engine.objective import DecayEntry, Objective, coupled_decay


def trained_parameters(model: nn.Module, stage: str, o: Optional[OptimConfig] = None) -> list[tuple[str, nn.Parameter]]:
    """Stage 1: every parameter except the frozen ETF directions (a buffer), the ETF
    norms unless train_etf_norm, and BN weights / biases when train_bn_weight /
    train_bn_bias is false.  Stage 2: the classifier only."""
    groups = model.named_parameter_groups()
    if stage == "second":
        return list(groups["classifier"])
    bn = groups["bn"]
    if o is not None:
        bn = [(n, p) for n, p in bn
              if (o.train_bn_weight or not n.endswith(".weight"))
              and (o.train_bn_bias or not n.endswith(".bias"))]
    return groups["conv"] + bn + groups["classifier"] + groups["feature_bias"]


def module_index(name: str) -> int:
    """weight_decay_target_modules numbering: 0 stem (conv1, bn1), 1-4 layer1-4, 5 classifier
    (and the feature bias, which sits right before it)."""
    if name.startswith("encoder.layer"):
        return int(name[len("encoder.layer")])
    if name.startswith("encoder.fc.") or name == "feature_bias":
        return 5
    return 0


def decayed_rows(target: Optional[list], groups: Sequence[str], device=None) -> Optional[torch.Tensor]:
    """Indices (long) of the classifier rows that ``optim.weight_decay_target`` ([many, medium,
    few]) decays, in class order (None = all rows)."""
    if target is None or all(target):
        return None
    chosen = {g for g, on in zip(GROUPS, target) if on}
    return torch.tensor([c for c, g in enumerate(groups) if g in chosen], dtype=torch.long, device=device)


def decayed_parameters(model: nn.Module, trained: list[tuple[str, nn.Parameter]], o: OptimConfig,
                       groups: Sequence[str]) -> list[DecayEntry]:
    """The subset of the trained parameters that the explicit weight-decay term covers.

    Everything trained decays, except: conv weights when not weight_decay_conv; BN weights
    and biases when not weight_decay_bn; the identity-path BNs (stem bn1 and every
    downsample BN) when not weight_decay_identity_bn; with weight_decay_limit, anything
    outside weight_decay_target_modules.  weight_decay_target picks the classifier rows
    (weight rows, ETF norms, bias entries) of the Many / Medium / Few classes.
    """
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
        rows = decayed_rows(o.weight_decay_target, groups, p.device) if id(p) in classifier else None
        if rows is not None and rows.numel() == 0:
            continue
        out.append(DecayEntry(name, p, rows))
    return out


def describe_parameters(o: OptimConfig, trained: list[tuple[str, nn.Parameter]], decayed: list[DecayEntry]) -> str:
    """The run-log line: how many tensors / parameters train and how many decay."""
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
            rows = [g for g, on in zip(GROUPS, o.weight_decay_target) if on]
            text += f", classifier rows of {'/'.join(rows) if rows else 'no'} classes"
        n_coupled = len(coupled_decay(o, decayed))
        if n_coupled:
            text += f" ({n_coupled} whole tensors through SGD's weight_decay)"
    return text + f"; feature regularisation {o.features_regularization}"


def make_optimizer(o: OptimConfig, params: list[nn.Parameter], objective: Objective) -> torch.optim.Optimizer:
    """AdamW (decoupled decay on every parameter) or SGD with two groups: the objective's
    ``coupled_decay`` tensors with ``weight_decay``, the other parameters without."""
    if o.optimizer == "AdamW":
        return torch.optim.AdamW(params, lr=o.base_lr, weight_decay=o.weight_decay)
    coupled = {id(p) for p in objective.coupled_decay}
    if not coupled <= {id(p) for p in params}:
        raise ValueError("the objective decays tensors that the optimiser does not train")
    groups = [{"params": list(objective.coupled_decay), "weight_decay": o.weight_decay},
              {"params": [p for p in params if id(p) not in coupled], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=o.base_lr, momentum=o.momentum, **sgd_kwargs(o.sgd_impl, params[0].device))
