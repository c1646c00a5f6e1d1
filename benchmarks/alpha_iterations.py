"""alpha-CROWN: iterations and CPU time needed to reach auto_LiRPA 0.7.1's bound (peer models).

For each model and batch, alpha-CROWN (lr 0.5, as auto_LiRPA's 20-iteration run in
``/work/shared/peer``) is run with ``iteration`` = 1, 2, 4, ..., 20; for each count the mean bound
width, whether every bound is at least as tight as auto_LiRPA's (up to 1e-6 relative), and the CPU
time of the call as a multiple of the CPU time of one forward pass. One thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/alpha_iterations.py --models mlp cnn --batches 1
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds

PEER = Path("/work/shared/peer")


def forward_cpu(model, x) -> float:
    with torch.no_grad():
        model(x)
        start = time.process_time()
        for _ in range(200):
            model(x)
        return (time.process_time() - start) / 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--iterations", nargs="+", type=int, default=[1, 2, 4, 6, 8, 10, 12, 16, 20])
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(PEER))
    import peer_models

    with open(PEER / "results.csv") as f:
        peer_cost = {(r["model"], int(r["batch"])): float(r["cost_in_forwards"]) for r in csv.DictReader(f)
                     if r["method"] == "alpha-CROWN"}
    print("| model | batch | iterations | mean width | auto_LiRPA width (20 it.) | as tight everywhere | "
          "cost (CPU, forwards) | auto_LiRPA cost (20 it.) | ratio |\n|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for name in args.models:
        for batch in args.batches:
            data = torch.load(PEER / f"{name}_b{batch}.pt", weights_only=False)
            model = peer_models.build_model(name)
            model.load_state_dict(data["state_dict"])
            model.eval()
            x = data["x"]
            graph = boundprop.capture(model, x)
            ptb = {graph.inputs[0]: PerturbationLpNorm(data["eps"])}
            lo_p, up_p = data["bounds"]["alpha-CROWN"]
            fwd = forward_cpu(model, x)
            for it in args.iterations:
                opts = {"optimize_bound_args": {"iteration": it, "lr_alpha": 0.5}}
                start = time.process_time()
                res = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", opts=opts)
                cpu = time.process_time() - start
                tol = 1e-6 * torch.clamp(torch.maximum(lo_p.abs(), up_p.abs()), min=1.0)
                looser = (res.lower < lo_p - tol).sum() + (res.upper > up_p + tol).sum()
                tight = "yes" if int(looser) == 0 else f"no ({int(looser)} of {2 * lo_p.numel()} looser)"
                cost = cpu / fwd
                peer = peer_cost.get((name, batch))
                print(f"| {name} | {batch} | {it} | {float((res.upper - res.lower).mean()):.6g} | "
                      f"{float((up_p - lo_p).mean()):.6g} | {tight} | {cost:.0f} | "
                      f"{peer:.0f} | {cost / peer:.2f} |", flush=True)


if __name__ == "__main__":
    main()
