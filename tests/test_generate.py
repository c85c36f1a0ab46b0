"""`generate`: incremental decoding equals a full forward pass, seeded sampling, leaderboard picks, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from allatt_dist.cli import main
from allatt_dist.config import ModelConfig
from allatt_dist.data.vocab import Vocab
from allatt_dist.infer import text
from allatt_dist.infer.decode import Decoder, Sampling, generate, generate_batch, score_batch
from allatt_dist.model.registry import build_model
from allatt_dist.modelio import save_model_dir

BASE = dict(num_layers=3, hidden_dim=16, num_heads=4, num_persistent=4, ffn_dim=24, seq_len=8, mem_len=8)
VARIANTS = {
    "all_attention": dict(BASE),
    "authors": dict(BASE, variant="authors"),  # zero memory start, learned positions, output bias
    "transformer_xl": dict(BASE, architecture="transformer_xl"),
    "adaptive_no_same_length": dict(BASE, adaptive_cutoffs=[10, 30], same_length=False),
    "no_memory": dict(BASE, mem_len=0),
}
PRUNED = [3, 0, 1]  # uneven heads, one layer emptied


def _model(kwargs: dict, heads: list[int] | None = None, vocab: int = 50):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**kwargs), vocab, None, heads)
    with torch.no_grad():
        for p in model.parameters():  # every parameter non-trivial (biases and empty-layer biases included)
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _check_equal_to_full_forward(model, prompt_len: int, new: int) -> None:
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.vocab_size, (prompt_len,), generator=g).tolist()
    out = generate(model, prompt, Sampling(new, temperature=0.0), keep_log_probs=True)
    seq = torch.tensor([prompt + out.ids[:-1]])  # (1,P+N-1)
    with torch.no_grad():
        full = model(seq).log_probs[0]  # (P+N-1,V)
    steps = torch.stack(out.log_probs)  # (N,V): the next-token distribution before each new token
    torch.testing.assert_close(steps, full[prompt_len - 1 :], atol=1e-5, rtol=0)
    assert out.ids == [int(x) for x in steps.argmax(-1)]  # greedy = argmax of what was computed
    prefill = Decoder(model).feed(torch.tensor([prompt]))[0]  # (P,V)
    torch.testing.assert_close(prefill, full[:prompt_len], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
def test_incremental_decoding_equals_a_full_forward(name, pruned):
    kwargs = VARIANTS[name]
    model = _model(kwargs, PRUNED if pruned else None)
    _check_equal_to_full_forward(model, 4, 4)  # within one segment
    if not model.cfg.zero_memory_start:  # a full pass without memory sees what the window holds
        _check_equal_to_full_forward(model, 5, model.cfg.seq_len + model.cfg.mem_len - 5)
    out = generate(model, [1, 2, 3], Sampling(3 * (model.cfg.seq_len + model.cfg.mem_len), temperature=0.0))
    assert len(out.ids) == 3 * (model.cfg.seq_len + model.cfg.mem_len)  # past the window: it slides


def test_a_long_prompt_is_read_in_segments_with_memory():
    model = _model(VARIANTS["authors"])  # learned positions: a prompt past the table is fed in segments
    prompt = list(range(1, 40))
    out = generate(model, prompt, Sampling(5, temperature=0.0))
    assert len(out.ids) == 5


def test_seeded_sampling_is_reproducible_and_batched_rows_keep_their_settings():
    model = _model(VARIANTS["all_attention"], PRUNED)
    s = Sampling(12, temperature=1.3, top_k=20, top_p=0.9, seed=7)
    a, b = generate(model, [4, 5, 6], s), generate(model, [4, 5, 6], s)
    assert a.ids == b.ids and a.seed == 7
    assert generate(model, [4, 5, 6], Sampling(12, temperature=1.3, seed=8)).ids != a.ids
    greedy = generate(model, [4, 5, 6], Sampling(12, temperature=0.0)).ids
    assert generate(model, [4, 5, 6], Sampling(12, top_k=1, seed=3)).ids == greedy
    assert generate(model, [4, 5, 6], Sampling(12, top_p=1e-6, seed=3)).ids == greedy
    batch = generate_batch(model, [[4, 5, 6], [9, 9, 9]], [s, Sampling(5, temperature=0.0)])
    assert batch[0].ids == a.ids and len(batch[1].ids) == 5
    assert batch[1].ids == generate(model, [9, 9, 9], Sampling(5, temperature=0.0)).ids
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(top_p=0.0).check()


def test_scoring_matches_the_models_nll_with_padding_and_memory():
    model = _model(VARIANTS["all_attention"])
    long, short = list(range(1, 30)), [3, 4, 5, 6]
    (nll_long, n_long), (nll_short, n_short) = score_batch(model, [long, short])
    assert (n_long, n_short) == (28, 3)
    alone = score_batch(model, [short])[0]
    assert nll_short == pytest.approx(alone[0], abs=1e-4)
    with torch.no_grad():
        one = model(torch.tensor([short[:-1]]), None, torch.tensor([short[1:]])).nll.sum()
    assert nll_short == pytest.approx(float(one), abs=1e-4)


def test_text_goes_through_the_models_vocabulary():
    vocab = Vocab(["<eos>", "the", "cat", "<unk>"])
    ids = text.prompt_ids(vocab, "the dog\ncat")
    assert ids == [0, 1, 3, 0, 2]
    assert text.words(vocab, ids[1:]) == "the <unk>\ncat"
    assert text.text_ids(vocab, "the cat") == [0, 1, 2, 0]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A dense and a pruned model directory, and an experiment whose leaderboard keeps both."""
    root = tmp_path_factory.mktemp("gen")
    vocab = Vocab(["<eos>", "<unk>", *[f"w{i}" for i in range(48)]])
    exp = root / "exp"
    rows = []
    for name, heads, ppl in (("dense", None, 100.0), ("prune/t50/0", PRUNED, 120.0)):
        meta = save_model_dir(_model(VARIANTS["all_attention"], heads), vocab, exp / "models" / name)
        rows.append({"name": name, "params": meta["params"], "test_ppl": ppl, "model_dir": f"models/{name}"})
    (exp / "leaderboard.json").write_text(json.dumps({"models": rows}))
    return exp, rows


def _run(capsys, *args):
    code = main([*args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_generate_command_on_a_pruned_model_and_leaderboard_picks(model_dirs, capsys):
    exp, rows = model_dirs
    code, res, err = _run(capsys, "generate", str(exp / "models/prune/t50/0"), "--prompt", "w1 zebra w2", "--seed", "3")
    assert code == 0, err
    assert res["prompt"] == "w1 <unk> w2" and res["tokens"] == 30 and res["seed"] == 3
    again = _run(
        capsys, "generate", str(exp), "--budget", str(rows[1]["params"]), "--prompt", "w1 zebra w2", "--seed", "3"
    )
    assert again[1]["model"] == "prune/t50/0" and again[1]["text"] == res["text"]
    assert _run(capsys, "generate", str(exp), "--prompt", "w1")[1]["model"] == "dense"  # best perplexity
    assert _run(capsys, "generate", str(exp), "--name", "prune/t50/0", "--prompt", "w1")[1]["model"] == "prune/t50/0"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{exp}/models", "--prompt", "w1"], "not a model directory (no config.json) nor a ranked experiment"),
        (["{exp}", "--budget", "10", "--prompt", "w1"], "no kept model has at most 10 parameters; the smallest is"),
        (["{exp}", "--name", "nope", "--prompt", "w1"], "--name nope: not in"),
        (["{exp}", "--prompt", "  "], "--prompt: give some words"),
        (["{exp}", "--prompt", "w1", "--top-p", "0"], "argument --top-p: expected a number in (0, 1]"),
    ],
)
def test_generate_bad_input_is_one_line(model_dirs, capsys, args, needle):
    exp, _ = model_dirs
    with pytest.raises(SystemExit) if "argument" in needle else _nothing():
        code, _, err = _run(capsys, "generate", *[a.format(exp=exp) for a in args])
        assert code == 2 and err.count("\n") == 1 and needle in err, err
    if "argument" in needle:
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_generate_reads_an_experiment_in_a_bucket(model_dirs, capsys, monkeypatch):
    from s3server import S3Server

    exp, rows = model_dirs
    args = ["--budget", str(rows[1]["params"]), "--prompt", "w1 w2", "--seed", "4", "--max-new-tokens", "6"]
    local = _run(capsys, "generate", str(exp), *args)[1]
    with S3Server() as s3:
        s3.make_bucket("runs")
        client = s3.client()
        for f in exp.rglob("*"):
            if f.is_file():
                client.upload_file(str(f), "runs", f"exp/{f.relative_to(exp).as_posix()}")
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        code, res, err = _run(capsys, "generate", "s3://runs/exp", *args)
        assert code == 0, err
        assert res["model"] == "prune/t50/0" and res["text"] == local["text"]
        model = _run(capsys, "generate", "s3://runs/exp/models/dense", "--prompt", "w1", "--max-new-tokens", "2")
        assert model[0] == 0 and model[1]["tokens"] == 2
