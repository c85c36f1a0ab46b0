"""The Pareto plot of a ranked experiment: test perplexity against parameter count."""

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


def pareto_plot(table: list[dict], out: Path) -> None:
    """Every scored model a point (by architecture), dense references starred, the front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in table if r.get("test_ppl") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for arch in sorted({r["architecture"] for r in scored}):
        marker, color = _style(arch)
        pts = [r for r in scored if r["architecture"] == arch and r["status"] != "reference"]
        if pts:
            ax.scatter(
                [r["params"] / 1e6 for r in pts],
                [r["test_ppl"] for r in pts],
                marker=marker,
                color=color,
                label=f"{arch} (pruned)",
                alpha=0.8,
            )
        dense = [r for r in scored if r["architecture"] == arch and r["status"] == "reference"]
        if dense:
            ax.scatter(
                [r["params"] / 1e6 for r in dense],
                [r["test_ppl"] for r in dense],
                marker="*",
                s=220,
                color=color,
                edgecolor="black",
                label=f"{arch} dense",
                zorder=3,
            )
    front = sorted((r for r in scored if r.get("pareto")), key=lambda r: r["params"])
    if front:
        ax.step(
            [r["params"] / 1e6 for r in front],
            [r["test_ppl"] for r in front],
            where="post",
            color="black",
            linestyle="--",
            linewidth=1,
            label="Pareto front",
        )
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("test perplexity")
    ax.set_title("Pruned models: perplexity vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with writing(out, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
