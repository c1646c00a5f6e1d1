"""Host reads of the verifier and of certified training on the paths an accelerator takes.

Like ``host_syncs.py`` for bound calls: runs on CPU under :func:`boundprop.syncs.device_paths`
(the branches taken when values cannot be read for free) and :func:`boundprop.syncs.count_syncs`,
and writes the reads (each a CUDA sync) per ACAS Xu instance of the shipped sample (unsat ones:
the search runs to the end) and per training step, by place. Writes
``benchmarks/results/verifier_syncs.md``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/verifier_syncs.py
"""

from __future__ import annotations

import collections
import csv
from pathlib import Path

import torch
from results_file import write_result

from boundprop.bab.verifier import Network, verify
from boundprop.syncs import count_syncs, device_paths
from boundprop.training import TrainConfig, Trainer
from boundprop.training.data import load_digits_dataset
from boundprop.training.models import build_digit_model

ROOT = Path(__file__).resolve().parents[1]
ACAS = ROOT / "tests" / "data" / "vnncomp_sample" / "acasxu"
OUT = ROOT / "benchmarks" / "results" / "verifier_syncs.md"


def _where(counter, top: int = 4) -> str:
    by = collections.Counter()
    for (op, where), n in counter.reads.items():
        by[f"{op} {where}"] += n
    return ", ".join(f"`{k}` ({n})" for k, n in by.most_common(top)) or "-"


def verifier_rows() -> list[str]:
    truth = {(r[0], r[1]): r[-1] for r in csv.reader((ACAS / "groundtruth.csv").open()) if r}
    lines = ["| ACAS Xu instance | verdict | bound calls | host reads | per bound call | where (count) |",
             "|---|---|---:|---:|---:|---|"]
    for onnx, vnnlib, timeout in csv.reader((ACAS / "instances.csv").open()):
        if truth.get((onnx, vnnlib)) != "unsat":
            continue
        net = Network.from_onnx(ACAS / onnx)
        verify(net, ACAS / vnnlib, timeout=float(timeout))  # warm: the chain is extracted once
        with device_paths(), count_syncs() as c:
            res = verify(net, ACAS / vnnlib, timeout=float(timeout))
        calls = res.stats.get("bound_calls", 0)
        lines.append(f"| {Path(onnx).stem} {Path(vnnlib).stem} | {res.verdict} | {calls} | {c.total} | "
                     f"{c.total / max(calls, 1):.1f} | {_where(c)} |")
        print(lines[-1], flush=True)
    return lines


def training_rows() -> list[str]:
    train, _ = load_digits_dataset(train_limit=256, test_limit=32)
    lines = ["| training (digits, batch 32, 8 steps, progress off) | host reads per step | where (count) |",
             "|---|---:|---|"]
    for method, fusion, arch in (("crown-ibp", True, "digits_cnn"), ("crown-ibp", False, "digits_cnn"),
                                 ("ibp", False, "digits_cnn"), ("crown", True, "digits_mlp")):
        cfg = TrainConfig(method=method, eps=0.05, epochs=2, batch_size=32, schedule="fixed", warmup_epochs=0,
                          loss_fusion=fusion, kappa_start=0.5, kappa_end=0.5, eval_methods=(), progress=False)
        trainer = Trainer(build_digit_model(arch, seed=0), train, None, cfg)
        trainer.train_epoch(1)
        with device_paths(), count_syncs() as c:
            trainer.train_epoch(2)
        label = f"{method}{', loss fusion' if fusion else ''}, {arch}"
        lines.append(f"| {label} | {c.total / trainer.batches_per_epoch:.3g} | {_where(c)} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    torch.set_num_threads(1)
    text = ["# Host reads of the verifier and of training (CUDA syncs)", "", *verifier_rows(), "",
            *training_rows(), "",
            "Counted on CPU on the accelerator paths (`boundprop.syncs.device_paths`): "
            "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/verifier_syncs.py`. Reads as in `host_syncs.md`, "
            "plus copies to the host that bypass the dispatcher (`tolist`, `numpy`)."]
    write_result(OUT, "\n".join(text), echo=True)


if __name__ == "__main__":
    main()
