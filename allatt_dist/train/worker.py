"""The per-worker training function that Ray Train runs on every rank.

Builds the phase's model, wraps it in a DeepSpeed engine (ZeRO 0-3), streams this rank's rows of the
corpus, and every `checkpoint_every` steps saves the DeepSpeed state (plus this rank's memory and
the stream position) as one checkpoint that is published whole or not at all (train/checkpoints.py),
then reports the metrics to Ray Train. On restart (worker failure or a re-run of the same command)
it resumes from the newest checkpoint every rank can load, exactly: step, stream position, LR
schedule, warm-up step, Lagrange multipliers and gate logits all come back.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from allatt_dist.config import RunConfig
from allatt_dist.data.corpus import load_corpus
from allatt_dist.data.stream import LMStream
from allatt_dist.evaluate import evaluate
from allatt_dist.model.gates import GATE_PARAM, SparsityObjective
from allatt_dist.model.registry import build_model as build_family_model
from allatt_dist.model.targets import final_mask
from allatt_dist.model.transformer import LanguageModel, count_params
from allatt_dist.storage import Mirror
from allatt_dist.train import checkpoints
from allatt_dist.train.ckpt_store import checkpoint_store
from allatt_dist.train.monitor import Monitor
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
    store: Mirror  # the run directory these paths lie in (each worker mirrors it itself when it is in storage)

    def here(self) -> tuple[Mirror, Path, Path | None, Path]:
        """(this process's mirror, phase_dir, init_dir, tb_dir) with the paths moved into that mirror."""
        mine = self.store.here("worker")
        init = self.store.moved(self.init_dir, mine) if self.init_dir is not None else None
        return mine, self.store.moved(self.phase_dir, mine), init, self.store.moved(self.tb_dir, mine)


def build_model(cfg: RunConfig, spec: PhaseSpec, vocab_size: int, init_dir: Path | None) -> LanguageModel:
    """Dense: fresh. Prune: the dense model plus gates. Finetune: the physically pruned model."""
    torch.manual_seed(cfg.train.seed)
    if init_dir is None:
        return build_family_model(cfg.model, vocab_size)
    from allatt_dist.modelio import load_model_dir

    init, _, meta = load_model_dir(init_dir)
    if spec.phase == "finetune":
        return init.train()
    model = build_family_model(cfg.model, vocab_size, gates=spec.gates)
    missing, unexpected = model.load_state_dict(init.state_dict(), strict=False)
    if unexpected or set(missing) - set(model.gate_parameters()):
        raise RuntimeError(f"{init_dir}: weights do not fit the gated model ({unexpected or missing})")
    return model


def _all_mean(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def _eval(lm: LanguageModel, tokens: np.ndarray, cfg: RunConfig, rank: int, world: int, limit: int | None):
    """Validation perplexity with the rows of the eval layout split across ranks (all ranks run it)."""
    res = evaluate(lm, tokens, max(cfg.data.eval_batch_size, world), max_segments=limit, rows=(rank, world))
    total = torch.tensor([res.nll * res.tokens, float(res.tokens)], dtype=torch.float64)
    if dist.is_initialized() and world > 1:
        dist.all_reduce(total)
    nll = float(total[0] / total[1].clamp(min=1))
    return float(np.exp(min(nll, 50.0))), int(total[1])


def _master_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s parameters as the optimizer holds them, fp32 on CPU: DeepSpeed's fp32 master copies
    under bf16/fp16 (the module itself is then low precision), gathered under ZeRO-3. Collective:
    every rank must call it, in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None when the engine keeps no separate master (fp32, ZeRO-0)
        out[name] = (p if full is None else full).detach().float().cpu().clone()
    return out


def _gate_probs(lm: LanguageModel) -> tuple[np.ndarray, np.ndarray] | None:
    """(P(z = 1), eval-open mask), each (layers, heads), from the fp32 gate logits (those the exported
    model gets): the mask is what pruning will keep, decided on the logits, not on rounded probabilities."""
    if not lm.gates:
        return None
    probs, opened = [], []
    for gate in lm.gates:
        logits = _master_weights(gate)[GATE_PARAM]  # (H,) gathered under ZeRO-3
        probs.append(gate.probabilities(logits).numpy())
        opened.append(gate.open_mask(logits).numpy())
    return np.stack(probs), np.stack(opened)


def _final_cut(lm: LanguageModel, remove: int | None) -> None:
    """Keep exactly the most open heads the target allows (`gates.final_cut`), on every rank alike: the
    decision is made on the gathered fp32 logits (collective under ZeRO-3) and overrides the eval gate."""
    if remove is None or not lm.gates:
        return
    logits = torch.stack([_master_weights(g)[GATE_PARAM] for g in lm.gates])  # (L, H)
    for gate, keep in zip(lm.gates, final_mask(logits, remove), strict=True):
        gate.cut = keep  # (H,) bool


def _register_io_params(module: TrainModule) -> None:
    """ZeRO-3: keep the tied embedding/softmax matrices gathered wherever they are read.

    ZeRO-3 gathers a parameter only around the forward and backward of the module that owns it, and
    `lm.io` is never called itself (the model reads it through `io.embed()` / `io.nll()`). DeepSpeed
    would attach these matrices to `LanguageModel` on first use, but it cannot hook the backward of a
    module that returns a dataclass (`LMOutput`), so the backward pass found them partitioned (size 0).
    Registering them with `TrainModule` (tuple output: training forward and backward) and with the
    language model (evaluation calls it directly) keeps them available.
    """
    import deepspeed

    table = [module.lm.pos_table] if module.lm.pos_table is not None else []  # learned positions: read alike
    for p in [*module.lm.io.parameters(), *table]:
        deepspeed.zero.register_external_parameter(module, p)
        deepspeed.zero.register_external_parameter(module.lm, p)


def _optimizer_state_bytes(engine) -> int:
    """Bytes of the optimizer state (Adam moments, step) this rank holds: under ZeRO 1-3 only its partition."""
    opt = engine.optimizer
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)  # DeepSpeed's ZeRO optimizers wrap a torch optimizer
    if opt is None:
        return 0
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def _memory_stats(engine, world: int) -> dict[str, list[int]]:
    """Per rank (index = rank): optimizer-state bytes and peak resident memory of the worker process."""
    import resource

    mine = (_optimizer_state_bytes(engine), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux
    every = [mine] * world
    if dist.is_initialized() and world > 1:
        every = [None] * world
        dist.all_gather_object(every, mine)
    return {
        "optimizer_state_bytes": [int(o) for o, _ in every],
        "peak_rss_bytes": [int(r) for _, r in every],
    }


def _save_mems(path: Path, chunks: list[list[torch.Tensor] | None]) -> None:
    state = {f"c{c}_l{i}": m.contiguous().cpu() for c, ms in enumerate(chunks) if ms for i, m in enumerate(ms)}
    if state:
        save_file(state, str(path))


def _load_mems(path: Path, n_chunks: int, device) -> list[list[torch.Tensor] | None]:
    if not path.is_file():
        return [None] * n_chunks
    state = load_file(str(path), device=str(device))
    out = []
    for c in range(n_chunks):
        layers = sorted((int(k.split("_l")[1]), v) for k, v in state.items() if k.startswith(f"c{c}_"))
        out.append([v for _, v in layers] or None)
    return out


def train_loop_per_worker(config: dict[str, WorkerJob]) -> None:
    """Ray Train entry point; `config["job"]` is the phase's `WorkerJob`."""
    import deepspeed

    if os.environ.get("ALLATT_VERBOSE") != "1":
        deepspeed.utils.logger.setLevel(logging.WARNING)
    job = config["job"]
    store, phase_dir, init_dir, tb_dir = job.here()
    try:
        if init_dir is not None:
            store.pull(init_dir)
        _train(job, store, phase_dir, init_dir, tb_dir)
    finally:
        store.discard()  # a mirror of object storage: the bucket has everything this worker published


def _train(job: WorkerJob, store: Mirror, phase_dir: Path, init_dir: Path | None, tb_dir: Path) -> None:
    import deepspeed
    import ray.train
    from ray.util import get_current_placement_group

    cfg = job.cfg
    spec = phase_spec(cfg, job.phase)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = cfg.scaling.use_gpu
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")

    corpus = load_corpus(cfg.data, splits=("train", "valid"))
    lm = build_model(cfg, spec, len(corpus.vocab), init_dir)
    objective = SparsityObjective(spec.gates) if spec.gates is not None else None
    n_params = count_params(lm)  # before ZeRO-3 partitions the tensors
    module = TrainModule(lm, objective)
    groups = param_groups(module, cfg, spec)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module,
        model_parameters=groups,
        optimizer=client_optimizer(groups, cfg),
        lr_scheduler=make_scheduler(cfg, spec.max_steps, spec.constant_lr),
        config=job.ds_config,
        dist_init_required=False,
    )
    if cfg.deepspeed.zero_stage == 3:
        _register_io_params(module)
    stream = LMStream(corpus.tokens("train"), cfg.train.batch_size, cfg.model.seq_len, rank, world, row_shift_seed(cfg))
    accum = cfg.deepspeed.grad_accum_steps
    mems: list[list[torch.Tensor] | None] = [None] * accum
    ckpts = checkpoint_store(store, phase_dir / "checkpoints")
    step, loaded = _resume(engine, stream, ckpts, rank, world, accum, device)
    mems = loaded or mems

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
    valid = corpus.tokens("valid")
    last_eval: dict = {}
    tokens_per_s = 0.0

    exported = False
    while step < spec.max_steps:
        x, y, reset = stream.next_batch()  # (b,T) this rank's rows
        if reset:
            mems = [None] * accum
        lm_losses, stats = [], {}
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses (the scheduler steps after it)
        for c, (xc, yc) in enumerate(zip(x.chunk(accum), y.chunk(accum), strict=True)):
            noise = seed_step(cfg.train.seed, rank, step * accum + c, device, cfg.gates.per_rank_samples)
            for gate in lm.gates:
                gate.noise = noise
            loss, lm_loss, mems[c], stats = engine(xc.to(device), yc.to(device), mems[c], step)
            engine.backward(loss)
            engine.step()
            lm_losses.append(float(lm_loss))
        step += 1
        if step % cfg.train.log_every == 0 or step == spec.max_steps:
            (mean_loss,) = _all_mean([float(np.mean(lm_losses))])
            gn = engine.get_global_grad_norm()
            logged = monitor.train_step(step, mean_loss, stats, lr, gn)
            tokens_per_s = logged["perf/tokens_per_s"]
        final = step == spec.max_steps
        if final:
            _final_cut(lm, cut_size(cfg, spec))  # before the last eval: it scores the model pruning will make
        if step % cfg.train.eval_every == 0 or final:
            limit = None if final else cfg.data.eval_max_segments
            ppl, n_tok = _eval(lm, valid, cfg, rank, world, limit)
            gate_state = _gate_probs(lm)
            monitor.valid_ppl = ppl
            last_eval = {"valid_ppl": ppl, "valid_tokens": n_tok}
            if gate_state is not None:
                probs, opened = gate_state
                monitor.gates(step, probs, opened)
                last_eval["hard_sparsity"] = float(1.0 - opened.mean())
                last_eval["open_heads"] = [int(n) for n in opened.sum(axis=1)]
                last_eval["gate_probs"] = probs.tolist()  # (layers, heads), as logged in gates/heatmap
            shown = ("valid_tokens", "hard_sparsity", "open_heads")
            monitor.evaluation(step, {"valid/ppl": ppl}, {k: last_eval[k] for k in shown if k in last_eval} | stats)
            monitor.progress(step)
        if step % cfg.train.checkpoint_every == 0 or final:
            (train_loss,) = _all_mean([float(np.mean(lm_losses))])  # the global batch's loss, not rank 0's rows
            metrics = {
                "step": step,
                "phase": spec.phase,
                "train_loss": train_loss,
                "tokens_per_s": tokens_per_s,
                "params": n_params,
                "world_size": world,
                "node_ids": node_ids,
                "placement_group_id": pg.id.hex() if pg is not None else None,
                **{k: v for k, v in stats.items() if isinstance(v, float)},
                **last_eval,
                **_memory_stats(engine, world),
            }
            if final:  # export first: a Tune scheduler may stop the trial at its last report
                _export(lm, corpus.vocab, cfg, spec, phase_dir / "model", rank, step, store)
                exported = True
            if rank == 0:
                monitor.flush()
                store.push(tb_dir)  # the curves so far, with the checkpoint (object storage only)
            _checkpoint(engine, stream, mems, step, rank, world, metrics, ckpts, cfg)
    if not exported:  # resumed after the last report
        _final_cut(lm, cut_size(cfg, spec))
        _export(lm, corpus.vocab, cfg, spec, phase_dir / "model", rank, step, store)
    monitor.close()
    if rank == 0:
        store.push(tb_dir)


def _resume(engine, stream, ckpts, rank: int, world: int, accum: int, device):
    """(step, memory) of the newest checkpoint every rank can load (0, None: none, start afresh).

    All ranks try the same candidates in the same order and agree on each: one rank failing to load
    moves all of them to the next older one, so no rank resumes from another step than the others."""
    from allatt_dist.errors import CheckpointError

    tried = []
    for name in ckpts.candidates():
        ckpt = ckpts.root / name
        try:
            ckpt = ckpts.fetch(name)  # object storage: downloaded and checked against its manifest
            _, client = engine.load_checkpoint(str(ckpt), tag=CKPT_TAG, load_module_strict=True)
            if client is None:
                raise FileNotFoundError(f"no DeepSpeed state under {ckpt / CKPT_TAG}")
            mems = _load_mems(ckpt / f"mems_rank{rank}.safetensors", accum, device)
            error = None
        except Exception as e:  # noqa: BLE001 - any failure moves every rank to an older checkpoint
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        errors = [error] * world
        if dist.is_initialized() and world > 1:
            dist.all_gather_object(errors, error)
        bad = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
        ckpts.release(ckpt)
        if not bad:
            stream.load_state_dict(client["stream"])
            return int(client["step"]), mems
        tried.append(ckpt.name)
        if rank == 0:
            checkpoints.warn(f"checkpoint {ckpt} could not be loaded ({bad[0]}); trying an older one")
    if tried:  # a failed load may have changed the engine's state: never train on from it
        raise CheckpointError(f"{ckpts.root}: no checkpoint could be loaded (tried {', '.join(tried)})")
    return 0, None


def _checkpoint(engine, stream, mems, step, rank, world, metrics, ckpts, cfg: RunConfig) -> None:
    """Every rank writes its DeepSpeed shards and memory into one staging folder; rank 0 publishes it
    (manifest, rename) once all have; then the metrics go to Ray Train (and Tune): a checkpoint is on
    disk, whole, before a scheduler can see the report and stop the trial."""
    import ray.train

    nonce = [checkpoints.new_nonce() if rank == 0 else None]
    if dist.is_initialized() and world > 1:
        dist.broadcast_object_list(nonce, src=0)
    staging = ckpts.staging(step, nonce[0])
    engine.save_checkpoint(str(staging), tag=CKPT_TAG, client_state={"step": step, "stream": stream.state_dict()})
    _save_mems(staging / f"mems_rank{rank}.safetensors", mems)
    if rank == 0:
        (staging / "metrics.json").write_text(json.dumps(metrics))
    ckpts.publish(staging, step, cfg.train.keep_checkpoints, rank)  # collective: whole or absent
    ray.train.report(metrics)


def _export(
    lm: LanguageModel, vocab, cfg: RunConfig, spec: PhaseSpec, out: Path, rank: int, step: int, store: Mirror
) -> None:
    """Consolidate the (possibly ZeRO-3 partitioned, possibly bf16) weights and write model.safetensors
    on rank 0 from the fp32 master copies."""
    from allatt_dist.modelio import save_model_dir

    state = _master_weights(lm)  # every rank: a collective under ZeRO-3
    if rank == 0:
        copy = build_family_model(cfg.model, lm.vocab_size, spec.gates, lm.heads_per_layer)
        copy.load_state_dict(state)  # strict: the model has no buffers, its state is its parameters
        for src, dst in zip(lm.gates, copy.gates, strict=True):
            dst.cut = src.cut  # saved in config.json: the exported model's eval gate and pruning keep exactly it
        save_model_dir(copy, vocab, out, gates=spec.gates, extra={"phase": spec.phase, "step": step})
        store.push(out)  # object storage: weights first, config.json last
    if dist.is_initialized():
        dist.barrier()
