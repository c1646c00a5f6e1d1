"""Convolutions and eval-mode batch norm with perturbed parameters (weight perturbation).

When a convolution's weight or bias, or a batch norm's weight or bias, is a perturbed parameter
(a leaf with no batch dimension, e.g. ``{conv.weight: PerturbationLpNorm(eps)}``), the op is no
longer affine in one batched input, and the walk sends it here (``state.is_affine_here`` routes
ops with a perturbed parameter to their ``backward_rule``). IBP is in :mod:`.linear`
(centre/radius interval arithmetic).

**Convolution** ``y = conv(x, W) + b``, bilinear in ``(x, W)``. With box centres and radii
``x = x_c + dx``, ``|dx| <= r_x`` and ``W = W_c + dW``, ``|dW| <= r_W``::

    conv(x, W) = conv(x, W_c) + conv(x_c, W) - conv(x_c, W_c) + conv(dx, dW)
    |A . conv(dx, dW)| <= |A| . conv(r_x, r_W)

so, for a row ``A`` of coefficients of ``y`` (``(batch, spec, C_out, *out)``)::

    A . y >= conv^T(A, W_c) . x + wgrad(A, x_c) . W + (sum_space A) . b - A . conv(x_c, W_c) - |A| . conv(r_x, r_W)

(``+ |A| . conv(r_x, r_W)`` for the upper bound). This is McCormick's envelope of every product
term ``x_i W_j`` with the two lower (upper) planes averaged (``t = s = 1/2``), summed over the
terms, evaluated with four convolutions instead of one plane per term; for a single layer its
minimum over the boxes is exactly the IBP bound. ``conv^T`` is the transposed convolution (the
input-gradient) and ``wgrad(A, x_c)[b, s] = sum_p A[b, s, :, p] (x) patch_p(x_c[b])`` the
weight-gradient of the convolution for each row, computed with ``unfold``. When ``x`` is constant
(only parameters perturbed) the map is linear in ``(W, b)`` and the bound is exact; when ``W`` is
constant it is the ordinary affine pullback.

**Batch norm** ``y = z w + b`` with ``z = (x - mean) k``, ``k = rsqrt(var + eps) > 0`` per
channel: the product ``z w`` (``w`` broadcast over batch and space) is relaxed by McCormick on the
interval of ``z`` (``[(l_x - mean) k, (u_x - mean) k]``) and of ``w``, with the plane weights of
:mod:`.bilinear` (``opts["mul_relaxation"]``); the coefficient of ``z`` becomes ``k`` times a
coefficient of ``x``. With ``x`` constant, ``y`` is linear in ``(w, b)`` and the bound is exact.
Perturbed running statistics are not supported.

Shapes: coefficients of a perturbed parameter are ``(batch, spec, *param.shape)``, of ``x``
``(batch, spec, *x.shape[1:])``. Non-finite input intervals give infinite bounds, never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..domains import Interval
from ..graph import ops
from .bilinear import _elementwise_side, _Factor, _sides
from .linear import _conv_backward, bilinear_interval
from .registry import Var, backward_rule, constant_tensor

aten = torch.ops.aten
_INF = float("inf")


def _out(A_list, lbias, ubias):
    from ..algorithms.backward import BackwardOut  # noqa: PLC0415 - algorithms import the rules

    return BackwardOut(A_list, lbias, ubias)


def _box(arg) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and radius of a perturbed argument's interval, or ``(value, 0)`` for a constant."""
    if isinstance(arg, Var):
        if arg.bounds is None:
            raise RuntimeError(f"no interval for {arg.name}")
        return arg.bounds.center, arg.bounds.radius
    t = constant_tensor(arg)
    return t, torch.zeros_like(t)


def _finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _infinite(call):
    """Bounds ``-inf``/``+inf`` (no coefficients): the sound answer for non-finite intervals."""
    A0 = call.lA if call.lA is not None else call.uA
    shape = A0.shape[:2]
    lo = torch.full(shape, -_INF, dtype=A0.dtype, device=A0.device) if call.lA is not None else 0.0
    hi = torch.full(shape, _INF, dtype=A0.dtype, device=A0.device) if call.uA is not None else 0.0
    return _out([], lo, hi)


# --- convolution -----------------------------------------------------------------------------------


def _conv_args(args, dims: int):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    stride, padding, dilation, groups = (list(args[3:]) + [1, 0, 1, 1][len(args[3:]):])[:4]
    if isinstance(padding, str):
        raise NotImplementedError("convolution with string padding and a perturbed parameter")
    tup = lambda v: tuple(int(i) for i in v) if isinstance(v, (list, tuple)) else (int(v),) * dims
    stride, padding, dilation = (tup(v) if len(tup(v)) == dims else tup(v)[:1] * dims
                                 for v in (stride, padding, dilation))
    return x, weight, bias, stride, padding, dilation, int(groups)


def conv_weight_coefficient(A: torch.Tensor, x: torch.Tensor, weight_shape, stride, padding, dilation,
                            groups: int) -> torch.Tensor:
    """``wgrad``: coefficients of ``W`` in ``A . conv(x, W)`` for every row, ``(batch, spec, *W.shape)``.

    ``A``: ``(batch, spec, C_out, *out)``, ``x``: ``(batch, C_in, *in)`` (1-D or 2-D convolution).
    ``result[b, s, o, c, k] = sum_p A[b, s, o, p] x_unfolded[b, c, k, p]`` (per group).
    """
    dims = x.dim() - 2
    if dims == 1:  # as a 2-D convolution of height 1
        x, A = x.unsqueeze(2), A.unsqueeze(3)
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
        kernel = (1, weight_shape[-1])
    else:
        kernel = tuple(weight_shape[-2:])
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (b, C_in K, L)
    b, spec, c_out = A.shape[:3]
    cols = cols.reshape(cols.shape[0], groups, -1, cols.shape[-1])  # (b, g, C_in/g K, L)
    A_flat = A.reshape(b, spec, groups, c_out // groups, -1)  # (b, s, g, C_out/g, L)
    if cols.shape[-1] != A_flat.shape[-1]:
        raise RuntimeError("conv weight coefficient: output size mismatch")
    coeff = torch.einsum("bsgol,bgkl->bsgok", A_flat, cols)
    return coeff.reshape(b, spec, *weight_shape)


def _conv_rule(dims: int):
    conv = {1: F.conv1d, 2: F.conv2d}[dims]
    pull_x = _conv_backward(dims)

    def rule(call):
        x, weight, bias, stride, padding, dilation, groups = _conv_args(call.args, dims)
        if isinstance(weight, Var) and weight.batched:
            raise NotImplementedError("convolution: a weight computed from the input is not supported")
        xc, xr = _box(x)
        wc, wr = _box(weight)
        if not _finite(xc, xr, wc, wr):
            return _infinite(call)
        both = isinstance(x, Var) and isinstance(weight, Var)
        neither = not isinstance(x, Var) and not isinstance(weight, Var)  # only the bias is perturbed
        second = conv(xr, wr, None, stride, padding, dilation, groups) if both else None
        center = conv(xc, wc, None, stride, padding, dilation, groups) if both or neither else None
        sides: dict[str, list] = {}
        biases = {"lower": 0.0, "upper": 0.0}
        for A, sign, direction in _sides(call):
            coeffs = []
            bias_term = 0.0
            if isinstance(x, Var):
                pulled, _ = pull_x(A, (x, wc, None, stride, padding, dilation, groups), {})
                coeffs.append((x.name, pulled[0]))
            if isinstance(weight, Var):
                coeffs.append((weight.name, conv_weight_coefficient(A, xc, weight.value.shape, stride, padding,
                                                                    dilation, groups)))
            if isinstance(bias, Var):
                coeffs.append((bias.name, A.flatten(3).sum(-1)))
            elif bias is not None:
                bias_term = (A.flatten(3).sum(-1) * bias).sum(-1)
            if neither:
                bias_term = bias_term + (A * center.unsqueeze(1)).flatten(2).sum(-1)
            if both:
                bias_term = bias_term - (A * center.unsqueeze(1)).flatten(2).sum(-1)
                bias_term = bias_term + sign * (A.abs() * second.unsqueeze(1)).flatten(2).sum(-1)
            sides[direction] = coeffs
            biases[direction] = bias_term
        names = [n for n, _ in sides.get("lower", sides.get("upper"))]
        low = dict(sides.get("lower", []))
        up = dict(sides.get("upper", []))
        return _out([(n, low.get(n), up.get(n)) for n in names], biases["lower"], biases["upper"])

    rule.__doc__ = f"conv{dims}d with a perturbed weight and/or bias (see the module docstring)."
    return rule


backward_rule(aten.conv1d.default)(_conv_rule(1))
backward_rule(aten.conv2d.default)(_conv_rule(2))


# --- batch norm ------------------------------------------------------------------------------------


def _channel_shape(x_dim: int) -> list[int]:
    return [1, -1] + [1] * (x_dim - 2)


def _spatial_sum(G: torch.Tensor) -> torch.Tensor:
    """``(batch, spec, C, *space)`` -> ``(batch, spec, C)``."""
    return G.flatten(3).sum(-1) if G.dim() > 3 else G


def batch_norm_perturbed_interval(args) -> Interval:
    """IBP of ``y = z w + b``, ``z = (x - mean) k`` (``x``/``w``/``b`` Interval or Tensor)."""
    x, weight, bias, mean, var, _momentum, eps = args
    if isinstance(mean, Interval) or isinstance(var, Interval):
        raise NotImplementedError("batch norm with perturbed running statistics")
    xi = x if isinstance(x, Interval) else Interval.point(x)
    shape = _channel_shape(xi.lower.dim())
    k = torch.rsqrt(var + eps).reshape(shape)
    m = mean.reshape(shape)
    z = Interval((xi.lower - m) * k, (xi.upper - m) * k)
    if weight is None:
        out = z
    else:
        w = weight if isinstance(weight, Interval) else Interval.point(weight)
        out = bilinear_interval(lambda a, c: a * c, z, Interval(w.lower.reshape(shape), w.upper.reshape(shape)))
    if bias is not None:
        b = bias if isinstance(bias, Interval) else Interval.point(bias)
        out = Interval(out.lower + b.lower.reshape(shape), out.upper + b.upper.reshape(shape))
    return out


@backward_rule(ops.batch_norm_eval)
def batch_norm_perturbed_backward(call):
    """Batch norm with a perturbed weight and/or bias (see the module docstring)."""
    x, weight, bias, mean, var, _momentum, eps = call.args
    if isinstance(mean, Var) or isinstance(var, Var):
        raise NotImplementedError("batch norm with perturbed running statistics")
    value = x.value if isinstance(x, Var) else constant_tensor(x)
    shape = _channel_shape(value.dim())
    k = torch.rsqrt(var + eps).reshape(shape)
    m = mean.reshape(shape)
    if isinstance(x, Var):
        if x.bounds is None:
            raise RuntimeError(f"no interval for {x.name}")
        zl, zu = (x.bounds.lower - m) * k, (x.bounds.upper - m) * k
        Z = _Factor("z", (value - m) * k, zl, zu, True, lambda G: G)
    else:
        zv = (value - m) * k
        Z = _Factor(None, zv, zv, zv, True, lambda G: G)
    if isinstance(weight, Var):
        n = weight.value.numel()
        W = _Factor(weight.name, weight.value.reshape(shape), weight.bounds.lower.reshape(shape),
                    weight.bounds.upper.reshape(shape), False, lambda G: G.reshape(G.shape[0], G.shape[1], n))
        if not _finite(Z.lower, Z.upper, W.lower, W.upper):
            return _infinite(call)
    else:
        wv = torch.ones_like(k) if weight is None else constant_tensor(weight).reshape(shape)
        W = _Factor(None, wv, wv, wv, True, lambda G: G)
    sides: dict[str, dict] = {}
    biases = {"lower": 0.0, "upper": 0.0}
    for A, sign, direction in _sides(call):
        coeffs: dict[str, torch.Tensor] = {}
        bias_term = 0.0
        if W.const:
            (gz, gw), bias_term = (A * W.value.unsqueeze(1), None), 0.0
        else:
            (gz, gw), bias_term = _elementwise_side(A, sign, Z, W, call, direction)
        if gw is not None:
            coeffs[weight.name] = W.restore(_spatial_sum(gw))
        if gz is not None:
            if isinstance(x, Var):
                coeffs[x.name] = gz * k.unsqueeze(1)
                bias_term = bias_term - (gz * (m * k).unsqueeze(1)).flatten(2).sum(-1)
            else:
                bias_term = bias_term + (gz * Z.value.unsqueeze(1)).flatten(2).sum(-1)
        summed = _spatial_sum(A)  # (batch, spec, C)
        if isinstance(bias, Var):
            coeffs[bias.name] = summed
        elif bias is not None:
            bias_term = bias_term + (summed * bias).sum(-1)
        sides[direction] = coeffs
        biases[direction] = bias_term
    names = list(next(iter(sides.values())))
    low, up = sides.get("lower", {}), sides.get("upper", {})
    return _out([(n, low.get(n), up.get(n)) for n in names], biases["lower"], biases["upper"])


__all__ = ["batch_norm_perturbed_backward", "batch_norm_perturbed_interval", "conv_weight_coefficient"]
