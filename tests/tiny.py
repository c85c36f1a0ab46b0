"""The tiny training recipe of the Ray Train tests (test_train.py, test_resume.py): a model small enough that a
phase's training steps take seconds, on the real WikiText-2 mini corpus.

    cfg = tiny_config(wt2_path, train={"max_steps": 40})      # sections merged into the base recipe
    cfg2 = with_changes(cfg, deepspeed={"zero_stage": 3})
"""

from __future__ import annotations

from pathlib import Path

from allatt_dist.config import RunConfig, merged
from allatt_dist.recipe import build_config

DENSE_STEPS, PRUNE_STEPS, CKPT_EVERY = 60, 20, 10


def tiny_config(data_path: Path, **sections) -> RunConfig:
    """A model small enough that a phase's training steps take seconds."""
    base = {
        "model": {
            "architecture": "all_attention",
            "num_layers": 2,
            "hidden_dim": 32,
            "num_heads": 4,
            "num_persistent": 16,
            "seq_len": 16,
            "mem_len": 16,
            "dropout": 0.0,
            "dropatt": 0.0,
        },
        # The last eval of a phase scores the whole valid split; 32 rows keep that to ~230 segments.
        "data": {"path": str(data_path), "eval_batch_size": 32, "eval_max_segments": 4},
        "train": {
            "max_steps": DENSE_STEPS,
            "batch_size": 4,
            "lr": 0.005,
            "warmup_steps": 5,
            "eval_every": 20,
            "checkpoint_every": CKPT_EVERY,
            "log_every": 1,
            "seed": 0,
        },
        # Gates start barely open, with fast logits and a high target, so heads close within 20 steps.
        "gates": {"sparsity_target": 0.6, "warmup_steps": 5, "init": 0.3, "lr": 0.2},
        "prune": {"max_steps": PRUNE_STEPS},
        "finetune": {"max_steps": 10},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.99},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
    }
    return build_config(merged(base, sections))


def with_changes(cfg: RunConfig, **sections) -> RunConfig:
    return build_config(merged(cfg.to_dict(), sections))


def scored_tokens(split_file: Path) -> int:
    """Targets an evaluation of a whole split scores: its tokens (words plus one <eos> per line,
    data/vocab.py) but the first, which is only ever an input."""
    with open(split_file, encoding="utf-8") as f:
        return sum(len(line.split()) + 1 for line in f) - 1


def trained_in_process(model_cfg, corpus, steps: int, tokens: int = 20_000):
    """(model in eval mode, the (N, T+1) rows of token ids) of a `model_cfg` model trained `steps` Adam steps
    (lr 5e-3, 16 rows of seq_len + 1 ids each, no memory) on the first `tokens` of `corpus`'s train split, in
    this process: a dense teacher for the distillation tests, far cheaper than a dense phase under Ray Train."""
    import numpy as np
    import torch

    from allatt_dist.model.registry import build_model

    ids = torch.as_tensor(np.array(corpus.tokens("train")[:tokens]), dtype=torch.long)
    t = model_cfg.seq_len + 1
    rows = ids[: len(ids) // t * t].view(-1, t)  # (N, T+1)
    torch.manual_seed(0)
    lm = build_model(model_cfg, len(corpus.vocab))
    opt = torch.optim.Adam(lm.parameters(), 5e-3)
    for s in range(steps):
        b = rows[s * 16 : (s + 1) * 16]
        loss, _ = lm.loss(b[:, :-1], b[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm.eval(), rows
