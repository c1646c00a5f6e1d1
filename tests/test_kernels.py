"""Every convolution kernel that :mod:`boundprop.kernels` may pick computes PyTorch's function.

Each candidate is run on its own (whatever the tuner would choose) against ``F.conv2d`` /
``F.conv_transpose2d``, for values and for gradients (bounds are trained through), over strides,
paddings, dilations, groups, one or several output channels, and both memory layouts.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from boundprop import kernels

_GEOMETRIES = [  # (in channels, out channels, kernel, stride, padding, dilation, groups)
    (1, 4, (4, 4), (2, 2), (0, 0), (1, 1), 1),
    (3, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (4, 6, (3, 2), (2, 1), (1, 0), (1, 1), 1),
    (4, 1, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (4, 2, (3, 3), (1, 1), (2, 2), (2, 2), 1),
    (4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2),
    (6, 3, (1, 1), (2, 2), (0, 0), (1, 1), 1),
    (5, 4, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    (4, 3, (1, 1), (3, 3), (0, 0), (1, 1), 1),
    (4, 3, (1, 1), (2, 2), (1, 1), (1, 1), 1),
]


def _layouts(t: torch.Tensor):
    return [t, t.contiguous(memory_format=torch.channels_last)]


def _check(candidates, reference, inputs):
    expected = reference()
    grads = torch.autograd.grad(expected.square().sum(), inputs)
    for index, run in enumerate(candidates):
        out = run()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=f"candidate {index}")
        got = torch.autograd.grad(out.square().sum(), inputs)
        for g, e in zip(got, grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=f"gradient of candidate {index}")


@pytest.mark.parametrize("geometry", _GEOMETRIES)
@pytest.mark.parametrize("batch", [1, 5])
def test_conv2d_candidates_equal_conv2d(geometry, batch):
    cin, cout, k, stride, padding, dilation, groups = geometry
    gen = torch.Generator().manual_seed(batch)
    weight = torch.randn(cout, cin // groups, *k, generator=gen, requires_grad=True)
    bias = torch.randn(cout, generator=gen, requires_grad=True)
    for x, b in itertools.product(_layouts(torch.randn(batch, cin, 9, 8, generator=gen)), (bias, None)):
        x = x.requires_grad_()
        inputs = (x, weight) if b is None else (x, weight, b)
        _check(kernels.conv2d_candidates(x, weight, b, stride, padding, dilation, groups),
               lambda x=x, b=b: F.conv2d(x, weight, b, stride, padding, dilation, groups), inputs)


@pytest.mark.parametrize("geometry", _GEOMETRIES)
@pytest.mark.parametrize("output_padding", [(0, 0), (1, 0)])
def test_conv_transpose2d_candidates_equal_conv_transpose2d(geometry, output_padding):
    cin, cout, k, stride, padding, dilation, groups = geometry  # the transposed op maps cout -> cin
    if output_padding[0] >= max(stride[0], dilation[0]):
        pytest.skip("output padding must be smaller than stride or dilation")
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(cout, cin // groups, *k, generator=gen, requires_grad=True)
    for x in _layouts(torch.randn(7, cout, 5, 6, generator=gen)):
        x = x.requires_grad_()
        _check(kernels.conv_transpose2d_candidates(x, weight, stride, padding, output_padding, groups, dilation),
               lambda x=x: F.conv_transpose2d(x, weight, None, stride, padding, output_padding, groups, dilation),
               (x, weight))


def test_no_channels_last_candidate_for_1x1_kernels_with_unequal_strides():
    """oneDNN's backward pass of such a convolution on channels-last input can crash the process (torch
    2.13), so the tuner never converts a contiguous input for it; its other candidates stay exact."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(3, 4, 1, 1, generator=gen, requires_grad=True)
    x = torch.randn(5, 4, 9, 8, generator=gen, requires_grad=True)
    for stride in ((1, 2), (3, 1), (3, 2)):
        candidates = kernels.conv2d_candidates(x, weight, None, stride, (0, 0), (1, 1), 1)
        assert len(candidates) == 2  # PyTorch's default and im2col, both on the contiguous input
        _check(candidates, lambda stride=stride: F.conv2d(x, weight, None, stride), (x, weight))
    assert len(kernels.conv2d_candidates(x, weight, None, (2, 2), (0, 0), (1, 1), 1)) == 3


def test_choice_is_cached_per_case_and_tuning_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(kernels, "_CHOICE", {})
    x, weight = torch.randn(3, 2, 6, 6), torch.randn(4, 2, 3, 3)
    out = kernels.conv2d(x, weight, None, 1, 1)
    torch.testing.assert_close(out, F.conv2d(x, weight, None, 1, 1))
    assert len(kernels._CHOICE) == 1
    kernels.conv2d(torch.randn(4, 2, 6, 6), weight, None, 1, 1)  # batch 4: the same power-of-two bucket
    assert len(kernels._CHOICE) == 1
    monkeypatch.setenv("BOUNDPROP_CONV_TUNING", "0")
    kernels.conv2d(torch.randn(3, 2, 7, 7), weight, None, 1, 1)
    assert len(kernels._CHOICE) == 1  # a new case, not tuned
