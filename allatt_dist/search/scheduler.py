"""Early stopping that answers the user's question: successive halving *within* a target, never across.

ASHA compares every trial with every other at each rung. In a pruning search that compares trials
across the very axis the user wants to see: at any step a sparser model has the worse validation
perplexity, so ASHA stops the whole sparse half of the curve. `TargetHalving` runs the same
asynchronous successive-halving rule (at rung r, a trial is stopped when its perplexity is worse than
the best 1/reduction_factor of the trials of its group already recorded there), but only among
trials of one *group*: the same sparsity target or parameter budget or L0 coefficient, and the same
architecture. So every target keeps its best configuration to the end.

Two more properties:
- rungs are grace x rf^k strictly *below* the last step, so no trial is stopped at its last report
  (it would lose the records written after it);
- every decision is recorded in EXP/scheduler.json (atomically) and replayed when a trial reports
  at a rung again, so a search killed at any moment and resumed makes exactly the decisions of an
  uninterrupted one (Tune does not save its schedulers' state with the experiment).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from allatt_dist.rundir import RunDir

# Trials compete only with trials that agree on these (absent = the recipe's value, shared by all).
GROUP_KEYS = ("model.architecture", "gates.sparsity_target", "gates.param_budget", "gates.l0_coefficient")


def rungs(grace: int, rf: float, max_steps: int) -> list[int]:
    """grace, grace*rf, grace*rf^2, ... below max_steps (a report at the last step is never judged)."""
    out, r = [], float(grace)
    while round(r) < max_steps:
        out.append(int(round(r)))
        r *= rf
    return sorted(set(out))


def group_of(config: dict) -> str:
    """The group a trial competes in: its values of GROUP_KEYS, as a stable string."""
    return json.dumps({k: config.get(k) for k in GROUP_KEYS if k in config}, sort_keys=True)


class TargetHalving(FIFOScheduler):
    def __init__(
        self, grace: int, reduction_factor: float, max_steps: int, state_file: Path, time_attr: str = "step", store=None
    ):
        super().__init__()
        self.store = store  # the experiment's RunDir: with object storage each decision is published as it is made
        self.rungs, self.max_steps = rungs(grace, reduction_factor, max_steps), max_steps
        self.rf, self.time_attr, self.state_file = reduction_factor, time_attr, Path(state_file)
        self.mode = "min"
        self._state: dict | None = None  # loaded on first use: a restored copy reads the recorded decisions

    def set_search_properties(self, metric, mode, **spec) -> bool:
        if mode:
            self.mode = mode
        return super().set_search_properties(metric, mode, **spec)

    @property
    def state(self) -> dict:
        if self._state is None:
            self._state = {"recorded": {}, "decisions": {}, "stopped": {}}
            if self.state_file.is_file():
                self._state = json.loads(self.state_file.read_text())
        return self._state

    def _save(self) -> None:
        run = self.store if self.store is not None else RunDir(self.state_file.parent)
        run.write_text(self.state_file, json.dumps(self._state, indent=1, sort_keys=True) + "\n")

    def __getstate__(self) -> dict:  # Tune pickles the scheduler at the start; the file holds the history
        return {**self.__dict__, "_state": None}

    def decide(self, trial_id: str, group: str, step: int, value: float | None) -> str:
        """CONTINUE or STOP for `trial_id` reporting `value` at `step` (recorded once per trial and rung)."""
        passed = [r for r in self.rungs if step >= r]
        if not passed or value is None or not np.isfinite(value):
            return TrialScheduler.CONTINUE
        rung = str(passed[-1])
        made = self.state["decisions"].setdefault(trial_id, {})
        if TrialScheduler.STOP in made.values():  # a resumed trial reporting again after its stop
            return TrialScheduler.STOP
        if step >= self.max_steps:  # its last report: it has trained all its steps, its records follow
            return TrialScheduler.CONTINUE
        if rung in made:  # the same answer as before an interruption
            return made[rung]
        reward = -float(value) if self.mode == "min" else float(value)
        recorded = self.state["recorded"].setdefault(group, {}).setdefault(rung, {})
        others = [v for t, v in recorded.items() if t != trial_id]
        cutoff = np.nanpercentile(others, (1 - 1 / self.rf) * 100) if others else None
        made[rung] = TrialScheduler.STOP if cutoff is not None and reward < cutoff else TrialScheduler.CONTINUE
        recorded[trial_id] = reward
        if made[rung] == TrialScheduler.STOP:  # what the trial's record says, even if a resume runs it on
            self.state.setdefault("stopped", {})[trial_id] = {"step": step, "value": float(value)}
        self._save()
        return made[rung]

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.time_attr not in result or self.metric not in result:
            return TrialScheduler.CONTINUE
        return self.decide(trial.trial_id, group_of(trial.config), int(result[self.time_attr]), result[self.metric])

    @staticmethod
    def stops(state_file: Path) -> dict[str, dict]:
        """trial_id -> {"step", "value"} of every trial stopped (as decided, whatever ran after a resume)."""
        return json.loads(state_file.read_text()).get("stopped", {}) if state_file.is_file() else {}

    def debug_string(self) -> str:
        return f"TargetHalving: rungs {self.rungs}, {len(self.state['recorded'])} group(s)"
