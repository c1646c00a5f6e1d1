"""Before/after of one setting, in one process: the cost of a bound call with module constants as they
were (``--old``) against as they are, on a peer model.

The two settings alternate call by call (ABBA order), each call right after its own burst of
forward passes (as ``peer_compare.py`` times them), and the result is the median cost of each,
in forward passes, and their ratio. On a machine whose speed drifts by 1.5-2x within minutes, this
pairing is what makes a 5 % change visible; one-off tables are not. Kernel choices
(``boundprop.kernels``) are kept per setting, so a setting that changes layouts gets its own tuning;
``--shared-kernels`` gives both settings the same choices. Use it for changes that leave kernels and
layouts alone: tuning is itself noisy (two kernels within 15 % of each other are picked by the
machine's mood), and separate choices can differ by more than the change.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/paired_ab.py resnet_small 32 CROWN-IBP \\
        --old boundprop.algorithms.backward.SLICED_BYTES=2**62 --pairs 20

``--old MODULE.NAME=EXPR`` (repeatable) sets ``MODULE.NAME`` to the Python expression ``EXPR`` for
the "old" calls and restores it for the "new" ones (a function too, e.g. ``=lambda *a: False``).

``MODEL`` is a peer model or ``zoo:NAME``, a model of :mod:`boundprop.zoo` with a standard normal
input and ``eps`` 0.01 (as ``zoo_bench.py`` runs them). alpha-CROWN runs with autograd on and
``--alpha-iterations`` (default 20); the other methods under ``torch.no_grad()``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/paired_ab.py zoo:lstm 1 alpha-CROWN \\
        --old "boundprop.algorithms.backward._joinable=lambda *a: False" --pairs 6 --alpha-iterations 5
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import time

import torch
from peer_compare import forward_burst, load

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds, kernels
from boundprop.runtime import keep_freed_memory


def parse_override(text: str) -> tuple[object, str, object]:
    """``"pkg.mod.NAME=EXPR"`` -> ``(module, NAME, value)``."""
    target, expr = text.split("=", 1)
    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise SystemExit(f"{module_name} has no attribute {attr}")
    return module, attr, eval(expr, {}, {})  # noqa: S307 - a benchmark's command-line expression


def load_model(name: str, batch: int) -> tuple[torch.nn.Module, torch.Tensor, float]:
    """``(model, x, eps)`` of a peer model or of ``zoo:NAME``."""
    if name.startswith("zoo:"):
        from boundprop.zoo import ZOO  # noqa: PLC0415 - only for zoo models

        factory, shape = ZOO[name[4:]]
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
        return factory().eval(), x, 0.01
    model, data = load(name, batch)
    return model, data["x"], data["eps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("batch", type=int)
    parser.add_argument("method")
    parser.add_argument("--old", action="append", required=True, metavar="MODULE.NAME=EXPR")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--alpha-iterations", type=int, default=20)
    parser.add_argument("--shared-kernels", action="store_true",
                        help="one set of kernel choices for both settings (for changes that leave layouts alone)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()
    overrides = [parse_override(o) for o in args.old]
    settings = {"old": overrides, "new": [(m, a, getattr(m, a)) for m, a, _ in overrides]}
    shared: dict = {}
    choices: dict[str, dict] = {"old": shared, "new": shared} if args.shared_kernels else {"old": {}, "new": {}}

    def use(tag: str) -> None:
        for module, attr, value in settings[tag]:
            setattr(module, attr, value)
        kernels._CHOICE = choices[tag]

    model, x, eps = load_model(args.model, args.batch)
    graph = boundprop.capture(model, x)
    ptb = {graph.inputs[0]: PerturbationLpNorm(eps)}
    opts = {"optimize_bound_args": {"iteration": args.alpha_iterations}}
    grad = contextlib.nullcontext() if args.method == "alpha-CROWN" else torch.no_grad()
    costs: dict[str, list[float]] = {"old": [], "new": []}
    bounds = {}
    with grad:
        for tag in ("old", "new", "old", "new"):  # warm-up, tuning
            use(tag)
            bounds[tag] = compute_bounds(graph, (x,), ptb, method=args.method, opts=opts)
        for i in range(args.pairs):
            for tag in ("old", "new") if i % 2 == 0 else ("new", "old"):
                use(tag)
                unit, _ = forward_burst(model, x)
                start = time.perf_counter()
                compute_bounds(graph, (x,), ptb, method=args.method, opts=opts)
                costs[tag].append((time.perf_counter() - start) / unit)
    use("new")
    diff = max(float((bounds["old"].lower - bounds["new"].lower).abs().max()),
               float((bounds["old"].upper - bounds["new"].upper).abs().max()))
    old, new = statistics.median(costs["old"]), statistics.median(costs["new"])
    print(f"{args.model} batch {args.batch} {args.method}, {args.pairs} pairs: old {old:.2f} forwards, "
          f"new {new:.2f}, new / old {new / old:.3f}; largest bound difference {diff:.1e}")


if __name__ == "__main__":
    main()
