"""`allatt-dist run CONFIG`: dense pretraining -> Ray Tune search -> (recovery fine-tuning) -> ranking, resumable
at each stage."""

from __future__ import annotations

from allatt_dist.plan import Plan
from allatt_dist.search.layout import Experiment
from allatt_dist.search.rank import rank
from allatt_dist.search.recover import recover
from allatt_dist.search.tune import tune_search
from allatt_dist.train.trainer import train


def run_pipeline(plan: Plan, budget: int | None = None) -> dict:
    exp = Experiment(plan.out, plan.run)
    for arch in exp.dense_models(plan.cfg):  # each searched architecture's dense model; skipped when done
        train(plan.with_values({"model.architecture": arch}, exp.dense_run_dir(arch, plan.cfg)), ["dense"])
    statuses = tune_search(plan)
    if plan.cfg.tune.recover_finetune:
        recover(plan, exp)
    board = rank(exp.root, budget, plan.progress, store=plan.run)
    return {
        "experiment": plan.run.where,
        "trials": statuses,
        "leaderboard": board["models"][:5],
        "budget": board.get("budget"),
    }
