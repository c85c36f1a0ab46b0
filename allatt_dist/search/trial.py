"""The Tune trial function: one prune-phase Ray Train run with the trial's sampled values.

    Tuner  ->  run_trial (0.01 CPU)  ->  TorchTrainer (prune phase, N DeepSpeed workers)

Ray Train's reports reach Tune through `TuneReportCallback`, so the scheduler sees validation
perplexity at every checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from allatt_dist.atomic import write_json
from allatt_dist.plan import Plan
from allatt_dist.search.layout import Experiment
from allatt_dist.search.records import run_name, tb_run_dir
from allatt_dist.train.trainer import prepare_run_dir, run_phase


def run_trial(params: dict[str, Any], plan: Plan, dense_models: dict[str, Path]) -> None:
    """The function trainable: `plan` is the search's plan, `params` this trial's sampled dotted keys."""
    mine = plan.for_process("trial")  # object storage: this trial's own mirror of the experiment
    dense = {a: plan.run.moved(d, mine.run) for a, d in dense_models.items()}
    try:
        _run(params, mine, dense)
    finally:
        mine.run.discard()


def _run(params: dict[str, Any], plan: Plan, dense_models: dict[str, Path]) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    exp = Experiment(plan.out, plan.run)
    trial_id = tune.get_context().get_trial_id()
    trial = plan.with_values(params, exp.trial_dir(trial_id), progress=False, force=True)
    prepare_run_dir(trial)
    write_json(trial.out / "params.json", params)
    write_json(trial.out / "status.json", {"status": "running"})
    trial.run.publish(trial.out)
    tb = tb_run_dir(exp.root, run_name(trial.cfg.to_dict(), params, trial_id))  # the run named by what it is
    try:
        run_phase(
            trial,
            "prune",
            init_dir=dense_models[trial.cfg.model.architecture],
            callbacks=[TuneReportCallback()],
            tb_dir=tb,
        )
    except Exception as e:
        # Not status.json: the driver writes the final status of every trial after the search
        # (`Experiment.record_statuses`), and a trial the scheduler stops also ends up here, in a process
        # that may outlive the search and would overwrite "stopped" with this error.
        trial.run.write_text(trial.out / "error.txt", str(e)[:4000] + "\n")
        raise
    trial.run.write_json(trial.out / "status.json", {"status": "finished"})  # the driver's record follows (records.py)
