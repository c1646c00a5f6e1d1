"""GPU check: the same code on CUDA gives the same bounds as on the CPU, and how long it takes.

Usage (on a machine with a GPU, from the repository root)::

    PYTHONPATH=src python3 scripts/gpu_check.py PEER_DIR OUT.md

The device tool sends the checkout only (``../shared`` stays behind): copy the peer folder in
first (``cp -r ../shared/peer .peer && echo /.peer/ >> .git/info/exclude``), carry ``.peer`` and
pass ``.peer`` as ``PEER_DIR``, with ``OUT.md`` under ``$OUT``. The table is rewritten after
every section, so a run cut short still returns what it measured.

``PEER_DIR`` holds ``peer_models.py`` and the ``<model>_b<batch>.pt`` files (auto_LiRPA's bounds,
computed on a CPU). For every model, batch and method: the median time of 3 calls after a warm-up
(``torch.cuda.synchronize`` around each), one forward pass's time, the largest difference to
the stored auto_LiRPA bounds relative to their width, and the syncs one call makes (CUDA's own
sync debug mode; ``benchmarks/host_syncs.py`` counts the same reads on a CPU). Then the verifier
on the shipped ACAS Xu instances and one epoch of certified training, each on the CPU and on CUDA
(same verdicts and losses expected; the times).

The zoo on the same GPU, if device time is left::

    PYTHONPATH=src python3 benchmarks/zoo_bench.py --device cuda --budget 0.3 --out benchmarks/results/zoo_gpu.md
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds

METHODS = ("IBP", "CROWN-IBP", "CROWN", "forward", "alpha-CROWN")


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def cuda_syncs(fn) -> int:
    """Synchronising operations in one call of ``fn``, as CUDA's sync debug mode reports them."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main(peer_dir: str, out_path: str) -> None:
    sys.path.insert(0, peer_dir)
    import peer_models

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    lines = [f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, float32, TF32 off", "",
             "| model | batch | method | time (ms) | forward (ms) | cost in forwards | mean width | "
             "max diff / width vs auto_LiRPA | syncs per call |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ("mlp", "cnn", "resnet_small"):
        for batch in (1, 32):
            path = Path(peer_dir) / f"{name}_b{batch}.pt"
            if not path.exists():
                continue
            data = torch.load(path, weights_only=False)
            build = getattr(peer_models, "build_model", None)
            model = build(name) if build is not None else getattr(peer_models, name)()
            model.load_state_dict(data["state_dict"])
            model = model.eval().to(device)
            x = data["x"].to(device)
            graph = boundprop.capture(model, x)
            ptb = {graph.inputs[0]: PerturbationLpNorm(data["eps"])}
            with torch.no_grad():
                fwd, _ = timed(lambda m=model, x=x: m(x), 10)
            for method in METHODS:
                if method == "alpha-CROWN" and (name == "resnet_small" or batch == 32):
                    continue
                try:
                    with torch.no_grad():
                        t, res = timed(lambda g=graph, x=x, p=ptb, m=method: compute_bounds(g, (x,), p, method=m),
                                       1 if method == "alpha-CROWN" else 3)
                except Exception as err:  # noqa: BLE001 - report and go on
                    lines.append(f"| {name} | {batch} | {method} | error: {type(err).__name__}: {err} | | | | | |")
                    continue
                width = float((res.upper - res.lower).mean())
                ref = data["bounds"].get(method)
                diff = ""
                if ref is not None:
                    lo, hi = (r.to(device) for r in ref)
                    scale = float((hi - lo).abs().max())
                    worst = max(float((res.lower - lo).abs().max()), float((res.upper - hi).abs().max()))
                    diff = f"{worst / scale:.1e}"
                syncs = cuda_syncs(lambda g=graph, x=x, p=ptb, m=method: compute_bounds(g, (x,), p, method=m))
                lines.append(f"| {name} | {batch} | {method} | {t * 1e3:.2f} | {fwd * 1e3:.3f} | {t / fwd:.0f} | "
                             f"{width:.6g} | {diff} | {syncs} |")
            print("\n".join(lines[-len(METHODS):]), flush=True)
    Path(out_path).write_text("\n".join(lines) + "\n")
    try:
        lines += ["", *verifier_and_training_lines()]
    except Exception as err:  # noqa: BLE001 - keep the bounds table whatever happens here
        lines += ["", f"verifier / training check failed: {type(err).__name__}: {err}"]
    Path(out_path).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def verifier_and_training_lines() -> list[str]:
    """The shipped ACAS Xu instances verified on the CPU and on CUDA, and one training epoch on each."""
    import csv

    from boundprop.bab.verifier import Network, verify
    from boundprop.training import TrainConfig, Trainer
    from boundprop.training.data import load_digits_dataset
    from boundprop.training.models import build_digit_model

    root = Path(__file__).resolve().parents[1] / "tests" / "data" / "vnncomp_sample" / "acasxu"
    lines = ["| ACAS Xu instance | CPU verdict | CPU (s) | CUDA verdict | CUDA (s) |", "|---|---|---|---|---|"]
    with (root / "instances.csv").open() as fh:
        rows = [r for r in csv.reader(fh) if r][:6]
    nets: dict[tuple[str, str], Network] = {}
    for onnx, vnnlib, timeout in rows:
        cells = []
        for device in ("cpu", "cuda"):
            net = nets.setdefault((onnx, device), Network.from_onnx(root / onnx, device=device))
            res = verify(net, root / vnnlib, timeout=float(timeout))
            cells += [res.verdict, f"{res.time_s:.2f}"]
        lines.append(f"| {Path(onnx).stem} {Path(vnnlib).stem} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    train, test = load_digits_dataset(train_limit=512, test_limit=128)
    lines += ["", "| training (digits_cnn, crown-ibp, 1 epoch of 512) | loss | verified err (IBP) | time (s) |",
              "|---|---|---|---|"]
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(method="crown-ibp", eps=0.05, epochs=1, batch_size=64, schedule="fixed", warmup_epochs=0,
                          eval_methods=("ibp",), eval_pgd_steps=0, progress=False, device=device)
        start = time.perf_counter()
        last = Trainer(build_digit_model("digits_cnn", seed=0), train, test, cfg).fit().history[-1]
        lines.append(f"| {device} | {last['loss']:.6f} | {last['verified_err_ibp']:.4f} | "
                     f"{time.perf_counter() - start:.2f} |")
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
