"""The sub-commands `generate`, `export` and `serve` (registered by cli.py)."""

from __future__ import annotations

import argparse

from allatt_dist.cliargs import non_negative_float, non_negative_int, parse_device, positive_int, probability
from allatt_dist.errors import UserError
from allatt_dist.infer.args import add_pick_args, pick_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a model (a folder, a bucket or a leaderboard pick)")
    p.add_argument("model", help="model directory, or a ranked experiment (local or s3://)")
    add_pick_args(p)
    p.add_argument("--prompt", default="", help="text to continue (words outside the vocabulary read as <unk>)")
    p.add_argument("--max-new-tokens", type=positive_int, default=30)
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="0: greedy (default 1)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="keep the K likeliest words (0: all)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus: the likeliest words of mass P")
    p.add_argument("--seed", type=non_negative_int, default=None, help="sampling seed (default: a fresh one)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("export", help="write a model as a Hugging Face Transformers folder (trust_remote_code)")
    p.add_argument("model", help="model directory, or a ranked experiment (local or s3://)")
    p.add_argument("out", help="output folder (new or empty)")
    p.add_argument("--format", choices=["hf"], default="hf", help="hf: Transformers AutoModelForCausalLM")
    add_pick_args(p)
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(fn=cmd_export)

    from allatt_dist.infer.serve_cli import register_serve

    register_serve(sub)


def cmd_generate(a: argparse.Namespace) -> dict:
    from allatt_dist.infer import text
    from allatt_dist.infer.decode import Sampling, generate
    from allatt_dist.infer.source import load

    if not text.has_words(a.prompt):
        raise UserError("--prompt: give some words to continue")
    s = Sampling(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed)
    got = load(a.model, pick_of(a), parse_device(a.device))
    ids = text.prompt_ids(got.vocab, a.prompt)
    out = generate(got.model, ids, s)
    return {
        "model": got.name,
        "prompt": text.words(got.vocab, ids[1:]),  # as the model sees it (<unk> for unknown words)
        "text": text.words(got.vocab, out.ids),
        "tokens": len(out.ids),
        "seed": out.seed,
    }


def cmd_export(a: argparse.Namespace) -> dict:
    from allatt_dist.infer.hf import check_out, export_hf
    from allatt_dist.infer.source import load

    check_out(a.out, a.force)
    got = load(a.model, pick_of(a))
    return export_hf(got, a.out, a.force)
