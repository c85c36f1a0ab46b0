"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from allatt_dist.config import DataConfig

WT2_MINI = Path(__file__).resolve().parents[1].parent / "shared/data/wikitext-2-mini"


@pytest.fixture(scope="session")
def wt2_path() -> Path:
    """The real WikiText-2 mini corpus, kept outside the repo at ../shared/data/wikitext-2-mini."""
    if not (WT2_MINI / "train.txt").is_file():
        pytest.skip(f"real data not found at {WT2_MINI} (expected ../shared/data/wikitext-2-mini)")
    return WT2_MINI


@pytest.fixture
def wt2_cfg(wt2_path: Path) -> DataConfig:
    return DataConfig(path=str(wt2_path))
