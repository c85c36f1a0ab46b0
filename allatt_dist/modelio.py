"""Model directories: `model.safetensors` + `config.json` + `vocab.txt`, loadable without pickle.

Written atomically (a temporary sibling directory renamed into place), so a crash never leaves a
half-written model where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from allatt_dist.config import GateConfig, ModelConfig
from allatt_dist.data.vocab import Vocab
from allatt_dist.errors import CheckpointError, DataError
from allatt_dist.model.pruning import sparsity
from allatt_dist.model.transformer import LanguageModel, count_params

FORMAT = "allatt-dist/model"
VERSION = 1


def model_meta(model: LanguageModel, vocab: Vocab, gates: GateConfig | None, extra: dict | None = None) -> dict:
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
        **(extra or {}),
    }


def save_model_dir(
    model: LanguageModel,
    vocab: Vocab,
    out: str | Path,
    gates: GateConfig | None = None,
    extra: dict | None = None,
) -> dict:
    """Write the model to `out` atomically; returns the config.json contents."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = model_meta(model, vocab, gates, extra)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is meant to be shared
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        vocab.save(tmp / "vocab.txt")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


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


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> tuple[LanguageModel, Vocab, dict]:
    """Load (model in eval mode, vocabulary, config.json). Every failure is a one-line CheckpointError."""
    d = Path(path)
    meta = read_meta(d)
    try:
        # Saved before model.adaptive_proj existed: those models had no shortlist projections.
        mcfg = ModelConfig.model_validate({"adaptive_proj": False} | meta["model"])
        gates = GateConfig.model_validate(meta["gates"]) if meta.get("gates") else None
        model = LanguageModel(mcfg, int(meta["vocab_size"]), gates, list(meta["heads_per_layer"]))
    except (KeyError, TypeError, ValueError, ValidationError) as e:
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
    return model.to(device).eval(), vocab, meta
