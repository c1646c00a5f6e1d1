"""boundprop's own op functions: single-output stand-ins for multi-output ATen ops.

Capture rewrites ``getitem(multi_output_op(...), 0)`` patterns into these, so that every node of
the IR has exactly one tensor output and rules never see tuples.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def batch_norm_eval(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float,
                    eps: float) -> torch.Tensor:
    """Batch normalisation with running statistics (eval mode), channel dimension 1.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``; an affine map per channel.
    """
    shape = [1, -1] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return x * scale.reshape(shape) + shift.reshape(shape)


def batch_norm_scale_shift(weight: torch.Tensor | None, bias: torch.Tensor | None,
                           running_mean: torch.Tensor, running_var: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` of :func:`batch_norm_eval`."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift
