"""`allatt-dist run CONFIG`: dense pretraining -> Ray Tune search -> ranking, resumable at each stage."""

from __future__ import annotations

from pathlib import Path

from allatt_dist.config import RunConfig


def run_pipeline(
    cfg: RunConfig,
    exp_dir: Path,
    budget: int | None = None,
    force: bool = False,
    verbose: bool = False,
    progress: bool = True,
    origin: str = "",
) -> dict:
    from allatt_dist.search.rank import rank
    from allatt_dist.search.space import parse_tune
    from allatt_dist.search.tune import dense_dirs_for, searched_architectures, tune_search
    from allatt_dist.train.trainer import train

    tc = parse_tune(cfg, origin)  # a bad search space fails before any training
    exp_dir = Path(exp_dir).resolve()
    for arch, model_dir in dense_dirs_for(exp_dir, cfg, searched_architectures(cfg, tc)).items():
        arch_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"architecture": arch})})
        run_dir = model_dir.parent.parent  # EXP or EXP/dense-<arch>
        train(arch_cfg, run_dir, ["dense"], force=force, verbose=verbose, progress=progress)  # skipped when done
    statuses = tune_search(cfg, exp_dir, None, verbose, origin)
    board = rank(exp_dir, budget, progress)
    return {
        "experiment": str(exp_dir),
        "trials": statuses,
        "leaderboard": board["models"][:5],
        "budget": board.get("budget"),
    }
