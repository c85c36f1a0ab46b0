"""`allatt-dist rank EXPERIMENT_DIR`: prune every finished trial for real, score it, rank them.

For each finished trial: load its final gated model, cut the closed heads out, evaluate test
perplexity over the whole test split (memory carried), count parameters from the pruned tensors.
The dense model is a reference row. Each scored model is also timed on the device the ranking scores on
(a segment at the eval batch size, generation tokens/s at batch 1: infer/latency.py). Writes
leaderboard.{json,csv,md}, pareto.png, pareto_latency.png (perplexity against latency), and
models/<name>/ for every model on the perplexity/parameter Pareto front. Trials that were stopped
by the scheduler or failed are listed with their status, never dropped. A finished trial whose model is
missing or damaged is listed as "not scored" (`problem` says why, one warning line each), the others are
ranked, a model published by an earlier ranking for it stays, and the command exits non-zero.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path

from allatt_dist import atomic
from allatt_dist.cluster.session import connect
from allatt_dist.config import ModelConfig
from allatt_dist.errors import UserError
from allatt_dist.infer.latency import time_on_cluster
from allatt_dist.model.pruning import per_head_params
from allatt_dist.model.targets import non_embedding_params
from allatt_dist.modelio import save_model_dir
from allatt_dist.recipe import data_config, read_mapping, read_run_config
from allatt_dist.rundir import RunDir
from allatt_dist.search.plot import pareto_plot
from allatt_dist.search.records import record_test_ppl, trial_run_name
from allatt_dist.search.recover import finetuned_with
from allatt_dist.search.scoring import Job, score_all

# The leaderboard's columns, declared once: (name, shown in leaderboard.md). JSON and CSV hold them all.
COLUMNS: tuple[tuple[str, bool], ...] = (
    ("name", True),
    ("status", True),
    ("architecture", True),
    ("temperature", True),
    ("sparsity_target", True),
    ("param_budget", True),
    ("l0_coefficient", False),
    ("seed", True),
    ("finetuned", True),  # recovery fine-tuning (tune.recover_finetune): steps, distillation; empty: not fine-tuned
    ("heads_per_layer", True),
    ("sparsity", True),
    ("params", True),
    ("non_embedding_params", True),
    ("valid_ppl", True),
    ("test_ppl", True),
    ("latency_ms", True),  # one eval segment at the eval batch size (infer/latency.py)
    ("gen_tokens_per_s", True),  # greedy generation at batch 1
    ("latency_device", False),  # where both were measured (the device the ranking scores on)
    ("pareto", True),
    ("model_dir", False),
    ("problem", False),  # why a finished trial is "not scored" (its model missing or damaged)
)
NOT_SCORED = "not scored"
FIELDS = [name for name, _ in COLUMNS]
MARKDOWN_FIELDS = [name for name, shown in COLUMNS if shown]


def pareto_flags(points: list[tuple[float, float] | None]) -> list[bool]:
    """(ppl, params) per model (None = not scored): True when no other point is <= in both, < in one."""
    flags = []
    for i, p in enumerate(points):
        if p is None:
            flags.append(False)
            continue
        dominated = any(
            q is not None and j != i and q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1])
            for j, q in enumerate(points)
        )
        flags.append(not dominated)
    return flags


def collect(exp_dir: Path) -> list[dict]:
    """One row per trial directory (plus the dense reference), with what is known before scoring."""
    if not (exp_dir / "trials").is_dir() and not (exp_dir / "tune").is_dir():
        raise UserError(f"{exp_dir}: not an experiment directory (no trials/ or tune/; run `allatt-dist tune` first)")
    rows = []
    for run_dir in [exp_dir, *sorted(exp_dir.glob("dense-*"))]:
        dense = run_dir / "dense" / "model"
        if (dense / "config.json").is_file():
            meta = read_mapping(dense / "config.json")
            arch = meta.get("architecture")
            rows.append(
                {
                    "name": "dense" if run_dir == exp_dir else run_dir.name,  # records.run_name / its folder
                    "status": "reference",
                    "dir": run_dir,
                    "architecture": arch,
                    "source": dense,
                    "gated": False,
                    "model": meta.get("model"),
                    "valid_ppl": read_mapping(run_dir / "dense" / "result.json").get("valid_ppl"),
                }
            )
    for trial in sorted(p for p in (exp_dir / "trials").glob("*") if p.is_dir()):
        cfg = read_run_config(trial / "run.yaml")
        status = read_mapping(trial / "status.json")
        result = read_mapping(trial / "prune" / "result.json")
        model = trial / "prune" / "model"
        finished = status.get("status") == "finished" and (model / "config.json").is_file()
        tuned = read_mapping(trial / "finetune" / "result.json")  # recovery fine-tuning (search/recover.py)
        tuned = tuned if finished and (trial / "finetune" / "model" / "config.json").is_file() else {}
        lost = status.get("status") == "finished" and not finished
        arch = cfg.model.architecture if cfg else None
        rows.append(
            {
                "name": trial_run_name(trial),  # the trial's TensorBoard run and status.json name
                "status": NOT_SCORED if lost else "finished" if finished else status.get("status", "incomplete"),
                "problem": f"{model}: missing (the trial finished, its model is gone)" if lost else None,
                "dir": trial,
                "source": (trial / "finetune" / "model" if tuned else model) if finished else None,
                "gated": True,  # a trial (its model gated, or pruned and fine-tuned: `finetuned`)
                "finetuned": finetuned_with(read_mapping(trial / "run.yaml"), tuned) if tuned else None,
                "architecture": arch,
                "temperature": cfg.gates.temperature if cfg else None,
                "sparsity_target": cfg.gates.sparsity_target if cfg else None,
                "l0_coefficient": cfg.gates.l0_coefficient if cfg else None,
                "param_budget": cfg.gates.param_budget if cfg else None,
                "seed": cfg.train.seed if cfg else None,
                "model": cfg.model.model_dump(mode="json") if cfg else None,
                "valid_ppl": tuned.get(
                    "valid_ppl", result.get("valid_ppl", (status.get("last") or {}).get("valid_ppl"))
                ),
            }
        )
    if not any(r["status"] in ("finished", NOT_SCORED) for r in rows):
        raise UserError(f"{exp_dir}: no finished trial to rank ({len(rows)} trial(s) found)")
    return rows


def score(rows: list[dict], exp_dir: Path, data_cfg, progress: bool, store: RunDir | None = None) -> None:
    """Prune and evaluate every scorable row in place (test_ppl, params, heads, sparsity), the models in
    parallel as Ray tasks (`scoring.py`); the pruned models are saved here, under .rank-work/."""

    work = exp_dir / ".rank-work"
    shutil.rmtree(work, ignore_errors=True)
    todo = [r for r in rows if r["source"] is not None]
    connect()  # no-op when already connected (`run`, `rank --address`)
    jobs = [Job(r["name"], Path(r["source"]), r["gated"] and not r.get("finetuned"), store) for r in todo]
    results = score_all(jobs, data_cfg, progress)
    for row, res in zip(todo, results, strict=True):
        if "error" in res:
            row.update(status=NOT_SCORED, problem=res["error"], source=None)
            continue
        saved = save_model_dir(res["model"], res["vocab"], work / row["name"], extra={"pruned": row["gated"]})
        row.update(
            test_ppl=res["test_ppl"],
            params=saved["params"],
            heads_per_layer=saved["heads_per_layer"],
            sparsity=saved["sparsity"],
            architecture=saved["architecture"],
            work=work / row["name"],
        )
    scored = [(r, res) for r, res in zip(todo, results, strict=True) if "error" not in res]
    timings = time_on_cluster({r["name"]: res["model"] for r, res in scored}, data_cfg, data_cfg.test_batch_size)
    for row, _ in scored:
        row.update(timings[row["name"]])


def write_outputs(rows: list[dict], exp_dir: Path, budget: int | None, latency_budget: float | None = None) -> dict:
    """Publish the ranking so that a reader of the experiment sees, at any instant, a leaderboard whose
    every model folder is there and whole (the old result or the new one, never a mix):

    1. each model on the new front (and each target's best) is swapped into models/<name> in one step:
       folders the old leaderboard names stay whole, new ones appear whole;
    2. pareto.png, leaderboard.csv, .md and, last, .json each replace the old file in one step;
    3. only then are the model folders that the new leaderboard does not name removed.
    """
    flags = pareto_flags([(r["test_ppl"], r["params"]) if r.get("test_ppl") is not None else None for r in rows])
    models = exp_dir / "models"
    models.mkdir(exist_ok=True)
    atomic.remove_leftovers(exp_dir)  # what a `rank` killed while replacing left
    for d in [models, *sorted(p for p in models.rglob("*") if p.is_dir() and not p.name.startswith("."))]:
        atomic.remove_leftovers(d)  # model names nest (prune/<label>/<id>): leftovers may sit at any level
    best = best_of_each_target(rows)
    for r, front in zip(rows, flags, strict=True):
        r["pareto"] = front
        r["model_dir"] = None
        if front or id(r) in best:
            (models / r["name"]).parent.mkdir(parents=True, exist_ok=True)
            atomic.replace_dir(r["work"], models / r["name"])
            r["model_dir"] = str((models / r["name"]).relative_to(exp_dir))
        elif r["status"] == NOT_SCORED and (models / r["name"] / "config.json").is_file():
            r["model_dir"] = str((models / r["name"]).relative_to(exp_dir))  # published before: its source is gone
    rows.sort(key=lambda r: (r.get("test_ppl") is None, r.get("test_ppl") or 0.0, r["name"]))
    table = [{k: r.get(k) for k in FIELDS} for r in rows]
    out = {"models": table}
    if budget is not None:
        fits = [r for r in table if r.get("test_ppl") is not None and r["params"] <= budget]
        out["budget"] = {"params": budget, "best": fits[0]["name"] if fits else None}
    if latency_budget is not None:
        out["latency_budget"] = latency_pick(table, latency_budget)

    pareto_plot(table, exp_dir / "pareto.png")  # written under a temporary name and renamed
    timed = [r for r in table if r.get("latency_ms") is not None and r.get("test_ppl") is not None]
    if timed:
        fast = pareto_flags([(r["test_ppl"], r["latency_ms"]) for r in timed])
        front = {r["name"] for r, f in zip(timed, fast, strict=True) if f}
        pareto_plot(table, exp_dir / "pareto_latency.png", x="latency_ms", front=front)
    rows_csv = io.StringIO(newline="")
    w = csv.DictWriter(rows_csv, fieldnames=FIELDS)
    w.writeheader()
    for r in table:
        w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    atomic.write_text(exp_dir / "leaderboard.csv", rows_csv.getvalue())
    atomic.write_text(exp_dir / "leaderboard.md", markdown(table, out.get("budget")))
    atomic.write_text(exp_dir / "leaderboard.json", json.dumps(out, indent=2) + "\n")
    named = {r["name"] for r in rows if r["model_dir"]}
    for meta in sorted(models.rglob("config.json")):  # model folders may nest (prune/<label>/<id>)
        rel = meta.parent.relative_to(models)
        if not any(part.startswith(".") for part in rel.parts) and rel.as_posix() not in named:
            atomic.discard_dir(meta.parent)
    for d in sorted((p for p in models.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not d.name.startswith(".") and not any(d.iterdir()):
            d.rmdir()  # a label folder whose models are all gone
    shutil.rmtree(exp_dir / ".rank-work", ignore_errors=True)
    return out


def latency_pick(table: list[dict], ms: float) -> dict:
    """The best test perplexity whose segment latency is at most `ms` (None when none is), and the fastest."""
    timed = [r for r in table if r.get("test_ppl") is not None and r.get("latency_ms") is not None]
    fits = [r for r in timed if r["latency_ms"] <= ms]  # the table is sorted by test perplexity
    fastest = min(timed, key=lambda r: r["latency_ms"], default=None)
    return {"ms": ms, "best": fits[0]["name"] if fits else None, "fastest": fastest["name"] if fastest else None}


def best_of_each_target(rows: list[dict]) -> set[int]:
    """id() of the scored trial with the lowest test perplexity in each target (architecture and sparsity
    target, budget or L0 coefficient): kept under models/ beside the Pareto front, so every target asked
    for has a model on disk even when a sparser one is dominated."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if not r["gated"] or r.get("test_ppl") is None:
            continue
        key = (r.get("architecture"), r.get("sparsity_target"), r.get("param_budget"), r.get("l0_coefficient"))
        if key not in best or r["test_ppl"] < best[key]["test_ppl"]:
            best[key] = r
    return {id(r) for r in best.values()}


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "/".join(str(x) for x in v)
    return str(v)


def markdown(table: list[dict], budget: dict | None) -> str:
    cols = MARKDOWN_FIELDS
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in table]
    if budget:
        lines += ["", f"Best under {budget['params']:,} parameters: {budget['best'] or 'none'}"]
    devices = sorted({r["latency_device"] for r in table if r.get("latency_device")})
    if devices:
        lines += [
            "",
            f"latency_ms: one eval segment at the eval batch size; gen_tokens_per_s: greedy, batch 1; "
            f"measured on {'; '.join(devices)}",
        ]
    return "\n".join(lines) + "\n"


def rank(
    exp_dir: Path,
    budget: int | None = None,
    progress: bool = True,
    data_overrides: list[str] | None = None,
    store: RunDir | None = None,
    latency_budget: float | None = None,
) -> dict:
    """Prune, test-evaluate and time every finished trial; `data_overrides` (`data.KEY=VALUE`) amend run.yaml's data.
    `store`: the experiment directory when it lives in a bucket (its records fetched first, the results published)."""
    exp_dir = Path(exp_dir)
    store = store or RunDir(exp_dir)
    store.fetch_records(exp_dir)  # the scoring tasks fetch the models they score
    store.fetch(exp_dir / "models")  # the models the last ranking kept: replaced or removed below
    rows = collect(exp_dir)
    for r in rows:  # name the trial's model where the user keeps it, not in this process's copy
        r["problem"] = r.get("problem") and r["problem"].replace(str(exp_dir), store.uri(exp_dir))
    run = read_mapping(exp_dir / "run.yaml")
    data_cfg = data_config(run.get("data") or {}, data_overrides, store.uri(exp_dir / "run.yaml"))
    score(rows, exp_dir, data_cfg, progress, store)
    count_non_embedding(rows)
    record_test_ppl(exp_dir, rows)  # records: test perplexity into each scored run's HParams entry
    out = write_outputs(rows, exp_dir, budget, latency_budget)
    store.publish(exp_dir / "models", keep_others=True)  # the new models first, then the leaderboard naming
    store.publish(exp_dir)  # them, then the models it no longer names are removed
    check_all_scored(rows, store.uri(exp_dir / "leaderboard.json"))
    return out


def check_all_scored(rows: list[dict], leaderboard: str) -> None:
    """One warning line per trial that could not be scored, then one error (exit status 2) naming them all;
    nothing when every finished trial was scored."""
    lost = [r for r in rows if r["status"] == NOT_SCORED]
    for r in lost:
        print(f"allatt-dist rank: warning: trial {r['name']} not scored: {r['problem']}", file=sys.stderr, flush=True)
    if lost:
        names = ", ".join(r["name"] for r in lost)
        raise UserError(
            f"{len(lost)} finished trial(s) could not be scored ({names}): listed as {NOT_SCORED!r} in {leaderboard}, "
            "the others are ranked there; restore or remove their models and run rank again"
        )


def count_non_embedding(rows: list[dict]) -> None:
    """Each scored row's non-embedding parameters (the paper's count): the dense model's, less what each
    removed head carries (model/targets.py, the per-head formula of the row's architecture)."""

    for row in rows:
        if row.get("heads_per_layer") is None or not row.get("model"):
            continue
        model = ModelConfig.model_validate(row["model"])
        removed = model.num_layers * model.num_heads - sum(row["heads_per_layer"])
        row["non_embedding_params"] = non_embedding_params(model) - removed * per_head_params(model)
