"""Backward propagation of :class:`~boundprop.domains.patches.Patches` coefficients.

The backward walk (:mod:`.backward`) hands a node's coefficients here when they are in patch
form. Ops that keep every row's coefficients inside a small window have a patch rule:

* ``conv2d`` (and non-transposed 2-D ``convolution``) with constant weights: each window goes
  through ``conv_transpose2d`` (strides, padding, dilation, groups); bias ``sum(window) . b``;
* eval-mode batch norm, ``mul``/``div`` by a constant, ``neg``: a per-entry scale, gathered over
  each window (bias terms likewise);
* ``add``/``sub`` of perturbed maps of the output's shape and of constants;
* shape-preserving copies (``clone``, ``alias``, ``contiguous``, ``detach``);
* every element-wise relaxation (ReLU, ...): the relaxation's slopes and offsets are gathered
  over each window (:func:`boundprop.algorithms.backward.apply_relaxation`).

Anything else returns None and the walk converts the coefficients to a dense tensor first, as it
does when a window has grown to cover the whole map (a dense tensor is then no larger).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..domains.patches import Patches
from ..graph import ops
from ..graph.ir import Node
from ..kernels import as_pair
from ..rules import Var

aten = torch.ops.aten

#: op -> ``fn(state, node, args, kwargs, P) -> ([(input_name, Patches or Tensor), ...], bias) | None``
#: for a linear map ``P`` of the node's output (bias ``(b, R)`` or 0.).
PATCH_RULES: dict = {}


def _patch_rule(*targets) -> Callable:
    def register(fn: Callable) -> Callable:
        for target in targets:
            PATCH_RULES[target] = fn
        return fn

    return register


def _densify_if_large(P: Patches) -> Patches | torch.Tensor:
    """A dense tensor once a window is as large as the map (patches no longer save anything)."""
    kh, kw = P.kernel
    H, W = P.size
    return P.to_dense() if kh * kw >= H * W else P


def _conv_patches(P: Patches, x: Var, weight, bias, stride, padding, dilation, groups):
    if not torch.is_tensor(weight) or weight.dim() != 4 or isinstance(padding, str):
        return None
    moved = P.through_conv2d(weight, as_pair(stride), as_pair(padding), as_pair(dilation), int(groups),
                             tuple(x.shape[2:]))
    bias_term = P.channel_sum() @ bias if bias is not None else 0.0
    return [(x.name, _densify_if_large(moved))], bias_term


_CONV2D_ARGS = (("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0),
                ("dilation", 1), ("groups", 1))


@_patch_rule(aten.conv2d.default)
def conv2d_patches(state, node, args, kwargs, P):
    values = list(args) + [kwargs.get(name, default) for name, default in _CONV2D_ARGS[len(args):]]
    return _conv_patches(P, *values)


@_patch_rule(aten.convolution.default)
def convolution_patches(state, node, args, kwargs, P):
    x, weight, bias, stride, padding, dilation, transposed, _output_padding, groups = args[:9]
    if transposed:
        return None
    return _conv_patches(P, x, weight, bias, stride, padding, dilation, groups)


def _scale(P: Patches, factor, out_shape: torch.Size) -> torch.Tensor | None:
    """``data * factor`` gathered over the windows; ``factor`` broadcasts to the node's shape."""
    if not torch.is_tensor(factor) or factor.dim() == 0:
        return P.data * factor
    if factor.dim() > len(out_shape):
        return None
    full = factor.reshape(*[1] * (len(out_shape) - factor.dim()), *factor.shape)
    if full.shape[2:].numel() == 1 and full.shape[0] == 1:  # per channel (or scalar)
        return P.data * full.reshape(1, 1, -1, 1, 1)
    (window,) = P.gather(full.expand(full.shape[0], *out_shape[1:]))
    return P.data * window


def _window_term(P: Patches, const, out_shape: torch.Size):
    """``sum over each window of data * const`` for a constant broadcasting to the node: ``(b, R)``."""
    if not torch.is_tensor(const):
        return P.channel_sum().sum(-1) * const if const != 0 else 0.0
    if const.dim() > len(out_shape):
        return None
    full = const.reshape(*[1] * (len(out_shape) - const.dim()), *const.shape)
    if full.shape[2:].numel() == 1 and full.shape[0] == 1:
        return P.channel_sum() @ full.reshape(-1).expand(P.data.shape[2])
    return P.window_sum(full.expand(full.shape[0], *out_shape[1:]))


@_patch_rule(ops.batch_norm_eval)
def batch_norm_patches(state, node, args, kwargs, P):
    x, weight, bias, mean, var, _momentum, eps = args
    scale, shift = ops.batch_norm_scale_shift(weight, bias, mean, var, eps)
    return [(x.name, P.with_data(P.data * scale.reshape(1, 1, -1, 1, 1)))], P.channel_sum() @ shift


def _sum_patches(node_shape: torch.Size, P: Patches, terms: list[tuple[object, float]]):
    """Rows of ``sum_i c_i t_i`` (``terms``: (arg, c_i)): perturbed args get ``c_i P``, constants a bias."""
    out, bias = [], 0.0
    for arg, coeff in terms:
        if isinstance(arg, Var):
            if tuple(arg.shape[1:]) != tuple(node_shape[1:]) or not arg.batched:
                return None  # broadcasting between perturbed maps: dense
            out.append((arg.name, P if coeff == 1 else P.with_data(P.data * coeff)))
        else:
            term = _window_term(P, arg, node_shape)
            if term is None:
                return None
            bias = bias + coeff * term
    return out, bias


@_patch_rule(aten.add.Tensor, aten.add.Scalar)
def add_patches(state, node, args, kwargs, P):
    alpha = kwargs.get("alpha", 1)
    return _sum_patches(state.example(node.name).shape, P, [(args[0], 1), (args[1], alpha)])


@_patch_rule(aten.sub.Tensor, aten.sub.Scalar)
def sub_patches(state, node, args, kwargs, P):
    alpha = kwargs.get("alpha", 1)
    return _sum_patches(state.example(node.name).shape, P, [(args[0], 1), (args[1], -alpha)])


@_patch_rule(aten.neg.default)
def neg_patches(state, node, args, kwargs, P):
    return [(args[0].name, P.with_data(-P.data))], 0.0


@_patch_rule(aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)
def mul_patches(state, node, args, kwargs, P):
    x, c = (args[0], args[1]) if isinstance(args[0], Var) else (args[1], args[0])
    if isinstance(c, Var) or not isinstance(x, Var):
        return None
    if node.target in (aten.div.Tensor, aten.div.Scalar):
        c = torch.reciprocal(c) if torch.is_tensor(c) else 1.0 / c
    data = _scale(P, c, state.example(node.name).shape)
    return None if data is None else ([(x.name, P.with_data(data))], 0.0)


@_patch_rule(aten.clone.default, aten.alias.default, aten.contiguous.default, aten.detach.default)
def copy_patches(state, node, args, kwargs, P):
    return [(args[0].name, P)], 0.0


def patch_rule_for(node: Node):
    return PATCH_RULES.get(node.target)
