"""`allatt-dist` command line: a thin layer that parses arguments and calls the library.

Every user error (`UserError`) is printed as one line on stderr with exit status 2; what the machine
refused during the run (a full disk, memory: `EnvironmentFailure`, `OSError`, `MemoryError`) as one
line with exit status 1; results are printed as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from allatt_dist.cliargs import add_override_arg, non_negative_float, parse_device, positive_int
from allatt_dist.errors import EnvironmentFailure, UserError
from allatt_dist.outputs import check_new_model_dir
from allatt_dist.remote import is_uri
from allatt_dist.rundir import RunDir, fetch_model_dir, open_experiment, open_model_out, open_out
from allatt_dist.runlock import check_not_in_use


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="recipe YAML (e.g. tune_configs/quickstart.yaml)")
    add_override_arg(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--verbose", action="store_true", help="show Ray's and DeepSpeed's own logs")


def _plan(a: argparse.Namespace, kind: str, search: bool):
    """The command's plan: the recipe read once, its output directory checked, nothing written yet."""
    from allatt_dist.crosschecks import search_conflict
    from allatt_dist.errors import ConfigError
    from allatt_dist.plan import make_plan
    from allatt_dist.recipe import load_config

    cfg = load_config(a.config, a.overrides)
    if search and cfg.tune is None:
        raise ConfigError(f"{a.config}: tune: section missing (see docs/search.md)")
    if search and (msg := search_conflict(cfg)):
        raise ConfigError(f"{a.config}: {msg}")
    out = open_out(a.out or str(Path(kind) / Path(a.config).stem))  # parsed once; a URI checked writable now
    progress = not getattr(a, "no_progress", False)
    return make_plan(cfg, out, verbose=a.verbose, progress=progress, force=getattr(a, "force", False))


def _connect(a: argparse.Namespace, plan, search: bool):
    """Connect to Ray and check, once, that the plan's workers (and trial drivers) can ever be placed; the
    plan with its token cache built (`data.build_workers: ray`: by Ray tasks, now that Ray is connected)."""
    from allatt_dist.cluster.capacity import check_fits, check_fits_with_drivers
    from allatt_dist.cluster.session import connect

    connect(a.address, a.verbose)
    if search:
        check_fits_with_drivers(plan.cfg.scaling, plan.cfg.tune)
    else:
        check_fits(plan.cfg.scaling)
    return plan.with_tokens()


def cmd_train(a: argparse.Namespace) -> dict:
    from allatt_dist.train.trainer import train

    plan = _plan(a, "runs", search=False)
    with plan.run.held():  # one writer per run directory, taken before Ray starts
        plan = _connect(a, plan, search=False)
        return train(plan, None if a.phase == "all" else [a.phase])


class _discarding:
    """Remove the local copy of a directory in object storage when the command ends."""

    def __init__(self, run: RunDir):
        self.run = run

    def __enter__(self) -> RunDir:
        return self.run

    def __exit__(self, kind, error, tb) -> None:
        if error is not None:
            self.run.name_as_given(error)  # an error names the bucket's path, not this local copy
        self.run.discard()


def cmd_prune(a: argparse.Namespace) -> dict:
    from allatt_dist.model.pruning import prune_model
    from allatt_dist.modelio import load_model_dir, save_model_dir

    if not is_uri(a.out):
        check_new_model_dir(Path(a.out), Path(a.checkpoint), a.force)
        check_not_in_use(Path(a.out))
    target = open_model_out(a.out, a.force)
    source, fetched = fetch_model_dir(a.checkpoint, "checkpoint")
    with _discarding(fetched or RunDir(source)), _discarding(target):
        gated, vocab, meta = load_model_dir(source)
        if not gated.gates:
            raise UserError(f"{a.checkpoint}: holds an ungated model (nothing to prune); give a prune-phase model")
        pruned = prune_model(gated)
        out = save_model_dir(pruned, vocab, target.root, extra={"phase": "prune", "pruned": True})
        target.publish()  # object storage: weights first, config.json last
    return {
        "out": str(a.out),
        "heads_per_layer": out["heads_per_layer"],
        "sparsity": out["sparsity"],
        "params_before": meta["params"],
        "params_after": out["params"],
    }


def cmd_evaluate(a: argparse.Namespace) -> dict:
    from allatt_dist.data.corpus import load_corpus
    from allatt_dist.data.tokenizer import for_model
    from allatt_dist.errors import CheckpointError
    from allatt_dist.evaluate import evaluate
    from allatt_dist.modelio import load_model_dir
    from allatt_dist.recipe import data_config

    device = parse_device(a.device, allow_auto=True)
    source, fetched = fetch_model_dir(a.model_dir, "model_dir")
    with _discarding(fetched or RunDir(source)):
        model, vocab, meta = load_model_dir(source, device)
    data = data_config({}, a.overrides, "--set")
    with for_model(data, vocab) as data:  # a subword model's own tokenizer reads the corpus
        corpus = load_corpus(data, splits=(a.split,))
    if corpus.vocab.fingerprint() != vocab.fingerprint():
        raise CheckpointError(
            f"{a.model_dir}: its vocabulary ({len(vocab)} types, {vocab.kind}) is not the one of the corpus "
            f"{corpus.origin} ({len(corpus.vocab)} types, {corpus.vocab.kind})"
        )
    res = evaluate(model, corpus.tokens(a.split), a.batch_size, progress=sys.stderr.isatty())
    return {
        "split": a.split,
        "ppl": res.ppl,
        "tokens": res.tokens,
        "params": meta["params"],
        "heads_per_layer": meta["heads_per_layer"],
    }


def cmd_tune(a: argparse.Namespace) -> list:
    from allatt_dist.search.tune import tune_search

    if a.dense and is_uri(a.dense):
        raise UserError(f"--dense {a.dense}: give a local folder (with --out in a bucket, OUT/dense/model is used)")
    plan = _plan(a, "experiments", search=True)
    with plan.run.held():
        plan = _connect(a, plan, search=True)
        return tune_search(plan, Path(a.dense) if a.dense else None)


def cmd_rank(a: argparse.Namespace) -> dict:
    from allatt_dist.search.rank import rank

    if a.address:
        from allatt_dist.cluster.session import connect

        connect(a.address)
    exp = open_experiment(a.experiment)
    with exp.held():
        return rank(
            exp.root,
            a.budget,
            progress=sys.stderr.isatty(),
            data_overrides=a.overrides,
            store=exp,
            latency_budget=a.latency_budget,
        )


def cmd_run(a: argparse.Namespace) -> dict:
    from allatt_dist.search.pipeline import run_pipeline

    plan = _plan(a, "experiments", search=True)
    with plan.run.held():
        plan = _connect(a, plan, search=True)
        return run_pipeline(plan, a.budget)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (which argument, what is allowed), exit status 2;
    sub-command parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="allatt-dist", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train dense -> prune -> finetune on Ray Train + DeepSpeed")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="run directory (default runs/<config name>)")
    p.add_argument("--phase", choices=["all", "dense", "prune", "finetune"], default="all")
    p.add_argument("--force", action="store_true", help="reuse a run directory that holds another config's run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("run", help="the whole pipeline: dense -> Ray Tune search -> rank (resumable)")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="experiment directory (default experiments/<config name>)")
    p.add_argument(
        "--budget", type=positive_int, default=None, help="also report the best model under this many params"
    )
    p.add_argument("--force", action="store_true", help="reuse a directory that holds another config's run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("tune", help="Ray Tune search over gate temperature / sparsity targets (prune phase)")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="experiment directory (default experiments/<config name>)")
    p.add_argument("--dense", default=None, help="dense model dir to start from (default OUT/dense/model)")
    p.set_defaults(fn=cmd_tune)
    _add_model_commands(sub)
    from allatt_dist.cluster.commands import register as register_cluster_commands

    register_cluster_commands(sub)
    from allatt_dist.bench import register as register_bench

    register_bench(sub)
    from allatt_dist.infer import register as register_infer

    register_infer(sub)
    return ap


def _add_model_commands(sub) -> None:
    """rank, prune, evaluate: the commands that read trained models."""
    p = sub.add_parser("rank", help="prune, evaluate and rank the finished trials of an experiment")
    p.add_argument("experiment", help="experiment directory")
    p.add_argument(
        "--budget", type=positive_int, default=None, help="also report the best model under this many params"
    )
    p.add_argument(
        "--latency-budget",
        type=non_negative_float,
        default=None,
        metavar="MS",
        help="also report the best model under MS ms",
    )
    add_override_arg(p, "data options over the experiment's run.yaml, e.g. data.path=DIR", "data.KEY=VALUE")
    p.add_argument("--address", default=None, help="Ray cluster to score on (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(fn=cmd_rank)

    p = sub.add_parser("prune", help="physically remove closed heads from a gated model")
    p.add_argument("checkpoint", help="gated model directory (e.g. RUN/prune/model)")
    p.add_argument("--out", required=True, help="output model directory (a new path)")
    p.add_argument("--force", action="store_true", help="replace a model directory already at --out")
    p.set_defaults(fn=cmd_prune)

    p = sub.add_parser("evaluate", help="perplexity of a model directory over a whole split")
    p.add_argument("model_dir")
    p.add_argument("--split", choices=["train", "valid", "test"], default="test")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when there is one, else cpu)")
    add_override_arg(p, "data options, e.g. data.path=DIR", "data.KEY=VALUE")
    p.set_defaults(fn=cmd_evaluate)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; what follows the first `--` is kept verbatim in `extra` (submit's pass-through).

    argparse alone would fill a trailing `nargs="*"` positional right after CONFIG and then refuse a `--`
    that comes after other options, so the split is done here, before parsing.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["submit", "serve"]:  # `serve` as a Ray Job: serve's options, not a recipe's
        from allatt_dist.cluster.serve_job import parse

        return parse(argv[2:])
    tail = None
    if "--" in argv:
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if tail is not None:
        if not hasattr(args, "extra"):
            parser.error(f"{args.command} takes no arguments after '--' (only submit passes them on)")
        args.extra = tail
    return args


def _environment_failure(e: BaseException) -> str | None:
    """One line for what the machine refused (memory, a path), None for anything else."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in first.lower() or "allocate memory" in first.lower())
    ):
        return (
            f"out of memory ({first}); use a smaller batch or model (train/tune/run: --set train.batch_size=N; "
            "evaluate: --batch-size; bench: --batch-size / --eval-batch-size)"
        )
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or first}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not getattr(args, "verbose", False):
        warnings.filterwarnings("ignore")
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    try:
        out = args.fn(args)
    except UserError as e:
        print(f"allatt-dist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"allatt-dist {args.command}: interrupted", file=sys.stderr)
        return 130
    except EnvironmentFailure as e:
        if getattr(args, "verbose", False):
            raise
        print(f"allatt-dist {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError, OSError) as e:
        msg = _environment_failure(e)
        if msg is None or getattr(args, "verbose", False):
            raise  # a bug, or --verbose: the whole traceback
        print(f"allatt-dist {args.command}: error: {msg}", file=sys.stderr)
        return 1
    if out is not None:
        print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
