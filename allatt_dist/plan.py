"""The resolved plan: what one command runs, decided once at the boundary and passed down as is.

    recipe YAML + --set  --recipe.load_config-->  RunConfig  --make_plan-->  Plan  --> train / tune / run
                                                                               \\--> Ray Train workers (pickled)

`make_plan` pins the data folder (checked, absolute: workers run in other directories and on other
nodes), generates the DeepSpeed config (which also refuses CPU-impossible settings) and resolves the
output directory (`run`: the RunDir of rundir.py, a local folder or a bucket mirrored locally, parsed from
`--out` once by the CLI). It also tokenises the corpus into its cache, before Ray starts; with
`data.build_workers: ray` that waits until the CLI connected (`Plan.with_tokens`: Ray tasks build it).
Every layer below reads these fields and re-derives none of them; a Tune trial
gets its own plan from its sampled values with `Plan.with_values`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from allatt_dist.config import RunConfig
from allatt_dist.data.corpus import check_segments, resolve_data
from allatt_dist.rundir import RunDir
from allatt_dist.train.setup import deepspeed_config


@dataclass(frozen=True)
class Plan:
    cfg: RunConfig  # validated; data.path (when local) checked and absolute
    out: Path  # absolute: the run directory (train), the experiment directory (tune, run), or a trial's
    ds_config: dict[str, Any]  # what deepspeed.initialize takes, generated from cfg once
    run: RunDir  # the command's run/experiment directory, which `out` lies in (local, or a bucket's mirror)
    verbose: bool = False  # Ray's and DeepSpeed's own logs
    progress: bool = True  # progress bars on the driver
    force: bool = False  # reuse a run directory that holds another config's run
    tokenised: bool = True  # the token cache built and checked (False: data.build_workers ray, Ray not connected)

    def with_tokens(self) -> Plan:
        """This plan with its token cache built and checked, by Ray tasks (`data.build_workers: ray`, which
        `make_plan` defers when Ray is not connected yet; the CLI calls this once it connected)."""
        if self.tokenised:
            return self
        cfg = _tokenise(self.cfg, on_ray=True)
        return replace(self, cfg=cfg, ds_config=_ds_config(cfg), tokenised=True)

    def for_process(self, tag: str = "trial") -> Plan:
        """This plan in another process (a Tune trial): `out` moved into that process's own RunDir."""
        mine = self.run.here(tag)
        return self if mine is self.run else replace(self, out=self.run.moved(self.out, mine), run=mine)

    def with_values(self, values: dict[str, Any], out: Path, **changes: Any) -> Plan:
        """This plan with dotted config keys set (a trial's sampled values, another architecture), writing
        to `out`; `changes` replace other fields (a trial runs with progress=False, force=True)."""
        cfg = self.cfg.with_values(values)
        return replace(self, cfg=cfg, out=Path(out), ds_config=_ds_config(cfg), **changes)


def _ds_config(cfg: RunConfig) -> dict[str, Any]:
    return deepspeed_config(cfg)


def make_plan(
    cfg: RunConfig,
    out: str | Path | RunDir,
    *,
    verbose: bool = False,
    progress: bool = True,
    force: bool = False,
) -> Plan:
    """Resolve `cfg` for a command writing to `out` (a folder, or the RunDir `--out` was opened as:
    rundir.open_out); one line (`UserError`) for anything that cannot run. The corpus is tokenised into its
    cache and checked here, before Ray starts, except with `data.build_workers: ray` while this process is
    not connected to Ray: then its files are checked (resolve_data) and the build waits for `with_tokens`."""

    cfg = cfg.model_copy(update={"data": resolve_data(cfg.data, ("train", "valid"))})
    ray = sys.modules.get("ray")  # imported by whoever connected; never imported here
    deferred = cfg.data.build_workers == "ray" and not (ray is not None and ray.is_initialized())
    if not deferred:
        cfg = _tokenise(cfg, on_ray=cfg.data.build_workers == "ray")
    run = out if isinstance(out, RunDir) else RunDir(Path(out).resolve())
    return Plan(
        cfg, run.root, _ds_config(cfg), run, verbose=verbose, progress=progress, force=force, tokenised=not deferred
    )


def _tokenise(cfg: RunConfig, on_ray: bool) -> RunConfig:
    """Build the token cache (Ray tasks when `on_ray`), check that the train split gives every batch row a
    segment (the recipe's and a search's extremes), and resolve `adaptive_cutoffs: auto`."""
    variants = [cfg, *(cfg.with_values(s) for s in cfg.tune.samples())] if cfg.tune is not None else [cfg]
    check_segments(cfg.data, {(c.train.batch_size, c.model.seq_len) for c in variants}, on_ray=on_ray)
    return _auto_cutoffs(cfg) if cfg.model.adaptive_cutoffs == "auto" else cfg


def _auto_cutoffs(cfg: RunConfig) -> RunConfig:
    """`model.adaptive_cutoffs: auto` as token ids from the train split's frequencies (model/output.py's rule), so
    every phase, trial, saved config and model directory holds the same ids."""
    import numpy as np

    from allatt_dist.data.corpus import load_corpus
    from allatt_dist.model.output import auto_cutoffs

    corpus = load_corpus(cfg.data, ("train",))
    counts = np.bincount(np.asarray(corpus.tokens("train")), minlength=len(corpus.vocab))  # (V,)
    model = cfg.model.model_copy(update={"adaptive_cutoffs": auto_cutoffs(counts)})
    return cfg.model_copy(update={"model": model})
