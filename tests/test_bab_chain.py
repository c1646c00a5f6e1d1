"""The ReLU-chain CROWN of branch and bound: extraction, agreement with compute_bounds, soundness
(sampled points, corners, wide / narrow / degenerate boxes, inherited intervals, optimised bounds)."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds
from boundprop.bab.chain import ChainBounder, extract_relu_chain


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + x)


def mlp(seed: int, sizes=(3, 8, 8, 4), scale: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


_GRAPHS: dict = {}


def graph_of(seed: int, scale: float = 1.0):
    key = (seed, scale)
    if key not in _GRAPHS:
        model = mlp(seed, scale=scale)
        _GRAPHS[key] = (model, boundprop.capture(model, torch.zeros(2, 3)))
    return _GRAPHS[key]


def test_extraction_matches_the_graph():
    model, graph = graph_of(0)
    chain = extract_relu_chain(graph, (1, 3))
    assert chain is not None and [tuple(w.shape) for w in chain.weights] == [(8, 3), (8, 8), (4, 8)]
    x = torch.randn(16, 3, dtype=torch.float64)
    with torch.no_grad():
        want = model.double()(x)
        model.float()
    torch.testing.assert_close(chain.forward(x), want)


def test_extraction_with_conv_and_reshapes():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    graph = boundprop.capture(model, torch.zeros(2, 1, 6))
    chain = extract_relu_chain(graph, (1, 1, 6))
    assert chain is not None
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        want = model.double()(x.reshape(5, 1, 6))
        model.float()
    torch.testing.assert_close(chain.forward(x), want)


@pytest.mark.parametrize("model,shape", [
    (nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1)), (2, 2)),
    (Residual(), (2, 3)),
])
def test_not_a_chain(model, shape):
    graph = boundprop.capture(model, torch.zeros(shape))
    assert extract_relu_chain(graph, (1, *shape[1:])) is None


def spec(n_out: int = 4):
    A = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 1.0, 0.0, -1.0], [0.5, 0.0, 2.0, 0.0]], dtype=torch.float64)
    return A[:, :n_out], torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)


def boxes(seed: int, n: int, width: float):
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(n, 3, generator=g, dtype=torch.float64) * 4 - 2
    return lo, lo + width * torch.rand(n, 3, generator=g, dtype=torch.float64)


def test_equals_crown_of_compute_bounds():
    """With the neurons CROWN refines (unstable ones only), the bounds are compute_bounds' CROWN."""
    model, graph = graph_of(2)
    chain = extract_relu_chain(graph, (1, 3))
    A, b = spec()
    bounder = ChainBounder(chain, A, b, refine_active=False)
    model.double()
    try:
        g64 = boundprop.capture(model, torch.zeros(2, 3, dtype=torch.float64))
        for lo, hi in zip(*boxes(0, 6, 1.5)):
            lo, hi = lo[None], hi[None]
            res = compute_bounds(g64, ((lo + hi) / 2,), {g64.inputs[0]: PerturbationLpNorm(x_L=lo, x_U=hi)},
                                 method="CROWN", C=A[None], upper=False, need_A=[g64.inputs[0]])
            mine = bounder.bound(lo, hi)
            torch.testing.assert_close(mine.lower, res.lower - b, atol=1e-9, rtol=1e-9)
            torch.testing.assert_close(mine.lA, res.A[g64.inputs[0]]["lA"], atol=1e-9, rtol=1e-9)
    finally:
        model.float()


def sample(lo, hi, n: int, seed: int):
    """Uniform points plus every corner of each box: ``(boxes, points, n_in)``."""
    g = torch.Generator().manual_seed(seed)
    pts = lo[:, None] + (hi - lo)[:, None] * torch.rand(lo.shape[0], n, lo.shape[1], generator=g, dtype=lo.dtype)
    bits = torch.tensor([[(k >> j) & 1 for j in range(lo.shape[1])] for k in range(2 ** lo.shape[1])],
                        dtype=lo.dtype)
    corners = lo[:, None] + (hi - lo)[:, None] * bits[None]
    return torch.cat([pts, corners], 1)


def pre_activations(chain, x):
    out, h = [], x
    for w, c in zip(chain.weights[:-1], chain.biases[:-1]):
        z = h @ w.T + c
        out.append(z)
        h = z.clamp_min(0)
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 3), box_seed=st.integers(0, 10_000),
       width=st.sampled_from([0.0, 1e-7, 1e-3, 0.5, 3.0, 2e3]), scale=st.sampled_from([1.0, 30.0]))
def test_sound_on_sampled_points(seed, box_seed, width, scale):
    _, graph = graph_of(seed, scale)
    chain = extract_relu_chain(graph, (1, 3))
    A, b = spec()
    bounder = ChainBounder(chain, A, b)
    lo, hi = boxes(box_seed, 4, width)
    if width > 100:
        lo = lo * 500
        hi = lo + width
    res = bounder.bound(lo, hi)
    x = sample(lo, hi, 200, box_seed)
    y = chain.forward(x.reshape(-1, 3)).reshape(lo.shape[0], x.shape[1], -1)
    rows = y @ A.T - b
    tol = 1e-9 * (1 + rows.abs().amax())
    assert (res.lower[:, None] <= rows + tol).all()
    assert torch.isfinite(res.lower).all()
    for (l, u), z in zip(res.pre, pre_activations(chain, x.reshape(-1, 3))):
        z = z.reshape(lo.shape[0], x.shape[1], -1)
        ztol = 1e-9 * (1 + z.abs().amax())
        assert (l[:, None] <= z + ztol).all() and (z <= u[:, None] + ztol).all()
    # a sub-box that inherits the intervals stays sound and at least as tight
    mid = (lo + hi) / 2
    child = bounder.bound(lo, mid, res.pre)
    xc = sample(lo, mid, 100, box_seed + 1)
    yc = chain.forward(xc.reshape(-1, 3)).reshape(lo.shape[0], xc.shape[1], -1) @ A.T - b
    assert (child.lower[:, None] <= yc + tol).all()
    for (lc, uc), (lp, up) in zip(child.pre, res.pre):
        assert (lc >= lp).all() and (uc <= up).all()
    # the optimised bound of each disjunct (groups {0, 1} and {2}) bounds max over its rows
    groups = torch.tensor([0, 0, 1])
    best = bounder.optimise(lo, hi, res.pre, groups, 2, iterations=8, row_lower=res.lower)
    worst0 = rows[..., :2].amax(-1).amin(1)
    worst1 = rows[..., 2].amin(1)
    assert (best[:, 0] <= worst0 + tol).all() and (best[:, 1] <= worst1 + tol).all()
    single = torch.stack([res.lower[:, :2].amax(1), res.lower[:, 2]], 1)
    assert (best >= single - 1e-9 * (1 + single.abs())).all()  # never worse than the rows alone


def test_optimisation_reads_its_stop_test_every_few_steps_on_device_paths():
    """On the GPU's branches the optimisation's stop test is read every STOP_TEST_EVERY steps (each
    read waits for the device): the same Adam steps, at most STOP_TEST_EVERY - 1 more of them, so the
    kept bound is at least the CPU path's."""
    from boundprop.syncs import STOP_TEST_EVERY, count_syncs, device_paths

    _, graph = graph_of(1)
    chain = extract_relu_chain(graph, (1, 3))
    A, b = spec()
    bounder = ChainBounder(chain, A, b)
    lo, hi = boxes(3, 6, 0.5)
    res = bounder.bound(lo, hi)
    groups = torch.tensor([0, 0, 1])
    iterations = 12
    with count_syncs() as on_cpu:
        cpu = bounder.optimise(lo, hi, res.pre, groups, 2, iterations=iterations, row_lower=res.lower)
    with device_paths(), count_syncs() as on_device:
        device = bounder.optimise(lo, hi, res.pre, groups, 2, iterations=iterations, row_lower=res.lower)
    assert (device >= cpu).all()
    assert on_cpu.total == iterations  # one stop test per step (the last step ends without one)
    assert on_device.total == len(range(0, iterations, STOP_TEST_EVERY))
