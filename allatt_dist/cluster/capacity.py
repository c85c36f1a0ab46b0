"""Fail fast when a run's workers can never be placed: Ray would otherwise wait forever for resources
that do not exist. Asked once per command, after connecting (`cli.py`: `_connect`), and again by
`search/tune.py` before a search (with the trial drivers' CPUs).

On a cluster that autoscales (`autoscaler.py`), "can never" means "not even with every node type at its
`max_workers`": a run that fits once nodes are added asks the autoscaler for them and waits, with a
progress line, up to `scaling.wait_for_nodes_s`.
"""

from __future__ import annotations

import atexit
import sys
import time
from dataclasses import dataclass

from allatt_dist.cluster import autoscaler as autoscale
from allatt_dist.config import ScalingConfig, TuneConfig
from allatt_dist.errors import UserError

POLL_S = 1.0


@dataclass(frozen=True)
class Demand:
    """`workers` bundles of `need`, plus `driver_cpus` CPUs anywhere (Tune's trial drivers)."""

    need: dict[str, float]
    workers: int
    driver_cpus: float = 0.0

    def bundles(self) -> list[dict[str, float]]:
        extra = [{"CPU": self.driver_cpus}] if self.driver_cpus > 0 else []
        return [dict(self.need) for _ in range(self.workers)] + extra


def check_fits(scaling: ScalingConfig, label: str = "scaling") -> None:
    """Raise one line when `num_workers` workers of the requested size can never be placed."""
    _check(scaling, Demand(_need(scaling), scaling.num_workers), label)


def check_fits_with_drivers(scaling: ScalingConfig, tc: TuneConfig) -> None:
    """One trial's workers must fit beside the CPU reserved by every concurrent trial's driver."""
    _check(scaling, Demand(_need(scaling), scaling.num_workers, tc.max_concurrent_trials * tc.trial_driver_cpus))


GIB = 2**30
# GPU memory (bytes) by Ray's accelerator_type resource, for the memory check (a type not listed: not checked).
GPU_MEMORY = {"H100": 80 * 10**9, "H200": 141 * 10**9, "A100-80G": 80 * 10**9, "A100-40G": 40 * 10**9, "L4": 24 * 10**9,
              "A10G": 24 * 10**9, "T4": 16 * 10**9}  # fmt: skip


def _memory(res: dict[str, float], scaling: ScalingConfig) -> float | None:
    """A CPU node's Ray `memory` resource (its workers share it), or one GPU worker's GPU memory (None:
    an accelerator type not in GPU_MEMORY)."""
    if not scaling.use_gpu:
        return res.get("memory", 0.0)
    kind = next((key.split(":", 1)[1] for key in res if key.startswith("accelerator_type:")), None)
    return GPU_MEMORY[kind] * scaling.gpus_per_worker if kind in GPU_MEMORY else None


def memory_room(nodes: list[dict[str, float]], scaling: ScalingConfig, need_bytes: float) -> int | None:
    """How many workers that need `need_bytes` each the nodes hold at best (None: no node's memory is known)."""
    room, known = 0, False
    for res in nodes:
        mem, k = _memory(res, scaling), min(slots([res], _need(scaling)), scaling.num_workers)
        if mem is None:
            continue
        known = True
        room += (k if mem >= need_bytes else 0) if scaling.use_gpu else min(k, int(mem // need_bytes))
    return room if known else None


def check_memory(scaling: ScalingConfig, need_bytes: float, what: str, nodes: list[dict[str, float]] | None = None):
    """Raise one line when no placement of `num_workers` workers gives each `need_bytes` of memory (`what`
    says what needs it). Nothing is checked without a connected Ray (nodes None) or a known memory size."""
    if nodes is None:
        import ray

        if not ray.is_initialized():
            return
        nodes = _alive()
    room = memory_room(nodes, scaling, need_bytes)
    if room is None or room >= scaling.num_workers:
        return
    best = max((m for m in (_memory(r, scaling) for r in nodes) if m is not None), default=0.0)
    where = (
        "of GPU memory per worker" if scaling.use_gpu else "of Ray's `memory` resource on a node, shared by its workers"
    )
    raise UserError(
        f"{what}: a worker needs at least {need_bytes / GIB:.2f} GiB but the cluster has at most {best / GIB:.2f} GiB "
        f"{where}: room for {room} of scaling.num_workers={scaling.num_workers}; use a smaller teacher or batch, "
        "deepspeed.zero_stage=3, or larger nodes"
    )


def _need(scaling: ScalingConfig) -> dict[str, float]:
    need = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        need["GPU"] = scaling.gpus_per_worker
    return need


def _check(scaling: ScalingConfig, demand: Demand, label: str = "scaling") -> None:
    nodes = _alive()
    if fits(nodes, demand):
        return
    auto = autoscale.discover() if scaling.wait_for_nodes_s > 0 else None
    if auto is None:
        _refuse(
            nodes, demand, label, "no autoscaler" if scaling.wait_for_nodes_s > 0 else f"{label}.wait_for_nodes_s=0"
        )
    if auto.knows_types:
        at_limit = [n for n in nodes if autoscale.HEAD_RESOURCE in n] + scaled_out(auto)
        if not fits(at_limit, demand):
            raise UserError(
                f"{_what(demand, label)} can never be placed, not even with the autoscaler at its limits: "
                f"{auto.describe()}; lower {label}.num_workers or {label}.cpus_per_worker, or add a node type"
            )
    _wait(demand, scaling.wait_for_nodes_s, label)


def _alive() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def slots(nodes: list[dict[str, float]], need: dict[str, float]) -> int:
    """How many bundles of `need` the nodes hold (each bundle on one node)."""
    total = 0
    for res in nodes:
        total += min(int(res.get(k, 0.0) / v + 1e-9) if v > 0 else 10**9 for k, v in need.items())
    return total


def fits(nodes: list[dict[str, float]], demand: Demand) -> bool:
    if slots(nodes, demand.need) < demand.workers:
        return False
    if demand.driver_cpus <= 0:
        return True
    cpus = sum(r.get("CPU", 0.0) for r in nodes)
    return demand.workers * demand.need["CPU"] + demand.driver_cpus <= cpus + 1e-9


def scaled_out(auto: autoscale.Autoscaler) -> list[dict[str, float]]:
    """Worker nodes with every type at its max_workers (within the cluster-wide cap): largest types first."""
    left = auto.max_workers if auto.max_workers is not None and auto.max_workers >= 0 else 10**6
    out: list[dict[str, float]] = []
    for t in sorted(auto.types, key=lambda t: -sum(t.resources.values())):
        count = min(left, t.max_workers if t.max_workers >= 0 else left, 1024)
        out += [dict(t.resources)] * count
        left -= count
    return out


def _what(demand: Demand, label: str) -> str:
    drivers = f" (+ {demand.driver_cpus:.3g} CPU for trial drivers)" if demand.driver_cpus > 0 else ""
    return f"{label}.num_workers={demand.workers} workers of {demand.need}{drivers}"


def _summary(nodes: list[dict[str, float]], keys) -> str:
    total = {k: round(sum(r.get(k, 0.0) for r in nodes), 3) for k in keys}
    return f"{len(nodes)} node(s) with {total}"


def _refuse(nodes: list[dict[str, float]], demand: Demand, label: str, why: str) -> None:
    need = demand.need
    have = slots(nodes, need)
    total = {k: sum(r.get(k, 0.0) for r in nodes) for k in need}
    if "GPU" in need and total.get("GPU", 0.0) == 0.0:
        raise UserError(
            f"{label}.use_gpu=true but the cluster has no GPUs ({len(nodes)} node(s); {why}); set "
            f"{label}.use_gpu=false to train on CPUs, or add GPU nodes"
        )
    if have < demand.workers:
        raise UserError(
            f"{_what(demand, label)} can never be placed: the cluster has {total} over {len(nodes)} node(s), "
            f"room for {have} ({why}); lower {label}.num_workers or {label}.cpus_per_worker, or add nodes"
        )
    cpus = sum(r.get("CPU", 0.0) for r in nodes)
    raise UserError(
        f"tune: trial drivers ({demand.driver_cpus:.3g} CPU) + {demand.workers} workers x {need['CPU']} CPU = "
        f"{demand.workers * need['CPU'] + demand.driver_cpus:.3g} CPUs, but the cluster has {cpus:.3g}: lower "
        "tune.max_concurrent_trials or scaling.cpus_per_worker"
    )


def _wait(demand: Demand, timeout_s: float, label: str) -> None:
    """Ask the autoscaler for the demand and wait until the live nodes hold it, or refuse after timeout_s."""
    autoscale.request(demand.bundles())
    atexit.register(autoscale.clear_request)  # this run's nodes may scale down once the driver exits
    start = time.monotonic()
    before = _alive()
    tty = sys.stderr.isatty()
    last = ""
    while True:
        nodes = _alive()
        if fits(nodes, demand):
            if last:
                print(f"\rautoscaler: ready after {time.monotonic() - start:.0f} s, {_summary(nodes, demand.need)}"
                      + " " * 10, file=sys.stderr, flush=True)  # fmt: skip
            return
        waited = time.monotonic() - start
        if waited >= timeout_s:
            autoscale.clear_request()
            raise UserError(
                f"waited {waited:.0f} s (scaling.wait_for_nodes_s) for the autoscaler: asked for "
                f"{_what(demand, label)}; the cluster went from {_summary(before, demand.need)} to "
                f"{_summary(nodes, demand.need)}, room for {slots(nodes, demand.need)}; raise "
                "scaling.wait_for_nodes_s or check the autoscaler (`ray status`)"
            )
        line = (
            f"autoscaler: waiting for {_what(demand, label)}: room for {slots(nodes, demand.need)} on "
            f"{_summary(nodes, demand.need)} ({waited:.0f}/{timeout_s:.0f} s)"
        )
        if line != last and (tty or not last or int(waited) % 30 == 0):
            print(("\r" if tty else "") + line, end="" if tty else "\n", file=sys.stderr, flush=True)
        last = line
        time.sleep(POLL_S)
