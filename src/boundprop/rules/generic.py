"""Generic linear bound propagation for ops that are affine in their perturbed arguments.

For an op ``y = f(x_1, ..., x_k, constants)`` that is jointly affine in the perturbed ``x_i``,
``f(x) = sum_i J_i x_i + c`` with ``c = f(0, ..., 0, constants)``. Backward (CROWN) propagation of
linear coefficients ``A`` (shape ``(batch, spec, *y.shape[1:])``) is then exact::

    A . y = sum_i (A J_i) . x_i + A . c

where ``A J_i`` is the op's own vector-Jacobian product, evaluated for every spec row at once with
``torch.func.vmap``. Forward mode uses the Jacobian-vector product the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..syncs import may_read
from .registry import Var


def map_vars(obj: Any, fn: Callable[[Var], Any]) -> Any:
    if isinstance(obj, Var):
        return fn(obj)
    if isinstance(obj, list):
        return [map_vars(item, fn) for item in obj]
    if isinstance(obj, tuple):
        return tuple(map_vars(item, fn) for item in obj)
    if isinstance(obj, dict):
        return {key: map_vars(item, fn) for key, item in obj.items()}
    return obj


def collect_vars(obj: Any) -> list[Var]:
    found: list[Var] = []
    map_vars(obj, lambda v: found.append(v) or v)
    return found


def with_values(target: Callable, args: tuple, kwargs: dict) -> Callable[..., torch.Tensor]:
    """``g(*values)``: the op with its perturbed arguments (in order of appearance) replaced."""

    def g(*values: torch.Tensor) -> torch.Tensor:
        it = iter(values)
        substitute = lambda v: next(it)
        return target(*map_vars(args, substitute), **map_vars(kwargs, substitute))

    return g


def _nonzero_or_none(constant: torch.Tensor) -> torch.Tensor | None:
    """``constant``, or None where it is known to be 0 (e.g. ``cat`` of perturbed tensors only): no
    pass over the coefficients to add nothing. Known only where values can be read on the host."""
    return None if may_read(constant) and not bool(constant.any()) else constant


class AffinePullback:
    """The linear map ``A -> (A J_1, ..., A J_k)`` and constant term ``c`` of an affine op."""

    def __init__(self, target: Callable, args: tuple, kwargs: dict, homogeneous: bool = False) -> None:
        self.vars = collect_vars((args, kwargs))
        for var in self.vars:
            if var.value.dim() == 0:
                raise NotImplementedError("the generic affine rule needs batched perturbed arguments")
        g = with_values(target, args, kwargs)
        values = [v.value for v in self.vars]
        self.output, self._vjp = torch.func.vjp(g, *values)
        self.constant = None if homogeneous else _nonzero_or_none(g(*[torch.zeros_like(v) for v in values]))

    def backward(self, A: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``A``: ``(batch, spec, *out)`` -> one ``(batch, spec, *in_i)`` per perturbed argument."""
        return torch.func.vmap(self._vjp, in_dims=1, out_dims=1)(A)

    def bias(self, A: torch.Tensor) -> torch.Tensor | float:
        """``A . c`` summed over the output dimensions: ``(batch, spec)``."""
        if self.constant is None:
            return 0.0
        return (A * self.constant.unsqueeze(1)).flatten(2).sum(-1)


class AffinePushforward:
    """The linear map ``(T_1, ..., T_k) -> sum_i J_i T_i`` and constant term ``c`` of an affine op.

    Forward-mode counterpart of :class:`AffinePullback`: each ``T_i`` is ``(batch, R, *in_i)`` (``R``
    rows, e.g. the coefficients of ``D`` input entries plus a constant row); the op's own
    Jacobian-vector product is applied to every row at once with ``torch.func.vmap``.
    ``absolute`` applies ``|J_i|`` (entry-wise absolute value) instead, from the dense Jacobian of
    each argument (``batch * n_in * n_out`` numbers): a sound but costly fallback for affine ops
    without a fast forward rule and with Jacobians of unknown sign.
    """

    def __init__(self, target: Callable, args: tuple, kwargs: dict, homogeneous: bool = False) -> None:
        self.vars = collect_vars((args, kwargs))
        for var in self.vars:
            if var.value.dim() == 0:
                raise NotImplementedError("the generic affine rule needs batched perturbed arguments")
        self._g = with_values(target, args, kwargs)
        self._primals = tuple(v.value for v in self.vars)
        self.constant = None if homogeneous else self._g(*[torch.zeros_like(v) for v in self._primals])
        self._abs_jacobians: dict[int, torch.Tensor] = {}

    def _jvp(self, *tangents: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(self._g, self._primals, tangents)[1]

    def forward(self, tangents: list[torch.Tensor | None]) -> torch.Tensor:
        """``sum_i J_i T_i``: ``(batch, R, *out)``; None tangents are zero."""
        full = [t if t is not None else torch.zeros_like(p) for t, p in zip(tangents, self._primals)]
        in_dims = tuple(1 if t is not None else None for t in tangents)
        return torch.func.vmap(self._jvp, in_dims=in_dims, out_dims=1)(*full)

    def absolute(self, tangents: list[torch.Tensor | None]) -> torch.Tensor:
        """``sum_i |J_i| T_i`` from the dense Jacobians (computed once per argument)."""
        total = None
        for i, t in enumerate(tangents):
            if t is None:
                continue
            if i not in self._abs_jacobians:
                primal = self._primals[i]
                batch, n = primal.shape[0], primal[0].numel()
                basis = torch.eye(n, dtype=primal.dtype, device=primal.device).reshape(1, n, *primal.shape[1:])
                only = [basis.expand(batch, *basis.shape[1:]) if j == i else None for j in range(len(tangents))]
                self._abs_jacobians[i] = self.forward(only).reshape(batch, n, -1).abs()
            jac = self._abs_jacobians[i]
            part = t.reshape(t.shape[0], t.shape[1], -1) @ jac
            total = part if total is None else total + part
        out_shape = self.output_shape
        return total.reshape(total.shape[0], total.shape[1], *out_shape[1:])

    @property
    def output_shape(self) -> torch.Size:
        if not hasattr(self, "_output_shape"):
            self._output_shape = self._g(*self._primals).shape
        return self._output_shape
