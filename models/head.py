"""What every model of the project shares after its backbone: ``features(x) -> classify(h)``.

A model subclasses :class:`LTHead`, defines ``pooled_features(x)`` (its backbone) and names
where its classifier lives (``classifier_path``: ``encoder.fc`` for the ResNets, the
original's ``fc`` / ``fc3`` for the small networks, so that state-dict keys keep the
published implementation's names), then calls :meth:`LTHead._init_head`.

``features(x)``: ``pooled_features`` -> (1) L2 feature normalisation, (2) last ReLU,
(3) feature bias, each if enabled, in that order.  ``classify(h)``: the classifier
(``nn.Linear`` or :class:`~models.classifiers.ETFClassifier`) -> optional per-row logit L2
normalisation -> the logit adjuster.  ``forward(x) = classify(features(x))``.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .classifiers import classifier_matrix
from .logit_adjust import LogitAdjuster

__all__ = ["LTHead", "NamedParams"]

_NORM_EPS = 1e-10
NamedParams = list[tuple[str, nn.Parameter]]


class LTHead(nn.Module):
    """A backbone (``pooled_features``), the classifier at ``classifier_path``, and the head options."""

    classifier_path = "fc"

    def _init_head(self, *, normalize_feature: bool = False, last_relu: bool = False,
                   use_feature_bias: bool = False, logit_normalization: bool = False,
                   logit_adjuster: LogitAdjuster | None = None) -> None:
        """Called once the classifier is in place; its size gives the feature and class counts."""
        head = self.classifier
        self.feature_dim = int(head.in_features)
        self.n_classes = int(head.out_features)
        self.normalize_feature = bool(normalize_feature)
        self.last_relu = bool(last_relu)
        self.use_feature_bias = bool(use_feature_bias)
        self.logit_normalization = bool(logit_normalization)
        if self.use_feature_bias:
            self.feature_bias = nn.Parameter(torch.zeros(1, self.feature_dim))
        else:
            self.register_parameter("feature_bias", None)
        # holds only a non-persistent buffer: it adds no state-dict keys
        self.logit_adjuster = logit_adjuster if logit_adjuster is not None else LogitAdjuster(0.0)

    # ------------------------------------------------------------------ forward
    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The backbone's pooled features (B x D), before any option."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pooled_features(x)
        if self.normalize_feature:
            h = h / (h.norm(p=2, dim=1, keepdim=True) + _NORM_EPS)
        if self.last_relu:
            h = F.relu(h)
        if self.feature_bias is not None:
            h = h + self.feature_bias
        return h

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(h)
        if self.logit_normalization:
            logits = logits / (logits.norm(p=2, dim=1, keepdim=True) + _NORM_EPS)
        return self.logit_adjuster(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    # ------------------------------------------------------------------ the classifier
    @property
    def classifier(self) -> nn.Module:
        return self.get_submodule(self.classifier_path)

    @property
    def classifier_prefix(self) -> str:
        """State-dict prefix of the classifier (stage 2's ETF <-> Linear conversion)."""
        return self.classifier_path + "."

    def classifier_weight(self) -> torch.Tensor:
        """Effective K x D classifier weight, detached (a copy)."""
        return classifier_matrix(self.classifier).detach().clone()

    # ------------------------------------------------------------------ parameter groups
    def identity_bn_modules(self) -> Iterable[nn.Module]:
        """The BatchNorm modules on the identity path (the original's ``belongs_to_identity_bn``)."""
        return ()

    def named_parameter_groups(self) -> dict[str, NamedParams]:
        """Parameters grouped by module type, with names as in ``named_parameters()``.

        ``conv``: the weights of every Conv2d and of every Linear layer but the classifier;
        ``bn``: BatchNorm weights and biases; ``identity_bn``: the subset of ``bn`` on the
        identity path; ``classifier``: the trainable parameters of the classifier;
        ``feature_bias``."""
        groups: dict[str, NamedParams] = {"conv": [], "bn": [], "identity_bn": [], "classifier": [],
                                          "feature_bias": []}
        head = self.classifier
        identity = {id(m) for m in self.identity_bn_modules()}
        for module_name, module in self.named_modules():
            items = [(f"{module_name}.{n}" if module_name else n, p)
                     for n, p in module.named_parameters(recurse=False)]
            if module is head:
                groups["classifier"].extend((n, p) for n, p in items if p.requires_grad)
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                groups["conv"].extend(items)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                groups["bn"].extend(items)
                if id(module) in identity:
                    groups["identity_bn"].extend(items)
        if self.feature_bias is not None:
            groups["feature_bias"].append(("feature_bias", self.feature_bias))
        return groups
