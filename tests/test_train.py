"""`allatt-dist train` end to end on a local Ray (CPU workers, gloo, DeepSpeed ZeRO) with real WikiText-2.

The session's local Ray (conftest.py) serves the module, and runs of the same tiny recipe are shared by
the tests (a training phase costs ~30 s here, most of it starting worker processes, so runs are few and
reused):

  zero2       2 workers, ZeRO-2: dense then prune, undisturbed.
  one_worker  1 worker, same global batch: dense only. Its loss curve must be zero2's.
  bf16        zero2 with deepspeed.precision=bf16: its loss curves must follow zero2's within bf16 rounding.
  accum       1 worker, 2 accumulated micro-batches: dense only. Its loss curve must be zero2's.
  adaptive    adaptive input/softmax, 20 dense steps: ZeRO-2 with bf16 (the paper recipe's settings), ZeRO-3.
  zero3       2 workers, ZeRO-3: dense started by the CLI in a subprocess; one training worker is
              SIGKILLed once the step-20 checkpoint is published (Ray Train restarts the group,
              scaling.max_failures=1), then the driver itself once step 30's is; the same `train` call
              again resumes the dense phase from its last checkpoint and runs prune. Exact resumption
              means the merged loss curve is zero2's too.

The bad-input tests run the CLI in a subprocess joined to that Ray (`--address`).
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from clirun import cli_cmd, run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny import CKPT_EVERY, DENSE_STEPS, PRUNE_STEPS, scored_tokens, tiny_config, with_changes

from allatt_dist.config import RunConfig
from allatt_dist.errors import UserError
from allatt_dist.plan import make_plan
from allatt_dist.train.ckpt_folder import published
from allatt_dist.train.setup import lr_multiplier
from allatt_dist.train.trainer import prepare_run_dir, train
from allatt_dist.variants import MODEL_PRESETS

pytestmark = pytest.mark.ray

# ---- TensorBoard / run-dir helpers -------------------------------------------------------------


def event_files(tb_dir: Path) -> list[Path]:
    """Oldest first: the file names start with the writer's creation time."""
    return sorted(tb_dir.glob("events.out.tfevents.*"))


def load_events(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def file_scalars(path: Path, tag: str) -> dict[int, float]:
    acc = load_events(path)
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    """step -> value over all events files of a run; a later file (a resumed run) wins on a step."""
    out: dict[int, float] = {}
    for f in event_files(tb_dir):
        out.update(file_scalars(f, tag))
    return out


def curve(tb_dir: Path, tag: str = "train/loss") -> np.ndarray:
    """Values of `tag` at its steps, first..last (asserting that no step is missing; a prune or finetune
    run's steps continue the phases before it)."""
    by_step = scalars(tb_dir, tag)
    first = min(by_step)
    assert sorted(by_step) == list(range(first, first + len(by_step))), f"{tag}: steps missing in {sorted(by_step)}"
    return np.array([by_step[s] for s in sorted(by_step)])


def published_checkpoint_step(phase_dir: Path) -> int:
    """Step of the newest published checkpoint (train/ckpt_folder.py), the one a restart resumes from.

    A checkpoint is published (renamed into place, whole) before its metrics are reported, so a kill
    right after this step is seen resumes from it."""
    newest = published(phase_dir / "checkpoints")
    return int(newest[0].name.rsplit("_", 1)[1]) if newest else 0


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with (size, mtime_ns): equal snapshots mean nothing was written."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def alive_train_workers(address: str) -> list:
    """The Ray Train V2 worker actors (class RayTrainWorker) now alive, with their pids."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    return list_actors(address=address, filters=filters, detail=True)  # detail: with placement_group_id


def cli_train(cfg_file: Path, out: Path | str, *args: str) -> list[str]:
    return cli_cmd("train", cfg_file, "--out", out, *args)


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_address(local_ray) -> str:
    """The session's local Ray (conftest.py): its GCS address lets CLI subprocesses join it. Its nodes know
    the S3 server (AWS_* variables), as the nodes of a cluster would."""
    return local_ray


@pytest.fixture(scope="module")
def base_cfg(wt2_slice: Path) -> RunConfig:
    return tiny_config(wt2_slice)


def _train(cfg: RunConfig, run_dir: Path, phases: list[str]) -> dict:
    t0 = time.monotonic()
    results = train(make_plan(cfg, run_dir, progress=False), phases)
    print(f"[{run_dir.name}: {'+'.join(phases)} in {time.monotonic() - t0:.0f}s]", end=" ", flush=True)
    return results


@pytest.fixture(scope="module")
def zero2(ray_address, base_cfg, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("zero2")
    return base_cfg, run_dir, _train(base_cfg, run_dir, ["dense", "prune"])


@pytest.fixture(scope="module")
def one_worker(ray_address, base_cfg, tmp_path_factory):
    cfg = with_changes(base_cfg, scaling={"num_workers": 1})
    run_dir = tmp_path_factory.mktemp("one_worker")
    return cfg, run_dir, _train(cfg, run_dir, ["dense"])


@pytest.fixture(scope="module")
def zero3(ray_address, base_cfg, tmp_path_factory):
    """ZeRO-3 run through a worker kill and a driver kill (see the module docstring)."""
    cfg = with_changes(base_cfg, deepspeed={"zero_stage": 3}, scaling={"max_failures": 1})
    root = tmp_path_factory.mktemp("zero3")
    cfg_file, run_dir = root / "zero3.yaml", root / "run"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = cli_train(cfg_file, run_dir, "--phase", "dense", "--no-progress", "--address", ray_address)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = run_dir / "dense/checkpoints"
    metrics = lambda: json.loads((published(root)[0] / "metrics.json").read_text())  # noqa: E731
    faults = kill_worker_then_driver(proc, ray_address, lambda: published_checkpoint_step(run_dir / "dense"), metrics)
    faults["result_before_rerun"] = (run_dir / "dense/result.json").exists()
    faults["published_at_driver_kill"] = published_checkpoint_step(run_dir / "dense")
    print(f"[zero3: dense killed twice in {time.monotonic() - t0:.0f}s]", end=" ", flush=True)
    return cfg, run_dir, _train(cfg, run_dir, ["dense", "prune"]), faults


def kill_worker_then_driver(proc: subprocess.Popen, ray_address: str, newest, metrics) -> dict:
    """SIGKILL one training worker once `newest()` (the step of the newest published checkpoint) reaches 20,
    then the driver `proc` once it reaches 30; returns the steps seen at each kill and the driver's end.
    The workers are looked up at the first checkpoint, by the placement group its `metrics()` names (the
    state API may still list another run's workers as alive, and answers too slowly to be asked at step 20:
    ten steps of a tiny model take a second)."""
    faults: dict = {}

    def wait_for(step: int) -> int:
        t0 = time.monotonic()
        while proc.poll() is None and newest() < step and time.monotonic() - t0 < 300:
            time.sleep(0.05)
        seen = newest()
        assert seen >= step, f"no checkpoint at step >= {step} published"
        return seen

    try:
        assert wait_for(CKPT_EVERY) < 20, "the run passed step 20 before its workers were found"
        group = metrics()["placement_group_id"]
        workers = [w for w in alive_train_workers(ray_address) if w.placement_group_id == group]
        seen = [(w.pid, w.placement_group_id) for w in alive_train_workers(ray_address)]
        assert len(workers) == 2, (group, seen)
        faults["worker_kill_after"] = wait_for(20)
        os.kill(workers[-1].pid, signal.SIGKILL)
        faults["driver_kill_after"] = wait_for(30)
        proc.send_signal(signal.SIGKILL)
    except AssertionError as e:
        proc.kill()
        raise AssertionError(f"{e}; the driver said: {proc.communicate()[1][-3000:]}") from None
    _, faults["driver_stderr"] = proc.communicate()
    faults["driver_returncode"] = proc.returncode
    t1 = time.monotonic()
    while alive_train_workers(ray_address) and time.monotonic() - t1 < 60:  # Ray ends a dead driver's actors
        time.sleep(0.5)
    return faults


def bucket_checkpoint_step(s3, prefix: str) -> int:
    """Step of the newest checkpoint published in the bucket (its manifest, uploaded last, is there)."""
    steps = [int(k.split("/checkpoint_")[1][:8]) for k in s3.keys("runs", prefix) if k.endswith("/MANIFEST.json")]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def in_bucket(ray_address, s3, base_cfg, tmp_path_factory):
    """zero2's recipe with `--out s3://runs/run` on an S3-protocol server (moto, loopback): a worker killed
    after the checkpoint of step 20 is in the bucket, the driver after step 30, then the same command again.
    Every process works on its own mirror (ALLATT_MIRROR_DIR): nothing but the bucket is shared. Returns
    (cfg, a local copy of the bucket's run, the rerun's results, faults)."""
    cfg = with_changes(base_cfg, scaling={"max_failures": 1})
    root = tmp_path_factory.mktemp("in_bucket")
    cfg_file = root / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, **s3.env(ALLATT_MIRROR_DIR=str(root / "mirrors"))}
    cmd = [*cli_train(cfg_file, "s3://runs/run", "--no-progress", "--address", ray_address)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def metrics() -> dict:
        step = bucket_checkpoint_step(s3, "run/dense/")
        key = f"run/dense/checkpoints/checkpoint_{step:08d}/metrics.json"
        return json.loads(s3.client().get_object(Bucket="runs", Key=key)["Body"].read())

    faults = kill_worker_then_driver(proc, ray_address, lambda: bucket_checkpoint_step(s3, "run/dense/"), metrics)
    faults["published_at_driver_kill"] = bucket_checkpoint_step(s3, "run/dense/")
    again = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    print(f"[in_bucket: killed twice, resumed, {time.monotonic() - t0:.0f}s]", end=" ", flush=True)
    copy = root / "copy"
    for key in s3.keys("runs", "run/"):
        (copy / key[4:]).parent.mkdir(parents=True, exist_ok=True)
        s3.client().download_file("runs", key, str(copy / key[4:]))
    faults["s3"] = s3.env()
    faults["mirrors_left"] = sorted(p.name for p in (root / "mirrors").iterdir())
    return cfg, copy, json.loads(again.stdout), faults


@pytest.fixture(scope="module")
def bf16(ray_address, base_cfg, tmp_path_factory):
    """zero2's recipe with `deepspeed.precision: bf16` (DeepSpeed casts the model, keeps fp32 masters)."""
    cfg = with_changes(base_cfg, deepspeed={"precision": "bf16"})
    run_dir = tmp_path_factory.mktemp("bf16")
    return cfg, run_dir, _train(cfg, run_dir, ["dense", "prune"])


@pytest.fixture(scope="module")
def accum(ray_address, base_cfg, tmp_path_factory):
    """1 worker accumulating 2 micro-batches of 2 rows: the same global batch as zero2's 2 workers."""
    cfg = with_changes(base_cfg, scaling={"num_workers": 1}, deepspeed={"grad_accum_steps": 2})
    run_dir = tmp_path_factory.mktemp("accum")
    return cfg, run_dir, _train(cfg, run_dir, ["dense"])


ADAPTIVE_DS = {  # the paper recipe's DeepSpeed settings, and ZeRO-3 (also with the authors' switches)
    "zero2_bf16": {"zero_stage": 2, "precision": "bf16"},
    "zero3": {"zero_stage": 3, "precision": "fp32"},
    "zero3_authors": {"zero_stage": 3, "precision": "fp32"},
}


@pytest.fixture(scope="module", params=list(ADAPTIVE_DS))
def adaptive(request, ray_address, base_cfg, tmp_path_factory):
    """The paper's output layer (adaptive input + softmax, tied), 20 dense steps on 2 workers."""
    switches = MODEL_PRESETS["authors"] if request.param.endswith("authors") else {}  # learned positions etc.
    cfg = with_changes(
        base_cfg,
        model={"adaptive_cutoffs": [1000, 4000], "adaptive_div": 2, **switches},
        deepspeed=ADAPTIVE_DS[request.param],
        train={"max_steps": 20, "eval_every": 20, "checkpoint_every": 20},
    )
    run_dir = tmp_path_factory.mktemp(f"adaptive_{request.param}")
    return cfg, run_dir, _train(cfg, run_dir, ["dense"])


# ---- 1. phases, model directories and gates under ZeRO-2 and ZeRO-3 -------------------------------


@pytest.mark.parametrize("run", ["zero2", "zero3", "bf16", "in_bucket"])
def test_dense_then_prune_with_two_workers(run, request):
    from allatt_dist.data.corpus import load_corpus
    from allatt_dist.evaluate import evaluate
    from allatt_dist.modelio import load_model_dir

    cfg, run_dir, results, *_ = request.getfixturevalue(run)
    dense, prune = results["dense"], results["prune"]
    assert dense["step"] == DENSE_STEPS and prune["step"] == PRUNE_STEPS
    assert dense["world_size"] == prune["world_size"] == 2
    for phase in ("dense", "prune"):
        saved = json.loads((run_dir / phase / "result.json").read_text())
        assert saved["step"] == results[phase]["step"]
        assert math.isfinite(saved["valid_ppl"]) and saved["valid_ppl"] > 1
        # the last eval of a phase scores the whole valid split
        assert saved["valid_tokens"] == scored_tokens(Path(cfg.data.path) / "valid.txt")
    assert yaml.safe_load((run_dir / "run.yaml").read_text())["deepspeed"]["zero_stage"] == cfg.deepspeed.zero_stage

    dense_model, vocab, dense_meta = load_model_dir(run_dir / "dense/model")
    assert not dense_model.gates and dense_meta["phase"] == "dense"
    assert dense_meta["params"] == dense["params"]
    gated, _, _ = load_model_dir(run_dir / "prune/model")
    pruned, _, pruned_meta = load_model_dir(run_dir / "prune/pruned")
    assert len(gated.gates) == cfg.model.num_layers and not pruned.gates

    # The gate probabilities of the last eval (what gates/heatmap shows) are those of the exported
    # model, under ZeRO-3 too, where the logits were partitioned across the two ranks in training.
    probs = np.stack([g.probabilities().detach().numpy() for g in gated.gates])  # (layers, heads)
    np.testing.assert_allclose(np.array(prune["gate_probs"]), probs, atol=1e-6)
    open_heads = [int(g.open_mask().sum()) for g in gated.gates]
    assert prune["open_heads"] == open_heads
    assert prune["heads_per_layer"] == pruned_meta["heads_per_layer"] == pruned.heads_per_layer == open_heads
    assert prune["hard_sparsity"] == pytest.approx(1 - sum(open_heads) / probs.size)
    assert pruned_meta["params"] == prune["params"] <= prune["dense_params"] == dense["params"]
    tb, last = run_dir / "tb/prune", DENSE_STEPS + PRUNE_STEPS  # one timeline: prune continues dense's steps
    for i, n in enumerate(open_heads):
        assert scalars(tb, f"gates/open_heads/layer_{i}")[last] == n
    assert scalars(tb, "gates/hard_sparsity")[last] == pytest.approx(prune["hard_sparsity"])

    # The physically pruned model scores text exactly like the gated one in eval mode.
    valid = load_corpus(cfg.data, splits=("train", "valid")).tokens("valid")
    a = evaluate(gated, valid, 8, max_segments=3)
    b = evaluate(pruned, valid, 8, max_segments=3)
    assert a.tokens == b.tokens and a.nll == pytest.approx(b.nll, rel=1e-5)
    assert len(vocab) == gated.vocab_size


def test_a_run_in_a_bucket_survives_kills_and_ends_like_an_uninterrupted_one(in_bucket, zero2):
    """Object storage: the killed worker and the killed driver resumed from the bucket's newest checkpoint, and
    the run ended as zero2 (same recipe, a local folder, never interrupted) did: same curves, same gates."""
    _, copy, results, faults = in_bucket
    assert faults["driver_returncode"] == -signal.SIGKILL, faults["driver_stderr"][-3000:]
    first, second, third = _restart_segments(copy / "tb/dense")
    reference = curve(zero2[1] / "tb/dense")
    _check_restart(first, second, faults["worker_kill_after"], reference)
    assert _check_restart(second, third, faults["driver_kill_after"], reference) == faults["published_at_driver_kill"]
    for phase in ("dense", "prune"):
        np.testing.assert_allclose(curve(copy / "tb" / phase), curve(zero2[1] / "tb" / phase), rtol=1e-4)
    assert results["prune"]["heads_per_layer"] == zero2[2]["prune"]["heads_per_layer"]
    np.testing.assert_allclose(results["prune"]["gate_probs"], zero2[2]["prune"]["gate_probs"], atol=1e-5)
    assert results["prune"]["valid_ppl"] == pytest.approx(zero2[2]["prune"]["valid_ppl"], rel=1e-4)
    kept = sorted((copy / "dense/checkpoints").glob("checkpoint_*"))
    assert len(kept) == zero2[0].train.keep_checkpoints and all((k / "MANIFEST.json").is_file() for k in kept)
    assert faults["mirrors_left"] == [], "local copies left behind (the killed processes' are swept by the rerun)"


def test_models_in_a_bucket_are_evaluated_and_pruned_from_it(in_bucket, tmp_path):
    """`evaluate` and `prune` read a model directory from the bucket (and `prune --out` writes one there)."""
    cfg, _, results, faults = in_bucket
    env = {**os.environ, **faults["s3"], "ALLATT_MIRROR_DIR": str(tmp_path / "mirrors")}
    data = ["--set", f"data.path={cfg.data.path}"]
    r = run_cli("evaluate", "s3://runs/run/prune/pruned", "--split", "valid", "--batch-size", "32", *data, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["ppl"] == pytest.approx(results["prune"]["valid_ppl"], rel=1e-4)
    prune = ["prune", "s3://runs/run/prune/model", "--out", "s3://runs/pruned"]
    r = run_cli(*prune, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["heads_per_layer"] == results["prune"]["heads_per_layer"]
    r = run_cli(*prune, env=env)
    assert r.returncode == 2 and "a model directory already exists there" in r.stderr, r.stderr
    assert not list((tmp_path / "mirrors").iterdir()), "a local copy was left behind"


def test_a_budget_targeted_prune_lands_at_or_under_its_budget_within_one_head(zero2, tmp_path):
    import shutil

    from allatt_dist.model.pruning import per_head_params
    from allatt_dist.model.targets import non_embedding_params

    base_cfg, run_dir, _ = zero2
    dense, head = non_embedding_params(base_cfg.model), per_head_params(base_cfg.model)
    budget = dense - 2 * head - head // 3  # needs 3 heads removed: 2 leave it over budget
    cfg = with_changes(base_cfg, gates={"sparsity_target": None, "param_budget": budget})
    shutil.copytree(run_dir / "dense", tmp_path / "dense")
    result = train(make_plan(cfg, tmp_path, progress=False, force=True), ["prune"])["prune"]
    pruned_non_embedding = dense - (8 - sum(result["heads_per_layer"])) * head
    assert sum(result["heads_per_layer"]) == 8 - 3
    assert budget - head < pruned_non_embedding <= budget
    assert result["dense_params"] - result["params"] == 3 * head


def test_a_phase_resumed_after_its_last_report_reports_it_again(zero2, tmp_path):
    """Killed between the last checkpoint's report and the phase's end (in a search: before Tune recorded the
    trial as done), the rerun exports the model and reports that checkpoint's metrics again, so whoever waits
    for the last report gets it: Tune ends the trial with its metric instead of refusing an empty result."""
    import shutil

    from ray.train import UserCallback

    from allatt_dist.train.trainer import run_phase

    cfg, run_dir, results = zero2
    shutil.copytree(run_dir, tmp_path / "run")
    for done in ("prune/result.json", "prune/pruned", "prune/model"):  # what the end of the phase writes
        path = tmp_path / "run" / done
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    seen = tmp_path / "reports.jsonl"

    class Record(UserCallback):  # runs in Ray Train's controller: records to a file
        def after_report(self, run_context, metrics, checkpoint):
            with open(seen, "a") as f:
                f.write(json.dumps(metrics[0]) + "\n")

    result = run_phase(make_plan(cfg, tmp_path / "run", progress=False), "prune", callbacks=[Record()])
    reports = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(reports) == 1, reports  # no step was trained again: only the report of the last checkpoint
    assert reports[0]["step"] == PRUNE_STEPS and reports[0]["valid_ppl"] == results["prune"]["valid_ppl"]
    assert result["heads_per_layer"] == results["prune"]["heads_per_layer"]
    assert (tmp_path / "run/prune/model/model.safetensors").is_file()


def test_zero3_trains_like_zero2(zero2, zero3):
    """Partitioning parameters changes where they live, not the maths: same loss curves, same gates
    (and the ZeRO-3 dense phase survived two kills, so this is also the check of exact resumption)."""
    for phase in ("dense", "prune"):
        np.testing.assert_allclose(
            curve(zero3[1] / "tb" / phase), curve(zero2[1] / "tb" / phase), rtol=1e-3, err_msg=phase
        )
    np.testing.assert_allclose(zero3[2]["prune"]["gate_probs"], zero2[2]["prune"]["gate_probs"], atol=1e-3)
    assert zero3[2]["dense"]["valid_ppl"] == pytest.approx(zero2[2]["dense"]["valid_ppl"], rel=1e-3)


def test_bf16_trains_like_fp32(zero2, bf16):
    """bf16 weights and activations (DeepSpeed's bf16 mode, fp32 master weights in the optimizer) follow
    the fp32 loss curve within bf16 rounding, and the exported model is fp32 again."""
    from allatt_dist.modelio import load_model_dir

    for phase in ("dense", "prune"):
        got, want = curve(bf16[1] / "tb" / phase), curve(zero2[1] / "tb" / phase)
        assert np.isfinite(got).all() and len(got) == len(want)
        # Step by step over the start of the dense phase; later the two trajectories drift apart by
        # rounding (batches of 4 rows, lr 5e-3; the prune phase starts from the drifted dense models), so
        # there the 10-step means are compared.
        if phase == "dense":
            np.testing.assert_allclose(got[:20], want[:20], rtol=0.01, err_msg=phase)
        means = lambda c: c[: len(c) // 10 * 10].reshape(-1, 10).mean(axis=1)  # noqa: E731
        np.testing.assert_allclose(means(got), means(want), rtol=0.05, err_msg=phase)
    model, _, _ = load_model_dir(bf16[1] / "dense/model")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ---- 2. data parallelism ------------------------------------------------------------------------


def test_two_workers_match_one_worker_at_the_same_global_batch(zero2, one_worker):
    """Each of 2 ranks takes half of the global batch's rows; averaged gradients make the same updates."""
    two, one = zero2[1] / "tb/dense", one_worker[1] / "tb/dense"
    loss2, loss1 = curve(two), curve(one)
    assert len(loss1) == len(loss2) == DENSE_STEPS
    np.testing.assert_allclose(loss2, loss1, rtol=1e-3)
    np.testing.assert_allclose(curve(two, "train/grad_norm"), curve(one, "train/grad_norm"), rtol=1e-2)
    # Validation rows are split across the ranks and the totals summed: the same perplexity.
    v2, v1 = scalars(two, "valid/ppl"), scalars(one, "valid/ppl")
    assert sorted(v2) == sorted(v1) == [20, 40, 60]
    np.testing.assert_allclose([v2[s] for s in sorted(v2)], [v1[s] for s in sorted(v2)], rtol=1e-3)
    d2, d1 = zero2[2]["dense"], one_worker[2]["dense"]
    assert d2["world_size"] == 2 and d1["world_size"] == 1
    assert d2["valid_tokens"] == d1["valid_tokens"]
    assert d2["train_loss"] == pytest.approx(d1["train_loss"], rel=1e-3)  # the global batch's loss on both
    # Each rank holds half of the Adam state under ZeRO-2 (one rank: all of it).
    assert d2["optimizer_state_bytes"][0] == pytest.approx(d1["optimizer_state_bytes"][0] / 2, rel=0.01)
    assert loss2[-5:].mean() < loss2[:5].mean() - 1.0  # it trained: not two equal flat lines


def test_gradient_accumulation_matches_two_workers(zero2, accum):
    """Two micro-batches accumulated on one worker make the same updates as two workers' halves."""
    np.testing.assert_allclose(curve(accum[1] / "tb/dense"), curve(zero2[1] / "tb/dense"), rtol=1e-3)
    assert accum[2]["dense"]["world_size"] == 1
    assert accum[2]["dense"]["valid_ppl"] == pytest.approx(zero2[2]["dense"]["valid_ppl"], rel=1e-3)


def test_adaptive_softmax_trains(adaptive):
    """Adaptive input and softmax (the paper's WikiText-103 output layer) train on 2 workers under ZeRO-2
    with bf16 and under ZeRO-3 (the clusters a batch has targets in differ between ranks), and the
    exported model scores the validation split as the workers did."""
    from allatt_dist.data.corpus import load_corpus
    from allatt_dist.evaluate import evaluate
    from allatt_dist.model.output import AdaptiveIO
    from allatt_dist.modelio import load_model_dir

    cfg, run_dir, results = adaptive
    loss = curve(run_dir / "tb/dense")
    # it trained: 20 steps from ln(vocab) ~ 8.8 nats (the slice's 6.4k words) take the loss down by half a nat
    assert len(loss) == 20 and np.isfinite(loss).all() and loss[-5:].mean() < loss[:5].mean() - 0.5
    model, _, meta = load_model_dir(run_dir / "dense/model")
    assert isinstance(model.io, AdaptiveIO) and meta["params"] == results["dense"]["params"]
    valid = load_corpus(cfg.data, splits=("train", "valid")).tokens("valid")
    res = evaluate(model, valid, cfg.data.eval_batch_size)
    assert res.tokens == results["dense"]["valid_tokens"]
    # The workers scored it with the trained weights in the run's precision, the export holds fp32.
    rel = 1e-4 if cfg.deepspeed.precision == "fp32" else 0.02
    assert math.exp(res.nll) == pytest.approx(results["dense"]["valid_ppl"], rel=rel)


# ---- 4. TensorBoard ------------------------------------------------------------------------------


def test_tensorboard_tags_and_values(zero2):
    cfg, run_dir, _ = zero2
    dense_files, prune_files = event_files(run_dir / "tb/dense"), event_files(run_dir / "tb/prune")
    assert len(dense_files) == len(prune_files) == 1  # rank 0 writes, one writer per phase
    dense, prune = load_events(dense_files[0]), load_events(prune_files[0])
    train_tags = {
        "train/loss",
        "train/ppl",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/step_time_s",
        "valid/ppl",
    }
    gate_tags = {
        "gates/l0_penalty",
        "gates/expected_sparsity",
        "gates/target",
        "gates/lambda_1",
        "gates/lambda_2",
        "gates/hard_sparsity",
        "gates/open_heads/layer_0",
        "gates/open_heads/layer_1",
    }
    assert train_tags <= set(dense.Tags()["scalars"])
    assert not [t for t in dense.Tags()["scalars"] if t.startswith("gates/")] and not dense.Tags()["images"]
    assert train_tags | gate_tags <= set(prune.Tags()["scalars"])
    assert prune.Tags()["images"] == ["gates/heatmap"]

    # One timeline: the prune run's steps continue the dense run's (61..80 after 1..60).
    for acc, max_steps, off in ((dense, cfg.train.max_steps, 0), (prune, cfg.prune.max_steps, DENSE_STEPS)):
        s = {tag: {e.step - off: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
        steps = list(range(1, max_steps + 1))
        assert sorted(s["train/loss"]) == steps  # log_every=1
        loss = np.array([s["train/loss"][i] for i in steps])
        assert np.isfinite(loss).all() and (loss > 0).all() and loss[0] < math.log(30_000)
        np.testing.assert_allclose([s["train/ppl"][i] for i in steps], np.exp(loss), rtol=1e-5)
        # The rate each step's update used: linear warm-up from lr/warmup_steps up to lr, then cosine decay.
        expected_lr = [cfg.train.lr * lr_multiplier(i - 1, cfg, max_steps) for i in steps]
        np.testing.assert_allclose([s["train/lr"][i] for i in steps], expected_lr, rtol=1e-5)
        assert s["train/lr"][1] == pytest.approx(cfg.train.lr / cfg.train.warmup_steps, rel=1e-5)
        assert s["train/lr"][cfg.train.warmup_steps] == pytest.approx(cfg.train.lr, rel=1e-5)
        assert s["train/lr"][max_steps] < s["train/lr"][max_steps // 2] < cfg.train.lr
        for tag in ("train/grad_norm", "perf/tokens_per_s", "perf/step_time_s"):
            vals = np.array(list(s[tag].values()))
            assert sorted(s[tag]) == steps and np.isfinite(vals).all() and (vals > 0).all(), tag
        assert sorted(s["valid/ppl"]) == [20, 40, 60][: max_steps // 20]
        assert all(1 < v < 1e5 for v in s["valid/ppl"].values())

    s = {tag: {e.step - DENSE_STEPS: e.value for e in prune.Scalars(tag)} for tag in prune.Tags()["scalars"]}
    g, total = cfg.gates, cfg.model.num_layers * cfg.model.num_heads
    for step, target in s["gates/target"].items():  # the target ramps in over the gate warm-up
        assert target == pytest.approx(g.sparsity_target * min(1.0, step / g.warmup_steps), rel=1e-5)
    assert all(0.0 <= v <= 1.0 for v in s["gates/expected_sparsity"].values())
    for step, penalty in s["gates/l0_penalty"].items():
        # L0 = expected heads with a non-zero stretched gate, P(s > 0); expected sparsity counts the heads
        # the hard gate closes, P(s <= 0.5): so L0 >= expected open heads, and both stay within the model
        assert (1 - s["gates/expected_sparsity"][step]) * total <= penalty + 1e-4
        assert 0.0 < penalty <= total
    assert s["gates/lambda_1"][1] == 0.0 and s["gates/lambda_1"][PRUNE_STEPS] != 0.0  # the multiplier moves
    assert sorted(s["gates/hard_sparsity"]) == [20]  # written at each eval
    for step, hard in s["gates/hard_sparsity"].items():
        heads = [s[f"gates/open_heads/layer_{i}"][step] for i in range(cfg.model.num_layers)]
        assert all(0 <= h <= cfg.model.num_heads for h in heads)
        assert hard == pytest.approx(1 - sum(heads) / total)

    from PIL import Image

    images = prune.Images("gates/heatmap")
    assert [im.step for im in images] == [DENSE_STEPS + 20]
    img = Image.open(io.BytesIO(images[0].encoded_image_string))
    assert img.format == "PNG" and img.size == (images[0].width, images[0].height) and min(img.size) > 200

    # Exact values, whatever the smoothing: each eval is also a text table, and the Custom Scalars layout
    # opens on training loss and validation perplexity.
    from tensorboard.plugins.custom_scalar import layout_pb2

    for acc, phase, off in ((dense, "dense", 0), (prune, "prune", DENSE_STEPS)):
        texts = acc.Tensors(f"eval/{phase}/text_summary")
        assert [t.step for t in texts] == [off + 20 * k for k in range(1, len(texts) + 1)] and texts
        last = texts[-1].tensor_proto.string_val[0].decode()
        ppl = {e.step: e.value for e in acc.Scalars("valid/ppl")}[texts[-1].step]
        shown = next(line for line in last.splitlines() if line.startswith("| valid/ppl |"))
        assert float(shown.split("|")[2]) == pytest.approx(ppl, rel=1e-6)
        layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
        assert layout.category[0].title == "1. train and valid"
        assert [c.title for c in layout.category[0].chart] == ["train loss", "valid perplexity"]
    assert "| open_heads |" in last and "| hard_sparsity |" in last


# ---- 3. faults and re-runs ------------------------------------------------------------------------


def test_rerun_of_a_finished_run_skips(zero2):
    cfg, run_dir, _ = zero2
    before = snapshot(run_dir)
    t0 = time.monotonic()
    again = train(make_plan(cfg, run_dir, progress=False), ["dense", "prune"])
    assert time.monotonic() - t0 < 20
    assert again["dense"]["step"] == DENSE_STEPS and again["prune"]["step"] == PRUNE_STEPS
    after = snapshot(run_dir)
    assert after.keys() == before.keys()
    after.pop("run.yaml"), before.pop("run.yaml")  # rewritten, with the same content
    assert after == before  # no new checkpoint, events file, model or result


def _restart_segments(tb_dir: Path) -> list[dict[int, float]]:
    """train/loss of each events file of a run, oldest first: one file per (re)start of the workers."""
    return [file_scalars(f, "train/loss") for f in event_files(tb_dir)]


def _check_restart(before: dict[int, float], after: dict[int, float], killed_after: int, reference) -> int:
    """`after` is the curve of the restarted workers: it starts right after the newest checkpoint
    published when the process was killed (not at step 1), and its first step gives the loss of the
    uninterrupted run `reference` (and of the killed run, if that step's events reached the disk before
    the kill). Returns that checkpoint's step."""
    first = min(after)
    assert (first - 1) % CKPT_EVERY == 0, sorted(after)
    assert killed_after <= first - 1 <= killed_after + CKPT_EVERY, (killed_after, sorted(after))
    assert after[first] == pytest.approx(reference[first - 1], rel=1e-3)
    if first in before:
        assert after[first] == pytest.approx(before[first], rel=1e-3)
    assert after[first] < reference[0] - 0.5  # not back at the initial loss
    return first - 1


def test_worker_killed_mid_run_recovers(zero3, zero2):
    """A training worker SIGKILLed after step 20: with max_failures=1 the group restarts from the checkpoint."""
    _, run_dir, results, faults = zero3
    segments = _restart_segments(run_dir / "tb/dense")
    assert len(segments) == 3, [sorted(s) for s in segments]  # start, restart after the worker kill, re-run
    first, second, _ = segments
    assert max(first) >= faults["worker_kill_after"]
    _check_restart(first, second, faults["worker_kill_after"], curve(zero2[1] / "tb/dense"))
    assert results["dense"]["step"] == DENSE_STEPS


def test_driver_killed_then_rerun_resumes(zero3, zero2):
    """`allatt-dist train` SIGKILLed after step 30 (no clean-up at all); the same call again resumes."""
    _, run_dir, _, faults = zero3
    assert faults["driver_returncode"] == -signal.SIGKILL, faults["driver_stderr"][-3000:]
    assert not faults["result_before_rerun"]
    _, second, third = _restart_segments(run_dir / "tb/dense")
    resumed_from = _check_restart(second, third, faults["driver_kill_after"], curve(zero2[1] / "tb/dense"))
    assert resumed_from == faults["published_at_driver_kill"]  # the newest checkpoint published at the kill
    assert max(third) == DENSE_STEPS
    assert json.loads((run_dir / "dense/result.json").read_text())["step"] == DENSE_STEPS


# ---- 5. bad input: one line on stderr, exit 2, nothing written ------------------------------------


@pytest.fixture(scope="module")
def cli_files(base_cfg, tmp_path_factory):
    """A config file, a run dir holding another config's run, and one holding a Transformer-XL dense model."""
    from allatt_dist.data.corpus import load_corpus
    from allatt_dist.model.transformer import LanguageModel
    from allatt_dist.modelio import save_model_dir

    root = tmp_path_factory.mktemp("cli")
    cfg_file = root / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(base_cfg.to_dict()))
    other = root / "other_run"
    other_cfg = with_changes(base_cfg, model={"hidden_dim": 64})
    prepare_run_dir(make_plan(other_cfg, other))  # as `train` writes it: with the data folder resolved
    (other / "dense").mkdir()
    (other / "dense/result.json").write_text("{}")  # a finished phase: worth protecting
    txl = root / "txl_run"
    xl_cfg = with_changes(base_cfg, model={"architecture": "transformer_xl", "ffn_dim": 64})
    vocab = load_corpus(base_cfg.data, splits=("train",)).vocab
    save_model_dir(LanguageModel(xl_cfg.model, len(vocab)), vocab, txl / "dense/model", extra={"phase": "dense"})
    afile = root / "afile"
    afile.write_text("not a run directory")
    return {"cfg": cfg_file, "other": other, "txl": txl, "root": root, "afile": afile}


BAD_INPUT = {
    # case: (extra arguments, run dir (None: a fresh path), what the error line must say)
    "too_many_workers": (["--set", "scaling.num_workers=8", "--set", "train.batch_size=8"], None, "never be placed"),
    "unreachable_address": (["--address", "127.0.0.1:1"], None, "could not connect to Ray at 127.0.0.1:1"),
    "prune_without_dense": (["--phase", "prune"], None, "--phase prune needs"),
    "dense_of_another_architecture": (["--phase", "prune"], "txl", "a transformer_xl model"),
    "fp16_on_cpu": (["--set", "deepspeed.precision=fp16"], None, "fp16 needs a GPU"),
    "lamb_at_zero_2": (["--set", "train.optimizer=lamb"], None, "lamb cannot run at deepspeed.zero_stage 2"),
    "gpu_on_a_cpu_cluster": (["--set", "scaling.use_gpu=true"], None, "use_gpu=true but the cluster has no GPUs"),
    "out_is_a_file": ([], "afile", "exists and is not a folder"),
    "run_dir_of_another_config": ([], "other", "holds a run of another config (differs in model.hidden_dim)"),
    "unknown_key": (["--set", "train.learning_rate=0.1"], None, "train.learning_rate: unknown key"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_fast_with_one_line(case, ray_address, cli_files):
    args, where, words = BAD_INPUT[case]
    out = cli_files[where] if where else cli_files["root"] / f"fresh_{case}"
    before = snapshot(out), out.read_bytes() if out.is_file() else None
    if "--address" not in args:
        args = [*args, "--address", ray_address]  # join the module's Ray rather than start another
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    proc = subprocess.run(
        cli_train(cli_files["cfg"], out, *args), cwd=cli_files["root"], capture_output=True, text=True, env=env
    )
    elapsed = time.monotonic() - t0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("allatt-dist train: error: ") and words in lines[0], lines[0]
    assert proc.stdout == ""
    assert elapsed < 60, f"took {elapsed:.0f}s"
    assert (snapshot(out), out.read_bytes() if out.is_file() else None) == before  # nothing created or touched


def test_force_reuses_a_run_dir_of_another_config(base_cfg, tmp_path):
    prepare_run_dir(make_plan(with_changes(base_cfg, model={"hidden_dim": 64}), tmp_path, force=False))
    (tmp_path / "dense/model").mkdir(parents=True)
    (tmp_path / "dense/model/config.json").write_text("{}")
    with pytest.raises(UserError, match="holds a run of another config"):
        prepare_run_dir(make_plan(base_cfg, tmp_path, force=False))
    prepare_run_dir(make_plan(base_cfg, tmp_path, force=True))
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["model"]["hidden_dim"] == 32


def test_a_run_dir_where_nothing_finished_is_taken_over(base_cfg, tmp_path):
    """A first attempt that failed (bad data, too big a model) leaves run.yaml behind; the corrected
    command must not be refused for it."""
    prepare_run_dir(make_plan(with_changes(base_cfg, model={"hidden_dim": 64}), tmp_path, force=False))
    (tmp_path / "dense/checkpoints").mkdir(parents=True)
    prepare_run_dir(make_plan(base_cfg, tmp_path, force=False))
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["model"]["hidden_dim"] == 32


def test_a_dense_model_of_another_shape_is_refused_before_workers_start(base_cfg, tmp_path):
    from allatt_dist.data.corpus import load_corpus
    from allatt_dist.errors import CheckpointError
    from allatt_dist.model.transformer import LanguageModel
    from allatt_dist.modelio import save_model_dir
    from allatt_dist.train.trainer import check_starting_model

    vocab = load_corpus(base_cfg.data, splits=("train",)).vocab
    save_model_dir(LanguageModel(base_cfg.model, len(vocab)), vocab, tmp_path / "m")
    check_starting_model(tmp_path / "m", base_cfg.model)
    check_starting_model(tmp_path / "m", base_cfg.model.model_copy(update={"dropout": 0.3}))  # no weights
    with pytest.raises(CheckpointError, match=r"does not match the recipe \(model.num_layers 2 there, 3 here"):
        check_starting_model(tmp_path / "m", base_cfg.model.model_copy(update={"num_layers": 3}))
    check_starting_model(tmp_path / "m", base_cfg.model.model_copy(update={"num_layers": 3}), ("num_layers",))


def test_checks_run_before_anything_is_written(ray_address, base_cfg, tmp_path):
    """The plan (and the capacity check that `train` commands run on it) refuse bad input before the run
    dir is created."""
    from allatt_dist.cluster.capacity import check_fits

    def plan_and_train(cfg, run_dir, phases):
        plan = make_plan(cfg, run_dir, progress=False)
        check_fits(plan.cfg.scaling)
        return train(plan, phases)

    cases = {
        "num_workers=8": with_changes(base_cfg, scaling={"num_workers": 8}, train={"batch_size": 8}),
        "fp16 needs a GPU": with_changes(base_cfg, deepspeed={"precision": "fp16"}),
    }
    for words, cfg in cases.items():
        t0 = time.monotonic()
        with pytest.raises(UserError, match=words):
            plan_and_train(cfg, tmp_path / "run", ["dense"])
        assert time.monotonic() - t0 < 10
    with pytest.raises(UserError, match="--phase finetune needs"):
        plan_and_train(base_cfg, tmp_path / "run", ["finetune"])
    assert not (tmp_path / "run").exists()
