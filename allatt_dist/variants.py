"""The presets of `model.variant`: which switch values "ours" and "authors" fix (docs/model.md, "Variants").

Read by config.py's validators; a recipe key that contradicts the chosen preset is an error there.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

# The model switches each preset (`model.variant`) fixes; see docs/model.md, "Variants".
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "ours": {
        "final_norm": True,
        "persistent_content_bias": True,
        "zero_memory_start": False,
        "positions": "sinusoid",
        "attn_out_bias": False,
        "adaptive_proj": True,  # with cutoffs (measured: docs/results.md); without them off
        "output_dropout_twice": False,
        "shared_rel_bias": False,
    },
    "authors": {  # aiha-lab/Attention-Head-Pruning, the code behind Shim et al. 2021
        "final_norm": False,
        "persistent_content_bias": False,
        "zero_memory_start": True,
        "positions": "learned",
        "attn_out_bias": True,
        "adaptive_proj": True,  # with cutoffs; without them the switch stays off (nothing to project)
        "output_dropout_twice": True,  # all_transformer.py drops the last hidden state with drop, then drop_o
        "shared_rel_bias": False,
    },
    # Their Transformer-XL (nnlib/models/transformer_xl/memory_transformer.py): sinusoidal positions, a
    # final LayerNorm (pre_norm), one u and one v shared by all layers, zero-memory start, biased output
    # projections, shortlist projections (div_value 4), the output dropped once.
    "transformer_xl": {
        "final_norm": True,
        "persistent_content_bias": True,  # no persistent vectors: nothing to switch
        "zero_memory_start": True,
        "positions": "sinusoid",
        "attn_out_bias": True,
        "adaptive_proj": True,
        "output_dropout_twice": False,
        "shared_rel_bias": True,
    },
}
# ... and the gate switches (checked by RunConfig, where both sections are known).
# per_rank_samples: their train_gating.py seeds each rank with seed + rank, so every GPU samples its own
# sub-network per step. Their Transformer-XL was never gated in their code: it gets their gating rule.
GATE_PRESETS: dict[str, dict[str, Any]] = {
    "ours": {"open_at_threshold": False, "output_scaling": True, "per_rank_samples": False},
    "authors": {"open_at_threshold": True, "output_scaling": False, "per_rank_samples": True},
    "transformer_xl": {"open_at_threshold": True, "output_scaling": False, "per_rank_samples": True},
}


def check_variant(variant: str, architecture: str) -> None:
    """The authors' Transformer-XL variant is a Transformer-XL."""
    if variant == "transformer_xl" and architecture != "transformer_xl":
        raise ValueError(
            f"model.variant transformer_xl (the authors' Transformer-XL) needs model.architecture: transformer_xl, "
            f"got {architecture}"
        )


def apply_preset(section: BaseModel, name: str, preset: dict[str, Any], variant: str) -> None:
    """Set `section`'s switches to `preset`; a key the recipe gave with another value is an error."""
    for key, want in preset.items():
        got = getattr(section, key)
        if key in section.model_fields_set and got != want:
            raise ValueError(f"{name}.{key}: {got!r} contradicts model.variant {variant} (which sets {want!r})")
        section.__dict__[key] = want  # no re-validation: the value is one of the field's own
