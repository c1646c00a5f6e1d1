"""Loss-fusion wrappers (auto_LiRPA's ``CrossEntropyWrapper`` and ``CrossEntropyWrapperMultiInput``).

Both turn a classifier ``f`` into the scalar (per sample) function

    g(x, label) = sum_j exp(f(x)_j - f(x)_label)       shape (batch, 1)

which equals ``exp(CE(f(x), label))`` since ``CE = log sum_j exp(y_j) - y_label``. An upper bound
``ub`` of ``g`` over a perturbation set is therefore an upper bound of the worst-case
cross-entropy: ``log(ub) >= max CE``. Bounding ``g`` needs ONE backward walk (one specification
row) whatever the number of classes, where the margin specification needs ``K - 1`` rows: this
is loss fusion (see :mod:`boundprop.training.fusion` for the numerically stable evaluation).

The labels are a second, unperturbed input (an integer tensor ``(batch,)``).
"""

from __future__ import annotations

import torch
from torch import nn


def _fused_value(y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    diff = y - torch.gather(y, dim=-1, index=labels.unsqueeze(-1))
    return torch.exp(diff).sum(dim=-1, keepdim=True)


class CrossEntropyWrapper(nn.Module):
    """``forward(x, labels) = sum_j exp(model(x)_j - model(x)_labels)``, shape ``(batch, 1)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _fused_value(self.model(x), labels)


class CrossEntropyWrapperMultiInput(nn.Module):
    """The same for a model with several inputs: ``forward(labels, *x)`` (labels FIRST, as in auto_LiRPA)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor, *x: torch.Tensor) -> torch.Tensor:
        return _fused_value(self.model(*x), labels)


__all__ = ["CrossEntropyWrapper", "CrossEntropyWrapperMultiInput"]
