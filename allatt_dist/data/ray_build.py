"""The token cache built by Ray tasks over the chunks (`data.build_workers: ray`), for a corpus worth a cluster.

build.py reads a split in chunks on the driver, as for its process pool; here each chunk is one Ray task
(`num_cpus=1`, anywhere in the cluster) that counts its words or encodes its lines, and the result (a Counter,
or the chunk's uint32 ids) comes back through the object store to the driver, which writes the shards and
the entry exactly as the process pool's build does: the same files, the same ids. At most `limit` tasks
are in flight (twice the cluster's CPUs, at most MAX_IN_FLIGHT), so the driver's and the object store's
memory is bounded by the chunk size, not by the corpus. The vocabulary is put in the object store once.

Only the CLI's driver builds this way, after it connected (plan.py: `Plan.tokenised`); every other process
that finds the entry missing (a trial, a worker on a node without a shared `data.cache_dir`, `rank`,
`evaluate`) builds it with its own processes, as `data.build_workers: null` does, so no task waits on CPUs
that a trial's workers hold. This module imports Ray only when used and nothing of build.py (the functions
to run are given to it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

MAX_IN_FLIGHT = 64


def _call(fn: Callable, *args: Any) -> Any:
    """One task: `fn(*args)`, in a Ray worker (one tokenizers thread: the tasks are the parallelism)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return fn(*args)


class _Pending:
    def __init__(self, ref) -> None:
        self.ref = ref

    def result(self) -> Any:
        import ray

        return ray.get(self.ref)


class RayTasks:
    """`submit(fn, *args).result()` as a process pool's, each call one Ray task; `vocab` an object-store
    reference to the vocabulary (None when counting), `limit` the tasks kept in flight."""

    def __init__(self, vocab=None) -> None:
        import ray

        self._task = ray.remote(num_cpus=1)(_call)
        self.vocab = ray.put(vocab) if vocab is not None else None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.limit = max(2, min(2 * cpus, MAX_IN_FLIGHT))

    def submit(self, fn: Callable, *args: Any) -> _Pending:
        return _Pending(self._task.remote(fn, *args))

    def __enter__(self) -> RayTasks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.vocab = None  # the reference dropped: the object store frees the vocabulary
