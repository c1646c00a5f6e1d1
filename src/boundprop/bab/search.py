"""Input-splitting branch and bound over one input region of a property.

A region is a box ``[lower, upper]`` of inputs with output disjuncts ``A_d y <= b_d``; the rows of
all disjuncts are stacked into ``A, b`` and ``groups`` names each row's disjunct. A box is
*refuted* when every disjunct has a row whose lower bound is above the margin (then no input in
the box satisfies any disjunct). Open boxes are halved along one input dimension, and the halves
go back on a stack (depth first, ``batch_size`` boxes bounded per step).

Two bounding back ends:

* :class:`ChainSearch` for ReLU chains (:mod:`boundprop.bab.chain`): CROWN with per-box reuse of
  the parent's intermediate intervals, then, for boxes still open, an optimised bound per
  disjunct (convex combination of its rows and lower ReLU slopes, gradient ascent);
* :class:`GraphSearch` for any graph: :func:`boundprop.compute_bounds` (``method``), batched.

Branching: the dimension maximising ``width_j * sum_rows |lA_rj|`` over the rows of the
disjuncts not yet refuted (the drop of the linear lower bounds' minimum when ``x_j`` is pinned).

Candidate counterexamples met on the way (box centres, and the corners minimising each row's
linear lower bound) are returned when their violation ``min_d max_i (A_d y - b_d)_i`` is <= 0 in
float64; the caller confirms them on the original model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .attack import pgd_attack, violation
from .chain import ChainBounder, ReluChain

#: memory for the per-box data of one batch of the ReLU-chain search
BATCH_BYTES = 256 * 2**20


@dataclass
class SearchLimits:
    deadline: float
    batch_size: int = 512
    margin_abs: float = 1e-6
    margin_rel: float = 1e-6
    optimise_iterations: int = 20
    split: bool = True
    optimise_ratio: float = 0.35
    clip: bool = True
    attack_boxes: int = 32  # PGD inside this many of the most promising open boxes per step
    attack_steps: int = 10
    deep_attack_after: float = 2.0  # seconds of search before wide attacks on the whole region (at 2, 6, 14... s)
    deep_attack_restarts: int = 0


class Confirmer:
    """Candidate counterexamples of a search, checked on the original model: ``confirm(points)`` (rows
    of the search's inputs, the ``free`` ones when the region pins the others to ``fixed``) is True
    as soon as one point passes ``check(x_full) -> (x, y) | None``; the confirmed pairs gather in
    ``found``."""

    def __init__(self, check: Callable, free: torch.Tensor | None = None, fixed: torch.Tensor | None = None) -> None:
        self.check, self.free, self.fixed = check, free, fixed
        self.found: list = []

    def full(self, p: torch.Tensor) -> torch.Tensor:
        """The whole input for the search's point ``p``."""
        if self.free is None:
            return p
        x = self.fixed.clone()
        x[self.free] = p
        return x

    def __call__(self, points: torch.Tensor) -> bool:
        for p in points:
            cex = self.check(self.full(p))
            if cex is not None:
                self.found.append(cex)
                return True
        return False


@dataclass
class SearchOutcome:
    """``unsat`` (every box refuted), ``sat`` (``candidates`` hold points with violation <= 0),
    ``timeout``, or ``unknown`` (open boxes but splitting not allowed)."""

    status: str
    candidates: torch.Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class _Stack:
    """Boxes waiting to be bounded, in chunks; each chunk carries its parents' intervals (or None)."""

    def __init__(self) -> None:
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, Any]] = []
        self.size = 0

    def push(self, lo: torch.Tensor, hi: torch.Tensor, extra: Any = None) -> None:
        if lo.shape[0]:
            self.chunks.append((lo, hi, extra))
            self.size += lo.shape[0]

    def pop(self, limit: int) -> list[tuple[torch.Tensor, torch.Tensor, Any]]:
        out, count = [], 0
        while self.chunks and count < limit:
            lo, hi, extra = self.chunks.pop()
            take = min(lo.shape[0], limit - count)
            if take < lo.shape[0]:  # keep the rest (the first rows) on the stack
                rest = lo.shape[0] - take
                self.chunks.append((lo[:rest], hi[:rest], _rows(extra, slice(0, rest))))
                lo, hi, extra = lo[rest:], hi[rest:], _rows(extra, slice(rest, None))
            out.append((lo, hi, extra))
            count += take
        self.size -= count
        return out


def _rows(extra: Any, index) -> Any:
    if extra is None:
        return None
    return [(lo[index], hi[index]) for lo, hi in extra]


def refuted_groups(lower: torch.Tensor, margin: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``(boxes, n_groups)``: disjuncts with some row provably above its margin."""
    proved = lower > margin
    out = torch.zeros(lower.shape[0], n_groups, dtype=torch.bool, device=lower.device)
    return out.scatter_reduce(1, groups.expand(lower.shape[0], -1), proved, reduce="amax")


def split_boxes(lo: torch.Tensor, hi: torch.Tensor, gain: torch.Tensor, row_open: torch.Tensor):
    """Halve every box (``(boxes, n)``) along ``argmax_j sum_open_rows gain_rj``.

    ``gain[box, r, j]`` estimates how much row ``r``'s lower bound rises when the box is halved
    along dimension ``j``; summing over the open rows was better on ACAS Xu than aiming at the row
    or disjunct closest to refutation. Dimensions of zero width are never chosen.
    Returns ``(lo, hi)`` of the ``2 * boxes`` halves: all left halves, then all right halves.
    """
    width = hi - lo
    weight = (gain * row_open.unsqueeze(-1)).sum(1)
    score = weight + 1e-9 * width * weight.amax(1, keepdim=True).clamp_min(1e-30)
    score = torch.where(width > 0, score, torch.full_like(score, -1.0))
    dim = score.argmax(1)
    rows = torch.arange(lo.shape[0], device=lo.device)
    mid = (lo[rows, dim] + hi[rows, dim]) / 2
    left_hi, right_lo = hi.clone(), lo.clone()
    left_hi[rows, dim] = mid
    right_lo[rows, dim] = mid
    return torch.cat([lo, right_lo]), torch.cat([left_hi, hi])


def clip_boxes(lo: torch.Tensor, hi: torch.Tensor, lA: torch.Tensor, lower: torch.Tensor, margin: torch.Tensor,
               groups: torch.Tensor, n_groups: int, refuted: torch.Tensor):
    """Shrink every box to the part where a violation can lie; ``(lo, hi, empty)``.

    Row ``r``'s linear lower bound ``a . x + c`` holds on the box and its minimum there is
    ``lower_r``. A violation of disjunct ``g`` has every row of ``g`` at most 0, hence
    ``a . x + c <= margin_r`` (the refutation margin, which also absorbs rounding): along each
    dimension ``j`` with ``a_j > 0`` that gives ``x_j <= lo_j + (margin_r - lower_r) / a_j`` (and the
    mirror bound for ``a_j < 0``). The box of disjunct ``g`` is the intersection over its rows; the
    new box is the hull of the boxes of the disjuncts not refuted; ``empty`` marks boxes where every
    disjunct's box is empty (no violation at all). The bounds are widened by ``1e-9`` of the width.
    """
    boxes, n = lo.shape
    slack = (margin - lower).clamp_min(0).unsqueeze(-1)  # (boxes, rows, 1)
    width = (hi - lo).unsqueeze(1)
    safe = lA.abs().clamp_min(1e-300)
    reach = torch.where(lA != 0, slack / safe, torch.full_like(lA, torch.inf))
    reach = reach * (1 + 1e-9) + 1e-9 * width
    row_hi = torch.where(lA > 0, lo.unsqueeze(1) + reach, hi.unsqueeze(1))  # (boxes, rows, n)
    row_lo = torch.where(lA < 0, hi.unsqueeze(1) - reach, lo.unsqueeze(1))
    index = groups.view(1, -1, 1).expand(boxes, -1, n)
    g_hi = hi.unsqueeze(1).expand(boxes, n_groups, n).scatter_reduce(1, index, row_hi, reduce="amin")
    g_lo = lo.unsqueeze(1).expand(boxes, n_groups, n).scatter_reduce(1, index, row_lo, reduce="amax")
    alive = (g_lo <= g_hi).all(-1) & ~refuted  # (boxes, n_groups)
    new_lo = torch.where(alive.unsqueeze(-1), g_lo, torch.full_like(g_lo, torch.inf)).amin(1)
    new_hi = torch.where(alive.unsqueeze(-1), g_hi, torch.full_like(g_hi, -torch.inf)).amax(1)
    empty = ~alive.any(1)
    new_lo = torch.where(empty.unsqueeze(-1), lo, torch.maximum(new_lo, lo))
    new_hi = torch.where(empty.unsqueeze(-1), hi, torch.minimum(new_hi, hi))
    return new_lo, new_hi, empty


def candidate_points(lo: torch.Tensor, hi: torch.Tensor, lA: torch.Tensor) -> torch.Tensor:
    """Box centres and, per row, the corner minimising the row's linear lower bound."""
    corners = torch.where(lA > 0, lo.unsqueeze(1), hi.unsqueeze(1)).reshape(-1, lo.shape[1])
    return torch.cat([(lo + hi) / 2, corners])


class _Search:
    """The shared loop; subclasses bound a batch of boxes."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], A: torch.Tensor, b: torch.Tensor,
                 groups: torch.Tensor, limits: SearchLimits,
                 log: Callable[[str], None] | None = None) -> None:
        self.forward = forward  # flattened inputs (n, n_in) float64 -> outputs (n, n_out)
        self.A, self.b, self.groups = A, b, groups
        self.n_groups = int(groups.max()) + 1
        self.limits = limits
        self.margin = limits.margin_abs + limits.margin_rel * b.abs()
        self.log = log
        self.stats: dict[str, Any] = {"boxes": 0, "bound_calls": 0, "bound_s": 0.0, "optimised": 0,
                                      "refuted_by_optimisation": 0, "clipped_away": 0,
                                      "max_stack": 0}

    def bound(self, lo: torch.Tensor, hi: torch.Tensor, parents: list):
        """``(lower (boxes, rows), lA (boxes, rows, n_in), intervals to hand to children or None,
        gain (boxes, rows, n_in): estimated rise of each bound when the box is halved along each
        dimension)``."""
        raise NotImplementedError

    def refine(self, lo, hi, lower, intervals, still_open) -> torch.Tensor:
        """Refute more of the open boxes (``still_open``: boolean mask); returns the new mask."""
        return still_open

    def attack(self, lo: torch.Tensor, hi: torch.Tensor, promise: torch.Tensor, restarts: int = 2,
               steps: int | None = None) -> torch.Tensor | None:
        """PGD inside the ``attack_boxes`` most promising boxes; points with violation <= 0 or None."""
        t = time.perf_counter()
        take = torch.argsort(promise)[:self.limits.attack_boxes]
        objective = lambda y: violation(y, self.A, self.b, self.groups, self.n_groups)  # noqa: E731
        x, v = pgd_attack(self.forward, lo[take], hi[take], objective, steps or self.limits.attack_steps, restarts,
                          deadline=self.limits.deadline)
        self.stats["attack_s"] = self.stats.get("attack_s", 0.0) + time.perf_counter() - t
        hits = torch.argsort(v)
        hits = hits[v[hits] <= 0]
        return x[hits[:8]] if hits.numel() else None

    def candidates(self, lo: torch.Tensor, hi: torch.Tensor, lA: torch.Tensor):
        """``(points with violation <= 0 (at most 8, best first) or None, promise (boxes,))``: the
        candidates of :func:`candidate_points` and, per box, the least violation among its own."""
        boxes = lo.shape[0]
        points = candidate_points(lo, hi, lA)
        with torch.no_grad():
            v = violation(self.forward(points), self.A, self.b, self.groups, self.n_groups)
        promise = torch.minimum(v[:boxes], v[boxes:].reshape(boxes, -1).amin(1))
        order = torch.argsort(v)
        hits = order[v[order] <= 0]
        return (points[hits[:8]] if hits.numel() else None), promise

    def run(self, lower: torch.Tensor, upper: torch.Tensor, confirm: Callable[[torch.Tensor], bool]) -> SearchOutcome:
        """Search the box ``[lower, upper]`` (flattened, ``(1, n_in)``); ``confirm(points)`` says
        whether some candidate is a real counterexample (then the search stops with ``sat``)."""
        stack = _Stack()
        stack.push(lower, upper, None)
        limits = self.limits
        iteration = 0
        began = time.perf_counter()
        undecided = False
        next_deep = limits.deep_attack_after if limits.deep_attack_restarts > 0 else float("inf")
        while stack.size:
            if time.perf_counter() > limits.deadline:
                return SearchOutcome("timeout", stats=self.stats)
            if time.perf_counter() - began > next_deep:
                # the search is not quick: a wide attack on the whole region, again after 2x, 4x... the time
                next_deep = 2 * next_deep + limits.deep_attack_after
                points = self.attack(lower, upper, lower.new_zeros(1), limits.deep_attack_restarts, 30)
                self.stats["deep_attacks"] = self.stats.get("deep_attacks", 0) + 1
                if points is not None and confirm(points):
                    return SearchOutcome("sat", points, self.stats)
            iteration += 1
            parts = stack.pop(limits.batch_size)
            lo = torch.cat([p[0] for p in parts])
            hi = torch.cat([p[1] for p in parts])
            parents = [p[2] for p in parts]
            t = time.perf_counter()
            low, lA, intervals, gain = self.bound(lo, hi, parents)
            self.stats["bound_s"] += time.perf_counter() - t
            self.stats["bound_calls"] += 1
            self.stats["boxes"] += lo.shape[0]
            refuted = refuted_groups(low, self.margin, self.groups, self.n_groups)
            still_open = ~refuted.all(1)
            if bool(still_open.any()):
                still_open = self.refine(lo, hi, low, intervals, still_open)
            if not bool(still_open.any()):
                continue
            keep = still_open.nonzero().flatten()
            lo, hi, lA, low, refuted = lo[keep], hi[keep], lA[keep], low[keep], refuted[keep]
            if limits.clip:
                lo, hi, empty = clip_boxes(lo, hi, lA, low, self.margin, self.groups, self.n_groups, refuted)
                self.stats["clipped_away"] += int(empty.sum())
                if bool(empty.any()):
                    alive = (~empty).nonzero().flatten()
                    keep, lo, hi, lA = keep[alive], lo[alive], hi[alive], lA[alive]
                    low, refuted = low[alive], refuted[alive]
                    if keep.numel() == 0:
                        continue
            points, promise = self.candidates(lo, hi, lA)
            if points is None and limits.attack_boxes:
                points = self.attack(lo, hi, promise)
            if points is not None and confirm(points):
                return SearchOutcome("sat", points, self.stats)
            if not limits.split:
                return SearchOutcome("unknown", stats=self.stats)
            # (nearly) a single input, not refuted: halving cannot decide it (midpoints stop moving)
            point = (hi - lo <= 1e-12 * (1 + lo.abs())).all(1)
            if bool(point.any()):
                undecided = True
                rest = (~point).nonzero().flatten()
                if rest.numel() == 0:
                    continue
                keep, lo, hi, low, refuted = keep[rest], lo[rest], hi[rest], low[rest], refuted[rest]
            row_open = ~(low > self.margin) & ~refuted[:, self.groups]
            new_lo, new_hi = split_boxes(lo, hi, gain[keep], row_open)
            child = None
            if intervals is not None:
                child = [(torch.cat([l[keep], l[keep]]), torch.cat([u[keep], u[keep]])) for l, u in intervals]
            stack.push(new_lo, new_hi, child)
            self.stats["max_stack"] = max(self.stats["max_stack"], stack.size)
            if self.log is not None and iteration % 50 == 0:
                self.log(f"step {iteration}: {stack.size} open boxes, {self.stats['boxes']} bounded")
        return SearchOutcome("unknown" if undecided else "unsat", stats=self.stats)


class ChainSearch(_Search):
    """Branch and bound with :class:`~boundprop.bab.chain.ChainBounder`."""

    def __init__(self, chain: ReluChain, A, b, groups, limits: SearchLimits, log=None) -> None:
        super().__init__(chain.forward, A, b, groups, limits, log)
        self.bounder = ChainBounder(chain, A, b)
        # boxes per step: the intervals and spreads of a box take sum(widths) * (2 + n_in) floats
        per_box = sum(w.shape[0] for w in chain.weights[:-1]) * (2 + chain.n_inputs) * 8
        self.limits.batch_size = max(1, min(limits.batch_size, BATCH_BYTES // max(1, per_box)))

    def bound(self, lo, hi, parents):
        parent = None
        if all(p is not None for p in parents):
            parent = [(torch.cat([p[k][0] for p in parents]), torch.cat([p[k][1] for p in parents]))
                      for k in range(len(parents[0]))]
        res = self.bounder.bound(lo, hi, parent)
        return res.lower, res.lA, res.pre, res.gain

    def refine(self, lo, hi, lower, intervals, still_open):
        iterations = self.limits.optimise_iterations
        if iterations <= 0:
            return still_open
        idx = self._worth_optimising(lo, hi, lower, still_open)
        if idx.numel() == 0:
            return still_open
        t = time.perf_counter()
        best = self.bounder.optimise(lo[idx], hi[idx], [(l[idx], u[idx]) for l, u in intervals], self.groups,
                                     self.n_groups, iterations, row_lower=lower[idx])
        self.stats["bound_s"] += time.perf_counter() - t
        # per disjunct: the optimised bound of a combination of its rows must clear the largest margin
        group_margin = self.margin.new_zeros(self.n_groups).scatter_reduce(
            0, self.groups, self.margin, reduce="amax")
        done = (best > group_margin).all(1)
        self.stats["optimised"] += idx.numel()
        self.stats["refuted_by_optimisation"] += int(done.sum())
        out = still_open.clone()
        out[idx[done]] = False
        return out


    def _worth_optimising(self, lo, hi, lower, still_open) -> torch.Tensor:
        """Open boxes where optimisation has a chance: every open disjunct has several rows (a
        combination of rows can be positive where no single row is), or its best row's lower bound
        is below zero by at most ``optimise_ratio`` of the distance to its value at the centre."""
        idx = still_open.nonzero().flatten()
        low = lower[idx]
        rows = self.groups.expand(idx.numel(), -1)
        centre = self.forward((lo[idx] + hi[idx]) / 2) @ self.A.T - self.b
        best = low.new_full((idx.numel(), self.n_groups), -torch.inf).scatter_reduce(
            1, rows, low, reduce="amax")
        at_centre = torch.full_like(best, -torch.inf).scatter_reduce(1, rows, centre, reduce="amax")
        ratio = -best / (at_centre - best).clamp_min(1e-30)
        multi = torch.bincount(self.groups, minlength=self.n_groups) > 1
        fine = multi | (ratio <= self.limits.optimise_ratio) | (best > 0)
        return idx[fine.all(1)]


class GraphSearch(_Search):
    """Branch and bound with :func:`boundprop.compute_bounds` on any graph (no interval reuse).

    ``params``: values for the graph's parameter leaves (e.g. float64 copies of a module's)."""

    def __init__(self, graph, shape: tuple[int, ...], A, b, groups, limits: SearchLimits, method: str = "CROWN",
                 log=None, params: dict | None = None) -> None:
        from ..graph.ir import evaluate

        self.graph, self.shape, self.method, self.params = graph, shape, method, params
        dtype = A.dtype

        def forward(x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(-1, *shape[1:]).to(dtype)
            return evaluate(graph, (x,), params)[graph.output].reshape(x.shape[0], -1)

        super().__init__(forward, A, b, groups, limits, log)

    def bound(self, lo, hi, parents):
        from .. import PerturbationLpNorm, compute_bounds

        graph, shape = self.graph, self.shape
        lo_s, hi_s = lo.reshape(-1, *shape[1:]), hi.reshape(-1, *shape[1:])
        C = self.A.unsqueeze(0).expand(lo.shape[0], -1, -1)
        res = compute_bounds(graph, ((lo_s + hi_s) / 2,), {graph.inputs[0]: PerturbationLpNorm(x_L=lo_s, x_U=hi_s)},
                             method=self.method, C=C, upper=False, need_A=[graph.inputs[0]], params=self.params)
        lA = res.A[graph.inputs[0]]["lA"].reshape(lo.shape[0], C.shape[1], -1)
        radius = (hi - lo).unsqueeze(1) / 2
        return res.lower - self.b, lA, None, lA.abs() * radius / 2
