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
        self.constant = None if homogeneous else g(*[torch.zeros_like(v) for v in values])

    def backward(self, A: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``A``: ``(batch, spec, *out)`` -> one ``(batch, spec, *in_i)`` per perturbed argument."""
        return torch.func.vmap(self._vjp, in_dims=1, out_dims=1)(A)

    def bias(self, A: torch.Tensor) -> torch.Tensor | float:
        """``A . c`` summed over the output dimensions: ``(batch, spec)``."""
        if self.constant is None:
            return 0.0
        return (A * self.constant.unsqueeze(1)).flatten(2).sum(-1)
