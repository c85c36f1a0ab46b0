"""What the token cache's damage check (allatt_dist/data/cache.py: sha256 of every entry against its
MANIFEST.json, on every load) costs: on WikiText-2 mini's cache, and on one 103 M-id array (WikiText-103's
train split as uint32). Results: docs/performance.md, "Checking the cache for damage".

    PYTHONPATH=$PWD python benchmarks/cache_check_cost.py [DATA_DIR]
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from allatt_dist.config import DataConfig
from allatt_dist.data.cache import file_digest
from allatt_dist.data.corpus import clear_cache, load_corpus

d = tempfile.mkdtemp()
data = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-mini")
cfg = DataConfig(path=data, cache_dir=d)
load_corpus(cfg)
files = sorted(p for p in Path(d).rglob("*") if p.suffix in (".npy", ".txt"))
tot = sum(p.stat().st_size for p in files)
t = time.perf_counter()
for _ in range(20):
    for p in files:
        file_digest(p)
print(
    f"wt2-mini: {len(files)} entries {tot / 1e6:.2f} MB: check {(time.perf_counter() - t) / 20 * 1000:.1f} ms per load"
)
for _ in range(3):
    clear_cache()
    t = time.perf_counter()
    load_corpus(cfg)
    print(f"wt2-mini warm load incl. check: {(time.perf_counter() - t) * 1000:.1f} ms")
big = Path(d) / "big.npy"
np.save(big, np.random.randint(0, 267000, size=103_000_000, dtype=np.uint32))
file_digest(big)
ts = []
for _ in range(3):
    t = time.perf_counter()
    file_digest(big)
    ts.append(time.perf_counter() - t)
print(f"103M ids ({big.stat().st_size / 1e6:.0f} MB, warm page cache): {min(ts):.2f}-{max(ts):.2f} s")
shutil.rmtree(d)
