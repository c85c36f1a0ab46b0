"""The resolved plan: what one command runs, decided once at the boundary and passed down as is.

    recipe YAML + --set  --recipe.load_config-->  RunConfig  --make_plan-->  Plan  --> train / tune / run
                                                                               \\--> Ray Train workers (pickled)

`make_plan` pins the data folder (checked, absolute: workers run in other directories and on other
nodes), generates the DeepSpeed config (which also refuses CPU-impossible settings) and resolves the
output directory (a local folder, or object storage mirrored locally: `store`, storage.py). Every
layer below reads these fields and re-derives none of them; a Tune trial gets
its own plan from its sampled values with `Plan.with_values`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from allatt_dist.config import RunConfig
from allatt_dist.storage import Mirror


@dataclass(frozen=True)
class Plan:
    cfg: RunConfig  # validated; data.path (when local) checked and absolute
    out: Path  # absolute: the run directory (train) or the experiment directory (tune, run)
    ds_config: dict[str, Any]  # what deepspeed.initialize takes, generated from cfg once
    verbose: bool = False  # Ray's and DeepSpeed's own logs
    progress: bool = True  # progress bars on the driver
    force: bool = False  # reuse a run directory that holds another config's run
    store: Mirror | None = None  # the run/experiment directory `out` lies in (its bucket, when remote)

    @property
    def mirror(self) -> Mirror:
        """Where `out` is kept: the command's run directory (`out` itself when no store was given)."""
        return self.store if self.store is not None else Mirror(self.out)

    def here(self, tag: str = "trial") -> Plan:
        """This plan for another process (a Tune trial): with object storage, its own local mirror."""
        if self.store is None or not self.store.is_remote:
            return self
        mine = self.store.here(tag)
        return replace(self, out=self.store.moved(self.out, mine), store=mine)

    def with_values(self, values: dict[str, Any], out: Path, **changes: Any) -> Plan:
        """This plan with dotted config keys set (a trial's sampled values, another architecture), writing
        to `out`; `changes` replace other fields (a trial runs with progress=False, force=True)."""
        cfg = self.cfg.with_values(values)
        return replace(self, cfg=cfg, out=Path(out), ds_config=_ds_config(cfg), **changes)


def _ds_config(cfg: RunConfig) -> dict[str, Any]:
    from allatt_dist.train.setup import deepspeed_config

    return deepspeed_config(cfg)


def make_plan(
    cfg: RunConfig,
    out: str | Path | Mirror,
    *,
    verbose: bool = False,
    progress: bool = True,
    force: bool = False,
) -> Plan:
    """Resolve `cfg` for a command writing to `out` (a folder, or the Mirror of a run directory in storage);
    one line (`UserError`) for anything that cannot run."""
    from allatt_dist.data.corpus import resolve_data

    cfg = cfg.model_copy(update={"data": resolve_data(cfg.data, ("train", "valid"))})
    store = out if isinstance(out, Mirror) else Mirror(Path(out).resolve())
    return Plan(cfg, store.root, _ds_config(cfg), verbose=verbose, progress=progress, force=force, store=store)
