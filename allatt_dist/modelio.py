"""Model directories: `model.safetensors` + `config.json` + `vocab.txt`, loadable without pickle.

Written atomically (built in a temporary sibling directory, then swapped in: allatt_dist/atomic.py),
so a reader never sees a half-written model, and a crash never leaves one where a good one was.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from allatt_dist.atomic import replace_dir
from allatt_dist.config import GateConfig, ModelConfig
from allatt_dist.data.vocab import Vocab
from allatt_dist.errors import CheckpointError, DataError, Problem, first_problem
from allatt_dist.model.checks import model_problem
from allatt_dist.model.pruning import sparsity
from allatt_dist.model.registry import FamilyModel, build_model
from allatt_dist.model.transformer import count_params

FORMAT = "allatt-dist/model"
VERSION = 1


def model_meta(model: FamilyModel, vocab: Vocab, gates: GateConfig | None, extra: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "architecture": model.cfg.architecture,
        "model": model.cfg.model_dump(mode="json"),
        "gates": gates.model_dump(mode="json") if gates is not None else None,
        "heads_per_layer": list(model.heads_per_layer),
        "sparsity": sparsity(model.heads_per_layer, model.cfg),
        "params": count_params(model),
        "vocab_size": model.vocab_size,
        "vocab_fingerprint": vocab.fingerprint(),
        "final_cut": _cut_of(model),
        **(extra or {}),
    }


def _cut_of(model: FamilyModel) -> list[list[bool]] | None:
    """The final cut's kept heads per gated layer (None when no cut was made): pruning keeps exactly these."""
    cuts = [g.cut for g in model.gates]
    if not cuts or any(c is None for c in cuts):
        return None
    return [[bool(x) for x in c.tolist()] for c in cuts]


def save_model_dir(
    model: FamilyModel,
    vocab: Vocab,
    out: str | Path,
    gates: GateConfig | None = None,
    extra: dict | None = None,
) -> dict:
    """Write the model to `out` atomically; returns the config.json contents."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = model_meta(model, vocab, gates, extra)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is meant to be shared
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        try:
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        except SafetensorError as e:  # a write the file system refused (full, too large): an OSError
            code = _os_errno(str(e))
            raise OSError(code, os.strerror(code), str(out / "model.safetensors")) from None
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        vocab.save(tmp / "vocab.txt")
        replace_dir(tmp, out)  # one step where the system allows: never a half-written model at `out`
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _os_errno(message: str) -> int:
    """The errno in a safetensors I/O message ('... (os error 28)'); EIO when it names none."""
    m = re.search(r"os error (\d+)", message)
    return int(m.group(1)) if m else errno.EIO


def read_meta(path: str | Path) -> dict[str, Any]:
    d = Path(path)
    cfg_file = d / "config.json"
    if not d.is_dir():
        raise CheckpointError(f"{d}: model directory not found")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (a model directory holds model.safetensors and config.json)")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON (not UTF-8 text, byte {e.start})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: not an allatt-dist model (format must be {FORMAT!r})")
    return meta


def _invalid(d: Path, problem: Problem) -> str:
    return f"{d / 'config.json'}: invalid model description ({problem.key}: {problem.msg})"


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> tuple[FamilyModel, Vocab, dict]:
    """Load (model in eval mode, vocabulary, config.json). Every failure is a one-line CheckpointError.
    The model is built by its architecture's registered family (model/registry.py)."""
    d = Path(path)
    meta = read_meta(d)
    try:
        # Saved before model.adaptive_proj existed: those models had no shortlist projections.
        mcfg = ModelConfig.model_validate({"adaptive_proj": False} | meta["model"])
        problem = model_problem(mcfg)  # e.g. an architecture this installation has not registered
        if problem is not None:
            raise CheckpointError(_invalid(d, problem))
        gates = GateConfig.model_validate(meta["gates"]) if meta.get("gates") else None
        model = build_model(mcfg, int(meta["vocab_size"]), gates, list(meta["heads_per_layer"]))
    except ValidationError as e:
        raise CheckpointError(_invalid(d, first_problem(e))) from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / 'config.json'}: invalid model description ({str(e).splitlines()[0]})") from None
    weights = d / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{weights}: corrupt or truncated ({str(e).splitlines()[0]})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{weights}: tensors do not match config.json ({str(e).splitlines()[1].strip()})"
        ) from None
    try:
        vocab = Vocab.load(d / "vocab.txt")
    except DataError as e:  # missing or malformed; the message already names the file
        raise CheckpointError(str(e)) from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{d / 'vocab.txt'}: not UTF-8 text (byte {e.start})") from None
    if len(vocab) != model.vocab_size or vocab.fingerprint() != meta.get("vocab_fingerprint"):
        raise CheckpointError(f"{d / 'vocab.txt'}: does not match the model's vocabulary")
    cut = meta.get("final_cut")
    if cut is not None:
        if [len(c) for c in cut] != [g.log_alpha.numel() for g in model.gates]:
            raise CheckpointError(f"{d / 'config.json'}: final_cut does not match the model's gates")
        for gate, keep in zip(model.gates, cut, strict=True):
            gate.cut = torch.tensor(keep, dtype=torch.bool)  # (H,)
    return model.to(device).eval(), vocab, meta
