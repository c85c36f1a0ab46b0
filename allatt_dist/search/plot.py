"""The Pareto plots of a ranked experiment: test perplexity against parameter count, or against the
measured segment latency (`x="latency_ms"`)."""

from __future__ import annotations

from pathlib import Path

from allatt_dist.atomic import writing
from allatt_dist.errors import ConfigError
from allatt_dist.model.registry import get_family


def _style(arch: str) -> tuple[str, str | None]:
    """(marker, colour) the architecture's family declares; defaults for one no longer registered."""
    try:
        family = get_family(arch)
    except ConfigError:
        return "o", None
    return family.marker, family.color


AXES = {"params": ("parameters (millions)", 1e-6, "size"), "latency_ms": ("ms per eval segment", 1.0, "latency")}


def pareto_plot(table: list[dict], out: Path, x: str = "params", front: set[str] | None = None) -> None:
    """Every scored model a point (by architecture), dense references starred, the front drawn: the
    names in `front` (default: the rows flagged `pareto`, the front over parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, unit, what = AXES[x]
    scored = [r for r in table if r.get("test_ppl") is not None and r.get(x) is not None]
    if front is None:
        front = {r["name"] for r in scored if r.get("pareto")}
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for arch in sorted({r["architecture"] for r in scored}):
        marker, color = _style(arch)
        pts = [r for r in scored if r["architecture"] == arch and r["status"] != "reference"]
        if pts:
            ax.scatter(
                [r[x] * unit for r in pts],
                [r["test_ppl"] for r in pts],
                marker=marker,
                color=color,
                label=f"{arch} (pruned)",
                alpha=0.8,
            )
        dense = [r for r in scored if r["architecture"] == arch and r["status"] == "reference"]
        if dense:
            ax.scatter(
                [r[x] * unit for r in dense],
                [r["test_ppl"] for r in dense],
                marker="*",
                s=220,
                color=color,
                edgecolor="black",
                label=f"{arch} dense",
                zorder=3,
            )
    line = sorted((r for r in scored if r["name"] in front), key=lambda r: r[x])
    if line:
        ax.step(
            [r[x] * unit for r in line],
            [r["test_ppl"] for r in line],
            where="post",
            color="black",
            linestyle="--",
            linewidth=1,
            label="Pareto front",
        )
    ax.set_xlabel(label)
    ax.set_ylabel("test perplexity")
    ax.set_title(f"Pruned models: perplexity vs {what}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with writing(out, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
