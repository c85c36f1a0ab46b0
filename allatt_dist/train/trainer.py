"""Driver side of `allatt-dist train`: one Ray Train `TorchTrainer` per phase, in one run directory.

    RUN_DIR/
      run.yaml                  resolved config of this run (a different config is refused unless --force)
      <phase>/                  dense | prune | finetune
        checkpoints/            checkpoint_<step>/ (DeepSpeed shards, memory, stream position, MANIFEST.json):
                                whole or absent (train/checkpoints.py); Ray Train's own run state
        model/                  consolidated final model (model.safetensors, config.json, vocab.txt)
        pruned/                 prune phase only: the physically pruned model
        result.json             final metrics of the phase
      tb/<phase>/               TensorBoard events of rank 0 (`tensorboard --logdir RUN/tb`: runs dense, prune, ...)

Re-running the same command resumes: the driver checks the checkpoints (a damaged one is skipped
with a warning naming its file) before anything is rewritten, and every worker restarts from the
newest whole one; finished phases are skipped.

With `--out s3://...` the run directory lives in the bucket and this driver works on a local mirror of it
(rundir.py): it fetches the records (not the weights, not the checkpoints) before deciding anything, and
publishes what it writes; the workers publish their checkpoints, models and TensorBoard events themselves
(train/checkpoints.py).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import yaml

from allatt_dist.atomic import write_json
from allatt_dist.config import ModelConfig, RunConfig
from allatt_dist.errors import CheckpointError, EnvironmentFailure, UserError
from allatt_dist.model.pruning import prune_model
from allatt_dist.modelio import load_model_dir, read_meta, save_model_dir
from allatt_dist.plan import Plan
from allatt_dist.recipe import saved_config_diff
from allatt_dist.train.checkpoints import open_checkpoints
from allatt_dist.train.monitor import TB_DIR, RemoteProgressBoard, follow_progress
from allatt_dist.train.setup import PHASES, Phase, phase_spec
from allatt_dist.train.teacher import check_teacher, teacher_source
from allatt_dist.train.worker import WorkerJob, train_loop_per_worker

INIT_FROM: dict[str, tuple[str, str] | None] = {
    "dense": None,
    "prune": ("dense", "model"),
    "finetune": ("prune", "pruned"),
}


class TrainingFailed(UserError):
    """A Ray Train run that ended in an error (the worker's last error line is the message)."""


IDENTITY = ("model", "data", "gates")  # what makes two runs different runs (step counts may change)


def prepare_run_dir(plan: Plan) -> None:
    """Refuse a run directory that holds another config's run; otherwise check the checkpoints of the
    unfinished phases (train/checkpoints.py: resume_point) and then write run.yaml.

    A directory in which no phase has finished (a first attempt that failed on bad input) holds nothing
    worth keeping: it is taken over, so the corrected command can be run again as it is."""
    run_dir, spec = plan.out, plan.cfg.to_dict()
    sync_in(plan)
    saved = run_dir / "run.yaml"
    finished = any(run_dir.glob("*/result.json")) or any(run_dir.glob("*/model/config.json"))
    if saved.is_file() and not plan.force and finished:
        diff = saved_config_diff(saved, spec, IDENTITY, "use another --out or --force to reuse the directory")
        if diff:
            raise UserError(
                f"{run_dir}: holds a run of another config (differs in {', '.join(diff[:4])}); "
                "use another --out or --force to reuse it"
            )
    for phase in PHASES:  # the resume points are known good (damaged checkpoints set aside) first
        if not phase_done(run_dir, phase, plan.cfg):
            open_checkpoints(plan.run, run_dir / phase / "checkpoints").resume_point()
    plan.run.write_text(saved, yaml.safe_dump(spec, sort_keys=False))


def sync_in(plan: Plan) -> None:
    """Object storage: bring the run directory's records here (weights and checkpoints stay in the bucket
    until a step needs them)."""
    plan.run.fetch_records(plan.out)


WEIGHTLESS_MODEL_KEYS = ("dropout", "dropatt", "same_length")  # may differ between a model and its next phase


def check_starting_model(model_dir: Path, model: ModelConfig, free: tuple[str, ...] = ()) -> None:
    """One line, before any worker starts, when the model in `model_dir` cannot start a run of `model`
    (whose keys in `free` are set per trial). Reads only config.json."""

    meta = read_meta(model_dir)
    if meta.get("architecture") != model.architecture and "architecture" not in free:
        raise CheckpointError(
            f"{model_dir}: a {meta.get('architecture')} model, but model.architecture is {model.architecture}"
        )
    saved, want = meta.get("model") or {}, model.model_dump(mode="json")
    skip = set(WEIGHTLESS_MODEL_KEYS) | set(free)
    diff = sorted(k for k in want if k not in skip and saved.get(k) != want[k])
    if diff:
        shown = ", ".join(f"model.{k} {saved.get(k)!r} there, {want[k]!r} here" for k in diff[:3])
        raise CheckpointError(f"{model_dir}: its model does not match the recipe ({shown})")


def init_dir_for(run_dir: Path, phase: Phase, cfg: RunConfig) -> Path | None:
    src = INIT_FROM[phase]
    if src is None:
        return None
    d = run_dir / src[0] / src[1]
    if not (d / "config.json").is_file():
        raise UserError(f"--phase {phase} needs {d} (run --phase {src[0]} first)")
    check_starting_model(d, cfg.model)
    return d


def check_distill(plan: Plan, phase: Phase, init_dir: Path | None) -> None:
    """One line before any worker starts when the phase's teacher cannot teach it (train/teacher.py)."""
    src = teacher_source(plan.cfg, phase, plan.out, init_dir)
    if src is not None and init_dir is not None:
        check_teacher(src, init_dir, plan.run, plan.cfg.distill.hidden_layers, plan.cfg)


def phase_done(run_dir: Path, phase: Phase, cfg: RunConfig) -> bool:
    res = run_dir / phase / "result.json"
    if not res.is_file():
        return False
    return json.loads(res.read_text()).get("step", 0) >= phase_spec(cfg, phase).max_steps


def _trainer(plan: Plan, phase: Phase, init_dir: Path | None, board, callbacks, tb_dir: Path | None):
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    cfg, sc = plan.cfg, plan.cfg.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    env = {"DS_ACCELERATOR": "cuda" if sc.use_gpu else "cpu", "ALLATT_VERBOSE": "1" if plan.verbose else "0"}
    tb = tb_dir or plan.out / TB_DIR / phase  # a trial's run is named by what it is (search/records.py)
    teacher = teacher_source(cfg, phase, plan.out, init_dir)
    job = WorkerJob(cfg, plan.ds_config, phase, plan.out / phase, init_dir, board, tb, plan.run, teacher)
    storage = {"storage_path": str(plan.out / phase)}  # Ray Train's own run state, beside our checkpoints
    if plan.run.is_remote:
        remote = plan.run.remote.child(plan.run.rel(plan.out / phase))
        storage = {"storage_path": remote.key(), "storage_filesystem": remote.filesystem()}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},  # pickled to every worker: typed, nothing re-read there
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=resources,
            placement_strategy=sc.placement_strategy,
        ),
        run_config=RayRunConfig(
            name="checkpoints",
            **storage,
            failure_config=FailureConfig(max_failures=sc.max_failures),
            worker_runtime_env={"env_vars": env},
            callbacks=callbacks or None,
        ),
    )


def fit_with_progress(trainer, board, desc: str, show: bool):
    """Run `trainer.fit()` in a thread while the main thread draws the progress bar."""
    box: dict = {}

    def target():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # surfaced below, in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    if show:
        follow_progress(board, lambda: not t.is_alive(), desc)
    t.join()
    if "error" in box:
        err = box["error"]
        if environmental(err):
            raise EnvironmentFailure(f"{desc}: training failed: {_last_line(err)}") from err
        raise TrainingFailed(f"{desc}: training failed: {_last_line(err)}") from err
    return box["result"]


def environmental(err: BaseException) -> bool:
    """Whether a failed fit came from the machine (a worker's OSError or MemoryError, an out-of-memory
    kill) rather than from the input: looks through Ray's wrappers (worker failures, causes)."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        text = str(e).lower()
        if isinstance(e, (OSError, MemoryError)) or type(e).__name__ == "OutOfMemoryError":
            return True
        if isinstance(e, RuntimeError) and ("out of memory" in text or "no space left" in text):
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None)]
        todo += list((getattr(e, "worker_failures", None) or {}).values())
    return False


def _last_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errs or lines or [type(err).__name__])[-1][:400]


def run_phase(
    plan: Plan, phase: Phase, init_dir: Path | None = None, callbacks: list | None = None, tb_dir: Path | None = None
) -> dict:
    """Train one phase of `plan` through Ray Train; returns (and writes) its result.json.

    `init_dir` overrides the model the phase starts from (a Tune trial starts from a shared dense
    model); `callbacks` are Ray Train callbacks (Tune's report callback in a trial); `tb_dir` where
    TensorBoard events go (a trial's run named by what it is) instead of RUN/tb/<phase>.
    """
    run_dir = plan.out
    init_dir = init_dir or init_dir_for(run_dir, phase, plan.cfg)
    check_distill(plan, phase, init_dir)
    board = RemoteProgressBoard.remote()
    trainer = _trainer(plan, phase, init_dir, board, callbacks, tb_dir)
    fit_with_progress(trainer, board, f"{run_dir.name}/{phase}", plan.progress)
    phase_dir = run_dir / phase
    # The last report's metrics are those of the final checkpoint (Ray Train's Result carries metrics
    # only with checkpoints it stores itself, and the workers publish their own: train/checkpoints.py).
    metrics, newest = open_checkpoints(plan.run, phase_dir / "checkpoints").newest_metrics()
    metrics["checkpoint"] = newest
    plan.run.fetch(phase_dir / "model")  # what the workers published, and the config of the model they started from
    if init_dir is not None:
        plan.run.fetch(init_dir / "config.json")
    result = finish_phase(phase_dir, phase, metrics, init_dir)
    plan.run.publish(phase_dir / "pruned")
    plan.run.publish(phase_dir / "result.json")
    return result


def finish_phase(phase_dir: Path, phase: Phase, metrics: dict, init_dir: Path | None) -> dict:
    """After the last step (its model exported): the prune phase's pruned model, then result.json.
    Also how the Tune driver completes a trial the scheduler stopped at its last report."""

    if phase == "prune":
        gated, vocab, _ = load_model_dir(phase_dir / "model")
        pruned = prune_model(gated)
        meta = save_model_dir(pruned, vocab, phase_dir / "pruned", extra={"phase": "prune", "pruned": True})
        metrics.update({k: meta[k] for k in ("heads_per_layer", "sparsity", "params")})
        metrics["dense_params"] = read_meta(init_dir)["params"]
    write_json(phase_dir / "result.json", metrics)
    return metrics


def train(plan: Plan, phases: list[Phase] | None = None) -> dict[str, dict]:
    """Run the requested phases of `plan` in order (all three by default), skipping the finished ones."""
    phases = phases or list(PHASES)
    run_dir, cfg = plan.out, plan.cfg
    sync_in(plan)
    if not phase_done(run_dir, phases[0], cfg):
        check_distill(plan, phases[0], init_dir_for(run_dir, phases[0], cfg))
    prepare_run_dir(plan)  # only after every check: bad input writes nothing
    results = {}
    for phase in phases:
        if phase_done(run_dir, phase, cfg):
            results[phase] = json.loads((run_dir / phase / "result.json").read_text())
            continue
        results[phase] = run_phase(plan, phase)
    return results
