"""``model.init_weights``: start a torchvision backbone from an ImageNet state_dict (Places-LT's
protocol starts from ImageNet-pretrained weights: Liu et al., OLTR, 2019).

The file is what ``torchvision.models.resnet152(weights=...).state_dict()`` saves (or the
``.pth`` torchvision downloads), read with ``weights_only=True``.  Its keys are torchvision's
names; the model holds them under ``encoder.`` (SPEC 1), so ``conv1.weight`` loads into
``encoder.conv1.weight``.  The ImageNet classifier ``fc.*`` (1,000 classes) is dropped and the
model keeps its fresh classifier.  Every other key must match the model, name and shape, or
the run is refused naming the keys that do not.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from utils.errors import ConfigError
from utils.run.rundir import load_state_dict

ENCODER_PREFIX = "encoder."
IMAGENET_CLASSIFIER_PREFIX = "fc."


def read_init_weights(path: Path) -> dict:
    """The state_dict of tensors in ``path``, or a one-line ConfigError naming the file and why."""
    key = "model.init_weights"
    if not path.is_file():
        raise ConfigError(f"{key} = {str(path)!r} is missing; give the path of a torchvision ImageNet state_dict "
                          "(e.g. torchvision.models.resnet152(weights='IMAGENET1K_V1').state_dict() saved with "
                          "torch.save)")
    try:
        state = load_state_dict(path)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise ConfigError(f"{key} = {str(path)!r} was refused: it is not a plain weights-only state_dict "
                          f"({first})") from None
    except (ValueError, OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key} = {str(path)!r} is unreadable: {first}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key} = {str(path)!r} does not hold a state_dict of tensors")
    return state


def _listed(keys: list[str], most: int = 3) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def load_init_weights(model: nn.Module, path: Path, model_name: str) -> int:
    """Load the backbone weights of ``path`` into ``model`` (its classifier stays fresh); returns
    the number of tensors loaded.  Refused, naming the keys: a tensor of another shape, a
    backbone key the file lacks, a key of the file the model lacks (another architecture)."""
    state = read_init_weights(path)
    backbone = {ENCODER_PREFIX + k: v for k, v in state.items() if not k.startswith(IMAGENET_CLASSIFIER_PREFIX)}
    own = {k: v for k, v in model.state_dict().items()
           if k.startswith(ENCODER_PREFIX) and not k.startswith(model.classifier_prefix)}
    why = f"model.init_weights = {str(path)!r} is not a torchvision {model_name} state_dict"
    unexpected = sorted(k[len(ENCODER_PREFIX):] for k in set(backbone) - set(own))
    if unexpected:
        raise ConfigError(f"{why}: {len(unexpected)} keys the model does not have ({_listed(unexpected)})")
    missing = sorted(k[len(ENCODER_PREFIX):] for k in set(own) - set(backbone))
    if missing:
        raise ConfigError(f"{why}: {len(missing)} of the model's keys are not in the file ({_listed(missing)})")
    shapes = [f"{k[len(ENCODER_PREFIX):]} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
              for k, v in sorted(backbone.items()) if tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        raise ConfigError(f"{why}: {len(shapes)} tensors have another shape ({_listed(shapes, 2)})")
    model.load_state_dict(backbone, strict=False)
    return len(backbone)
