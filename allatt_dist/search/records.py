"""What a search leaves for its reader: one name per run, each trial's final record, and TensorBoard's HParams.

    EXP/tb/dense/                             the dense run (its HParams row is the reference), and the
                                              HParams experiment: hyperparameter domains, metrics
    EXP/tb/prune/temp=0.33,target=0.25/<id>/  one trial's curves, heatmaps, and its HParams entry

`run_name` is the one name of a run: the TensorBoard run (relative to EXP/tb), the leaderboard's `name`,
and `name` in the trial's status.json. The driver (never the trial function) writes every trial's record
when the trial ends, finished, stopped, or errored, and `rank` rewrites it with the test perplexity: the
entry lives in its own events file (`*.hparams`), replaced whole on each write, so the latest word wins.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from allatt_dist.atomic import write_json
from allatt_dist.modelio import read_meta
from allatt_dist.recipe import read_mapping, read_run_config
from allatt_dist.rundir import RunDir
from allatt_dist.search.scheduler import TargetHalving
from allatt_dist.train.monitor import TB_DIR
from allatt_dist.train.trainer import finish_phase

STATUSES = ("finished", "stopped", "error", "reference")
SUFFIX = ".hparams"  # the driver's own events files, told apart from the workers'
EXPERIMENT = ".experiment"  # the HParams experiment's file (in the dense run, beside its entry)
_SHORT = {
    "model.architecture": "arch",
    "gates.temperature": "temp",
    "gates.sparsity_target": "target",
    "gates.l0_coefficient": "l0",
    "gates.param_budget": "budget",
    "train.seed": "seed",
}
# (config key, HParams column) of every trial; searched keys are added under their dotted name
HPARAMS = (
    ("model.architecture", "architecture"),
    ("gates.temperature", "temperature"),
    ("gates.sparsity_target", "target"),
    ("gates.l0_coefficient", "L0 coefficient"),
    ("gates.param_budget", "budget (non-embedding)"),
    ("train.seed", "seed"),
)
# (tag in the session's run, column): written by the driver at the run's last step, exact single points
METRICS = (
    ("result/valid_ppl", "valid ppl"),
    ("result/sparsity", "sparsity (realised)"),
    ("result/params", "params (pruned)"),
    ("result/test_ppl", "test ppl (rank)"),
    ("result/last_step", "last step"),
)


def _get(run: dict, key: str) -> Any:
    section, _, leaf = key.partition(".")
    return (run.get(section) or {}).get(leaf)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v).replace("/", "_")


def trial_label(run: dict, params: dict[str, Any]) -> str:
    """What a trial is, e.g. `temp=0.33,target=0.25`: temperature, target (or L0 coefficient), and every
    other searched key (architecture first when searched)."""
    keys = ["model.architecture"] if "model.architecture" in params else []
    keys += ["gates.temperature", "gates.sparsity_target", "gates.param_budget", "gates.l0_coefficient"]
    keys += sorted(k for k in params if k not in keys)
    bits = [(k, params[k] if k in params else _get(run, k)) for k in keys]
    return ",".join(f"{_SHORT.get(k, k.rsplit('.', 1)[-1])}={_fmt(v)}" for k, v in bits if v is not None)


def run_name(run: dict, params: dict[str, Any] | None = None, trial_id: str | None = None) -> str:
    """The one name of a run: `dense` (or `dense-<arch>` for another architecture's dense model, as its
    folder) and `prune/<label>/<trial_id>` for a trial. `run` is the run's config as a dict (run.yaml)."""
    if trial_id is None:
        return "dense"
    return f"prune/{trial_label(run, params or {})}/{trial_id}"


def _run(run_dir: Path) -> dict:
    """The config of the run in `run_dir` (its run.yaml, read typed: recipe.read_run_config) as plain data."""
    cfg = read_run_config(run_dir / "run.yaml")
    return cfg.to_dict() if cfg is not None else {}


def trial_run_name(trial_dir: Path) -> str:
    return run_name(_run(trial_dir), read_mapping(trial_dir / "params.json"), trial_dir.name)


def tb_run_dir(exp_dir: Path, name: str) -> Path:
    return Path(exp_dir) / TB_DIR / name


def trial_status(last: dict, error: str | None, max_steps: int) -> dict:
    """finished (reached the last step, whatever the scheduler said at that report) / stopped / error."""
    if error is not None:
        return {"status": "error", "error": error.strip().splitlines()[-1][:400] if error.strip() else "failed"}
    if (last.get("step") or 0) >= max_steps:
        return {"status": "finished"}
    return {"status": "stopped", "stopped_at_step": last.get("step")}


def complete_records(trial_dir: Path, last: dict, max_steps: int, dense_dir: Path, store: RunDir) -> bool:
    """A trial the scheduler stopped at its last report: its model was exported before that report, but
    result.json and pruned/ were not written. Write them now, as the trial would have. True if it did."""

    phase_dir = trial_dir / "prune"
    if (phase_dir / "result.json").is_file() or (last.get("step") or 0) < max_steps:
        return False
    if not (phase_dir / "model" / "config.json").is_file() or read_meta(phase_dir / "model").get("step") != max_steps:
        return False
    keep = {k: v for k, v in last.items() if k not in ("config", "trial_id", "experiment_tag")}
    store.fetch(phase_dir / "model")  # object storage: the weights the workers published
    store.fetch(dense_dir / "config.json")
    finish_phase(phase_dir, "prune", keep, dense_dir)
    return True


def finalize_trial(
    exp_dir: Path,
    trial_id: str,
    last: dict,
    error: str | None,
    max_steps: int,
    dense_dirs: dict[str, str],
    store: RunDir | None = None,
) -> dict:
    """The driver's record of an ended trial: completes its files, writes status.json and its HParams entry.
    Idempotent: called when the trial ends (Tune callback) and again for every trial after the search.
    `dense_dirs`: architecture -> the dense model the trials start from; `store`: the experiment directory
    (object storage: the trial's files are fetched first and the record published after)."""
    store = store or RunDir(exp_dir)
    trial_dir = exp_dir / "trials" / trial_id
    store.fetch_records(trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    stop = TargetHalving.stops(exp_dir / "scheduler.json").get(trial_id)
    if stop is not None and error is None and stop["step"] != last.get("step"):
        last = {"step": stop["step"], "valid_ppl": stop["value"]}  # a resumed search ran it past its stop
    status = trial_status(last, error, max_steps)
    arch = _get(_run(trial_dir), "model.architecture")
    if status["status"] == "finished" and arch in dense_dirs:
        complete_records(trial_dir, last, max_steps, Path(dense_dirs[arch]), store)
    name = trial_run_name(trial_dir)
    shown = {k: last.get(k) for k in ("step", "valid_ppl", "expected_sparsity", "hard_sparsity")}
    write_json(trial_dir / "status.json", {**status, "name": name, "last": shown})
    store.fetch(tb_run_dir(exp_dir, name), weights=False)  # its earlier entry, so that this one replaces it
    record_trial(exp_dir, trial_dir)
    store.publish(trial_dir)
    store.publish(tb_run_dir(exp_dir, name))
    return {"trial_id": trial_id, "name": name, **status}


# ----- TensorBoard HParams ------------------------------------------------------------------------------


def _writer(run_dir: Path, suffix: str = SUFFIX):
    """A writer of the driver's own events file in `run_dir`, replacing the previous one."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob(f"events.out.tfevents.*{suffix}"):
        old.unlink()
    return SummaryWriter(str(run_dir), filename_suffix=suffix)


def _summary(tag: str, **data):
    """A TensorBoard summary holding one HParams message (experiment / session start / session end),
    built from TensorBoard's own protos (its `summary` helpers need TensorFlow)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    smd = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(**data))
    return Summary(value=[Summary.Value(tag=tag, metadata=smd, tensor=metadata.NULL_TENSOR)])


def _domain(dom: dict[str, list]) -> dict:
    kind, values = next(iter(dom.items()))
    if kind in ("grid", "choice"):
        return {"domain_discrete": values}
    if kind == "randint":
        return {"domain_interval": (values[0], values[1] - 1)}
    return {"domain_interval": (float(values[0]), float(values[1]))}


def write_experiment(exp_dir: Path, base: dict, space: dict[str, dict[str, list]]) -> None:
    """Declare the HParams experiment (in the dense run, so no run holds only it): every column's domain,
    so TensorBoard shows the searched ones as differing, and the metrics. `base`: the recipe as a dict."""
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata

    infos = []
    columns = [(k, col) for k, col in HPARAMS] + [(k, k) for k in space if k not in dict(HPARAMS)]
    for key, col in columns:
        value = _get(base, key)
        dom = _domain(space[key]) if key in space else {"domain_discrete": [value]}
        if dom.get("domain_discrete") == [None]:
            continue  # not set in this search (the L0 coefficient of a target search)
        info = api_pb2.HParamInfo(name=key, display_name=col)
        if "domain_discrete" in dom:
            values = dom["domain_discrete"]
            kind = type(values[0])
            types = {str: api_pb2.DATA_TYPE_STRING, bool: api_pb2.DATA_TYPE_BOOL}
            info.type = types.get(kind, api_pb2.DATA_TYPE_FLOAT64)
            info.domain_discrete.extend(values if kind in (str, bool) else [float(v) for v in values])
            info.differs = len(set(values)) > 1
        else:
            info.type = api_pb2.DATA_TYPE_FLOAT64
            info.domain_interval.min_value, info.domain_interval.max_value = dom["domain_interval"]
            info.differs = True
        infos.append(info)
    status = api_pb2.HParamInfo(name="status", display_name="status", type=api_pb2.DATA_TYPE_STRING, differs=True)
    status.domain_discrete.CopyFrom(struct_pb2.ListValue(values=[struct_pb2.Value(string_value=s) for s in STATUSES]))
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t), display_name=d) for t, d in METRICS]
    with _writer(exp_dir / TB_DIR / "dense", EXPERIMENT) as w:
        experiment = api_pb2.Experiment(hparam_infos=[*infos, status], metric_infos=metrics)
        w.file_writer.add_summary(_summary(metadata.EXPERIMENT_TAG, experiment=experiment))


def write_session(run_dir: Path, hparams: dict[str, Any], metrics: dict[str, Any], step: int) -> None:
    """One HParams entry (session) in the run `run_dir`: its hyperparameters and final metrics at `step`."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for k, v in hparams.items():
        if isinstance(v, str):
            start.hparams[k].string_value = v
        elif isinstance(v, bool):
            start.hparams[k].bool_value = v
        elif isinstance(v, (int, float)):
            start.hparams[k].number_value = float(v)
    with _writer(run_dir) as w:
        w.file_writer.add_summary(_summary(metadata.SESSION_START_INFO_TAG, session_start_info=start), step)
        for tag, _ in METRICS:
            v = metrics.get(tag.split("/", 1)[1])
            if isinstance(v, (int, float)) and math.isfinite(v):
                w.add_scalar(tag, float(v), step)
        ok = api_pb2.STATUS_FAILURE if hparams.get("status") == "error" else api_pb2.STATUS_SUCCESS
        end = plugin_data_pb2.SessionEndInfo(status=ok, end_time_secs=time.time())
        w.file_writer.add_summary(_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end), step)


def record_trial(exp_dir: Path, trial_dir: Path, test_ppl: float | None = None) -> None:
    """(Re)write a trial's HParams entry from its files: run.yaml, params.json, status.json, result.json."""
    run, params = _run(trial_dir), read_mapping(trial_dir / "params.json")
    status, result = read_mapping(trial_dir / "status.json"), read_mapping(trial_dir / "prune" / "result.json")
    last = status.get("last") or {}
    hp = {key: _get(run, key) for key, _ in HPARAMS} | params | {"status": status.get("status", "running")}
    step = result.get("step") or last.get("step") or 0
    metrics = {
        "valid_ppl": result.get("valid_ppl", last.get("valid_ppl")),
        "sparsity": result.get("sparsity", last.get("hard_sparsity")),
        "params": result.get("params"),
        "test_ppl": test_ppl,
        "last_step": step,
    }
    offset = ((run.get("train") or {}).get("max_steps")) or 0  # TensorBoard steps continue the dense phase
    write_session(tb_run_dir(exp_dir, trial_run_name(trial_dir)), hp, metrics, offset + step)


def record_dense(exp_dir: Path, test_ppl: float | None = None) -> None:
    """The dense model's entry (status `reference`), so every trial compares against it in HParams."""
    run, result = _run(exp_dir), read_mapping(exp_dir / "dense" / "result.json")
    if not result:
        return
    meta = read_mapping(exp_dir / "dense" / "model" / "config.json")
    hp = {key: _get(run, key) for key, col in HPARAMS if key in ("model.architecture", "train.seed")}
    metrics = {
        "valid_ppl": result.get("valid_ppl"),
        "sparsity": 0.0,
        "params": meta.get("params"),
        "test_ppl": test_ppl,
        "last_step": result.get("step"),
    }
    write_session(tb_run_dir(exp_dir, run_name(run)), hp | {"status": "reference"}, metrics, result.get("step") or 0)


def record_test_ppl(exp_dir: Path, rows: list[dict]) -> None:
    """`rank`'s test perplexities into the HParams entries of the runs it scored (leaderboard rows)."""
    for row in rows:
        if row.get("test_ppl") is None:
            continue
        if row["gated"]:
            record_trial(exp_dir, row["dir"], row["test_ppl"])
        elif Path(row["dir"]) == Path(exp_dir):
            record_dense(exp_dir, row["test_ppl"])
