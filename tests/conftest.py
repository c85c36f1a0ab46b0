"""Shared pytest fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from allatt_dist.config import DataConfig

# Tiny models on a 2-core machine that also runs Ray workers: one intra-op thread is several times
# faster than two fighting for the cores (evaluating the test split: 11 s vs 75 s when loaded).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for CLI subprocesses started by tests

# The token cache (allatt_dist/data/cache.py) of every test, CLI subprocess and Ray worker started from
# here: a temp folder, never ~/.cache.
if not os.environ.get("ALLATT_CACHE_DIR"):
    os.environ["ALLATT_CACHE_DIR"] = tempfile.mkdtemp(prefix="allatt-cache-")
    atexit.register(shutil.rmtree, os.environ["ALLATT_CACHE_DIR"], True)

WT2_MINI = Path(__file__).resolve().parents[1].parent / "shared/data/wikitext-2-mini"


@pytest.fixture(scope="session")
def wt2_path() -> Path:
    """The real WikiText-2 mini corpus, kept outside the repo at ../shared/data/wikitext-2-mini."""
    if not (WT2_MINI / "train.txt").is_file():
        pytest.skip(f"real data not found at {WT2_MINI} (expected ../shared/data/wikitext-2-mini)")
    return WT2_MINI


@pytest.fixture(scope="session")
def wt2_cfg(wt2_path: Path) -> DataConfig:
    return DataConfig(path=str(wt2_path))
