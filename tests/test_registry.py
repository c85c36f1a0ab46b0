"""Model families: a toy architecture declared here, registered with one line, goes through the real
model directories, `allatt-dist prune` and `allatt-dist evaluate`; unknown names are one line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from allatt_dist.cli import main
from allatt_dist.config import GateConfig, ModelConfig, RunConfig
from allatt_dist.data.corpus import load_corpus
from allatt_dist.errors import CheckpointError, ConfigError
from allatt_dist.evaluate import evaluate
from allatt_dist.model.gates import GatedModule, HeadGate, SparsityObjective
from allatt_dist.model.pruning import per_head_params, prune_model
from allatt_dist.model.registry import ModelFamily, build_model, family_names, get_family, register, unregister
from allatt_dist.model.transformer import LanguageModel, LMOutput, count_params
from allatt_dist.modelio import load_model_dir, save_model_dir
from allatt_dist.perf import flops_per_token
from allatt_dist.recipe import load_config
from allatt_dist.train.setup import TrainModule, param_groups, phase_spec


class ToyLM(GatedModule):
    """One gated layer: each head is a head_dim-wide ReLU slice of a residual MLP over the embedding."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, gates=None, heads_per_layer=None):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.heads_per_layer = list(heads_per_layer or [cfg.num_heads])
        h, d, dh = self.heads_per_layer[0], cfg.hidden_dim, cfg.head_dim
        self.embed = nn.Embedding(vocab_size, d)
        self.up = nn.Linear(d, h * dh)
        self.down = nn.Linear(h * dh, d, bias=False)
        self.gate = HeadGate(h, gates) if gates is not None and h else None
        self.out = nn.Linear(d, vocab_size)

    def forward(self, x, mems=None, target=None):
        b, t = x.shape
        h, dh = self.heads_per_layer[0], self.cfg.head_dim
        e = self.embed(x)  # (B,T,D)
        a = torch.relu(self.up(e)).view(b, t, h, dh)  # (B,T,H,dh)
        if self.gate is not None:
            a = a * self.gate()[:, None]  # (B,T,H,dh)
        logp = F.log_softmax(self.out(e + self.down(a.reshape(b, t, h * dh))), dim=-1)  # (B,T,V)
        if target is None:
            return LMOutput(None, logp, [])
        keep = target != -100  # (B,T)
        nll = -logp.gather(-1, target.masked_fill(~keep, 0)[..., None])[..., 0]  # (B,T)
        return LMOutput(torch.where(keep, nll, 0.0), None, [])

    def loss(self, x, target, mems=None):
        out = self(x, mems, target)
        return out.nll.sum() / (target != -100).sum().clamp(min=1), out.mems


@torch.no_grad()
def prune_toy(gated: ToyLM) -> ToyLM:
    idx = torch.nonzero(gated.gate.open_mask()).flatten()  # (H',)
    dh = gated.cfg.head_dim
    rows = (idx[:, None] * dh + torch.arange(dh)[None]).flatten()  # (H'*dh,)
    pruned = ToyLM(gated.cfg, gated.vocab_size, None, [len(idx)])
    pruned.embed.load_state_dict(gated.embed.state_dict())
    pruned.out.load_state_dict(gated.out.state_dict())
    pruned.up.weight.copy_(gated.up.weight[rows])  # (H'*dh, D)
    pruned.up.bias.copy_(gated.up.bias[rows])  # (H'*dh,)
    pruned.down.weight.copy_(gated.down.weight[:, rows])  # (D, H'*dh)
    return pruned.eval()


def _one_layer(cfg: ModelConfig) -> None:
    if cfg.num_layers != 1:
        raise ValueError("model.num_layers must be 1 for architecture toy")


TOY = ModelFamily(
    name="toy",
    build=ToyLM,
    prune=prune_toy,
    per_head_params=lambda cfg: cfg.head_dim * (2 * cfg.hidden_dim + 1),
    layer_flops=lambda cfg, heads, batch: 4.0 * cfg.hidden_dim * heads * cfg.head_dim,
    validate=_one_layer,
    marker="^",
)
OPEN = torch.tensor([True, False, True, False])


@pytest.fixture
def toy():
    register(TOY)  # the one line that adds an architecture
    yield ModelConfig(architecture="toy", num_layers=1, hidden_dim=16, num_heads=4, seq_len=16, mem_len=0)
    unregister("toy")


@pytest.fixture(scope="module")
def corpus(wt2_cfg):
    return load_corpus(wt2_cfg, splits=("train", "test"))


def test_toy_family_through_model_dirs_prune_and_evaluate(toy, corpus, tmp_path, wt2_path, capsys):
    torch.manual_seed(0)
    gated = build_model(toy, len(corpus.vocab), GateConfig())
    assert isinstance(gated, ToyLM) and len(gated.gates) == 1
    gated.gates[0].set_open(OPEN)
    save_model_dir(gated, corpus.vocab, tmp_path / "gated", gates=GateConfig())
    loaded, _, meta = load_model_dir(tmp_path / "gated")
    assert isinstance(loaded, ToyLM) and meta["architecture"] == "toy"
    assert meta["params"] == count_params(gated) == count_params(gated, include_gates=True) - 4

    assert main(["prune", str(tmp_path / "gated"), "--out", str(tmp_path / "pruned")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["heads_per_layer"] == [2] and res["sparsity"] == pytest.approx(0.5)
    assert res["params_before"] - res["params_after"] == 2 * per_head_params(toy)

    pruned, _, _ = load_model_dir(tmp_path / "pruned")
    assert isinstance(pruned, ToyLM) and pruned.gates == [] and pruned.heads_per_layer == [2]
    x = torch.as_tensor(corpus.tokens("test")[:33].astype("int64")).view(1, 33)  # (1,33)
    with torch.no_grad():
        assert torch.allclose(pruned(x).log_probs, gated.eval()(x).log_probs, atol=1e-6)

    args = ["--split", "test", "--batch-size", "8", "--set", f"data.path={wt2_path}"]
    assert main(["evaluate", str(tmp_path / "pruned"), *args]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["tokens"] == len(corpus.tokens("test")) - 1 and ev["heads_per_layer"] == [2]
    assert ev["ppl"] == pytest.approx(evaluate(gated, corpus.tokens("test"), 8).ppl, rel=1e-5)


def test_toy_family_config_checks_flops_and_optimizer_groups(toy):
    assert family_names() == ["all_attention", "transformer_xl", "toy"]
    with pytest.raises(ConfigError, match=r"^--set: model: model.num_layers must be 1 for architecture toy$"):
        load_config(None, ["model.architecture=toy", "model.num_layers=2"])
    assert flops_per_token(toy, 100) == 4.0 * 16 * 16 + 2 * 16 * 100  # the family's layer + the softmax
    cfg = RunConfig(model=toy, gates=GateConfig(sparsity_target=0.5))
    lm = build_model(toy, 100, cfg.gates)
    groups = param_groups(TrainModule(lm, SparsityObjective(cfg.gates)), cfg, phase_spec(cfg, "prune"))
    gate_group = next(g for g in groups if g["name"] == "gates")["params"]
    assert [p.shape for p in gate_group] == [torch.Size([4]), torch.Size([2])]  # gate logits, then lambdas
    assert sum(p.numel() for g in groups for p in g["params"]) == count_params(lm, include_gates=True) + 2


def test_unknown_architecture_is_one_line_naming_the_registered_ones(tmp_path, corpus):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.architecture=nope"])
    assert str(e.value) == (
        "--set: model.architecture: unknown architecture 'nope'; registered: all_attention, transformer_xl"
    )
    with pytest.raises(ConfigError, match="registered: all_attention, transformer_xl$"):
        get_family("nope")
    # a model directory of an architecture this installation does not have
    save_model_dir(LanguageModel(ModelConfig(num_layers=1, hidden_dim=16), len(corpus.vocab)), corpus.vocab, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["architecture"] = "nope"
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        load_model_dir(tmp_path)
    assert str(e.value) == (
        f"{tmp_path / 'config.json'}: invalid model description "
        "(architecture: unknown architecture 'nope'; registered: all_attention, transformer_xl)"
    )


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register(ModelFamily("all_attention", ToyLM, prune_toy, lambda c: 0, lambda c, h, b: 0.0))
    assert get_family("all_attention").name == "all_attention"


@pytest.mark.parametrize("arch", ["all_attention", "transformer_xl"])
def test_gate_accessors_of_the_stack(arch):
    cfg = ModelConfig(architecture=arch, num_layers=2, hidden_dim=16, num_heads=4, num_persistent=4, ffn_dim=24)
    gated = LanguageModel(cfg, 50, GateConfig())
    names = set(gated.gate_parameters())
    assert names == {"layers.0.gate.log_alpha", "layers.1.gate.log_alpha"}
    assert set(gated.weight_state_dict()) == set(gated.state_dict()) - names
    assert set(gated.weight_state_dict()) == set(LanguageModel(cfg, 50).state_dict())
    assert prune_model(gated).gate_parameters() == {}
