"""Distillation with every registered architecture (model/registry.py), no Ray: the KL and hidden-state terms are
zero when the student is the teacher (with the Transformer-XL memory carried over segments), and a family whose
models have no `layers` (the toy family of test_registry.py) distils by the KL term alone, its hidden-state
matching refused in one line before any worker starts."""

from __future__ import annotations

import copy

import pytest
import torch
from test_registry import TOY

from allatt_dist.config import DistillConfig, GateConfig, ModelConfig, RunConfig
from allatt_dist.data.vocab import Vocab
from allatt_dist.errors import UserError
from allatt_dist.model.registry import build_model, family_names, register, unregister
from allatt_dist.modelio import save_model_dir
from allatt_dist.rundir import RunDir
from allatt_dist.train.setup import TrainModule
from allatt_dist.train.teacher import Teacher, TeacherSource, check_teacher

VOCAB = 40
DISTILL = DistillConfig(kl_weight=1.0, temperature=2.0, hidden_weight=1.0, hidden_layers=[0, 1])


def _segments(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (2, n * 8 + 1), generator=g)
    return [(x[:, i * 8 : (i + 1) * 8], x[:, i * 8 + 1 : (i + 1) * 8 + 1]) for i in range(n)]  # (B,T) each


def _terms(student, teacher: Teacher, distill: DistillConfig) -> list[dict]:
    """The distillation terms of `student` over consecutive segments, both memories carried."""
    module, mems, out = TrainModule(student, None, distill, teacher.width), None, []
    for x, y in _segments():
        _, _, mems, stats = module(x, y, mems, 0, teacher.outputs(x, 0))
        out.append(stats)
    return out


@pytest.mark.parametrize("arch", family_names())
def test_kl_and_hidden_terms_are_zero_when_the_student_is_the_teacher(arch):
    model = ModelConfig(
        architecture=arch, num_layers=2, hidden_dim=16, num_heads=4, num_persistent=4, ffn_dim=32, seq_len=8, mem_len=8
    )
    cfg = RunConfig(model=model, distill=DISTILL)
    torch.manual_seed(0)
    dense = build_model(model, VOCAB).eval()
    for stats in _terms(copy.deepcopy(dense), Teacher(copy.deepcopy(dense), cfg, torch.device("cpu")), DISTILL):
        assert stats["kl"] < 1e-6 and stats["hidden"] < 1e-10, (arch, stats)  # the finetune phase's student
    gated = build_model(model, VOCAB, gates=GateConfig(sparsity_target=0.5))
    gated.load_state_dict(dense.state_dict(), strict=False)  # the prune phase's student, every head open
    for stats in _terms(gated.eval(), Teacher(copy.deepcopy(dense), cfg, torch.device("cpu")), DISTILL):
        assert stats["kl"] < 1e-6 and stats["hidden"] < 1e-10, (arch, stats)


@pytest.fixture
def toy():
    register(TOY)
    yield ModelConfig(architecture="toy", num_layers=1, hidden_dim=16, num_heads=4, seq_len=8, mem_len=0)
    unregister("toy")


def test_a_family_without_layers_distils_by_kl_and_its_hidden_matching_is_refused(toy, tmp_path):
    torch.manual_seed(0)
    dense = build_model(toy, VOCAB).eval()
    kl_only = DistillConfig(kl_weight=1.0)
    teacher = Teacher(copy.deepcopy(dense), RunConfig(model=toy, distill=kl_only), torch.device("cpu"))
    assert all(stats["kl"] == 0.0 for stats in _terms(copy.deepcopy(dense), teacher, kl_only))
    vocab = Vocab(["<eos>", "<unk>", *[f"w{i}" for i in range(VOCAB - 2)]])
    save_model_dir(dense, vocab, tmp_path / "dense")
    src, run = TeacherSource(in_run=tmp_path / "dense"), RunDir(tmp_path)
    check_teacher(src, tmp_path / "dense", run)  # the KL term alone: fine
    with pytest.raises(UserError, match=r"^distill.hidden_layers: the student .*dense is a toy model, whose family"):
        check_teacher(src, tmp_path / "dense", run, [0])
