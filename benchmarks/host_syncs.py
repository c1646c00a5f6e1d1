"""Host reads per bound call on the paths an accelerator takes: each one is a CUDA sync.

Runs every method on the peer models (``peer_compare.py``'s) and the zoo, on CPU, with
:func:`boundprop.syncs.device_paths` (the branches taken when values cannot be read for free) and
:func:`boundprop.syncs.count_syncs`, and writes the reads per call and where they happen. No GPU
is needed: the count is the same on any device (the sizes of what is read differ, not the reads).
Writes ``benchmarks/results/host_syncs.md`` (prose from ``host_syncs.notes.md`` beside it).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/host_syncs.py

``--before REV`` also counts a git revision's code (a worktree on ``PYTHONPATH``; this tree's
``syncs.py`` is copied in where it lacks one). A revision without ``device_paths`` is counted on
its CPU branches; ``--skip FILE:LINE`` leaves out the reads it already skipped off the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peer_compare import load
from results_file import write_result

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds, syncs
from boundprop.zoo import ZOO

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "host_syncs.md"
METHODS = ("IBP", "CROWN-IBP", "CROWN", "forward", "alpha-CROWN")
ALPHA_ITERATIONS = 5


def count(skip: set[str]) -> list[dict]:
    """Reads per call for every (model, method) of this tree's (or the revision's) boundprop."""
    paths = getattr(syncs, "device_paths", contextlib.nullcontext)
    cases = [(f"peer {m}", *load(m, 1)) for m in ("mlp", "cnn", "resnet_small")]
    for name in ("transformer", "lstm", "gelu_layernorm_mlp"):
        factory, shape = ZOO[name]
        x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
        cases.append((f"zoo {name}", factory(), {"x": x, "eps": 0.01}))
    rows = []
    for label, model, data in cases:
        x = data["x"]
        graph = boundprop.capture(model, x)
        ptb = {graph.inputs[0]: PerturbationLpNorm(data["eps"])}
        for method in METHODS:
            if method == "alpha-CROWN" and "resnet" in label:
                continue  # 51 s a call, more under the counter
            opts = {"optimize_bound_args": {"iteration": ALPHA_ITERATIONS}} if method == "alpha-CROWN" else None
            grad = contextlib.nullcontext() if method == "alpha-CROWN" else torch.no_grad()
            try:
                with grad, paths(), syncs.count_syncs() as c:
                    compute_bounds(graph, (x,), ptb, method=method, opts=opts)
            except NotImplementedError:
                continue
            reads = {f"{op} {where}": n for (op, where), n in c.reads.items() if where not in skip}
            rows.append({"case": label, "method": method, "total": sum(reads.values()), "reads": reads})
            print(label, method, rows[-1]["total"], flush=True)
    return rows


def count_revision(rev: str, skip: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
        try:
            target = tree / "src" / "boundprop" / "syncs.py"
            if not target.exists():
                target.write_text((ROOT / "src" / "boundprop" / "syncs.py").read_text())
            out = Path(tmp) / "rows.json"
            cmd = [sys.executable, __file__, "--json", str(out)]  # this script, the revision's package
            for s in skip:
                cmd += ["--skip", s]
            subprocess.run(cmd, check=True, env={"PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1",
                                                  "PATH": "/usr/bin:/bin"})
            return json.loads(out.read_text())
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)


def table(rows: list[dict], before: list[dict] | None) -> str:
    old = {(r["case"], r["method"]): r["total"] for r in before or []}
    head = "| case | method | host reads per call |" + (" before |" if before else "") + " where (count) |"
    lines = [head, "|" + "---|" * (4 + bool(before))]
    for r in rows:
        where = ", ".join(f"`{k}` ({n})" for k, n in sorted(r["reads"].items(), key=lambda kv: -kv[1])[:3])
        prev = f" {old.get((r['case'], r['method']), '')} |" if before else ""
        lines.append(f"| {r['case']} | {r['method']} | {r['total']} |{prev} {where or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", metavar="REV")
    parser.add_argument("--skip", action="append", default=[], metavar="FILE:LINE",
                        help="leave out reads at this place (e.g. ones a revision already skipped off the CPU)")
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # a revision's run, for --before
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = count(set(args.skip))
    if args.json:
        args.json.write_text(json.dumps(rows))
        return
    before = count_revision(args.before, args.skip) if args.before else None
    text = ["# Host reads per bound call (CUDA syncs)", "", table(rows, before), "",
            f"Batch 1, eps 0.01 (peer models: their stored eps), alpha-CROWN {ALPHA_ITERATIONS} iterations. "
            "Counted on CPU on the accelerator paths (`boundprop.syncs.device_paths`): "
            "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/host_syncs.py"
            + (f" --before {args.before}" + "".join(f" --skip {s}" for s in args.skip) if args.before else "")
            + "`. A read is a scalar read (`_local_scalar_dense`: `item`, `bool`, `float`), a data-dependent "
            "shape (`nonzero`), a whole-tensor comparison (`equal`) or a copy to the host (`to_host`); "
            "reads inside `torch.optim` (its step counters live on the CPU) are not counted."]
    write_result(OUT, "\n".join(text), echo=True)


if __name__ == "__main__":
    main()
