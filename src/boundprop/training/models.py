"""Models to train on the 8x8 digits (input ``(1, 8, 8)``, 10 classes).

The bundled small models (``digits_mlp``, ``digits_cnn``) and the auto_LiRPA paper's
architecture families from :mod:`boundprop.zoo` adapted to one 8x8 channel: ``cnn7_bn``,
``resnet``, ``wide_resnet``, ``densenet``, ``resnext`` (plus ``mlp`` and ``cnn``). Every builder
takes ``seed`` (weights are reproducible and the global random state is untouched) and the
number of classes.

BatchNorm: a captured graph bounds BatchNorm with its running statistics (eval mode), so certified
training here keeps BatchNorm layers in eval mode with running statistics reset to mean 0 and
variance 1 (:func:`freeze_batchnorm`): each acts as a learnable per-channel affine layer, the same
in the natural forward pass, the bounds and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import zoo
from ..data.digits import ARCHITECTURES as BUNDLED


def _seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _flat(model: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Flatten(), model)


def _bundled(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, seed: int = 0) -> nn.Module:
        model = _seeded(BUNDLED[name], seed)
        if num_classes != 10:
            last = model[-1]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                model[-1] = nn.Linear(last.in_features, num_classes)
        return model

    return build


#: name -> builder(num_classes=10, seed=0) for ``(batch, 1, 8, 8)`` inputs.
DIGIT_MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_mlp": _bundled("digits_mlp"),
    "digits_cnn": _bundled("digits_cnn"),
    "mlp": lambda num_classes=10, seed=0: _flat(zoo.mlp(in_dim=64, hidden=64, out=num_classes, depth=2, seed=seed)),
    "cnn": lambda num_classes=10, seed=0: zoo.cnn(channels=1, width=8, size=8, out=num_classes, seed=seed),
    "cnn7_bn": lambda num_classes=10, seed=0: zoo.cnn7_bn(channels=1, width=8, size=8, fc=64, out=num_classes,
                                                         seed=seed),
    "resnet": lambda num_classes=10, seed=0: zoo.resnet(channels=1, widths=(8, 16), out=num_classes, seed=seed),
    "wide_resnet": lambda num_classes=10, seed=0: zoo.wide_resnet(channels=1, base=4, widen=2, out=num_classes,
                                                                 seed=seed),
    "densenet": lambda num_classes=10, seed=0: zoo.densenet(channels=1, growth=4, layers=2, out=num_classes,
                                                           seed=seed),
    "resnext": lambda num_classes=10, seed=0: zoo.resnext(channels=1, cardinality=2, group_width=4,
                                                         out=num_classes, seed=seed),
}


def freeze_batchnorm(model: nn.Module, reset: bool = True) -> nn.Module:
    """Put every BatchNorm layer in eval mode (and reset its running statistics to 0 / 1)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if reset and module.track_running_stats:
                module.reset_running_stats()
            module.eval()
    return model


def set_train_mode(model: nn.Module) -> nn.Module:
    """``model.train()`` with BatchNorm layers left in eval mode."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def build_digit_model(name: str, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A fresh model of architecture ``name`` (:data:`DIGIT_MODELS`) for 8x8 one-channel inputs."""
    if name not in DIGIT_MODELS:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(DIGIT_MODELS)}")
    return freeze_batchnorm(DIGIT_MODELS[name](num_classes=num_classes, seed=seed))


__all__ = ["DIGIT_MODELS", "build_digit_model", "freeze_batchnorm", "set_train_mode"]
