"""Every shipped recipe (tune_configs/*.yaml) starts and takes steps through the real path.

Each recipe runs with its model shrunk (dimensions and step counts only: layers, widths, heads, lengths,
the adaptive cutoffs and the position table to fit them, the parameter budget scaled with the model,
batch, evaluation rows, steps) on real text (conftest.py `wt2_slice`, the first lines of WikiText-2 mini's
splits: a phase ends by scoring its whole validation split, ~14 s of the test per recipe on the full one): its
prune phase, one Ray Train
`TorchTrainer` whose worker builds the DeepSpeed engine with the recipe's own optimizer, scheduler, ZeRO
stage, gate settings, data stream and evaluation, then exports, prunes and scores the model. The dense
model it starts from is built here, in-process (a fresh initialisation, as the dense phase's first step
sees it): a second TorchTrainer per recipe would double the test's time, most of it starting workers,
for a phase that runs the same worker code (its schedule's rates are checked in tests/test_lamb.py).
What the CPU cannot run is mapped, and only that: one worker instead of the recipe's GPUs
(scaling.use_gpu false, one CPU each) and fp16 -> bf16 (DeepSpeed has no fp16 on CPU; bf16 takes the
same wrapper, FP16_UnfusedOptimizer, at ZeRO 0). A recipe added to tune_configs/ is picked up here, so
one that cannot start fails CI.

The session's local Ray (conftest.py `local_ray`) serves the module; `train` (the library's entry point)
runs the phases.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from allatt_dist.config import RunConfig
from allatt_dist.data.corpus import load_corpus
from allatt_dist.model.registry import build_model
from allatt_dist.model.targets import non_embedding_params
from allatt_dist.modelio import save_model_dir
from allatt_dist.plan import make_plan
from allatt_dist.recipe import build_config, load_config
from allatt_dist.train.trainer import train

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "tune_configs").glob("*.yaml"))
PRUNE_STEPS = 3


def shrunk(cfg: RunConfig, data_path: Path) -> RunConfig:
    """`cfg` with small dimensions and few steps; every switch, optimizer and schedule kept."""
    d = cfg.to_dict(tune=False)
    m = d["model"]
    m.update(num_layers=2, hidden_dim=32, num_heads=4, num_persistent=8, ffn_dim=32, seq_len=8, mem_len=8)
    if m["adaptive_cutoffs"]:
        m["adaptive_cutoffs"] = [200, 1000]
    if m["position_len"] is not None:
        m["position_len"] = 24  # still above seq_len + mem_len, as the recipe's is
    rows = max(d["data"]["eval_batch_size"], 64)  # the phase's last evaluation scores the whole split
    d["data"].update(path=str(data_path), source="local", name="wikitext-2", eval_max_segments=2, eval_batch_size=rows)
    for phase, steps in (("train", PRUNE_STEPS), ("prune", PRUNE_STEPS), ("finetune", 1)):
        d[phase]["max_steps"] = steps
    d["train"].update(batch_size=4, eval_every=PRUNE_STEPS, checkpoint_every=PRUNE_STEPS, log_every=1)
    d["scaling"].update(num_workers=1, use_gpu=False, cpus_per_worker=1.0, max_failures=0)
    if d["deepspeed"]["precision"] == "fp16":
        d["deepspeed"]["precision"] = "bf16"  # no fp16 on CPU
    budget = d["gates"]["param_budget"]
    if budget is not None:  # the same share of the shrunk model's non-embedding parameters
        small = build_config({**d, "gates": {**d["gates"], "param_budget": None}})
        share = budget / non_embedding_params(cfg.model)
        d["gates"]["param_budget"] = int(share * non_embedding_params(small.model))
    return build_config(d, "shrunk recipe")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_starts_and_trains(recipe, local_ray, wt2_slice, tmp_path):
    full = load_config(recipe)
    cfg = shrunk(full, wt2_slice)
    kept = ("optimizer", "warmup_steps", "hold_steps", "cosine_end", "row_shift")
    assert [getattr(cfg.train, k) for k in kept] == [getattr(full.train, k) for k in kept]
    assert cfg.deepspeed.zero_stage == full.deepspeed.zero_stage and cfg.gates.mode == full.gates.mode
    plan = make_plan(cfg, tmp_path / "run", progress=False)
    vocab = load_corpus(plan.cfg.data, splits=("train",)).vocab
    save_model_dir(build_model(cfg.model, len(vocab)), vocab, plan.out / "dense/model", extra={"phase": "dense"})
    t0 = time.monotonic()
    prune = train(plan, ["prune"])["prune"]
    print(f"[{recipe.name}: prune phase in {time.monotonic() - t0:.0f}s]", end=" ", flush=True)
    assert prune["step"] == PRUNE_STEPS and prune["world_size"] == 1
    assert math.isfinite(prune["train_loss"]) and math.isfinite(prune["valid_ppl"]), prune
    assert (plan.out / "prune/pruned/model.safetensors").is_file()
    assert 0 < sum(prune["heads_per_layer"]) <= cfg.model.num_layers * cfg.model.num_heads
