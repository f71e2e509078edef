"""Models: ResNet backbones, the small tabular/MNIST networks, classifier heads, logit adjustment."""
from .classifiers import (
    ETFClassifier,
    classifier_matrix,
    make_classifier,
    etf_norm_profile,
    etf_state_to_linear,
    linear_state_to_etf,
    random_orthogonal_columns,
    simplex_etf_directions,
)
from .head import LTHead
from .logit_adjust import LogitAdjuster, log_prior_from_counts
from .resnet import FEATURE_DIM, SUPPORTED_MODELS, LTModel
from .resnet import build_model as _build_resnet
from .small import SMALL_MODELS, SmallLTModel, build_small_model


def build_model(name, n_classes, **options):
    """Any model by config name: the small networks (models/small.py) or the ResNets (models/resnet.py)."""
    if name in SMALL_MODELS:
        return build_small_model(name, n_classes, **options)
    return _build_resnet(name, n_classes, **options)


__all__ = [
    "LTHead",
    "LTModel",
    "SmallLTModel",
    "SMALL_MODELS",
    "build_model",
    "build_small_model",
    "SUPPORTED_MODELS",
    "FEATURE_DIM",
    "ETFClassifier",
    "classifier_matrix",
    "make_classifier",
    "etf_norm_profile",
    "etf_state_to_linear",
    "linear_state_to_etf",
    "random_orthogonal_columns",
    "simplex_etf_directions",
    "LogitAdjuster",
    "log_prior_from_counts",
]
