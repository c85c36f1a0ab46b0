"""What the user watches: TensorBoard events (rank 0) and a progress line on the driver.

A phase's events go to `tb_dir(run_dir, phase)` = RUN/tb/<phase>, so `tensorboard --logdir RUN/tb` names
the runs `dense`, `prune`, `finetune` (a search names its trials' runs itself: search/records.py).

Workers push a small dict to a `ProgressBoard` Ray actor; the driver polls it and draws one tqdm
bar, so progress reaches the terminal from any node without Ray's per-worker log prefixes.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import numpy as np
import ray

TB_DIR = "tb"
TRAIN_STATS = ("kl", "hidden")  # step statistics logged under train/ (the rest are the gates')


def tb_dir(run_dir: Path, phase: str) -> Path:
    """Where a phase of a run writes its TensorBoard events."""
    return Path(run_dir) / TB_DIR / phase


class ProgressBoard:
    """A tiny actor holding the latest progress of a run: {step, max_steps, loss, ...}."""

    def __init__(self):
        self.state: dict = {}

    def update(self, state: dict) -> None:
        self.state = dict(state)

    def get(self) -> dict:
        return self.state


RemoteProgressBoard = ray.remote(num_cpus=0)(ProgressBoard)


def gate_heatmap_png(probs: np.ndarray, opened: np.ndarray, title: str) -> np.ndarray:
    """(layers, heads) gate probabilities and eval-open mask -> RGB image (H, W, 3) uint8 for TensorBoard.

    Each cell prints P(open); a kept head (the eval gate opens it: pruning keeps it) gets a thick black
    frame, a pruned one a hatch and its value struck through with "x", so 0.49 and 0.62 never look alike.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n_layers, n_heads = probs.shape
    fig, ax = plt.subplots(figsize=(1.8 + 0.75 * n_heads, 1.3 + 0.55 * n_layers), dpi=100)
    im = ax.imshow(probs, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")  # red closed, green open
    for (i, j), p in np.ndenumerate(probs):
        kept = bool(opened[i, j])
        ax.text(j, i, f"{p:.2f}" if kept else f"{p:.2f}\npruned", ha="center", va="center", fontsize=8)
        style = {"lw": 2.5, "ec": "black"} if kept else {"hatch": "//", "ec": "0.4", "lw": 0}
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, **style))
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_xlabel("head (framed: kept, hatched: pruned)")
    ax.set_ylabel("layer")
    ax.set_title(f"{title}\nkept {int(opened.sum())}/{opened.size} heads", fontsize=9)
    fig.colorbar(im, ax=ax, label="P(gate open)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    return plt.imread(buf, format="png")[..., :3]


def layout() -> dict:
    """The Custom Scalars dashboard: what a user reads first (loss, validation perplexity) on top, every
    run on one chart per tag, so trials compare at a glance. Every phase writes the whole layout
    (TensorBoard merges the runs' layouts in run order, so a shorter one would reorder the categories)."""
    return {
        "1. train and valid": {
            "train loss": ["Multiline", [r"^train/loss$"]],
            "valid perplexity": ["Multiline", [r"^valid/ppl$"]],
        },
        "2. sparsity (prune)": {
            "expected sparsity vs target": ["Multiline", [r"^gates/expected_sparsity$", r"^gates/target$"]],
            "realised sparsity (eval gates)": ["Multiline", [r"^gates/hard_sparsity$"]],
            "open heads per layer": ["Multiline", [r"^gates/open_heads/"]],
        },
        "3. optimisation": {
            "learning rate": ["Multiline", [r"^train/lr$"]],
            "gradient norm": ["Multiline", [r"^train/grad_norm$"]],
            "tokens/s": ["Multiline", [r"^perf/tokens_per_s$"]],
        },
    }


def eval_table(step: int, values: dict) -> str:
    """One evaluation as a markdown table (TensorBoard's Text tab): exact values, no smoothing."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.8g}"
        return " / ".join(str(x) for x in v) if isinstance(v, list) else str(v)

    rows = [f"| {k} | {cell(v)} |" for k, v in values.items()]
    return "\n".join([f"**step {step}**", "", "| metric | value |", "|---|---|", *rows])


class Monitor:
    """Rank-0 TensorBoard writer plus the progress feed (every rank may call; others do nothing)."""

    def __init__(
        self, tb_dir: Path | None, board, max_steps: int, phase: str, tokens_per_step: int, step_offset: int = 0
    ):
        self.board, self.max_steps, self.phase = board, max_steps, phase
        self.tokens_per_step = tokens_per_step
        self.offset = step_offset  # TensorBoard steps continue the previous phases' count: one timeline
        self.writer = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tb_dir))
            self.writer.add_custom_scalars(layout())
        self.t0 = time.perf_counter()
        self.last_t, self.last_step = self.t0, None
        self.valid_ppl: float | None = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None and math.isfinite(float(v)):
                self.writer.add_scalar(k, float(v), self.offset + step)

    def train_step(self, step: int, loss: float, stats: dict, lr: float, grad_norm: float | None) -> dict:
        now = time.perf_counter()
        dt = (now - self.last_t) / max(1, step - (self.last_step if self.last_step is not None else step - 1))
        self.last_t, self.last_step = now, step
        tps = self.tokens_per_step / dt if dt > 0 else 0.0
        values = {
            "train/loss": loss,
            "train/ppl": math.exp(min(loss, 50.0)),
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "perf/tokens_per_s": tps,
            "perf/step_time_s": dt,
        }
        values.update({f"train/{k}" if k in TRAIN_STATS else f"gates/{k}": v for k, v in stats.items()})
        self.scalars(step, values)
        self.progress(step, loss=loss, sparsity=stats.get("expected_sparsity"), tokens_per_s=tps)
        return values

    def gates(self, step: int, probs: np.ndarray, opened: np.ndarray) -> None:
        """probs: (layers, heads) P(z = 1); opened: (layers, heads) bool, the eval gate (what pruning keeps)."""
        if self.writer is None:
            return
        open_heads = opened.sum(axis=1)
        values = {f"gates/open_heads/layer_{i}": int(n) for i, n in enumerate(open_heads)}
        values["gates/hard_sparsity"] = 1.0 - float(open_heads.sum()) / probs.size
        self.scalars(step, values)
        img = gate_heatmap_png(probs, opened, f"{self.phase}: P(gate open), step {self.offset + step}")
        self.writer.add_image("gates/heatmap", img, self.offset + step, dataformats="HWC")

    def evaluation(self, step: int, values: dict[str, float], shown: dict) -> None:
        """The eval's scalars, and with `shown` the same values exact, as a text table (Text tab, `eval/<phase>`)."""
        if self.writer is None:
            return
        self.scalars(step, values)
        table = {"phase step": f"{step}/{self.max_steps}", **values, **shown}
        self.writer.add_text(f"eval/{self.phase}", eval_table(self.offset + step, table), self.offset + step)

    def progress(self, step: int, **fields) -> None:
        if self.board is None:
            return
        elapsed = time.perf_counter() - self.t0
        state = {"phase": self.phase, "step": step, "max_steps": self.max_steps, "elapsed": elapsed}
        state.update({k: v for k, v in fields.items() if v is not None})
        if self.valid_ppl is not None:
            state["valid_ppl"] = self.valid_ppl
        self.board.update.remote(state)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def follow_progress(board, done, desc: str) -> None:
    """Driver side: a tqdm bar on a terminal, else one plain line every 10 s, until `done()`."""
    import sys

    from tqdm import tqdm

    tty = sys.stderr.isatty()
    bar, last_line = None, 0.0
    while not done():
        state = ray.get(board.get.remote())
        if state:
            post = {k: f"{state[k]:.4g}" for k in ("loss", "valid_ppl", "sparsity") if k in state}
            if "tokens_per_s" in state:
                post["tok/s"] = f"{state['tokens_per_s']:.0f}"
            if tty:
                if bar is None:
                    bar = tqdm(total=state["max_steps"], desc=desc, unit="step", dynamic_ncols=True)
                bar.n = state["step"]
                bar.set_postfix(post, refresh=False)
                bar.refresh()
            elif time.monotonic() - last_line > 10:
                last_line = time.monotonic()
                fields = " ".join(f"{k}={v}" for k, v in post.items())
                print(f"{desc}: step {state['step']}/{state['max_steps']} {fields}", file=sys.stderr, flush=True)
        time.sleep(0.5)
    if bar is not None:
        bar.close()
