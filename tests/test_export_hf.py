"""`export --format hf`: Transformers loads the folder offline and computes what we compute."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest
import torch

from allatt_dist.cli import main
from allatt_dist.config import ModelConfig
from allatt_dist.data.vocab import Vocab
from allatt_dist.infer import text
from allatt_dist.infer.decode import Sampling, generate
from allatt_dist.model.registry import build_model
from allatt_dist.modelio import save_model_dir

# Before transformers is imported: the code it copies out of an exported folder, and anything it caches,
# go to a temp folder (never ~/.cache), and nothing is looked up online.
if "transformers" not in __import__("sys").modules:
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="allatt-hf-")
    __import__("atexit").register(shutil.rmtree, os.environ["HF_HOME"], True)
os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

HEADS = [3, 0, 1]  # uneven heads per layer, one layer emptied
MODELS = {
    "all_attention": dict(num_layers=3, hidden_dim=16, num_heads=4, num_persistent=4, seq_len=6, mem_len=5),
    "authors_adaptive": dict(
        num_layers=3,
        hidden_dim=16,
        num_heads=4,
        num_persistent=4,
        seq_len=6,
        mem_len=5,
        variant="authors",
        adaptive_cutoffs=[10, 30],
        same_length=False,
    ),
    "transformer_xl": dict(
        architecture="transformer_xl", num_layers=3, hidden_dim=16, num_heads=4, ffn_dim=24, seq_len=6, mem_len=5
    ),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each variant pruned to uneven heads, saved as a model directory and exported."""
    root = tmp_path_factory.mktemp("hf")
    vocab = Vocab(["<eos>", "<unk>", *[f"w{i}" for i in range(48)]])
    out = {}
    for name, kwargs in MODELS.items():
        torch.manual_seed(0)
        model = build_model(ModelConfig(**kwargs), len(vocab), None, HEADS)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        save_model_dir(model.eval(), vocab, root / name)
        assert main(["export", str(root / name), str(root / f"{name}-hf")]) == 0
        out[name] = (model, vocab, root / f"{name}-hf")
    return out


def _load(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_computes_our_log_probs_over_two_segments_and_generates_our_greedy_text(exported, name):
    ours, vocab, path = exported[name]
    theirs, tok = _load(path)
    x = torch.randint(0, len(vocab), (2, 2 * ours.cfg.seq_len), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        seg = ours.cfg.seq_len
        a = ours(x[:, :seg])
        b = ours(x[:, seg:], a.mems)
        h1 = theirs(x[:, :seg], use_cache=True)
        h2 = theirs(x[:, seg:], mems=h1.mems)
        torch.testing.assert_close(h1.logits, a.log_probs, atol=1e-5, rtol=0)
        torch.testing.assert_close(h2.logits, b.log_probs, atol=1e-5, rtol=0)  # memory carried across segments
    prompt = "w1 w7 zebra\nw3"
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == text.prompt_ids(vocab, prompt)  # the tokenizer reads text as we do
    mine = generate(ours, ids[0].tolist(), Sampling(12, temperature=0.0)).ids
    with torch.no_grad():
        got = theirs.generate(ids, max_new_tokens=12, do_sample=False)
    assert got[0, ids.shape[1] :].tolist() == mine
    assert tok.decode(mine) == " ".join(vocab.decode(mine))


def test_export_card_and_refusals(exported, tmp_path, capsys):
    _, _, path = exported["all_attention"]
    card = (path / "README.md").read_text()
    assert "heads per layer [3, 0, 1]" in card and "## Recipe" in card
    assert json.loads((path / "config.json").read_text())["heads_per_layer"] == HEADS
    source = path.parent / "all_attention"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    assert main(["export", str(source), str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty; give a new or empty folder, or --force" in err
    assert (tmp_path / "full" / "mine.txt").read_text() == "x"  # nothing written
    assert main(["export", str(source), str(tmp_path / "full"), "--force"]) == 0
    assert not (tmp_path / "full" / "mine.txt").exists() and (tmp_path / "full" / "modeling_allatt.py").is_file()


def test_a_subword_model_exports_with_its_tokenizer(tmp_path, wt2_path):
    """A model with a byte-level BPE tokenizer (data.tokenizer bpe): transformers' tokenizer of the exported folder
    gives our ids for multi-line, non-ASCII text, and the model our log-probabilities and greedy continuation."""
    from allatt_dist.data.corpus import read_lines
    from allatt_dist.data.tokenizer import train_bpe

    vocab = Vocab.from_tokenizer(train_bpe(read_lines(wt2_path / "train.txt")[:3000], 400))
    torch.manual_seed(0)
    cfg = ModelConfig(**MODELS["all_attention"])
    model = build_model(cfg, len(vocab), None, HEADS).eval()
    save_model_dir(model, vocab, tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "hf")]) == 0
    theirs, tok = _load(tmp_path / "hf")
    prompt = "The naïve café, 1896 —\n 東京 and zebras\n\nthe end"
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == text.prompt_ids(vocab, prompt) and vocab.unk_id not in ids[0].tolist()
    x = ids[:, : cfg.seq_len]
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x).log_probs, atol=1e-5, rtol=0)
        got = theirs.generate(ids, max_new_tokens=8, do_sample=False)
    mine = generate(model, ids[0].tolist(), Sampling(8, temperature=0.0)).ids
    assert got[0, ids.shape[1] :].tolist() == mine
    assert "subword tokens" in (tmp_path / "hf" / "README.md").read_text()
