"""A distilled prune phase under real Ray Train workers (two ranks, DeepSpeed ZeRO-2, the session's local
Ray): it logs train/kl, and stopped at step 10 and continued to step 20 it ends exactly like the same phase
run uninterrupted (the teacher's memory is part of the checkpoint: without it the resumed steps differ).

The dense teacher is a tiny model trained here for a few steps in-process (cheaper than a dense phase under
Ray Train); the stopped run uses `prune.constant_lr` so that its two calls (max_steps 10, then 20) follow
the uninterrupted run's schedule exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny import tiny_config, with_changes

from allatt_dist.data.corpus import load_corpus
from allatt_dist.model.registry import build_model
from allatt_dist.modelio import save_model_dir
from allatt_dist.plan import make_plan
from allatt_dist.train.trainer import train

pytestmark = pytest.mark.ray


def _dense_teacher(cfg, out: Path, steps: int = 20) -> None:
    """A dense model of `cfg` trained a few steps on the corpus, saved as a dense phase would save it."""
    corpus = load_corpus(cfg.data, splits=("train",))
    ids = torch.as_tensor(np.array(corpus.tokens("train")[:20_000]), dtype=torch.long)
    t = cfg.model.seq_len + 1
    rows = ids[: len(ids) // t * t].view(-1, t)  # (N, T+1)
    torch.manual_seed(0)
    lm = build_model(cfg.model, len(corpus.vocab))
    opt = torch.optim.Adam(lm.parameters(), 5e-3)
    for s in range(steps):
        b = rows[s * 16 : (s + 1) * 16]
        loss, _ = lm.loss(b[:, :-1], b[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model_dir(lm.eval(), corpus.vocab, out, extra={"phase": "dense", "step": steps})


def _scalars(tb: Path, tag: str) -> dict[int, float]:
    """step -> value of `tag` over every events file (a resumed run writes one per start)."""
    out = {}
    for f in sorted(tb.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        out.update({e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {})
    return out


def test_distilled_prune_logs_kl_and_resumes_to_the_uninterrupted_result(local_ray, wt2_slice, tmp_path):
    cfg = tiny_config(
        wt2_slice,
        prune={"max_steps": 20, "constant_lr": True},
        train={"eval_every": 10, "checkpoint_every": 10},
        distill={"kl_weight": 1.0, "temperature": 2.0},
    )
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _dense_teacher(cfg, whole / "dense/model")
    shutil.copytree(whole / "dense", parts / "dense")

    expected = train(make_plan(cfg, whole, progress=False), ["prune"])["prune"]
    first = train(make_plan(with_changes(cfg, prune={"max_steps": 10}), parts, progress=False), ["prune"])["prune"]
    assert first["step"] == 10
    resumed = train(make_plan(cfg, parts, progress=False), ["prune"])["prune"]

    offset = cfg.train.max_steps  # TensorBoard continues the dense phase's count
    kl = _scalars(whole / "tb/prune", "train/kl")
    assert sorted(kl) == [offset + s for s in range(1, 21)], sorted(kl)
    assert all(v >= 0 for v in kl.values()) and kl[offset + 20] > kl[offset + 1] > 0, kl  # gates close: KL grows
    assert "kl" in expected and json.loads((whole / "prune/result.json").read_text())["kl"] == expected["kl"]

    resumed_kl = _scalars(parts / "tb/prune", "train/kl")
    np.testing.assert_allclose([resumed_kl[s] for s in sorted(kl)], [kl[s] for s in sorted(kl)], rtol=1e-5)
    np.testing.assert_allclose(
        list(_scalars(parts / "tb/prune", "train/loss").values()),
        list(_scalars(whole / "tb/prune", "train/loss").values()),
        rtol=1e-5,
    )
    assert resumed["heads_per_layer"] == expected["heads_per_layer"]
    np.testing.assert_allclose(resumed["gate_probs"], expected["gate_probs"], atol=1e-6)
    assert resumed["valid_ppl"] == pytest.approx(expected["valid_ppl"], rel=1e-5)
