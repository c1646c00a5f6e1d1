"""2-D pooling: ``max_pool2d`` (a maximum per window) and fast paths for the average poolings.

``max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)``, padding with ``-inf``:

* IBP (monotone, exact): ``[max_pool2d(l), max_pool2d(u)]``;
* backward: the windows are gathered with ``unfold`` (the input bounds padded with ``-inf`` on the
  top/left by ``padding`` and on the bottom/right by as much as the output needs, which covers
  ``ceil_mode``), each window is relaxed as a maximum of its ``K = kh * kw`` entries
  (:func:`.maximum.max_relaxation`; padding entries are never chosen and get weight 0), and the
  per-window coefficients ``(batch, spec, C, Hout, Wout, K)`` are summed back onto the input
  ``(batch, spec, C, H, W)`` by ``fold`` (overlapping windows accumulate), then the padding is cut.

``avg_pool2d`` / ``adaptive_avg_pool2d`` are linear (declared in :mod:`.shape`); here they get a
fast backward path: the spec dimension is folded into the batch and ATen's own pooling backward
(the exact vector-Jacobian product, so ``ceil_mode``, ``count_include_pad`` and
``divisor_override`` are honoured as the forward op defines them) maps ``(batch * spec, C, Hout,
Wout)`` to ``(batch * spec, C, H, W)``. ``avg_pool2d``'s IBP is centre/radius, exact also for a
negative ``divisor_override`` (all window weights share one sign).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..domains import Interval
from . import shape as _shape  # noqa: F401 - registered first, so that the rules below override it
from .maximum import max_relaxation, pull_candidates
from .registry import Var, affine_backward_rule, backward_rule, interval_rule

aten = torch.ops.aten


def _pair(v, default=None) -> tuple[int, int]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))
    return int(v), int(v)


def _max_pool_args(args, kwargs):
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
    defaults = (None, None, 0, 1, False)
    vals = [args[i + 1] if len(args) > i + 1 else kwargs.get(n, d) for i, (n, d) in enumerate(zip(names, defaults))]
    kernel = _pair(vals[0])
    return kernel, _pair(vals[1], kernel), _pair(vals[2]), _pair(vals[3]), bool(vals[4])


@interval_rule(aten.max_pool2d.default)
def max_pool2d_interval(args, kwargs) -> Interval:
    """Exact: the pooling of the lower and of the upper ends."""
    x = args[0]
    kernel, stride, padding, dilation, ceil_mode = _max_pool_args(args, kwargs)
    pool = lambda t: F.max_pool2d(t, kernel, stride, padding, dilation, ceil_mode)  # noqa: E731
    return Interval(pool(x.lower), pool(x.upper))


def _out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1  # the last window must start inside the input or the left padding
    return out


def _windows(t: torch.Tensor, kernel, stride, dilation, pads, fill: float) -> torch.Tensor:
    """``(N, H, W)`` -> ``(N, L, K)``: the entries of every window (``L = Hout * Wout``)."""
    padded = F.pad(t.unsqueeze(1), pads, value=fill)
    return F.unfold(padded, kernel, dilation=dilation, stride=stride).transpose(1, 2)


@backward_rule(aten.max_pool2d.default)
def max_pool2d_backward(call):
    """CROWN through 2-D max pooling: the max relaxation per window, accumulated back by ``fold``."""
    from ..algorithms.backward import BackwardOut  # noqa: PLC0415 - algorithms import rules

    x = call.args[0]
    if not isinstance(x, Var):
        raise NotImplementedError("max_pool2d: the input must be the perturbed argument")
    kernel, stride, padding, dilation, ceil_mode = _max_pool_args(call.args, call.kwargs)
    shape = x.shape
    H, W = shape[-2], shape[-1]
    lead = shape[1:-2]
    out_hw = [_out_size(n, kernel[i], stride[i], padding[i], dilation[i], ceil_mode) for i, n in enumerate((H, W))]
    A0 = call.lA if call.lA is not None else call.uA
    if list(A0.shape[-2:]) != out_hw:
        raise NotImplementedError(f"max_pool2d: unexpected output size {tuple(A0.shape[-2:])} (expected {out_hw})")
    need = [(out_hw[i] - 1) * stride[i] + dilation[i] * (kernel[i] - 1) + 1 for i in range(2)]
    extra = [max(0, need[i] - (n + 2 * padding[i])) for i, n in enumerate((H, W))]
    pads = (padding[1], padding[1] + extra[1], padding[0], padding[0] + extra[0])
    padded_hw = (H + 2 * padding[0] + extra[0], W + 2 * padding[1] + extra[1])
    flat = lambda t: t.reshape(-1, H, W)  # noqa: E731
    win = lambda t, fill: _windows(flat(t), kernel, stride, dilation, pads, fill)  # noqa: E731
    lo, hi = win(x.bounds.lower, -torch.inf), win(x.bounds.upper, -torch.inf)
    valid = win(torch.ones_like(x.bounds.lower), 0.0) > 0
    rel = max_relaxation(lo, hi, valid)
    n_out = (shape[0], *lead, *out_hw)
    rel = type(rel)(*(t.reshape(*n_out, *t.shape[2:]) for t in (rel.wl, rel.bl, rel.wu, rel.bu)))

    def side(A, which):
        if A is None:
            return None, 0.0
        coef, bias = pull_candidates(A, rel, which)  # (batch, spec, *lead, Hout, Wout, K)
        rows = coef.reshape(-1, out_hw[0] * out_hw[1], coef.shape[-1]).transpose(1, 2)
        back = F.fold(rows, padded_hw, kernel, dilation=dilation, stride=stride)
        back = back[:, 0, padding[0]:padding[0] + H, padding[1]:padding[1] + W]
        return back.reshape(A.shape[0], A.shape[1], *shape[1:]), bias

    new_l, lbias = side(call.lA, "lower")
    new_u, ubias = side(call.uA, "upper")
    return BackwardOut([(x.name, new_l, new_u)], lbias, ubias)


# --- average pooling: fast backward and sign-safe IBP ------------------------------------------------


def _avg_pool_args(args, kwargs):
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    defaults = (None, None, 0, False, True, None)
    vals = [args[i + 1] if len(args) > i + 1 else kwargs.get(n, d) for i, (n, d) in enumerate(zip(names, defaults))]
    kernel = _pair(vals[0])
    return [list(kernel), list(_pair(vals[1], kernel)), list(_pair(vals[2])), bool(vals[3]), bool(vals[4]), vals[5]]


@interval_rule(aten.avg_pool2d.default)
def avg_pool2d_interval(args, kwargs) -> Interval:
    """Centre/radius: ``avg(x_c) +- |avg(x_r)|`` (exact; window weights share the sign of the divisor)."""
    x = args[0]
    pool = lambda t: aten.avg_pool2d.default(t, *_avg_pool_args(args, kwargs))  # noqa: E731
    c, r = pool(x.center), pool(x.radius).abs()
    return Interval(c - r, c + r)


def _fold_spec(A: torch.Tensor) -> torch.Tensor:
    return A.reshape(A.shape[0] * A.shape[1], *A.shape[2:])


def _zeros_like_input(x: Var, A: torch.Tensor) -> torch.Tensor:
    shape = (A.shape[0] * A.shape[1], *x.shape[1:])
    return torch.zeros((), dtype=A.dtype, device=A.device).expand(shape)


@affine_backward_rule(aten.avg_pool2d.default)
def avg_pool2d_backward(A, args, kwargs):
    """``A . avg_pool(x) = avg_pool_backward(A) . x`` with the spec folded into the batch."""
    x = args[0]
    grad = aten.avg_pool2d_backward.default(_fold_spec(A), _zeros_like_input(x, A), *_avg_pool_args(args, kwargs))
    return [grad.reshape(A.shape[0], A.shape[1], *x.shape[1:])], 0.0


@affine_backward_rule(aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)
def adaptive_avg_pool2d_backward(A, args, kwargs):
    """``A . adaptive_avg_pool(x) = adaptive_avg_pool_backward(A) . x`` (spec folded into the batch)."""
    x = args[0]
    grad = aten._adaptive_avg_pool2d_backward.default(_fold_spec(A).contiguous(), _zeros_like_input(x, A))
    return [grad.reshape(A.shape[0], A.shape[1], *x.shape[1:])], 0.0
