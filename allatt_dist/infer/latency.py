"""Latency of ranked models on the device they rank on (`rank`'s latency columns).

Two numbers per model, timed in one place so that they compare: every model is measured by one task
(a GPU where the cluster has GPUs, else one CPU core, as the scoring tasks run), the models
interleaved round by round, the median kept:

- `latency_ms`: one eval forward of a segment at the eval batch size (B x seq_len test tokens,
  targets scored, the memory filled by the segment before), as `evaluate` runs it;
- `gen_tokens_per_s`: greedy generation at batch 1, `GEN_TOKENS` new tokens after a prompt of seq_len
  test tokens (incremental decoding, decode.py), prompt included in the time.

`latency_device` names the device (the CPU model and the threads used, or the GPU).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import numpy as np

ROUNDS = 5  # timed rounds after one warm-up round
GEN_TOKENS = 32


def device_name(device) -> str:
    import torch

    from allatt_dist.perf import cpu_name

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} thread(s)"


def _calls(model, tokens: np.ndarray, batch: int, device) -> tuple[Callable, Callable]:
    """(timed segment forward, timed generation) of one model."""
    import torch

    from allatt_dist.infer.decode import Sampling, generate

    t = model.cfg.seq_len
    need = batch * 2 * t + 1
    ids = torch.from_numpy(np.resize(tokens, need).astype(np.int64))  # the test split, repeated if short
    x = ids[:-1].view(batch, 2 * t).to(device)  # (B,2T): fill, then timed
    y = ids[1:].view(batch, 2 * t).to(device)
    with torch.no_grad():
        mems = model(x[:, :t], None, y[:, :t]).mems
    prompt = ids[:t].tolist()

    def segment():
        with torch.no_grad():
            model(x[:, t:], mems, y[:, t:])

    def gen():
        generate(model, prompt, Sampling(GEN_TOKENS, temperature=0.0))

    return segment, gen


def time_models(models: dict[str, object], tokens: np.ndarray, batch: int, device) -> dict[str, dict]:
    """name -> {latency_ms, gen_tokens_per_s, latency_device}, the models interleaved."""
    from allatt_dist.perf import clock

    calls = {name: _calls(m.to(device).eval(), tokens, batch, device) for name, m in models.items()}
    seg: dict[str, list[float]] = {n: [] for n in models}
    gen: dict[str, list[float]] = {n: [] for n in models}
    for r in range(ROUNDS + 1):
        for name, (segment, generate_) in calls.items():
            t0 = clock(device)
            segment()
            t1 = clock(device)
            generate_()
            t2 = clock(device)
            if r:  # round 0 warms up
                seg[name].append(t1 - t0)
                gen[name].append(t2 - t1)
    where = device_name(device)
    return {
        n: {
            "latency_ms": round(statistics.median(seg[n]) * 1e3, 3),
            "gen_tokens_per_s": round(GEN_TOKENS / statistics.median(gen[n]), 1),
            "latency_device": where,
        }
        for n in models
    }


def _task(models: dict[str, object], data_cfg, batch: int) -> dict[str, dict]:
    import ray
    import torch

    from allatt_dist.data.corpus import load_corpus

    device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
    tokens = load_corpus(data_cfg, splits=("test",)).tokens("test")
    return time_models(models, tokens, batch, device)


def time_on_cluster(models: dict[str, object], data_cfg, batch: int) -> dict[str, dict]:
    """`time_models` in one Ray task on the device the ranking scores on."""
    import ray

    if not models:
        return {}
    on_gpu = ray.cluster_resources().get("GPU", 0.0) >= 1.0
    task = ray.remote(num_gpus=1 if on_gpu else 0, num_cpus=0 if on_gpu else 1, max_retries=1)(_task)
    return ray.get(task.remote(models, data_cfg, batch))
