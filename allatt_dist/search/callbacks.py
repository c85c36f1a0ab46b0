"""Tune callbacks of the search driver: the trial progress bar and the release of stopped trials' workers.

Both are module-level classes holding only plain data, because Tune pickles the run config (callbacks
included) with the experiment and `Tuner.restore` brings them back: a resumed search keeps them
without reaching into the Tuner.
"""

from __future__ import annotations

import sys

from ray import tune

from allatt_dist.search.records import finalize_trial


class TrialProgress(tune.Callback):
    """One bar over trials on a terminal, else a line per finished trial (the bar is made on first use,
    so a restored copy of this callback draws a fresh one)."""

    def __init__(self, total: int):
        self.total, self.done, self._bar = total, 0, None

    def __getstate__(self) -> dict:
        return {"total": self.total, "done": 0, "_bar": None}

    @property
    def bar(self):
        if self._bar is None:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            self._bar = tqdm(total=self.total, desc="search", unit="trial", dynamic_ncols=True, disable=not tty)
        return self._bar

    def on_trial_result(self, iteration, trials, trial, result, **info):
        best = [t.last_result["valid_ppl"] for t in trials if t.last_result.get("valid_ppl")]
        if best:
            self.bar.set_postfix({"best_valid_ppl": f"{min(best):.4g}"}, refresh=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        self.bar.update(1)
        if not sys.stderr.isatty():
            ppl = trial.last_result.get("valid_ppl")
            step = trial.last_result.get("step")
            ppl = f"{ppl:.1f}" if isinstance(ppl, float) else "n/a"
            print(
                f"search: {self.done}/{self.total} trials done; {trial} ended at step {step}, valid ppl {ppl}",
                file=sys.stderr,
                flush=True,
            )

    on_trial_error = on_trial_complete


def release_placement_group(pg_id: str | None) -> bool:
    """Remove a Train run's worker placement group (hex id) if it still exists; True when removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    if not pg_id:
        return False
    entry = ray.util.placement_group_table().get(pg_id)
    if not entry or entry.get("state") == "REMOVED":
        return False
    remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    return True


class ReleaseTrialResources(tune.Callback):
    """On every trial end (finished, stopped by the scheduler, errored), free the workers its Train run
    may still hold. A trial that the scheduler stops is killed together with its Train controller, and
    Ray 2.60 releases that controller's placement group only through a cleaner that needs the state API
    to find exactly one Ray instance on the machine; the workers report their group's id (rank 0's
    `placement_group_id` metric), so the group is removed here through the public placement-group API."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        release_placement_group((trial.last_result or {}).get("placement_group_id"))

    on_trial_error = on_trial_complete


class RecordTrial(tune.Callback):
    """On every trial end the driver writes the trial's record (status.json, its HParams entry) and completes
    the files of a trial stopped at its last step (search/records.py): stopped trials get one too."""

    def __init__(self, exp_dir, max_steps: int, dense_models: dict[str, str], store=None):
        self.exp_dir, self.max_steps, self.dense_models = exp_dir, max_steps, dense_models
        self.store = store  # the experiment's RunDir (object storage: fetched and published around each record)

    def _record(self, trial, error: str | None) -> None:
        try:
            finalize_trial(
                self.exp_dir,
                trial.trial_id,
                trial.last_result or {},
                error,
                self.max_steps,
                self.dense_models,
                self.store,
            )
        except Exception as e:  # never end the search over a record: the driver records every trial after it
            print(f"search: could not record trial {trial.trial_id} yet: {e}", file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        err = self.exp_dir / "trials" / trial.trial_id / "error.txt"
        if self.store is not None:
            self.store.fetch(err)
        self._record(trial, err.read_text() if err.is_file() else "the trial failed")
