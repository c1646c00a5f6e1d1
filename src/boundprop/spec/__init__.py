"""Output specifications: the matrices ``C`` of ``compute_bounds(..., C=C)``.

A specification asks for bounds on ``C y`` instead of on the logits ``y`` themselves; ``C`` has
shape ``(batch, spec, K)`` for a ``(batch, K)`` output.
"""

from __future__ import annotations

import torch

from ..syncs import may_read


def margin_matrix(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """The robustness (margin) specification: rows ``e_true - e_j`` for every class ``j != true``.

    ``(C y)[b, i] = y[b, labels[b]] - y[b, j_i]`` where ``j_0 < j_1 < ... `` are the classes other
    than ``labels[b]`` in increasing order. The prediction is verified robust when every lower
    bound of ``C y`` is positive.

    Arguments:
        labels: ``(batch,)`` integer true classes in ``[0, num_classes)``.
        num_classes: ``K``.
    Returns:
        ``(batch, K - 1, K)`` with +1 in the true class's column and -1 in ``j_i``'s column of row ``i``.
    """
    labels = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels, device="cpu")
    labels = labels.reshape(-1).long()
    if device is None:
        device = labels.device
    if num_classes < 2:
        raise ValueError(f"a margin specification needs at least 2 classes, got {num_classes}")
    # checked where reading the labels costs nothing (on CUDA it would wait for the device every batch)
    if labels.numel() and may_read(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.tolist()}")
    labels = labels.to(device)
    eye = torch.eye(num_classes, dtype=dtype, device=device)
    # j_i = i below the label, i + 1 from it on: every other class once, in increasing order
    others = torch.arange(num_classes - 1, device=device)
    others = others + (others >= labels.unsqueeze(1)).long()  # (batch, K - 1)
    return eye[labels].unsqueeze(1) - eye[others]


def get_spec_matrix(X: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """auto_LiRPA's name for :func:`margin_matrix` (dtype and device taken from ``X``)."""
    return margin_matrix(y, num_classes, dtype=X.dtype, device=X.device)


__all__ = ["get_spec_matrix", "margin_matrix"]
