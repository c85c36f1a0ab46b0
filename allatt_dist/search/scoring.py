"""Score models on the cluster: prune and test-evaluate each one as a Ray task, all at once.

A task takes one GPU where the cluster has GPUs, one CPU otherwise; it reads the model directory and the
test split (from the token cache of its node, `data/cache.py`), and returns the perplexity and the pruned
model, which the driver saves. Evaluation is deterministic (eval mode, whole split, memory carried), so the
results equal those of evaluating one model after another in one process (tests/test_rank_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from allatt_dist.config import DataConfig
from allatt_dist.data.corpus import load_corpus
from allatt_dist.errors import CheckpointError
from allatt_dist.evaluate import evaluate
from allatt_dist.model.pruning import prune_model
from allatt_dist.modelio import load_model_dir
from allatt_dist.rundir import RunDir


@dataclass(frozen=True)
class Job:
    name: str
    source: Path  # under store.root
    gated: bool
    store: RunDir | None = None  # the experiment directory (object storage: the task downloads the model itself)


def score_one(job: Job, data_cfg: DataConfig, device: str = "cpu") -> dict:
    """Prune (when gated) and test-evaluate one model; {"error": line} when it cannot be scored (missing,
    damaged, or its vocabulary is not the corpus's), the line naming the model where the user keeps it."""
    import torch

    corpus = load_corpus(data_cfg, splits=("test",))
    store = job.store or RunDir(job.source)
    where = store.uri(job.source) if job.store is not None else str(job.source)
    mine = store.here("score")
    source = store.moved(job.source, mine)
    try:
        mine.fetch(source)
        model, vocab, _ = load_model_dir(source)
    except (CheckpointError, FileNotFoundError) as e:
        return {"error": str(e).replace(str(source), where) if str(e) else f"{where}: missing"}
    finally:
        mine.discard()
    if vocab.fingerprint() != corpus.vocab.fingerprint():
        return {"error": f"{where}: vocabulary differs from the experiment's corpus"}
    model = prune_model(model) if job.gated else model
    res = evaluate(model.to(device), corpus.tokens("test"), batch_size=data_cfg.test_batch_size)
    return {"test_ppl": res.ppl, "model": model.to(torch.device("cpu")), "vocab": vocab}


def _task(job: Job, data_cfg: DataConfig) -> dict:
    import ray

    device = "cuda" if ray.get_gpu_ids() else "cpu"
    return score_one(job, data_cfg, device)


def score_all(jobs: list[Job], data_cfg: DataConfig, progress: bool) -> list[dict]:
    """Every job's result, in the order given, computed in parallel as Ray tasks; a job that could not be
    scored gives {"error": line} and the others go on."""
    import ray
    from tqdm import tqdm

    if not jobs:
        return []
    on_gpu = ray.cluster_resources().get("GPU", 0.0) >= 1.0
    task = ray.remote(num_gpus=1 if on_gpu else 0, num_cpus=0 if on_gpu else 1, max_retries=1)(_task)
    refs = [task.remote(job, data_cfg) for job in jobs]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[dict | None] = [None] * len(jobs)
    pending = list(refs)
    where = "GPU" if on_gpu else "CPU"
    with tqdm(total=len(jobs), desc=f"rank ({where} tasks)", unit="model", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    results[index[ref]] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    first = (str(e.cause) if e.cause is not None else str(e)).strip().splitlines()
                    job = jobs[index[ref]]
                    where = job.store.uri(job.source) if job.store is not None else str(job.source)
                    results[index[ref]] = {"error": f"{where}: scoring failed ({first[0] if first else e})"}
                bar.update(1)
    return results  # type: ignore[return-value]
