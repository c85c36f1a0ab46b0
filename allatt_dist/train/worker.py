"""The per-worker training function that Ray Train runs on every rank, as named steps.

    train_loop_per_worker   this worker's RunDir (its own mirror of a bucket), then _train
    _train                  _start, then per step: _step, _log, _evaluate, _save_and_report; _export at the end
    _start                  model, DeepSpeed engine (ZeRO 0-3), this rank's stream of the corpus, TensorBoard,
                            and the newest checkpoint every rank can load (train/checkpoints.py: restore)
    _save_and_report        every `checkpoint_every` steps: the DeepSpeed state, this rank's memory and the
                            stream position as one checkpoint published whole or not at all, then the
                            metrics to Ray Train (and Tune)

On restart (worker failure or a re-run of the same command) a worker resumes exactly: step, stream
position, LR schedule, warm-up step, Lagrange multipliers and gate logits all come back. What is asked of
the engine and the process group (means, perplexity, master weights, gates, memory files): train/engine.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from allatt_dist.config import RunConfig
from allatt_dist.data.corpus import load_corpus
from allatt_dist.data.stream import LMStream
from allatt_dist.model.gates import SparsityObjective
from allatt_dist.model.registry import build_model as build_family_model
from allatt_dist.model.transformer import LanguageModel, count_params
from allatt_dist.modelio import load_model_dir, save_model_dir
from allatt_dist.rundir import RunDir
from allatt_dist.train.checkpoints import Checkpoints, open_checkpoints
from allatt_dist.train.engine import (
    all_mean,
    final_cut,
    gate_probs,
    load_mems,
    master_weights,
    memory_stats,
    register_io_params,
    save_mems,
    valid_ppl,
)
from allatt_dist.train.monitor import TRAIN_STATS, Monitor
from allatt_dist.train.setup import (
    Phase,
    PhaseSpec,
    TrainModule,
    client_optimizer,
    cut_size,
    make_scheduler,
    param_groups,
    phase_spec,
    row_shift_seed,
    seed_step,
    tb_step_offset,
)
from allatt_dist.train.teacher import Teacher, TeacherSource

CKPT_TAG = "ds"


@dataclass(frozen=True)
class WorkerJob:
    """What every Ray Train worker of one phase receives (pickled by Ray, nothing re-read from YAML)."""

    cfg: RunConfig  # the plan's config (data folder pinned)
    ds_config: dict[str, Any]  # the plan's DeepSpeed config
    phase: Phase
    phase_dir: Path  # absolute: RUN_DIR/<phase>
    init_dir: Path | None  # the model this phase starts from (None: fresh dense model)
    board: Any  # the driver's progress actor handle
    tb_dir: Path  # where rank 0 writes TensorBoard events: RUN/tb/<phase>, or a trial's named run
    run: RunDir  # the run directory these paths lie in (each worker mirrors it itself when it is in a bucket)
    teacher: TeacherSource | None = None  # distill: the teacher's model directory (train/teacher.py)


def build_model(cfg: RunConfig, spec: PhaseSpec, vocab_size: int, init_dir: Path | None) -> LanguageModel:
    """Dense: fresh. Prune: the dense model plus gates. Finetune: the physically pruned model."""
    torch.manual_seed(cfg.train.seed)
    if init_dir is None:
        return build_family_model(cfg.model, vocab_size)
    init, _, meta = load_model_dir(init_dir)
    if spec.phase == "finetune":
        return init.train()
    model = build_family_model(cfg.model, vocab_size, gates=spec.gates)
    missing, unexpected = model.load_state_dict(init.state_dict(), strict=False)
    if unexpected or set(missing) - set(model.gate_parameters()):
        raise RuntimeError(f"{init_dir}: weights do not fit the gated model ({unexpected or missing})")
    return model


@dataclass
class _Worker:
    """One rank's state while it trains a phase (built by `_start`)."""

    cfg: RunConfig
    spec: PhaseSpec
    rank: int
    world: int
    device: torch.device
    lm: LanguageModel
    engine: Any  # the DeepSpeed engine
    scheduler: Any  # the LR schedule
    stream: LMStream
    valid: np.ndarray
    vocab: Any
    monitor: Monitor
    ckpts: Checkpoints
    run: RunDir
    phase_dir: Path
    tb_dir: Path
    n_params: int
    node_ids: list
    pg: Any  # this worker's placement group
    step: int  # steps done
    mems: list  # per gradient-accumulation chunk: the Transformer-XL memory
    teacher: Teacher | None = None  # distill: the teacher and its memory
    last_eval: dict = field(default_factory=dict)
    tokens_per_s: float = 0.0

    @property
    def accum(self) -> int:
        return self.cfg.deepspeed.grad_accum_steps


def train_loop_per_worker(config: dict[str, WorkerJob]) -> None:
    """Ray Train entry point; `config["job"]` is the phase's `WorkerJob`."""
    import deepspeed

    if os.environ.get("ALLATT_VERBOSE") != "1":
        deepspeed.utils.logger.setLevel(logging.WARNING)
    job = config["job"]
    run = job.run.here("worker")  # a bucket: this worker's own mirror; a folder: the run directory itself
    init_dir = job.run.moved(job.init_dir, run) if job.init_dir is not None else None
    try:
        if init_dir is not None:
            run.fetch(init_dir)
        _train(job, run, init_dir)
    finally:
        run.discard()  # a mirror of object storage: the bucket has everything this worker published


def _train(job: WorkerJob, run: RunDir, init_dir: Path | None) -> None:
    w = _start(job, run, init_dir)
    exported = False
    while w.step < w.spec.max_steps:
        lm_losses, stats, lr = _step(w)
        final = w.step == w.spec.max_steps
        _log(w, lm_losses, stats, lr, final)
        if final:
            final_cut(w.lm, cut_size(w.cfg, w.spec))  # before the last eval: it scores the model pruning will make
        if w.step % w.cfg.train.eval_every == 0 or final:
            _evaluate(w, stats, final)
        if w.step % w.cfg.train.checkpoint_every == 0 or final:
            metrics = _metrics(w, lm_losses, stats)
            if final:  # export first: a Tune scheduler may stop the trial at its last report
                _export(w.lm, w.vocab, w.cfg, w.spec, w.phase_dir / "model", w.rank, w.step, run)
                exported = True
            _save_and_report(w, metrics)
    if not exported:  # resumed after the last report
        final_cut(w.lm, cut_size(w.cfg, w.spec))
        _export(w.lm, w.vocab, w.cfg, w.spec, w.phase_dir / "model", w.rank, w.step, run)
        _report_again(w)
    w.monitor.close()
    if w.rank == 0:
        run.publish(w.tb_dir)


def _start(job: WorkerJob, run: RunDir, init_dir: Path | None) -> _Worker:
    """This rank's model, engine, stream and monitor, resumed from the newest loadable checkpoint."""
    import ray.train
    import torch.distributed as dist
    from ray.util import get_current_placement_group

    cfg, spec = job.cfg, phase_spec(job.cfg, job.phase)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.scaling.use_gpu else torch.device("cpu")
    corpus = load_corpus(cfg.data, splits=("train", "valid"))
    lm = build_model(cfg, spec, len(corpus.vocab), init_dir)
    n_params = count_params(lm)  # before ZeRO-3 partitions the tensors
    teacher = _load_teacher(job, run, device)  # ZeRO-3: partitioned over the ranks (collective)
    engine, scheduler = _engine(lm, cfg, spec, job.ds_config, teacher.width if teacher is not None else None)
    stream = LMStream(corpus.tokens("train"), cfg.train.batch_size, cfg.model.seq_len, rank, world, row_shift_seed(cfg))
    phase_dir, tb_dir = job.run.moved(job.phase_dir, run), job.run.moved(job.tb_dir, run)
    ckpts = open_checkpoints(run, phase_dir / "checkpoints")
    step, mems = _resume(engine, stream, ckpts, rank, world, cfg.deepspeed.grad_accum_steps, device, teacher)
    node_ids = [None] * world
    dist.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())
    pg = get_current_placement_group()  # reported: a Tune callback frees it when a scheduler stops the trial
    monitor = Monitor(
        tb_dir if rank == 0 else None,
        job.board if rank == 0 else None,
        spec.max_steps,
        spec.phase,
        cfg.train.batch_size * cfg.model.seq_len,
        step_offset=tb_step_offset(cfg, spec.phase),
    )
    meta = {"n_params": n_params, "node_ids": node_ids, "pg": pg}
    places = {"run": run, "phase_dir": phase_dir, "tb_dir": tb_dir, "ckpts": ckpts}
    parts = {"lm": lm, "engine": engine, "scheduler": scheduler, "stream": stream, "monitor": monitor}
    data = {"valid": corpus.tokens("valid"), "vocab": corpus.vocab}
    parts["teacher"] = teacher
    return _Worker(cfg, spec, rank, world, device, step=step, mems=mems, **parts, **data, **places, **meta)


def _load_teacher(job: WorkerJob, run: RunDir, device: torch.device) -> Teacher | None:
    """distill: the teacher on this worker (a path in the run directory: this worker's mirror of it)."""
    src = job.teacher
    if src is None:
        return None
    if src.in_run is not None:
        src = TeacherSource(in_run=job.run.moved(src.in_run, run))
    return Teacher.load(src, run, job.cfg, device, job.ds_config)


def _engine(lm: LanguageModel, cfg: RunConfig, spec: PhaseSpec, ds_config: dict[str, Any], teacher_width=None):
    """(DeepSpeed engine, LR schedule) training `lm` (with its sparsity objective in the prune phase, and
    the distillation terms' map to a teacher of another width)."""
    import deepspeed

    objective = SparsityObjective(spec.gates) if spec.gates is not None else None
    module = TrainModule(lm, objective, cfg.distill if cfg.distill.applies(spec.phase) else None, teacher_width)
    groups = param_groups(module, cfg, spec)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module,
        model_parameters=groups,
        optimizer=client_optimizer(groups, cfg),
        lr_scheduler=make_scheduler(cfg, spec.max_steps, spec.constant_lr),
        config=ds_config,
        dist_init_required=False,
    )
    if cfg.deepspeed.zero_stage == 3:
        register_io_params(module)
    return engine, scheduler


def _resume(engine, stream: LMStream, ckpts: Checkpoints, rank: int, world: int, accum: int, device, teacher=None):
    """(step, memory) of the newest checkpoint every rank can load, its stream position (and the teacher's
    memory) restored ((0, no memory): none, start afresh)."""

    def load(ckpt: Path) -> tuple[dict, list]:
        _, client = engine.load_checkpoint(str(ckpt), tag=CKPT_TAG, load_module_strict=True)
        if client is None:
            raise FileNotFoundError(f"no DeepSpeed state under {ckpt / CKPT_TAG}")
        if teacher is not None:
            teacher.mems = load_mems(ckpt / f"mems_teacher_rank{rank}.safetensors", accum, device)
        return client, load_mems(ckpt / f"mems_rank{rank}.safetensors", accum, device)

    restored = ckpts.restore(load, rank, world)
    if restored is None:
        if teacher is not None:
            teacher.reset()
        return 0, [None] * accum
    client, mems = restored
    stream.load_state_dict(client["stream"])
    return int(client["step"]), mems


def _step(w: _Worker) -> tuple[list[float], dict, float]:
    """One optimizer step over this rank's rows (gradient accumulation inside): (losses, stats, lr)."""
    x, y, reset = w.stream.next_batch()  # (b,T) this rank's rows
    if reset:
        w.mems = [None] * w.accum
        if w.teacher is not None:
            w.teacher.reset()
    lm_losses, stats = [], {}
    lr = w.scheduler.get_last_lr()[0]  # the rate this step's update uses (the scheduler steps after it)
    for c, (xc, yc) in enumerate(zip(x.chunk(w.accum), y.chunk(w.accum), strict=True)):
        noise = seed_step(w.cfg.train.seed, w.rank, w.step * w.accum + c, w.device, w.cfg.gates.per_rank_samples)
        for gate in w.lm.gates:
            gate.noise = noise
        xc, yc = xc.to(w.device), yc.to(w.device)
        taught = w.teacher.outputs(xc, c) if w.teacher is not None else None  # no_grad, eval mode
        loss, lm_loss, w.mems[c], stats = w.engine(xc, yc, w.mems[c], w.step, taught)
        w.engine.backward(loss)
        w.engine.step()
        lm_losses.append(float(lm_loss))
    w.step += 1
    return lm_losses, stats, lr


def _log(w: _Worker, lm_losses: list[float], stats: dict, lr: float, final: bool) -> None:
    """Every `log_every` steps: the mean loss over all ranks, the rate, the gradient norm to TensorBoard."""
    if w.step % w.cfg.train.log_every == 0 or final:
        terms = [k for k in TRAIN_STATS if k in stats]  # distill: its terms, mean over ranks
        mean_loss, *means = all_mean([float(np.mean(lm_losses))] + [stats[k] for k in terms])
        stats = stats | dict(zip(terms, means, strict=True))
        logged = w.monitor.train_step(w.step, mean_loss, stats, lr, w.engine.get_global_grad_norm())
        w.tokens_per_s = logged["perf/tokens_per_s"]


def _evaluate(w: _Worker, stats: dict, final: bool) -> None:
    """Validation perplexity (the whole split at the last step) and the gates' state, logged and kept for
    the next report."""
    ppl, n_tok = valid_ppl(w.lm, w.valid, w.cfg, w.rank, w.world, None if final else w.cfg.data.eval_max_segments)
    gate_state = gate_probs(w.lm)
    w.monitor.valid_ppl = ppl
    w.last_eval = {"valid_ppl": ppl, "valid_tokens": n_tok}
    if gate_state is not None:
        probs, opened = gate_state
        w.monitor.gates(w.step, probs, opened)
        w.last_eval["hard_sparsity"] = float(1.0 - opened.mean())
        w.last_eval["open_heads"] = [int(n) for n in opened.sum(axis=1)]
        w.last_eval["gate_probs"] = probs.tolist()  # (layers, heads), as logged in gates/heatmap
    shown = ("valid_tokens", "hard_sparsity", "open_heads")
    w.monitor.evaluation(w.step, {"valid/ppl": ppl}, {k: w.last_eval[k] for k in shown if k in w.last_eval} | stats)
    w.monitor.progress(w.step)


def _metrics(w: _Worker, lm_losses: list[float], stats: dict) -> dict:
    """What a report carries (and the checkpoint's metrics.json): collective (the loss, memory over ranks)."""
    (train_loss,) = all_mean([float(np.mean(lm_losses))])  # the global batch's loss, not rank 0's rows
    return {
        "step": w.step,
        "phase": w.spec.phase,
        "train_loss": train_loss,
        "tokens_per_s": w.tokens_per_s,
        "params": w.n_params,
        "world_size": w.world,
        "node_ids": w.node_ids,
        "placement_group_id": w.pg.id.hex() if w.pg is not None else None,
        **{k: v for k, v in stats.items() if isinstance(v, float)},
        **w.last_eval,
        **memory_stats(w.engine, w.world),
        **({"teacher_bytes": w.teacher.resident_bytes()} if w.teacher is not None else {}),  # rank 0's
    }


def _save_and_report(w: _Worker, metrics: dict) -> None:
    """The checkpoint, whole, and then the metrics to Ray Train (and Tune): a checkpoint is published before
    a scheduler can see the report and stop the trial. TensorBoard's curves so far go with it."""
    import ray.train

    if w.rank == 0:
        w.monitor.flush()
        w.run.publish(w.tb_dir)  # the curves so far, with the checkpoint (object storage only)

    def write(staging: Path) -> None:
        state = {"step": w.step, "stream": w.stream.state_dict()}
        w.engine.save_checkpoint(str(staging), tag=CKPT_TAG, client_state=state)
        save_mems(staging / f"mems_rank{w.rank}.safetensors", w.mems)
        if w.teacher is not None:
            save_mems(staging / f"mems_teacher_rank{w.rank}.safetensors", w.teacher.mems)

    w.ckpts.save(w.step, write, metrics, w.cfg.train.keep_checkpoints, w.rank, w.world)  # collective
    ray.train.report(metrics)


def _report_again(w: _Worker) -> None:
    """A phase resumed after its last checkpoint (killed between that report and its end) reports that
    checkpoint's metrics again: whoever waits for the phase's last report gets it (a Tune trial ends with its
    metric, not with an empty result Tune refuses)."""
    import ray.train
    import torch.distributed as dist

    box = [w.ckpts.newest_metrics()[0] if w.rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    ray.train.report(box[0])


def _export(
    lm: LanguageModel, vocab, cfg: RunConfig, spec: PhaseSpec, out: Path, rank: int, step: int, run: RunDir
) -> None:
    """Consolidate the (possibly ZeRO-3 partitioned, possibly bf16) weights and write model.safetensors
    on rank 0 from the fp32 master copies."""
    import torch.distributed as dist

    state = master_weights(lm)  # every rank: a collective under ZeRO-3
    if rank == 0:
        copy = build_family_model(cfg.model, lm.vocab_size, spec.gates, lm.heads_per_layer)
        copy.load_state_dict(state)  # strict: the model has no buffers, its state is its parameters
        for src, dst in zip(lm.gates, copy.gates, strict=True):
            dst.cut = src.cut  # saved in config.json: the exported model's eval gate and pruning keep exactly it
        save_model_dir(copy, vocab, out, gates=spec.gates, extra={"phase": spec.phase, "step": step})
        run.publish(out)  # object storage: weights first, config.json last
    if dist.is_initialized():
        dist.barrier()
