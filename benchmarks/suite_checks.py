"""How much the test suite checks, counted from its source (no test is run): the number a change that makes
the suite faster must not lower.

    python benchmarks/suite_checks.py [tests]          # one JSON object: totals, and the counts per file

A *check* is one of, anywhere in a `tests/*.py` file (helpers and fixtures included, as they assert too):
  - an `assert` statement;
  - a call of `pytest.raises(...)` / `pytest.warns(...)` (the block fails unless it raises or warns);
  - a call of a function named `assert_*` (`np.testing.assert_allclose`, `torch.testing.assert_close`, ...);
  - a call of `pytest.fail(...)`.
`pytest.approx(...)` calls are counted on their own line (`approx`): they sit inside an `assert` already
counted, so they add precision, not checks. Checks are counted in the source, once each: a parametrised test
runs its checks once per case, which the collected test count (`pytest --collect-only -q`) reflects.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def count(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text(), str(path))
    c = {"assert": 0, "raises": 0, "assert_call": 0, "fail": 0, "approx": 0}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            c["assert"] += 1
        elif isinstance(node, ast.Call):
            name = _name(node.func)
            if name in ("raises", "warns"):
                c["raises"] += 1
            elif name.startswith("assert_"):
                c["assert_call"] += 1
            elif name == "fail":
                c["fail"] += 1
            elif name == "approx":
                c["approx"] += 1
    c["checks"] = c["assert"] + c["raises"] + c["assert_call"] + c["fail"]
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tests", nargs="?", default="tests", help="the folder of test files (default: tests)")
    root = Path(ap.parse_args().tests)
    per_file = {p.name: count(p) for p in sorted(root.glob("*.py"))}
    total = {k: sum(c[k] for c in per_file.values()) for k in next(iter(per_file.values()))}
    print(json.dumps({"total": total, "files": per_file}, indent=1))


if __name__ == "__main__":
    main()
