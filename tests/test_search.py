"""Ray Tune search + ranking on a real local Ray: 4 trials, ASHA, rank, and bad input.

The leaderboard is checked against independent recomputations: Pareto flags from the table,
parameter counts from the safetensors files, and one model's test perplexity with a loop written
here (same row layout, memory carried), not `allatt_dist.evaluate`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import types

import numpy as np
import pytest
import torch
from clirun import cli_cmd, run_cli
from safetensors import safe_open
from tb_http import hparams_over_http, tensorboard_on

from allatt_dist.errors import ConfigError, UserError
from allatt_dist.plan import make_plan
from allatt_dist.recipe import build_config, load_config
from allatt_dist.search.rank import rank

TINY = {
    "model": {"num_layers": 2, "hidden_dim": 32, "num_heads": 4, "num_persistent": 16, "seq_len": 16, "mem_len": 16},
    "data": {"eval_batch_size": 4, "eval_max_segments": 10},
    "train": {"max_steps": 20, "batch_size": 4, "eval_every": 10, "checkpoint_every": 10, "log_every": 5},
    "prune": {"max_steps": 30},
    "gates": {"sparsity_target": 0.5, "warmup_steps": 10, "lr": 0.3},
    "scaling": {"num_workers": 2, "cpus_per_worker": 0.99},
    "deepspeed": {"zero_stage": 2},
    "tune": {
        "space": {"gates.sparsity_target": {"grid": [0.2, 0.8]}, "gates.temperature": {"grid": [0.33, 0.66]}},
        "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 2},
    },
}


def tiny_cfg(wt2_slice, **tune):
    data = json.loads(json.dumps(TINY))
    data["data"]["path"] = str(wt2_slice)
    data["tune"].update(tune)
    return build_config(data)


@pytest.fixture(scope="module")
def experiment(local_ray, tmp_path_factory, wt2_slice):
    """The search (dense, 4 trials, rank) on the session's local Ray."""
    from allatt_dist.search.pipeline import run_pipeline

    exp = tmp_path_factory.mktemp("search") / "exp"
    summary = run_pipeline(make_plan(tiny_cfg(wt2_slice), exp, progress=False), budget=10**9)
    return exp, summary


@pytest.mark.ray
def test_search_runs_four_trials_asha_stops_some_and_all_get_resources(experiment):
    exp, summary = experiment
    statuses = {row["trial_id"]: row["status"] for row in summary["trials"]}
    assert len(statuses) == 4
    assert "error" not in statuses.values(), summary["trials"]
    assert "stopped" in statuses.values(), "ASHA stopped no trial"
    assert "finished" in statuses.values()
    finished_targets = {
        json.loads((exp / "trials" / t / "params.json").read_text())["gates.sparsity_target"]
        for t, status in statuses.items()
        if status == "finished"
    }
    assert finished_targets == {0.2, 0.8}, "a target lost all its trials: early stopping compared across targets"
    for t, status in statuses.items():  # every finished trial's pruned model removed exactly round(t * 8) heads
        if status == "finished":
            target = json.loads((exp / "trials" / t / "params.json").read_text())["gates.sparsity_target"]
            heads = json.loads((exp / "trials" / t / "prune" / "result.json").read_text())["heads_per_layer"]
            assert 8 - sum(heads) == round(target * 8), (t, target, heads)
    # every trial after a stopped one still got its two workers: each ran at least to the grace period
    for trial_id in statuses:
        status = json.loads((exp / "trials" / trial_id / "status.json").read_text())
        assert status["last"]["step"] >= 10


@pytest.mark.ray
def test_leaderboard_files_and_independent_pareto_and_params(experiment):
    exp, _ = experiment
    board = json.loads((exp / "leaderboard.json").read_text())["models"]
    for f in ("leaderboard.csv", "leaderboard.md", "pareto.png"):
        assert (exp / f).stat().st_size > 0
    names = {m["name"] for m in board}
    assert len(board) == 5 and any(m["status"] == "reference" for m in board)  # 4 trials + dense
    assert {m["status"] for m in board} <= {"reference", "finished", "stopped"}
    scored = [m for m in board if m["test_ppl"] is not None]
    ppls = [m["test_ppl"] for m in scored]
    assert ppls == sorted(ppls)
    for m in scored:  # Pareto, recomputed here
        beaten = any(
            o is not m
            and o["test_ppl"] <= m["test_ppl"]
            and o["params"] <= m["params"]
            and (o["test_ppl"] < m["test_ppl"] or o["params"] < m["params"])
            for o in scored
        )
        assert m["pareto"] == (not beaten), m["name"]
        if m["pareto"]:
            with safe_open(str(exp / m["model_dir"] / "model.safetensors"), "pt") as f:
                assert sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) == m["params"]
                body = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith("io."))
                assert body == m["non_embedding_params"], m["name"]
            heads = json.loads((exp / m["model_dir"] / "config.json").read_text())["heads_per_layer"]
            assert heads == m["heads_per_layer"]
    for m in board:
        if m["status"] == "stopped":
            assert m["test_ppl"] is None and m["name"] in names
    # every target asked for has a pruned model on disk (its best), beside the Pareto front; nothing else
    assert {m["sparsity_target"] for m in board if m["model_dir"] and m["status"] == "finished"} == {0.2, 0.8}
    on_disk = {p.parent.relative_to(exp / "models").as_posix() for p in (exp / "models").rglob("config.json")}
    assert on_disk == {m["name"] for m in board if m["model_dir"]}
    assert all(m["model_dir"] for m in board if m["pareto"])
    assert json.loads((exp / "leaderboard.json").read_text())["budget"]["best"] == board[0]["name"]


@pytest.mark.ray
def test_one_models_test_ppl_recomputed_independently(experiment, wt2_slice_cfg):
    from allatt_dist.data.corpus import load_corpus
    from allatt_dist.modelio import load_model_dir

    exp, _ = experiment
    entry = next(m for m in json.loads((exp / "leaderboard.json").read_text())["models"] if m["pareto"])
    model, _, _ = load_model_dir(exp / entry["model_dir"])
    tokens = load_corpus(wt2_slice_cfg, splits=("train", "test")).tokens("test")
    rows, seq = 8, model.cfg.seq_len
    per_row = -(-(len(tokens) - 1) // rows)
    inp = np.zeros((rows, per_row), dtype=np.int64)
    tgt = np.full((rows, per_row), -100, dtype=np.int64)
    for r in range(rows):
        chunk = tokens[r * per_row : (r + 1) * per_row + 1]
        inp[r, : len(chunk) - 1], tgt[r, : len(chunk) - 1] = chunk[:-1], chunk[1:]
    total, count, mems = 0.0, 0, None
    with torch.no_grad():
        for s in range(0, per_row, seq):
            x, y = torch.from_numpy(inp[:, s : s + seq]), torch.from_numpy(tgt[:, s : s + seq])
            out = model(x, mems)
            mems = out.mems
            keep = y != -100
            total -= out.log_probs[keep].gather(-1, y[keep][:, None]).sum().item()
            count += int(keep.sum())
    assert count == len(tokens) - 1
    assert math.exp(total / count) == pytest.approx(entry["test_ppl"], rel=1e-4)


@pytest.mark.ray
def test_every_trial_in_tensorboard_hparams_over_http(experiment):
    """What a user sees in TensorBoard's HParams tab, read from its own HTTP data API: every trial
    (finished and stopped) and the dense reference, with hyperparameters, status and final metrics,
    under the one name the leaderboard and status.json use; no run beside those."""
    exp, _ = experiment
    board = {m["name"]: m for m in json.loads((exp / "leaderboard.json").read_text())["models"]}
    trials = {p.parent.name: json.loads(p.read_text()) for p in exp.glob("trials/*/status.json")}
    names = {st["name"]: st for st in trials.values()}
    assert set(board) == set(names) | {"dense"} and len(names) == 4
    with tensorboard_on(exp / "tb") as url:
        info, groups, runs = hparams_over_http(url, sessions=5)
    assert sorted(runs) == sorted(board), "a run that is neither the dense run nor a trial"
    columns = {h["name"]: h for h in info["hparamInfos"]}
    for key, values in TINY["tune"]["space"].items():
        assert columns[key]["differs"] and columns[key]["domainDiscrete"] == values["grid"]
    assert columns["status"]["differs"] and not columns["model.architecture"]["differs"]
    assert {m["name"]["tag"] for m in info["metricInfos"]} >= {"result/valid_ppl", "result/test_ppl"}
    assert sorted(g["name"] for g in groups) == sorted(board)
    for g in groups:
        hp, row = g["hparams"], board[g["name"]]
        metric = {m["name"]["tag"]: m["value"] for m in g["metricValues"]}
        assert hp["status"] == row["status"] and hp["model.architecture"] == row["architecture"]
        assert metric["result/valid_ppl"] == pytest.approx(row["valid_ppl"], rel=1e-6)
        if row["test_ppl"] is not None:  # `rank` wrote it
            assert metric["result/test_ppl"] == pytest.approx(row["test_ppl"], rel=1e-6)
            assert metric["result/params"] == row["params"]
        if g["name"] == "dense":
            continue
        status = names[g["name"]]
        assert f"temp={hp['gates.temperature']:.3g}" in g["name"]
        assert f"target={hp['gates.sparsity_target']:.3g}" in g["name"]
        assert hp["gates.temperature"] == row["temperature"]
        assert hp["gates.sparsity_target"] == row["sparsity_target"]
        if status["status"] == "stopped":
            assert metric["result/last_step"] == status["stopped_at_step"] < TINY["prune"]["max_steps"]
            assert "result/test_ppl" not in metric
        else:
            assert metric["result/last_step"] == TINY["prune"]["max_steps"]


@pytest.mark.ray
def test_a_trial_stopped_at_its_last_report_gets_all_its_records(experiment, tmp_path):
    """The driver completes a trial whose model was exported at its last step but which the scheduler
    stopped at that report (result.json, pruned model, HParams entry); an earlier stop is `stopped`."""
    from allatt_dist.search.records import finalize_trial

    exp, _ = experiment
    done = next(p.parent for p in exp.glob("trials/*/status.json") if json.loads(p.read_text())["status"] == "finished")
    result = json.loads((done / "prune" / "result.json").read_text())
    copy = tmp_path / "exp"
    for trial_id in ("last", "early"):
        shutil.copytree(done, copy / "trials" / trial_id, ignore=shutil.ignore_patterns("checkpoints"))
        shutil.rmtree(copy / "trials" / trial_id / "prune" / "pruned")
        (copy / "trials" / trial_id / "prune" / "result.json").unlink()
    dense = {"all_attention": str(exp / "dense" / "model")}
    last = {k: result[k] for k in ("step", "valid_ppl", "hard_sparsity", "expected_sparsity")}
    row = finalize_trial(copy, "last", last, None, TINY["prune"]["max_steps"], dense)
    trial = copy / "trials" / "last"
    assert row["status"] == "finished" and json.loads((trial / "status.json").read_text())["status"] == "finished"
    redone = json.loads((trial / "prune" / "result.json").read_text())
    assert redone["params"] == result["params"] and redone["heads_per_layer"] == result["heads_per_layer"]
    assert (trial / "prune" / "pruned" / "config.json").is_file()
    assert list((copy / "tb" / row["name"]).glob("events.out.tfevents.*.hparams"))

    row = finalize_trial(copy, "early", {**last, "step": 10}, None, TINY["prune"]["max_steps"], dense)
    assert row["status"] == "stopped" and row["stopped_at_step"] == 10
    assert not (copy / "trials" / "early" / "prune" / "result.json").exists()
    assert list((copy / "tb" / row["name"]).glob("events.out.tfevents.*.hparams"))


@pytest.mark.ray
def test_tune_again_resumes_instead_of_starting_over(experiment, wt2_slice):
    import ray

    from allatt_dist.cluster.session import connect
    from allatt_dist.search.tune import tune_search

    exp, _ = experiment
    before = sorted(p.name for p in (exp / "trials").iterdir())
    connect()
    rows = tune_search(make_plan(tiny_cfg(wt2_slice), exp))
    assert sorted(r["trial_id"] for r in rows) == before
    assert sorted(p.name for p in (exp / "trials").iterdir()) == before
    assert ray.is_initialized()


@pytest.mark.ray
def test_tune_again_with_another_config_or_dense_model_is_refused(experiment, wt2_slice):
    from allatt_dist.cluster.session import connect
    from allatt_dist.errors import CheckpointError
    from allatt_dist.search.tune import tune_search

    exp, _ = experiment
    recorded = (exp / "search.yaml").read_text()
    connect()
    other_space = tiny_cfg(wt2_slice, space={"gates.sparsity_target": {"grid": [0.3]}})
    with pytest.raises(UserError, match=r"holds a search of another config \(differs in tune.space\)"):
        tune_search(make_plan(other_space, exp))  # Tune alone would resume the old grid and report its trials
    cfg = tiny_cfg(wt2_slice)
    deeper = cfg.model_copy(update={"model": cfg.model.model_copy(update={"num_layers": cfg.model.num_layers + 1})})
    with pytest.raises(CheckpointError, match="does not match the recipe"):
        tune_search(make_plan(deeper, exp))  # every trial would fail on the dense weights
    assert (exp / "search.yaml").read_text() == recorded


@pytest.mark.parametrize("max_steps, every, grace", [(200, 100, 100), (200, 50, 100), (30, 10, 10), (35, 10, 5)])
def test_the_scheduler_never_stops_a_trial_at_its_last_report(tmp_path, max_steps, every, grace):
    """Trials reporting at every checkpoint: even ones bad throughout (stopped early), odd ones the best
    until their last report, then the worst. No trial is stopped at its last step."""

    from ray.tune.schedulers import TrialScheduler

    from allatt_dist.search.scheduler import TargetHalving

    sched = TargetHalving(grace, 2, max_steps, tmp_path / "scheduler.json")
    sched.set_search_properties("valid_ppl", "min")
    reports = sorted({*range(every, max_steps, every), max_steps})
    stops = []
    for i in range(8):
        trial = types.SimpleNamespace(trial_id=f"t{i}", config={"gates.sparsity_target": 0.5})
        sched.on_trial_add(None, trial)
        for step in reports:
            ppl = 100.0 + i if i % 2 == 0 else (90.0 - i if step < max_steps else 1000.0)
            if sched.on_trial_result(None, trial, {"step": step, "valid_ppl": ppl}) == TrialScheduler.STOP:
                stops.append(step)
                break
    assert stops and max(stops) < max_steps, stops


# ----- bad input: one line, nothing written -------------------------------------------------------------


@pytest.mark.parametrize(
    "tune, needle",
    [
        ({"space": {}}, "tune.space is empty"),
        ({"space": {"gates.temprature": {"grid": [0.3]}}}, "gates.temprature: no such config key"),
        ({"space": {"gates.sparsity_target": {"grid": [0.5, 1.0]}}}, "sparsity_target must be in [0, 1)"),
        ({"space": {"gates.temperature": {"uniform": [1.0]}}}, "needs [low, high]"),
        ({"space": {"gates.temperature": {"normal": [0, 1]}}}, "exactly one of"),
        ({"space": {"gates.temperature": {"uniform": [0.1, 1.0]}}}, "grid takes only grid/choice"),
        ({"space": {"gates.temperature": {"grid": [0.5]}}, "schedular": {}}, "tune.schedular: unknown key"),
    ],
)
def test_bad_search_spaces_fail_with_one_line(wt2_slice, tune, needle):
    data = json.loads(json.dumps(TINY))
    data["data"]["path"] = str(wt2_slice)
    data["tune"] = tune
    with pytest.raises(ConfigError) as e:
        build_config(data, "recipe.yaml")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith("recipe.yaml: ")


def test_cli_run_with_bad_space_writes_nothing(tmp_path, wt2_slice):

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("tune:\n  space:\n    gates.nope: {grid: [1, 2]}\n")
    out = tmp_path / "exp"
    p = run_cli("run", recipe, "--out", out, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "gates.nope: no such config key" in p.stderr
    assert not out.exists()
    p = run_cli("tune", recipe, "--out", out, "--set", "tune.space={}", timeout=120)
    assert p.returncode == 2 and f"{recipe} with --set: tune.space" in p.stderr and not out.exists(), p.stderr


def test_rank_refuses_non_experiments_and_experiments_without_finished_trials(tmp_path):
    with pytest.raises(UserError, match="not an experiment directory"):
        rank(tmp_path)
    trial = tmp_path / "trials" / "t1"
    trial.mkdir(parents=True)
    (trial / "status.json").write_text(json.dumps({"status": "error", "error": "boom"}))
    with pytest.raises(UserError, match="no finished trial"):
        rank(tmp_path)
    assert not (tmp_path / "leaderboard.json").exists()


def test_quickstart_recipe_searches_at_least_four_trials():
    cfg = load_config("tune_configs/quickstart.yaml")
    assert cfg.tune.expected_trials() >= 4
    assert cfg.scaling.num_workers == 2


def test_random_search_is_reproducible_from_tune_seed(wt2_slice, tmp_path):
    from allatt_dist.search.tune import param_space, search_algorithm

    space = {"gates.temperature": {"uniform": [0.1, 1.0]}, "gates.sparsity_target": {"grid": [0.25, 0.5]}}

    def sampled(seed: int, concurrent: int = 6) -> list[dict]:
        tune = {"search": "random", "seed": seed, "space": space, "num_samples": 3}
        tc = tiny_cfg(wt2_slice, **tune, max_concurrent_trials=concurrent).tune
        alg, limit = search_algorithm(tc)
        assert limit is None  # the generator itself holds the concurrency limit
        spec = {"run": lambda c: None, "config": param_space(tc), "num_samples": tc.num_samples}
        alg.add_configurations({"e": {**spec, "storage_path": str(tmp_path)}})  # not ~/ray_results
        return [t.config for t in iter(alg.next_trial, None)]

    first = sampled(0)
    assert len(first) == 6 and first == sampled(0)
    assert [c["gates.temperature"] for c in first] != [c["gates.temperature"] for c in sampled(1)]
    assert len(sampled(0, concurrent=1)) == 1  # no second trial before the first ends


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("status.json", "{bad", "status.json: damaged"),
        ("run.yaml", "- a\n- b\n", "run.yaml: damaged (expected a mapping, found list)"),
        ("run.yaml", "a: [1\n", "run.yaml: damaged"),
    ],
)
def test_rank_names_a_damaged_file(tmp_path, name, text, needle):
    trial = tmp_path / "trials" / "t1"
    trial.mkdir(parents=True)
    (trial / name).write_text(text)
    with pytest.raises(UserError, match=re.escape(needle)) as e:
        rank(tmp_path)
    assert "\n" not in str(e.value)


def test_a_search_where_every_trial_failed_is_an_error(tmp_path):
    from allatt_dist.search.tune import check_some_trial_ran

    ok = {"trial_id": "a", "status": "stopped", "stopped_at_step": 10}
    bad = {"trial_id": "b", "status": "error", "error": "RuntimeError: boom"}
    check_some_trial_ran([ok, bad], tmp_path)  # one ran: the search is a result
    check_some_trial_ran([], tmp_path)
    with pytest.raises(UserError, match=r"all 2 trials failed; the first: RuntimeError: boom \(.*trials/b/error.txt"):
        check_some_trial_ran([bad, {**bad, "trial_id": "c"}], tmp_path)


@pytest.mark.ray
def test_release_placement_group(local_ray):
    """The public path the release callback takes: a group's hex id (as the workers report it) -> removed.
    A Ray upgrade that breaks `ray.PlacementGroupID` or the placement-group table fails here."""
    import ray
    from ray.util.placement_group import placement_group

    from allatt_dist.cluster.session import connect
    from allatt_dist.search.callbacks import release_placement_group

    connect()
    pg = placement_group([{"CPU": 0.01}])
    ray.get(pg.ready(), timeout=60)
    pg_id = pg.id.hex()
    assert ray.util.placement_group_table()[pg_id]["state"] == "CREATED"
    assert release_placement_group(pg_id) is True
    assert ray.util.placement_group_table()[pg_id]["state"] == "REMOVED"
    assert release_placement_group(pg_id) is False and release_placement_group(None) is False


def _board(exp) -> list[tuple]:
    """The leaderboard without trial ids (which differ between two searches): what a user compares."""
    board = json.loads((exp / "leaderboard.json").read_text())["models"]
    keys = ("status", "architecture", "sparsity_target", "temperature", "heads_per_layer", "params", "pareto")
    return sorted(
        (
            *[json.dumps(m[k]) for k in keys],
            *[f"{m[k]:.9g}" if m[k] is not None else "-" for k in ("valid_ppl", "test_ppl")],
        )
        for m in board
    )


@pytest.mark.ray
def test_a_run_killed_mid_search_and_rerun_ends_like_an_uninterrupted_one(experiment, wt2_slice, tmp_path, local_ray):
    """SIGKILL of the whole `allatt-dist run` process group (driver, its local Ray, the workers) once the
    scheduler has judged two trials; the same command again must give the uninterrupted search's
    leaderboard: the same trials stopped, the same models, the same numbers. The experiment starts with the
    uninterrupted one's dense phase in place (what a first attempt killed during the search leaves; `run`
    skips a finished phase): the kill and the rerun are what is tested, not a second dense training."""
    import os
    import signal

    import yaml

    reference, _ = experiment
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_cfg(wt2_slice).to_dict()))
    out = tmp_path / "exp"
    for part in ("run.yaml", "dense", "tb/dense"):
        copy = shutil.copytree if (reference / part).is_dir() else shutil.copy2
        (out / part).parent.mkdir(parents=True, exist_ok=True)
        copy(reference / part, out / part)
    cmd = cli_cmd("run", recipe, "--out", out, "--budget", str(10**9), "--no-progress")
    first = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 1200
    state = out / "scheduler.json"
    while not (state.is_file() and len(json.loads(state.read_text())["decisions"]) >= 2):
        assert first.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "the search never reached its second trial"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (out / "leaderboard.json").exists()
    # The same command again, joining the session's Ray (the killed run's own Ray died with it): everything
    # the rerun resumes from is on disk, nothing in a Ray instance.
    again = subprocess.run([*cmd, "--address", local_ray], capture_output=True, text=True, timeout=1500)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _board(out) == _board(reference)
