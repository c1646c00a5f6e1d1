"""Certified robustness to a few changed pixels (L0) on the bundled digits classifier.

Up to ``k`` pixels of an 8x8 image may change, each by at most ``delta`` (within ``[0, 1]``;
``delta = 1``: to any grey level) (:class:`boundprop.PerturbationL0Norm` with
``x_L = max(x - delta, 0)``, ``x_U = min(x + delta, 1)``). For each ``(delta, k)`` the script bounds
the margins ``z_y - z_j`` with IBP, CROWN-IBP and CROWN and counts the images verified (every
margin's lower bound positive), next to the images an attack breaks (greedy: the best change of one
pixel to one of 5 levels of its range, exhaustively, repeated ``k`` times), so that
``verified + attacked <= n`` and the gap shows what neither settles.

Usage: ``.venv/bin/python examples/l0_perturbation.py [--n 20] [--k 1 2 4] [--delta 0.2 0.5 1]``.
"""

from __future__ import annotations

import argparse
import time

import torch

import boundprop
from boundprop import PerturbationL0Norm, compute_bounds
from boundprop.data import load_digits_model, load_digits_samples

LEVELS = torch.linspace(0, 1, 5)


def margin_spec(y: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """Rows ``e_y - e_j`` for ``j != y``: ``(batch, num_classes - 1, num_classes)``."""
    eye = torch.eye(num_classes)
    rows = [torch.stack([eye[c] - eye[j] for j in range(num_classes) if j != c]) for c in y.tolist()]
    return torch.stack(rows)


@torch.no_grad()
def attack(model, x: torch.Tensor, y: torch.Tensor, k: int, x_L: torch.Tensor, x_U: torch.Tensor) -> torch.Tensor:
    """True where a greedy chain of at most ``k`` one-pixel changes (to 5 levels of ``[x_L, x_U]``)
    flips the prediction."""
    broken = torch.zeros(len(y), dtype=torch.bool)
    for b in range(len(y)):
        current = x[b:b + 1].clone()
        lo, hi = x_L[b].flatten(), x_U[b].flatten()
        levels = (lo.unsqueeze(1) + LEVELS * (hi - lo).unsqueeze(1)).flatten()  # (pixels * levels,)
        for _ in range(k):
            flat = current.flatten()
            trials = flat.repeat(flat.numel() * len(LEVELS), 1)
            idx = torch.arange(flat.numel()).repeat_interleave(len(LEVELS))
            trials[torch.arange(len(trials)), idx] = levels
            logits = model(trials.reshape(-1, *x.shape[1:]))
            margin = logits[:, y[b]] - logits.masked_fill(
                torch.nn.functional.one_hot(y[b], logits.shape[1]).bool(), float("-inf")).amax(1)
            best = int(margin.argmin())
            if float(margin[best]) < 0:
                broken[b] = True
                break
            current = trials[best].reshape(current.shape)
    return broken


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20, help="bundled test images to use")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="numbers of changed pixels")
    p.add_argument("--delta", type=float, nargs="+", default=[0.2, 0.5, 1.0], help="largest change of a pixel")
    p.add_argument("--methods", nargs="+", default=["IBP", "CROWN-IBP", "CROWN"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_digits_model()
    x, y = load_digits_samples(args.n)
    graph = boundprop.capture(model, x[:2])
    C = margin_spec(y)
    print(f"bundled digits classifier, {args.n} test images; up to k pixels changed by at most delta (in [0, 1])")
    print(f"{'delta':>5s} {'k':>2s} " + " ".join(f"{m + ' verified':>18s}" for m in args.methods)
          + f" {'attacked':>9s} {'time':>6s}")
    rows = []
    for delta in args.delta:
        x_L, x_U = (x - delta).clamp(min=0), (x + delta).clamp(max=1)
        for k in args.k:
            start = time.time()
            ptb = {graph.inputs[0]: PerturbationL0Norm(k, x_L, x_U)}
            verified = {}
            for method in args.methods:
                with torch.no_grad() if method != "alpha-CROWN" else torch.enable_grad():
                    res = compute_bounds(graph, (x,), ptb, method=method, C=C, upper=False)
                verified[method] = int((res.lower.amin(1) > 0).sum())
            broken = int(attack(model, x, y, k, x_L, x_U).sum())
            rows.append({"delta": delta, "k": k, "verified": verified, "attacked": broken, "n": args.n})
            print(f"{delta:5.2f} {k:2d} " + " ".join(f"{verified[m]:18d}" for m in args.methods)
                  + f" {broken:9d} {time.time() - start:5.1f}s")
    return {"rows": rows}


if __name__ == "__main__":
    main()
