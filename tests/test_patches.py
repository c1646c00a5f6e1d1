"""Patch-form (and other fast-path) CROWN gives the same bounds as dense one-hot specs.

* :class:`~boundprop.domains.patches.Patches` against its dense form (gather, conv, alignment);
* random convolutional networks (strides, padding, groups, dilation, residual adds and subs,
  batch norm, scalar multiples, average pooling and a flatten at the end) with CROWN in patch
  mode against ``conv_mode="matrix"`` (dense one-hot specs, the reference walk), for batch 1 and
  a batch of 3, every intermediate interval included;
* the peer models' CROWN bounds against auto_LiRPA 0.7.1's (``/work/shared/peer``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds
from boundprop.domains.patches import Patches, add_coefficients

PEER = Path("/work/shared/peer")


def _random_patches(seed: int, batch: int = 2) -> Patches:
    g = torch.Generator().manual_seed(seed)
    C, H, W = 3, 7, 6
    index = torch.randperm(C * H * W, generator=g)[:10].sort().values
    p = Patches.identity(index, (C, H, W), torch.float32)
    data = torch.randn(batch, 10, 2, 4, 3, generator=g)
    return Patches(data, p.rows_h, p.rows_w, (2, 1), (1, 2), (5, 4), p.row_range, dirty=True)


def test_gather_and_dense_agree():
    p = _random_patches(0).clean()
    dense = p.to_dense()  # (b, R, C, H, W)
    t = torch.randn(2, 2, 5, 4)
    (window,) = p.gather(t)
    ours = (p.data * window).flatten(2).sum(-1)
    ref = (dense * t.unsqueeze(1)).flatten(2).sum(-1)
    torch.testing.assert_close(ours, ref)
    per_row = torch.randn(2, 10, 2, 5, 4)
    (window,) = p.gather(per_row)
    torch.testing.assert_close((p.data * window).flatten(2).sum(-1), (dense * per_row).flatten(2).sum(-1))


def test_clean_drops_only_outside_entries():
    p = _random_patches(1)
    torch.testing.assert_close(p.to_dense(), p.clean().to_dense())
    outside = p.data.abs().sum() - p.clean().data.abs().sum()
    assert outside > 0  # some window entries did hang over the border


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 0, 1, 1), (2, 1, 1, 1), (1, 2, 2, 1), (2, 1, 1, 2),
                                                            ((2, 1), (0, 1), (1, 2), 1)])
def test_through_conv_matches_dense_transpose(stride, padding, dilation, groups):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 9, 8)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False)
    y = conv(x)
    C, H, W = y.shape[1:]
    index = torch.randperm(C * H * W)[:12].sort().values
    p = Patches.identity(index, (C, H, W), torch.float32)
    p = p.with_data(torch.randn(2, 12, C, 1, 1) * p.data)
    moved = p.through_conv2d(conv.weight.detach(), conv.stride, conv.padding, conv.dilation, groups, (9, 8))
    dense = p.to_dense().reshape(2 * 12, C, H, W)
    out_pad = tuple(n - ((m - 1) * s - 2 * q + d * 2 + 1)
                    for n, m, s, q, d in zip((9, 8), (H, W), conv.stride, conv.padding, conv.dilation))
    ref = F.conv_transpose2d(dense, conv.weight.detach(), None, conv.stride, conv.padding, out_pad, groups,
                             conv.dilation)
    torch.testing.assert_close(moved.to_dense().reshape(2 * 12, 4, 9, 8), ref, atol=1e-5, rtol=1e-5)


def test_add_coefficients_aligns_windows():
    torch.manual_seed(2)
    base = Patches.identity(torch.tensor([3, 17, 40]), (2, 5, 5), torch.float32)
    a = Patches(torch.randn(1, 3, 2, 5, 5), base.rows_h, base.rows_w, (1, 1), (2, 2), (5, 5), base.row_range)
    b = Patches(torch.randn(2, 3, 2, 3, 3), base.rows_h, base.rows_w, (1, 1), (1, 1), (5, 5), base.row_range)
    c = Patches(torch.randn(2, 3, 2, 2, 4), base.rows_h, base.rows_w, (1, 1), (0, 1), (5, 5), base.row_range)
    for x, y in ((a, b), (b, a), (b, c), (a, c)):
        total = add_coefficients(x, y)
        assert isinstance(total, Patches)
        torch.testing.assert_close(total.clean().to_dense(), x.clean().to_dense() + y.clean().to_dense())


class _Block(nn.Module):
    def __init__(self, c_in, c_out, stride, groups, dilation, bn, sub):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.short = nn.Conv2d(c_in, c_out, 1, stride=stride) if (stride != 1 or c_in != c_out) else nn.Identity()
        self.bn = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.sub = sub

    def forward(self, x):
        h = self.bn(self.conv2(torch.relu(self.conv1(x))))
        s = self.short(x)
        if self.sub:  # constant padding has no patch rule: the walk turns dense there
            s = F.pad(s[:, :, 1:, :-1], (0, 1, 1, 0))
        return torch.relu(h - 0.5 * s if self.sub else h + s)


def _random_net(seed: int, c_in: int, size: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    pick = lambda n: int(torch.randint(n, (1,), generator=g))  # noqa: E731
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(c_in, 4, 3, stride=1 + pick(2), padding=pick(2)), nn.ReLU()]
    c = 4
    for _ in range(1 + pick(2)):
        c_out = 4 * (1 + pick(2))
        layers.append(_Block(c, c_out, 1 + pick(2), 2 if pick(2) and c % 2 == 0 else 1, 1 + pick(2), bool(pick(2)),
                             bool(pick(2))))
        c = c_out
    if pick(2):
        layers += [nn.AvgPool2d(2, ceil_mode=True)]
    net = nn.Sequential(*layers, nn.Flatten()).eval()  # eval: batch norm on a 1 x 1 map in the probe
    with torch.no_grad():
        n = net(torch.zeros(1, c_in, size, size)).shape[1]
    net.append(nn.Linear(n, 3))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def _intervals(graph, x, eps, mode):
    ptb = {graph.inputs[0]: PerturbationLpNorm(eps)}
    with torch.no_grad():
        return compute_bounds(graph, (x,), ptb, method="CROWN", opts={"conv_mode": mode})


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.sampled_from([1, 3]), eps=st.sampled_from([0.02, 0.1, 0.5]))
def test_patch_crown_equals_dense_crown(seed, batch, eps):
    size = 7 + seed % 5
    net = _random_net(seed, 2, size)
    x = torch.randn(batch, 2, size, size, generator=torch.Generator().manual_seed(seed))
    graph = boundprop.capture(net, x)
    fast, dense = _intervals(graph, x, eps, "patches"), _intervals(graph, x, eps, "matrix")
    scale = dense.upper.abs().max().clamp_min(1.0)
    torch.testing.assert_close(fast.lower / scale, dense.lower / scale, rtol=0, atol=2e-5)
    torch.testing.assert_close(fast.upper / scale, dense.upper / scale, rtol=0, atol=2e-5)
    for name, iv in dense.intervals.items():
        if iv.upper.numel() == 0:  # an empty slice (the random nets slice channels)
            continue
        s = iv.upper.abs().max().clamp_min(1.0)
        torch.testing.assert_close(fast.intervals[name].lower / s, iv.lower / s, rtol=0, atol=2e-5)
        torch.testing.assert_close(fast.intervals[name].upper / s, iv.upper / s, rtol=0, atol=2e-5)


def _all_features_net() -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                        _Block(4, 4, 1, 2, 2, True, False),   # groups, dilation, batch norm, residual add
                        _Block(4, 8, 2, 1, 1, False, True),   # strided, 1x1 shortcut, pad, scaled sub
                        nn.AvgPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(8 * 2 * 2, 3))
    bn = net[2].bn
    bn.running_mean.uniform_(-0.3, 0.3)
    bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("batch", [1, 3])
def test_patch_crown_equals_dense_on_all_features(batch):
    net = _all_features_net()
    x = torch.randn(batch, 2, 13, 13, generator=torch.Generator().manual_seed(batch))
    graph = boundprop.capture(net, x)
    fast, dense = _intervals(graph, x, 0.05, "patches"), _intervals(graph, x, 0.05, "matrix")
    torch.testing.assert_close(fast.lower, dense.lower, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.upper, dense.upper, rtol=1e-5, atol=1e-5)
    for name, iv in dense.intervals.items():
        torch.testing.assert_close(fast.intervals[name].lower, iv.lower, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.intervals[name].upper, iv.upper, rtol=1e-5, atol=1e-5)


def test_chunked_patches_and_no_grad_option_agree():
    net = _random_net(7, 2, 10)
    x = torch.randn(2, 2, 10, 10)
    graph = boundprop.capture(net, x)
    ptb = {graph.inputs[0]: PerturbationLpNorm(0.1)}
    ref = compute_bounds(graph, (x,), ptb, method="CROWN")
    small = compute_bounds(graph, (x,), ptb, method="CROWN",
                           opts={"max_coefficient_elements": 300, "intermediate_grad": False})
    torch.testing.assert_close(small.lower, ref.lower.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small.upper, ref.upper.detach(), rtol=1e-5, atol=1e-5)
    assert ref.lower.requires_grad  # parameters require grad: gradients flow by default


def test_alpha_crown_same_in_both_modes():
    net = _random_net(11, 2, 8)
    x = torch.randn(2, 2, 8, 8)
    graph = boundprop.capture(net, x)
    ptb = {graph.inputs[0]: PerturbationLpNorm(0.1)}
    opts = {"optimize_bound_args": {"iteration": 4, "lr_alpha": 0.3}}
    fast = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", opts={**opts, "conv_mode": "patches"})
    dense = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", opts={**opts, "conv_mode": "matrix"})
    torch.testing.assert_close(fast.lower, dense.lower, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.upper, dense.upper, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("acts, chunk", [((nn.ReLU, nn.ReLU, lambda: nn.LeakyReLU(0.1)), 400),
                                         ((nn.Tanh, nn.GELU, nn.Sigmoid), 5000)])  # smooth: every neuron walks
def test_window_alphas_equal_dense_alphas(acts, chunk):
    """Patch-form walks keep alpha-CROWN's parameters in window layout (whole, and in chunks of rows
    that each take their rows); the optimisation is the same as with dense parameters."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), acts[0](), nn.Conv2d(4, 4, 3, stride=2, padding=1), acts[1](),
                        nn.Conv2d(4, 3, 3, padding=1), acts[2](), nn.Flatten(), nn.Linear(3 * 6 * 6, 3))
    x = torch.randn(2, 2, 12, 12)
    graph = boundprop.capture(net, x)
    ptb = {graph.inputs[0]: PerturbationLpNorm(0.1)}
    opts = {"optimize_bound_args": {"iteration": 4 if chunk < 1000 else 2, "lr_alpha": 0.3}}
    dense = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", opts={**opts, "conv_mode": "matrix"})
    for extra in ({}, {"max_coefficient_elements": chunk}):
        fast = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", opts={**opts, **extra})
        torch.testing.assert_close(fast.lower, dense.lower, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.upper, dense.upper, rtol=1e-4, atol=1e-5)


def test_fold_transpose_matches_conv_transpose():
    """The one-output-channel transposed convolution (matrix product + col2im) against torch's."""
    from boundprop.kernels import _fold_transpose

    g = torch.Generator().manual_seed(0)
    for stride, padding, output_padding, dilation in [(1, 0, 0, 1), (2, 1, 1, 1), (2, 0, 0, 2), ((2, 1), (1, 0), 0, 1)]:
        x = torch.randn(5, 3, 6, 7, generator=g)
        w = torch.randn(3, 1, 3, 2, generator=g)
        ours = _fold_transpose(x, w, stride, padding, output_padding, dilation)
        ref = torch.nn.functional.conv_transpose2d(x, w, None, stride, padding, output_padding, 1, dilation)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _peer(name: str, batch: int):
    sys.path.insert(0, str(PEER))
    import peer_models

    data = torch.load(PEER / f"{name}_b{batch}.pt", weights_only=False)
    model = peer_models.build_model(name)
    model.load_state_dict(data["state_dict"])
    return model.eval(), data


@pytest.mark.skipif(not PEER.exists(), reason="peer data not available")
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet_small"])
@pytest.mark.parametrize("method", ["CROWN", "CROWN-IBP"])
def test_peer_models_match_auto_lirpa(name, method):
    model, data = _peer(name, 1)
    graph = boundprop.capture(model, data["x"])
    ptb = {graph.inputs[0]: PerturbationLpNorm(data["eps"])}
    with torch.no_grad():
        res = compute_bounds(graph, (data["x"],), ptb, method=method)
    lower, upper = data["bounds"][method]
    torch.testing.assert_close(res.lower, lower, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.upper, upper, rtol=1e-4, atol=1e-5)
