"""`export --format hf`: a folder that Hugging Face Transformers loads with `trust_remote_code=True`.

What it holds: `config.json` (the model's switches, `auto_map` naming the two code files),
`configuration_allatt.py` and `modeling_allatt.py` (this project's own inference code, copied from
`hf_files/`: transformers 5 has no model whose layers keep different numbers of heads), the weights
under their names here (`model.safetensors`), the tokenizer (`tokenizer.json`, a PreTrainedTokenizerFast: a
word-level one over the model's vocabulary, unknown words to `<unk>`; or the model's own subword tokenizer;
either way line breaks to `<eos>` and an `<eos>` before the text, as `generate` reads a prompt), and a model
card (`README.md`). Built in a temporary sibling folder and swapped in whole (allatt_dist/atomic.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from allatt_dist.atomic import replace_dir
from allatt_dist.errors import UserError
from allatt_dist.remote import is_uri

FILES = Path(__file__).parent / "hf_files"
CODE = ("configuration_allatt.py", "modeling_allatt.py")


def check_out(out: str, force: bool) -> None:
    """OUT must be a new or empty local folder (or any folder with --force); one line otherwise."""
    if is_uri(out):
        raise UserError(f"{out}: export writes a local folder; copy it to the bucket afterwards")
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UserError(f"{out}: is a file; give a folder")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise UserError(f"{out}: not empty; give a new or empty folder, or --force to replace it")


def hf_config(model, vocab_size: int) -> dict:
    """config.json: the stack's switches under the names configuration_allatt.AllAttConfig declares."""
    from allatt_dist.model.output import resolve_cutoffs
    from allatt_dist.model.stack import stack_layout

    cfg = model.cfg
    try:
        layout = stack_layout(cfg)
    except ValueError as e:
        raise UserError(f"export --format hf: {e}") from None
    return {
        "model_type": "allatt",
        "architectures": ["AllAttForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_allatt.AllAttConfig",
            "AutoModelForCausalLM": "modeling_allatt.AllAttForCausalLM",
        },
        "vocab_size": vocab_size,
        "hidden_dim": cfg.hidden_dim,
        "head_dim": cfg.head_dim,
        "heads_per_layer": list(model.heads_per_layer),
        "num_persistent": layout.num_persistent,
        "ffn_dim": layout.ffn_dim,
        "seq_len": cfg.seq_len,
        "mem_len": cfg.mem_len,
        "same_length": cfg.same_length,
        "adaptive_cutoffs": resolve_cutoffs(cfg.adaptive_cutoffs, vocab_size) or None,
        "adaptive_div": cfg.adaptive_div,
        "adaptive_proj": bool(cfg.adaptive_proj),
        "final_norm": cfg.final_norm,
        "persistent_content_bias": cfg.persistent_content_bias,
        "zero_memory_start": cfg.zero_memory_start,
        "positions": cfg.positions,
        "position_rows": cfg.position_rows,
        "attn_out_bias": cfg.attn_out_bias,
        "dtype": "float32",
    }


def save_tokenizer(vocab, out: Path) -> None:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if vocab.tokenizer is not None:
        tok = _subword_tokenizer(vocab)
    else:
        tok = Tokenizer(WordLevel(vocab=dict(vocab.stoi), unk_token=vocab.UNK))
        tok.normalizer = normalizers.Replace("\n", f" {vocab.EOS} ")
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{vocab.EOS} $A", special_tokens=[(vocab.EOS, vocab.eos_id)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=vocab.UNK, eos_token=vocab.EOS)
    fast.save_pretrained(str(out))


def _subword_tokenizer(vocab):
    """A copy of the model's subword tokenizer that reads text as `generate` does: each line on its own, an `<eos>`
    between lines. A line break is normalized to `<eos>`, which is then matched as the (normalized) special token,
    so the text of each line is encoded exactly as the model's tokenizer encodes that line."""
    from tokenizers import AddedToken, Tokenizer, normalizers

    tok = Tokenizer.from_str(vocab.tokenizer.to_str())
    tok.add_special_tokens([AddedToken(vocab.EOS, special=True, normalized=True)])
    eol = normalizers.Replace("\n", vocab.EOS)
    tok.normalizer = eol if tok.normalizer is None else normalizers.Sequence([tok.normalizer, eol])
    return tok


def model_card(got, meta: dict) -> str:
    row = got.row or {}
    lines = [
        f"# {got.name}",
        "",
        f"A language model ({meta['architecture']}) from allatt-dist (head pruning with Hard Concrete gates), "
        f"{meta['params']:,} parameters, heads per layer {meta['heads_per_layer']} "
        f"(sparsity {meta['sparsity']:.3f}). Exported from `{got.source}`.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)',
        'ids = tok("the meaning of", return_tensors="pt").input_ids',
        "print(tok.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))",
        "```",
        "",
        "`logits` are log-probabilities; a line break reads as `<eos>`"
        + ("; words outside the vocabulary as `<unk>`." if got.vocab.tokenizer is None else " (a subword tokenizer)."),
        "",
        "## Leaderboard row",
        "",
    ]
    if row:
        lines += ["| field | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in row.items()]
    else:
        lines.append("Exported from a model directory, not picked from a leaderboard.")
    recipe = yaml.safe_load(got.recipe) if got.recipe else None
    data = (recipe or {}).get("data") or {}
    kind = "words" if got.vocab.tokenizer is None else "subword tokens"
    lines += [
        "",
        "## Data",
        "",
        f"Vocabulary: {meta['vocab_size']:,} {kind} (fingerprint {meta['vocab_fingerprint']}).",
    ]
    if data:
        lines += ["", "```yaml", yaml.safe_dump({"data": data}, sort_keys=False).strip(), "```"]
    lines += ["", "## Recipe", ""]
    if got.recipe:
        lines += ["```yaml", got.recipe.strip(), "```"]
    else:
        lines += ["```json", json.dumps({"model": meta["model"], "gates": meta.get("gates")}, indent=2), "```"]
    return "\n".join(lines) + "\n"


def export_hf(got, out: str, force: bool) -> dict:
    """Write `got` (source.Loaded) as a Transformers folder at `out`; returns a summary."""
    from safetensors.torch import save_file

    from allatt_dist.modelio import model_meta

    meta = model_meta(got.model, got.vocab, None)
    config = hf_config(got.model, len(got.vocab))
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in got.model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in CODE:
            shutil.copyfile(FILES / name, tmp / name)
        save_tokenizer(got.vocab, tmp)
        (tmp / "README.md").write_text(model_card(got, meta))
        replace_dir(tmp, target)  # an existing (empty, or --force) folder is swapped out in one step
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(target), "model": got.name, "params": meta["params"], "heads_per_layer": meta["heads_per_layer"]}
