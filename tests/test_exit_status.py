"""Exit statuses as docs/training.md ("Errors") gives them: 2 for input the user can fix, 1 for what
the machine refused during the run (a full disk, a file too large, memory), always one line."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from clirun import cli_cmd
from ray.train import WorkerGroupError

from allatt_dist import cli
from allatt_dist.config import GateConfig, ModelConfig
from allatt_dist.data.corpus import load_corpus
from allatt_dist.errors import CheckpointError, EnvironmentFailure, UserError
from allatt_dist.model.transformer import LanguageModel
from allatt_dist.modelio import save_model_dir
from allatt_dist.train.trainer import environmental

REPO = Path(__file__).resolve().parents[1]


def _disk_full() -> OSError:
    return OSError(28, "No space left on device", "/runs/x/dense/checkpoints/.staging-1/ds/mp_rank_00.pt")


@pytest.mark.parametrize(
    "err, machine",
    [
        (WorkerGroupError("rank 1 failed", {1: _disk_full()}), True),
        (WorkerGroupError("rank 0 failed", {0: RuntimeError("CUDA out of memory. Tried to allocate")}), True),
        (WorkerGroupError("rank 0 failed", {0: MemoryError()}), True),
        (WorkerGroupError("rank 0 failed", {0: ValueError("bad shape")}), False),
        (WorkerGroupError("rank 0 failed", {0: CheckpointError("x: corrupt")}), False),
    ],
)
def test_a_failed_fit_is_classified_by_its_worker_errors(err, machine):
    assert environmental(err) is machine


@pytest.mark.parametrize(
    "raised, status",
    [
        (UserError("--out x: is a file"), 2),
        (CheckpointError("m/config.json: not valid JSON"), 2),
        (EnvironmentFailure("run/dense: training failed: OSError: [Errno 28] No space left on device"), 1),
        (_disk_full(), 1),
        (MemoryError(), 1),
    ],
)
def test_cli_exit_status_and_one_line(raised, status, monkeypatch, capsys):
    def fails(_args):
        raise raised

    monkeypatch.setattr(cli, "cmd_rank", fails)
    assert cli.main(["rank", "some/exp"]) == status
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("allatt-dist rank: error: "), err


def _small_files_only():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_a_write_the_file_system_refuses_is_exit_1_and_leaves_nothing(tmp_path, wt2_cfg):
    vocab = load_corpus(wt2_cfg, splits=("train",)).vocab
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_dim=32, num_heads=4, num_persistent=8, seq_len=16, mem_len=16)
    save_model_dir(LanguageModel(cfg, len(vocab), gates=GateConfig()), vocab, tmp_path / "gated", gates=GateConfig())
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run(
        cli_cmd("prune", tmp_path / "gated", "--out", tmp_path / "p"),
        env=env,
        preexec_fn=_small_files_only,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip() == f"allatt-dist prune: error: {tmp_path / 'p/model.safetensors'}: File too large", r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gated"]  # no half-written model, no temp folder
