"""The four-arm table of benchmarks/distill_arms.sh: test perplexity per (target, arm), the mean over seeds and
each seed's number, the heads kept and the parameter count, from the cells' test.txt (`allatt-dist evaluate`).

    python3 benchmarks/distill_table.py RUN_ROOT        # the R of distill_arms.sh
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ARMS = {"A": "paper", "B": "+ distill", "C": "+ finetune", "D": "+ both"}


def cells(root: Path) -> dict[str, dict[str, list[dict]]]:
    """value -> arm -> the seeds' results, from ROOT/ARM/<t|v>VALUE_sSEED/test.txt."""
    out: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for f in sorted(root.glob("[ABCD]/*_s*/test.txt")):
        value, seed = f.parent.name[1:].rsplit("_s", 1)
        out[value][f.parent.parent.name].append({"seed": int(seed), **json.loads(f.read_text())})
    return out


def row(value: str, by_arm: dict[str, list[dict]]) -> str:
    cols = []
    for arm in ARMS:
        rs = sorted(by_arm.get(arm, []), key=lambda r: r["seed"])
        if not rs:
            cols.append("–")
            continue
        ppl = [r["ppl"] for r in rs]
        spread = f" ±{(max(ppl) - min(ppl)) / 2:.1f}" if len(ppl) > 1 else ""
        seeds = " / ".join(f"{p:.1f}" for p in ppl)
        cols.append(f"**{statistics.mean(ppl):.1f}**{spread} ({seeds})")
    heads = {arm: "·".join("/".join(map(str, r["heads_per_layer"])) for r in by_arm[arm]) for arm in by_arm}
    return f"| {value} | " + " | ".join(cols) + f" | {heads.get('A', '–')} | {heads.get('B', '–')} |"


def main() -> None:
    root = Path(sys.argv[1])
    table = cells(root)
    print("| target | " + " | ".join(f"{k}: {v}" for k, v in ARMS.items()) + " | heads A (seeds) | heads B (seeds) |")
    print("|---" * (len(ARMS) + 3) + "|")
    for value in sorted(table, key=float):
        print(row(value, table[value]))


if __name__ == "__main__":
    main()
