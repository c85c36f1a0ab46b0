"""`allatt-dist tune`: Ray Tune over gate temperature, sparsity targets (any config key).

    Tuner  ->  trial function (0.01 CPU)  ->  TorchTrainer (prune phase, N DeepSpeed workers)

Every trial starts from one shared dense model and runs the gated prune phase; Ray Train's reports
reach Tune through `TuneReportCallback`, so ASHA sees validation perplexity at every checkpoint.

    EXP_DIR/
      run.yaml, dense/              the shared dense model (from `allatt-dist run`)
      search.yaml                   the config the search started with (a resume must match it)
      tune/                         Ray Tune's experiment state (what `Tuner.restore` reads)
      trials/<trial_id>/            run.yaml, params.json, status.json (final: written by the driver),
                                    error.txt (when the trial function raised), prune/{tb,model,...}
      hparams/<trial_id>/           TensorBoard HParams events (temperature, target -> ppl, params)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from allatt_dist.cluster.session import check_fits
from allatt_dist.config import RunConfig, config_to_dict, saved_config_diff
from allatt_dist.errors import UserError
from allatt_dist.search.space import TuneConfig, param_space, parse_tune, trial_config

TUNE_NAME = "tune"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def _hparams(exp_dir: Path, trial_id: str, params: dict[str, Any], metrics: dict[str, Any]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    hp = {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))}
    keep = ("valid_ppl", "params", "hard_sparsity", "expected_sparsity")
    values = {f"hparam/{k}": float(metrics[k]) for k in keep if isinstance(metrics.get(k), (int, float))}
    with SummaryWriter(str(exp_dir / "hparams" / trial_id)) as w:
        w.add_hparams(hp, values, run_name=".")


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
    _write_json(run_dir / "params.json", params)
    _write_json(run_dir / "status.json", {"status": "running"})
    try:
        metrics = run_phase(
            cfg, run_dir, "prune", verbose, progress=False, init_dir=Path(dense_dir), callbacks=[TuneReportCallback()]
        )
    except Exception as e:
        # Not status.json: the driver writes the final status of every trial after the search
        # (`record_statuses`), and a trial the scheduler stops also ends up here, in a process that
        # may outlive the search and would overwrite "stopped" with this error.
        (run_dir / "error.txt").write_text(str(e)[:4000] + "\n")
        raise
    _write_json(run_dir / "status.json", {"status": "finished"})
    _hparams(exp, trial_id, params, metrics)


def _trial_name(trial) -> str:
    short = {
        "gates.temperature": "temp",
        "gates.sparsity_target": "target",
        "gates.l0_coefficient": "l0",
        "model.architecture": "arch",
    }
    bits = [
        f"{short.get(k, k.split('.')[-1])}={v:.3g}" if isinstance(v, float) else f"{short.get(k, k)}={v}"
        for k, v in sorted(trial.config.items())
    ]
    return f"{trial.trial_id}_" + ",".join(bits)


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
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=config_to_dict(cfg), exp_dir=str(exp_dir), dense_dirs=dense_dirs, verbose=verbose
        ),
        {"cpu": tc.trial_driver_cpus},
    )
    path = str((exp_dir / TUNE_NAME).resolve())
    if restore:  # callbacks are not pickled with the experiment: the release hook must come back too
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        tuner._local_tuner._run_config.callbacks = [_release_callback(exp_dir)]
        return tuner
    if tc.scheduler.type == "asha":
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=cfg.prune.max_steps + 1,  # never stop a trial at its last report: let it finish
            grace_period=min(tc.scheduler.grace_period, cfg.prune.max_steps),
            reduction_factor=tc.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
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
            trial_name_creator=_trial_name,
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=tune.RunConfig(
            name=TUNE_NAME,
            storage_path=str(exp_dir.resolve()),
            verbose=1 if verbose else 0,
            callbacks=[_release_callback(exp_dir)] + ([] if verbose else [_progress_callback(expected_trials(tc))]),
        ),
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


def record_statuses(exp_dir: Path, grid, max_steps: int) -> list[dict]:
    """After the search: each trial's final status (finished / stopped by the scheduler / error)."""
    rows = []
    for r in grid:
        metrics = r.metrics or {}
        trial_id = metrics.get("trial_id") or Path(r.path).name
        if r.error is not None:
            status = {"status": "error", "error": str(r.error).strip().splitlines()[-1][:400]}
        elif metrics.get("step", 0) >= max_steps:
            status = {"status": "finished"}
        else:
            status = {"status": "stopped", "stopped_at_step": metrics.get("step")}
        trial_dir = exp_dir / "trials" / trial_id
        trial_dir.mkdir(parents=True, exist_ok=True)
        last = {k: metrics.get(k) for k in ("step", "valid_ppl", "expected_sparsity", "hard_sparsity")}
        _write_json(trial_dir / "status.json", {**status, "last": last})
        rows.append({"trial_id": trial_id, **status})
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
    tuner = _tuner(cfg, tc, exp_dir, {a: str(d.resolve()) for a, d in dirs.items()}, verbose, restore)
    grid = tuner.fit()
    rows = record_statuses(exp_dir, grid, cfg.prune.max_steps)
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
