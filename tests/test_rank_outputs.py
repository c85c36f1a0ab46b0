"""`rank` replaces its outputs atomically: a reader of the experiment never sees a leaderboard entry
whose model folder is missing or incomplete, while `rank` runs or after it is killed at any moment.

The experiment is built here without Ray (a dense model and gated trial models written as the
search leaves them), with a corpus whose test split is cut short so that a ranking takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from clirun import cli_cmd

from allatt_dist.config import GateConfig, ModelConfig
from allatt_dist.data.corpus import load_corpus
from allatt_dist.errors import CheckpointError
from allatt_dist.model.transformer import LanguageModel
from allatt_dist.modelio import load_model_dir, save_model_dir
from allatt_dist.recipe import build_config
from allatt_dist.search.rank import rank

REPO = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(num_layers=2, hidden_dim=16, num_heads=4, num_persistent=4, seq_len=16, mem_len=16)


def _short_corpus(d: Path, wt2_path: Path, test_lines: int) -> Path:
    """WikiText-2 mini with a short test split (the vocabulary comes from train: unchanged)."""
    d.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        shutil.copy(wt2_path / f"{split}.txt", d / f"{split}.txt")
    lines = (wt2_path / "test.txt").read_text().splitlines(keepends=True)
    (d / "test.txt").write_text("".join(lines[:test_lines]))
    return d


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, wt2_path) -> Path:
    return _short_corpus(tmp_path_factory.mktemp("corpus"), wt2_path, 40)


def _trial(exp: Path, name: str, seed: int, vocab, cfg) -> None:
    """A finished trial: run.yaml, status.json, prune/model (gated, some heads closed)."""
    t = exp / "trials" / name
    (t / "prune").mkdir(parents=True)
    (t / "run.yaml").write_text(json.dumps(cfg.with_values({"gates.temperature": 0.3 + seed / 100}).to_dict()))
    (t / "status.json").write_text('{"status": "finished"}')
    (t / "prune/result.json").write_text('{"valid_ppl": 1.0}')
    torch.manual_seed(seed)
    model = LanguageModel(MODEL, len(vocab), gates=GateConfig())
    with torch.no_grad():
        for blk in model.layers:
            blk.gate.log_alpha.copy_(torch.randn(4) * 3)
    save_model_dir(model, vocab, t / "prune/model", gates=GateConfig(), extra={"phase": "prune"})


def _experiment(root: Path, corpus: Path, trials: dict[str, int]) -> Path:
    exp = root / "exp"
    cfg = build_config({"model": MODEL.model_dump(mode="json"), "data": {"path": str(corpus)}})
    vocab = load_corpus(cfg.data, splits=("train",)).vocab
    exp.mkdir()
    (exp / "run.yaml").write_text(json.dumps(cfg.to_dict()))
    torch.manual_seed(0)
    save_model_dir(LanguageModel(MODEL, len(vocab)), vocab, exp / "dense/model", extra={"phase": "dense"})
    (exp / "dense/result.json").write_text('{"valid_ppl": 1.0}')
    for name, seed in trials.items():
        _trial(exp, name, seed, vocab, cfg)
    return exp


def consistent_view(exp: Path) -> tuple[str, list[str]] | None:
    """(leaderboard text, problems) when the leaderboard stayed the same while its model folders were
    checked (None: it changed meanwhile, so this look proves nothing). Every file read must be whole."""
    try:
        before = (exp / "leaderboard.json").read_text()
    except FileNotFoundError:
        return None
    problems = []
    for m in json.loads(before)["models"]:  # a half-written leaderboard.json fails to parse here
        if m["model_dir"]:
            try:
                load_model_dir(exp / m["model_dir"])
            except CheckpointError as e:
                problems.append(f"{m['name']}: {e}")
    return (before, problems) if (exp / "leaderboard.json").read_text() == before else None


def test_a_reader_during_rank_sees_only_whole_results(local_ray, tmp_path, corpus_dir):
    exp = _experiment(tmp_path, corpus_dir, {"a": 1, "b": 2, "c": 3})
    first = rank(exp, progress=False)
    old_names = {m["name"] for m in first["models"] if m["model_dir"]}
    for name in ("a", "b", "c"):  # the next ranking holds other trials: every trial model folder changes
        shutil.rmtree(exp / "trials" / name)
    vocab = load_corpus(build_config({"data": {"path": str(corpus_dir)}}).data, splits=("train",)).vocab
    cfg = build_config({"model": MODEL.model_dump(mode="json"), "data": {"path": str(corpus_dir)}})
    for name, seed in {"d": 4, "e": 5, "f": 6}.items():
        _trial(exp, name, seed, vocab, cfg)

    stop, seen, bad = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            view = consistent_view(exp)
            if view is not None:
                seen.add(view[0])
                bad.extend(view[1])

    t = threading.Thread(target=reader)
    t.start()
    try:
        second = rank(exp, progress=False)
        # The reader's look that spans the last replacement proves nothing: let it take one more (on a loaded
        # machine a look loading every model can take seconds), so that it sees the new leaderboard too.
        final, deadline = (exp / "leaderboard.json").read_text(), time.monotonic() + 120
        while final not in seen and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        t.join()
    assert not bad, bad[:3]
    assert len(seen) == 2, "the reader did not see both the old and the new leaderboard"
    new_names = {m["name"] for m in second["models"] if m["model_dir"]}
    assert old_names - {"dense"} and not (old_names & new_names) - {"dense"}
    on_disk = {p.parent.relative_to(exp / "models").as_posix() for p in (exp / "models").rglob("config.json")}
    assert on_disk == new_names  # old ones removed (model names nest: prune/<label>/<id>)
    assert not [p.name for p in exp.iterdir() if p.name.startswith(".")], "temporary folders left"


def _scored(exp: Path) -> int:
    """Models `rank` has scored so far (each saved whole into .rank-work/ before the outputs are written)."""
    work = exp / ".rank-work"
    try:  # model names nest (prune/<label>/<id>): count the whole model folders
        return sum(
            1 for p in work.rglob("config.json") if not any(x.startswith(".") for x in p.relative_to(work).parts)
        )
    except FileNotFoundError:
        return 0


def test_rank_killed_at_any_moment_leaves_a_whole_result(local_ray, tmp_path, corpus_dir):
    exp = _experiment(tmp_path, corpus_dir, {"a": 1, "b": 2, "c": 3, "d": 4})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = cli_cmd("rank", exp)
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode == 0
    # The killed commands join the session's Ray (`--address`) rather than each start one of their own: what
    # they leave on disk is the question here, and the first and last commands start their own as a user's does.
    killed = cli_cmd("rank", exp, "--address", local_ray)
    for delay in (None, 0.0, 0.005, 0.02, 0.05, 0.2):  # re-ranking, killed while scoring, then while writing
        p = subprocess.Popen(killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while _scored(exp) < (2 if delay is None else 5) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(delay or 0.0)
        p.send_signal(signal.SIGKILL)
        p.wait()
        view = consistent_view(exp)
        assert view is not None and not view[1], (delay, view)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # then once to the end
    assert r.returncode == 0, r.stderr
    view = consistent_view(exp)
    assert view is not None and not view[1]
    leftovers = [p.name for p in [*exp.iterdir(), *(exp / "models").rglob("*")] if p.name.startswith(".")]
    assert leftovers == [], f"temporary folders left: {leftovers}"


def test_two_rank_commands_at_once_one_is_refused_naming_the_other(tmp_path, wt2_path):
    corpus = _short_corpus(tmp_path / "corpus", wt2_path, 1000)  # a ranking that lasts a while
    exp = _experiment(tmp_path, corpus, {"a": 1, "b": 2})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = cli_cmd("rank", exp)
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while f'"pid": {first.pid},' not in _text(exp / ".lock") and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2, (second.returncode, second.stderr[-2000:])
    refusal = second.stderr.strip()
    assert refusal.count("\n") == 0 and f"in use by pid {first.pid} on " in refusal, refusal
    assert f"(allatt-dist rank {exp})" in refusal  # the other command, as it was typed
    assert consistent_view(exp)[1] == []


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
