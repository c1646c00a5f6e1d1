"""Loss fusion: CrossEntropyWrapper's value, soundness and stability of the fused robust-CE bound."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import boundprop
from boundprop import BoundedModule, BoundedTensor, PerturbationLpNorm, capture, compute_bounds
from boundprop.spec import margin_matrix
from boundprop.training import CrossEntropyWrapper, CrossEntropyWrapperMultiInput, fused_bounds, fused_robust_ce
from boundprop.training.fusion import match_loss_fusion
from boundprop.training.losses import margin_robust_ce, pgd_attack

K = 5
DIM = 6
METHODS = ("IBP", "CROWN-IBP", "CROWN")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, K))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = _mlp()
    x = torch.rand(4, DIM)
    y = torch.tensor([0, 1, 2, 4])
    fused = capture(CrossEntropyWrapper(model), (x, y))
    plain = capture(model, x)
    return model, fused, plain


def _reset(model: nn.Module, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _samples(model, x, y, eps, n=256, seed=0):
    """Random points, the box corners nearest the gradient sign, and PGD-pushed points (max CE)."""
    gen = torch.Generator().manual_seed(seed)
    pts = [x + eps * (torch.rand((n, *x.shape), generator=gen) * 2 - 1)]
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    pts.append((x + eps * g.sign()).unsqueeze(0))
    noise = torch.rand(x.shape, generator=gen) * 2 - 1
    pts.append(pgd_attack(model, x, y, eps, steps=20, clip_min=None, clip_max=None, noise=noise).unsqueeze(0))
    return torch.cat(pts)  # (m, batch, DIM)


def _max_ce(model, pts, y):
    with torch.no_grad():
        return torch.stack([F.cross_entropy(model(p), y, reduction="none") for p in pts]).amax(0)


def test_wrapper_value_is_exp_ce():
    torch.manual_seed(1)
    model = _mlp()
    x, y = torch.randn(7, DIM), torch.randint(0, K, (7,))
    out = CrossEntropyWrapper(model)(x, y)
    assert out.shape == (7, 1)
    expected = torch.exp(F.cross_entropy(model(x), y, reduction="none")).unsqueeze(1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(CrossEntropyWrapperMultiInput(model)(y, x), out)
    assert boundprop.CrossEntropyWrapper is CrossEntropyWrapper


def test_pattern_matched(setup):
    _, fused, plain = setup
    pattern = match_loss_fusion(fused)
    assert pattern is not None and pattern.output == fused.output
    assert match_loss_fusion(plain) is None


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([1e-7, 0.01, 0.1, 0.5, 2.0]),
       scale=st.sampled_from([0.3, 1.0, 3.0]))
def test_fused_bound_is_sound(setup, seed, eps, scale):
    model, fused, plain = setup
    _reset(model, seed, scale)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(4, DIM, generator=gen)
    y = torch.randint(0, K, (4,), generator=gen)
    pts = _samples(model, x, y, eps, seed=seed)
    worst = _max_ce(model, pts, y)
    with torch.no_grad():
        g_max = torch.stack([CrossEntropyWrapper(model)(p, y) for p in pts]).amax(0).reshape(-1)
    ptb = PerturbationLpNorm(eps=eps)
    for method in METHODS:
        res = fused_bounds(fused, (x, y), {fused.inputs[0]: ptb}, method)
        log_ub = res.log_ub.reshape(-1)
        assert torch.isfinite(log_ub).all()
        assert (log_ub >= worst - 1e-4 * (1 + worst.abs())).all(), (method, log_ub, worst)
        ub = res.ub.reshape(-1)
        assert (ub >= g_max * (1 - 1e-4)).all(), (method, ub, g_max)
        # the unfused (margin) robust CE is a valid bound too
        C = margin_matrix(y, K)
        lb = compute_bounds(plain, (x,), {plain.inputs[0]: ptb}, method, C, upper=False).lower
        unfused = margin_robust_ce(lb)
        assert (unfused >= worst - 1e-4 * (1 + worst.abs())).all()
        if method == "IBP":  # elided IBP of the fused graph = IBP with C merged into the last layer
            torch.testing.assert_close(log_ub, unfused, rtol=1e-4, atol=1e-4)


def test_fused_tighter_than_generic_and_crown_tighter_than_ibp(setup):
    model, fused, _ = setup
    _reset(model, 3, 1.0)
    x, y = torch.rand(4, DIM), torch.tensor([0, 1, 2, 3])
    ptb = PerturbationLpNorm(eps=0.1)
    ibp = fused_bounds(fused, (x, y), {"x": ptb}, "IBP").log_ub
    crown_ibp = fused_bounds(fused, (x, y), {"x": ptb}, "CROWN-IBP").log_ub
    crown = fused_bounds(fused, (x, y), {"x": ptb}, "CROWN").log_ub
    assert (crown_ibp <= ibp + 1e-5).all() and (crown <= ibp + 1e-5).all()
    generic = compute_bounds(fused, (x, y), {"x": ptb}, "IBP", upper=True, lower=False).upper
    assert (ibp <= torch.log(generic) + 1e-5).all()


def test_large_eps_does_not_overflow(setup):
    model, fused, plain = setup
    _reset(model, 5, 3.0)
    x, y = torch.rand(4, DIM), torch.tensor([0, 1, 2, 3])
    ptb = PerturbationLpNorm(eps=200.0)
    generic = compute_bounds(fused, (x, y), {"x": ptb}, "IBP", lower=False).upper
    assert torch.isinf(generic).any()  # exp overflows without the shift
    for method in METHODS:
        res = fused_bounds(fused, (x, y), {"x": ptb}, method)
        assert torch.isfinite(res.log_ub).all() and (res.log_ub > 88).all()
        torch.testing.assert_close(res.log_ub, torch.log(res.ub_shifted) + res.shift)
        # IBP: the fused loss equals the margin one, computed there with a stable logsumexp
        if method == "IBP":
            lb = compute_bounds(plain, (x,), {plain.inputs[0]: ptb}, "IBP", margin_matrix(y, K), upper=False).lower
            torch.testing.assert_close(res.log_ub.reshape(-1), margin_robust_ce(lb), rtol=1e-4, atol=1e-3)


def test_fused_gradients(setup):
    model, fused, _ = setup
    _reset(model, 7, 1.0)
    x, y = torch.rand(4, DIM), torch.tensor([0, 1, 2, 3])
    for method in METHODS:
        model.zero_grad()
        fused_bounds(fused, (x, y), {"x": PerturbationLpNorm(eps=0.05)}, method).log_ub.mean().backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_bounded_module_loss_fusion(setup):
    model, _, _ = setup
    _reset(model, 11, 1.0)
    x, y = torch.rand(3, DIM), torch.tensor([4, 0, 2])
    lirpa = BoundedModule(CrossEntropyWrapper(model), (x, y), bound_opts={"loss_fusion": True})
    ptb = PerturbationLpNorm(eps=0.05)
    lb, ub = lirpa.compute_bounds(x=(BoundedTensor(x, ptb), y), method="CROWN-IBP", bound_lower=False)
    assert lb is None and ub.shape == (3, 1)
    torch.testing.assert_close(torch.log(ub), lirpa.fused_bound.log_ub)
    loss = fused_robust_ce(lirpa, (BoundedTensor(x, ptb), y), method="CROWN-IBP")
    torch.testing.assert_close(loss, lirpa.fused_bound.log_ub.mean())
    loss.backward()
    assert model[0].weight.grad is not None
    # the forward pass of the fused module is the wrapper's value
    torch.testing.assert_close(lirpa(x, y), CrossEntropyWrapper(model)(x, y))
    # both sides: the lower bound comes from the generic engine and is below the value
    lb, ub = lirpa.compute_bounds(x=(BoundedTensor(x, ptb), y), method="IBP")
    value = CrossEntropyWrapper(model)(x, y)
    assert (lb <= value + 1e-5).all() and (ub >= value - 1e-5).all()


def test_multi_input_wrapper():
    torch.manual_seed(2)

    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, K), nn.Linear(2, K)

        def forward(self, u, v):
            return self.a(u) + torch.relu(self.b(v))

    model = TwoIn()
    u, v, y = torch.rand(4, 3), torch.rand(4, 2), torch.tensor([0, 1, 2, 3])
    lirpa = BoundedModule(CrossEntropyWrapperMultiInput(model), (y, u, v), bound_opts={"loss_fusion": True})
    ptb = PerturbationLpNorm(eps=0.1)
    _, ub = lirpa.compute_bounds(x=(y, BoundedTensor(u, ptb), BoundedTensor(v, ptb)), method="CROWN-IBP",
                                 bound_lower=False)
    assert lirpa.fused_bound is not None
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        du = (torch.rand(u.shape, generator=gen) * 2 - 1) * 0.1
        dv = (torch.rand(v.shape, generator=gen) * 2 - 1) * 0.1
        value = CrossEntropyWrapperMultiInput(model)(y, u + du, v + dv)
        assert (value <= ub * (1 + 1e-5)).all()
    assert math.isfinite(float(ub.sum()))


# ------------------------------------------------------------------------------------------------
# cost structure of the fused path: the elided radius, the exp chord, one specification row


@pytest.mark.parametrize("direct", [True, False])
def test_elided_radius_matches_dense_formula(monkeypatch, direct):
    from boundprop.training import fusion

    monkeypatch.setattr(fusion, "ELIDED_DIRECT_ELEMENTS", 10**9 if direct else 0)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 5, dtype=torch.float64, generator=gen).requires_grad_(True)
    rad = torch.rand(9, 5, dtype=torch.float64, generator=gen).requires_grad_(True)
    labels = torch.tensor([3, 0, 3, 6, 6, 6, 1, 0, 2])
    out = fusion.elided_radius(weight, rad, labels)
    dense = torch.einsum("bki,bi->bk", (weight.unsqueeze(0) - weight[labels].unsqueeze(1)).abs(), rad)
    torch.testing.assert_close(out, dense)
    assert (out[torch.arange(9), labels] == 0).all()
    if not direct:  # the label-by-label autograd function: analytic against numerical gradients
        assert torch.autograd.gradcheck(lambda w, r: fusion.elided_radius(w, r, labels), (weight, rad))


def test_fused_crown_ibp_uses_one_spec_row_and_no_intermediate_crown(setup, monkeypatch):
    """CROWN-IBP with fusion: one backward walk with ONE row; no K-row spec, no CROWN intermediate bounds."""
    from boundprop.training import fusion

    model, fused, _ = setup
    _reset(model, 13, 1.0)
    calls = []
    real_backward = fusion.backward

    def spy(state, start, C, *args, **kwargs):
        calls.append(tuple(C.shape))
        return real_backward(state, start, C, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("fused CROWN-IBP must not compute K-row specs or CROWN intermediate bounds")

    monkeypatch.setattr(fusion, "backward", spy)
    monkeypatch.setattr(fusion, "refine_intermediate", refuse)
    monkeypatch.setattr(fusion, "_diff_spec", refuse)
    x, y = torch.rand(4, DIM), torch.tensor([0, 1, 2, 4])
    fused_bounds(fused, (x, y), {"x": PerturbationLpNorm(eps=0.05)}, "CROWN-IBP")
    assert calls == [(4, 1, K)]


def test_fused_crown_ibp_matches_registered_exp_rule(setup):
    """The lean chord gives the bound the registered exp relaxation (the generic machinery) gives."""
    from boundprop.rules import rules_for
    from boundprop.rules.registry import RelaxCall
    from boundprop.training import fusion

    model, fused, _ = setup
    for seed, eps in ((17, 0.02), (19, 0.1), (23, 0.5)):
        _reset(model, seed, 1.0)
        x, y = torch.rand(4, DIM), torch.tensor([0, 1, 2, 4])
        res = fused_bounds(fused, (x, y), {"x": PerturbationLpNorm(eps=eps)}, "CROWN-IBP")
        low, high = res.z.lower - res.shift, res.z.upper - res.shift
        relax = rules_for(torch.ops.aten.exp.default).relaxation(low, high, RelaxCall(direction="upper"))
        slope, offset = fusion.exp_chord(low, high)
        torch.testing.assert_close(slope, relax.uw.expand_as(low), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(offset, relax.ub.expand_as(low), rtol=1e-4, atol=1e-5)


def _intervals():
    lows = [-1e4, -300.0, -50.0, -3.0, -1.0, -1e-3, 0.0]
    widths = [0.0, 1e-7, 1e-4, 5e-3, 1e-2, 0.3, 2.0, 40.0, 1e4]
    pairs = [(lo, lo + w) for lo in lows for w in widths]
    return [(lo, hi) for lo, hi in pairs if hi <= 0.0] + [(-math.inf, -2.0), (-math.inf, 0.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_chord_is_sound(dtype):
    from boundprop.training.fusion import exp_chord

    low, high = (torch.tensor(v, dtype=dtype) for v in zip(*_intervals()))
    slope, offset = exp_chord(low, high)
    assert torch.isfinite(slope).all() and torch.isfinite(offset).all()
    t = torch.linspace(0, 1, 2001, dtype=torch.float64).unsqueeze(1)
    lo64 = torch.where(torch.isinf(low), high - 1e6, low).to(torch.float64)  # stands in for -inf
    pts = (lo64 + t * (high.to(torch.float64) - lo64)).to(dtype).to(torch.float64)  # points of the interval
    pts = torch.minimum(torch.maximum(pts, lo64), high.to(torch.float64))
    line = slope.to(torch.float64) * pts + offset.to(torch.float64)
    assert (line >= torch.exp(pts)).all()
    # tight: at most a little above the true chord's largest gap (float32: rounding slack)
    finite = torch.isfinite(low)
    gap_ends = torch.maximum(line[0] - torch.exp(pts[0]), line[-1] - torch.exp(pts[-1]))[finite]
    assert (gap_ends <= 1e-4 * (1 + torch.exp(high[finite].to(torch.float64)))).all()


def test_exp_chord_gradients_finite_on_narrow_intervals():
    from boundprop.training.fusion import exp_chord

    low = torch.tensor([-2.0, -2.0, -2.0, -1e-3, -30.0], dtype=torch.float64, requires_grad=True)
    width = torch.tensor([0.0, 1e-9, 5e-3, 1e-3, 29.0], dtype=torch.float64)
    slope, offset = exp_chord(low, low + width)
    (slope.sum() + offset.sum()).backward()
    assert torch.isfinite(low.grad).all()
    # the slope is continuous across the Taylor / chord switch at width 1e-2
    f64 = dict(dtype=torch.float64)
    a, _ = exp_chord(torch.tensor([-1.0, -1.0], **f64), torch.tensor([-1 + 0.01 - 1e-12, -0.99], **f64))
    assert abs(float(a[0] - a[1])) < 1e-9
