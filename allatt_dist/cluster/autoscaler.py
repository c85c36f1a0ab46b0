"""What the cluster's autoscaler can add: its node types, and asking it for resources.

Asking is public (`ray.autoscaler.sdk.request_resources`). Learning the node types is not: Ray 2.60 has no
public call that lists them, so this module is the one place that reads them, from (in order)

1. the cluster config in the GCS (`ray._private.state.state.get_cluster_config()`, what Ray Train V2's own
   "insufficient resources" check reads; filled where the platform reports it), else
2. the YAML the head's autoscaler (`monitor.py --autoscaling-config=FILE`) was started with, read by a
   zero-CPU task pinned to the head node (`ray up`, `ray start --head --autoscaling-config`).

Autoscaler v2 (KubeRay with `autoscalerOptions.version: v2`, `ray up` in Ray 2.60) is seen even when neither
reveals its node types; then the capacity check asks and waits, without its fast refusal. A v1 autoscaler
that runs outside the head's process table (KubeRay's v1 sidecar) is not seen: only the live nodes count.
tests/test_autoscale.py holds each of these reads against this Ray, so an upgrade that moves one fails there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

HEAD_RESOURCE = "node:__internal_head__"


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]  # {} when the config leaves them to the cloud (unknown here)
    max_workers: int  # -1: unlimited


@dataclass(frozen=True)
class Autoscaler:
    source: str  # where the node types came from, for messages
    types: list[NodeType] = field(default_factory=list)  # worker types; [] = unknown
    max_workers: int | None = None  # the cluster-wide cap on worker nodes, when the config has one

    @property
    def knows_types(self) -> bool:
        return bool(self.types) and all(t.resources for t in self.types)

    def describe(self) -> str:
        limit = {t.name: t.max_workers if t.max_workers >= 0 else "inf" for t in self.types}
        kinds = ", ".join(f"{t.name} {t.resources} x<={limit[t.name]}" for t in self.types)
        cap = f"; at most {self.max_workers} worker nodes in all" if self.max_workers is not None else ""
        return f"node types {kinds or 'unknown'}{cap} (from {self.source})"


def discover() -> Autoscaler | None:
    """The cluster's autoscaler, or None when nothing autoscales it."""
    found = _from_gcs_cluster_config()
    if found is not None:
        return found
    found = _from_head_monitor()  # before its first status report too: a monitor starting up is still one
    if found is not None:
        return found
    if _status_published() and _is_v2():
        # v2 publishes a status only when it runs; v1's status is published by a read-only monitor too
        return Autoscaler(source="the autoscaler's status (node types not published)")
    return None


def request(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler to make room for `bundles` now (replaces any earlier request of this driver)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def clear_request() -> None:
    """Withdraw the request, so the autoscaler may scale idle nodes down again."""
    import ray

    if ray.is_initialized():
        request([])


def _from_gcs_cluster_config() -> Autoscaler | None:
    import ray._private.state as state

    cfg = state.state.get_cluster_config()
    if cfg is None or not cfg.node_group_configs:
        return None
    types = [
        NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
        for g in cfg.node_group_configs
        if g.max_count != 0 and HEAD_RESOURCE not in g.resources
    ]
    return Autoscaler(source="the GCS cluster config", types=types) if types else None


def _from_head_monitor() -> Autoscaler | None:
    """Node types from the autoscaling YAML of the monitor that serves this cluster's GCS."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    heads = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and HEAD_RESOURCE in n.get("Resources", {})]
    if not heads:
        return None
    gcs = ray.get_runtime_context().gcs_address
    if ray.get_runtime_context().get_node_id() == heads[0]:  # a driver on the head (jobs, a local Ray)
        text = _read_monitor_config(gcs)
        return parse_autoscaling_yaml(text, "the head's autoscaling config") if text else None
    task = ray.remote(num_cpus=0, max_retries=0)(_read_monitor_config)
    strategy = NodeAffinitySchedulingStrategy(heads[0], soft=False)
    try:
        text = ray.get(task.options(scheduling_strategy=strategy).remote(gcs), timeout=60)
    except (ray.exceptions.RayError, TimeoutError):
        return None
    return parse_autoscaling_yaml(text, "the head's autoscaling config") if text else None


def _read_monitor_config(gcs_address: str) -> str | None:
    """(On the head.) The text of the `--autoscaling-config` file of the monitor serving `gcs_address`."""
    import psutil

    port = gcs_address.rsplit(":", 1)[-1]
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info.get("cmdline") or []
        if not any(a.endswith("/monitor.py") for a in args):
            continue
        opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        if opts.get("gcs-address", "").rsplit(":", 1)[-1] == port and opts.get("autoscaling-config"):
            try:
                with open(opts["autoscaling-config"], encoding="utf-8") as f:
                    return f.read()
            except OSError:
                return None
    return None


def parse_autoscaling_yaml(text: str, source: str) -> Autoscaler | None:
    """The worker node types of a cluster-launcher YAML (its `available_node_types`, head excluded)."""
    import yaml

    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("available_node_types"), dict):
        return None
    head = cfg.get("head_node_type")
    cap = cfg.get("max_workers")
    types = []
    for name, spec in cfg["available_node_types"].items():
        if name == head or not isinstance(spec, dict):
            continue
        limit = spec.get("max_workers", cap if cap is not None else -1)
        if limit == 0:
            continue
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        types.append(NodeType(str(name), resources, int(limit)))
    return Autoscaler(source=source, types=types, max_workers=int(cap) if cap is not None else None)


def _status_published() -> bool:
    """True when a monitor reports an autoscaler's status to the GCS (what `ray status` reads). A plain
    `ray start` or `ray.init()` has one too (read-only, it adds nothing): the node types tell them apart."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return False
    raw = _internal_kv_get("__autoscaling_status")
    if not raw:
        return _is_v2()
    try:
        return "autoscaler_report" in json.loads(raw)
    except ValueError:
        return False


def _is_v2() -> bool:
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    return bool(is_autoscaler_v2())
