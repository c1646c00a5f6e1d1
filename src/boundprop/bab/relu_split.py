"""Branch and bound on ReLU splits with beta-CROWN, for ReLU chains with many free inputs.

Input splitting (:mod:`boundprop.bab.search`) is hopeless when hundreds of inputs are free
(MNIST, CIFAR); there the verifier splits unstable ReLUs instead. The network is a
:class:`~boundprop.bab.chain.ReluChain`

    z_{k+1} = W_k h_k + c_k,   h_0 = x in the box [lo, hi],   h_{k+1} = relu(z_{k+1}),

and a *domain* is an assignment ``sigma_j in {-1, 0, +1}`` of the unstable neurons (``+1``: only
inputs with ``z_j >= 0``; ``-1``: ``z_j <= 0``; ``0``: not split) with, per pre-activation,
an interval ``[l_j, u_j]`` valid on the domain (the root intervals, with ``l_j := max(l_j, 0)``
where ``sigma_j = +1`` and ``u_j := min(u_j, 0)`` where ``sigma_j = -1``).

Bound of a domain (beta-CROWN). For every input of the domain, ``sigma_j z_j >= 0``, so for any
``beta >= 0`` the objective ``f = a . y - b`` satisfies ``f >= f - sum_j beta_j sigma_j z_j``.
The right-hand side is bounded below by a CROWN walk from the output to the input: at each ReLU
layer, with ``mu`` the coefficients on ``h``,

    mu . h >= lam . z + sum_j min(mu_j, 0) t_j,    lam = max(mu, 0) * a + min(mu, 0) * s,

(lower relaxation ``h >= a z``, ``a = alpha in [0, 1]`` on unstable neurons, 1 on active, 0 on
inactive ones; upper relaxation ``h <= s z + t``, the chord), then the split terms are added,
``lam := lam - beta * sigma``, and ``z = W h + c`` gives the next ``mu = lam W`` and bias
``lam . c``. At the input, ``mu . x`` is minimised over the box. Every step is valid for every
input of the domain whatever ``alpha in [0, 1]`` and ``beta >= 0``, so the result is a valid lower
bound of ``f`` on the domain for ANY such parameters; ``alpha`` (one per domain, row and neuron)
and ``beta`` (one per domain, row and split neuron) are optimised jointly by Adam on the bound
(float32), then the bound is evaluated once more in float64 with the optimised parameters (clamped
into their ranges) and only that float64 value decides refutation (``> margin_abs + margin_rel
|b|``, as in :mod:`boundprop.bab.verifier`). An infeasible assignment only makes bounds larger,
correctly: no input lives there.

Search: the root intervals are the chain CROWN's, intersected with the graph's alpha-CROWN
intervals when those are available (:func:`relu_split_region`); every disjunct the root bounds
leave open becomes a root domain (its rows; the last repeated to pad, which changes nothing), with
alphas optimised. Open domains of all disjuncts wait on one stack (depth first); each step pops
``batch_size`` of them, picks one unstable unsplit neuron per domain, makes both children (which
inherit the parent's alphas and betas, the new beta starting at 0), tightens the children's
intervals of the layers after the split by CROWN walks through their (split-fixed) intervals
(:func:`refine_intervals`, float64, intersected with the old ones), bounds all children at once
and keeps those not refuted (a domain is refuted when one of its rows is). A domain whose neurons
are all fixed is decided by linear programming (:func:`finish_with_lp`: the LP's dual
multipliers become betas, so the decision still rests on the float64 beta-CROWN bound).
Branching:

* ``babsr``: the neuron maximising ``sum_rows |mu_rj| * (-l_j u_j / (u_j - l_j))`` (the
  coefficient of the row's bound on ``h_j`` times the height of the triangle relaxation: an
  estimate, in the spirit of BaBSR, of what fixing the neuron gains);
* ``fsb`` (filtered smart branching): the ``fsb_candidates`` best neurons by that score are each
  tried on both children with the parent's parameters (one cheap walk), and the neuron whose
  worse child has the best bound is chosen.

The input minimising each open domain's linear bound is a candidate counterexample (checked on
the chain in float64, then confirmed by the caller on the original model). A domain that the LP
cannot close makes the answer ``unknown``, never ``unsat``; past the deadline (checked between
Adam steps and batches) the answer is ``timeout``.

Networks: any :class:`~boundprop.bab.chain.ReluChain` with dense segments up to
:data:`MAX_ENTRIES` entries (MNIST fully connected nets; the oval21 CIFAR conv nets, whose first
layer densifies to 2048 x 3072 or 4096 x 3072); other graphs keep the verifier's single root bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..adam import Adam
from ..syncs import stop_test_due
from .attack import violation
from .chain import ChainBounder, ReluChain, box_minimum, relu_layer_step, restrict_chain
from .search import Confirmer, refuted_groups

#: dense segments up to this many entries are extracted for ReLU splitting (CIFAR conv nets: ~13M)
MAX_ENTRIES = 40_000_000
#: bytes of the float32 coefficient matrices of one walk (rows x widest layer), to size the batches
WALK_BYTES = 64 * 2**20


@dataclass
class SplitOptions:
    """Knobs of the ReLU-split search."""

    batch_size: int = 128  # parent domains split per step (children: twice as many)
    iterations: int = 20  # Adam steps on (alpha, beta) per batch of children
    root_iterations: int = 50
    lr_alpha: float = 0.1
    lr_beta: float = 0.05
    branching: str = "babsr"  # or "fsb"
    fsb_candidates: int = 4
    margin_abs: float = 1e-6
    margin_rel: float = 1e-6
    max_domains: int = 100_000  # open domains kept at most (then the answer is unknown)
    refine_rows: int = 16_384  # CROWN walks per step refining the intervals after the splits (0: none)


@dataclass
class Domains:
    """A batch of domains. ``N``: all ReLU neurons of the chain, layers concatenated; ``R``: rows.

    Attributes:
        l, u: ``(D, N)`` float64 pre-activation intervals, valid on each domain.
        split: ``(D, N)`` int8, ``sigma`` (0: not split).
        alpha, beta: ``(D, R, N)`` float32 parameters.
        done: ``(D, R)`` rows already refuted (by an ancestor or the domain's own bound).
        score: ``(D, N)`` float32 branching scores (set when bounded).
        lower: ``(D, R)`` float64 bounds of the rows (set when bounded).
        rows: ``(D, R)`` long, the rows of ``A`` each domain bounds (one disjunct's rows, the last
            repeated to pad: a repeated row changes nothing); None: all rows of ``A``.
    """

    l: torch.Tensor
    u: torch.Tensor
    split: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    done: torch.Tensor
    score: torch.Tensor | None = None
    lower: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.l.shape[0]

    def take(self, idx: torch.Tensor) -> Domains:
        opt = lambda t: None if t is None else t[idx]  # noqa: E731
        return Domains(self.l[idx], self.u[idx], self.split[idx], self.alpha[idx], self.beta[idx], self.done[idx],
                       opt(self.score), opt(self.lower), opt(self.rows))

    @staticmethod
    def cat(parts: list[Domains]) -> Domains:
        def c(name):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)
        return Domains(*(c(n) for n in ("l", "u", "split", "alpha", "beta", "done", "score", "lower", "rows")))


class BetaCrown:
    """beta-CROWN bounds of rows ``A y - b`` of a :class:`ReluChain` over many domains of one box."""

    def __init__(self, chain: ReluChain, A: torch.Tensor, b: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 margin: torch.Tensor | None = None, groups: torch.Tensor | None = None) -> None:
        self.chain = chain
        self.A, self.b = A.double(), b.double()
        self.margin = A.new_zeros(A.shape[0], dtype=torch.float64) if margin is None else margin.double()
        self.groups = torch.arange(A.shape[0], device=A.device) if groups is None else groups
        W, c = chain.weights[-1], chain.biases[-1]
        spec_W, spec_c = A.double() @ W, A.double() @ c - b.double()
        self.rows = A.shape[0]
        self.sizes = [w.shape[0] for w in chain.weights[:-1]]
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        lo, hi = lo.reshape(-1).double(), hi.reshape(-1).double()
        self.crown = ChainBounder(chain, A, b)  # its walks refine intermediate intervals
        self.data = {}
        for dtype in (torch.float64, torch.float32):
            self.data[dtype] = ([w.to(dtype) for w in chain.weights[:-1]], [c_.to(dtype) for c_ in chain.biases[:-1]],
                                spec_W.to(dtype), spec_c.to(dtype), lo.to(dtype), hi.to(dtype), (hi - lo).to(dtype))

    @property
    def n_neurons(self) -> int:
        return self.offsets[-1]

    def layer(self, t: torch.Tensor, k: int) -> torch.Tensor:
        return t[..., self.offsets[k]:self.offsets[k + 1]]

    def margin_of(self, dom: Domains) -> torch.Tensor:
        """``(D, R)`` the margins of the domains' rows."""
        return self.margin.expand(len(dom), -1) if dom.rows is None else self.margin[dom.rows]

    def relaxation(self, l: torch.Tensor, u: torch.Tensor, split: torch.Tensor, dtype: torch.dtype) -> list:
        """Per ReLU layer, the parts of the walk that depend on the domains only, ``(D, 1, n_k)`` each:
        ``(s, t, unstable, active, sigma)`` (chord slope and intercept, the two masks as 0/1 numbers,
        the split signs), in ``dtype``.

        Computed once per batch of domains, not once per Adam step: on CPU a comparison or a
        ``where`` costs 5-10 times an arithmetic pass over the same tensor (a ``where`` on 512k
        entries: 2.7 ms, a product: 0.3 ms)."""
        parts = []
        for k in range(len(self.sizes)):
            lk, uk = self.layer(l, k).to(dtype).unsqueeze(1), self.layer(u, k).to(dtype).unsqueeze(1)
            active, unstable = lk >= 0, (lk < 0) & (uk > 0)
            s = torch.where(unstable, uk / (uk - lk).clamp_min(1e-30), active.to(dtype))
            t = torch.where(unstable, -s * lk, torch.zeros_like(lk))
            sigma = self.layer(split, k).to(dtype).unsqueeze(1)
            parts.append((s, t, unstable.to(dtype), active.to(dtype), sigma))
        return parts

    def per_layer(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``(..., N)`` ``t`` on each ReLU layer's neurons."""
        return [self.layer(t, k) for k in range(len(self.sizes))]

    def walk(self, relax: list, alphas: list, betas: list, dtype: torch.dtype, record: bool = False,
             rows: torch.Tensor | None = None, clamp: bool = True, inputs: bool = False):
        """Bounds ``(D, R)`` of the rows on each domain (see the module docstring), (``inputs``) the
        minimising inputs ``(D, R, n_in)``, and (``record``) the coefficients ``mu`` on each ReLU
        output, ``(D, R, N)``; None where not asked for.

        ``relax``: :meth:`relaxation` of the domains in ``dtype``; ``alphas``, ``betas``: per layer,
        ``(D, R, n_k)`` (:meth:`per_layer`). With ``clamp``, ``alpha`` is clamped into ``[0, 1]`` and
        ``beta`` to ``>= 0`` here; without, the caller keeps them in range (the bound is valid only
        for parameters in range). The lower slope is ``alpha`` on unstable neurons and ``1``/``0``
        on active/inactive ones, written ``active + unstable * alpha`` (the masks are disjoint: no
        ``where``, see :func:`relu_layer_step`)."""
        Ws, cs, spec_W, spec_c, lo, hi, width = self.data[dtype]
        D = alphas[0].shape[0]
        mu = spec_W.expand(D, -1, -1) if rows is None else spec_W[rows]
        bias = spec_c.expand(D, -1) if rows is None else spec_c[rows]
        mus = []
        for k in range(len(Ws) - 1, -1, -1):
            if record:
                mus.append(mu)
            s, t, unstable, active, sigma = relax[k]
            alpha, beta = alphas[k].to(dtype), betas[k].to(dtype)
            if clamp:
                alpha, beta = alpha.clamp(0, 1), beta.clamp_min(0)
            mu, bias = relu_layer_step(mu, bias, active + unstable * alpha, s, t, Ws[k], cs[k], beta * sigma)
        value = box_minimum(mu, hi, width) + bias
        x = torch.where(mu > 0, lo, hi) if inputs else None
        coeffs = torch.cat(mus[::-1], -1) if record else None
        return value, x, coeffs

    def optimise(self, dom: Domains, iterations: int, lr_alpha: float, lr_beta: float,
                 target: torch.Tensor | None = None, deadline: float | None = None) -> None:
        """Adam on ``(alpha, beta)`` of every domain (float32), keeping each domain's best parameters;
        stops early once every domain has a row above ``target`` (default: the rows' margins), or at
        ``deadline`` (any parameters give valid bounds). The parameters are one leaf per layer (a
        slice of one leaf would make every gradient a zero-filled tensor of all the neurons)."""
        if iterations <= 0:
            return
        alphas = [t.clone().clamp_(0, 1).requires_grad_(True) for t in self.per_layer(dom.alpha)]
        betas = [t.clone().clamp_min_(0).requires_grad_(True) for t in self.per_layer(dom.beta)]
        best_a, best_b = dom.alpha.clone(), dom.beta.clone()
        best = dom.alpha.new_full((len(dom),), -torch.inf)
        adam_a, adam_b = Adam(alphas, lr_alpha), Adam(betas, lr_beta)
        goal = (self.margin_of(dom) if target is None else target).float() + 1e-4
        goal = goal.expand(len(dom), dom.done.shape[1])
        relax = self.relaxation(dom.l, dom.u, dom.split, torch.float32)
        for step in range(iterations + 1):
            with torch.enable_grad():
                value, _, _ = self.walk(relax, alphas, betas, torch.float32, rows=dom.rows, clamp=False)
                clipped = torch.where(dom.done, goal, value.clamp_max(goal))
                loss = -clipped.sum()
            with torch.no_grad():
                # a domain's worth: its best row (refuting one row refutes the disjunct)
                score = torch.where(dom.done, torch.inf, value).amax(1)
                better = score > best
                best = torch.where(better, score, best)
                # a 0/1 blend, not a bool-mask assignment (which finds the mask's entries on the host);
                # lerp is exact at weights 0 and 1
                weight = _per_domain(better, best_a).to(best_a.dtype)
                for keep, now in zip(self.per_layer(best_a) + self.per_layer(best_b), alphas + betas):
                    keep.lerp_(now.detach(), weight)
            if step == iterations or (stop_test_due(step, best) and bool((best >= goal.amin(1)).all())) or (
                    deadline is not None and time.perf_counter() > deadline):
                break
            with torch.enable_grad():
                grads = torch.autograd.grad(loss, alphas + betas)
            adam_a.step(grads[:len(alphas)])
            adam_b.step(grads[len(alphas):])
            with torch.no_grad():  # the walk runs without clamps: keep the parameters in range
                for alpha in alphas:
                    alpha.clamp_(0, 1)
                for beta in betas:
                    beta.clamp_min_(0)
        dom.alpha, dom.beta = best_a, best_b

    def evaluate(self, dom: Domains) -> torch.Tensor:
        """The float64 bounds with the domains' parameters: sets ``dom.lower`` and ``dom.score``; returns
        the minimising inputs ``(D, R, n_in)``."""
        relax = self.relaxation(dom.l, dom.u, dom.split, torch.float64)
        value, x, mu = self.walk(relax, self.per_layer(dom.alpha), self.per_layer(dom.beta), torch.float64,
                                 record=True, rows=dom.rows, inputs=True)
        dom.lower = value
        unstable = (dom.l < 0) & (dom.u > 0)
        height = torch.where(unstable, -dom.l * dom.u / (dom.u - dom.l).clamp_min(1e-30), torch.zeros_like(dom.l))
        weight = (~dom.done).to(mu.dtype).unsqueeze(-1)
        score = ((mu.abs() * weight).sum(1) * height).float()
        # unstable neurons always beat stable ones (score -1), even at a zero estimate
        dom.score = torch.where(unstable, score, torch.full_like(score, -1.0))
        return x


def _per_domain(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(domains,)`` mask shaped to broadcast against ``like`` (``(domains, ...)``)."""
    return mask.reshape(-1, *[1] * (like.dim() - 1))


def children(dom: Domains, neuron: torch.Tensor) -> Domains:
    """Both children of each domain split on ``neuron`` ``(D,)``: first all ``z <= 0``, then all ``z >= 0``."""
    D = len(dom)
    idx = torch.arange(D, device=dom.l.device)
    parts = []
    for sign in (-1, 1):
        l, u, split, beta = dom.l.clone(), dom.u.clone(), dom.split.clone(), dom.beta.clone()
        if sign < 0:
            u[idx, neuron] = u[idx, neuron].clamp_max(0)
        else:
            l[idx, neuron] = l[idx, neuron].clamp_min(0)
        split[idx, neuron] = sign
        beta[idx, :, neuron] = 0.0
        parts.append(Domains(l, u, split, dom.alpha.clone(), beta, dom.done.clone(), rows=dom.rows))
    return Domains.cat(parts)


def refine_intervals(bounder: BetaCrown, dom: Domains, first: torch.Tensor, max_rows: int,
                     deadline: float | None = None) -> int:
    """Tighten the intervals of the unstable neurons of the layers after each domain's split layer
    ``first`` ``(D,)`` by CROWN walks (float64) through the domain's intervals, in which the split
    neurons are stable: valid on the domain (every input of it lies in all its intervals), so
    they are intersected with the old ones. Layers are done in order (each uses the ones before);
    at most ``max_rows`` walks per call (the first neurons found when there are more). Returns the
    number of walks."""
    chain = bounder.chain
    crown = bounder.crown
    D = len(dom)
    hi, width = (t.expand(D, -1) for t in bounder.data[torch.float64][5:7])
    done = 0
    for k in range(1, chain.n_relu_layers):
        lk, uk = bounder.layer(dom.l, k), bounder.layer(dom.u, k)
        want = (lk < 0) & (uk > 0) & (first < k).unsqueeze(1)
        box, neuron = torch.nonzero(want, as_tuple=True)
        m = min(box.numel(), (max_rows - done) // 2)  # over budget: a subset (any subset is sound)
        if m <= 0 or (deadline is not None and time.perf_counter() > deadline):
            break
        box, neuron = box[:m], neuron[:m]
        relax = [ChainBounder._relax(bounder.layer(dom.l, i), bounder.layer(dom.u, i)) for i in range(k)]
        value, _ = crown._neuron_bounds(box, neuron, k, relax, hi, width)
        done += 2 * m
        off = bounder.offsets[k]
        dom.l[box, off + neuron] = torch.maximum(dom.l[box, off + neuron], value[:m])
        dom.u[box, off + neuron] = torch.minimum(dom.u[box, off + neuron], -value[m:])
        dom.u[box, off + neuron] = torch.maximum(dom.u[box, off + neuron], dom.l[box, off + neuron])
    return done


def choose_neurons(bounder: BetaCrown, dom: Domains, opts: SplitOptions) -> torch.Tensor:
    """One neuron per domain ``(D,)`` (see the module docstring); the domains must have unstable neurons."""
    assert dom.score is not None
    if opts.branching != "fsb" or opts.fsb_candidates <= 1:
        return dom.score.argmax(1)
    k = min(opts.fsb_candidates, dom.score.shape[1])
    top = dom.score.topk(k, 1)
    D = len(dom)
    rep = dom.take(torch.arange(D, device=dom.score.device).repeat_interleave(k))
    cand = top.indices.reshape(-1)
    kids = children(rep, cand)
    relax = bounder.relaxation(kids.l, kids.u, kids.split, torch.float32)
    value, _, _ = bounder.walk(relax, bounder.per_layer(kids.alpha), bounder.per_layer(kids.beta), torch.float32,
                               rows=kids.rows)
    worth = torch.where(kids.done, torch.inf, value).amax(1).reshape(2, D, k).amin(0)
    worth = torch.where(top.values.reshape(D, k) >= 0, worth, torch.full_like(worth, -torch.inf))  # stable: never
    pick = worth.argmax(1)
    return top.indices[torch.arange(D, device=pick.device), pick]


@dataclass
class SplitOutcome:
    status: str  # unsat, sat, timeout, unknown
    stats: dict[str, Any] = field(default_factory=dict)


def split_search(bounder: BetaCrown, root: Domains, deadline: float, opts: SplitOptions,
                 confirm: Callable[[torch.Tensor], bool], log: Callable[[str], None] | None = None) -> SplitOutcome:
    """Branch and bound on ReLU splits from the bounded root domains (one per open disjunct, or one
    for all the rows of ``bounder``): ``unsat`` when every domain is refuted.

    ``confirm(points)`` is called with candidate inputs ``(m, n_in)`` that satisfy a disjunct on the
    chain and returns True when one is a confirmed counterexample."""
    stats = {"domains": 0, "steps": 0, "max_open": 0, "refine_rows": 0}
    stack: list[Domains] = [root]
    n_open = len(root)
    stuck = False
    widest = max(bounder.sizes + [bounder.chain.n_inputs])
    fan = max(1, opts.fsb_candidates) if opts.branching == "fsb" else 1
    cap = max(1, WALK_BYTES // (4 * widest * root.done.shape[1] * 2 * fan))
    batch_size = max(1, min(opts.batch_size, cap))
    while stack:
        if time.perf_counter() > deadline:
            return SplitOutcome("timeout", stats)
        # pop up to batch_size domains (depth first)
        parts, count = [], 0
        while stack and count < batch_size:
            d = stack.pop()
            if count + len(d) > batch_size:
                keep = batch_size - count
                stack.append(d.take(torch.arange(keep, len(d), device=d.l.device)))
                d = d.take(torch.arange(keep, device=d.l.device))
            parts.append(d)
            count += len(d)
        n_open -= count
        parents = Domains.cat(parts) if len(parts) > 1 else parts[0]
        has = (parents.score >= 0).any(1)
        if not bool(has.all()):  # every neuron fixed: the domain is a polytope, solve its LP
            for i in (~has).nonzero().flatten().tolist():
                status = finish_with_lp(bounder, parents.take(torch.tensor([i], device=has.device)), confirm)
                if status == "sat":
                    return SplitOutcome("sat", stats)
                stuck = stuck or status != "unsat"  # still open: the answer cannot be unsat
            parents = parents.take(has.nonzero().flatten())
            if not len(parents):
                continue
        neuron = choose_neurons(bounder, parents, opts)
        kids = children(parents, neuron)
        if opts.refine_rows > 0:
            layer = torch.bucketize(neuron, torch.tensor(bounder.offsets[1:], device=neuron.device), right=True)
            stats["refine_rows"] += refine_intervals(bounder, kids, layer.repeat(2), opts.refine_rows, deadline)
        bounder.optimise(kids, opts.iterations, opts.lr_alpha, opts.lr_beta, deadline=deadline)
        x = bounder.evaluate(kids)
        stats["domains"] += len(kids)
        stats["steps"] += 1
        kids.done = kids.done | (kids.lower > bounder.margin_of(kids))
        open_ = ~kids.done.any(1)
        if bool(open_.any()):
            keep = open_.nonzero().flatten()
            kids = kids.take(keep)
            if _check(bounder, x[keep], kids.lower, confirm):
                return SplitOutcome("sat", stats)
            stack.append(kids)
            n_open += len(kids)
            stats["max_open"] = max(stats["max_open"], n_open)
            if n_open > opts.max_domains:
                return SplitOutcome("unknown", stats)
        if log is not None and stats["steps"] % 20 == 0:
            worst = min(float(d.lower.amax(1).min()) for d in stack) if stack else float("nan")
            log(f"relu split: {stats['steps']} steps, {stats['domains']} domains, {n_open} open, worst {worst:.4g}")
    return SplitOutcome("unknown" if stuck else "unsat", stats)


def finish_with_lp(bounder: BetaCrown, dom: Domains, confirm) -> str:
    """Decide one domain whose neurons are all stable (``unsat``, ``sat`` or ``unknown``).

    The network is affine on the domain, so the rows' minima are linear programs over the box with
    the split constraints ``sigma_j z_j(x) >= 0``. Their optimal dual multipliers, used as betas,
    make the beta-CROWN bound equal the LP optimum (strong duality); when the constraints are
    infeasible, the multipliers of the LP ``max s: sigma_j z_j(x) >= s`` (optimum ``s* < 0``)
    scaled up make the bound arbitrarily large. Either way the unsat decision rests on the float64
    walk with those betas (valid for any beta >= 0), never on the LP solver; an LP optimum below
    the margin gives its minimiser as a candidate counterexample. The LPs are built and solved on
    the CPU; the deciding walk runs on the domain's device."""
    from scipy.optimize import linprog

    device = dom.l.device
    Ws, cs, spec_W, spec_c, lo, hi, _ = (t.cpu() if torch.is_tensor(t) else [w.cpu() for w in t]
                                         for t in bounder.data[torch.float64])
    l, split = dom.l[0].cpu(), dom.split[0].cpu()
    P, q = Ws[0].T, cs[0]  # z_1 = x P + q
    rows_A, rows_b, idx = [], [], []
    for k in range(len(Ws)):
        if k > 0:
            act = (bounder.layer(l, k - 1) >= 0).double()
            P, q = (P * act) @ Ws[k].T, (q * act) @ Ws[k].T + cs[k]
        sk = bounder.layer(split, k).double()
        j = sk.nonzero().flatten()
        rows_A.append(-sk[j].unsqueeze(1) * P[:, j].T)
        rows_b.append(sk[j] * q[j])
        idx.append(j + bounder.offsets[k])
    act = (bounder.layer(l, len(Ws) - 1) >= 0).double()
    G, g0 = (P * act) @ spec_W.T, (q * act) @ spec_W.T + spec_c  # rows = x G + g0
    A_ub, b_ub, idx = torch.cat(rows_A).numpy(), torch.cat(rows_b).numpy(), torch.cat(idx)
    if not A_ub.shape[0]:
        A_ub, b_ub = np.zeros((1, lo.numel())), np.zeros(1)  # no split: a trivial constraint
    box = list(zip(lo.tolist(), hi.tolist()))
    beta = dom.beta.to("cpu", copy=True)
    margin = bounder.margin_of(dom)[0].cpu()
    done = dom.done[0].cpu()
    row_ids = torch.arange(dom.done.shape[1], device="cpu") if dom.rows is None else dom.rows[0].cpu()
    for r, row in enumerate(row_ids.tolist()):
        if bool(done[r]):
            continue
        res = linprog(G[:, row].numpy(), A_ub=A_ub, b_ub=b_ub, bounds=box, method="highs")
        if res.status == 0:
            beta[0, r, idx] = torch.from_numpy(-res.ineqlin.marginals).float().clamp_min(0)
            if res.fun + float(g0[row]) <= float(margin[r]):
                x = torch.from_numpy(res.x).double().clamp(lo, hi).reshape(1, 1, -1).to(device)
                if _check(bounder, x, x.new_zeros(1, 1), confirm):
                    return "sat"
        elif res.status == 2:  # infeasible: max s subject to sigma_j z_j(x) >= s
            A_s = np.concatenate([A_ub, np.ones((A_ub.shape[0], 1))], 1)
            c = np.zeros(A_s.shape[1])
            c[-1] = -1.0
            feas = linprog(c, A_ub=A_s, b_ub=b_ub, bounds=box + [(None, 1.0)], method="highs")
            if feas.status != 0 or feas.fun <= 0:  # feas.fun = -s*
                continue
            lam = torch.from_numpy(-feas.ineqlin.marginals).clamp_min(0)
            spread = float((G[:, row].abs() * (hi - lo)).sum() + g0[row].abs()) + 1.0
            beta[0, r, idx] = (lam * 4 * spread / feas.fun).float()
    trial = Domains(dom.l, dom.u, dom.split, dom.alpha, beta.to(device), dom.done, rows=dom.rows)
    bounder.evaluate(trial)
    return "unsat" if bool((trial.done | (trial.lower > margin.to(device))).any()) else "unknown"


def _check(bounder: BetaCrown, x: torch.Tensor, lower: torch.Tensor, confirm) -> bool:
    """Confirm the minimisers of the domains' linear bounds (the 64 lowest) that satisfy a disjunct on the
    chain (float64)."""
    pts = x.reshape(-1, x.shape[-1])[torch.argsort(lower.reshape(-1))[:64]]
    y = bounder.chain.forward(pts)
    v = violation(y, bounder.A, bounder.b, bounder.groups, int(bounder.groups.max()) + 1)
    hit = v <= 0
    return bool(hit.any()) and confirm(pts[hit][:8])


# ----------------------------------------------------------------------------------------------
# the verifier's entry point

def _graph_intervals(net: Any, lo: torch.Tensor, hi: torch.Tensor, A: torch.Tensor, method: str, n_layers: int,
                     max_time: float = 1e9):
    """Pre-activation intervals of the ReLUs from the graph's ``method`` bounds (flattened, per layer),
    and the lower bounds of ``A y`` (``b`` not subtracted); None where unavailable. ``max_time``:
    seconds of alpha-CROWN's optimisation (checked between its iterations)."""
    from .. import PerturbationLpNorm, compute_bounds

    graph, shape = net.bound_graph, net.input_shape
    lo_, hi_ = lo.reshape(1, *shape[1:]), hi.reshape(1, *shape[1:])
    try:
        res = compute_bounds(graph, ((lo_ + hi_) / 2,), {graph.inputs[0]: PerturbationLpNorm(x_L=lo_, x_U=hi_)},
                             method=method, C=A.unsqueeze(0), upper=False, params=net.params,
                             opts={"optimize_bound_args": {"max_time": max_time}})
    except (NotImplementedError, RuntimeError, ValueError):
        return None, None
    relus = [n for n in graph.nodes if n.target == torch.ops.aten.relu.default and n.inputs
             and n.inputs[0] in res.intervals]
    if len(relus) != n_layers:
        return None, res.lower.reshape(-1)
    out = []
    for node in relus:
        iv = res.intervals[node.inputs[0]]
        out.append((iv.lower.reshape(-1).double(), iv.upper.reshape(-1).double()))
    return out, res.lower.reshape(-1).double()


def relu_split_region(net: Any, region: Any, A: torch.Tensor, b: torch.Tensor, groups: torch.Tensor, deadline: float,
                      opts: Any, stats: dict, log: Callable[[str], None] | None = None,
                      root_method: str = "alpha-CROWN") -> tuple[str, Any] | None:
    """Decide a region whose box is too wide for input splitting: CROWN, ``root_method`` (graph),
    alpha-optimised chain bounds, then ReLU-split branch and bound per open disjunct.

    ``opts``: the verifier's options (``margin_abs``, ``margin_rel``, and the ``relu_split_*``/
    ``branching`` fields when present). Returns ``(verdict, counterexample)``, or None when the
    network is not a ReLU chain (the caller falls back)."""
    if net.dtype != torch.float64:
        return None
    chain = net.relu_chain(MAX_ENTRIES)
    if chain is None or chain.n_relu_layers == 0:
        return None
    t0 = time.perf_counter()
    sopts = SplitOptions(margin_abs=opts.margin_abs, margin_rel=opts.margin_rel,
                         branching=getattr(opts, "branching", "babsr"))
    for name in ("batch_size", "iterations", "root_iterations", "fsb_candidates", "refine_rows"):
        value = getattr(opts, f"relu_split_{name}", None)
        if value is not None:
            setattr(sopts, name, value)
    lower = region.lower.to(net.device, torch.float64)
    upper = region.upper.to(net.device, torch.float64)
    free = (region.upper > region.lower).to(net.device)
    fixed = lower.clone()
    if not bool(free.all()):
        chain = restrict_chain(chain, free, lower)
    lo, hi = lower[free], upper[free]
    n_groups = int(groups.max()) + 1
    margin = opts.margin_abs + opts.margin_rel * b.abs()
    A, b = A.double(), b.double()

    confirm = Confirmer(lambda x: net.checker.confirm(x, region), free, fixed)

    # root: chain CROWN, intersected with the graph's (alpha-CROWN) intervals
    crown = ChainBounder(chain, A, b).bound(lo.unsqueeze(0), hi.unsqueeze(0))
    pre = [(pl[0], pu[0]) for pl, pu in crown.pre]
    row_lower = crown.lower[0]
    refuted = refuted_groups(row_lower.unsqueeze(0), margin, groups, n_groups)[0]
    if not bool(refuted.all()) and root_method:
        budget = 0.5 * (deadline - time.perf_counter())  # at most half the time left
        intervals, graph_lower = None, None
        if budget > 0:
            intervals, graph_lower = _graph_intervals(net, lower, upper, A, root_method, chain.n_relu_layers, budget)
        if graph_lower is not None:  # bounds of A y: subtract b
            row_lower = torch.maximum(row_lower, graph_lower - b)
        if intervals is not None and all(gl.numel() == pl.numel() for (gl, _), (pl, _) in zip(intervals, pre)):
            pre = [(torch.maximum(pl, gl), torch.minimum(pu, gu)) for (pl, pu), (gl, gu) in zip(pre, intervals)]
            pre = [(pl, torch.maximum(pu, pl)) for pl, pu in pre]
        refuted = refuted_groups(row_lower.unsqueeze(0), margin, groups, n_groups)[0]
    stats["relu_split_root_s"] = stats.get("relu_split_root_s", 0.0) + time.perf_counter() - t0
    if bool(refuted.all()):
        return "unsat", None
    if time.perf_counter() > deadline:
        return "timeout", None
    t0 = time.perf_counter()
    # one root domain per open disjunct (rows padded by repeating the disjunct's last row)
    open_groups = [g for g in range(n_groups) if not bool(refuted[g])]
    members = [(groups == g).nonzero().flatten() for g in open_groups]
    R = max(m.numel() for m in members)
    rows = torch.stack([torch.cat([m, m[-1:].expand(R - m.numel())]) for m in members])
    D = len(open_groups)
    l0 = torch.cat([pl for pl, _ in pre]).expand(D, -1).clone()
    u0 = torch.cat([pu for _, pu in pre]).expand(D, -1).clone()
    bounder = BetaCrown(chain, A, b, lo, hi, margin, groups)
    alpha = (u0 > -l0).float().unsqueeze(1).repeat(1, R, 1)
    root = Domains(l0, u0, torch.zeros_like(l0, dtype=torch.int8), alpha, torch.zeros_like(alpha),
                   l0.new_zeros(D, R, dtype=torch.bool), rows=rows)
    bounder.optimise(root, sopts.root_iterations, sopts.lr_alpha, sopts.lr_beta, deadline=deadline)
    x = bounder.evaluate(root)
    root.done = root.lower > bounder.margin_of(root)
    stats["relu_split_root_s"] = stats.get("relu_split_root_s", 0.0) + time.perf_counter() - t0
    keep = (~root.done.any(1)).nonzero().flatten()
    if not keep.numel():
        return "unsat", None
    if _check(bounder, x, root.lower, confirm):
        return "sat", confirm.found[0]
    root = root.take(keep)
    if log is not None:
        log(f"relu split: {len(root)} open disjuncts, root bounds {root.lower.amax(1).tolist()}")
    outcome = split_search(bounder, root, deadline, sopts, confirm, log)
    for key, value in outcome.stats.items():
        stats[f"relu_split_{key}"] = value
    if outcome.status == "sat":
        return "sat", confirm.found[0]
    return outcome.status, None


__all__ = ["BetaCrown", "Domains", "SplitOptions", "children", "relu_split_region", "split_search"]
