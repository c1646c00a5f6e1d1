"""Soundness fuzzing: random models, random sets, every method; each bound checked at sampled points.

    .venv/bin/python tests/fuzz.py graph 0 500        # kind, first seed, number of seeds
    .venv/bin/python tests/fuzz.py onnx 0 300
    .venv/bin/python tests/fuzz.py onnxops 0 300
    .venv/bin/python tests/fuzz.py inputs2 0 200
    .venv/bin/python tests/fuzz.py weights 0 200
    .venv/bin/python tests/fuzz.py jacobian 0 200
    .venv/bin/python tests/fuzz.py verifier 0 200

One line per seed (``ok``, ``unsupported``/``skipped`` with the reason, or what failed and the model);
a seed reproduces its case exactly.

* ``graph``: a random stack of image blocks (convolutions of any stride, padding, dilation and
  groups, transposed convolutions, batch norm, pooling, residual sums, concatenations, gates,
  upsampling, padding, transposes, channel means and slices) and vector blocks (linear, 16
  activations with PReLU and CELU, batch norm, layer norm, softmax, splits, products, quotients,
  max/min, rounding, attention...), in float64. Sets: L-inf (sometimes clipped to a
  box), L2, L1; sometimes a random specification ``C``; batch 1 or 2. Every method's final bounds and
  every intermediate interval it reports are checked at random points, box vertices and points
  pushed outward by PGD (L-inf), or points on and inside the ball (L2, L1; with the ball's vertices
  for L1); so are the linear bounds ``lA x + lbias <= C y <= uA x + ubias`` that CROWN, alpha-CROWN
  and forward mode return for the input. Unsupported operators are reported, not failures.
* ``onnx``, ``onnxops`` (:mod:`fuzz_onnx`): ``graph`` models exported to ONNX by torch, and chains of
  ONNX nodes with attributes torch never writes; the imported graph must compute what onnxruntime
  computes, and its bounds are checked as in ``graph``.
* ``inputs2``: models of two inputs (each perturbed, or one fixed) combined by a sum, a product, a
  concatenation, a maximum or an outer product.
* ``weights``: MLPs and CNNs with some parameters perturbed (L-inf, relative, L2), sometimes the input
  too; checked at sampled parameters and inputs (half of them vertices).
* ``jacobian``: :func:`boundprop.algorithms.jacobian.jacobian_bounds` against autograd Jacobians at
  sampled points.
* ``verifier``: ReLU MLPs and small CNNs (a convolution is a dense layer for the MILP) and properties
  whose threshold sits just above or below the exact optimum (MILP, :mod:`test_oracles`); the verdict
  must match (``timeout`` is allowed, never a wrong one).
* ``verifier_split``: the same, with ReLU splitting forced on every network (the beta-CROWN search of
  :mod:`boundprop.bab.relu_split`, which the verifier otherwise keeps for inputs too many to split).

Tolerance: 1e-7 relative (float64). What this found is fixed and kept as unit tests.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import boundprop  # noqa: E402
from boundprop import PerturbationLpNorm, compute_bounds  # noqa: E402
from boundprop.graph.ir import evaluate  # noqa: E402

TOL = 1e-7
METHODS = ("IBP", "CROWN-IBP", "CROWN", "forward", "forward+backward", "alpha-CROWN")
ALPHA_OPTS = {"optimize_bound_args": {"iteration": 4}}


# --- building blocks ------------------------------------------------------------------------------


class Fn(nn.Module):
    def __init__(self, fn: Callable, name: str) -> None:
        super().__init__()
        self.fn, self.name = fn, name

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class Residual(nn.Module):
    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x):
        return x + self.f(x)


class Concat(nn.Module):
    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x):
        return torch.cat([x, self.f(x)], 1)


class Pair(nn.Module):
    """``op(f(x), g(x))`` for a binary ``op`` (product, max, min)."""

    def __init__(self, f: nn.Module, g: nn.Module, op: Callable) -> None:
        super().__init__()
        self.f, self.g, self.op = f, g, op

    def forward(self, x):
        return self.op(self.f(x), self.g(x))


class HalfActivated(nn.Module):
    """The first half of the features through an activation, the rest as they are (a Split in ONNX)."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act

    def forward(self, x):
        first, rest = torch.split(x, [(x.shape[1] + 1) // 2, x.shape[1] // 2], 1)
        return torch.cat([self.act(first), rest], 1)


class Attention(nn.Module):
    """Single-head self-attention over the features split into 2 tokens (1 if odd), plus the input."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.t = 2 if d % 2 == 0 and d >= 4 else 1
        self.k = d // self.t
        self.q, self.kk, self.v = (nn.Linear(self.k, self.k) for _ in range(3))

    def forward(self, x):
        h = x.reshape(x.shape[0], self.t, self.k)
        a = torch.softmax(self.q(h) @ self.kk(h).transpose(1, 2) / math.sqrt(self.k), -1)
        return (a @ self.v(h)).reshape(x.shape[0], -1) + x


ACTIVATIONS = [nn.ReLU, lambda: nn.LeakyReLU(0.1), nn.Sigmoid, nn.Tanh, nn.ELU, nn.Softplus, nn.GELU, nn.SiLU,
               nn.Hardtanh, nn.Identity]
#: Rarer activations, one draw in four
MORE_ACTIVATIONS = [lambda: nn.ELU(0.4), nn.SELU, lambda: nn.CELU(0.7), nn.ReLU6, nn.Hardswish, nn.Mish,
                    lambda: nn.PReLU(init=-0.3), lambda: nn.PReLU(init=1.6), lambda: nn.PReLU(init=0.2)]


def _act(r: random.Random) -> nn.Module:
    return r.choice(MORE_ACTIVATIONS if r.random() < 0.25 else ACTIVATIONS)()


def image_block(r: random.Random, c: int, h: int) -> tuple[nn.Module, int, int] | None:
    """A block on ``(c, h, h)`` maps: ``(module, channels, size)``, or None if it does not fit."""
    kind = r.choice(["conv", "conv", "conv", "act", "act", "bn", "pool", "res", "cat", "gate", "convT", "up", "pad",
                     "layout"])
    if kind == "conv":
        k, s, p, d = r.choice([1, 2, 3]), r.choice([1, 1, 2]), r.choice([0, 1]), r.choice([1, 1, 2])
        if h + 2 * p - d * (k - 1) - 1 < 0:
            return None
        cout = r.randint(1, 4)
        g = r.choice([g for g in (1, 2) if c % g == 0 and cout % g == 0])
        return (nn.Conv2d(c, cout, k, s, p, dilation=d, groups=g, bias=r.random() < 0.8), cout,
                (h + 2 * p - d * (k - 1) - 1) // s + 1)
    if kind == "convT":
        k, s = r.choice([1, 2, 3]), r.choice([1, 2])
        p = r.choice([0, 1]) if k > 1 else 0
        op = r.choice([0, 1]) if s > 1 else 0
        cout, size = r.randint(1, 3), (h - 1) * s - 2 * p + k + op
        if size < 1 or size > 12 or op >= s:
            return None
        return nn.ConvTranspose2d(c, cout, k, s, p, output_padding=op), cout, size
    if kind == "act":
        return _act(r), c, h
    if kind == "bn":
        bn = nn.BatchNorm2d(c)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 2)
        bn.weight.data.uniform_(-2, 2)
        bn.bias.data.uniform_(-1, 1)
        return bn, c, h
    if kind == "pool":
        if h < 2:
            return None
        return r.choice([(nn.MaxPool2d(2), c, h // 2), (nn.AvgPool2d(2), c, h // 2), (nn.MaxPool2d(3, 1, 1), c, h),
                         (nn.AdaptiveAvgPool2d(1), c, 1)])
    if kind == "res":
        return Residual(nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), _act(r), nn.Conv2d(c, c, 1))), c, h
    if kind == "cat":
        cout = r.randint(1, 3)
        return Concat(nn.Sequential(nn.Conv2d(c, cout, 3, 1, 1), _act(r))), c + cout, h
    if kind == "gate":
        return Pair(nn.Conv2d(c, c, 1), nn.Sequential(nn.Conv2d(c, c, 1), nn.Sigmoid()), torch.mul), c, h
    if kind == "up":
        mode = r.choice(["nearest", "bilinear"])
        return (nn.Upsample(scale_factor=2, mode=mode), c, 2 * h) if h <= 6 else None
    if kind == "layout":  # transposes, channel statistics, channel slices (Transpose, ReduceMean, Slice in ONNX)
        return r.choice([
            (Fn(lambda x: x.transpose(2, 3), "transpose"), c, h),
            (Fn(lambda x: torch.cat([x, x.mean(1, keepdim=True)], 1), "channel-mean"), c + 1, h),
            (Fn(lambda x: torch.cat([x[:, 1:], x[:, :1]], 1), "channel-roll"), c, h),
            (Fn(lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=False, count_include_pad=False), "avgpool-pad"), c,
             (h - 1) // 2 + 1),
        ])
    return (Fn(lambda x: F.pad(x, (1, 1, 1, 1)), "pad"), c, h + 2) if h <= 8 else None


VECTOR_FNS: dict[str, Callable] = {
    "abs": torch.abs, "square": lambda x: x * x, "clamp": lambda x: x.clamp(-0.5, 0.7),
    "exp": lambda x: torch.exp(0.3 * x), "div": lambda x: x / (1.5 + torch.sigmoid(x)), "sin": torch.sin,
    "cos": torch.cos, "log": lambda x: torch.log(F.softplus(x) + 0.1),
    "sqrt": lambda x: torch.sqrt(torch.sigmoid(x) + 0.05), "recip": lambda x: torch.reciprocal(1.2 + torch.tanh(x)),
    "atan": torch.atan, "cube": lambda x: x ** 3, "amax": lambda x: x - x.amax(-1, keepdim=True),
    "sum-mul": lambda x: x * x.sum(-1, keepdim=True), "sign": lambda x: torch.sign(x) * 0.3 + x,
    "floor": lambda x: torch.floor(x) + 0.1 * x, "round": lambda x: torch.round(2 * x),
    "tanh*sigmoid": lambda x: torch.tanh(x) * torch.sigmoid(x),
}


def vector_block(r: random.Random, d: int) -> tuple[nn.Module, int]:
    """A block on ``(d,)`` vectors: ``(module, new d)``."""
    kind = r.choice(["lin", "lin", "act", "act", "res", "ln", "mul", "max", "min", "softmax", "logsoftmax",
                     "attention", "extra", "fn", "fn", "fn", "split", "bn"])
    if kind == "lin":
        o = r.randint(2, 8)
        return nn.Linear(d, o, bias=r.random() < 0.8), o
    if kind == "act":
        return _act(r), d
    if kind == "res":
        return Residual(nn.Sequential(nn.Linear(d, d), _act(r))), d
    if kind == "ln":
        ln = nn.LayerNorm(d)
        ln.weight.data.uniform_(-2, 2)
        ln.bias.data.uniform_(-1, 1)
        return ln, d
    if kind in ("mul", "max", "min"):
        return Pair(nn.Linear(d, d), nn.Linear(d, d), {"mul": torch.mul, "max": torch.maximum,
                                                       "min": torch.minimum}[kind]), d
    if kind == "softmax":
        return nn.Softmax(-1), d
    if kind == "split" and d >= 2:
        return HalfActivated(_act(r)), d
    if kind == "bn":
        bn = nn.BatchNorm1d(d)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 2)
        return bn, d
    if kind == "logsoftmax":
        return nn.LogSoftmax(-1), d
    if kind == "attention":
        return Attention(d), d
    if kind == "extra":
        return r.choice([nn.Hardsigmoid, nn.Mish, nn.Softsign])(), d
    name = r.choice(sorted(VECTOR_FNS))
    return Fn(VECTOR_FNS[name], name), d


def random_model(r: random.Random) -> tuple[nn.Module, tuple[int, ...]]:
    """A random model in eval mode and its input shape (without the batch)."""
    layers: list[nn.Module] = []
    if r.random() < 0.6:
        c, h = r.randint(1, 3), r.randint(3, 7)
        shape: tuple[int, ...] = (c, h, h)
        for _ in range(r.randint(1, 5)):
            block = image_block(r, c, h)
            if block is not None:
                layers.append(block[0])
                c, h = block[1], block[2]
        layers.append(nn.Flatten() if r.random() < 0.7 else Fn(lambda x: x.reshape(x.size(0), -1), "reshape"))
        d = c * h * h
    else:
        d = r.randint(1, 8)
        shape = (d,)
    for _ in range(r.randint(0, 4)):
        block, d = vector_block(r, d)
        layers.append(block)
    layers.append(nn.Linear(d, r.randint(1, 4)))
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(r.uniform(0.5, 2.0))
    return model, shape


# --- sampling ---------------------------------------------------------------------------------------


def pgd_points(fn: Callable, lower: torch.Tensor, upper: torch.Tensor, n_out: int, steps: int = 25) -> torch.Tensor:
    """Per output and direction, a point of the box pushed toward that output's extreme."""
    found = []
    for sign in (1.0, -1.0):
        x = (lower + torch.rand_like(lower) * (upper - lower)).unsqueeze(0).repeat(n_out, *[1] * lower.dim())
        step = (upper - lower) / 6
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            out = fn(x).reshape(n_out, -1)
            (grad,) = torch.autograd.grad((out[torch.arange(n_out), torch.arange(n_out)] * sign).sum(), x)
            x = torch.minimum(torch.maximum(x + step * grad.sign(), lower), upper)
            step = step * 0.85
        found.append(x.detach())
    return torch.cat(found)


def set_points(x: torch.Tensor, b: int, eps: float, norm: float, box: tuple | None, fn: Callable,
               n_out: int) -> torch.Tensor:
    """Points of example ``b``'s input set (see the module doc)."""
    if norm == math.inf:
        lo, hi = x[b] - eps, x[b] + eps
        if box is not None:
            lo, hi = torch.maximum(lo, box[0][b]), torch.minimum(hi, box[1][b])
        u = torch.rand(200, *lo.shape)
        vertices = torch.where(torch.rand(64, *lo.shape) < 0.5, lo, hi)
        return torch.cat([lo + u * (hi - lo), lo[None], hi[None], vertices, pgd_points(fn, lo, hi, n_out)])
    n = x[b].numel()
    dirs = torch.randn(300, n)
    dirs = dirs / dirs.norm(p=norm, dim=1, keepdim=True)
    inside = dirs * torch.rand(300, 1) ** (1 / n)
    vertices = torch.cat([torch.eye(n), -torch.eye(n)]) if norm == 1 else dirs[:0]
    return x[b] + eps * torch.cat([dirs, inside, vertices]).reshape(-1, *x.shape[1:])


def _outside(value: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> float:
    """How far ``value`` lies outside ``[lower, upper]`` beyond the tolerance (0 if inside)."""
    value, lower, upper = value.detach(), lower.detach(), upper.detach()
    tol = TOL * (1 + value.abs())
    gap = torch.maximum(lower - value - tol, value - upper - tol)
    return max(0.0, float(gap.max())) if gap.numel() else 0.0


# --- the kinds ----------------------------------------------------------------------------------------


def graph_case(seed: int) -> str:
    r = random.Random(seed)
    torch.manual_seed(seed)
    model, shape = random_model(r)
    x = torch.randn(r.choice([1, 1, 2]), *shape) * r.choice([0.3, 1.0])
    try:
        graph = boundprop.capture(model, x)
    except NotImplementedError as err:
        return "unsupported: " + " ".join(str(err).split())[:200]
    return check_bounds(r, model, graph, x)


def check_bounds(r: random.Random, model: nn.Module, graph, x: torch.Tensor) -> str:
    """Draw a random input set and specification for ``x`` and check every method's bounds on ``graph``
    (which computes ``model``) at points of the set (see the module doc)."""
    batch = x.shape[0]
    norm = r.choice([math.inf, math.inf, math.inf, 2.0, 1.0])
    eps = r.choice([0.01, 0.1, 0.3, 1.0])
    box = None
    if norm == math.inf and r.random() < 0.3:
        box = (x - r.uniform(0, eps), x + r.uniform(0, eps))
    with torch.no_grad():
        n_out = model(x)[0].numel()
    C = torch.randn(batch, r.randint(1, 3), n_out) if r.random() < 0.4 else None
    ptb = {graph.inputs[0]: PerturbationLpNorm(eps, norm, *(box or (None, None)))}
    results, notes = {}, []
    for method in METHODS:
        try:
            results[method] = compute_bounds(graph, (x,), ptb, method=method, C=C,
                                             opts=ALPHA_OPTS if method == "alpha-CROWN" else None)
        except NotImplementedError as err:
            notes.append(f"{method}: {str(err)[:100]}")
    coeffs = {}
    for method in ("CROWN", "alpha-CROWN", "forward"):
        try:
            coeffs[method] = compute_bounds(graph, (x,), ptb, method=method, C=C, need_A=[graph.inputs[0]],
                                            opts=ALPHA_OPTS if method == "alpha-CROWN" else None)
        except NotImplementedError:
            pass
    bad = set()
    for b in range(batch):
        def spec_fn(z, b=b):
            y = model(z).reshape(z.shape[0], -1)
            return y @ C[b].T if C is not None else y

        pts = set_points(x, b, eps, norm, box, spec_fn, C.shape[1] if C is not None else n_out)
        with torch.no_grad():
            env = evaluate(graph, (pts,))
        y = env[graph.output].reshape(len(pts), -1)
        y = y @ C[b].T if C is not None else y
        for method, res in results.items():
            gap = _outside(y, res.lower[b].reshape(1, -1), res.upper[b].reshape(1, -1))
            if gap:
                bad.add(f"{method} final by {gap:.3g}")
        for method, res in coeffs.items():  # lA . x + lbias <= C y <= uA . x + ubias at every point
            a = res.A[graph.inputs[0]]
            flat = pts.reshape(len(pts), -1)
            lin = [(t[b] if t.shape[0] > 1 else t[0]).reshape(t.shape[1], -1) @ flat.T for t in (a["lA"], a["uA"])]
            ends = [(c[b] if torch.is_tensor(c) and c.dim() > 0 and c.shape[0] > 1 else
                     c[0] if torch.is_tensor(c) and c.dim() > 0 else c) for c in (a["lbias"], a["ubias"])]
            lower = (lin[0] + torch.as_tensor(ends[0]).reshape(-1, 1)).T
            upper = (lin[1] + torch.as_tensor(ends[1]).reshape(-1, 1)).T
            gap = _outside(y, lower, upper)
            if gap:
                bad.add(f"{method} coefficients by {gap:.3g}")
            for name, iv in res.intervals.items():
                v = env.get(name)
                if torch.is_tensor(v) and v.shape[0] == len(pts) and iv.lower.shape[0] == batch \
                        and iv.lower.shape[1:] == v.shape[1:]:
                    gap = _outside(v, iv.lower[b], iv.upper[b])
                    if gap:
                        bad.add(f"{method} {name} by {gap:.3g}")
    if bad:
        return (f"UNSOUND {'; '.join(sorted(bad)[:6])} | norm={norm} eps={eps} box={box is not None} "
                f"C={C is not None} batch={batch} | " + " ".join(str(model).split()))
    return "ok" + (" (" + "; ".join(notes) + ")" if notes else "")


class TwoInputs(nn.Module):
    """``head(combine(f(x), g(y)))`` with ``combine`` a sum, product, concatenation, max or matrix product."""

    def __init__(self, r: random.Random, dx: int, dy: int) -> None:
        super().__init__()
        h = r.randint(2, 6)
        self.f = nn.Sequential(nn.Linear(dx, h), _act(r))
        self.g = nn.Sequential(nn.Linear(dy, h), _act(r))
        self.how = r.choice(["add", "mul", "cat", "max", "outer"])
        width = {"cat": 2 * h, "outer": h * h}.get(self.how, h)
        self.head = nn.Sequential(nn.Linear(width, 4), _act(r), nn.Linear(4, r.randint(1, 3)))

    def forward(self, x, y):
        a, b = self.f(x), self.g(y)
        if self.how == "add":
            z = a + b
        elif self.how == "mul":
            z = a * b
        elif self.how == "cat":
            z = torch.cat([a, b], 1)
        elif self.how == "max":
            z = torch.maximum(a, b)
        else:
            z = (a.unsqueeze(2) @ b.unsqueeze(1)).flatten(1)
        return self.head(z)

    def extra_repr(self) -> str:
        return self.how


def inputs2_case(seed: int) -> str:
    """Two inputs, each perturbed on its own (or one of them fixed)."""
    r = random.Random(seed)
    torch.manual_seed(seed)
    dx, dy, batch = r.randint(1, 4), r.randint(1, 4), r.choice([1, 2])
    model = TwoInputs(r, dx, dy).eval()
    x, y = torch.randn(batch, dx), torch.randn(batch, dy)
    graph = boundprop.capture(model, (x, y))
    eps = (r.choice([0.0, 0.05, 0.3]), r.choice([0.05, 0.3]))
    ptb = {name: PerturbationLpNorm(e) for name, e in zip(graph.inputs, eps) if e > 0}
    results = {}
    for method in METHODS:
        try:
            results[method] = compute_bounds(graph, (x, y), ptb, method=method,
                                             opts=ALPHA_OPTS if method == "alpha-CROWN" else None)
        except NotImplementedError:
            pass
    worst: dict[str, float] = {}
    for i in range(300):
        pick = (lambda t, e: t + e * (2 * (torch.rand_like(t) < 0.5).to(t.dtype) - 1)) if i % 2 else \
            (lambda t, e: t + e * (2 * torch.rand_like(t) - 1))
        with torch.no_grad():
            out = model(pick(x, eps[0]), pick(y, eps[1]))
        for method, res in results.items():
            gap = _outside(out, res.lower, res.upper)
            if gap:
                worst[method] = max(worst.get(method, 0.0), gap)
    if worst:
        return f"UNSOUND {worst} | eps={eps} | " + " ".join(str(model).split())
    return "ok"


def small_model(r: random.Random, conv_share: float, strided: bool,
                conv_outputs: tuple[int, int]) -> tuple[nn.Module, tuple[int, ...]]:
    """A conv-activation-linear CNN (with probability ``conv_share``) or a 1-3 layer MLP, with ReLU,
    tanh, sigmoid or leaky ReLU: ``(model, input shape)``."""
    acts = [nn.ReLU, nn.Tanh, nn.Sigmoid, lambda: nn.LeakyReLU(0.2)]
    if r.random() < conv_share:
        c, h = r.randint(1, 2), r.randint(3, 5)
        stride = r.choice([1, 2]) if strided else 1
        layers = [nn.Conv2d(c, 2, 3, padding=1, stride=stride), r.choice(acts)(), nn.Flatten()]
        shape: tuple[int, ...] = (c, h, h)
        with torch.no_grad():
            width = nn.Sequential(*layers)(torch.zeros(1, *shape)).shape[1]
        layers.append(nn.Linear(width, r.randint(*conv_outputs)))
    else:
        d = r.randint(1, 5)
        shape, layers, width = (d,), [], d
        for _ in range(r.randint(1, 3)):
            o = r.randint(2, 6)
            layers += [nn.Linear(width, o), r.choice(acts)()]
            width = o
        layers.append(nn.Linear(width, r.randint(1, 3)))
    return nn.Sequential(*layers).eval(), shape


def weights_case(seed: int) -> str:
    from boundprop.perturbation import perturb_parameters

    r = random.Random(seed)
    torch.manual_seed(seed)
    model, shape = small_model(r, 0.4, strided=False, conv_outputs=(2, 5))
    batch = r.choice([1, 2])
    x = torch.randn(batch, *shape)
    graph = boundprop.capture(model, x)
    names = [n for n, _ in model.named_parameters()]
    chosen = r.sample(names, r.randint(1, min(3, len(names))))
    norm, eps = r.choice([math.inf, math.inf, 2.0]), r.choice([0.01, 0.1, 0.5])
    relative = norm == math.inf and r.random() < 0.3
    ptbs = perturb_parameters(graph, {n: eps for n in chosen}, relative=relative, norm=norm)
    x_eps = r.choice([0.01, 0.1]) if r.random() < 0.4 else 0.0
    if x_eps:
        ptbs[graph.inputs[0]] = PerturbationLpNorm(x_eps)
    results = {m: compute_bounds(graph, (x,), ptbs, method=m, opts=ALPHA_OPTS)
               for m in ("IBP", "CROWN-IBP", "CROWN", "alpha-CROWN")}
    base = graph.param_values()
    leaf = {graph.qualname(k): k for k in base}
    bad = set()
    for i in range(120):
        params = dict(base)
        for n in chosen:
            w = base[leaf[n]]
            if norm == math.inf:
                radius = eps * w.abs() if relative else torch.full_like(w, eps)
                u = torch.rand_like(w) if i % 2 else (torch.rand_like(w) < 0.5).to(w.dtype)
                params[leaf[n]] = w + (2 * u - 1) * radius
            else:
                d = torch.randn_like(w)
                params[leaf[n]] = w + d / d.norm() * eps * (float(torch.rand(())) ** (1 / w.numel()) if i % 2 else 1)
        xi = x
        if x_eps:
            u = (torch.rand_like(x) < 0.5).to(x.dtype) if i % 3 == 0 else torch.rand_like(x)
            xi = x + x_eps * (2 * u - 1)
        with torch.no_grad():
            y = evaluate(graph, (xi,), params)[graph.output]
        for method, res in results.items():
            gap = _outside(y, res.lower.detach(), res.upper.detach())
            if gap:
                bad.add(f"{method} by {gap:.3g}")
    if bad:
        return (f"UNSOUND {'; '.join(sorted(bad))} | {chosen} norm={norm} eps={eps} relative={relative} "
                f"x_eps={x_eps} | " + " ".join(str(model).split()))
    return "ok"


def jacobian_case(seed: int) -> str:
    from boundprop.algorithms.jacobian import jacobian_bounds

    r = random.Random(seed)
    torch.manual_seed(seed)
    model, shape = small_model(r, 0.35, strided=True, conv_outputs=(1, 3))
    batch, eps = r.choice([1, 2]), r.choice([0.01, 0.1, 0.5])
    norm, method = r.choice([math.inf, math.inf, 2.0]), r.choice(["IBP", "CROWN"])
    x = torch.randn(batch, *shape)
    jb = jacobian_bounds(model, x, PerturbationLpNorm(eps, norm), method=method)
    worst = 0.0
    for b in range(batch):
        for i in range(60):
            if norm == math.inf:
                u = torch.rand(shape) if i % 2 else (torch.rand(shape) < 0.5).to(x.dtype)
                xi = x[b] + eps * (2 * u - 1)
            else:
                d = torch.randn(shape)
                xi = x[b] + eps * d / d.norm() * (float(torch.rand(())) if i % 2 else 1)
            J = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0))[0], xi)
            worst = max(worst, _outside(J, jb.lower[b], jb.upper[b]))
    return f"UNSOUND by {worst:.3g} | {method} norm={norm} eps={eps} | " + " ".join(str(model).split()) if worst \
        else "ok"


def dense_layers(model: nn.Sequential, shape: tuple[int, ...]) -> list[tuple]:
    """The affine layers of a ReLU network as dense ``(W, b)`` (numpy; a convolution applied to the
    identity gives its matrix), for the MILP oracle."""
    layers = []
    with torch.no_grad():
        for m in model:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                n = math.prod(shape)
                if isinstance(m, nn.Linear):
                    shape = (n,)
                basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
                b = m(torch.zeros(1, *shape, dtype=torch.float64))
                W = (m(basis) - b).reshape(n, -1).T
                layers.append((W.numpy(), b.flatten().numpy()))
                shape = tuple(b.shape[1:])
    return layers


def verifier_case(seed: int, relu_split: bool = False) -> str:
    """A random small ReLU network and a property whose answer the MILP knows. ``relu_split``: the
    verifier splits ReLUs whatever the number of inputs (the beta-CROWN search)."""
    from test_oracles import MLPProgram

    from boundprop.bab.verifier import VerifierOptions, verify
    from boundprop.spec.vnnlib import parse_vnnlib

    r = random.Random(seed)
    torch.manual_seed(seed)
    n_out = r.randint(1, 3)
    if r.random() < 0.3:  # a small CNN (its convolution is a dense layer for the MILP)
        c, size = r.randint(1, 2), r.randint(3, 4)
        shape: tuple[int, ...] = (c, size, size)
        layers = [nn.Conv2d(c, r.randint(1, 3), r.choice([2, 3]), r.choice([1, 2]), r.choice([0, 1])), nn.ReLU(),
                  nn.Flatten()]
        with torch.no_grad():
            width = nn.Sequential(*layers)(torch.zeros(1, *shape)).shape[1]
    else:
        shape, layers = (r.randint(1, 5),), []
        width = shape[0]
    for _ in range(r.randint(0 if layers else 1, 2 if layers else 3)):
        h = r.randint(2, 12)
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    model = nn.Sequential(*layers, nn.Linear(width, n_out)).float().eval()
    n_in = math.prod(shape)
    x0 = torch.rand(n_in, dtype=torch.float32) * 2 - 1
    eps = r.choice([0.05, 0.2, 0.5, 1.0])
    lo, hi = x0 - eps, x0 + eps
    exact = copy.deepcopy(model).double()
    xd = x0.double().reshape(1, *shape)
    graph = boundprop.capture(exact, xd)
    with torch.no_grad():
        res = compute_bounds(graph, (xd,), {graph.inputs[0]: PerturbationLpNorm(eps)}, method="IBP")
    names = [n.args[0].name for n in graph.nodes if n.target == torch.ops.aten.relu.default]
    bounds = [(res.intervals[n].lower[0].flatten().numpy() - 1e-6, res.intervals[n].upper[0].flatten().numpy() + 1e-6)
              for n in names]
    program = MLPProgram(dense_layers(exact, shape), lo.double().numpy(), hi.double().numpy(), bounds, True)
    terms, checks, sat = [], [], False
    for j in r.sample(range(n_out), r.randint(1, n_out)):
        smallest = r.random() < 0.5
        try:
            opt, _ = program.optimum(j, 1.0 if smallest else -1.0)
        except AssertionError as err:  # HiGHS sometimes fails on a badly scaled program
            return f"skipped: the MILP oracle failed ({err})"
        delta = r.choice([-0.05, -0.003, 0.003, 0.05]) * (1 + abs(opt))
        terms.append(f"({'<=' if smallest else '>='} Y_{j} {opt + delta:.9f})")
        checks.append((j, smallest, float(f"{opt + delta:.9f}")))
        sat |= delta > 0 if smallest else delta < 0
    text = "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in))
    text += "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_out))
    text += "".join(f"(assert (>= X_{i} {float(lo[i]):.9f}))\n(assert (<= X_{i} {float(hi[i]):.9f}))\n"
                    for i in range(n_in))
    text += f"(assert (or {' '.join(f'(and {t})' for t in terms)}))\n" if len(terms) > 1 else f"(assert {terms[0]})\n"
    options = VerifierOptions(max_input_split_dims=0) if relu_split else None
    out = verify(model, parse_vnnlib(text), timeout=30, input_shape=(1, *shape), options=options)
    if out.verdict in ("timeout", "unknown") or (out.verdict == "sat") == sat:
        return f"ok ({out.verdict})"
    if out.verdict == "sat":  # the MILP says none exists: check the counterexample here, in float64
        cex = out.counterexample[0].double().flatten()
        with torch.no_grad():
            y = exact(cex.reshape(1, *shape))[0]
        inside = bool(((cex >= lo.double() - 1e-9) & (cex <= hi.double() + 1e-9)).all())
        if inside and any(y[j] <= v if smallest else y[j] >= v for j, smallest, v in checks):
            return "ORACLE WRONG: the MILP missed the counterexample the verifier found (checked here)"
    return f"WRONG {out.verdict}, expected {'sat' if sat else 'unsat'}\n{text}"


def _onnx_kind(name: str) -> Callable[[int], str]:
    """A kind from :mod:`fuzz_onnx` (imported on first use: it imports this module)."""
    def case(seed: int) -> str:
        import fuzz_onnx

        return getattr(fuzz_onnx, name)(seed)

    return case


KINDS: dict[str, Callable[[int], str]] = {"graph": graph_case, "onnx": _onnx_kind("onnx_case"),
                                          "onnxops": _onnx_kind("onnx_ops_case"), "inputs2": inputs2_case,
                                          "weights": weights_case, "jacobian": jacobian_case,
                                          "verifier": verifier_case,
                                          "verifier_split": lambda seed: verifier_case(seed, relu_split=True)}


def run(kind: str, seed: int) -> str:
    """One seed of one kind, in float64 (the verifier's models and the ONNX exports are float32); never
    raises."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if kind in ("verifier", "verifier_split", "onnx", "onnxops") else torch.float64)
    try:
        return KINDS[kind](seed)
    except Exception as err:  # noqa: BLE001 - a crash is a finding, reported with its traceback
        return f"CRASH {type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"
    finally:
        torch.set_default_dtype(default)


def main() -> None:
    kind, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    for seed in range(first, first + count):
        print(f"[{kind} {seed}] {run(kind, seed)}", flush=True)


if __name__ == "__main__":
    main()
