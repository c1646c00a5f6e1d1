"""Linear forms over the perturbed inputs: the domain of forward-mode LiRPA.

A node ``y`` of shape ``(batch, *shape)`` is bounded by two affine functions of the stacked
entries ``x`` (``D`` of them per example) of every perturbed input::

    lw . x + lb  <=  y  <=  uw . x + ub        for every x in the perturbation set

The constant term is stored as one extra row after the ``D`` coefficient rows, so an affine
layer transforms coefficients and constant in a single call: ``lower``/``upper`` have shape
``(batch, D + 1, *shape)`` and ``lw = lower[:, :D]``, ``lb = lower[:, D]``. The batch dimension
may be 1 for forms shared by every example (the inputs' identity and the affine layers after it):
they broadcast against per-example tensors.

Forms are *exact* when the lower and the upper form are the same tensor (every node before the
first relaxation): affine layers then transform one tensor instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..syncs import may_read


@dataclass(frozen=True)
class LinearForms:
    """``lower . [x; 1] <= y <= upper . [x; 1]``; ``lower``/``upper``: ``(batch, D + 1, *shape)``."""

    lower: torch.Tensor
    upper: torch.Tensor

    @staticmethod
    def exact(rows: torch.Tensor) -> LinearForms:
        """``y = rows . [x; 1]`` exactly."""
        return LinearForms(rows, rows)

    @property
    def is_exact(self) -> bool:
        return self.lower is self.upper

    @property
    def dim(self) -> int:
        """``D``: the number of perturbed input entries (per example)."""
        return self.lower.shape[1] - 1

    @property
    def lw(self) -> torch.Tensor:
        return self.lower[:, :-1]

    @property
    def lb(self) -> torch.Tensor:
        return self.lower[:, -1]

    @property
    def uw(self) -> torch.Tensor:
        return self.upper[:, :-1]

    @property
    def ub(self) -> torch.Tensor:
        return self.upper[:, -1]

    def add_constant(self, lower: torch.Tensor | float, upper: torch.Tensor | float | None = None,
                     fresh: bool = False) -> LinearForms:
        """Forms of ``y + c`` with ``c`` in ``[lower, upper]`` (shape ``(batch, *shape)`` or broadcastable).

        ``fresh``: this object's tensors are new and held nowhere else; they are updated in place.
        """
        upper = lower if upper is None else upper
        new_l = add_to_last_row(self.lower, lower, fresh)
        if self.is_exact and upper is lower:
            return LinearForms(new_l, new_l)
        if self.is_exact:
            return LinearForms(new_l, add_to_last_row(self.upper, upper, False))
        return LinearForms(new_l, add_to_last_row(self.upper, upper, fresh))


def vacuous_where_infinite(forms: LinearForms) -> LinearForms:
    """Entries whose constant is not finite (an unbounded relaxation, or ``inf - inf`` downstream
    of one) become the vacuous forms ``-inf <= y <= +inf`` with zero coefficients, so that no NaN
    spreads through later layers. Only the constant rows are inspected (coefficients stay finite)."""
    lower = vacuous_rows(forms.lower, -1.0)
    upper = lower if forms.is_exact and lower is forms.lower else vacuous_rows(forms.upper, 1.0)
    if lower is forms.lower and upper is forms.upper:
        return forms
    return LinearForms(lower, upper)


def vacuous_rows(rows: torch.Tensor, sign: float) -> torch.Tensor:
    """``rows`` (``(batch, D + 1, ...)``) with zero coefficients and constant ``sign * inf`` wherever the
    constant is not finite."""
    bad = ~torch.isfinite(rows[:, -1])
    if may_read(bad) and not bool(bad.any()):
        return rows
    bad = bad.unsqueeze(1)
    coeffs = torch.where(bad, torch.zeros((), dtype=rows.dtype, device=rows.device), rows[:, :-1])
    bias = torch.where(bad, torch.full((), sign * torch.inf, dtype=rows.dtype, device=rows.device), rows[:, -1:])
    return torch.cat([coeffs, bias], dim=1)


def add_to_last_row(rows: torch.Tensor, c: torch.Tensor | float, fresh: bool = False) -> torch.Tensor:
    """``rows`` with ``c`` added to the constant row.

    ``c`` broadcasts against ``(batch, *shape)``; rows shared by the whole batch (batch dimension 1)
    are expanded when ``c`` differs between examples. ``fresh``: ``rows`` is a new tensor nobody
    else holds, so it is updated in place (autograd allows it for outputs of matmul/add/mul).
    """
    if not torch.is_tensor(c):
        if c == 0:
            return rows
    elif c.dim() == rows.dim() - 1 and c.shape[0] > rows.shape[0]:
        if may_read(c) and torch.equal(c, c[:1].expand_as(c)):  # shared rows stay shared
            c = c[:1]
        else:
            rows, fresh = rows.expand(c.shape[0], *rows.shape[1:]), False
    if fresh:
        rows[:, -1] += c
        return rows
    bias = rows[:, -1] + c
    if bias.shape != rows.shape[:1] + rows.shape[2:]:
        bias = bias.expand(rows.shape[:1] + rows.shape[2:])
    return torch.cat([rows[:, :-1], bias.unsqueeze(1)], dim=1)


def compose(coef: torch.Tensor, forms: LinearForms, side: str) -> torch.Tensor:
    """Rows bounding ``coef * y`` (element-wise, ``coef``: ``(batch, *shape)``) from ``side``.

    ``side="lower"``: ``coef+ * lower + coef- * upper``; ``"upper"``: the other way round. The
    result has the broadcast shape ``(batch, D + 1, *shape)``.
    """
    coef = coef.unsqueeze(1) if torch.is_tensor(coef) and coef.dim() > 0 else coef
    if forms.is_exact:
        return coef * forms.lower
    first, second = (forms.lower, forms.upper) if side == "lower" else (forms.upper, forms.lower)
    if not torch.is_tensor(coef):
        return coef * (first if coef >= 0 else second)
    if may_read(coef):  # e.g. ReLU's slopes (of one sign): one product instead of two
        if bool((coef >= 0).all()):
            return coef * first
        if bool((coef <= 0).all()):
            return coef * second
    # each entry's own product (not coef+ first + coef- second, where 0 * inf would make a NaN)
    return torch.where(coef >= 0, coef * first, coef * second)
