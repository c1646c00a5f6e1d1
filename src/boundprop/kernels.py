"""2-D convolutions with the fastest CPU kernel for each shape, measured once per process.

PyTorch's CPU convolution chooses between oneDNN and its own im2col + matrix-product kernel by a
fixed rule, and the faster one differs by shape, layout and batch size, by up to 4x either way.
One thread, torch 2.13, milliseconds, on layers of the peer models (``benchmarks/conv_floor.py``,
``conv_floor.md``):

==================================================  =======  ======  ===========  =============
case                                                default  im2col  oneDNN NHWC  product+col2im
==================================================  =======  ======  ===========  =============
IBP: conv 1->16, k4 s2, 28x28, batch 1              0.067    0.017   0.069
IBP: conv 16->32, k4 s2, 13x13, batch 1             0.085    0.034   0.084
walk: transposed into 1 channel, k4 s2, 20 maps     0.728    0.161   0.755        0.168
walk: transposed into 3 channels, k3 s1, 20 maps    0.830    1.148   1.460        1.219
walk: transposed 32->16, k3 s2, 32x32, 640 maps     127.1    148.4   63.1         143.0
==================================================  =======  ======  ===========  =============

So, as ``torch.backends.cudnn.benchmark`` does on GPUs, :func:`conv2d` and :func:`conv_transpose2d`
time the candidate kernels the first time they meet a case and keep the fastest for the rest of
the process. A case is everything that decides the choice: the op, the input's shape (its
leading dimension, batch times specification rows, rounded up to a power of two, so that chunks of
different sizes share a choice), its memory layout, the weight's shape, stride, padding, dilation,
groups, dtype. Every candidate computes the same function (they differ in rounding only: about
1e-7 relative in float32), so the choice never changes a bound beyond floating-point noise.

Tuning costs one untimed run of each candidate and 3-7 interleaved timed rounds of all of them,
once per case (a few tens of milliseconds for batch-1 layers). A case whose first candidate takes
longer than :data:`TUNE_LIMIT_S` is not tuned (fixed overheads are negligible there, and timing
every candidate would cost more than a call): it keeps the first candidate, the best choice on
large inputs. ``BOUNDPROP_CONV_TUNING=0`` turns tuning off (first candidates everywhere). Off the CPU
PyTorch's default kernels are always used.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

aten = torch.ops.aten

#: Cases whose first candidate takes longer than this (seconds) keep it untuned.
TUNE_LIMIT_S = 0.02

#: case -> index of the chosen candidate
_CHOICE: dict[tuple, int] = {}


def tuning_enabled() -> bool:
    return os.environ.get("BOUNDPROP_CONV_TUNING", "1") != "0"


def as_pair(v) -> tuple[int, int]:
    """A 2-D conv argument (int or sequence) as a pair of ints."""
    return (int(v[0]), int(v[-1])) if isinstance(v, (list, tuple)) else (int(v),) * 2


def _layout(x: torch.Tensor) -> int:
    """0: contiguous, 1: channels-last, 2: other."""
    if x.is_contiguous():
        return 0
    return 1 if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else 2


def _choose(key: tuple, candidates: list[Callable[[], torch.Tensor]]) -> torch.Tensor:
    """Run the chosen candidate for ``key`` (choosing it first if the case is new)."""
    if not tuning_enabled():
        return candidates[0]()
    index = _CHOICE.get(key)
    if index is not None:
        return candidates[index]()
    with torch.no_grad():
        first = _time(candidates[0])
        if first > TUNE_LIMIT_S or len(candidates) == 1:
            index = 0
        else:
            index = _fastest(candidates, rounds=max(3, min(TUNE_ROUNDS, int(TUNE_BUDGET_S / first))))
    _CHOICE[key] = index
    return candidates[index]()


#: Timed rounds per tuned case: as many runs of the first candidate as fit in TUNE_BUDGET_S, 3 to 7
TUNE_ROUNDS = 7
TUNE_BUDGET_S = 0.02


def _fastest(candidates: list[Callable[[], torch.Tensor]], rounds: int) -> int:
    """Index of the candidate with the smallest time over ``rounds`` interleaved rounds (each round runs
    every candidate once, after one untimed run of each but the first, which :func:`_time` has run
    already: oneDNN builds its primitive on the first call).

    Why interleaved rounds and the minimum: this machine's speed drifts by 1.5-2x within seconds, so
    timing one candidate after the other compares phases as much as kernels. With one timed run per
    candidate above a millisecond (the rule before), six fresh processes made six different sets of
    choices for the 15 cases of a CROWN-IBP call on the peer ResNet at batch 1; with these rounds,
    two or three (the cases that still differ have candidates within 10 % of each other). The
    speed of the call did not change measurably (fresh processes, 8 alternating rounds: 0.99).
    """
    for run in candidates[1:]:
        run()
    best = [float("inf")] * len(candidates)
    for _ in range(rounds):
        for i, run in enumerate(candidates):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return min(range(len(candidates)), key=best.__getitem__)


def _time(run: Callable[[], torch.Tensor]) -> float:
    """Seconds of one run after an untimed one."""
    run()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` with the fastest CPU kernel for the case (see the module docstring).

    Candidates (:func:`conv2d_candidates`): PyTorch's default choice; its im2col kernel
    (``thnn_conv2d``: groups 1, no dilation); oneDNN on a channels-last copy of ``x``, made contiguous
    again, so callers see the layout ``F.conv2d`` gives.
    """
    if x.device.type != "cpu" or x.dim() != 4 or isinstance(padding, str):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    stride, padding, dilation = as_pair(stride), as_pair(padding), as_pair(dilation)
    key = ("conv2d", _bucket(x.shape[0]), *x.shape[1:], _layout(x), *weight.shape, bias is None, stride, padding,
           dilation, groups, x.dtype)
    return _choose(key, conv2d_candidates(x, weight, bias, stride, padding, dilation, groups))


def conv2d_candidates(x, weight, bias, stride, padding, dilation, groups) -> list[Callable[[], torch.Tensor]]:
    """The kernels :func:`conv2d` chooses from (pairs for stride, padding, dilation), default first."""
    candidates = [lambda: F.conv2d(x, weight, bias, stride, padding, dilation, groups)]
    if groups == 1 and dilation == (1, 1):
        k = list(weight.shape[2:])
        candidates.append(lambda: aten.thnn_conv2d(x.contiguous(), weight, k, bias, list(stride), list(padding)))
    if _layout(x) == 0 and not (tuple(weight.shape[2:]) == (1, 1) and stride[0] != stride[1]):
        # (a 1x1 kernel with unequal strides on channels-last input can crash oneDNN's backward pass
        # in torch 2.13: a segmentation fault in some runs, seen at strides (1, 2), (3, 1), (3, 2))
        candidates.append(lambda: F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, stride,
                                           padding, dilation, groups).contiguous())
    return candidates


def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, stride, padding, output_padding, groups: int,
                     dilation) -> torch.Tensor:
    """``F.conv_transpose2d`` without bias, with the fastest CPU kernel for the case.

    The output may be channels-last (callers accept either layout). Candidates
    (:func:`conv_transpose2d_candidates`): oneDNN in channels-last layout (as a forward convolution
    with the flipped kernel when the stride is 1, see :func:`_as_forward_conv`); PyTorch's default;
    its im2col kernel (``slow_conv_transpose2d``) and a matrix product + col2im
    (:func:`_fold_transpose`), both for groups 1. Cases too large to tune take the first: the matrix
    product + col2im for one output channel (3-4 times faster than oneDNN there), else channels-last
    oneDNN (2-4 times faster than its default layout on large inputs).
    """
    stride, padding, output_padding, dilation = (as_pair(v) for v in (stride, padding, output_padding, dilation))
    if x.device.type != "cpu":
        return F.conv_transpose2d(x, weight, None, stride, padding, output_padding, groups, dilation)
    key = ("conv_transpose2d", _bucket(x.shape[0]), *x.shape[1:], _layout(x), *weight.shape, stride, padding,
           output_padding, dilation, groups, x.dtype)
    return _choose(key, conv_transpose2d_candidates(x, weight, stride, padding, output_padding, groups, dilation))


def conv_transpose2d_candidates(x, weight, stride, padding, output_padding, groups,
                                dilation) -> list[Callable[[], torch.Tensor]]:
    """The kernels :func:`conv_transpose2d` chooses from (pairs for the geometry), the untuned choice first."""
    def fold():
        return _fold_transpose(x, weight, stride, padding, output_padding, dilation)

    def channels_last():
        x_last = x.contiguous(memory_format=torch.channels_last)
        flipped = _as_forward_conv(weight, stride, padding, output_padding, groups, dilation)
        if flipped is not None:
            return F.conv2d(x_last, *flipped)
        return F.conv_transpose2d(x_last, weight, None, stride, padding, output_padding, groups, dilation)

    def default():
        return F.conv_transpose2d(x, weight, None, stride, padding, output_padding, groups, dilation)

    def im2col():
        return aten.slow_conv_transpose2d(x.contiguous(), weight, list(weight.shape[2:]), None, list(stride),
                                          list(padding), list(output_padding), list(dilation))

    def pointwise():
        return _pointwise_transpose(x, weight, stride, output_padding)

    if groups != 1:
        return [channels_last, default]
    if output_padding[0] >= stride[0] or output_padding[1] >= stride[1]:  # F.fold would see extra windows
        return [channels_last, default, im2col]
    if tuple(weight.shape[2:]) == (1, 1) and padding == (0, 0):  # one kernel: its layout is part of its gain
        return [pointwise]
    if weight.shape[1] == 1:
        return [fold, channels_last, default, im2col]
    return [channels_last, default, im2col, fold]


def _pointwise_transpose(x: torch.Tensor, weight: torch.Tensor, stride, output_padding) -> torch.Tensor:
    """``conv_transpose2d(x, weight)`` for a 1x1 kernel, no padding, groups 1, as one matrix product
    written into every ``stride``-th pixel of a zero map, channels-last::

        out[n, o, i s_h, j s_w] = sum_c x[n, c, i, j] weight[c, o, 0, 0],   0 elsewhere

    Why it is the only candidate for these cases: on the ResNet shortcut of the peer models (32 -> 16
    channels, stride 2, 16 x 16 -> 32 x 32, contiguous input) it takes 0.31 ms at 20 maps (PyTorch's
    im2col kernel: 0.30, the fastest other) and 16-19 ms at 640 (im2col 24 ms; oneDNN, which this
    large case took untuned, 34-38 ms). Its output is channels-last, as oneDNN's is, so that the
    residual sum it joins adds two tensors of one layout: a mixed-layout sum costs 2-7 times as
    much (0.34 against 0.05 ms at 20 maps), and the walk then stays channels-last into the block
    before. A tuner that timed it against im2col alone would pick by noise at 20 maps, and lose the
    sum. In pairs (``benchmarks/paired_ab.py``), resnet_small CROWN-IBP: 0.946 and 0.984 of the
    cost at batch 1, 0.967 at batch 32.
    """
    N, C, h, w = x.shape
    O = weight.shape[1]
    matrix = weight[:, :, 0, 0]
    rows = x.permute(0, 2, 3, 1)  # (N, h, w, C)
    if rows.is_contiguous():
        product = (rows.reshape(-1, C) @ matrix).view(N, h, w, O)
    else:  # (N, C, h w) read transposed by the batched product, no copy
        product = torch.bmm(x.reshape(N, C, h * w).transpose(1, 2), matrix.expand(N, C, O)).view(N, h, w, O)
    if stride == (1, 1) and output_padding == (0, 0):
        return product.permute(0, 3, 1, 2)
    size = tuple((n - 1) * stride[i] + 1 + output_padding[i] for i, n in enumerate((h, w)))
    out = x.new_zeros(N, *size, O)
    out[:, :: stride[0], :: stride[1]] = product
    return out.permute(0, 3, 1, 2)


def _as_forward_conv(weight: torch.Tensor, stride, padding, output_padding, groups: int, dilation):
    """``(weight', None, 1, padding', dilation)`` with ``conv2d(x, weight', ...) = conv_transpose2d(x, weight, ...)``,
    or None. A stride-1 transposed convolution is the "full" convolution with the kernel flipped and
    its channel axes swapped: ``weight'[o, c, i, j] = weight[c, o, kh-1-i, kw-1-j]``, padding
    ``d (k - 1) - p``.
    """
    k = weight.shape[2:]
    full = tuple(dilation[i] * (k[i] - 1) - padding[i] for i in range(2))
    if groups != 1 or stride != (1, 1) or output_padding != (0, 0) or min(full) < 0:
        return None
    return weight.flip(-2, -1).transpose(0, 1), None, 1, full, dilation


def _fold_transpose(x: torch.Tensor, weight: torch.Tensor, stride, padding, output_padding, dilation) -> torch.Tensor:
    """``conv_transpose2d(x, weight)`` (groups 1, no bias) as one product and a col2im::

        cols[n, (o, p, q), (i, j)] = sum_c weight[c, o, p, q] x[n, c, i, j]      (N, O kh kw, h w)
        out[n, o, i s + p d - pad, j s + q d - pad] += cols[n, (o, p, q), (i, j)]  (F.fold)

    Fast when the output has few channels (e.g. one: 11.7 ms against oneDNN's 40.6 for 640 windows
    of 16 x 13 x 13, one thread). Needs ``output_padding < stride`` (else ``F.fold`` counts windows
    that are not there).
    """
    stride, padding, output_padding, dilation = (as_pair(v) for v in (stride, padding, output_padding, dilation))
    N, C, h, w = x.shape
    k = tuple(weight.shape[2:])
    size = tuple((n - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1 + output_padding[i]
                 for i, n in enumerate((h, w)))
    cols = weight.reshape(C, -1).T @ x.reshape(N, C, h * w)
    return F.fold(cols, size, k, dilation=dilation, padding=padding, stride=stride)
