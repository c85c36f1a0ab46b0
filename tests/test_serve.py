"""`allatt-dist serve`: a real Ray Serve app on loopback (the CLI, its embedded local Ray), real HTTP clients.

One server for the module: an experiment whose Pareto front holds a dense and a pruned model, each
under its own route prefix. Stopped with Ctrl-C (SIGINT) as a user would, then every process it
started (found by a mark in their environment) is killed, nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from allatt_dist.config import ModelConfig
from allatt_dist.data.vocab import Vocab
from allatt_dist.infer.decode import Sampling, generate, score_batch
from allatt_dist.infer.text import prompt_ids, text_ids
from allatt_dist.model.registry import build_model
from allatt_dist.modelio import save_model_dir
from tests.ray_procs import kill_ours

requests = pytest.importorskip("requests")
pytest.importorskip("ray.serve")
pytestmark = pytest.mark.ray

CFG = ModelConfig(num_layers=3, hidden_dim=16, num_heads=4, num_persistent=4, seq_len=8, mem_len=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _experiment(root: Path) -> tuple[Path, dict]:
    vocab = Vocab(["<eos>", "<unk>", *[f"w{i}" for i in range(48)]])
    rows, models = [], {}
    for name, heads, ppl in (("dense", None, 100.0), ("prune/t50/0", [3, 0, 1], 120.0)):
        torch.manual_seed(0)
        model = build_model(CFG, len(vocab), None, heads).eval()
        meta = save_model_dir(model, vocab, root / "models" / name)
        rows.append({"name": name, "params": meta["params"], "test_ppl": ppl, "model_dir": f"models/{name}"})
        rows[-1]["pareto"] = True
        models[name] = (model, vocab)
    (root / "leaderboard.json").write_text(json.dumps({"models": rows}))
    return root, models


def _cli(*args: str, env=None, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "allatt_dist.cli", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    exp, models = _experiment(tmp_path_factory.mktemp("serve"))
    port, mark = _free_port(), f"allatt-serve-test-{uuid.uuid4().hex}"
    env = dict(os.environ, ALLATT_TEST_MARK=mark)
    args = ["serve", str(exp), "--port", str(port), "--batch-wait-ms", "100"]  # CPUs: an even share
    proc = _cli(*args, "--max-new-tokens", "50", "--max-tokens", "40", env=env, start_new_session=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=240)
    try:
        assert line and line[0].strip(), (
            f"serve did not start: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}"
        )
        routes = json.loads(line[0])["serving"]
        assert set(routes) == {"dense", "prune/t50/0"}
        yield f"http://127.0.0.1:{port}", models, exp, port
    finally:
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: Serve shut down, then the local Ray with the driver
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        kill_ours([proc], [mark])


def test_concurrent_requests_are_batched_and_correct(server):
    url, models, _, _ = server
    model, vocab = models["dense"]
    prompts = [f"w{i} w{i + 1} w{i + 2}" for i in range(10)]  # one length: decoded together when batched
    texts = [f"w{i} w3 zebra w{i + 5}" for i in range(6)]

    def gen(p):
        body = {"prompt": p, "max_new_tokens": 6, "temperature": 0.0}
        return requests.post(f"{url}/dense/generate", json=body, timeout=120)

    def score(t):
        return requests.post(f"{url}/dense/score", json={"text": t}, timeout=120)

    with ThreadPoolExecutor(16) as pool:
        gens = list(pool.map(gen, prompts))
        scores = list(pool.map(score, texts))
    assert all(r.status_code == 200 for r in gens + scores), [r.text for r in gens + scores]
    for p, r in zip(prompts, gens, strict=True):
        want = generate(model, prompt_ids(vocab, p), Sampling(6, temperature=0.0)).ids
        assert r.json()["text"] == " ".join(vocab.decode(want)) and r.json()["tokens"] == 6
    assert max(r.json()["batch"] for r in gens) > 1  # requests decoded together
    assert max(r.json()["batch"] for r in scores) > 1
    for t, r in zip(texts, scores, strict=True):
        nll, n = score_batch(model, [text_ids(vocab, t)])[0]
        assert r.json()["tokens"] == n and r.json()["nll"] == pytest.approx(nll / n, abs=1e-4)
    seeded = {"prompt": "w1 w2", "max_new_tokens": 8, "temperature": 1.0, "top_k": 10, "top_p": 0.9, "seed": 5}
    a = requests.post(f"{url}/prune/t50/0/generate", json=seeded, timeout=60).json()
    b = requests.post(f"{url}/prune/t50/0/generate", json=seeded, timeout=60).json()
    assert a["text"] == b["text"] and a["seed"] == 5  # the pruned model, seeded sampling reproduced


BAD = [
    ("post", "/dense/generate", b'{"prompt": "w1', 400, "body: not valid JSON"),
    ("post", "/dense/generate", b'["w1"]', 400, "expected a JSON object"),
    ("post", "/dense/generate", json.dumps({"prompt": "   "}).encode(), 400, "prompt: empty"),
    ("post", "/dense/score", json.dumps({"text": ""}).encode(), 400, "text: empty"),
    ("post", "/dense/generate", json.dumps({"prompt": "w1", "max_new_tokens": 51}).encode(), 413, "over this server"),
    ("post", "/dense/score", json.dumps({"text": "w1 " * 41}).encode(), 413, "42 tokens, over"),  # 41 words and <eos>
    ("post", "/dense/generate", json.dumps({"prompt": "w1", "top_p": 0}).encode(), 400, "top_p"),
    ("post", "/dense/generate", json.dumps({"prompt": "w1", "colour": 1}).encode(), 400, "colour"),
    ("get", "/dense/generate", None, 405, "use POST"),
    ("get", "/dense/nowhere", None, 404, "no such route"),
    ("get", "/nowhere/generate", None, 404, "not found"),
]


def test_bad_requests_get_one_line_4xx_while_good_ones_keep_succeeding(server):
    url, _, _, _ = server

    def bad(case):
        method, path, body, _, _ = case
        return getattr(requests, method)(url + path, data=body, timeout=60)

    def good(i):
        return requests.post(f"{url}/prune/t50/0/score", json={"text": f"w{i} w2"}, timeout=60)

    with ThreadPoolExecutor(12) as pool:
        goods = [pool.submit(good, i) for i in range(8)]
        bads = list(pool.map(bad, BAD))
    for case, r in zip(BAD, bads, strict=True):
        assert r.status_code == case[3] and case[4] in r.text and r.text.count("\n") == 0, (case, r.text)
    assert all(f.result().status_code == 200 for f in goods)
    health = requests.get(f"{url}/prune/t50/0/health", timeout=30).json()
    assert health["status"] == "ok" and health["heads_per_layer"] == [3, 0, 1]


def test_serve_refuses_a_port_in_use_and_a_folder_that_is_no_model(server, tmp_path):
    _, _, exp, port = server
    p = _cli("serve", str(exp), "--port", str(port))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.count("\n") == 1 and f"--port {port}: cannot listen" in err, err
    p = _cli("serve", str(tmp_path), "--port", str(_free_port()))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.count("\n") == 1 and "not a model directory" in err, err
