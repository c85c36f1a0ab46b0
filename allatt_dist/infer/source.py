"""Which model a user means: a model directory, or a ranked experiment and a pick from its leaderboard.

`MODEL` is a model directory (config.json + model.safetensors + vocab.txt) or an experiment that
`rank` has written leaderboard.json into; either may be local or in object storage (s3://, gs://).
From an experiment, `--name` picks that row, `--budget PARAMS` the best test perplexity with at most
that many parameters, `--latency-budget MS` the best whose measured segment latency fits, and
neither the best test perplexity overall. Only rows kept under models/ (the Pareto front and each
target's best) can be picked.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from allatt_dist.errors import UserError
from allatt_dist.remote import is_uri


@dataclass(frozen=True)
class Pick:
    budget: int | None = None  # parameters
    name: str | None = None
    latency_ms: float | None = None  # the leaderboard's latency_ms column


@dataclass
class Loaded:
    name: str  # the leaderboard row's name, or the model directory's folder name
    model: object  # FamilyModel, eval mode, ungated (a gated model is pruned on load: same function)
    vocab: object  # Vocab
    meta: dict  # the model directory's config.json
    row: dict | None  # the leaderboard row when picked from an experiment
    source: str  # where it was read from (as the user named it)
    recipe: str | None = None  # the experiment's run.yaml, when picked from one


def choose(rows: list[dict], pick: Pick, where: str) -> dict:
    """The leaderboard row `pick` names among the rows kept under models/; one line when none fits."""
    kept = [r for r in rows if r.get("model_dir") and r.get("test_ppl") is not None]
    if not kept:
        raise UserError(f"{where}: the leaderboard keeps no model (run `allatt-dist rank` first)")
    if pick.name is not None:
        hit = [r for r in rows if r["name"] == pick.name]
        if not hit:
            raise UserError(f"--name {pick.name}: not in {where}'s leaderboard; kept: {', '.join(_names(kept))}")
        if not hit[0].get("model_dir"):
            raise UserError(f"--name {pick.name}: not kept under models/; kept: {', '.join(_names(kept))}")
        return hit[0]
    fits = sorted(kept, key=lambda r: r["test_ppl"])
    if pick.budget is not None:
        smallest = min(kept, key=lambda r: r["params"])
        fits = [r for r in fits if r["params"] <= pick.budget]
        if not fits:
            raise UserError(
                f"--budget {pick.budget}: no kept model has at most {pick.budget:,} parameters; "
                f"the smallest is {smallest['name']} with {smallest['params']:,}"
            )
    if pick.latency_ms is not None:
        timed = [r for r in kept if r.get("latency_ms") is not None]
        if not timed:
            raise UserError(f"--latency-budget: {where}'s leaderboard has no latency column (rank it again)")
        fastest = min(timed, key=lambda r: r["latency_ms"])
        fits = [r for r in fits if r.get("latency_ms") is not None and r["latency_ms"] <= pick.latency_ms]
        if not fits:
            raise UserError(
                f"--latency-budget {pick.latency_ms:g}: no kept model runs a segment in at most "
                f"{pick.latency_ms:g} ms; the fastest is {fastest['name']} with {fastest['latency_ms']:.3g} ms"
            )
    return fits[0]


def _names(rows: list[dict]) -> list[str]:
    return [r["name"] for r in rows]


def read_leaderboard(path: Path, where: str) -> list[dict]:
    try:
        rows = json.loads(path.read_text())["models"]
        assert isinstance(rows, list)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"{where}: leaderboard.json is damaged; run `allatt-dist rank` again") from None
    return rows


def _open(text: str):
    """(local root, RunDir or None): a URI's config.json and leaderboard.json downloaded first."""
    from allatt_dist.remote import check_readable, parse_remote
    from allatt_dist.rundir import RunDir
    from allatt_dist.storage import mirror_root

    if not is_uri(text):
        return Path(text), None
    remote = parse_remote(text, "MODEL")
    check_readable(remote, "model or experiment", "MODEL")
    mirror = RunDir(mirror_root("model"), remote)
    mirror.fetch(mirror.root / "config.json")
    mirror.fetch(mirror.root / "leaderboard.json")
    return mirror.root, mirror


def _kind(root: Path, text: str, pick: Pick) -> bool:
    """True for a model directory, False for a ranked experiment; one line for anything else."""
    picking = pick != Pick()
    if (root / "config.json").is_file() and not picking:
        return True
    if (root / "leaderboard.json").is_file():
        return False
    if picking:
        raise UserError(f"{text}: not a ranked experiment (no leaderboard.json) to pick a model from")
    raise UserError(f"{text}: not a model directory (no config.json) nor a ranked experiment (no leaderboard.json)")


def leaderboard_of(text: str, pick: Pick) -> tuple[list[dict] | None, str]:
    """(the experiment's leaderboard rows, text), or (None, text) for a model directory."""
    root, mirror = _open(text)
    try:
        return (None if _kind(root, text, pick) else read_leaderboard(root / "leaderboard.json", text)), text
    finally:
        if mirror is not None:
            mirror.discard()


@contextmanager
def located(text: str, pick: Pick):
    """(model directory path, leaderboard row or None), downloaded first when `text` is a URI; the
    download is removed on exit."""
    root, mirror = _open(text)
    try:
        if _kind(root, text, pick):
            if mirror is not None:
                mirror.fetch()
            yield root, None
            return
        row = choose(read_leaderboard(root / "leaderboard.json", text), pick, text)
        if mirror is not None:
            mirror.fetch(root / row["model_dir"])
            mirror.fetch(root / "run.yaml")
        recipe = root / "run.yaml"
        yield root / row["model_dir"], dict(row, recipe=recipe.read_text() if recipe.is_file() else None)
    finally:
        if mirror is not None:
            mirror.discard()


def load(text: str, pick: Pick = Pick(), device: str = "cpu") -> Loaded:
    """The model `text` and `pick` name, loaded (and pruned when gated: the same function, fewer heads)."""
    from allatt_dist.model.pruning import prune_model
    from allatt_dist.modelio import load_model_dir

    with located(text, pick) as (path, row):
        model, vocab, meta = load_model_dir(path, device)
    if model.gates:
        model = prune_model(model).to(device).eval()
    recipe = row.pop("recipe", None) if row else None
    name = row["name"] if row else Path(text.rstrip("/")).name
    return Loaded(name, model, vocab, meta, row, text, recipe)
