"""A distilled prune phase under real Ray Train workers (two ranks, DeepSpeed ZeRO-2, the session's local
Ray): it logs train/kl, and stopped at step 10 and continued to step 20 it ends exactly like the same phase
run uninterrupted (the teacher's memory is part of the checkpoint: without it the resumed steps differ); under
ZeRO-3 the teacher is partitioned over the ranks and teaches like the plain one of the ZeRO-2 run.

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
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny import tiny_config, trained_in_process, with_changes

from allatt_dist.data.corpus import load_corpus
from allatt_dist.modelio import save_model_dir
from allatt_dist.plan import make_plan
from allatt_dist.train.trainer import train

pytestmark = pytest.mark.ray


def _dense_teacher(cfg, out: Path, steps: int = 20) -> None:
    """A dense model of `cfg` trained a few steps on the corpus, saved as a dense phase would save it."""
    corpus = load_corpus(cfg.data, splits=("train",))
    lm, _ = trained_in_process(cfg.model, corpus, steps)
    save_model_dir(lm, corpus.vocab, out, extra={"phase": "dense", "step": steps})


def _scalars(tb: Path, tag: str) -> dict[int, float]:
    """step -> value of `tag` over every events file (a resumed run writes one per start)."""
    out = {}
    for f in sorted(tb.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        out.update({e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {})
    return out


def _cfg(wt2_slice: Path):
    return tiny_config(
        wt2_slice,
        prune={"max_steps": 20, "constant_lr": True},
        train={"eval_every": 10, "checkpoint_every": 10},
        distill={"kl_weight": 1.0, "temperature": 2.0},
    )


@pytest.fixture(scope="module")
def whole(local_ray, wt2_slice, tmp_path_factory) -> tuple[Path, dict]:
    """(run directory, prune result) of the distilled prune phase run uninterrupted, ZeRO-2 (plain teacher)."""
    out = tmp_path_factory.mktemp("distill") / "whole"
    _dense_teacher(_cfg(wt2_slice), out / "dense/model")
    return out, train(make_plan(_cfg(wt2_slice), out, progress=False), ["prune"])["prune"]


def test_distilled_prune_logs_kl_and_resumes_to_the_uninterrupted_result(whole, wt2_slice, tmp_path):
    cfg = _cfg(wt2_slice)
    (whole, expected), parts = whole, tmp_path / "parts"
    shutil.copytree(whole / "dense", parts / "dense")
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


def test_zero3_partitions_the_teacher_and_distils_like_the_plain_one(whole, wt2_slice, tmp_path):
    """Under ZeRO-3 each rank holds its partition of the teacher's weights (`teacher_bytes`: the large ones,
    DeepSpeed keeps those below its persistence threshold whole) and the first 5 steps' KL term and loss are
    those of the ZeRO-2 run with the plain teacher (constant_lr: its schedule is the 20-step run's)."""
    (whole, plain), out = whole, tmp_path / "zero3"
    shutil.copytree(whole / "dense", out / "dense")
    cfg = with_changes(_cfg(wt2_slice), prune={"max_steps": 5}, deepspeed={"zero_stage": 3})
    sharded = train(make_plan(cfg, out, progress=False), ["prune"])["prune"]
    assert 0 < sharded["teacher_bytes"] < 0.75 * plain["teacher_bytes"], (sharded["teacher_bytes"], plain)
    for tag in ("train/kl", "train/loss"):
        got, want = _scalars(out / "tb/prune", tag), _scalars(whole / "tb/prune", tag)
        assert len(got) == 5, got
        np.testing.assert_allclose(
            [got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=1e-3, err_msg=tag
        )
