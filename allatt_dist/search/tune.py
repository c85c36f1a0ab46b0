"""`allatt-dist tune`: Ray Tune over gate temperature, sparsity targets (any config key).

    Tuner  ->  trial function (0.01 CPU)  ->  TorchTrainer (prune phase, N DeepSpeed workers)

Every trial starts from one shared dense model and runs the gated prune phase; Ray Train's reports
reach Tune through `TuneReportCallback`, so ASHA sees validation perplexity at every checkpoint.

    EXP_DIR/
      run.yaml, dense/              the shared dense model (from `allatt-dist run`)
      search.yaml                   the config the search started with (a resume must match it)
      tune/                         Ray Tune's experiment state (what `Tuner.restore` reads)
      trials/<trial_id>/            run.yaml, params.json, status.json (final: written by the driver),
                                    error.txt (when the trial function raised), prune/{model,pruned,...}
      tb/                           TensorBoard: dense, prune/<label>/<trial_id>, HParams (search/records.py)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from allatt_dist.cluster.session import check_fits
from allatt_dist.config import RunConfig, config_to_dict, saved_config_diff
from allatt_dist.errors import UserError
from allatt_dist.search.records import finalize_trial, record_dense, run_name, tb_run_dir, write_experiment, write_json
from allatt_dist.search.space import TuneConfig, param_space, parse_tune, trial_config

TUNE_NAME = "tune"


def run_trial(params: dict[str, Any], base: dict, exp_dir: str, dense_dirs: dict[str, str], verbose: bool) -> None:
    """The Tune function trainable: one prune-phase Ray Train run with the sampled `params`."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from allatt_dist.train.trainer import prepare_run_dir, run_phase

    exp = Path(exp_dir)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(RunConfig.model_validate(base), params)
    run_dir = exp / "trials" / trial_id
    dense_dir = dense_dirs[cfg.model.architecture]
    prepare_run_dir(cfg, run_dir, force=True)
    write_json(run_dir / "params.json", params)
    write_json(run_dir / "status.json", {"status": "running"})
    tb = tb_run_dir(exp, run_name(config_to_dict(cfg), params, trial_id))  # records: the run named by what it is
    try:
        run_phase(cfg, run_dir, "prune", verbose, False, Path(dense_dir), callbacks=[TuneReportCallback()], tb_dir=tb)
    except Exception as e:
        # Not status.json: the driver writes the final status of every trial after the search
        # (`record_statuses`), and a trial the scheduler stops also ends up here, in a process that
        # may outlive the search and would overwrite "stopped" with this error.
        (run_dir / "error.txt").write_text(str(e)[:4000] + "\n")
        raise
    write_json(run_dir / "status.json", {"status": "finished"})  # the driver's record follows (records.py)


def search_algorithm(tc: TuneConfig):
    """(search algorithm, max_concurrent_trials for TuneConfig), both seeded by `tune.seed`.

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


def _tuner(cfg: RunConfig, tc: TuneConfig, exp_dir: Path, dense_dirs: dict[str, str], verbose: bool, restore: bool):
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=config_to_dict(cfg), exp_dir=str(exp_dir), dense_dirs=dense_dirs, verbose=verbose
        ),
        {"cpu": tc.trial_driver_cpus},
    )
    path = str((exp_dir / TUNE_NAME).resolve())
    if restore:  # callbacks are not pickled with the experiment: the release hook must come back too
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        hooks = [_release_callback(exp_dir), _records_callback(exp_dir, cfg, dense_dirs)]
        tuner._local_tuner._run_config.callbacks = hooks
        return tuner
    scheduler = make_scheduler(cfg, tc)
    search_alg, max_concurrent = search_algorithm(tc)
    return tune.Tuner(
        trainable,
        param_space=param_space(tc),
        tune_config=tune.TuneConfig(
            metric=tc.metric,
            mode="min",
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=tc.num_samples,
            max_concurrent_trials=max_concurrent,
            trial_name_creator=lambda t: run_name(config_to_dict(cfg), t.config, t.trial_id),
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=tune.RunConfig(
            name=TUNE_NAME,
            storage_path=str(exp_dir.resolve()),
            verbose=1 if verbose else 0,
            callbacks=[_release_callback(exp_dir), _records_callback(exp_dir, cfg, dense_dirs)]
            + ([] if verbose else [_progress_callback(expected_trials(tc))]),
        ),
    )


def make_scheduler(cfg: RunConfig, tc: TuneConfig):
    """ASHA with every rung at or below the last report before the final one (records: a trial that has
    trained all its steps is never stopped at its last report); FIFO when no rung would fit."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    grace, last_rung = min(tc.scheduler.grace_period, cfg.prune.max_steps), last_decision_step(cfg)
    if tc.scheduler.type != "asha" or grace > last_rung:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="step",
        max_t=last_rung,
        grace_period=grace,
        reduction_factor=tc.scheduler.reduction_factor,
        stop_last_trials=False,  # max_t only bounds the rungs: every survivor trains to prune.max_steps
    )


def expected_trials(tc: TuneConfig) -> int:
    n = tc.num_samples
    if tc.search == "grid":
        for dom in tc.space.values():
            kind, values = next(iter(dom.items()))
            n *= len(values) if kind == "grid" else 1
    return n


def _progress_callback(total: int):
    """A Tune callback: one bar over trials on a terminal, else a line per finished trial."""
    import sys

    from ray import tune
    from tqdm import tqdm

    tty = sys.stderr.isatty()

    class TrialProgress(tune.Callback):
        def __init__(self):
            self.bar = tqdm(total=total, desc="search", unit="trial", dynamic_ncols=True, disable=not tty)
            self.done = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            best = [t.last_result["valid_ppl"] for t in trials if t.last_result.get("valid_ppl")]
            if best:
                self.bar.set_postfix({"best_valid_ppl": f"{min(best):.4g}"}, refresh=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            self.bar.update(1)
            if not tty:
                ppl = trial.last_result.get("valid_ppl")
                step = trial.last_result.get("step")
                ppl = f"{ppl:.1f}" if isinstance(ppl, float) else "n/a"
                print(
                    f"search: {self.done}/{total} trials done; {trial} ended at step {step}, valid ppl {ppl}",
                    file=sys.stderr,
                    flush=True,
                )

        on_trial_error = on_trial_complete

    return TrialProgress()


def release_placement_group(trial_dir: Path) -> bool:
    """Remove the Train workers' placement group of a finished or stopped trial, if it is still there."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    marker = trial_dir / "prune" / "placement_group.txt"
    if not marker.is_file():
        return False
    pg_id = marker.read_text().strip()
    entry = ray.util.placement_group_table().get(pg_id)
    if not entry or entry.get("state") == "REMOVED":
        return False
    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
    return True


def _release_callback(exp_dir: Path):
    """On every trial end (finished, stopped by ASHA, errored), free what its Train run still holds."""
    from ray import tune

    class ReleaseTrialResources(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            release_placement_group(exp_dir / "trials" / trial.trial_id)

        on_trial_error = on_trial_complete

    return ReleaseTrialResources()


def last_decision_step(cfg: RunConfig) -> int:
    """The last report before the final one: every ASHA rung must be at or below it, or the rung would
    be decided at the last report and could stop a trial that has already trained all its steps."""
    every = cfg.train.checkpoint_every
    return ((cfg.prune.max_steps - 1) // every) * every


def _records_callback(exp_dir: Path, cfg: RunConfig, dense_dirs: dict[str, str]):
    """On every trial end, the driver writes the trial's record (status.json, HParams entry), and completes
    the files of a trial stopped at its last step (records.py): stopped trials get one too."""
    import sys

    from ray import tune

    class RecordTrial(tune.Callback):
        def record(self, trial, error: str | None) -> None:
            try:
                finalize_trial(exp_dir, trial.trial_id, trial.last_result or {}, error, cfg.prune.max_steps, dense_dirs)
            except Exception as e:  # never end the search over a record: record_statuses retries after it
                print(f"search: could not record trial {trial.trial_id} yet: {e}", file=sys.stderr, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.record(trial, None)

        def on_trial_error(self, iteration, trials, trial, **info):
            err = exp_dir / "trials" / trial.trial_id / "error.txt"
            self.record(trial, err.read_text() if err.is_file() else "the trial failed")

    return RecordTrial()


def record_statuses(exp_dir: Path, grid, max_steps: int, dense_dirs: dict[str, str]) -> list[dict]:
    """After the search: each trial's final status (finished / stopped by the scheduler / error)."""
    rows = []
    for r in grid:
        metrics = r.metrics or {}
        trial_id = metrics.get("trial_id") or Path(r.path).name
        error = str(r.error) if r.error is not None else None
        rows.append(finalize_trial(exp_dir, trial_id, metrics, error, max_steps, dense_dirs))
    return rows


def searched_architectures(cfg: RunConfig, tc: TuneConfig) -> list[str]:
    dom = tc.space.get("model.architecture")
    return list(dict.fromkeys(next(iter(dom.values())))) if dom else [cfg.model.architecture]


def dense_dirs_for(exp_dir: Path, cfg: RunConfig, archs: list[str]) -> dict[str, Path]:
    """Where each searched architecture's dense model lives: EXP/dense (the recipe's own architecture)
    or EXP/dense-<architecture>/dense (the others, trained by `run` with only the architecture changed)."""
    return {
        a: exp_dir / "dense" / "model" if a == cfg.model.architecture else exp_dir / f"dense-{a}" / "dense" / "model"
        for a in archs
    }


def tune_search(
    cfg: RunConfig, exp_dir: Path, dense_dir: Path | None = None, verbose: bool = False, origin: str = ""
) -> list[dict]:
    """Run (or resume) the search; returns one status row per trial. `dense_dir` overrides where the
    recipe's own architecture's dense model is read from."""
    from ray import tune

    from allatt_dist.train.trainer import check_starting_model, with_resolved_data

    tc = parse_tune(cfg, origin)
    cfg = with_resolved_data(cfg)
    exp_dir = Path(exp_dir).resolve()  # trial functions run in Ray's own working directories
    dirs = dense_dirs_for(exp_dir, cfg, searched_architectures(cfg, tc))
    if dense_dir is not None:
        dirs[cfg.model.architecture] = dense_dir
    searched_model_keys = tuple(k.split(".", 1)[1] for k in tc.space if k.startswith("model."))
    for arch, d in dirs.items():
        if not (d / "config.json").is_file():
            raise UserError(f"{d}: no dense {arch} model to start the trials from (run `allatt-dist run` first)")
        check_starting_model(d, cfg.model.model_copy(update={"architecture": arch}), searched_model_keys)
    check_fits_with_drivers(cfg, tc)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 is then really quiet
    restore = tune.Tuner.can_restore(str((exp_dir / TUNE_NAME).resolve()))
    check_same_search(exp_dir, cfg, restore)
    dense_dirs = {a: str(d.resolve()) for a, d in dirs.items()}
    write_experiment(exp_dir, config_to_dict(cfg), tc.space)  # records: the HParams columns, then the reference
    record_dense(exp_dir)
    grid = _tuner(cfg, tc, exp_dir, dense_dirs, verbose, restore).fit()
    rows = record_statuses(exp_dir, grid, cfg.prune.max_steps, dense_dirs)
    check_some_trial_ran(rows, exp_dir)
    return rows


def check_some_trial_ran(rows: list[dict], exp_dir: Path) -> None:
    """A search in which every trial failed is a failed command (non-zero exit), with the first error."""
    failed = [r for r in rows if r["status"] == "error"]
    if rows and len(failed) == len(rows):
        raise UserError(
            f"all {len(rows)} trials failed; the first: {failed[0]['error']} "
            f"({exp_dir / 'trials' / failed[0]['trial_id'] / 'error.txt'} has its traceback)"
        )


SEARCH_IDENTITY = ("model", "data", "gates", "prune", "tune")  # what a resumed search must share with its start
_RESOURCE_KEYS = ("max_concurrent_trials", "trial_driver_cpus")  # may change between sessions


def _search_spec(cfg: RunConfig) -> dict:
    spec = {s: config_to_dict(cfg)[s] for s in SEARCH_IDENTITY}
    spec["tune"] = {k: v for k, v in (spec["tune"] or {}).items() if k not in _RESOURCE_KEYS}
    return spec


def check_same_search(exp_dir: Path, cfg: RunConfig, restore: bool) -> None:
    """A search is resumed only with the config it started with (Tune would silently keep the old space
    and model); a new search records its config in EXP/search.yaml."""
    saved, spec = exp_dir / "search.yaml", _search_spec(cfg)
    if restore and saved.is_file():
        diff = saved_config_diff(saved, spec, SEARCH_IDENTITY, "delete it to resume the search anyway")
        if diff:
            raise UserError(
                f"{exp_dir}: holds a search of another config (differs in {', '.join(diff[:4])}); use another "
                f"--out, or delete {exp_dir / TUNE_NAME} and {exp_dir / 'trials'} to start the search over"
            )
    if not restore or not saved.is_file():
        exp_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(yaml.safe_dump(spec, sort_keys=False))


def check_fits_with_drivers(cfg: RunConfig, tc: TuneConfig) -> None:
    """One trial's workers must fit beside the CPU reserved by every concurrent trial's driver."""
    import ray

    check_fits(cfg.scaling)
    total = ray.cluster_resources().get("CPU", 0.0)
    need = tc.max_concurrent_trials * tc.trial_driver_cpus + cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if need > total + 1e-9:
        raise UserError(
            f"tune: {tc.max_concurrent_trials} trial driver(s) x {tc.trial_driver_cpus} CPU + "
            f"{cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker} CPU = {need:.3g} CPUs, but the "
            f"cluster has {total:.3g}: lower tune.max_concurrent_trials or scaling.cpus_per_worker"
        )
