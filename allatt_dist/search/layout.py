"""Where a search keeps what: the experiment directory's layout, its records, and its identity.

EXP_DIR/
  run.yaml, dense/              the shared dense model (from `allatt-dist run`)
  dense-<arch>/dense/           the dense model of every other searched architecture
  search.yaml                   the config the search started with (a resume must match it)
  tune/                         Ray Tune's experiment state (what `Tuner.restore` reads)
  scheduler.json                every early-stopping decision (replayed on resume: search/scheduler.py)
  trials/<trial_id>/            run.yaml, params.json, status.json (final: written by the driver),
                                error.txt (when the trial function raised), prune/{model,pruned,...}
  tb/                           TensorBoard: dense, prune/<label>/<trial_id>, HParams (search/records.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from allatt_dist.config import RunConfig
from allatt_dist.errors import UserError
from allatt_dist.recipe import saved_config_diff
from allatt_dist.rundir import RunDir
from allatt_dist.search.records import finalize_trial

SEARCH_IDENTITY = ("model", "data", "gates", "prune", "tune")  # what a resumed search must share with its start
_RESOURCE_KEYS = ("max_concurrent_trials", "trial_driver_cpus")  # may change between sessions


@dataclass(frozen=True)
class Experiment:
    root: Path  # absolute: trial functions run in Ray's own working directories
    run: RunDir | None = None  # the experiment directory root lies in (default: root itself, local)

    def __post_init__(self) -> None:
        if self.run is None:
            object.__setattr__(self, "run", RunDir(self.root))

    @property
    def tune_dir(self) -> Path:
        return self.root / "tune"

    @property
    def scheduler_file(self) -> Path:
        return self.root / "scheduler.json"

    @property
    def search_file(self) -> Path:
        return self.root / "search.yaml"

    def trial_dir(self, trial_id: str) -> Path:
        return self.root / "trials" / trial_id

    def dense_run_dir(self, architecture: str, cfg: RunConfig) -> Path:
        """EXP for the recipe's own architecture, EXP/dense-<architecture> for the other searched ones."""
        return self.root if architecture == cfg.model.architecture else self.root / f"dense-{architecture}"

    def dense_models(self, cfg: RunConfig) -> dict[str, Path]:
        """Each searched architecture's dense model directory (the trials start from it)."""
        archs = (cfg.tune.values_of("model.architecture") if cfg.tune else None) or [cfg.model.architecture]
        return {a: self.dense_run_dir(a, cfg) / "dense" / "model" for a in dict.fromkeys(archs)}

    def check_same_search(self, cfg: RunConfig, restore: bool) -> None:
        """A search is resumed only with the config it started with (Tune would silently keep the old space
        and model); a new search records its config in EXP/search.yaml."""
        spec = _search_spec(cfg)
        if restore and self.search_file.is_file():
            diff = saved_config_diff(self.search_file, spec, SEARCH_IDENTITY, "delete it to resume the search anyway")
            if diff:
                raise UserError(
                    f"{self.root}: holds a search of another config (differs in {', '.join(diff[:4])}); use another "
                    f"--out, or delete {self.tune_dir} and {self.root / 'trials'} to start the search over"
                )
        if not restore or not self.search_file.is_file():
            self.run.write_text(self.search_file, yaml.safe_dump(spec, sort_keys=False))

    def record_statuses(self, grid, max_steps: int, dense_models: dict[str, str]) -> list[dict]:
        """After the search: every trial's final record (search/records.py: status.json, the HParams entry,
        the files of a trial stopped at its last step), from Tune's results."""

        rows = []
        for r in grid:
            metrics = r.metrics or {}
            trial_id = metrics.get("trial_id") or Path(r.path).name
            error = str(r.error) if r.error is not None else None
            rows.append(finalize_trial(self.root, trial_id, metrics, error, max_steps, dense_models, self.run))
        return rows


def _search_spec(cfg: RunConfig) -> dict:
    spec = {s: cfg.to_dict()[s] for s in SEARCH_IDENTITY}
    spec["tune"] = {k: v for k, v in (spec["tune"] or {}).items() if k not in _RESOURCE_KEYS}
    return spec
