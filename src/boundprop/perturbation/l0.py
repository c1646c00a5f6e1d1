"""L0 perturbation: at most ``k = ceil(eps)`` input entries change, each to any value of a box.

The set, for an input ``x`` (``(batch, *shape)``)::

    S = { x' : x'_j = x_j + ratio (v_j - x_j) with v_j in [x_L_j, x_U_j] for at most k entries j,
               x'_j = x_j for all others }

``x_L``/``x_U`` default to ``[0, 1]`` (images); ``ratio`` (auto_LiRPA's argument, default 1)
scales how far a changed entry moves towards its new value (1: anywhere in the box).

**Concretisation** (exact). Changing entry ``j`` alone changes ``a . x`` by
``d_j in ratio a_j ([x_L_j, x_U_j] - x_j)``; the entries are independent, so::

    min_{x' in S} a . x' = a . x + (sum of the k smallest of min(d_j^-, 0))
    d_j^- = ratio min(a_j (x_L_j - x_j), a_j (x_U_j - x_j))

(the largest ``max(d_j^+, 0)`` for the maximum): a sort (``topk``) per row of ``A``.

**Interval**: every entry may change, so the box is the hull of ``x`` and ``x + ratio ([x_L, x_U] - x)``
(``x`` itself when ``k = 0``). IBP alone is loose, but the first affine layer after the input is
bounded exactly through :meth:`concretize` (the engine treats an L0 set as a non-box ball).
"""

from __future__ import annotations

import math

import torch

from ..domains import Interval
from .lp import Perturbation


class PerturbationL0Norm(Perturbation):
    """At most ``ceil(eps)`` entries of the input change, each within ``[x_L, x_U]`` (default ``[0, 1]``).

    Arguments (auto_LiRPA's order and names):
        eps: the number of entries that may change (rounded up).
        x_L, x_U: the values a changed entry may take (numbers or tensors broadcastable to the input).
        ratio: a changed entry moves to ``x + ratio (v - x)``, ``v`` in the box (default 1).
    """

    #: marks the set as a non-box ball for IBP (the first affine layer is bounded through concretize)
    norm = 0.0

    def __init__(self, eps: float, x_L: float | torch.Tensor | None = None, x_U: float | torch.Tensor | None = None,
                 ratio: float = 1.0) -> None:
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = eps
        self.k = int(math.ceil(eps))
        self.x_L = 0.0 if x_L is None else x_L
        self.x_U = 1.0 if x_U is None else x_U
        self.ratio = float(ratio)

    def __repr__(self) -> str:
        return f"PerturbationL0Norm(eps={self.eps}, ratio={self.ratio})"

    def _box_only(self) -> bool:
        return False

    def _moves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ratio (x_L - x)`` and ``ratio (x_U - x)``: the two extreme changes of every entry."""
        lo = torch.as_tensor(self.x_L, dtype=x.dtype, device=x.device)
        hi = torch.as_tensor(self.x_U, dtype=x.dtype, device=x.device)
        return self.ratio * (lo - x), self.ratio * (hi - x)

    def interval(self, x: torch.Tensor) -> Interval:
        if self.k == 0:
            return Interval(x, x)
        down, up = self._moves(x)
        zero = torch.zeros_like(x)
        lower = x + torch.minimum(torch.minimum(down, up), zero)
        return Interval(lower, x + torch.maximum(torch.maximum(down, up), zero))

    def concretize(self, x: torch.Tensor, A: torch.Tensor, sign: int) -> torch.Tensor:
        if x.dim() == A.dim() - 2:  # a parameter (no batch dimension)
            x = x.unsqueeze(0)
        batch = max(x.shape[0], A.shape[0])
        A_flat = A.reshape(A.shape[0], A.shape[1], -1).expand(batch, -1, -1)
        x_flat = x.reshape(x.shape[0], -1).expand(batch, -1)
        base = (A_flat @ x_flat.unsqueeze(-1)).squeeze(-1)
        k = min(self.k, x_flat.shape[1])
        if k == 0:
            return base
        down, up = (m.reshape(m.shape[0], -1).expand(batch, -1).unsqueeze(1) for m in self._moves(x))
        change_a, change_b = A_flat * down, A_flat * up
        if sign < 0:
            gain = torch.minimum(torch.minimum(change_a, change_b), torch.zeros_like(change_a))
            return base - (-gain).topk(k, dim=-1).values.sum(-1)
        gain = torch.maximum(torch.maximum(change_a, change_b), torch.zeros_like(change_a))
        return base + gain.topk(k, dim=-1).values.sum(-1)
