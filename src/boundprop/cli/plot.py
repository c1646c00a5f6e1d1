"""``--plot``: bound bars per output (or per margin) of the first sample, one colour per method.

matplotlib is an optional dependency (``pip install 'boundprop[plot]'``); it is imported here only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .loaders import CliError


def require_matplotlib() -> None:
    """Fail early, with the install command, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise CliError("--plot needs matplotlib, which is not installed: pip install 'boundprop[plot]' "
                       "(or pip install matplotlib)") from err


def plot_first_sample(path: str, methods: Sequence[str], outcomes: Sequence, nominal: torch.Tensor, spec: str,
                      label: int | None, eps: float, norm: str) -> None:
    """Draw ``[lower, upper]`` bars of each method for every output (spec none) or margin ``y_label - y_j``.

    ``outcomes[k]`` has ``lower``/``upper`` (``(1, K)`` or ``(1, K-1)``) or ``na`` set (skipped).
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nominal = nominal.detach().reshape(-1)
    if spec == "margin":
        others = [j for j in range(nominal.numel()) if j != label]
        ticks = [f"{label}-{j}" for j in others]
        centre = [float(nominal[label] - nominal[j]) for j in others]
        ylabel = f"margin y[{label}] - y[j]"
    else:
        ticks = [str(j) for j in range(nominal.numel())]
        centre = [float(v) for v in nominal]
        ylabel = "output"
    shown = [(m, o) for m, o in zip(methods, outcomes) if o.na is None]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(ticks)), 4.0))
    bar = 0.8 / max(1, len(shown))
    for k, (name, o) in enumerate(shown):
        lo = o.lower.reshape(-1).tolist()
        hi = o.upper.reshape(-1).tolist()
        xs = [i - 0.4 + bar * (k + 0.5) for i in range(len(ticks))]
        ax.bar(xs, [h - lo_ for lo_, h in zip(lo, hi)], bottom=lo, width=bar * 0.9, label=name, alpha=0.8)
    ax.scatter(range(len(ticks)), centre, color="black", marker="_", s=200, zorder=3, label="nominal")
    if spec == "margin":
        ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(ticks)))
    ax.set_xticklabels(ticks)
    ax.set_ylabel(ylabel)
    ax.set_title(f"sample 0: bounds under an L{norm} ball of radius {eps:g}")
    ax.legend(fontsize="small", ncol=len(shown) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
