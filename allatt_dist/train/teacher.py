"""Distillation (the `distill:` section): the teacher a Ray Train worker runs beside the student, and the
KL term between their next-token distributions.

    teacher_source     driver: which model directory teaches a phase (None: no distillation), checked
                       before any worker starts (it exists, it has the student's vocabulary)
    Teacher            worker: the teacher model, eval mode, no gradient, the training precision, with its
                       own Transformer-XL memory per gradient-accumulation chunk (saved in the checkpoint)
    distilled_loss     the student's LM loss, KL(teacher || student) at temperature T (scaled by T^2) and the
                       hidden-state term (MSE of chosen layers' outputs, through a learned map where widths differ)

    check_fits         driver: the teacher's and the student's memory on a worker (lower bounds, from config.json)
                       against the cluster's (cluster/capacity.py), before any worker starts

The teacher is never registered with the module DeepSpeed trains: its weights are in no optimizer and no
checkpoint. Under ZeRO-3 it is partitioned over the ranks by an engine of its own with no optimizer
(`partitioned`: DeepSpeed's ZeRO-Inference); at ZeRO 0-2 every rank holds it whole.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from allatt_dist.config import RunConfig
from allatt_dist.errors import UserError
from allatt_dist.modelio import load_model_dir, read_meta
from allatt_dist.remote import parse_location

PRECISION = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class TeacherSource:
    """Where a phase's teacher lies: `in_run` (a path in the run directory, mirrored like the phase's starting
    model) or `given` (distill.teacher as the user wrote it: a local folder or a URI)."""

    in_run: Path | None = None
    given: str | None = None


def teacher_source(cfg: RunConfig, phase: str, run_dir: Path, init_dir: Path | None) -> TeacherSource | None:
    """The teacher of `phase` (None: the phase does not distil). The default is the dense model: the
    prune phase's starting model, or RUN/dense/model for the finetune phase."""
    if phase == "dense" or not cfg.distill.applies(phase):
        return None
    if cfg.distill.teacher is not None:
        return TeacherSource(given=cfg.distill.teacher)
    return TeacherSource(in_run=init_dir if phase == "prune" and init_dir is not None else run_dir / "dense" / "model")


def check_teacher(src: TeacherSource, student_dir: Path, run, hidden_layers: list[int] = (), cfg=None) -> None:
    """One line (UserError) when the teacher cannot teach the student that starts from `student_dir`:
    missing, not a model directory, another vocabulary, or without a layer of `hidden_layers`; with `cfg`
    (the run's config), also when it does not fit beside the student on a worker (`check_fits`). Reads
    config.json files only (a bucket's teacher: downloaded to a folder of its own, discarded after)."""
    run.fetch(student_dir / "config.json")
    student = read_meta(student_dir)
    with _local_teacher(src, run) as (where, folder):
        try:
            teacher = read_meta(folder)
        except UserError as e:
            raise UserError(f"distill.teacher {where}: {str(e).splitlines()[0]}") from None
    if teacher.get("vocab_fingerprint") != student.get("vocab_fingerprint"):
        sizes = (teacher.get("vocab_size"), student.get("vocab_size"))
        how = f"{sizes[0]} words" if sizes[0] != sizes[1] else f"{sizes[0]} words, other words or order"
        raise UserError(
            f"distill.teacher {where}: its vocabulary ({how}) is not the student's ({sizes[1]} words, "
            f"{student_dir}); a teacher must share the tokenizer and vocabulary"
        )
    n = (teacher.get("model") or {}).get("num_layers", 0)
    missing = [i for i in hidden_layers if i >= n]
    if missing:
        raise UserError(f"distill.hidden_layers: layer {missing[0]} does not exist in the teacher {where} ({n} layers)")
    for name, meta in ((f"the student {student_dir}", student), (f"the teacher {where}", teacher)):
        if hidden_layers and not exposes_layers(meta):
            raise UserError(
                f"distill.hidden_layers: {name} is a {meta.get('architecture')} model, whose family has no "
                "`layers` to match; use distill.kl_weight alone (hidden_weight 0) for this architecture"
            )
    if cfg is not None:
        check_fits(cfg, student, teacher, where)


def exposes_layers(meta: dict) -> bool:
    """Whether the model a config.json describes has `layers` (a ModuleList) whose outputs the hidden-state
    term can match: built on the meta device (no memory, no weights read)."""
    from pydantic import ValidationError

    from allatt_dist.config import ModelConfig
    from allatt_dist.model.registry import build_model

    try:
        mcfg = ModelConfig.model_validate({"adaptive_proj": False} | meta["model"])
        with torch.device("meta"):
            model = build_model(mcfg, int(meta["vocab_size"]), None, list(meta["heads_per_layer"]))
    except (ValidationError, KeyError, TypeError, ValueError):
        return True  # a broken model directory: loading it says so
    return isinstance(getattr(model, "layers", None), torch.nn.ModuleList)


def check_fits(cfg: RunConfig, student: dict, teacher: dict, where: str, nodes=None) -> None:
    """One line when the teacher (config.json `teacher`) does not fit beside the student (`student`) on a
    worker of the connected cluster (`nodes`: Ray's node resources; None: asked from Ray)."""
    from allatt_dist.cluster.capacity import GIB, check_memory

    s, t = student_bytes(cfg, student), teacher_bytes(cfg, teacher)
    what = f"distill.teacher {where}: the teacher ({t / GIB:.2f} GiB) does not fit beside the student "
    what += f"({s / GIB:.2f} GiB)"
    check_memory(cfg.scaling, s + t, what, nodes)


def _sizes(cfg: RunConfig, meta: dict) -> tuple[int, int, int]:
    """(bytes per value, values of one (B,T,V) output, values of one worker's Transformer-XL memory)."""
    m = meta.get("model") or {}
    batch, accum = cfg.micro_batch, cfg.deepspeed.grad_accum_steps
    out = batch * cfg.model.seq_len * int(meta.get("vocab_size", 0))
    mems = accum * m.get("num_layers", 0) * batch * m.get("mem_len", 0) * m.get("hidden_dim", 0)
    return BYTES[cfg.deepspeed.precision], out, mems


def student_bytes(cfg: RunConfig, meta: dict) -> int:
    """A lower bound of the student's training memory on one worker: weights and gradients in the training
    precision, fp32 master weights (bf16/fp16) and two optimizer moments, each divided over the ranks as
    the ZeRO stage partitions it; its output log-probabilities and their gradient, its memory tensors."""
    n, z, p = cfg.scaling.num_workers, cfg.deepspeed.zero_stage, int(meta.get("params", 0))
    b, out, mems = _sizes(cfg, meta)
    master = 4 if b != 4 else 0
    state = p * b / (n if z == 3 else 1) + p * b / (n if z >= 2 else 1) + p * (master + 8) / (n if z >= 1 else 1)
    return int(state + 2 * out * b + mems * b)


def teacher_bytes(cfg: RunConfig, meta: dict) -> int:
    """A lower bound of the teacher's memory on one worker: its weights in the training precision
    (partitioned over the ranks under ZeRO-3, as `Teacher` holds them), its forward's output and the KL
    term's three fp32 copies of the (B,T,V) distributions, the matched layers' outputs, its memory tensors."""
    n, p = cfg.scaling.num_workers, int(meta.get("params", 0))
    b, out, mems = _sizes(cfg, meta)
    width = (meta.get("model") or {}).get("hidden_dim", 0)
    layers = len(cfg.distill.hidden_layers) if cfg.distill.hidden_weight else 0
    hidden = layers * cfg.micro_batch * cfg.model.seq_len * width
    weights = p * b / (n if cfg.deepspeed.zero_stage == 3 else 1)
    return int(weights + out * (b + 12) + (hidden + mems) * b)


class _local_teacher:
    """Context: (name as given, local folder) of a teacher; a bucket's copy is discarded on exit."""

    def __init__(self, src: TeacherSource, run, weights: bool = False):
        self.src, self.run, self.weights, self.mirror = src, run, weights, None

    def __enter__(self) -> tuple[str, Path]:
        from allatt_dist.rundir import fetch_model_dir

        if self.src.in_run is not None:
            self.run.fetch(self.src.in_run if self.weights else self.src.in_run / "config.json")
            return self.run.uri(self.src.in_run), self.src.in_run
        where = parse_location(self.src.given, "distill.teacher")
        if isinstance(where, Path):
            return self.src.given, where
        folder, self.mirror = fetch_model_dir(self.src.given, "distill.teacher")
        return self.src.given, folder

    def __exit__(self, *exc) -> None:
        if self.mirror is not None:
            self.mirror.discard()


class Teacher:
    """The teacher on one worker: forward only, under no_grad, in eval mode and the training precision."""

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, device: torch.device, ds_config: dict | None = None):
        self.model = model.to(device=device, dtype=PRECISION[cfg.deepspeed.precision]).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.width = model.cfg.hidden_dim
        self.engine = (
            partitioned(self.model, ds_config) if ds_config is not None and cfg.deepspeed.zero_stage == 3 else None
        )
        self.temperature = cfg.distill.temperature
        self.mems: list = [None] * cfg.deepspeed.grad_accum_steps  # per chunk, like the student's
        self.layers = list(cfg.distill.hidden_layers) if cfg.distill.hidden_weight > 0 else []

    @classmethod
    def load(cls, src: TeacherSource, run, cfg: RunConfig, device: torch.device, ds_config=None) -> Teacher:
        """This worker's teacher, read from its model directory (`run`: this worker's run directory);
        partitioned over the ranks when `ds_config` (the phase's DeepSpeed config) has ZeRO-3."""
        with _local_teacher(src, run, weights=True) as (_, folder):
            model, _, _ = load_model_dir(folder)
        return cls(model, cfg, device, ds_config)

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """((B,T,V) next-token log-probabilities, [(B,T,D)] outputs of the matched layers) of the teacher
        for chunk `chunk`'s ids; its memory moves on."""
        with layer_outputs(self.model, self.layers) as hidden:
            out = self.model(x, self.mems[chunk])
        self.mems[chunk] = out.mems
        return out.log_probs, hidden

    def resident_bytes(self) -> int:
        """Bytes of the teacher's weights this rank holds now: under ZeRO-3 its partition of each parameter,
        plus the whole of those DeepSpeed keeps gathered (below its persistence threshold)."""
        total = 0
        for p in self.model.parameters():
            part = getattr(p, "ds_tensor", None)
            if part is not None:
                total += part.numel() * part.element_size()
            total += p.data.numel() * p.data.element_size()  # ZeRO-3: empty while released
        return total

    def reset(self) -> None:
        self.mems = [None] * len(self.mems)


def partitioned(model: torch.nn.Module, ds_config: dict):
    """ZeRO-3 for a forward-only model (DeepSpeed's ZeRO-Inference: `deepspeed.initialize` with no optimizer
    builds a `DeepSpeedZeRoOffload`): each rank keeps its partition of every parameter and gathers a module's
    weights around its forward, as for the student. Collective: every rank calls it. `model` stays the module
    to call (its hooks do the gathering); returns the engine, kept alive beside it."""
    import deepspeed

    conf = {k: v for k, v in ds_config.items() if k != "optimizer"}  # an optimizer section: a training engine
    io, table = getattr(model, "io", None), getattr(model, "pos_table", None)  # a family's model may have neither
    for p in [*(io.parameters() if io is not None else []), *([table] if table is not None else [])]:
        # read through io.embed()/io.log_probs() and sliced, not a module call: gathered around the model's forward
        deepspeed.zero.register_external_parameter(model, p)
    engine, *_ = deepspeed.initialize(model=model, config=conf, dist_init_required=False)
    return engine


def kl_divergence(teacher_logp: torch.Tensor, student_logp: torch.Tensor, temperature: float, keep=None):
    """T^2 x KL(teacher || student) of the next-token distributions at temperature T, mean over the kept
    positions. *_logp: (B,T,V) log-probabilities at T = 1 (any normalisation: re-normalised at T)."""
    t_logp = F.log_softmax(teacher_logp.float() / temperature, dim=-1)  # (B,T,V)
    s_logp = F.log_softmax(student_logp.float() / temperature, dim=-1)  # (B,T,V)
    per_tok = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # (B,T)
    if keep is None:
        return per_tok.mean() * temperature**2
    return (per_tok * keep).sum() / keep.sum().clamp(min=1) * temperature**2


@contextmanager
def layer_outputs(model, layers: list[int]):
    """Collects the outputs (B,T,D) of `model.layers[i]` for i in `layers` during the block (forward hooks)."""
    got: dict[int, torch.Tensor] = {}
    hooks = [model.layers[i].register_forward_hook(lambda m, a, out, i=i: got.__setitem__(i, out)) for i in layers]
    hidden: list[torch.Tensor] = []
    try:
        yield hidden
    finally:
        for h in hooks:
            h.remove()
        hidden.extend(got[i] for i in layers if i in got)


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], maps) -> torch.Tensor:
    """Mean over the matched layers of the MSE between the (mapped) student and the teacher outputs."""
    terms = [
        F.mse_loss((s if maps is None else maps[k](s)).float(), t.float())
        for k, (s, t) in enumerate(zip(student, teacher, strict=True))
    ]
    return torch.stack(terms).mean()


def distilled_loss(lm, x, y, mems, teacher, distill, maps=None):
    """(LM loss, {"kl": .., "hidden": ..} terms, new memory) of the student on (x, y) against the teacher's
    outputs `teacher` = (log-probabilities, matched layers' outputs). The LM loss is the NLL of the same
    log-probabilities the KL term reads (one output pass)."""
    t_logp, t_hidden = teacher
    with layer_outputs(lm, distill.hidden_layers if t_hidden else []) as hidden:
        out = lm(x, mems)  # log_probs (B,T,V)
    keep = (y != -100).to(out.log_probs.dtype)  # (B,T)
    nll = -out.log_probs.float().gather(-1, y.clamp(min=0)[..., None])[..., 0]  # (B,T)
    lm_loss = (nll * keep).sum() / keep.sum().clamp(min=1)
    terms = {"kl": kl_divergence(t_logp, out.log_probs, distill.temperature, keep)}
    if t_hidden:
        terms["hidden"] = hidden_loss(hidden, t_hidden, maps)
    return lm_loss, terms, out.mems
