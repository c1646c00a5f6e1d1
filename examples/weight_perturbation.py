"""Flat loss landscapes with certified weight perturbation (digits MLP).

Two small MLPs (64-32-10) are trained on the 8x8 digits: one naturally (cross-entropy), one
"flat": cross-entropy plus the certified upper bound of the cross-entropy when every Linear
weight may change by a fraction ``--train-radius`` of itself (L-inf, relative), bounded by
CROWN-IBP through boundprop. For several radii the script then reports, on the test images,

* ``certified``: the mean over the test images of a sound upper bound of their loss, valid for
  every weight perturbation in the box (the same perturbation for all images);
* ``sampled worst``: the largest mean test loss found by random vertices of the box and a few
  steps of projected gradient ascent on the weights (a lower bound of the true worst case);

and plots the test loss along random vertex directions of the weight box, with the certified
bound at each radius drawn over it (``--out``, PNG).

Usage: ``.venv/bin/python examples/weight_perturbation.py [--epochs 15] [--out landscape.png]``
(about a minute on one CPU thread).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import boundprop
from boundprop import compute_bounds, perturb_parameters


def load_data(train_limit: int | None, test_limit: int | None):
    """Digits ``(x_train, y_train, x_test, y_test)``, images flattened to 64 values in [0, 1]."""
    try:
        from boundprop.training.data import load_digits_dataset

        train, test = load_digits_dataset(train_limit=train_limit, test_limit=test_limit)
        x_tr, y_tr = train.tensors
        x_te, y_te = test.tensors
    except (ImportError, FileNotFoundError):  # only the 100 bundled test images: split them
        from boundprop.data import load_digits_samples

        x, y = load_digits_samples()
        x_tr, y_tr, x_te, y_te = x[:70], y[:70], x[70:], y[70:]
        if train_limit:
            x_tr, y_tr = x_tr[:train_limit], y_tr[:train_limit]
        if test_limit:
            x_te, y_te = x_te[:test_limit], y_te[:test_limit]
    return x_tr.flatten(1), y_tr, x_te.flatten(1), y_te


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def margin_spec(y: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """``C[b, j] = e_{y_b} - e_j``: rows bound the margins ``z_y - z_j`` (the row j = y is zero)."""
    eye = torch.eye(num_classes)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def certified_loss(graph, x: torch.Tensor, y: torch.Tensor, radius: float, method: str = "CROWN-IBP") -> torch.Tensor:
    """Per-example upper bounds of the cross-entropy for every weight in the relative box.

    ``CE = log sum_j exp(z_j - z_y) <= log sum_j exp(-lower(z_y - z_j))``.
    """
    ptbs = perturb_parameters(graph, {"*.weight": radius}, relative=True)
    res = compute_bounds(graph, (x,), ptbs, method=method, C=margin_spec(y), upper=False)
    return torch.logsumexp(-res.lower, dim=1)


def train(model: nn.Module, graph, x, y, epochs: int, radius: float, flat: bool, batch: int = 64,
          seed: int = 0) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(y) + batch - 1) // batch)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if flat:  # ramp the radius up over the first half of training
                r = radius * min(1.0, 2 * step / max(1, steps))
                if r > 0:
                    loss = loss + certified_loss(graph, x[idx], y[idx], r).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return model.eval()


def _loss_at(model: nn.Module, params: dict, x, y) -> torch.Tensor:
    return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)


def sampled_worst(model: nn.Module, x, y, radius: float, samples: int, pgd_steps: int = 10, seed: int = 0) -> float:
    """The largest mean loss found at random vertices of the relative box and by PGD on the weights."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = [k for k in params if k.endswith("weight")]
    gen = torch.Generator().manual_seed(seed)
    worst = float(_loss_at(model, params, x, y))
    with torch.no_grad():
        for _ in range(samples):
            over = {k: params[k] * (1 + radius * torch.sign(torch.rand(params[k].shape, generator=gen) - 0.5))
                    for k in names}
            worst = max(worst, float(_loss_at(model, {**params, **over}, x, y)))
    delta = {k: torch.zeros_like(params[k], requires_grad=True) for k in names}
    for _ in range(pgd_steps):
        over = {k: params[k] * (1 + radius * delta[k]) for k in names}
        loss = _loss_at(model, {**params, **over}, x, y)
        grads = torch.autograd.grad(loss, list(delta.values()))
        worst = max(worst, float(loss.detach()))
        with torch.no_grad():
            for d, g in zip(delta.values(), grads):
                d.add_(0.5 * g.sign()).clamp_(-1, 1)
    with torch.no_grad():
        over = {k: params[k] * (1 + radius * delta[k]) for k in names}
        worst = max(worst, float(_loss_at(model, {**params, **over}, x, y)))
    return worst


def gradient_direction(model: nn.Module, x, y) -> dict:
    """The vertex direction ``d = sign(w * grad)`` in which the loss rises fastest (relative box)."""
    params = {k: v.detach().requires_grad_(True) for k, v in model.named_parameters()}
    names = [k for k in params if k.endswith("weight")]
    grads = torch.autograd.grad(_loss_at(model, params, x, y), [params[k] for k in names])
    return {k: torch.sign(params[k].detach() * g) for k, g in zip(names, grads)}


def landscape(model: nn.Module, x, y, max_radius: float, directions: int, points: int = 21, seed: int = 1):
    """Loss along random vertex directions ``w (1 + t d)``, ``d in {-1, 1}``, ``t in [-1.5 r, 1.5 r]``;
    the last curve follows the gradient's vertex direction."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = [k for k in params if k.endswith("weight")]
    gen = torch.Generator().manual_seed(seed)
    ts = torch.linspace(-1.5 * max_radius, 1.5 * max_radius, points)
    dirs = [{k: torch.sign(torch.rand(params[k].shape, generator=gen) - 0.5) for k in names}
            for _ in range(directions)]
    dirs.append(gradient_direction(model, x, y))
    curves = []
    with torch.no_grad():
        for d in dirs:
            curves.append([float(_loss_at(model, {**params, **{k: params[k] * (1 + float(t) * d[k]) for k in names}},
                                          x, y)) for t in ts])
    return ts, curves


def plot(path: Path, ts, curves: dict, bounds: dict, radii) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.8), sharey=True)
    for ax, (name, lines) in zip(axes, curves.items()):
        for i, line in enumerate(lines[:-1]):
            label = "loss along random directions" if i == 0 else None
            ax.plot(ts, line, color="tab:blue", alpha=0.5, lw=1, label=label)
        ax.plot(ts, lines[-1], color="tab:orange", lw=1.5, label="loss along the gradient's sign direction")
        rs = [0.0, *radii]
        bs = [bounds[name][0.0], *[bounds[name][r] for r in radii]]
        ax.plot(rs, bs, "o-", color="tab:red", label="certified bound (radius |t|)")
        ax.plot([-r for r in rs], bs, "o-", color="tab:red")
        ax.set_title(f"{name} training")
        ax.set_xlabel("relative weight change t")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean test cross-entropy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-radius", type=float, default=0.05, help="relative weight radius trained against")
    p.add_argument("--radii", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1])
    p.add_argument("--samples", type=int, default=None, help="training images to use (default all)")
    p.add_argument("--test", type=int, default=None, help="test images to use (default all)")
    p.add_argument("--random", type=int, default=50, help="random weight vertices per radius")
    p.add_argument("--directions", type=int, default=8, help="random directions in the plot")
    p.add_argument("--method", default="CROWN-IBP", help="bound method for the evaluation")
    p.add_argument("--out", type=Path, default=Path("weight_landscape.png"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    x_tr, y_tr, x_te, y_te = load_data(args.samples, args.test)
    models = {}
    for name, flat in (("natural", False), ("flat", True)):
        model = make_mlp(0)
        graph = boundprop.capture(model, x_tr[:2])
        t0 = time.time()
        models[name] = (train(model, graph, x_tr, y_tr, args.epochs, args.train_radius, flat), graph)
        print(f"{name} training: {time.time() - t0:.1f} s")
    rows, bounds, curves = [], {}, {}
    print(f"{len(y_tr)} training and {len(y_te)} test images; relative L-inf radius on all Linear weights; "
          f"bounds by {args.method}")
    print(f"{'model':8s} {'radius':>7s} {'test acc':>8s} {'nominal':>8s} {'sampled worst':>14s} {'certified':>10s}")
    for name, (model, graph) in models.items():
        with torch.no_grad():
            logits = model(x_te)
        acc = float((logits.argmax(-1) == y_te).float().mean())
        nominal = float(F.cross_entropy(logits, y_te))
        bounds[name] = {0.0: nominal}
        for r in args.radii:
            with torch.no_grad():
                cert = float(certified_loss(graph, x_te, y_te, r, args.method).mean())
            worst = sampled_worst(model, x_te, y_te, r, args.random)
            bounds[name][r] = cert
            rows.append({"model": name, "radius": r, "accuracy": acc, "nominal": nominal, "sampled_worst": worst,
                         "certified": cert})
            print(f"{name:8s} {r:7.3f} {acc:8.3f} {nominal:8.3f} {worst:14.3f} {cert:10.3f}")
        ts, curves[name] = landscape(model, x_te, y_te, max(args.radii), args.directions)
    plot(args.out, ts.tolist(), curves, bounds, args.radii)
    print(f"plot: {args.out}   ({time.time() - start:.0f} s)")
    return {"rows": rows, "plot": str(args.out)}


if __name__ == "__main__":
    main()
