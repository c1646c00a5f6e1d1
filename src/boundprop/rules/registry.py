"""Rule registries, keyed by op target (an ATen ``OpOverload`` or a boundprop op function).

An op gets its bounding behaviour from a handful of independent entries, each filled by a
decorator in the file of its op family:

* ``@interval_rule(op)``: IBP, ``fn(args, kwargs) -> Interval`` where every perturbed tensor
  argument is an :class:`~boundprop.domains.Interval` and every other argument is as in the graph.
* ``affine_ops(op, ...)``: declares the op jointly affine in its perturbed tensor arguments (all
  other tensor arguments constant). Backward and forward mode then come for free from the op's
  own vector-Jacobian / Jacobian-vector products (:mod:`boundprop.rules.generic`).
* ``@relaxation_rule(op)``: an element-wise function of its first argument, bounded on an interval
  by two linear functions, ``fn(l, u, call) -> Relaxation`` (:class:`RelaxCall`).
  Backward and forward mode apply it uniformly; alpha-CROWN optimises its free parameters when the
  rule accepts an ``alpha``.
* ``@backward_rule(op)`` / ``@forward_rule(op)``: a hand-written linear bound propagation for ops
  that fit none of the above (products of two perturbed tensors, max pooling, softmax, ...).

Rules know nothing about graph traversal; the algorithms know nothing about particular ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..domains import Interval, Relaxation
from ..syncs import may_read


class Var:
    """A perturbed tensor argument as a backward/forward rule sees it.

    Attributes:
        name: the graph node (or leaf) it is the value of.
        value: its value at the unperturbed input, shape ``(batch, *shape)``. May be given as a
            function of no arguments, called on first use: the nominal value of an inner node costs
            a forward pass, which IBP and CROWN do not need (they need its ``shape``).
        bounds: its interval, when the algorithm has one (always, for ops that declare
            ``needs_bounds``).
        batched: whether ``value`` carries the batch dimension first (False for a perturbed
            parameter: its linear coefficients are then ``(batch, spec, *value.shape)``).
    """

    __slots__ = ("name", "_value", "bounds", "batched")

    def __init__(self, name: str, value: torch.Tensor | Callable[[], torch.Tensor], bounds: Interval | None = None,
                 batched: bool = True) -> None:
        self.name, self._value, self.bounds, self.batched = name, value, bounds, batched

    @property
    def value(self) -> torch.Tensor:
        if callable(self._value):
            self._value = self._value()
        return self._value

    @property
    def shape(self) -> torch.Size:
        """The shape of ``value`` (from ``bounds`` when known, without computing the value)."""
        return self.bounds.lower.shape if self.bounds is not None else self.value.shape

    def __repr__(self) -> str:
        return f"Var({self.name!r}, batched={self.batched})"


@dataclass
class RelaxCall:
    """What a relaxation rule receives besides the interval.

    Attributes:
        args: the node's arguments after the first (constants such as a slope or clamp limits).
        kwargs: the node's keyword arguments.
        opts: the bound options of the call (e.g. ``activation_bound_option``).
        alpha: free relaxation parameters chosen by alpha-CROWN, or None for the default choice.
            The rule decides their meaning (for ReLU, the lower slope in [0, 1]).
        direction: "lower" or "upper": which bound of the output the relaxation serves. Walks may
            serve both from one call (alpha-CROWN's two parameter sets stacked along the spec
            dimension, see ``algorithms.backward._joinable``), so lines must not depend on it.
        memo: a dict the rule may fill with results that depend on the interval (and the node's
            constant arguments) only, not on ``alpha`` or ``direction``: the caller hands the same
            dict to every call on the same node and interval (alpha-CROWN, whose walks from every
            start relax the nodes before it with their own alphas), and a new one when either
            changes. None: no memo.
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    opts: dict = field(default_factory=dict)
    alpha: torch.Tensor | None = None
    direction: str = "lower"
    memo: dict | None = None


@dataclass
class AlphaSpec:
    """How alpha-CROWN parametrises a relaxation rule.

    ``init(l, u, call) -> Tensor`` gives the starting alpha (the default relaxation, shape of the
    interval); ``project(alpha, l, u) -> Tensor`` maps any alpha back into its valid set.
    """

    init: Callable[..., torch.Tensor]
    project: Callable[..., torch.Tensor]


@dataclass
class OpRules:
    interval: Callable[..., Interval] | None = None
    affine: bool = False
    homogeneous: bool = False  # affine with no constant term (f(0) = 0)
    affine_when: Callable[[tuple], bool] | None = None  # affine only for some perturbed arguments
    affine_backward: Callable[..., Any] | None = None  # fast path for the affine case
    relaxation: Callable[..., Relaxation] | None = None
    prepared: Callable[..., tuple | None] | None = None  # fast path for the default relaxation
    unstable: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    alpha: AlphaSpec | None = None
    backward: Callable[..., Any] | None = None
    forward: Callable[..., Any] | None = None
    affine_forward: Callable[..., Any] | None = None  # fast forward-mode path for the affine case
    needs_bounds: bool = False


RULES: dict[Any, OpRules] = {}


def rules_for(target: Any) -> OpRules | None:
    return RULES.get(target)


def _entry(target: Any) -> OpRules:
    return RULES.setdefault(target, OpRules())


def interval_rule(*targets: Any) -> Callable:
    def register(fn: Callable) -> Callable:
        for target in targets:
            _entry(target).interval = fn
        return fn

    return register


def affine_ops(*targets: Any, homogeneous: bool = False, when: Callable[[tuple], bool] | None = None) -> None:
    """Declare ops affine in their perturbed tensor arguments.

    ``homogeneous``: linear (``f(0) = 0``). ``when(args)``: the op is affine only when this holds of
    its arguments (perturbed ones are :class:`Var`); otherwise its ``backward`` rule is used.
    """
    for target in targets:
        entry = _entry(target)
        entry.affine = True
        entry.homogeneous = homogeneous
        entry.affine_when = when


def is_perturbed(arg: Any) -> bool:
    """True for a perturbed argument as rules see it (a :class:`Var` or an :class:`Interval`)."""
    return isinstance(arg, (Var, Interval))


def constant_tensor(arg: Any) -> torch.Tensor:
    """A constant argument as a tensor: a tensor stays where it is; a Python number becomes a CPU
    scalar tensor, which combines with tensors on any device. (``torch.as_tensor`` would move a
    tensor to the default device when one is set.)"""
    return arg if isinstance(arg, torch.Tensor) else torch.as_tensor(arg, device="cpu")


def perturbed_positions(args: tuple) -> tuple[int, ...]:
    return tuple(i for i, a in enumerate(args) if is_perturbed(a))


def is_zero(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is known to be 0 (for the None fields of ``prepared``). One min-max
    pass: on CPU ``any`` and ``count_nonzero`` cost 6-9 times as much (65k entries: 20 us against
    176 and 51). False without looking where reading would wait for a device (a zero field kept
    costs a few element-wise operations; see :mod:`boundprop.syncs`)."""
    if t.numel() == 0:
        return True
    if not may_read(t):
        return False
    low, high = torch.aminmax(t.detach())
    return not (bool(low) or bool(high))


def relaxation_rule(*targets: Any, unstable: Callable | None = None, alpha: AlphaSpec | None = None,
                    prepared: Callable | None = None) -> Callable:
    """Register ``fn(l, u, call: RelaxCall) -> Relaxation`` for element-wise ops.

    ``unstable(l, u) -> bool tensor`` marks the neurons whose relaxation is not exact (CROWN
    refines only those; default: all). ``prepared(l, u, call) -> (lw, d, lb, db) | None``: optional,
    the same relaxation (without alpha) in the form the backward walk applies, ``d = uw - lw`` and
    ``db = ub - lb`` (None for a field that is zero), in fewer tensor operations; None defers to ``fn``.
    """

    def register(fn: Callable) -> Callable:
        for target in targets:
            entry = _entry(target)
            entry.relaxation = fn
            entry.prepared = prepared
            entry.unstable = unstable
            entry.alpha = alpha
            entry.needs_bounds = True
        return fn

    return register


def affine_backward_rule(*targets: Any) -> Callable:
    """Register a fast ``fn(A, args, kwargs) -> (A_per_perturbed_arg, bias) | None`` for affine ops.

    ``A`` is ``(batch, spec, *out)``; the result lists one coefficient tensor per perturbed argument
    in order of appearance, and the bias ``A . f(0)`` as ``(batch, spec)`` (or 0). Returning None
    defers to the generic vector-Jacobian product.
    """

    def register(fn: Callable) -> Callable:
        for target in targets:
            _entry(target).affine_backward = fn
        return fn

    return register


def backward_rule(*targets: Any, needs_bounds: bool = True) -> Callable:
    def register(fn: Callable) -> Callable:
        for target in targets:
            entry = _entry(target)
            entry.backward = fn
            entry.needs_bounds = entry.needs_bounds or needs_bounds
        return fn

    return register


@dataclass
class ForwardCall:
    """What a hand-written forward-mode rule receives (see :func:`forward_rule`).

    Attributes:
        args, kwargs: the node's arguments, perturbed ones as :class:`Var` (with their interval).
        forms: the :class:`~boundprop.domains.linear_forms.LinearForms` of each perturbed
            argument, by ``Var.name``: rows ``(batch, D + 1, *arg_shape)``, the last row the constant.
        value: the node's value at the unperturbed inputs, ``(batch, *out)``.
        opts: the bound options of the call.
    """

    args: tuple
    kwargs: dict
    forms: dict
    value: torch.Tensor
    opts: dict = field(default_factory=dict)


def forward_rule(*targets: Any, needs_bounds: bool = True) -> Callable:
    """Register ``fn(call: ForwardCall) -> LinearForms`` (forward-mode LiRPA for a non-affine op).

    The result bounds the node's output: rows ``(batch, D + 1, *out)``. ``needs_bounds``: the rule
    reads its perturbed arguments' intervals (``Var.bounds``), so the algorithm computes them first.
    Ops without such a rule (nor an affine or relaxation rule) are not supported in forward mode.
    """

    def register(fn: Callable) -> Callable:
        for target in targets:
            entry = _entry(target)
            entry.forward = fn
            entry.needs_bounds = entry.needs_bounds or needs_bounds
        return fn

    return register


def affine_forward_rule(*targets: Any) -> Callable:
    """Register a fast ``fn(tangents, args, kwargs, absolute) -> Tensor | None`` for affine ops.

    With ``f(x) = sum_i J_i x_i + c``, return ``sum_i J_i T_i`` (``absolute``: ``sum_i |J_i| T_i``,
    the entry-wise absolute value of each Jacobian) where ``tangents`` lists, per perturbed argument
    in order of appearance, ``T_i`` of shape ``(batch, R, *in_i)`` or None (zero); the result is
    ``(batch, R, *out)``. Returning None defers to the generic Jacobian-vector product
    (:class:`~boundprop.rules.generic.AffinePushforward`).
    """

    def register(fn: Callable) -> Callable:
        for target in targets:
            _entry(target).affine_forward = fn
        return fn

    return register


def is_supported(target: Any) -> bool:
    """An op is supported when it has an interval rule and some linear (backward) rule."""
    entry = RULES.get(target)
    return entry is not None and entry.interval is not None and (
        entry.affine or entry.relaxation is not None or entry.backward is not None)
