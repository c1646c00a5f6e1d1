"""PerturbationL0Norm: exact concretisation (checked by enumerating subsets), interval, whole-model soundness."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import boundprop
from boundprop import BoundedModule, BoundedTensor, PerturbationL0Norm, compute_bounds

ROOT = Path(__file__).resolve().parents[1]


def brute_force(x, A, k, x_L, x_U, ratio, sign):
    """min/max of ``A . x'`` over every subset of at most ``k`` entries, each moved to an end of its range.

    (A linear function over the box of the chosen entries is extreme at a vertex.)
    """
    n = x.numel()
    lo = x + ratio * (x_L - x)
    hi = x + ratio * (x_U - x)
    best = None
    for size in range(min(k, n) + 1):
        for subset in itertools.combinations(range(n), size):
            for ends in itertools.product((0, 1), repeat=size):
                xp = x.clone()
                for j, e in zip(subset, ends):
                    xp[j] = hi[j] if e else lo[j]
                val = A @ xp
                best = val if best is None else (torch.minimum(best, val) if sign < 0 else torch.maximum(best, val))
    return best


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), eps=st.floats(0, 6.5), ratio=st.sampled_from([1.0, 0.5]),
       custom_box=st.booleans())
def test_concretize_equals_enumeration(seed, n, eps, ratio, custom_box):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2, n, generator=gen, dtype=torch.float64)
    A = torch.randn(2, 3, n, generator=gen, dtype=torch.float64)
    if custom_box:
        x_L = x - torch.rand(2, n, generator=gen, dtype=torch.float64)
        x_U = x + torch.rand(2, n, generator=gen, dtype=torch.float64) * 2
        ptb = PerturbationL0Norm(eps, x_L, x_U, ratio)
    else:
        x_L, x_U = torch.zeros_like(x), torch.ones_like(x)
        ptb = PerturbationL0Norm(eps, ratio=ratio)
    k = int(-(-eps // 1))
    for sign in (-1, 1):
        got = ptb.concretize(x, A, sign)
        for b in range(2):
            want = brute_force(x[b], A[b], k, x_L[b], x_U[b], ratio, sign)
            assert torch.allclose(got[b], want, atol=1e-9), (sign, got[b], want)


def test_interval_contains_every_point_and_k_zero_is_a_point():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 2, generator=gen) * 1.4 - 0.2  # some entries outside [0, 1]
    box = PerturbationL0Norm(1).interval(x)
    assert (box.lower <= x).all() and (box.upper >= x).all()
    assert (box.lower <= torch.minimum(x, torch.zeros_like(x))).all()
    assert (box.upper >= torch.maximum(x, torch.ones_like(x))).all()
    zero = PerturbationL0Norm(0).interval(x)
    assert torch.equal(zero.lower, x) and torch.equal(zero.upper, x)
    A = torch.randn(3, 4, 2, 2, generator=gen)
    assert torch.allclose(PerturbationL0Norm(0).concretize(x, A, -1), (A.flatten(2) @ x.reshape(3, 4, 1)).squeeze(-1))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2)
        self.fc1 = nn.Linear(2 * 2 * 2, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    return model, x, boundprop.capture(model, x)


@pytest.mark.parametrize("eps,delta", [(1, 1.0), (2, 1.0), (2, 0.3), (9, 0.1)])
def test_model_bounds_sound_by_enumerating_subsets(tiny, eps, delta):
    """For every subset of at most k pixels: its vertices and random points of its box are in the bounds."""
    model, x, g = tiny
    x_L, x_U = (x - delta).clamp(min=0), (x + delta).clamp(max=1)
    ptb = PerturbationL0Norm(eps, x_L, x_U)
    results = {m: compute_bounds(g, (x,), {g.inputs[0]: ptb}, method=m)
               for m in ("IBP", "CROWN-IBP", "CROWN", "alpha-CROWN", "forward")}
    gen = torch.Generator().manual_seed(2)
    n = x[0].numel()
    for b in range(x.shape[0]):
        pts = []
        for size in range(min(eps, n) + 1):
            for subset in itertools.combinations(range(n), size):
                idx = list(subset)
                count = 2 ** size if size <= 3 else 8
                for t in range(count + 2):
                    xp = x[b].flatten().clone()
                    if t < count and size <= 3:
                        u = torch.tensor([(t >> i) & 1 for i in range(size)], dtype=x.dtype)
                    else:
                        u = torch.rand(size, generator=gen)
                    lo, hi = x_L[b].flatten()[idx], x_U[b].flatten()[idx]
                    xp[idx] = lo + u * (hi - lo)
                    pts.append(xp.reshape(x.shape[1:]))
        with torch.no_grad():
            y = model(torch.stack(pts))
        for m, r in results.items():
            assert (r.lower[b] <= y + 1e-5).all(), m
            assert (r.upper[b] >= y - 1e-5).all(), m
    # the budget matters: CROWN with L0 is tighter than CROWN on the whole box
    box = compute_bounds(g, (x,), {g.inputs[0]: boundprop.PerturbationLpNorm(x_L=x_L, x_U=x_U)}, method="CROWN")
    if eps < n:
        width_l0 = (results["CROWN"].upper - results["CROWN"].lower).mean()
        assert width_l0 < (box.upper - box.lower).mean()


def test_compat_bounded_tensor(tiny):
    model, x, g = tiny
    net = BoundedModule(model, x)
    lb, ub = net.compute_bounds(x=(BoundedTensor(x, PerturbationL0Norm(1)),), method="CROWN")
    res = compute_bounds(g, (x,), {g.inputs[0]: PerturbationL0Norm(1)}, method="CROWN")
    assert torch.allclose(lb, res.lower) and torch.allclose(ub, res.upper)


def test_example_runs():
    spec = importlib.util.spec_from_file_location("l0_example", ROOT / "examples" / "l0_perturbation.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = example.main(["--n", "4", "--k", "1", "--delta", "0.2", "--methods", "IBP", "CROWN"])
    (row,) = report["rows"]
    assert row["verified"]["CROWN"] + row["attacked"] <= row["n"]
    assert row["verified"]["IBP"] <= row["verified"]["CROWN"]
