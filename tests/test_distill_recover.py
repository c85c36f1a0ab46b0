"""`run` with recovery fine-tuning (`tune.recover_finetune`, issue 24): after the search, the best trial of
the target is fine-tuned (distilled from the experiment's dense model, the default teacher) and the
leaderboard scores and names that fine-tuned model; the other trial stays as pruned. One tiny search on the
session's local Ray, on the real-text slice (conftest.py `wt2_slice`): dense 20 steps, two trials of one
target, 10 prune and 5 finetune steps, one worker."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny import tiny_config

from allatt_dist.modelio import read_meta
from allatt_dist.plan import make_plan

pytestmark = pytest.mark.ray


def test_run_fine_tunes_each_targets_best_trial_before_rank(local_ray, wt2_slice, tmp_path):
    from allatt_dist.search.pipeline import run_pipeline

    cfg = tiny_config(
        wt2_slice,
        train={"max_steps": 20, "eval_every": 5, "checkpoint_every": 5},
        prune={"max_steps": 10},
        finetune={"max_steps": 5},
        scaling={"num_workers": 1},
        distill={"kl_weight": 1.0, "temperature": 2.0, "phases": ["finetune"]},
        tune={
            "space": {"gates.temperature": {"grid": [0.33, 0.66]}},
            "scheduler": {"type": "fifo"},
            "recover_finetune": True,
        },
    )
    exp = tmp_path / "exp"
    run_pipeline(make_plan(cfg, exp, progress=False))
    board = json.loads((exp / "leaderboard.json").read_text())["models"]
    trials = [r for r in board if r["status"] != "reference"]
    assert len(trials) == 2 and all(r["test_ppl"] is not None for r in trials), board
    tuned = [r for r in trials if r["finetuned"]]
    assert len(tuned) == 1 and tuned[0]["finetuned"] == "5 steps, distilled (kl_weight 1.0, T 2.0)", trials
    trial_dirs = [d for d in (exp / "trials").iterdir() if (d / "finetune" / "result.json").is_file()]
    assert len(trial_dirs) == 1
    prune_ppl = {d: json.loads((d / "prune" / "result.json").read_text())["valid_ppl"] for d in exp.glob("trials/*")}
    assert prune_ppl[trial_dirs[0]] == min(prune_ppl.values())  # the target's best trial was fine-tuned
    result = json.loads((trial_dirs[0] / "finetune" / "result.json").read_text())
    assert result["step"] == 5 and tuned[0]["valid_ppl"] == result["valid_ppl"]
    scored = read_meta(exp / tuned[0]["model_dir"]) if tuned[0]["model_dir"] else None
    finetuned = read_meta(trial_dirs[0] / "finetune" / "model")
    assert scored is None or scored["heads_per_layer"] == finetuned["heads_per_layer"]
    acc = EventAccumulator(str(trial_dirs[0] / "tb" / "finetune"), size_guidance={"scalars": 0})
    acc.Reload()
    assert len(acc.Scalars("train/kl")) == 5  # distilled from the dense model
