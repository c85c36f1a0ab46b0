"""The streamed, sharded token-cache build (allatt_dist/data/build.py) on a synthetic corpus: time and peak
memory of a cold build (empty cache: count the word vocabulary, encode every split) and of a warm load (the
cache read back and checked against its manifest), for each worker count. Results: docs/performance.md,
"Building the cache of a corpus larger than memory".

    PYTHONPATH=$PWD python benchmarks/cache_build.py [MB] [WORKERS ...]     # default: 200 MB, 1 2

The corpus: lines of 12 words drawn from a 50,000-word Zipf (a=1.2) vocabulary, train = MB, valid and
test = MB/100 each, written once under $TMPDIR and removed at the end. Each measurement is a fresh
process (peak RSS: ru_maxrss of the process and of its build processes, the largest of them).
"""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
from allatt_dist.config import DataConfig
from allatt_dist.data.corpus import load_corpus
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
c = load_corpus(DataConfig(path=sys.argv[1], cache_dir=sys.argv[2], build_workers=int(sys.argv[3])))
dt = time.perf_counter() - t
print(json.dumps({"s": dt, "base_mb": base / 1024, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "ids": int(c.tokens("train").shape[0]), "vocab": len(c.vocab)}))
"""


def synthetic(folder: Path, mb: int) -> None:
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(50_000)])
    folder.mkdir(parents=True)
    for split, size in (("train", mb << 20), ("valid", (mb << 20) // 100), ("test", (mb << 20) // 100)):
        with open(folder / f"{split}.txt", "w") as f:
            while f.tell() < size:
                ids = np.minimum(rng.zipf(1.2, size=(4000, 12)) - 1, 49_999)
                f.write("\n".join(" ".join(row) for row in words[ids]) + "\n")


def run(data: Path, cache: Path, workers: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(data), str(cache), str(workers)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    mb = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    counts = [int(w) for w in sys.argv[2:]] or [1, 2]
    tmp = Path(tempfile.mkdtemp(prefix="cache-build-"))
    try:
        t = time.perf_counter()
        synthetic(tmp / "corpus", mb)
        size = sum(p.stat().st_size for p in (tmp / "corpus").iterdir()) / 2**20
        print(f"corpus: {size:.0f} MB in {time.perf_counter() - t:.0f} s", flush=True)
        for w in counts:
            cache = tmp / f"cache-{w}"
            for phase in ("cold", "warm"):
                r = run(tmp / "corpus", cache, w)
                print(
                    f"workers={w} {phase}: {r['s']:.1f} s, peak RSS {r['peak_mb']:.0f} MB (interpreter "
                    f"{r['base_mb']:.0f} MB), build processes {r['children_mb']:.0f} MB, "
                    f"{r['ids']} train ids, vocab {r['vocab']}",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
