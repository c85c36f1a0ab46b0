"""`allatt-dist tune`: Ray Tune over gate temperature, sparsity targets (any config key).

    tune_search(plan)  ->  Tuner(run_trial, search algorithm, scheduler, callbacks)  ->  ResultGrid
                       ->  one status row per trial (EXP/trials/<id>/status.json)

Every trial starts from one shared dense model per architecture and runs the gated prune phase
(search/trial.py); the experiment's layout is search/layout.py, the callbacks search/callbacks.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from allatt_dist.cluster.capacity import check_fits_with_drivers
from allatt_dist.config import TuneConfig
from allatt_dist.crosschecks import search_conflict
from allatt_dist.errors import UserError
from allatt_dist.plan import Plan
from allatt_dist.search.callbacks import RecordTrial, ReleaseTrialResources, TrialProgress
from allatt_dist.search.layout import Experiment
from allatt_dist.search.records import record_dense, run_name, write_experiment
from allatt_dist.search.scheduler import TargetHalving
from allatt_dist.search.trial import run_trial
from allatt_dist.train.monitor import TB_DIR
from allatt_dist.train.teacher import check_teacher, teacher_source
from allatt_dist.train.trainer import check_starting_model


def param_space(tc: TuneConfig) -> dict[str, Any]:
    """The Ray Tune param_space (flat dotted keys -> tune domains)."""
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(v[0], v[1]),
        "loguniform": lambda v: tune.loguniform(v[0], v[1]),
        "randint": lambda v: tune.randint(v[0], v[1]),
    }
    return {key: make[kind](values) for key, dom in tc.space.items() for kind, values in dom.items()}


class TrialName:
    """Tune's trial name: the run's one name (search/records.py), e.g. prune/temp=0.33,target=0.25/<id>."""

    def __init__(self, base: dict):
        self.base = base

    def __call__(self, trial) -> str:
        return run_name(self.base, trial.config, trial.trial_id)


def search_algorithm(tc: TuneConfig):
    """(search algorithm, max_concurrent_trials for Tune's TuneConfig); the algorithm is seeded by `tune.seed`.

    Random and grid search use Tune's own generator with its `random_state`, which also takes the
    concurrency limit itself (Tune only warns about `max_concurrent_trials` next to one).
    """
    if tc.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise UserError("tune.search: optuna needs `pip install optuna`") from None
        return OptunaSearch(seed=tc.seed), tc.max_concurrent_trials
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=tc.max_concurrent_trials, random_state=tc.seed), None


def scheduler(plan: Plan, exp: Experiment):
    """Successive halving within each target (search/scheduler.py), or FIFO (no early stopping)."""
    from ray.tune.schedulers import FIFOScheduler

    tc, max_steps = plan.cfg.tune, plan.cfg.prune.max_steps
    if tc.scheduler.type != "asha":
        return FIFOScheduler()
    grace = min(tc.scheduler.grace_period, max_steps)
    return TargetHalving(grace, tc.scheduler.reduction_factor, max_steps, exp.scheduler_file, store=exp.run)


def _tuner(plan: Plan, exp: Experiment, dense_models: dict[str, Path], restore: bool):
    from ray import tune

    tc = plan.cfg.tune
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan, dense_models=dense_models), {"cpu": tc.trial_driver_cpus}
    )
    path, fs = tune_storage(exp)
    if restore:  # the callbacks come back with the pickled run config
        return tune.Tuner.restore(
            f"{path}/{exp.tune_dir.name}", trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    search_alg, max_concurrent = search_algorithm(tc)
    dense = {a: str(d) for a, d in dense_models.items()}
    record = RecordTrial(exp.root, plan.cfg.prune.max_steps, dense, exp.run)
    callbacks = [ReleaseTrialResources(), record] + ([] if plan.verbose else [TrialProgress(tc.expected_trials())])
    return tune.Tuner(
        trainable,
        param_space=param_space(tc),
        tune_config=tune.TuneConfig(
            metric=tc.metric,
            mode="min",
            scheduler=scheduler(plan, exp),
            search_alg=search_alg,
            num_samples=tc.num_samples,
            max_concurrent_trials=max_concurrent,
            trial_name_creator=TrialName(plan.cfg.to_dict()),
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=tune.RunConfig(
            name=exp.tune_dir.name,
            storage_path=path,
            storage_filesystem=fs,
            verbose=1 if plan.verbose else 0,
            callbacks=callbacks,
        ),
    )


def tune_storage(exp: Experiment) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Tune's experiment state: EXP/tune, in the bucket when EXP is."""
    if not exp.run.is_remote:
        return str(exp.root), None
    remote = exp.run.remote
    return remote.key(), remote.filesystem()


def check_dense_models(plan: Plan, dense_models: dict[str, Path]) -> None:
    """Every architecture's starting model exists and fits the recipe (searched model keys aside)."""

    searched = tuple(k.split(".", 1)[1] for k in plan.cfg.tune.space if k.startswith("model."))
    for arch, d in dense_models.items():
        if not (d / "config.json").is_file():
            raise UserError(f"{d}: no dense {arch} model to start the trials from (run `allatt-dist run` first)")
        check_starting_model(d, plan.cfg.model.model_copy(update={"architecture": arch}), searched)
        for sample in plan.cfg.tune.samples():  # distill: the teacher of both ends of every searched domain
            cfg = plan.cfg.with_values(sample)
            src = teacher_source(cfg, "prune", plan.out, d)
            if src is not None:
                check_teacher(src, d, plan.run, cfg.distill.hidden_layers, cfg)


def tune_search(plan: Plan, dense_dir: Path | None = None) -> list[dict]:
    """Run (or resume) the search of `plan` in `plan.out`; returns one status row per trial.
    `dense_dir` overrides where the recipe's own architecture's dense model is read from."""
    from ray import tune

    if plan.cfg.tune is None:
        raise UserError("tune: section missing (see docs/search.md)")
    if msg := search_conflict(plan.cfg):
        raise UserError(msg)
    exp = Experiment(plan.out, plan.run)
    exp.run.fetch_records(exp.root)  # object storage: the records here
    dense_models = exp.dense_models(plan.cfg)
    if dense_dir is not None:
        if exp.run.is_remote:
            raise UserError(
                f"--dense {dense_dir}: with --out in object storage the trials start from OUT/dense/model; "
                "put the dense model there (or run `allatt-dist run`)"
            )
        dense_models[plan.cfg.model.architecture] = Path(dense_dir).resolve()
    check_dense_models(plan, dense_models)
    check_fits_with_drivers(plan.cfg.scaling, plan.cfg.tune)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if not plan.verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 is then really quiet
    path, fs = tune_storage(exp)
    restore = tune.Tuner.can_restore(f"{path}/{exp.tune_dir.name}", storage_filesystem=fs)
    exp.check_same_search(plan.cfg, restore)
    if not restore:
        exp.run.delete(exp.scheduler_file)  # decisions of a search whose Tune state was deleted
    exp.run.fetch(exp.root / TB_DIR / "dense", weights=False)  # the entries rewritten next replace these
    write_experiment(exp.root, plan.cfg.to_dict(), plan.cfg.tune.space)  # HParams columns, then the reference
    record_dense(exp.root)
    exp.run.publish(exp.root / TB_DIR / "dense")
    grid = _tuner(plan, exp, dense_models, restore).fit()
    rows = exp.record_statuses(grid, plan.cfg.prune.max_steps, {a: str(d) for a, d in dense_models.items()})
    check_some_trial_ran(rows, exp.root)
    return rows


def check_some_trial_ran(rows: list[dict], exp_dir: Path) -> None:
    """A search in which every trial failed is a failed command (non-zero exit), with the first error."""
    failed = [r for r in rows if r["status"] == "error"]
    if rows and len(failed) == len(rows):
        raise UserError(
            f"all {len(rows)} trials failed; the first: {failed[0]['error']} "
            f"({exp_dir / 'trials' / failed[0]['trial_id'] / 'error.txt'} has its traceback)"
        )
