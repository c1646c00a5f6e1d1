"""Certified-training benchmarks: (a) loss-fusion scaling in the number of classes, (b) digits training.

(a) ``--part fusion``: one CROWN-IBP training step (forward, bounds, loss, backward) of the same
body for every number of classes K: CNN-7 with BatchNorm (:func:`boundprop.zoo.cnn7_bn`, channels
8, 8, 16, 16, 16, the third conv with stride 2, FC 128, FC K; BatchNorm frozen as in training) on
generated ``(3, 32, 32)`` inputs in ``[0, 1]``, batch 32, eps 1/255, with and without loss fusion.
Each (K, fusion) pair runs in a fresh process: capture, warm-up steps, then the peak extra memory
of one step (the process's peak resident set size, reset through ``/proc/self/clear_refs`` just
before the step, minus the resident size then; Linux only) and the median time of ``--reps``
steps. Fused rows run twice (K increasing, then decreasing) and keep the smaller figures. The
unfused step at large K takes minutes and gigabytes, so it gets fewer steps (``_plan``) and is
skipped above ``--unfused-max-k``. One thread.

(b) ``--part digits``: each model of ``--arch`` (default digits_cnn) trained on the bundled digits
(1347 training, 450 test images, inputs in [0, 1]) naturally, with PGD and with CROWN-IBP, for
each eps in ``--eps``; final clean error, PGD error (20 steps) and verified error (IBP and CROWN;
CROWN on the first ``--crown-limit`` images when given) at that eps on the 450 test images. All
runs of an architecture use the same epochs, warm-up, eps ramp (smoothed) and optimiser settings;
the natural model is trained once and evaluated at every eps.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/training_bench.py --part fusion
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/training_bench.py --part digits --epochs 20
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/training_bench.py --part digits --epochs 8 \
        --arch cnn7_bn resnet wide_resnet densenet resnext transformer --arch-epochs transformer=6 --crown-limit 150

Prints markdown tables (copied into benchmarks/results/training.md).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import resource
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
from boundprop.training.models import build_digit_model, ibp_init  # noqa: E402

# ---------------------------------------------------------------------------------------------
# (a) loss fusion


#: The fusion benchmark's body: CNN-7 with BatchNorm (:func:`boundprop.zoo.cnn7_bn`: 5 conv-BN-ReLU,
#: FC-BN-ReLU, FC K) on ``(3, SIZE, SIZE)`` inputs, channels ``w, w, 2w, 2w, 2w``.
BODY = dict(channels=3, size=32, width=8, fc=128)
FUSION_EPS = 1 / 255


def body(num_classes: int, width: int = BODY["width"], fc: int = BODY["fc"], size: int = BODY["size"]) -> nn.Module:
    from boundprop import zoo
    from boundprop.training.models import freeze_batchnorm

    return freeze_batchnorm(zoo.cnn7_bn(channels=BODY["channels"], width=width, size=size, fc=fc, out=num_classes,
                                        seed=0))


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def fusion_worker(num_classes: int, fused: bool, batch: int, eps: float, reps: int, warmup: int, width: int,
                  fc: int, size: int) -> dict:
    torch.set_num_threads(1)
    model = body(num_classes, width, fc, size)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, BODY["channels"], size, size, generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    graphs = capture_graphs(model, x, fused)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = robust_ce(graphs, x, y, eps, "crown-ibp", num_classes, beta=1.0, fusion=fused).mean()
        loss.backward()
        return float(loss)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    for _ in range(warmup):
        step()
    opt.zero_grad(set_to_none=True)
    _trim()
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    loss = step()
    times = [time.perf_counter() - start]
    peak = _status("VmHWM") - base
    for _ in range(reps - 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    fwd = []
    for _ in range(5):
        start = time.perf_counter()
        forward()
        fwd.append(time.perf_counter() - start)
    return {"K": num_classes, "fused": fused, "time_ms": 1e3 * statistics.median(times), "peak_mb": peak / 2**20,
            "robust_ce": loss, "forward_ms": 1e3 * statistics.median(fwd), "reps": reps,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _plan(k: int, fused: bool, reps: int, unfused_reps: int) -> tuple[int, int]:
    """(warm-up steps, timed steps) of a row: unfused steps at large K take minutes each."""
    if fused or k <= 10:
        return 2, reps
    return (1, unfused_reps) if k <= 100 else (0, 1)


def _worker(k: int, fused: bool, batch: int, eps: float, warm: int, n: int, width: int, fc: int, size: int) -> dict:
    cmd = [sys.executable, __file__, "--fusion-worker", str(k), str(int(fused)), "--batch", str(batch),
           "--eps", str(eps), "--reps", str(n), "--warmup", str(warm), "--width", str(width), "--fc", str(fc),
           "--size", str(size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    print(f"  K={k} fused={fused}: {row}", file=sys.stderr, flush=True)
    return row


def fusion_interleaved(classes: list[int], batch: int, eps: float, rounds: int, width: int, fc: int,
                       size: int) -> dict[int, float]:
    """Median time (ms) of one fused step per K, all K in one process, stepped round-robin (``rounds``
    steps each after one warm-up step), so that load changes on a shared machine hit every K alike."""
    torch.set_num_threads(1)
    steps = {}
    for k in classes:
        model = body(k, width, fc, size)
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(batch, BODY["channels"], size, size, generator=gen)
        y = torch.randint(0, k, (batch,), generator=gen)
        graphs = capture_graphs(model, x, True)

        def step(model=model, x=x, y=y, graphs=graphs, k=k) -> None:
            model.zero_grad(set_to_none=True)
            robust_ce(graphs, x, y, eps, "crown-ibp", k, beta=1.0, fusion=True).mean().backward()

        step()
        steps[k] = step
    times: dict[int, list[float]] = {k: [] for k in classes}
    for _ in range(rounds):
        for k in classes:
            start = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def run_fusion(classes: list[int], batch: int, eps: float, reps: int, unfused_reps: int, width: int, fc: int,
               size: int, unfused_max_k: int, log: Path | None = None) -> list[dict]:
    """Fused rows: one process per K in increasing, then decreasing order (two rounds, so that a load
    change on the shared machine hits every K alike); the time is the smaller of the two medians, the
    peak memory the smaller of the two. Unfused rows: one process each (minutes at large K)."""
    rows = []
    fused_runs: dict[int, list[dict]] = {}
    for k in [*classes, *reversed(classes)]:
        warm, n = _plan(k, True, reps, unfused_reps)
        fused_runs.setdefault(k, []).append(_worker(k, True, batch, eps, warm, n, width, fc, size))
    for k in classes:
        runs = fused_runs[k]
        row = dict(runs[0], time_ms=min(r["time_ms"] for r in runs), peak_mb=min(r["peak_mb"] for r in runs),
                   forward_ms=min(r["forward_ms"] for r in runs), rounds=len(runs))
        rows.append(row)
        if k <= unfused_max_k:
            warm, n = _plan(k, False, reps, unfused_reps)
            rows.append(_worker(k, False, batch, eps, warm, n, width, fc, size))
    if log is not None:
        with log.open("a") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def fusion_table(rows: list[dict]) -> str:
    by = {(r["K"], r["fused"]): r for r in rows}
    ks = sorted({r["K"] for r in rows})
    base = by.get((ks[0], True))
    lines = ["| K | fused: time (ms) | fused: time / K=10 | unfused: time (ms) | speed-up | fused: peak (MiB) | "
             "fused: peak / K=10 | unfused: peak (MiB) | memory ratio | robust CE fused / unfused | "
             "forward pass (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in ks:
        f, u = by[(k, True)], by.get((k, False))
        t_rel = f"{f['time_ms'] / base['time_ms']:.2f}x" if base else ""
        m_rel = f"{f['peak_mb'] / max(base['peak_mb'], 1e-3):.2f}x" if base else ""
        if u is None:
            unf = ["not run", "", "not run", "", f"{f['robust_ce']:.3f} / -"]
        else:
            unf = [f"{u['time_ms']:.0f}", f"{u['time_ms'] / f['time_ms']:.1f}x", f"{u['peak_mb']:.0f}",
                   f"{u['peak_mb'] / max(f['peak_mb'], 1e-3):.1f}x", f"{f['robust_ce']:.3f} / {u['robust_ce']:.3f}"]
        lines.append(f"| {k} | {f['time_ms']:.0f} | {t_rel} | {unf[0]} | {unf[1]} | {f['peak_mb']:.0f} | {m_rel} | "
                     f"{unf[2]} | {unf[3]} | {unf[4]} | {f['forward_ms']:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# (b) digits


def _epochs_for(arch: str, epochs: int, overrides: dict[str, int]) -> int:
    return overrides.get(arch, epochs)


def run_digits(arch: str, eps_list: list[float], epochs: int, seed: int, crown_limit: int | None = None,
               log: Path | None = None, methods: tuple[str, ...] = ("natural", "pgd", "crown-ibp"),
               crown_ibp_init: bool = True, crown_epochs: int | None = None) -> list[dict]:
    """Natural (once), PGD and CROWN-IBP training of ``arch`` for each eps; final test errors.

    Clean, PGD (20 steps) and IBP-verified errors on all 450 test images; CROWN-verified error on
    the first ``crown_limit`` (all when None; CROWN on a naturally trained model is the slow part).
    """
    torch.set_num_threads(1)
    train_data, test_data = load_digits_dataset()
    def settings(n: int) -> dict:
        warmup = 1 if n < 10 else 2
        return dict(epochs=n, batch_size=64, lr=3e-3, warmup_epochs=warmup,
                    ramp_epochs=max(1, (n - warmup) // 2 if n < 10 else n // 2),
                    schedule="smoothed", kappa_start=1.0, kappa_end=0.5, eval_every=n, eval_methods=(),
                    eval_pgd_steps=0, progress=False, seed=seed)

    common = settings(epochs)
    rows = []

    def final_eval(model, eps):
        out = evaluate(model, test_data, eps, methods=("ibp",), pgd_steps=20, seed=seed)
        crown = evaluate(model, test_data, eps, methods=("crown",), pgd_steps=0, seed=seed, limit=crown_limit)
        out["verified_err_crown"] = crown["verified_err_crown"]
        out["n_crown"] = crown["n"]
        return out

    def record(row):
        rows.append(row)
        print(f"  {arch} {row['method']} eps {row['eps']}: {row}", file=sys.stderr, flush=True)
        if log is not None:
            with log.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    start = time.perf_counter()
    natural = build_digit_model(arch, seed=seed)
    params = sum(p.numel() for p in natural.parameters())
    if "natural" in methods:
        train(natural, train_data, None, TrainConfig(method="natural", eps=0.0, **common))
    natural_s = time.perf_counter() - start
    for eps in eps_list:
        if "natural" in methods:
            record({"arch": arch, "params": params, "epochs": epochs, "method": "natural", "eps": eps,
                    "train_s": natural_s, **final_eval(natural, eps)})
        for method in [m for m in ("pgd", "crown-ibp") if m in methods]:
            model = build_digit_model(arch, seed=seed)
            if method == "crown-ibp" and crown_ibp_init:
                ibp_init(model, seed=seed)
            n = crown_epochs if method == "crown-ibp" and crown_epochs else epochs
            start = time.perf_counter()
            train(model, train_data, None, TrainConfig(method=method, eps=eps, **settings(n)))
            init = "ibp" if method == "crown-ibp" and crown_ibp_init else "default"
            record({"arch": arch, "params": params, "epochs": n, "method": method, "eps": eps, "init": init,
                    "train_s": time.perf_counter() - start, **final_eval(model, eps)})
    return rows


def digits_table(rows: list[dict]) -> str:
    lines = ["| architecture (params, epochs) | eps | training | clean error | PGD error | verified error (IBP) | "
             "verified error (CROWN) | training time (s) |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        crown = f"{100 * r['verified_err_crown']:.1f}%"
        if r.get("n_crown", r.get("n")) != r.get("n"):
            crown += f" ({r['n_crown']})"
        arch = f"{r.get('arch', '')} ({r.get('params', '?')}, {r.get('epochs', '?')})"
        method = r["method"] + (" (IBP init)" if r.get("init") == "ibp" else "")
        lines.append(f"| {arch} | {r['eps']} | {method} | {100 * r['clean_err']:.1f}% | "
                     f"{100 * r['pgd_err']:.1f}% | {100 * r['verified_err_ibp']:.1f}% | {crown} | "
                     f"{r['train_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("fusion", "digits", "all"), default="all")
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100, 200, 1000])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eps", type=float, nargs="+", default=None,
                   help="fusion: one eps (default 1/255); digits: the eps list (default 0.1 0.2)")
    p.add_argument("--reps", type=int, default=5, help="fusion: timed steps per fused row (and unfused K <= 100)")
    p.add_argument("--unfused-reps", type=int, default=2, help="fusion: timed steps of the unfused row at K = 100 "
                   "(1 warm-up step; above K = 100: no warm-up, one timed step)")
    p.add_argument("--unfused-max-k", type=int, default=200,
                   help="fusion: skip the unfused step above this K (K = 1000 needs ~18 GiB and minutes per step)")
    p.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                   help="fusion: also time the fused step of every K in one process, round-robin, ROUNDS steps each")
    p.add_argument("--fusion-log", type=Path, default=None, help="fusion: append each row (JSON) to this file")
    p.add_argument("--fusion-table-from", type=Path, default=None, help="print the fusion table from a --fusion-log")
    p.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=BODY["width"], help="fusion: CNN-7 base width")
    p.add_argument("--fc", type=int, default=BODY["fc"], help="fusion: CNN-7 hidden fully connected width")
    p.add_argument("--size", type=int, default=BODY["size"], help="fusion: input height and width (3 channels)")
    p.add_argument("--arch", nargs="+", default=["digits_cnn"],
                   help="digits: architectures (boundprop.training.models.DIGIT_MODELS), run one after the other")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--arch-epochs", nargs="*", default=[], metavar="ARCH=N",
                   help="digits: per-architecture epoch counts overriding --epochs")
    p.add_argument("--crown-limit", type=int, default=None,
                   help="digits: CROWN-verified error on the first N test images only (default: all 450)")
    p.add_argument("--methods", nargs="+", default=["natural", "pgd", "crown-ibp"],
                   help="digits: which trainings to run (default all three)")
    p.add_argument("--crown-ibp-epochs", type=int, default=None,
                   help="digits: epochs of the CROWN-IBP runs (default: those of the architecture)")
    p.add_argument("--no-ibp-init", action="store_true",
                   help="digits: CROWN-IBP from the default initialisation instead of the IBP one (ibp_init)")
    p.add_argument("--log", type=Path, default=None, help="digits: append each result row (JSON) to this file")
    p.add_argument("--table-from", type=Path, nargs="+", default=None,
                   help="print the digits table from JSON-lines logs written by --log, and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fusion-worker", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fusion_table_from:
        print(fusion_table([json.loads(line) for line in args.fusion_table_from.read_text().splitlines() if line]))
        return
    if args.table_from:
        rows = [json.loads(line) for path in args.table_from for line in path.read_text().splitlines() if line]
        print(digits_table(rows))
        return
    if args.fusion_worker is not None:
        k, fused = args.fusion_worker
        eps = args.eps[0] if args.eps else FUSION_EPS
        print(json.dumps(fusion_worker(k, bool(fused), args.batch, eps, args.reps, args.warmup, args.width, args.fc,
                                       args.size)))
        return
    if args.part in ("fusion", "all"):
        eps = args.eps[0] if args.eps and args.part == "fusion" else FUSION_EPS
        rows = run_fusion(args.classes, args.batch, eps, args.reps, args.unfused_reps, args.width, args.fc, args.size,
                          args.unfused_max_k, args.fusion_log)
        print(f"\n### Loss fusion: one CROWN-IBP training step, batch {args.batch}, eps {eps}\n")
        print(fusion_table(rows))
        if args.interleaved:
            med = fusion_interleaved(args.classes, args.batch, eps, args.interleaved, args.width, args.fc, args.size)
            k0 = args.classes[0]
            print(f"\nFused step, all K in one process, round-robin ({args.interleaved} steps each):\n")
            print("| K | " + " | ".join(str(k) for k in args.classes) + " |")
            print("|---|" + "---:|" * len(args.classes))
            print("| time (ms) | " + " | ".join(f"{med[k]:.0f}" for k in args.classes) + " |")
            print(f"| time / K={k0} | " + " | ".join(f"{med[k] / med[k0]:.2f}x" for k in args.classes) + " |")
    if args.part in ("digits", "all"):
        eps_list = args.eps if args.eps and args.part == "digits" else [0.1, 0.2]
        overrides = {k: int(v) for k, v in (item.split("=") for item in args.arch_epochs)}
        rows = []
        for arch in args.arch:
            rows += run_digits(arch, eps_list, _epochs_for(arch, args.epochs, overrides), args.seed,
                               args.crown_limit, args.log, tuple(args.methods), not args.no_ibp_init,
                               args.crown_ibp_epochs)
        print(f"\n### Digits: {', '.join(args.arch)}\n")
        print(digits_table(rows))


if __name__ == "__main__":
    main()
