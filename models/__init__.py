"""Models: ResNet backbones, classifier heads, logit adjustment."""
from .classifiers import (
    ETFClassifier,
    etf_norm_profile,
    etf_state_to_linear,
    linear_state_to_etf,
    random_orthogonal_columns,
    simplex_etf_directions,
)
from .logit_adjust import LogitAdjuster, log_prior_from_counts
from .resnet import FEATURE_DIM, SUPPORTED_MODELS, LTModel, build_model

__all__ = [
    "LTModel",
    "build_model",
    "SUPPORTED_MODELS",
    "FEATURE_DIM",
    "ETFClassifier",
    "etf_norm_profile",
    "etf_state_to_linear",
    "linear_state_to_etf",
    "random_orthogonal_columns",
    "simplex_etf_directions",
    "LogitAdjuster",
    "log_prior_from_counts",
]
