"""Distillation (issue 24, the `distill:` section): the KL term, the teacher's isolation from training, the
checks before any worker starts. No Ray here: tiny models on random ids (the Ray Train run is in
test_distill_run.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import trained_in_process

from allatt_dist.config import DataConfig, DistillConfig, GateConfig, ModelConfig, RunConfig
from allatt_dist.data.corpus import load_corpus
from allatt_dist.data.vocab import Vocab
from allatt_dist.errors import UserError
from allatt_dist.model.registry import build_model
from allatt_dist.modelio import save_model_dir
from allatt_dist.rundir import RunDir
from allatt_dist.train.setup import TrainModule
from allatt_dist.train.teacher import (
    Teacher,
    TeacherSource,
    check_fits,
    check_teacher,
    kl_divergence,
    student_bytes,
    teacher_bytes,
    teacher_source,
)

MODEL = ModelConfig(num_layers=2, hidden_dim=32, num_heads=4, num_persistent=8, seq_len=8, mem_len=8)
VOCAB = 40


def _ids(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (3, 9), generator=g)
    return x[:, :-1], x[:, 1:]  # (B,T) inputs, next-token targets


def _trained_dense(wt2_path, steps: int = 25):
    """A tiny dense model trained a few steps on real text (random weights predict near-uniform
    distributions, which a removed head hardly moves), with segments of the text to score."""
    corpus = load_corpus(DataConfig(path=str(wt2_path)), splits=("train",))
    lm, rows = trained_in_process(MODEL.model_copy(update={"seq_len": 16, "mem_len": 0}), corpus, steps)
    return lm, rows[-8:, :-1]


def _kl(teacher, student, x, temperature: float = 2.0) -> float:
    with torch.no_grad():
        return float(kl_divergence(teacher(x).log_probs, student(x).log_probs, temperature))


def _with_heads_removed(dense, n: int):
    """The dense model with `n` heads closed by the eval gate, one per layer in turn (head 0 of every
    layer, then head 1, ...)."""
    cfg, vocab = dense.cfg, dense.vocab_size
    gated = build_model(cfg, vocab, gates=GateConfig(sparsity_target=0.5))
    _, unexpected = gated.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected
    order = torch.arange(cfg.num_layers * cfg.num_heads).view(cfg.num_heads, cfg.num_layers).T  # (L,H) removal rank
    for gate, rank in zip(gated.gates, order, strict=True):
        gate.cut = rank >= n  # (H,) heads kept
    return gated.eval()


def test_kl_is_zero_for_the_teacher_itself_and_grows_as_heads_are_removed(wt2_path):
    dense, x = _trained_dense(wt2_path)
    assert _kl(dense, dense, x) == 0.0
    assert _kl(dense, copy.deepcopy(dense), x) == 0.0
    kls = [_kl(dense, _with_heads_removed(dense, n), x) for n in (0, 2, 4, 6, 8)]
    assert kls[0] < 1e-6, kls  # all heads open: the gated model computes the dense one
    assert all(a < b for a, b in zip(kls, kls[1:], strict=False)), kls


def test_kl_temperature_scaling_and_mask():
    t, s = torch.randn(2, 5, 7).log_softmax(-1), torch.randn(2, 5, 7).log_softmax(-1)
    plain = (t.exp() * (t - s)).sum(-1).mean()
    assert torch.allclose(kl_divergence(t, s, 1.0), plain)
    keep = torch.zeros(2, 5)
    keep[0, 0] = 1.0
    assert torch.allclose(kl_divergence(t, s, 1.0, keep), (t.exp() * (t - s)).sum(-1)[0, 0])
    assert kl_divergence(t, s, 3.0) > 0  # x T^2 keeps the gradient scale comparable across T


def _distil_cfg(weight: float = 1.0) -> RunConfig:
    return RunConfig(model=MODEL, distill=DistillConfig(kl_weight=weight, temperature=2.0))


def test_teacher_never_receives_a_gradient():
    torch.manual_seed(0)
    cfg = _distil_cfg()
    teacher = Teacher(build_model(MODEL, VOCAB), cfg, torch.device("cpu"))
    student = build_model(MODEL, VOCAB, gates=GateConfig(sparsity_target=0.5)).train()
    student.load_state_dict(teacher.model.state_dict(), strict=False)
    module = TrainModule(student, None, cfg.distill)
    assert not any(p is q for p in module.parameters() for q in teacher.model.parameters())
    x, y = _ids(2)
    taught = teacher.outputs(x, 0)
    assert not taught[0].requires_grad and teacher.mems[0] is not None  # its memory moves on like the student's
    loss, lm_loss, mems, stats = module(x, y, None, 0, taught)
    loss.backward()
    assert stats["kl"] > 0
    assert loss.item() > lm_loss.item()  # the KL term is in the loss
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
    assert not teacher.model.training
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_without_distillation_the_loss_is_the_lm_loss():
    torch.manual_seed(0)
    lm = build_model(MODEL, VOCAB)
    x, y = _ids(3)
    loss, lm_loss, _, stats = TrainModule(lm, None)(x, y, None, 0)
    expected, _ = lm.loss(x, y, None)
    assert loss.item() == expected.item() and "kl" not in stats
    assert not RunConfig().distill.applies("prune")  # kl_weight 0 (the default): off


def test_teacher_default_is_the_dense_model(tmp_path):
    cfg = _distil_cfg()
    assert teacher_source(cfg, "dense", tmp_path, None) is None
    assert teacher_source(cfg, "prune", tmp_path, tmp_path / "x").in_run == tmp_path / "x"
    assert teacher_source(cfg, "finetune", tmp_path, tmp_path / "p").in_run == tmp_path / "dense" / "model"
    only_prune = RunConfig(distill=DistillConfig(kl_weight=1.0, phases=["prune"]))
    assert teacher_source(only_prune, "finetune", tmp_path, None) is None


@pytest.mark.parametrize(
    "bad",
    [{"kl_weight": -1.0}, {"temperature": 0.0}, {"phases": ["dense"]}, {"teacher": " "}, {"weight": 1.0}],
    ids=lambda d: next(iter(d)),
)
def test_bad_distill_keys_are_refused(bad):
    with pytest.raises(ValueError, match="distill"):
        RunConfig.model_validate({"distill": bad})


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    words = [f"w{i}" for i in range(VOCAB - 2)]
    student_vocab, other_vocab = Vocab(["<eos>", "<unk>", *words]), Vocab(["<eos>", "<unk>", *reversed(words)])
    save_model_dir(build_model(MODEL, VOCAB), student_vocab, tmp_path / "dense")
    save_model_dir(build_model(MODEL, VOCAB), other_vocab, tmp_path / "other")
    run = RunDir(tmp_path)
    check_teacher(TeacherSource(in_run=tmp_path / "dense"), tmp_path / "dense", run)  # the same: fine
    with pytest.raises(UserError, match=r"^distill.teacher .*other: its vocabulary .* is not the student's"):
        check_teacher(TeacherSource(given=str(tmp_path / "other")), tmp_path / "dense", run)
    with pytest.raises(UserError, match=r"^distill.teacher .*nowhere: .*not found"):
        check_teacher(TeacherSource(given=str(tmp_path / "nowhere")), tmp_path / "dense", run)


def test_distill_keys_are_search_axes_compared_within_a_target():
    from allatt_dist.search.scheduler import group_of

    space = {
        "gates.sparsity_target": {"grid": [0.25, 0.5]},
        "distill.kl_weight": {"grid": [0.0, 1.0]},
        "distill.temperature": {"grid": [1.0, 2.0]},
    }
    cfg = RunConfig.model_validate({"tune": {"space": space}})
    assert cfg.tune.expected_trials() == 8
    assert cfg.with_values({"distill.kl_weight": 1.0}).distill.applies("prune")
    a = {"gates.sparsity_target": 0.5, "distill.kl_weight": 0.0, "distill.temperature": 1.0}
    b = {"gates.sparsity_target": 0.5, "distill.kl_weight": 1.0, "distill.temperature": 2.0}
    assert group_of(a) == group_of(b) != group_of(a | {"gates.sparsity_target": 0.25})
    with pytest.raises(ValueError, match=r"tune.space.*distill.kl_weight"):
        RunConfig.model_validate({"tune": {"space": {"distill.kl_weight": {"grid": [1.0, -1.0]}}}})


def test_hidden_states_matched_through_a_map_where_widths_differ():
    torch.manual_seed(0)
    cfg = RunConfig(model=MODEL, distill=DistillConfig(hidden_weight=1.0, hidden_layers=[0, 1]))
    x, y = _ids(4)
    same = build_model(MODEL, VOCAB)
    teacher = Teacher(copy.deepcopy(same), cfg, torch.device("cpu"))
    module = TrainModule(same, None, cfg.distill, teacher.width)
    assert module.hidden_map is None  # same width: the outputs are compared as they are
    _, _, _, stats = module(x, y, None, 0, teacher.outputs(x, 0))
    assert stats["hidden"] == 0.0 and stats["kl"] == 0.0  # the student is the teacher

    wide = Teacher(build_model(MODEL.model_copy(update={"hidden_dim": 48}), VOCAB), cfg, torch.device("cpu"))
    module = TrainModule(build_model(MODEL, VOCAB), None, cfg.distill, wide.width)
    assert [tuple(m.weight.shape) for m in module.hidden_map] == [(48, 32), (48, 32)]
    loss, lm_loss, _, stats = module(x, y, None, 0, wide.outputs(x, 0))
    loss.backward()
    assert stats["hidden"] > 0 and loss.item() > lm_loss.item()
    assert all(m.weight.grad is not None for m in module.hidden_map)  # the map is learned with the student
    assert all(p.grad is None for p in wide.model.parameters())


@pytest.mark.parametrize(
    "distill, message",
    [
        ({"hidden_weight": 1.0}, "distill.hidden_weight needs distill.hidden_layers"),
        ({"hidden_weight": 1.0, "hidden_layers": [2]}, r"distill.hidden_layers: layer 2 does not exist \(model"),
    ],
)
def test_hidden_layers_must_exist(distill, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.model_validate({"model": MODEL.model_dump(), "distill": distill})


def test_teacher_without_a_matched_layer_is_refused(tmp_path):
    vocab = Vocab(["<eos>", "<unk>", *[f"w{i}" for i in range(VOCAB - 2)]])
    save_model_dir(build_model(MODEL, VOCAB), vocab, tmp_path / "student")
    save_model_dir(build_model(MODEL.model_copy(update={"num_layers": 1}), VOCAB), vocab, tmp_path / "small")
    with pytest.raises(UserError, match=r"^distill.hidden_layers: layer 1 does not exist in the teacher .*small"):
        check_teacher(TeacherSource(given=str(tmp_path / "small")), tmp_path / "student", RunDir(tmp_path), [0, 1])


def _meta(params: int, vocab: int = 10_000, layers: int = 4, width: int = 256, mem: int = 64) -> dict:
    return {"params": params, "vocab_size": vocab, "model": {"num_layers": layers, "hidden_dim": width, "mem_len": mem}}


def test_teacher_memory_counts_its_weights_outputs_and_memory_and_zero3_partitions_them():
    cfg = RunConfig.model_validate({"scaling": {"num_workers": 2}, "distill": {"kl_weight": 1.0}})
    b, t, v = cfg.micro_batch, cfg.model.seq_len, 10_000
    mems = 4 * b * 64 * 256 * 4  # layers x (B,M,D) fp32, one accumulation chunk
    assert teacher_bytes(cfg, _meta(10**8)) == 4 * 10**8 + b * t * v * (4 + 12) + mems
    zero3 = cfg.with_values({"deepspeed.zero_stage": 3})
    assert teacher_bytes(zero3, _meta(10**8)) == 2 * 10**8 + b * t * v * (4 + 12) + mems  # half of it per rank
    # the student: fp32 weights, gradients and two Adam moments; ZeRO-1 partitions the moments
    assert student_bytes(cfg, _meta(10**6)) == 16 * 10**6 + 2 * b * t * v * 4 + mems
    assert (
        student_bytes(cfg.with_values({"deepspeed.zero_stage": 1}), _meta(10**6))
        == 12 * 10**6 + 2 * b * t * v * 4 + mems
    )


def test_teacher_that_does_not_fit_beside_the_student_is_refused_naming_the_memory():
    cfg = RunConfig.model_validate({"scaling": {"num_workers": 2}, "distill": {"kl_weight": 1.0}})
    node = {"CPU": 2.0, "memory": 8 * 2**30}  # two workers share it: 4 GiB each
    check_fits(cfg, _meta(10**6), _meta(10**8), "t", [node])  # 0.4 GB of teacher: fine
    with pytest.raises(UserError) as e:
        check_fits(cfg, _meta(10**6), _meta(12 * 10**8), "RUN/big", [node])  # 4.8 GB of fp32 weights per worker
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("distill.teacher RUN/big: the teacher (4.55 GiB)"), msg
    assert "a worker needs at least 4.60 GiB but the cluster has at most 8.00 GiB of Ray's `memory`" in msg, msg
    assert "room for 1 of scaling.num_workers=2" in msg, msg
    check_fits(cfg.with_values({"deepspeed.zero_stage": 3}), _meta(10**6), _meta(12 * 10**8), "t", [node])  # halved
    check_fits(cfg, _meta(10**6), _meta(12 * 10**8), "t", [node, dict(node)])  # one worker per node: 8 GiB each
    gpu = cfg.with_values({"scaling.use_gpu": True})
    h100 = {"CPU": 16.0, "GPU": 2.0, "memory": 1e9, "accelerator_type:H100": 1.0}
    check_fits(gpu, _meta(10**6), _meta(10**10), "t", [h100])  # 40 GB: fits in 80 GB of GPU memory
    with pytest.raises(UserError, match=r"GPU memory"):
        check_fits(gpu, _meta(10**6), _meta(3 * 10**10), "t", [h100])
    check_fits(gpu, _meta(10**6), _meta(10**12), "t", [{"CPU": 4.0, "GPU": 2.0}])  # unknown GPU: not checked


def test_memory_check_runs_with_the_teacher_checks_on_the_connected_cluster(tmp_path, monkeypatch):
    import ray

    from allatt_dist.cluster import capacity

    vocab = Vocab(["<eos>", "<unk>", *[f"w{i}" for i in range(VOCAB - 2)]])
    save_model_dir(build_model(MODEL, VOCAB), vocab, tmp_path / "dense")
    cfg = _distil_cfg()
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(capacity, "_alive", lambda: [{"CPU": 2.0, "memory": 1000.0}])  # 1000 bytes
    with pytest.raises(UserError, match=r"^distill.teacher .*dense: the teacher .* does not fit beside the student"):
        check_teacher(TeacherSource(in_run=tmp_path / "dense"), tmp_path / "dense", RunDir(tmp_path), [], cfg)
    monkeypatch.setattr(capacity, "_alive", lambda: [{"CPU": 2.0, "memory": 2.0**30}])
    check_teacher(TeacherSource(in_run=tmp_path / "dense"), tmp_path / "dense", RunDir(tmp_path), [], cfg)
