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
