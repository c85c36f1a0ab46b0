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
    },
    "authors": {  # aiha-lab/Attention-Head-Pruning, the code behind Shim et al. 2021
        "final_norm": False,
        "persistent_content_bias": False,
        "zero_memory_start": True,
        "positions": "learned",
        "attn_out_bias": True,
        "adaptive_proj": True,  # with cutoffs; without them the switch stays off (nothing to project)
    },
}
# ... and the gate switches (checked by RunConfig, where both sections are known).
GATE_PRESETS: dict[str, dict[str, Any]] = {
    "ours": {"open_at_threshold": False, "output_scaling": True},
    "authors": {"open_at_threshold": True, "output_scaling": False},
}


def apply_preset(section: BaseModel, name: str, preset: dict[str, Any], variant: str) -> None:
    """Set `section`'s switches to `preset`; a key the recipe gave with another value is an error."""
    for key, want in preset.items():
        got = getattr(section, key)
        if key in section.model_fields_set and got != want:
            raise ValueError(f"{name}.{key}: {got!r} contradicts model.variant {variant} (which sets {want!r})")
        section.__dict__[key] = want  # no re-validation: the value is one of the field's own
