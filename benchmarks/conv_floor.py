"""The arithmetic floor of CROWN-IBP on the peer CNNs, and the convolution kernels behind it.

CROWN-IBP on the logits (no specification matrix, both sides) walks back from the 10 outputs
once: after the first ReLU the lower and upper sides differ, so every convolution is crossed by
``2 * batch * 10`` coefficient maps, one transposed convolution per layer. This script times, on
one thread and next to one plain forward pass of the same model:

* ``floor``: those transposed convolutions alone, with the kernels the backward walk uses
  (:func:`boundprop.kernels.conv_transpose2d`, which picks the fastest per shape), on random
  maps of the right shapes; nothing else a walk needs (relaxations, linear layers, IBP, the
  forward pass that gives the values) is counted;
* ``ours``: one whole CROWN-IBP call (``compute_bounds``);

and compares both with auto_LiRPA 0.7.1's cost and with half of it (the issue's target). It also
gives the rate of those transposed convolutions (multiply-adds x 2 / time) next to the rate of one
large matrix product (1024 x 1024 x 1024, float32) timed in the same run: how close the floor is to
what the core can do at all.

A second table times every kernel :mod:`boundprop.kernels` chooses from, per layer: the
convolutions of IBP (batch ``b``, with ``W`` and ``|W|``) and the transposed ones of the walk
(``2 * b * 10`` maps), so that the choice it makes can be checked against the figures.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/conv_floor.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from peer_compare import PEER, forward_burst, load, peer_costs  # noqa: E402
from results_file import write_result  # noqa: E402
from scaling_bench import median_time  # noqa: E402

import boundprop  # noqa: E402
from boundprop import PerturbationLpNorm, compute_bounds, kernels  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "conv_floor.md"
SPEC = 10


def conv_layers(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[torch.nn.Conv2d, tuple, tuple]]:
    """Each Conv2d with its input and output shapes (one forward pass with hooks)."""
    found = []
    hooks = [m.register_forward_hook(lambda m, i, o: found.append((m, tuple(i[0].shape), tuple(o.shape))))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return found


def _transpose_args(conv: torch.nn.Conv2d, in_shape: tuple, out_shape: tuple, rows: int) -> tuple:
    A = torch.randn(rows, *out_shape[1:])
    out_padding = tuple(in_shape[2 + i] - ((out_shape[2 + i] - 1) * conv.stride[i] - 2 * conv.padding[i]
                                           + conv.dilation[i] * (conv.kernel_size[i] - 1) + 1) for i in range(2))
    return A, conv.weight.detach(), conv.stride, conv.padding, out_padding, conv.groups, conv.dilation


def transposed_flops(layers, rows: int) -> float:
    """Floating-point operations (2 per multiply-add) of the transposed convolutions of ``rows`` maps:
    as many as the forward convolutions of ``rows`` inputs."""
    total = 0.0
    for conv, _, out_shape in layers:
        kh, kw = conv.kernel_size
        per_output = conv.in_channels // conv.groups * kh * kw
        total += 2.0 * rows * out_shape[1] * out_shape[2] * out_shape[3] * per_output
    return total


def gemm_rate(reps: int) -> float:
    """FLOP/s of a 1024^3 float32 matrix product (median of ``reps``)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / median_time(lambda: a @ b, reps)


def transposed_convs(layers, rows: int):
    """A closure running one transposed convolution of ``rows`` maps per layer (the walk's kernels)."""
    work = [_transpose_args(conv, i, o, rows) for conv, i, o in layers]
    work = [(A.contiguous(memory_format=torch.channels_last), *rest) for A, *rest in work]  # as after a conv

    def run():
        for args in work:
            kernels.conv_transpose2d(*args)

    return run


#: :func:`boundprop.kernels.conv_transpose2d_candidates` by function name
TRANSPOSED_NAMES = {"fold": "product + col2im", "channels_last": "oneDNN NHWC", "default": "default",
                    "im2col": "im2col", "pointwise": "one product (1x1)"}


def kernel_rows(name: str, batch: int, layers, reps: int) -> list[str]:
    """One table row per layer and op: the time of each candidate kernel (ms), the fastest in bold."""
    rows = []
    for index, (conv, in_shape, out_shape) in enumerate(layers):
        w = conv.weight.detach()
        forward = kernels.conv2d_candidates(torch.rand(in_shape), w.abs(), None, conv.stride, conv.padding,
                                            conv.dilation, conv.groups)
        A, w, s, p, op, g, d = _transpose_args(conv, in_shape, out_shape, 2 * batch * SPEC)
        transposed = kernels.conv_transpose2d_candidates(A, w, s, p, op, g, d)
        names = {"conv2d": ["default", "im2col", "oneDNN NHWC"],
                 "transposed": [TRANSPOSED_NAMES[run.__name__] for run in transposed]}
        geometry = f"{conv.in_channels}->{conv.out_channels} k{conv.kernel_size[0]} s{conv.stride[0]}"
        for op_name, candidates, n in (("conv2d", forward, batch), ("transposed", transposed, 2 * batch * SPEC)):
            times = [median_time(run, reps) * 1e3 for run in candidates]
            cells = [(f"**{label} {t:.3f}**" if t == min(times) else f"{label} {t:.3f}")
                     for label, t in zip(names[op_name], times)]
            rows.append(f"| {name} | {index}: {geometry}, {in_shape[2]}x{in_shape[3]} | {op_name} | {n} | "
                        + ", ".join(cells) + " |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet_small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-kernels", action="store_true", help="skip the per-kernel table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    costs = peer_costs()
    kernel_lines = ["| model | layer | op | maps | time per kernel (ms) |", "|---|---|---|---:|---|"]
    lines = ["| model | batch | forward (ms) | transposed convs (ms) | their rate (GFLOP/s) | floor (forwards) | "
             "ours (forwards) | auto_LiRPA (forwards) | target (forwards) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    peak = gemm_rate(args.reps)
    for name in args.models:
        for batch in args.batches:
            if not (PEER / f"{name}_b{batch}.pt").exists():
                continue
            model, data = load(name, batch)
            x = data["x"]
            graph = boundprop.capture(model, x)
            ptb = {graph.inputs[0]: PerturbationLpNorm(data["eps"])}
            fwd, _ = forward_burst(model, x, seconds=0.3)
            layers = conv_layers(model, x)
            floor = median_time(transposed_convs(layers, 2 * batch * SPEC), args.reps)
            rate = transposed_flops(layers, 2 * batch * SPEC) / floor
            with torch.no_grad():
                call = lambda g=graph, x=x, p=ptb: compute_bounds(g, (x,), p, method="CROWN-IBP")  # noqa: E731
                ours = median_time(call, args.reps)
            theirs = costs[(name, batch, "CROWN-IBP")]
            line = (f"| {name} | {batch} | {fwd * 1e3:.3f} | {floor * 1e3:.2f} | {rate / 1e9:.1f} | "
                    f"{floor / fwd:.1f} | {ours / fwd:.1f} | {theirs:.1f} | {theirs / 2:.1f} |")
            lines.append(line)
            print(line, flush=True)
            if not args.no_kernels:
                kernel_lines += kernel_rows(name, batch, conv_layers(model, x), args.reps)
    text = ("# CROWN-IBP: the transposed convolutions alone\n\n" + "\n".join(lines) + "\n\n"
            f"One thread, torch {torch.__version__}. `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/conv_floor.py`. "
            "floor = the transposed convolutions of one CROWN-IBP walk (2 sides x batch x 10 rows per "
            "convolution, channels-last input as the walk has it after its first convolution, the walk's own "
            "kernels) / one forward pass; ours = one whole "
            "CROWN-IBP call / one forward pass; target = half of auto_LiRPA's cost. their rate = 2 x the "
            "multiply-adds of those transposed convolutions / their time; one 1024^3 float32 matrix product ran "
            f"at {peak / 1e9:.1f} GFLOP/s in the same run.\n")
    if not args.no_kernels:
        text += ("\n### The kernels, per layer (ms, median of the reps; the fastest in bold)\n\n"
                 + "\n".join(kernel_lines) + "\n\nconv2d: IBP's convolution of one batch (input in [0, 1), "
                 "weights |W|): PyTorch's default, its im2col kernel (`thnn_conv2d`), oneDNN on a "
                 "channels-last copy. transposed: the walk's transposed convolution of 2 x batch x 10 maps "
                 "(contiguous input): oneDNN channels-last (as a flipped forward convolution at "
                 "stride 1), PyTorch's default, its im2col kernel (`slow_conv_transpose2d`), a matrix "
                 "product + col2im, in the order `boundprop.kernels` tries them. It times the same "
                 "candidates once per case and keeps the fastest.\n")
    write_result(args.out, text)


if __name__ == "__main__":
    main()
