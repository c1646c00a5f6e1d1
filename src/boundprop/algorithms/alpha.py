"""alpha-CROWN: CROWN with optimised relaxation parameters (as auto_LiRPA 0.7.1's ``CROWN-Optimized``).

Every relaxation rule registered with an :class:`~boundprop.rules.registry.AlphaSpec` (ReLU: the
lower slope ``alpha`` in ``[0, 1]``) has free parameters. Any value in their valid set gives a
sound relaxation, so every choice gives a sound bound; alpha-CROWN picks them by gradient ascent
on the bound itself.

Procedure (one call):

1. CROWN: IBP, the CROWN refinement of every intermediate interval, the final backward walk.
   These bounds are the starting point and the floor: the result is never looser, elementwise.
2. For each side asked for (lower, then upper; optimised separately, each with its own
   parameters), ``iteration`` evaluations of the whole CROWN computation with parameters::

       alpha[start, node, direction]   shape (batch, spec_of_start, *node.shape)

   one tensor per *start* of a backward walk (the output with its ``C``, and every intermediate
   node that CROWN refines, whose spec is its set of unstable neurons when first met), per
   relaxation node on that walk, per direction (the walk's lower or upper bound). The
   intermediate intervals are recomputed with their own parameters at every evaluation (unless
   they were given by the user and ``fix_interm_bounds`` holds), so they are optimised jointly
   with the output bound. Each evaluation starts from the tightest intervals found so far (at
   first CROWN's) and intersects the new ones with them; the gradient passes straight through that
   intersection to the new bounds (as auto_LiRPA does with reference bounds). Intervals only
   shrink, so later walks refine a subset of the first unstable set and use the matching rows (on
   an accelerator they walk the first set itself, so as not to wait for the device to read the
   masks again: :func:`~boundprop.algorithms.crown.walk_rows`).
   Loss: ``-sum(lower)`` (or ``sum(upper)``); Adam (``lr_alpha``), ``ExponentialLR(lr_decay)``;
   after each step the parameters are projected back into their valid set
   (``AlphaSpec.project``). The last evaluation takes no step; the loop also stops when the stop
   criterion holds on every row or after ``early_stop_patience`` evaluations without improvement
   (:class:`_StopTest`). The upper side, optimised second,
   starts from the intervals the lower side found.
3. Best-so-far per element of the output bound (and the rows of any requested ``A`` that
   produced it); the intermediate intervals returned in ``state.intervals`` are the
   intersection of all intervals met (each is sound).

Walks that run on Patches (from a 2-D feature map) keep their parameters in window layout,
``(batch, spec_of_start, C, kh, kw)``: a row only reaches the neurons of ``n`` inside its window
(see :func:`~boundprop.algorithms.backward._window_relaxation`).

Cost: about ``2 * iteration`` CROWN computations per side (each evaluation plus its gradient),
and memory for the parameters: sum over starts ``s`` and relaxation nodes ``n`` before ``s`` of
``batch * unstable(s) * size(n)`` (``size(n)`` the window size ``C kh kw`` on patch-form walks),
times two directions.

Relaxation rules see parameters with a spec dimension: ``call.alpha`` has shape
``(batch, spec, *shape)`` and the interval arrives as ``(batch, 1, *shape)`` so that the rule's
elementwise formulas broadcast (see :func:`~boundprop.algorithms.backward.relaxation_of`).
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..adam import Adam
from ..domains import Interval
from ..domains.patches import Patches
from ..rules import RelaxCall, Var
from ..syncs import may_read, read_flags, stop_test_due, to_device
from .backward import AlphaLookup, backward
from .crown import KEPT_ROWS, refine_intermediate
from .ibp import ibp
from .state import PropagationState


def reduction_sum(bound: torch.Tensor) -> torch.Tensor:
    """auto_LiRPA's default ``loss_reduction_func``: sum over the spec, ``(batch, spec) -> (batch, 1)``."""
    return bound.sum(1, keepdim=True)


#: auto_LiRPA 0.7.1's ``optimize_bound_args`` keys; the ones in ``_IGNORED`` have no effect here.
DEFAULTS: dict[str, Any] = {
    "enable_alpha_crown": True, "enable_beta_crown": False, "iteration": 20, "use_shared_alpha": False,
    "optimizer": "adam", "keep_best": True, "fix_interm_bounds": True, "lr_alpha": 0.5, "lr_beta": 0.05,
    "lr_cut_beta": 5e-3, "init_alpha": True, "lr_coeffs": 0.01, "intermediate_refinement_layers": [-1],
    "loss_reduction_func": reduction_sum, "stop_criterion_func": lambda x: False, "lr_decay": 0.98,
    "early_stop_patience": 10, "start_save_best": 0.5, "use_float64_in_last_iteration": False,
    "pruning_in_iteration": False, "pruning_in_iteration_threshold": 0.2, "multi_spec_keep_func": None,
    "deterministic": False, "max_time": 1e9, "apply_output_constraints_to": [], "tighten_input_bounds": False,
    "best_of_oc_and_no_oc": False, "directly_optimize": [], "oc_lr": 0.1, "share_gammas": False,
}
_IGNORED = {"enable_beta_crown", "lr_beta", "lr_cut_beta", "init_alpha", "lr_coeffs",
            "intermediate_refinement_layers", "start_save_best", "use_float64_in_last_iteration",
            "pruning_in_iteration", "pruning_in_iteration_threshold", "multi_spec_keep_func", "deterministic",
            "apply_output_constraints_to", "tighten_input_bounds", "best_of_oc_and_no_oc",
            "directly_optimize", "oc_lr", "share_gammas"}
#: spelling used by auto_LiRPA's documentation
_ALIASES = {"fix_intermediate_layer_bounds": "fix_interm_bounds"}


def alpha_options(opts: dict) -> dict[str, Any]:
    """``opts["optimize_bound_args"]`` completed with auto_LiRPA's defaults (unknown keys warn)."""
    given = dict(opts.get("optimize_bound_args") or {})
    out = dict(DEFAULTS)
    for key, value in given.items():
        key = _ALIASES.get(key, key)
        if key not in DEFAULTS:
            warnings.warn(f"optimize_bound_args: unknown key {key!r} ignored", stacklevel=3)
        out[key] = value
    for key in ("loss_reduction_func", "stop_criterion_func"):
        if out[key] is None:  # None stands for the default (as the compat layer passes it)
            out[key] = DEFAULTS[key]
    if out["optimizer"] not in ("adam", "sgd"):
        raise ValueError(f"optimize_bound_args['optimizer']={out['optimizer']!r}: choose 'adam' or 'sgd'")
    return out


@dataclass
class _Param:
    """One parameter tensor and what projecting it needs (the last interval it was used on, and for
    window-layout parameters the windows of every row)."""

    tensor: torch.Tensor
    project: Callable  # project(alpha, l, u, call)
    call: RelaxCall
    lower: torch.Tensor
    upper: torch.Tensor
    windows: Patches | None = None

    def interval(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The interval broadcast to the parameter's layout: ``(batch, 1, *shape)`` or the windows."""
        lo, hi = self.lower.detach(), self.upper.detach()
        if self.windows is not None:
            return tuple(self.windows.gather(lo, hi))
        return lo.unsqueeze(1), hi.unsqueeze(1)


def _projector(project: Callable) -> Callable:
    """Call ``project(alpha, l, u[, call])`` whichever arity the rule's author chose."""
    try:
        n = len(inspect.signature(project).parameters)
    except (TypeError, ValueError):
        n = 4
    return project if n >= 4 else (lambda alpha, lo, hi, call: project(alpha, lo, hi))


class AlphaSet:
    """The parameters of one optimisation (one side), created lazily on first use.

    ``for_start(start, rows)`` is the ``alpha_for_start`` hook of :func:`refine_intermediate`; the
    lookup it returns creates ``alpha[start, node, direction]`` the first time a walk asks, from
    ``AlphaSpec.init`` on the node's current interval, broadcast over the start's spec.

    The spec of an intermediate start is the set of its neurons that CROWN refines (unstable
    ones), fixed when first met. Intervals only tighten from one evaluation to the next, so later
    walks refine a subset of it: the lookup then hands out the matching rows.
    """

    def __init__(self, state: PropagationState, target: str, n_out_spec: int, shared: bool = False):
        self.state = state
        self.target = target
        self.n_out_spec = n_out_spec
        self.shared = shared
        self.params: dict[tuple[str, str, str], _Param] = {}
        self._index: dict[str, torch.Tensor] = {}  # spec rows of each intermediate start (neuron ids)
        self._host_index: dict[str, torch.Tensor] = {}  # the same on the host

    def for_start(self, start: str, on_host: torch.Tensor | None = None) -> AlphaLookup | None:
        """Parameters of the walk from ``start``'s neurons ``on_host`` (:func:`unstable_rows`; None for
        the target, whose rows are the spec)."""
        rows = None
        if start != self.target and not self.shared:
            if self._host_index.setdefault(start, on_host) is on_host and start in self._index:
                return _StartLookup(self, start, None)  # the first rows again (kept: walk_rows)
            index = to_device(on_host, self.state.values[start].device)
            first = self._index.setdefault(start, index)
            if index.numel() != first.numel():
                rows = torch.searchsorted(first, index).clamp(max=first.numel() - 1)
                # a check of the rules (not of soundness: any parameter in its set is sound), so
                # not where it would wait for a device
                if may_read(index) and not bool((first[rows] == index).all()):
                    raise RuntimeError(f"alpha-CROWN: {start} has unstable neurons that were stable under looser "
                                       "bounds (an `unstable` rule that is not monotone in the interval)")
        return _StartLookup(self, start, rows)

    def spec_size(self, start: str) -> int:
        if self.shared:
            return 1
        return self.n_out_spec if start == self.target else int(self._index[start].numel())

    def _get(self, start: str, name: str, direction: str, rows: torch.Tensor | None,
             windows: Patches | None = None) -> torch.Tensor | None:
        """``alpha[start, name, direction]`` for the start's current rows: ``(batch, rows, *shape)``, or
        with ``windows`` (the walk's Patches at ``name``) in their window layout ``(batch, rows, C, kh, kw)``."""
        state = self.state
        key = (start, name, direction, windows is not None)
        param = self.params.get(key)
        node = state.graph.node(name)
        x_name = node.inputs[0]
        bounds = state.intervals[x_name]
        if param is None:
            spec = state.rules(node).alpha
            if spec is None or x_name not in state.batched:
                return None
            args, kwargs = state.resolve_for_linear(node)
            if any(isinstance(a, Var) for a in args[1:]):
                return None
            call = RelaxCall(tuple(args[1:]), kwargs, state.opts, None, direction)
            every = self._all_rows(start, windows) if windows is not None else None
            param = _Param(bounds.lower, _projector(spec.project), call, bounds.lower, bounds.upper, every)
            with torch.no_grad():
                lo, hi = param.interval()
                init = torch.as_tensor(spec.init(lo, hi, call), dtype=lo.dtype, device=lo.device)
                shape = (lo.shape[0], self.spec_size(start), *lo.shape[2:])
                param.tensor = init.expand(lo.shape).expand(shape).clone()
            param.tensor.requires_grad_(True)
            self.params[key] = param
        param.lower, param.upper = bounds.lower, bounds.upper
        return param.tensor if rows is None else param.tensor.index_select(1, rows)

    def _all_rows(self, start: str, P: Patches) -> Patches:
        """Patches with ``P``'s window geometry and one row per neuron of the start's spec (all rows)."""
        first, host = self._index[start], self._host_index[start]
        H0, W0 = self.state.values[start].shape[-2:]
        rows_h, rows_w = (first // W0) % H0, first % W0
        host_h, host_w = (host // W0) % H0, host % W0
        row_range = (int(host_h.min()), int(host_h.max()), int(host_w.min()), int(host_w.max()))
        dummy = P.data[:, :1].expand(P.data.shape[0], first.numel(), *P.data.shape[2:])
        return replace(P, data=dummy, rows_h=rows_h, rows_w=rows_w, row_range=row_range, dirty=False, unit=None)

    def tensors(self) -> list[torch.Tensor]:
        return [p.tensor for p in self.params.values()]

    @torch.no_grad()
    def project(self) -> None:
        for p in self.params.values():
            lo, hi = p.interval()
            p.tensor.copy_(p.project(p.tensor, lo, hi, p.call).expand_as(p.tensor))


class _StartLookup:
    """The :data:`AlphaLookup` of one walk start: dense parameters, and for intermediate starts on a
    2-D map (whose walks run on Patches) window-layout ones."""

    def __init__(self, owner: AlphaSet, start: str, rows: torch.Tensor | None):
        self.owner, self.start, self.rows = owner, start, rows

    def __call__(self, node: str, direction: str) -> torch.Tensor | None:
        return self.owner._get(self.start, node, direction, self.rows)

    def windows(self, node: str, direction: str, P: Patches, begin: int = 0) -> torch.Tensor | None:
        """Window-layout parameters of the rows ``begin:begin+P.spec`` of this walk (None: use dense ones)."""
        owner = self.owner
        if self.start == owner.target or owner.shared or owner.state.values[self.start].dim() != 4:
            return None
        key = (self.start, node, direction, True)
        new = key not in owner.params
        alpha = owner._get(self.start, node, direction, self.rows, P)
        if alpha is None:
            return None
        if new and alpha.device.type != "meta":  # the windows were laid out from the start's spec: check
            # once that they are this walk's (meta tensors, in dry runs, have no values to compare)
            every = owner.params[key].windows
            rows = torch.arange(every.spec, device=alpha.device) if self.rows is None else self.rows
            rows = rows[begin:begin + P.spec]
            if not (torch.equal(every.rows_h[rows], P.rows_h) and torch.equal(every.rows_w[rows], P.rows_w)):
                raise RuntimeError(f"alpha-CROWN: the rows of the walk from {self.start} do not match its spec")
        return alpha.narrow(1, begin, P.spec)


@dataclass
class _Start:
    """What each evaluation restarts from: the tightest intervals so far (at first CROWN's), the
    nodes kept fixed, and the caches that stay valid."""

    intervals: dict[str, Interval]
    fixed: set[str]
    cache: dict

    def restore(self, state: PropagationState) -> None:
        state.intervals = dict(self.intervals)
        state.refined = set(self.fixed)
        state.cache = dict(self.cache)


#: per-call caches that do not depend on intervals (kept across evaluations; any other is dropped)
_STATIC_CACHE = {"pullback", "box"}


def _detach(iv: Interval) -> Interval:
    return Interval(iv.lower.detach(), iv.upper.detach())


def _dense(coeff: Any) -> torch.Tensor | None:
    if coeff is None:
        return None
    return (coeff.to_dense() if hasattr(coeff, "to_dense") and not torch.is_tensor(coeff) else coeff).detach()


def _bias_tensor(b: Any, like: torch.Tensor) -> torch.Tensor:
    t = b.detach() if torch.is_tensor(b) else torch.as_tensor(b, dtype=like.dtype, device=like.device)
    return t.expand_as(like).clone()


def _pick_rows(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Rows ``(batch, spec)`` of ``new`` where ``mask`` holds, ``old`` elsewhere."""
    m = mask.reshape(*mask.shape, *[1] * (new.dim() - mask.dim()))
    return torch.where(m, new.detach(), old)


class _Best:
    """Best bound per element of one side, and the matching rows of the kept ``A``."""

    def __init__(self, bound: torch.Tensor, A: dict, side: int):
        self.side = side  # 0 lower, 1 upper
        self.bound = bound.detach().clone()
        self.A = {}
        for name, entry in A.items():
            coeff, bias = entry[side], entry[2 + side]
            self.A[name] = (_dense(coeff), _bias_tensor(bias, self.bound))

    def better(self, bound: torch.Tensor) -> torch.Tensor:
        return bound > self.bound if self.side == 0 else bound < self.bound

    def update(self, bound: torch.Tensor, A: dict, keep_best: bool) -> torch.Tensor:
        """Keep ``bound``'s elements that improve on the best; returns whether any did (a 0-dim bool
        tensor: the caller reads it together with its stop test, in one host read)."""
        bound = bound.detach()
        mask = self.better(bound) if keep_best else torch.ones_like(bound, dtype=torch.bool)
        improved = mask.any()
        if may_read(improved) and not bool(improved):  # on CPU: skip the updates
            return improved
        self.bound = torch.where(mask, bound, self.bound)
        for name, (coeff, bias) in self.A.items():
            entry = A[name]
            new_coeff, new_bias = _dense(entry[self.side]), _bias_tensor(entry[2 + self.side], self.bound)
            self.A[name] = (_pick_rows(mask, new_coeff, coeff) if coeff is not None else None,
                            torch.where(mask, new_bias, bias))
        return improved


def _keep_tightest(best: dict[str, Interval], intervals: dict[str, Interval]) -> None:
    with torch.no_grad():
        for name, iv in intervals.items():
            old = best.get(name)
            best[name] = _detach(iv) if old is None else old.intersect(_detach(iv))


class _StopTest:
    """When an optimisation stops: its stop criterion met on every row, or no element of the bound
    improved for more than ``patience`` evaluations.

    Where the flags may be read (CPU) they are read after every evaluation, in one host read. On an
    accelerator the count and the flags stay on the device and are read every
    :data:`~boundprop.syncs.STOP_TEST_EVERY` evaluations (:func:`~boundprop.syncs.stop_test_due`);
    a condition met in between is remembered, so the loop stops at most ``STOP_TEST_EVERY - 1``
    evaluations late. Those evaluations are sound too, and the best bound so far is what is kept,
    so a late stop only gives an equal or tighter bound.
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.stalled: Any = 0  # evaluations since the last improvement
        self.pending: Any = False  # on the device: a condition met since the last read

    def after(self, step: int, improved: torch.Tensor, met: torch.Tensor | bool) -> bool:
        """Whether to stop after evaluation ``step`` (``improved``: a 0-dim bool tensor; ``met``: whether
        every row meets the stop criterion)."""
        if may_read(improved):
            improved, met = read_flags(improved, met)
            self.stalled = 0 if improved else self.stalled + 1
            return met or self.stalled > self.patience
        self.stalled = torch.where(improved, 0, self.stalled + 1)
        self.pending = (self.stalled > self.patience) | met | self.pending
        return stop_test_due(step, improved) and read_flags(self.pending)[0]


def _optimise_side(state: PropagationState, target: str, C: torch.Tensor, side: str, start: _Start,
                   crown_bound: torch.Tensor, crown_A: dict, keep_A: set[str] | None, o: dict,
                   tightest: dict[str, Interval]) -> _Best:
    """Run the optimisation of one side; returns its best bound (and A rows)."""
    idx = 0 if side == "lower" else 1
    best = _Best(crown_bound, crown_A, idx)
    alphas = AlphaSet(state, target, C.shape[1], shared=bool(o["use_shared_alpha"]))
    iterations = int(o["iteration"])
    optimizer = None
    stop = _StopTest(int(o["early_stop_patience"]))
    began = time.perf_counter()
    for i in range(iterations):
        last = i == iterations - 1
        with torch.no_grad() if last else nullcontext():
            start.restore(state)
            refine_intermediate(state, target, alphas.for_start)
            res = backward(state, target, C, lower=idx == 0, upper=idx == 1,
                           alpha_for=alphas.for_start(target), keep_A=keep_A)
        bound = res.lower if idx == 0 else res.upper
        _keep_tightest(tightest, state.intervals)
        improved = best.update(bound, res.A, bool(o["keep_best"]))
        criterion = o["stop_criterion_func"](bound.detach() if idx == 0 else -bound.detach())
        met = criterion.all() if torch.is_tensor(criterion) else criterion
        if last or stop.after(i, improved, met) or time.perf_counter() - began > float(o["max_time"]):
            break
        loss = -o["loss_reduction_func"](bound) if idx == 0 else o["loss_reduction_func"](bound)
        if torch.is_tensor(criterion):
            loss = loss * criterion.logical_not().reshape(loss.shape[0], *[1] * (loss.dim() - 1))
        params = alphas.tensors()
        if not params or not loss.requires_grad:
            break  # nothing to optimise (e.g. no unstable neuron)
        if optimizer is None:
            optimizer = _Optimiser(str(o["optimizer"]), float(o["lr_alpha"]), float(o["lr_decay"]))
        # autograd.grad, not loss.backward(): the model's own parameters must not collect gradients
        grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
        optimizer.step(params, grads)
        alphas.project()
    return best


class _Optimiser:
    """The alphas' optimiser, stepped with explicit gradients: :class:`~boundprop.adam.Adam`
    (``"adam"``, auto_LiRPA's default) or ``torch.optim.SGD`` with momentum 0.9; the learning rate
    decays by ``decay`` after each step (auto_LiRPA's ``lr_decay``).

    Why not ``torch.optim.Adam``: the same steps, but on CPU its square root of the second moment is
    slow where that moment is exactly 0, i.e. on every neuron whose alpha never gets a gradient
    (stable neurons, whose alphas exist for the layout's sake): about 10 times an ordinary square
    root. The walks' parameters are fixed, but a parameter met late joins with fresh moments."""

    def __init__(self, kind: str, lr: float, decay: float) -> None:
        self.kind, self.lr, self.decay = kind, lr, decay
        self.adam: Adam | None = None
        self.sgd: Any = None
        self.known: set[int] = set()

    def step(self, params: list[torch.Tensor], grads) -> None:
        grads = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
        new = [p for p in params if id(p) not in self.known]
        self.known.update(id(p) for p in new)
        if self.kind == "adam":
            if self.adam is None:
                self.adam = Adam([], self.lr)
            self.adam.add(new)
            order = {id(p): g for p, g in zip(params, grads)}
            self.adam.lr = self.lr
            self.adam.step([order.get(id(p), torch.zeros_like(p)) for p in self.adam.params])
        else:
            if self.sgd is None:
                self.sgd = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
            elif new:
                self.sgd.add_param_group({"params": new, "lr": self.lr})
            for group in self.sgd.param_groups:
                group["lr"] = self.lr
            for p, g in zip(params, grads):
                p.grad = g
            self.sgd.step()
            self.sgd.zero_grad(set_to_none=True)
        self.lr *= self.decay


def _affine_only(state: PropagationState, name: str) -> bool:
    graph = state.graph
    return all(state.is_affine_here(graph.node(a)) for a in graph.ancestors(name)
               if a in state.perturbed and graph.has_node(a))


def alpha_crown(state: PropagationState, target: str, C: torch.Tensor, lower: bool, upper: bool,
                keep_A: set[str] | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """alpha-CROWN bounds of ``C y`` (``y`` = ``target``); see the module docstring.

    Arguments:
        state: a fresh state (user-given intermediate intervals already in ``state.refined``).
        C: ``(batch or 1, spec, *y.shape[1:])``.
        lower, upper: sides to compute (each optimised on its own).
        keep_A: names whose linear coefficients to return (the rows that gave the best bounds).

    Returns ``(lower, upper, A)``: detached ``(batch, spec)`` bounds (None for a side not asked
    for) and ``A[name] = (lA, uA, lbias, ubias)``. Afterwards ``state.intervals`` holds the
    tightest intermediate intervals found.
    """
    o = alpha_options(state.opts)
    user_fixed = set(state.refined)
    with torch.no_grad():
        ibp(state, until=target)
        fixed = set(state.perturbations) | (user_fixed if o["fix_interm_bounds"] else set())
        refine_intermediate(state, target)
        crown = backward(state, target, C, lower, upper, keep_A=keep_A)
        refined = set(state.refined)
        # intervals no parameter can change (only affine ops behind them) stay as CROWN found them
        fixed |= {n for n in refined if _affine_only(state, n)}
    start = _Start({n: _detach(iv) for n, iv in state.intervals.items()}, fixed,
                   {k: v for k, v in state.cache.items() if isinstance(k, tuple) and k and k[0] in _STATIC_CACHE})
    if not may_read(C):  # on an accelerator each start's rows are read once, not once per evaluation
        start.cache[KEPT_ROWS] = {}  # shared by the evaluations (restore copies the cache shallowly)
    low = crown.lower.detach() if lower else None
    up = crown.upper.detach() if upper else None
    A = {name: (_dense(entry[0]), _dense(entry[1]), *(t.detach() if torch.is_tensor(t) else t for t in entry[2:]))
         for name, entry in crown.A.items()}
    if not o["enable_alpha_crown"] or int(o["iteration"]) <= 0:
        return low, up, A
    tightest = start.intervals  # later evaluations restart from the tightest intervals so far
    bests = {}
    with torch.enable_grad():  # the optimisation needs gradients even when the caller is under no_grad
        for side, wanted, bound in (("lower", lower, low), ("upper", upper, up)):
            if wanted:
                bests[side] = _optimise_side(state, target, C, side, start, bound, A, keep_A, o, tightest)
    state.intervals = tightest
    state.refined = refined | fixed
    state.cache = {}
    with torch.no_grad():
        ibp(state, until=target)  # carry the tightened intervals on to the nodes after them
    if "lower" in bests:
        low = bests["lower"].bound
    if "upper" in bests:
        up = bests["upper"].bound
    for name in A:
        lA, lbias = bests["lower"].A[name] if "lower" in bests else (None, 0.0)
        uA, ubias = bests["upper"].A[name] if "upper" in bests else (None, 0.0)
        A[name] = (lA, uA, lbias, ubias)
    return low, up, A
