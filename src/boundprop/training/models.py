"""Models to train on the 8x8 digits (input ``(1, 8, 8)``, 10 classes).

The bundled small models (``digits_mlp``, ``digits_cnn``) and the auto_LiRPA paper's
architecture families from :mod:`boundprop.zoo` adapted to one 8x8 channel: ``cnn7_bn``,
``resnet``, ``wide_resnet``, ``densenet``, ``resnext``, ``transformer`` (the 8 image rows as 8 tokens;
plus ``mlp`` and ``cnn``). Every builder
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


class RowTokens(nn.Module):
    """``(batch, 1, 8, 8)`` image -> ``(batch, 8, d)`` tokens: each row embedded by one linear map
    plus a learned per-row position vector."""

    def __init__(self, size: int, d: int) -> None:
        super().__init__()
        self.size = size
        self.embed = nn.Linear(size, d)
        self.position = nn.Parameter(torch.zeros(size, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x.reshape(x.shape[0], self.size, self.size)) + self.position


def _transformer(num_classes: int = 10, seed: int = 0, d: int = 16, heads: int = 2, ffn: int = 32) -> nn.Module:
    """A one-layer Transformer classifier (:func:`boundprop.zoo.transformer`) on the 8 rows as tokens."""
    body = zoo.transformer(tokens=8, d=d, heads=heads, ffn=ffn, out=num_classes, seed=seed)

    def tokens() -> nn.Module:
        return RowTokens(8, d)

    return nn.Sequential(_seeded(tokens, seed), body)


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
    "transformer": _transformer,
}


def freeze_batchnorm(model: nn.Module, reset: bool = True) -> nn.Module:
    """Put every BatchNorm layer in eval mode (and reset its running statistics to 0 / 1)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if reset and module.track_running_stats:
                module.reset_running_stats()
            module.eval()
    return model


def ibp_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """The IBP initialisation of Shi et al. (2021, "Fast certified robust training with short warmup").

    Every ``nn.Linear`` / ``nn.Conv*`` weight is redrawn from ``N(0, sigma^2)`` with
    ``sigma = sqrt(2 pi) / fan_in`` and its bias set to 0: then ``E|w| fan_in = 2``, so an interval's
    radius keeps its expected size through a layer followed by a ReLU (which about halves it),
    instead of growing by a factor of about ``sqrt(fan_in)`` per layer as with the usual
    initialisations. Without it, deep models (CNN-7, the residual families) start certified training
    with robust losses in the hundreds and collapse to a constant prediction. In place; returns the
    model. The global random state is untouched.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                sigma = (2 * torch.pi) ** 0.5 / fan_in
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen, dtype=module.weight.dtype) * sigma)
                if module.bias is not None:
                    module.bias.zero_()
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


__all__ = ["DIGIT_MODELS", "RowTokens", "build_digit_model", "freeze_batchnorm", "ibp_init", "set_train_mode"]
