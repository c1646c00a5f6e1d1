"""Lp-ball and box perturbations.

A perturbation describes the set an input (or a parameter) ranges over. It answers two
questions:

* ``interval(x)``: an element-wise box containing the set (for IBP);
* ``concretize(x, A, sign)``: the exact minimum (``sign=-1``) or maximum (``sign=+1``) of the
  linear function ``A . x'`` over the set, for every row of ``A`` (for CROWN and forward mode).

Shapes: ``x`` is ``(batch, *shape)`` (or a parameter's shape); ``A`` is ``(batch, spec, *shape)``;
the result is ``(batch, spec)``.
"""

from __future__ import annotations

import math

import torch

from ..domains import Interval


class Perturbation:
    """Base class of perturbation sets."""

    def interval(self, x: torch.Tensor) -> Interval:
        raise NotImplementedError

    def concretize(self, x: torch.Tensor, A: torch.Tensor, sign: int) -> torch.Tensor:
        raise NotImplementedError


class PerturbationLpNorm(Perturbation):
    """``{x' : ||x' - x||_p <= eps}``, intersected with the box ``[x_L, x_U]`` for ``p = inf``.

    Arguments (auto_LiRPA order and names):
        eps: radius; a float or a tensor broadcastable to the input (element-wise radius, L-inf).
        norm: ``p``, one of ``float("inf")``, 2, 1 (any ``p >= 1`` works).
        x_L, x_U: optional element-wise box. For ``p = inf`` the set is the ball intersected with
            the box; when ``eps`` is None or 0 and a box is given, the set is the box alone. Giving
            ``x_L == x_U`` on some entries perturbs only the others. For other norms the box only
            bounds the interval used by IBP.
    """

    def __init__(self, eps: float | torch.Tensor | None = 0.0, norm: float = math.inf,
                 x_L: torch.Tensor | None = None, x_U: torch.Tensor | None = None, **unused) -> None:
        self.eps = 0.0 if eps is None else eps
        self.norm = float(norm)
        if self.norm < 1:
            raise ValueError(f"norm must be >= 1, got {norm}")
        self.x_L = x_L
        self.x_U = x_U
        self.dual_norm = math.inf if self.norm == 1 else (1.0 if self.norm == math.inf else
                                                             self.norm / (self.norm - 1))

    def __repr__(self) -> str:
        box = ", box" if self.x_L is not None else ""
        return f"PerturbationLpNorm(norm={self.norm}, eps={self.eps}{box})"

    def _box_only(self) -> bool:
        eps = self.eps
        no_eps = (not torch.is_tensor(eps) and eps == 0) or (torch.is_tensor(eps) and not bool((eps != 0).any()))
        return self.x_L is not None and self.x_U is not None and no_eps

    def interval(self, x: torch.Tensor) -> Interval:
        if self._box_only():
            return Interval(self.x_L.to(x), self.x_U.to(x))
        eps = self.eps.to(x) if torch.is_tensor(self.eps) else self.eps
        lower, upper = x - eps, x + eps
        if self.x_L is not None:
            lower = torch.maximum(lower, self.x_L.to(x))
        if self.x_U is not None:
            upper = torch.minimum(upper, self.x_U.to(x))
        return Interval(lower, upper)

    def concretize(self, x: torch.Tensor, A: torch.Tensor, sign: int) -> torch.Tensor:
        if x.dim() == A.dim() - 2:  # a parameter (no batch dimension)
            x = x.unsqueeze(0)
        A_flat = A.reshape(A.shape[0], A.shape[1], -1)
        if self.norm == math.inf or self._box_only():
            box = self.interval(x)
            center = box.center.reshape(box.center.shape[0], -1, 1)
            radius = box.radius.reshape(box.radius.shape[0], -1, 1)
            return (A_flat @ center).squeeze(-1) + sign * (A_flat.abs() @ radius).squeeze(-1)
        center = x.reshape(x.shape[0], -1, 1)
        eps = self.eps
        if torch.is_tensor(eps):
            eps = eps.reshape(eps.shape[0], 1) if eps.dim() > 0 and eps.shape[0] == A.shape[0] else eps.max()
        return (A_flat @ center).squeeze(-1) + sign * eps * A_flat.norm(p=self.dual_norm, dim=-1)
