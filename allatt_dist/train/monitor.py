"""What the user watches: TensorBoard events (rank 0) and a progress line on the driver.

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


class ProgressBoard:
    """A tiny actor holding the latest progress of a run: {step, max_steps, loss, ...}."""

    def __init__(self):
        self.state: dict = {}

    def update(self, state: dict) -> None:
        self.state = dict(state)

    def get(self) -> dict:
        return self.state


RemoteProgressBoard = ray.remote(num_cpus=0)(ProgressBoard)


def gate_heatmap_png(probs: np.ndarray, title: str) -> np.ndarray:
    """(layers, heads) gate probabilities -> RGB image (H, W, 3) uint8 for TensorBoard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * probs.shape[1], 1.0 + 0.35 * probs.shape[0]), dpi=80)
    im = ax.imshow(probs, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    return plt.imread(buf, format="png")[..., :3]


class Monitor:
    """Rank-0 TensorBoard writer plus the progress feed (every rank may call; others do nothing)."""

    def __init__(self, tb_dir: Path | None, board, max_steps: int, phase: str, tokens_per_step: int):
        self.board, self.max_steps, self.phase = board, max_steps, phase
        self.tokens_per_step = tokens_per_step
        self.writer = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tb_dir))
        self.t0 = time.perf_counter()
        self.last_t, self.last_step = self.t0, None
        self.valid_ppl: float | None = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None and math.isfinite(float(v)):
                self.writer.add_scalar(k, float(v), step)

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
        values.update({f"gates/{k}": v for k, v in stats.items()})
        self.scalars(step, values)
        self.progress(step, loss=loss, sparsity=stats.get("expected_sparsity"), tokens_per_s=tps)
        return values

    def gates(self, step: int, probs: np.ndarray, opened: np.ndarray) -> None:
        """probs: (layers, heads) P(z = 1); opened: (layers, heads) bool, the eval gate (what pruning keeps)."""
        if self.writer is None:
            return
        open_heads = opened.sum(axis=1)
        for i, n in enumerate(open_heads):
            self.writer.add_scalar(f"gates/open_heads/layer_{i}", int(n), step)
        self.writer.add_scalar("gates/hard_sparsity", 1.0 - float(open_heads.sum()) / probs.size, step)
        img = gate_heatmap_png(probs, f"{self.phase}: P(gate open), step {step}")
        self.writer.add_image("gates/heatmap", img, step, dataformats="HWC")

    def progress(self, step: int, **fields) -> None:
        if self.board is None:
            return
        elapsed = time.perf_counter() - self.t0
        state = {"phase": self.phase, "step": step, "max_steps": self.max_steps, "elapsed": elapsed}
        state.update({k: v for k, v in fields.items() if v is not None})
        if self.valid_ppl is not None:
            state["valid_ppl"] = self.valid_ppl
        self.board.update.remote(state)

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
