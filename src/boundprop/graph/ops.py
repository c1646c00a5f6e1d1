"""boundprop's own op functions: single-output stand-ins for multi-output ATen ops, and casts with no rule.

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


def lossy_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` of a floating ``x`` into ``bool`` or a float type with fewer digits than float32
    (float16, bfloat16, ...). Capture and the ONNX importer give such casts this name so that, on a
    perturbed value, they are reported as unsupported: their rounding (2^-11 relative for float16) is
    far above float32's, and a bound that ignored it could exclude the model's own output. (Casts to
    integer types become ``trunc``, which has rules; float64 to float32 stays a copy, as float32
    arithmetic is what bounds of float32 models are computed in anyway.)"""
    return x.to(dtype)


def is_lossy_float_cast(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether casting floating ``source`` values to ``target`` loses more than float32 rounding."""
    if target == torch.bool:
        return True
    return target.is_floating_point and torch.finfo(target).eps > max(torch.finfo(torch.float32).eps,
                                                                      torch.finfo(source).eps)
