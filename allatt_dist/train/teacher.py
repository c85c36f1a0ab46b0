"""Distillation (the `distill:` section): the teacher a Ray Train worker runs beside the student, and the
KL term between their next-token distributions.

    teacher_source     driver: which model directory teaches a phase (None: no distillation), checked
                       before any worker starts (it exists, it has the student's vocabulary)
    Teacher            worker: the teacher model, eval mode, no gradient, the training precision, with its
                       own Transformer-XL memory per gradient-accumulation chunk (saved in the checkpoint)
    distilled_loss     the student's LM loss, KL(teacher || student) at temperature T (scaled by T^2) and the
                       hidden-state term (MSE of chosen layers' outputs, through a learned map where widths differ)

The teacher is never registered with the module DeepSpeed wraps: its weights are in no optimizer, no
checkpoint and no ZeRO partition.
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


def check_teacher(src: TeacherSource, student_dir: Path, run, hidden_layers: list[int] = ()) -> None:
    """One line (UserError) when the teacher cannot teach the student that starts from `student_dir`:
    missing, not a model directory, another vocabulary, or without a layer of `hidden_layers`. Reads
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

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, device: torch.device):
        self.model = model.to(device=device, dtype=PRECISION[cfg.deepspeed.precision]).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.temperature = cfg.distill.temperature
        self.mems: list = [None] * cfg.deepspeed.grad_accum_steps  # per chunk, like the student's
        self.layers = list(cfg.distill.hidden_layers) if cfg.distill.hidden_weight > 0 else []
        self.width = model.cfg.hidden_dim

    @classmethod
    def load(cls, src: TeacherSource, run, cfg: RunConfig, device: torch.device) -> Teacher:
        """This worker's teacher, read from its model directory (`run`: this worker's run directory)."""
        with _local_teacher(src, run, weights=True) as (_, folder):
            model, _, _ = load_model_dir(folder)
        return cls(model, cfg, device)

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """((B,T,V) next-token log-probabilities, [(B,T,D)] outputs of the matched layers) of the teacher
        for chunk `chunk`'s ids; its memory moves on."""
        with layer_outputs(self.model, self.layers) as hidden:
            out = self.model(x, self.mems[chunk])
        self.mems[chunk] = out.mems
        return out.log_probs, hidden

    def reset(self) -> None:
        self.mems = [None] * len(self.mems)


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
