"""Checkpoints whole or ignored, under real Ray Train workers (`allatt-dist train` in a subprocess,
with its own local Ray):

1. rank 0 is SIGKILLed while the step-20 checkpoint is being written (every rank's files are in the
   staging folder, one of them cut short, nothing published yet). Ray Train restarts the group
   (scaling.max_failures=1): it resumes from step 10, never from the killed write, and when the run
   ends no partial file is left and `keep_checkpoints` whole checkpoints remain.
2. The newest checkpoint's model file is then truncated and the run continued to more steps: the
   driver names the file in one warning, removes it, and the workers resume from the one before.

The kill comes from a `sitecustomize` module on the subprocess's PYTHONPATH (Ray's worker processes
inherit it), which wraps `ckpt_folder.publish`: nothing in the package knows about the test.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from clirun import run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny import tiny_config

from allatt_dist.train import ckpt_folder as ck

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]

HOOK = """
import os, signal
from pathlib import Path
from allatt_dist.train import ckpt_folder

_publish = ckpt_folder.publish

def publish(staging, root, step, keep):
    mark = Path(os.environ["ALLATT_TEST_KILL_MARK"])
    if step == int(os.environ["ALLATT_TEST_KILL_AT"]) and not mark.exists():
        victim = sorted(p for p in Path(staging).rglob("*") if p.is_file())[-1]
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a write cut short
        mark.write_text(str(staging))
        os.kill(os.getpid(), signal.SIGKILL)
    return _publish(staging, root, step, keep)

ckpt_folder.publish = publish
"""


def _segments(tb: Path) -> list[list[int]]:
    """Steps of train/loss in each events file, oldest first: one file per (re)start of the workers."""
    out = []
    for f in sorted(tb.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        out.append(sorted(e.step for e in acc.Scalars("train/loss")))
    return out


def _train(cfg_file: Path, out: Path, env: dict, *sets: str) -> subprocess.CompletedProcess:
    sets_ = [a for s in sets for a in ("--set", s)]
    args = ["train", cfg_file, "--out", out, "--phase", "dense", "--no-progress", *sets_]
    return run_cli(*args, env=env, cwd=out.parent, timeout=900)


def _whole_checkpoints(root: Path) -> list[str]:
    names = sorted(p.name for p in root.iterdir() if not p.name.startswith("checkpoint_manager"))
    names = [n for n in names if n.startswith((ck.PREFIX, ck.STAGING, ck.TRASH))]
    for n in names:
        assert n.startswith(ck.PREFIX) and ck.problem(root / n) is None, f"{n}: not a whole checkpoint"
    return names


def test_killed_write_is_never_resumed_and_a_truncated_newest_is_skipped(tmp_path, wt2_slice):
    cfg = tiny_config(
        wt2_slice,
        train={"max_steps": 40, "eval_every": 40, "checkpoint_every": 10, "keep_checkpoints": 2},
        scaling={"max_failures": 1},
    )
    cfg_file, run = tmp_path / "tiny.yaml", tmp_path / "run"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    mark = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        PYTHONPATH=f"{hook}{os.pathsep}{REPO}",
        ALLATT_TEST_KILL_AT="20",
        ALLATT_TEST_KILL_MARK=str(mark),
        RAY_USAGE_STATS_ENABLED="0",
    )

    # 1. rank 0 killed while the step-20 checkpoint is written
    r = _train(cfg_file, run, env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert mark.is_file(), "the kill did not happen"
    staging = Path(mark.read_text())
    assert staging.parent == run / "dense/checkpoints" and not staging.exists(), "partial files left"
    first, restarted = _segments(run / "tb/dense")
    assert max(first) >= 20 and restarted[0] == 11, (first[-1], restarted[:3])  # resumed from 10, not 20
    assert restarted[-1] == 40
    assert _whole_checkpoints(run / "dense/checkpoints") == ["checkpoint_00000030", "checkpoint_00000040"]
    result = json.loads((run / "dense/result.json").read_text())
    assert result["step"] == 40 and result["checkpoint"] == str(run / "dense/checkpoints/checkpoint_00000040")

    # 2. the newest checkpoint's model file truncated, then the run continued to 60 steps
    victim = run / "dense/checkpoints/checkpoint_00000040/ds/mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:1000])
    r = _train(cfg_file, run, env, "train.max_steps=60")
    assert r.returncode == 0, r.stderr[-4000:]
    warnings = [ln for ln in r.stderr.splitlines() if "allatt-dist: warning" in ln]
    assert len(warnings) == 1 and str(victim) in warnings[0] and "truncated" in warnings[0], r.stderr[-3000:]
    *_, resumed = _segments(run / "tb/dense")
    assert resumed[0] == 31 and resumed[-1] == 60, resumed[:3]  # from step 30, the one before
    assert _whole_checkpoints(run / "dense/checkpoints") == ["checkpoint_00000050", "checkpoint_00000060"]
