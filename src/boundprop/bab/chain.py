"""A fast CROWN for networks that are a chain of affine maps and ReLUs, for input branch and bound.

Many verification benchmarks (ACAS Xu, MNIST/RL fully connected nets, 1-D conv regressors) are

    z_1 = W_0 x + c_0,   h_i = relu(z_i),   z_{i+1} = W_i h_i + c_i,   y = z_L

with ``x`` the flattened input: every op between two ReLUs is affine (linear, conv, add,
reshape, normalisation...). :func:`extract_relu_chain` recognises such a graph with the engine's
own affinity test (:meth:`PropagationState.is_affine_here`) and turns each affine segment into a
dense ``(W, c)`` by evaluating it on the basis vectors (float64), checked at random points.

:class:`ChainBounder` then computes exactly CROWN's bounds (adaptive lower slope, chord upper
bound, every intermediate layer refined by a backward walk) for many boxes at once, with two
savings that matter in branch and bound:

* only neurons that are unstable in a box get a backward walk, and the walks of all boxes are
  stacked as rows of one matrix (``R`` rows: ``(R, n) @ W`` products, no ``(batch, spec, n)``
  tensor over all neurons); the relaxation slopes of a row's box are gathered per row;
* a box split from a parent inherits the parent's pre-activation intervals (valid on any
  sub-box) and intersects them with its own: neurons stable in the parent cost nothing.

Soundness: all arithmetic is float64 (relative error ~1e-16 per operation, far below the
verifier's margin); the intervals are never looser than IBP's or the parent's; the lower bound of
a spec row ``a . y - b`` is the CROWN bound ``lA . x + bias`` minimised over the box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adam import Adam
from ..graph.ir import Graph, evaluate, run_node
from ..syncs import stop_test_due

aten = torch.ops.aten

#: dense segments larger than this (entries) are not extracted
MAX_ENTRIES = 8_000_000
#: entries of one coefficient matrix of the intermediate walks (rows x width); larger sets go in chunks
ROW_BUDGET = 4_000_000


def relu_layer_step(mu: torch.Tensor, bias: torch.Tensor, a: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                    W: torch.Tensor, c: torch.Tensor, shift: torch.Tensor | None = None):
    """One layer of the backward walk of a lower bound ``mu . h_i + bias`` through
    ``h_i = relu(z_i)``, ``z_i = W h_{i-1} + c``; returns ``(mu', bias')`` on ``h_{i-1}``.

    ``a``: the lower slope of each neuron (through 0), ``s z + t``: its upper line, both broadcasting
    against ``mu`` (``(..., n_i)``); ``W``: ``(n_i, n_{i-1})``. A positive coefficient takes the
    lower line, a negative one the upper::

        lam = pos(mu) a + neg(mu) s - shift,   bias' = bias + neg(mu) . t + lam . c,   mu' = lam W

    with ``pos(mu) a + neg(mu) s`` written ``mu s + pos(mu) (a - s)``: one sign split, and no
    comparison or ``where`` in the step or its gradient (on CPU those cost 5-10 times an
    arithmetic pass). ``shift``: beta-CROWN's split term ``beta * sigma``, if any.
    """
    pos = mu.relu()
    lam = mu * s + pos * (a - s)
    bias = bias + ((mu - pos) * t).sum(-1)
    if shift is not None:
        lam = lam - shift
    return lam @ W, bias + lam @ c


def box_minimum(mu: torch.Tensor, hi: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """``min over lo <= x <= hi of mu . x`` (``hi - width = lo``), over the last axis: ``x = lo`` where
    ``mu > 0``, else ``hi``. ``hi``/``width``: one box ``(n,)``, or one per row (shaped like ``mu``)."""
    if hi.dim() == 1:
        return mu @ hi - mu.relu() @ width
    return (mu * hi).sum(-1) - (mu.relu() * width).sum(-1)


@dataclass
class ReluChain:
    """``z_{i+1} = W_i h_i + c_i`` with ``h_0 = x`` (flattened input) and ``h_i = relu(z_i)``.

    ``weights[i]``: ``(n_{i+1}, n_i)``; ``biases[i]``: ``(n_{i+1},)``; the last pair gives the
    output. float64.
    """

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]

    @property
    def n_inputs(self) -> int:
        return self.weights[0].shape[1]

    def to(self, device: torch.device | str) -> ReluChain:
        """The chain with its matrices on ``device``."""
        return ReluChain([w.to(device) for w in self.weights], [c.to(device) for c in self.biases])

    @property
    def n_relu_layers(self) -> int:
        return len(self.weights) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs ``(batch, n_out)`` at flattened inputs ``x`` ``(batch, n_in)`` (differentiable)."""
        h = x
        for i, (w, c) in enumerate(zip(self.weights, self.biases)):
            h = torch.addmm(c, h, w.T)
            if i < len(self.weights) - 1:
                h = torch.relu(h)
        return h


def restrict_chain(chain: ReluChain, free: torch.Tensor, fixed: torch.Tensor) -> ReluChain:
    """The chain as a function of the inputs ``free`` (boolean mask) alone, the others held at
    ``fixed`` (their values): the first layer's columns of fixed inputs are folded into its bias."""
    W0, c0 = chain.weights[0], chain.biases[0]
    keep = ~free
    c = c0 + W0[:, keep] @ fixed.to(W0.dtype)[keep]
    return ReluChain([W0[:, free].contiguous()] + chain.weights[1:], [c] + chain.biases[1:])


def _device_of(params: dict) -> torch.device:
    """Where the graph's parameters are (the chain is built there; the CPU without any)."""
    return next((v.device for v in params.values() if torch.is_tensor(v)), torch.device("cpu"))


def _params64(graph: Graph) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in graph.param_values().items():
        value = value.detach() if torch.is_tensor(value) else value
        out[name] = value.double() if torch.is_tensor(value) and value.is_floating_point() else value
    return out


def extract_relu_chain(graph: Graph, input_shape: tuple[int, ...] | None = None,
                       max_entries: int = MAX_ENTRIES) -> ReluChain | None:
    """The graph as a :class:`ReluChain`, or None when it is not one (or too large to densify).

    ``input_shape``: the input's shape, batch first (default: the graph's example shape). The chain
    is built where the graph's parameters are (see :meth:`ReluChain.to`).
    """
    from ..algorithms.state import make_state
    from ..perturbation import PerturbationLpNorm

    if len(graph.inputs) != 1:
        return None
    shape = tuple(input_shape or graph.input_shapes[0])
    params = _params64(graph)
    try:
        x0 = torch.zeros((1, *shape[1:]), dtype=torch.float64, device=_device_of(params))
        state = make_state(graph, (x0,), {graph.inputs[0]: PerturbationLpNorm(x_L=x0, x_U=x0)}, params)
        relus = []
        for node in graph.nodes:
            if node.name not in state.perturbed:
                continue
            if node.target == aten.relu.default:
                if len(node.inputs) != 1:
                    return None
                relus.append(node)
            elif not state.is_affine_here(node):
                return None
    except Exception:  # unsupported op, evaluation failure...: not a chain
        return None
    if graph.output not in state.perturbed:
        return None
    sources = [graph.inputs[0]] + [r.name for r in relus]
    targets = [r.inputs[0] for r in relus] + [graph.output]
    weights, biases = [], []
    for source, target in zip(sources, targets):
        seg = _segment(graph, state.perturbed, source, target)
        if seg is None:
            return None
        n_in = int(math.prod(state.values[source].shape[1:]))
        n_out = int(math.prod(state.values[target].shape[1:]))
        if n_in * n_out > max_entries:
            return None
        try:
            W, c = _densify(graph, seg, source, target, state.values[source].shape[1:], shape, params)
        except Exception:
            return None
        if W is None:
            return None
        weights.append(W)
        biases.append(c)
    return ReluChain(weights, biases)


def _segment(graph: Graph, perturbed: set[str], source: str, target: str) -> list | None:
    """Perturbed nodes computing ``target`` from ``source`` alone (None when another perturbed value
    enters: a skip connection or a second input)."""
    before = graph.ancestors(source)
    needed = graph.ancestors(target)
    if source not in needed:
        return None
    seg = {n for n in needed if n in perturbed and n not in before}
    for name in seg:
        for parent in graph.node(name).inputs:
            if parent in perturbed and parent not in seg and parent != source:
                return None
    return [node for node in graph.nodes if node.name in seg]


def _run_segment(graph: Graph, nodes: list, source: str, target: str, x: torch.Tensor, input_shape: tuple,
                 params: dict) -> torch.Tensor:
    """``target`` with ``source`` set to ``x`` (batch first); the other values (constants, shapes) come
    from the whole graph run on zeros of the same batch size."""
    env = evaluate(graph, (x.new_zeros(x.shape[0], *input_shape[1:]),), params)
    env[source] = x
    for node in nodes:
        env[node.name] = run_node(node, env)
    return env[target].reshape(x.shape[0], -1).double()


def _densify(graph: Graph, nodes: list, source: str, target: str, shape: torch.Size, input_shape: tuple,
             params: dict):
    """``(W, c)`` of the affine segment, from its values at 0 and the basis vectors; checked at random points."""
    n = int(math.prod(shape))
    device = _device_of(params)
    basis = torch.cat([torch.zeros(1, n, dtype=torch.float64, device=device),
                       torch.eye(n, dtype=torch.float64, device=device)])
    with torch.no_grad():
        out = _run_segment(graph, nodes, source, target, basis.reshape(n + 1, *shape), input_shape, params)
        c = out[0].clone()
        W = (out[1:] - c).T.contiguous()
        probe = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0), device="cpu")
        probe = probe.to(device) * 3
        got = _run_segment(graph, nodes, source, target, probe.reshape(3, *shape), input_shape, params)
    want = probe @ W.T + c
    scale = 1.0 + want.abs().max() + W.abs().sum(1).max()
    if not bool(((got - want).abs() <= 1e-9 * scale).all()):
        return None, None
    return W, c


@dataclass
class ChainBounds:
    """Bounds of one batch of boxes.

    Attributes:
        lower: ``(batch, rows)`` lower bounds of the spec rows ``A y - b``.
        lA: ``(batch, rows, n_in)`` the linear lower bounds' coefficients on ``x``.
        pre: per ReLU layer, ``(lower, upper)`` of its input, each ``(batch, n_i)``.
        gain: ``(batch, rows, n_in)`` estimated rise of each row's bound when the box is halved
            along each input dimension (see :meth:`ChainBounder.bound`).
    """

    lower: torch.Tensor
    lA: torch.Tensor
    pre: list[tuple[torch.Tensor, torch.Tensor]]
    gain: torch.Tensor | None = None


class ChainBounder:
    """CROWN bounds of ``A y - b`` over boxes, for a :class:`ReluChain` (see the module docstring)."""

    def __init__(self, chain: ReluChain, A: torch.Tensor, b: torch.Tensor, refine_active: bool = True) -> None:
        self.chain = chain
        self.refine_active = refine_active
        W, c = chain.weights[-1], chain.biases[-1]
        self.spec_W = A.double() @ W  # rows on h_{L-1}
        self.spec_c = A.double() @ c - b.double()
        self.rows = A.shape[0]

    # relaxation of relu on [l, u]: lower slope a (through 0), upper s * z + t
    @staticmethod
    def _relax(lo: torch.Tensor, hi: torch.Tensor):
        active = lo >= 0
        unstable = (lo < 0) & (hi > 0)
        width = (hi - lo).clamp_min(1e-30)
        s = torch.where(unstable, hi / width, active.to(lo.dtype))
        t = torch.where(unstable, -s * lo, torch.zeros_like(lo))
        a = torch.where(unstable, (hi > -lo).to(lo.dtype), active.to(lo.dtype))
        return a, s, t

    def _walk(self, mu: torch.Tensor, bias: torch.Tensor, box: torch.Tensor, layer: int, relax: list,
              hi: torch.Tensor, width: torch.Tensor, record: list | None = None):
        """Lower bounds of ``mu . h_layer + bias`` (rows ``R``; ``box``: each row's box index).

        Returns the bounds ``(R,)`` and the coefficients on the input ``(R, n_in)``; ``record``
        receives the coefficients on every ``h_i`` (last layer first)."""
        for i in range(layer, 0, -1):
            if record is not None:
                record.append(mu)
            a, s, t = (r[box] for r in relax[i - 1])
            mu, bias = relu_layer_step(mu, bias, a, s, t, self.chain.weights[i - 1], self.chain.biases[i - 1])
        return box_minimum(mu, hi[box], width[box]) + bias, mu

    def _neuron_bounds(self, box: torch.Tensor, neuron: torch.Tensor, k: int, relax: list, hi: torch.Tensor,
                       width: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower bounds of ``z_k`` and of ``-z_k`` at the given (box, neuron) pairs: values ``(2m,)`` and
        input coefficients ``(2m, n_in)``, lower-bound rows first; in chunks of bounded memory."""
        W, c = self.chain.weights[k], self.chain.biases[k]
        widest = max(w.shape[1] for w in self.chain.weights[:k + 1])
        chunk = max(1, ROW_BUDGET // widest)
        values, coeffs = [], []
        for sign in (1.0, -1.0):
            for start in range(0, box.numel(), chunk):
                b, n = box[start:start + chunk], neuron[start:start + chunk]
                value, g = self._walk(sign * W[n], sign * c[n], b, k, relax, hi, width)
                values.append(value)
                coeffs.append(g)
        return torch.cat(values), torch.cat(coeffs)

    def bound(self, lo: torch.Tensor, hi: torch.Tensor,
              parent: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> ChainBounds:
        """Bounds over the boxes ``[lo, hi]`` (``(batch, n_in)``, float64); ``parent``: known intervals."""
        chain = self.chain
        batch = lo.shape[0]
        width = hi - lo
        center, radius = (lo + hi) / 2, width / 2
        W0, c0 = chain.weights[0], chain.biases[0]
        zc = center @ W0.T + c0
        zr = radius @ W0.abs().T
        pre: list[tuple[torch.Tensor, torch.Tensor]] = []
        l, u = zc - zr, zc + zr
        relax = []
        # per ReLU layer, how much of each neuron's range each input dimension accounts for
        spreads = [W0.abs().unsqueeze(0) * radius.unsqueeze(1)]
        for k in range(chain.n_relu_layers):
            if k > 0:  # IBP from the refined layer before, then CROWN for the unstable neurons
                W, c = chain.weights[k], chain.biases[k]
                pl, pu = pre[-1]
                hl, hu = pl.clamp_min(0), pu.clamp_min(0)
                hc, hr = (hl + hu) / 2, (hu - hl) / 2
                zc = hc @ W.T + c
                zr = hr @ W.abs().T
                l, u = zc - zr, zc + zr
            if parent is not None:
                l, u = torch.maximum(l, parent[k][0]), torch.minimum(u, parent[k][1])
            if k > 0:
                box, neuron = torch.nonzero((u > 0) if self.refine_active else (l < 0) & (u > 0), as_tuple=True)
                if box.numel():
                    value, g = self._neuron_bounds(box, neuron, k, relax, hi, width)
                    m = box.numel()
                    l = l.clone()
                    u = u.clone()
                    l[box, neuron] = torch.maximum(l[box, neuron], value[:m])
                    u[box, neuron] = torch.minimum(u[box, neuron], -value[m:])
                    spread = lo.new_zeros(batch, l.shape[1], lo.shape[1])
                    spread[box, neuron] = (g[:m].abs() + g[m:].abs()) * radius[box]
                    spreads.append(spread)
                else:
                    spreads.append(lo.new_zeros(batch, l.shape[1], lo.shape[1]))
            u = torch.maximum(u, l)  # rounding can cross them on (near-)degenerate boxes
            pre.append((l, u))
            relax.append(self._relax(l, u))
        rows = self.rows
        box = torch.arange(batch, device=lo.device).repeat_interleave(rows)
        mu = self.spec_W.repeat(batch, 1)
        bias = self.spec_c.repeat(batch)
        record: list[torch.Tensor] = []
        value, lA = self._walk(mu, bias, box, chain.n_relu_layers, relax, hi, width, record)
        lA = lA.reshape(batch, rows, -1)
        gain = lA.abs() * radius.unsqueeze(1) / 2
        for i, coeff in zip(range(chain.n_relu_layers, 0, -1), record):
            l, u = pre[i - 1]
            unstable = (l < 0) & (u > 0)
            gap = torch.where(unstable, -l * u / (u - l).clamp_min(1e-30), torch.zeros_like(l))
            spread = spreads[i - 1]
            share = spread / spread.sum(-1, keepdim=True).clamp_min(1e-30)
            weight = coeff.abs().reshape(batch, rows, -1) * gap.unsqueeze(1)
            gain = gain + torch.bmm(weight, share) / 2
        return ChainBounds(value.reshape(batch, rows), lA, pre, gain)

    def optimise(self, lo: torch.Tensor, hi: torch.Tensor, pre: list[tuple[torch.Tensor, torch.Tensor]],
                 groups: torch.Tensor, n_groups: int, iterations: int = 20, lr: float = 0.3,
                 row_lower: torch.Tensor | None = None) -> torch.Tensor:
        """Best lower bound per disjunct ``(batch, n_groups)`` of ``max_rows(A y - b)``, optimised.

        A disjunct (group of rows) is refuted when its rows cannot all be <= 0, and any convex
        combination ``sum_i theta_i (A_i y - b_i)`` that is provably positive shows that. The
        weights ``theta`` (softmax within the group) and the lower slopes ``alpha`` of the
        unstable ReLUs of the final walk are chosen by gradient ascent on the bound; every value
        met is a valid bound, and the best one per box and group is kept; ``row_lower`` (the rows'
        own bounds, ``(batch, rows)``) counts too (a single row is the combination with one weight).
        """
        chain = self.chain
        batch, rows = lo.shape[0], self.rows
        relax = [self._relax(l, u) for l, u in pre]
        unstable = [(l < 0) & (u > 0) for l, u in pre]
        box = torch.arange(batch, device=lo.device).repeat_interleave(n_groups)
        # (G, rows); not one_hot, which reads the groups' range on the host
        member = (torch.arange(n_groups, device=groups.device).unsqueeze(1) == groups).to(lo.dtype)
        logits = lo.new_zeros(batch, n_groups, rows).masked_fill(member.unsqueeze(0) == 0, -torch.inf)
        # per layer, gathered once: (fixed part of the lower slope, its free mask, s, t), (batch * G, n_i);
        # the slope is fixed + free * alpha (alpha on unstable neurons, a 0/1 slope elsewhere)
        layers = []
        for (a0, s, t), m in zip(relax, unstable):
            free = m[box].to(lo.dtype)
            layers.append((a0[box] * (1 - free), free, s[box], t[box]))
        alphas = [r[0][box].clone() for r in relax]  # start from the adaptive slopes
        params = [logits.requires_grad_(True)] + [a.requires_grad_(True) for a in alphas]
        adam = Adam(params, lr)
        hi_box, width_box = hi[box], (hi - lo)[box]
        best = lo.new_full((batch, n_groups), -torch.inf)
        if row_lower is not None:
            best = best.scatter_reduce(1, groups.expand(batch, -1), row_lower, reduce="amax")
        for step in range(iterations + 1):
            with torch.enable_grad():
                theta = torch.softmax(logits, -1).nan_to_num(0.0)  # (batch, G, rows)
                mu = (theta @ self.spec_W).reshape(batch * n_groups, -1)
                bias = (theta @ self.spec_c).reshape(-1)
                for i in range(chain.n_relu_layers, 0, -1):
                    fixed, free, s, t = layers[i - 1]
                    mu, bias = relu_layer_step(mu, bias, fixed + free * alphas[i - 1], s, t, chain.weights[i - 1],
                                               chain.biases[i - 1])
                value = (box_minimum(mu, hi_box, width_box) + bias).reshape(batch, n_groups)
                loss = -(value.clamp_max(1.0)).sum()
            best = torch.maximum(best, value.detach())
            if step == iterations or (stop_test_due(step, best) and bool((best > 0).all())):
                break
            with torch.enable_grad():
                grads = torch.autograd.grad(loss, params)
            adam.step(grads)
            with torch.no_grad():  # projected: every slope met is in [0, 1], so every value is a bound
                for alpha in alphas:
                    alpha.clamp_(0, 1)
        return best
