"""Training reports: a per-epoch table and a PNG plot of clean / PGD / verified error and eps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_table(history: Sequence[dict[str, Any]], methods: Sequence[str] = ("ibp", "crown")) -> str:
    """A plain-text table, one row per epoch: eps, loss, train / clean / PGD / verified errors."""
    cols = ["epoch", "eps", "loss", "robust CE", "train err", "clean err", "PGD err",
            *[f"verified {m.upper()}" for m in methods], "time s"]
    rows = []
    for h in history:
        rob = h.get("robust_ce")
        rows.append([str(h["epoch"]), f"{h['eps']:.4f}", f"{h['loss']:.4f}", "-" if rob is None else f"{rob:.4f}",
                     _pct(h.get("train_err")), _pct(h.get("clean_err")), _pct(h.get("pgd_err")),
                     *[_pct(h.get(f"verified_err_{m}")) for m in methods], f"{h.get('time_s', 0.0):.1f}"])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def plot_history(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> bool:
    """Save clean, PGD and verified error (and eps) per epoch to ``path``; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    series = [("train_err", "train error", ":"), ("clean_err", "clean error", "-"), ("pgd_err", "PGD error", "--")]
    keys = sorted({k for h in history for k in h if k.startswith("verified_err_")})
    series += [(k, f"verified error ({k.removeprefix('verified_err_').upper()})", "-.") for k in keys]
    for key, label, style in series:
        pts = [(e, 100 * h[key]) for e, h in zip(epochs, history) if h.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(epochs, [h["eps"] for h in history], color="grey", alpha=0.5, linewidth=1, label="eps (end of epoch)")
    twin.set_ylabel("training eps")
    lines = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8, loc="best")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


__all__ = ["format_table", "plot_history"]
