"""Device check of the beyond-input perturbations: the same bounds on a GPU as on the CPU.

For weight perturbation (conv + batch norm + linear weights with an input ball), L0, synonym
substitutions (the bundled LSTM) and Jacobian bounds, compute the bounds on the CPU and on
``DEVICE`` (default ``cuda``) and print the largest difference relative to the bounds' width,
and the time of one call on each device.

Usage (repository root): ``PYTHONPATH=src python3 scripts/gpu_check_perturbations.py [DEVICE]``.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn as nn

import boundprop
from boundprop import (
    PerturbationL0Norm,
    PerturbationLpNorm,
    PerturbationSynonym,
    compute_bounds,
    jacobian_bounds,
    perturb_parameters,
)
from boundprop.data.sentiment import encode, load_sentiment_models, synonym_ids


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 10))
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 1.5)
        model[1].weight.uniform_(0.5, 1.5)
    return model.eval()


def cases():
    """``name -> fn(device) -> (lower, upper)``."""
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}

    def weights(device):
        model = conv_net().to(device)
        g = boundprop.capture(model, x[:2].to(device))
        ptbs = perturb_parameters(g, {"0.weight": 0.02, "1.weight": 0.02, "3.weight": 0.02}, relative=True)
        ptbs[g.inputs[0]] = PerturbationLpNorm(0.01)
        return lambda: compute_bounds(g, (x.to(device),), ptbs, method="CROWN")

    def l0(device):
        model = conv_net().to(device)
        g = boundprop.capture(model, x[:2].to(device))
        xd = x.to(device)
        ptb = PerturbationL0Norm(2, (xd - 0.2).clamp(min=0), (xd + 0.2).clamp(max=1))
        return lambda: compute_bounds(g, (xd,), {g.inputs[0]: ptb}, method="CROWN")

    def synonyms(device):
        bundle = load_sentiment_models()
        model = bundle.classifiers["lstm"].to(device)
        tokens = encode(["the movie was very good", "i hated the plot", "this film is not bad"])
        xe = bundle.embed(tokens).to(device)
        g = boundprop.capture(model, xe[:2])
        ptb = PerturbationSynonym.from_tokens(tokens, bundle.embedding.weight.to(device), synonym_ids(), 2)
        return lambda: compute_bounds(g, (xe,), {g.inputs[0]: ptb}, method="CROWN")

    def jacobian(device):
        model = conv_net().to(device)
        g = boundprop.capture(model, x[:2].to(device))
        xd = x.to(device)
        return lambda: jacobian_bounds(g, xd, PerturbationLpNorm(0.01), method="CROWN")

    out.update(weights=weights, l0=l0, synonyms=synonyms, jacobian=jacobian)
    return out


def run(fn_maker, device):
    fn = fn_maker(device)
    with torch.no_grad():
        res = fn()
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        res = fn()
        if device != "cpu":
            torch.cuda.synchronize()
    return time.perf_counter() - start, res.lower.detach().cpu(), res.upper.detach().cpu()


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    print(f"device {device}: {torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}")
    print(f"{'case':10s} {'cpu s':>8s} {device + ' s':>8s} {'max rel diff':>12s}")
    for name, maker in cases().items():
        t_cpu, lo_c, up_c = run(maker, "cpu")
        t_dev, lo_d, up_d = run(maker, device)
        width = (up_c - lo_c).abs().clamp(min=1e-6)
        diff = float(torch.maximum((lo_c - lo_d).abs() / width, (up_c - up_d).abs() / width).max())
        print(f"{name:10s} {t_cpu:8.3f} {t_dev:8.3f} {diff:12.2e}")


if __name__ == "__main__":
    main()
