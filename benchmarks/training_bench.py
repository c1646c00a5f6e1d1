"""Certified-training benchmarks: (a) loss-fusion scaling in the number of classes, (b) digits training.

(a) ``--part fusion``: one CROWN-IBP training step (forward, bounds, loss, backward) of the same
small CNN body (conv 8@3x3, conv 16@3x3/2, fc 64, fc K) on generated ``(1, 8, 8)`` inputs in
``[0, 1]``, batch 32, eps 0.05, with and without loss fusion, for each number of classes K. Each
(K, fusion) pair runs in a fresh process: capture, two warm-up steps, then the peak extra
memory of one step (the process's peak resident set size, reset through ``/proc/self/clear_refs``
just before the step, minus the resident size then; Linux only) and the median time of
``--reps`` steps. One thread.

(b) ``--part digits``: a model (``--arch``, default digits_cnn) trained on the bundled digits
(1347 training, 450 test images, inputs in [0, 1]) naturally, with PGD and with CROWN-IBP, for
each eps in ``--eps``; final clean error, PGD error (20 steps) and verified error (IBP and CROWN)
at that eps on the 450 test images. All runs use the same epochs, warm-up, eps ramp (smoothed)
and optimiser settings; the natural model is trained once and evaluated at every eps.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/training_bench.py --part fusion
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/training_bench.py --part digits --epochs 20

Prints markdown tables (copied into benchmarks/results/training.md).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from boundprop.training import TrainConfig, evaluate, train  # noqa: E402
from boundprop.training.data import load_digits_dataset  # noqa: E402
from boundprop.training.losses import capture_graphs, robust_ce  # noqa: E402
from boundprop.training.models import build_digit_model  # noqa: E402

# ---------------------------------------------------------------------------------------------
# (a) loss fusion


def body(num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, num_classes))


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def fusion_worker(num_classes: int, fused: bool, batch: int, eps: float, reps: int) -> dict:
    torch.set_num_threads(1)
    model = body(num_classes)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 8, 8, generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    graphs = capture_graphs(model, x, fused)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = robust_ce(graphs, x, y, eps, "crown-ibp", num_classes, beta=1.0, fusion=fused).mean()
        loss.backward()
        return float(loss)

    for _ in range(2):
        step()
    opt.zero_grad(set_to_none=True)
    _trim()
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    loss = step()
    peak = _status("VmHWM") - base
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"K": num_classes, "fused": fused, "time_ms": 1e3 * statistics.median(times), "peak_mb": peak / 2**20,
            "robust_ce": loss}


def run_fusion(classes: list[int], batch: int, eps: float, reps: int) -> list[dict]:
    rows = []
    for k in classes:
        for fused in (True, False):
            cmd = [sys.executable, __file__, "--fusion-worker", str(k), str(int(fused)), "--batch", str(batch),
                   "--eps", str(eps), "--reps", str(reps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"  K={k} fused={fused}: {row['time_ms']:.1f} ms, {row['peak_mb']:.1f} MiB", file=sys.stderr)
            rows.append(row)
    return rows


def fusion_table(rows: list[dict]) -> str:
    by = {(r["K"], r["fused"]): r for r in rows}
    lines = ["| K | fused: time (ms) | unfused: time (ms) | speed-up | fused: peak (MiB) | unfused: peak (MiB) | "
             "memory ratio | robust CE fused / unfused |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in sorted({r["K"] for r in rows}):
        f, u = by[(k, True)], by[(k, False)]
        lines.append(f"| {k} | {f['time_ms']:.1f} | {u['time_ms']:.1f} | {u['time_ms'] / f['time_ms']:.1f}x | "
                     f"{f['peak_mb']:.1f} | {u['peak_mb']:.1f} | {u['peak_mb'] / max(f['peak_mb'], 1e-3):.1f}x | "
                     f"{f['robust_ce']:.3f} / {u['robust_ce']:.3f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# (b) digits


def run_digits(arch: str, eps_list: list[float], epochs: int, seed: int) -> list[dict]:
    torch.set_num_threads(1)
    train_data, test_data = load_digits_dataset()
    common = dict(epochs=epochs, batch_size=64, lr=3e-3, warmup_epochs=2, ramp_epochs=max(1, epochs // 2),
                  schedule="smoothed", kappa_start=1.0, kappa_end=0.5, eval_every=epochs, eval_methods=(),
                  eval_pgd_steps=0, progress=False, seed=seed)
    rows = []

    def final_eval(model, eps):
        return evaluate(model, test_data, eps, methods=("ibp", "crown"), pgd_steps=20, seed=seed)

    start = time.perf_counter()
    natural = build_digit_model(arch, seed=seed)
    train(natural, train_data, None, TrainConfig(method="natural", eps=0.0, **common))
    natural_s = time.perf_counter() - start
    for eps in eps_list:
        rows.append({"method": "natural", "eps": eps, "train_s": natural_s, **final_eval(natural, eps)})
        for method in ("pgd", "crown-ibp"):
            model = build_digit_model(arch, seed=seed)
            start = time.perf_counter()
            train(model, train_data, None, TrainConfig(method=method, eps=eps, **common))
            rows.append({"method": method, "eps": eps, "train_s": time.perf_counter() - start,
                         **final_eval(model, eps)})
            print(f"  {method} eps {eps}: {rows[-1]}", file=sys.stderr)
    return rows


def digits_table(rows: list[dict]) -> str:
    lines = ["| eps | training | clean error | PGD error | verified error (IBP) | verified error (CROWN) | "
             "training time (s) |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['eps']} | {r['method']} | {100 * r['clean_err']:.1f}% | {100 * r['pgd_err']:.1f}% | "
                     f"{100 * r['verified_err_ibp']:.1f}% | {100 * r['verified_err_crown']:.1f}% | "
                     f"{r['train_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("fusion", "digits", "all"), default="all")
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100, 200, 1000])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eps", type=float, nargs="+", default=None,
                   help="fusion: one eps (default 0.05); digits: the eps list (default 0.1 0.2)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--arch", default="digits_cnn")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fusion-worker", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fusion_worker is not None:
        k, fused = args.fusion_worker
        eps = args.eps[0] if args.eps else 0.05
        print(json.dumps(fusion_worker(k, bool(fused), args.batch, eps, args.reps)))
        return
    if args.part in ("fusion", "all"):
        eps = args.eps[0] if args.eps and args.part == "fusion" else 0.05
        rows = run_fusion(args.classes, args.batch, eps, args.reps)
        print(f"\n### Loss fusion: one CROWN-IBP training step, batch {args.batch}, eps {eps}\n")
        print(fusion_table(rows))
    if args.part in ("digits", "all"):
        eps_list = args.eps if args.eps and args.part == "digits" else [0.1, 0.2]
        rows = run_digits(args.arch, eps_list, args.epochs, args.seed)
        print(f"\n### Digits, {args.arch}, {args.epochs} epochs\n")
        print(digits_table(rows))


if __name__ == "__main__":
    main()
