"""The Tune trial function: one prune-phase Ray Train run with the trial's sampled values.

    Tuner  ->  run_trial (0.01 CPU)  ->  TorchTrainer (prune phase, N DeepSpeed workers)

Ray Train's reports reach Tune through `TuneReportCallback`, so the scheduler sees validation
perplexity at every checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from allatt_dist.plan import Plan
from allatt_dist.search.layout import Experiment, write_json


def _hparams(exp: Experiment, trial_id: str, params: dict[str, Any], metrics: dict[str, Any]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    hp = {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))}
    keep = ("valid_ppl", "params", "hard_sparsity", "expected_sparsity")
    values = {f"hparam/{k}": float(metrics[k]) for k in keep if isinstance(metrics.get(k), (int, float))}
    with SummaryWriter(str(exp.root / "hparams" / trial_id)) as w:
        w.add_hparams(hp, values, run_name=".")


def run_trial(params: dict[str, Any], plan: Plan, dense_models: dict[str, Path]) -> None:
    """The function trainable: `plan` is the search's plan, `params` this trial's sampled dotted keys."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from allatt_dist.train.trainer import prepare_run_dir, run_phase

    exp = Experiment(plan.out)
    trial_id = tune.get_context().get_trial_id()
    trial = plan.with_values(params, exp.trial_dir(trial_id), progress=False, force=True)
    prepare_run_dir(trial)
    write_json(trial.out / "params.json", params)
    write_json(trial.out / "status.json", {"status": "running"})
    try:
        metrics = run_phase(
            trial, "prune", init_dir=dense_models[trial.cfg.model.architecture], callbacks=[TuneReportCallback()]
        )
    except Exception as e:
        # Not status.json: the driver writes the final status of every trial after the search
        # (`Experiment.record_statuses`), and a trial the scheduler stops also ends up here, in a process
        # that may outlive the search and would overwrite "stopped" with this error.
        (trial.out / "error.txt").write_text(str(e)[:4000] + "\n")
        raise
    write_json(trial.out / "status.json", {"status": "finished"})
    _hparams(exp, trial_id, params, metrics)
