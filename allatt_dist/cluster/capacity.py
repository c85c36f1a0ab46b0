"""Fail fast when a run's workers can never be placed: Ray would otherwise wait forever for resources
that do not exist. Asked once per command, after connecting (`cli.py`, `search/pipeline.py`)."""

from __future__ import annotations

from allatt_dist.config import ScalingConfig, TuneConfig
from allatt_dist.errors import UserError


def check_fits(scaling: ScalingConfig, label: str = "scaling") -> None:
    """Raise one line when `num_workers` workers of the requested size can never be placed."""
    import ray

    need = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        need["GPU"] = scaling.gpus_per_worker
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    slots = 0
    for res in nodes:
        per_node = min(int(res.get(k, 0.0) / v + 1e-9) if v > 0 else 10**9 for k, v in need.items())
        slots += per_node
    if slots < scaling.num_workers:
        total = {k: sum(r.get(k, 0.0) for r in nodes) for k in need}
        if scaling.use_gpu and total.get("GPU", 0.0) == 0.0:
            raise UserError(
                f"{label}.use_gpu=true but the cluster has no GPUs ({len(nodes)} node(s)); set "
                f"{label}.use_gpu=false to train on CPUs, or add GPU nodes"
            )
        raise UserError(
            f"{label}.num_workers={scaling.num_workers} workers of {need} can never be placed: the cluster "
            f"has {total} over {len(nodes)} node(s), room for {slots}; lower {label}.num_workers or "
            f"{label}.cpus_per_worker, or add nodes"
        )


def check_fits_with_drivers(scaling: ScalingConfig, tc: TuneConfig) -> None:
    """One trial's workers must fit beside the CPU reserved by every concurrent trial's driver."""
    import ray

    check_fits(scaling)
    total = ray.cluster_resources().get("CPU", 0.0)
    need = tc.max_concurrent_trials * tc.trial_driver_cpus + scaling.num_workers * scaling.cpus_per_worker
    if need > total + 1e-9:
        raise UserError(
            f"tune: {tc.max_concurrent_trials} trial driver(s) x {tc.trial_driver_cpus} CPU + "
            f"{scaling.num_workers} workers x {scaling.cpus_per_worker} CPU = {need:.3g} CPUs, but the "
            f"cluster has {total:.3g}: lower tune.max_concurrent_trials or scaling.cpus_per_worker"
        )
