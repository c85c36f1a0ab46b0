"""Shared pytest fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Before anything imports Ray: the local instances tests start are loopback-only, as the CLI's are
# (allatt_dist/cluster/session.py); CLI subprocesses inherit it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
assert "ray" not in sys.modules, "ray was imported before tests/conftest.py could close the local instance"

import pytest  # noqa: E402
import torch  # noqa: E402

from allatt_dist.config import DataConfig  # noqa: E402

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


# The first lines of each split: real WikiText-2 text for the tests that train through Ray, where the size of
# the corpus proves nothing and costs much (every phase ends by scoring its whole validation split, and the
# output layer is as wide as the vocabulary: this slice is ~15x cheaper to score than the whole mini corpus).
SLICE_LINES = {"train": 1000, "valid": 300, "test": 300}


@pytest.fixture(scope="session")
def wt2_slice(wt2_path: Path, tmp_path_factory) -> Path:
    """A folder with the first SLICE_LINES lines of each WikiText-2 mini split (its vocabulary: the slice's)."""
    out = tmp_path_factory.mktemp("wt2-slice")
    for split, lines in SLICE_LINES.items():
        with open(wt2_path / f"{split}.txt", encoding="utf-8") as f:
            (out / f"{split}.txt").write_text("".join(f.readlines()[:lines]), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def wt2_slice_cfg(wt2_slice: Path) -> DataConfig:
    return DataConfig(path=str(wt2_slice))


@pytest.fixture(scope="session")
def s3():
    """One S3-protocol server (moto, loopback; tests/s3server.py) for the session, with a bucket `runs`.
    Each test file keeps to prefixes of its own."""
    from s3server import S3Server

    with S3Server() as server:
        server.make_bucket("runs")
        yield server


@pytest.fixture(scope="session")
def local_ray(s3) -> str:
    """One local Ray for every test that needs one, started as the CLI starts it (`connect()`, with its
    dashboard) on first use and closed at the end; yields its GCS address, which CLI subprocesses join with
    `--address`. Its processes know the session's S3 server the standard way (AWS_* in their environment,
    as the nodes of a cluster have them); this process's environment is left as it was.

    Tests must not call `ray.shutdown()`: the next test that needs Ray would find none."""
    import ray

    from allatt_dist.cluster.session import connect

    if ray.is_initialized():
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in s3.env()}
    os.environ.update(s3.env())  # read by Ray's node processes as they start; workers inherit them
    try:
        connect()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _home_state(home: Path) -> dict[str, tuple[int, int] | None]:
    """What the suite must leave as it found: HOME's top-level names, and Ray's files under it."""
    state: dict[str, tuple[int, int] | None] = {p.name: None for p in home.iterdir()}
    for sub in (".ray", "ray_results"):
        for p in (home / sub).rglob("*"):
            st = p.lstat()
            state[str(p.relative_to(home))] = (st.st_size, st.st_mtime_ns)
    return state


@pytest.fixture(scope="session", autouse=True)
def home_untouched():
    """Tests create nothing outside their temporary directories: HOME is the same after the suite."""
    home = Path.home()
    before = _home_state(home)
    yield
    after = _home_state(home)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, 0) != after.get(k, 0))
    assert not changed, f"the test suite changed {home}: {changed[:10]}"
