"""`rank` scores its models as parallel Ray tasks (allatt_dist/search/scoring.py): the results equal
evaluating the same models one after another in this process, and a bad model is one line."""

from __future__ import annotations

import pytest
import torch

from allatt_dist.config import DataConfig, GateConfig, ModelConfig
from allatt_dist.data.corpus import load_corpus
from allatt_dist.data.vocab import Vocab
from allatt_dist.model.transformer import LanguageModel
from allatt_dist.modelio import save_model_dir
from allatt_dist.search.scoring import Job, score_all, score_one


def _model(vocab_size: int, arch: str, gated: bool, seed: int) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(architecture=arch, num_layers=2, hidden_dim=16, num_heads=4, num_persistent=8, ffn_dim=32,
                      seq_len=16, mem_len=16)  # fmt: skip
    model = LanguageModel(cfg, vocab_size, GateConfig() if gated else None)
    if gated:
        with torch.no_grad():
            for gate, signs in zip(model.gates, ([1, -1, 1, -1], [-1, -1, 1, 1]), strict=True):
                gate.log_alpha.copy_(torch.tensor(signs, dtype=torch.float32) * 3.0)  # some heads closed
    return model


@pytest.fixture(scope="module")
def data_cfg(wt2_path) -> DataConfig:
    return DataConfig(path=str(wt2_path))


@pytest.mark.ray
def test_parallel_scores_equal_serial_scores(local_ray, data_cfg, tmp_path):
    vocab = load_corpus(data_cfg, ("test",)).vocab
    jobs = []
    for i, (arch, gated) in enumerate([("all_attention", True), ("transformer_xl", True), ("all_attention", False)]):
        model = _model(len(vocab), arch, gated, seed=i)
        save_model_dir(model, vocab, tmp_path / f"m{i}", GateConfig() if gated else None)
        jobs.append(Job(f"m{i}", tmp_path / f"m{i}", gated))
    parallel = score_all(jobs, data_cfg, progress=False)
    for job, got in zip(jobs, parallel, strict=True):
        want = score_one(job, data_cfg)  # serial, in this process
        assert got["test_ppl"] == want["test_ppl"], job.name
        assert got["model"].heads_per_layer == want["model"].heads_per_layer
        for a, b in zip(got["model"].state_dict().values(), want["model"].state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert parallel[0]["model"].heads_per_layer == [2, 2]  # pruned in the task


@pytest.mark.ray
def test_a_model_of_another_vocabulary_is_one_line(local_ray, data_cfg, tmp_path):
    other = Vocab(["x", "y", Vocab.EOS, Vocab.UNK])
    save_model_dir(_model(len(other), "all_attention", False, 0), other, tmp_path / "bad")
    (got,) = score_all([Job("bad", tmp_path / "bad", False)], data_cfg, progress=False)  # the others go on
    assert "vocabulary differs" in got["error"] and "\n" not in got["error"], got
