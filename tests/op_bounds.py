"""Op-level soundness oracle: one-node graphs built by hand (no capture), checked by sampling.

``check_op(graph, fn, x, radius)`` bounds ``C fn(x')`` over the box ``x +- radius`` with every
method asked for and a random specification ``C``, and checks the bounds against the box's corners
(or random corners), its centre and uniform samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from boundprop import PerturbationLpNorm, compute_bounds
from boundprop.graph.ir import Graph, Node, ParamSource


def one_node_graph(target, args: tuple, params: dict[str, torch.Tensor] | None = None) -> Graph:
    """``y = target(*args)`` with input ``Ref("x")`` and constant parameters by name."""
    sources = {name: ParamSource(name, "constant", value) for name, value in (params or {}).items()}
    return Graph((Node("y", target, args),), ("x",), sources, "y")


def box_samples(lower: torch.Tensor, upper: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Centre, all corners (or 256 random ones) and ``n`` uniform points of one box (no batch dim)."""
    pts = [(lower + upper) / 2, lower, upper]
    if lower.numel() <= 8:
        for bits in itertools.product((0, 1), repeat=lower.numel()):
            mask = torch.tensor(bits, dtype=torch.bool).reshape(lower.shape)
            pts.append(torch.where(mask, upper, lower))
    else:
        mask = torch.rand((256, *lower.shape), generator=gen) < 0.5
        pts.extend(torch.where(mask, upper, lower))
    u = torch.rand((n, *lower.shape), generator=gen, dtype=lower.dtype)
    pts.extend(lower + u * (upper - lower))
    return torch.stack(pts)


def check_op(graph: Graph, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, radius: torch.Tensor,
             methods: Sequence[str] = ("IBP", "CROWN"), n_spec: int = 3, n_samples: int = 512, seed: int = 0,
             tol: float = 1e-4, opts: dict | None = None) -> dict:
    """Bounds of ``C fn`` by each method contain ``C fn(x')`` at sampled ``x'`` of the box; no NaN."""
    gen = torch.Generator().manual_seed(seed)
    out_shape = fn(x).shape[1:]
    C = torch.randn((x.shape[0], n_spec, *out_shape), generator=gen, dtype=x.dtype)
    ptb = {"x": PerturbationLpNorm(radius)}
    results = {m: compute_bounds(graph, (x,), ptb, method=m, C=C, opts=opts) for m in methods}
    flat_C = C.reshape(C.shape[0], n_spec, -1)  # also for one output entry per example (shape ())
    for b in range(x.shape[0]):
        pts = box_samples(x[b] - radius[b], x[b] + radius[b], n_samples, gen)
        with torch.no_grad():
            vals = fn(pts).reshape(len(pts), -1) @ flat_C[b].T  # (points, spec)
        scale = tol * (1 + vals.abs() + pts.flatten(1).abs().amax(1, keepdim=True) * 1e-2)
        for method, res in results.items():
            lo, hi = res.lower[b], res.upper[b]
            assert not torch.isnan(lo).any() and not torch.isnan(hi).any(), f"{method}: NaN bound"
            assert bool((vals >= lo - scale).all()), f"{method}: below lower by {float((lo - vals).max())}"
            assert bool((vals <= hi + scale).all()), f"{method}: above upper by {float((vals - hi).max())}"
    return results


def random_box(shape: Sequence[int], seed: int, scale_exp: float, degenerate: bool,
               center_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A centre and radius: radius ``~ 10**scale_exp``, some entries exactly zero if ``degenerate``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=gen) * center_scale
    radius = torch.rand(tuple(shape), generator=gen) * 10.0 ** scale_exp
    if degenerate:
        radius = torch.where(torch.rand(tuple(shape), generator=gen) < 0.4, torch.zeros_like(radius), radius)
    return x, radius
