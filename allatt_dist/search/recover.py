"""Recovery fine-tuning (`tune.recover_finetune`, `run` only): after the search and before `rank`, the best
finished trial of each target (architecture and sparsity target, parameter budget or L0 coefficient: the
scheduler's groups), by validation perplexity, is fine-tuned in its own trial directory: the finetune phase
of its pruned model (`TRIAL/finetune/model`), distilled when `distill` applies to the finetune phase, the
teacher by default the trial's dense model. Resumable like the other stages: a finished fine-tuning is
skipped, an interrupted one resumes from its checkpoint. `rank` then scores the fine-tuned model of such a
trial in place of its pruned one, and the leaderboard's `finetuned` column says with what.
"""

from __future__ import annotations

import json
from pathlib import Path

from allatt_dist.plan import Plan
from allatt_dist.recipe import read_mapping
from allatt_dist.search.layout import Experiment
from allatt_dist.search.scheduler import group_of
from allatt_dist.train.trainer import train


def chosen_trials(exp: Experiment) -> list[Path]:
    """The best finished trial of each target, by the prune phase's validation perplexity."""
    best: dict[str, tuple[float, Path]] = {}
    for trial in sorted(p for p in (exp.root / "trials").glob("*") if p.is_dir()):
        result = read_mapping(trial / "prune" / "result.json")
        if read_mapping(trial / "status.json").get("status") != "finished" or result.get("valid_ppl") is None:
            continue
        group = group_of(read_mapping(trial / "params.json"))
        if group not in best or result["valid_ppl"] < best[group][0]:
            best[group] = (result["valid_ppl"], trial)
    return [trial for _, trial in sorted(best.values(), key=lambda b: str(b[1]))]


def recover(plan: Plan, exp: Experiment) -> list[Path]:
    """Fine-tune each target's best trial (skipped when done); returns the trial directories."""
    exp.run.fetch_records(exp.root)
    dense_models = exp.dense_models(plan.cfg)
    chosen = chosen_trials(exp)
    for trial_dir in chosen:
        params = json.loads((trial_dir / "params.json").read_text())
        cfg = plan.cfg.with_values(params)
        extra = {}
        if cfg.distill.applies("finetune") and cfg.distill.teacher is None:  # the trial's dense model
            extra["distill.teacher"] = exp.run.uri(dense_models[cfg.model.architecture])
        trial = plan.with_values(params | extra, trial_dir, force=True)
        train(trial, ["finetune"])
    return chosen


def finetuned_with(run: dict, result: dict) -> str:
    """The leaderboard's `finetuned` entry: steps, and the distillation when there was one."""
    text = f"{result.get('step')} steps"
    d = run.get("distill") or {}
    if "finetune" in (d.get("phases") or []) and (d.get("kl_weight") or d.get("hidden_weight")):
        text += f", distilled (kl_weight {d.get('kl_weight')}, T {d.get('temperature')}"
        text += f", hidden_weight {d['hidden_weight']})" if d.get("hidden_weight") else ")"
    return text
