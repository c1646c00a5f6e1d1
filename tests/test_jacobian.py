"""jacobian_bounds / local Lipschitz constants, checked against Jacobians at sampled points of the set."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import boundprop
from boundprop import PerturbationLpNorm, jacobian_bounds

ROOT = Path(__file__).resolve().parents[1]


def smooth_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 6), nn.LeakyReLU(0.1),
                         nn.Linear(6, 3), nn.Sigmoid()).eval()


class ResCNN(nn.Module):
    """conv-BN-ReLU, a residual branch with constant scalings, average pooling, a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 2 * 2, 2)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = h + 0.5 * torch.relu(self.conv2(h)) - h / 4
        h = nn.functional.avg_pool2d(h, 2)
        return self.fc(-h.flatten(1))


def res_cnn() -> nn.Module:
    torch.manual_seed(1)
    model = ResCNN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
        model.bn.weight.uniform_(-1, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def nets():
    out = {}
    for name, make, shape in (("mlp", smooth_mlp, (3, 4)), ("cnn", res_cnn, (2, 1, 4, 4))):
        model = make()
        for p in model.parameters():
            p.requires_grad_(False)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        out[name] = (model, x, boundprop.capture(model, x))
    return out


def jacobians(model, xs: torch.Tensor) -> torch.Tensor:
    f = lambda v: model(v.unsqueeze(0)).squeeze(0)
    return torch.func.vmap(torch.func.jacrev(f))(xs)


def points(x: torch.Tensor, eps: float, n: int, gen) -> torch.Tensor:
    """Random points and random vertices of the L-inf ball around each example: ``(n, *x.shape)``."""
    u = torch.rand(n, *x.shape, generator=gen) * 2 - 1
    u[::2] = u[::2].sign()
    return x.unsqueeze(0) + eps * u


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_sampled_jacobians_within_bounds(nets, net, eps):
    model, x, g = nets[net]
    ptb = PerturbationLpNorm(eps)
    bounds = {m: jacobian_bounds(g, x, ptb, method=m) for m in ("IBP", "CROWN")}
    gen = torch.Generator().manual_seed(0)
    for xs in points(x, eps, 40, gen):
        J = jacobians(model, xs)
        for m, jb in bounds.items():
            assert jb.lower.shape == J.shape
            assert (jb.lower <= J + 1e-5).all(), m
            assert (jb.upper >= J - 1e-5).all(), m
    ibp, crown = bounds["IBP"], bounds["CROWN"]
    assert (crown.upper - crown.lower).mean() <= (ibp.upper - ibp.lower).mean() + 1e-6


def test_tiny_ball_gives_the_jacobian(nets):
    """All ReLUs stable and tanh/sigmoid derivatives nearly constant: the bounds pinch the true Jacobian."""
    model, x, g = nets["mlp"]
    jb = jacobian_bounds(g, x, PerturbationLpNorm(1e-6))
    J = jacobians(model, x)
    assert torch.allclose(jb.lower, J, atol=1e-4) and torch.allclose(jb.upper, J, atol=1e-4)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_lipschitz_constants_hold_for_sampled_pairs(nets, net):
    model, x, g = nets[net]
    eps = 0.2
    jb = jacobian_bounds(g, x, PerturbationLpNorm(eps))
    L = {p: jb.lipschitz(p) for p in (math.inf, 1, 2)}
    gen = torch.Generator().manual_seed(1)
    a, b = points(x, eps, 64, gen), points(x, eps, 64, gen)
    with torch.no_grad():
        fa, fb = model(a.flatten(0, 1)), model(b.flatten(0, 1))
    fa, fb = fa.reshape(64, x.shape[0], -1), fb.reshape(64, x.shape[0], -1)
    dx = (a - b).flatten(2)
    for p, bound in L.items():
        lhs = (fa - fb).norm(p=p, dim=-1)
        assert (lhs <= bound * dx.norm(p=p, dim=-1) + 1e-5).all(), p
    # the sampled gradients' norms stay below the certified constants
    J = jacobians(model, a[0]).flatten(2)
    assert (J.abs().sum(-1).amax(-1) <= L[math.inf] + 1e-5).all()


def test_mlp_bound_below_the_global_product(nets):
    model, x, g = nets["mlp"]
    jb = jacobian_bounds(g, x, PerturbationLpNorm(10.0), method="IBP")
    product = 1.0
    for layer in model:
        if isinstance(layer, nn.Linear):
            product *= float(layer.weight.abs().sum(-1).max())
    product *= 0.25  # the final sigmoid's derivative is at most 1/4
    assert (jb.lipschitz(math.inf) <= product + 1e-4).all()


def test_unsupported_op_raises():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 2)).eval()
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(NotImplementedError, match="max_pool|jacobian"):
        jacobian_bounds(model, x, PerturbationLpNorm(0.1))


def test_example_runs():
    spec = importlib.util.spec_from_file_location("jacobian_example", ROOT / "examples" / "jacobian_bounds.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = example.main(["--n", "2", "--eps", "0.01", "--samples", "6"])
    for row in report["rows"]:
        for certified, sampled in zip(row["certified"], row["sampled"]):
            assert sampled <= certified + 1e-4 <= row["global"] + 1e-3
