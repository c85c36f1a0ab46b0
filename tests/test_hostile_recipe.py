"""Issue 25 item 6: a key given twice in a recipe is an error naming the key and both lines (PyYAML
alone keeps the last value silently). No Ray: the refusal comes from reading the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from allatt_dist.errors import ConfigError
from allatt_dist.recipe import load_config


def _recipe(tmp_path: Path) -> Path:
    p = tmp_path / "dup.yaml"
    p.write_text("model:\n  hidden_dim: 32\n  num_heads: 4\n  hidden_dim: 64\ntrain:\n  max_steps: 5\n")
    return p


def test_duplicate_key_names_key_and_both_lines(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as got:
        load_config(_recipe(tmp_path))
    msg = str(got.value)
    assert "'hidden_dim'" in msg and "lines 2 and 4" in msg and "dup.yaml" in msg


def test_duplicate_section_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "dup2.yaml"
    p.write_text("train:\n  max_steps: 5\nmodel:\n  hidden_dim: 32\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"'train'.*lines 1 and 5"):
        load_config(p)
