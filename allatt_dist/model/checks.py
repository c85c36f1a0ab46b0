"""The checks a recipe needs the model code for, run where the recipe is resolved (recipe.build_config)
and where a model directory is read (modelio.load_model_dir): config.py itself imports nothing of model/.

    model.architecture   a registered family (model/registry.py)
    model.*              the family's own checks (`ModelFamily.validate`)
    gates.param_budget   between the smallest pruned model and the dense one (model/targets.py)
    tune.space           each searched sample passes the same checks

Each returns the first `Problem` (config.py) or None; the caller words it (one line, with its origin).
"""

from __future__ import annotations

from allatt_dist.config import ModelConfig, RunConfig, merged, nested
from allatt_dist.errors import Problem
from allatt_dist.model.registry import family_names, get_family, unknown_architecture


def model_problem(model: ModelConfig) -> Problem | None:
    """`model` as its family sees it (keys relative to the model section)."""
    if model.architecture not in family_names():
        return Problem(("architecture",), unknown_architecture(model.architecture))
    try:
        get_family(model.architecture).validate(model)
    except ValueError as e:
        return Problem((), str(e))
    return None


def _one_config(cfg: RunConfig) -> Problem | None:
    problem = model_problem(cfg.model)
    if problem is not None:
        return problem.under("model")
    if cfg.gates.param_budget is None:
        return None
    from allatt_dist.model.targets import check_budget  # the model's formulas, and torch: only with a budget

    try:
        check_budget(cfg.model, cfg.gates)
    except ValueError as e:
        return Problem((), str(e))
    return None


def run_problem(cfg: RunConfig) -> Problem | None:
    """`cfg` and every sample of its search (both ends of each searched domain)."""
    problem = _one_config(cfg)
    if problem is not None or cfg.tune is None:
        return problem
    base = cfg.to_dict(tune=False)
    for sample in cfg.tune.samples():
        found = _one_config(RunConfig.model_validate(merged(base, nested(sample))))
        if found is not None:
            return Problem((), found.within("tune.space"))
    return None
