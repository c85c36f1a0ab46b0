"""Reading a recipe: YAML file + `--set SECTION.KEY=VALUE` overrides -> a validated `RunConfig`.

This is the boundary where text becomes typed config: every error is one `ConfigError` line naming
the file (or `--set`), the key and what is allowed. Nothing below it parses YAML again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from allatt_dist.config import DataConfig, RunConfig, Whole, merged
from allatt_dist.errors import ConfigError, Problem, UserError, first_problem, yaml_problem


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Turn ["a.b=1", "c.d=[1,2]"] into a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict):
            value = Whole(value)
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value (an empty name in {key!r})")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return tree


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.second = key, first, second


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
            except TypeError:  # an unhashable key: the base class words that error
                break
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def strict_yaml(text: str) -> Any:
    """YAML text -> data, like `yaml.safe_load`, except that a duplicated key raises `_DuplicateKey`."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder; give a recipe YAML file (e.g. tune_configs/quickstart.yaml)")
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = strict_yaml(p.read_text(encoding="utf-8"))
    except _DuplicateKey as e:
        raise ConfigError(f"{p}: key {e.key!r} is given twice (lines {e.first} and {e.second}); keep one") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file (a recipe is UTF-8 YAML)") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: malformed YAML{yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections (model, gates, data, ...)")
    return data


def _given_in(tree: dict[str, Any], loc: tuple) -> bool:
    """Whether the key at `loc` (or the section holding it) was set in the override tree."""
    node: Any = tree
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return bool(loc)


def format_problem(problem: Problem, origin: str, set_tree: dict[str, Any] | None = None) -> str:
    """The one line for a bad recipe value: origin (the file, `--set`, or both), key, what is allowed."""
    loc, key, msg = problem.loc, problem.key, problem.msg
    named = re.match(r"([a-z_]+(?:\.[a-z_]+)+)[: ]", msg)  # a whole-config check names its key first
    if not loc and named and not msg.startswith("tune."):
        loc = tuple(named.group(1).split("."))
    if set_tree and (loc[:1] == ("tune",) or msg.startswith("tune.")) and "tune" in set_tree:
        origin = f"{origin} with --set" if origin and origin != "--set" else "--set"  # the search came from both
    elif set_tree and _given_in(set_tree, loc):
        origin = "--set"  # the bad value came from the command line, not from the file
    if problem.type == "extra_forbidden":
        msg = "unknown key (see docs/configuration.md for the allowed keys)"
    elif problem.has_input and problem.type not in ("value_error",):
        msg = f"{msg} (got {problem.input!r})"
    where = f"{origin}: " if origin else ""
    return f"{where}{key}: {msg}" if key else f"{where}{msg}"  # a whole-config check's message names its key


def build_config(data: dict[str, Any], origin: str = "", set_tree: dict[str, Any] | None = None) -> RunConfig:
    """Validate a whole recipe, then the checks that need the model code (model/checks.py: the family's,
    the budget's); `set_tree` (the parsed `--set` items) lets an error name `--set` as its origin."""
    from allatt_dist.model.checks import run_problem  # the model code (torch with a budget): imported when used

    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_problem(first_problem(e), origin, set_tree)) from None
    problem = run_problem(cfg)
    if problem is not None:
        raise ConfigError(format_problem(problem, origin, set_tree))
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """The recipe at `path` (None: the defaults) with `--set` overrides, validated once."""
    data = read_yaml(path) if path is not None else {}
    tree = parse_overrides(overrides)
    return build_config(merged(data, tree), str(path) if path is not None else "--set", tree)


def data_config(base: dict[str, Any] | None, overrides: list[str] | None, origin: str) -> DataConfig:
    """The data section of a saved run (`base`, e.g. from run.yaml) with `--set data.KEY=VALUE` applied.

    For the commands that read a finished model or experiment: only the data may change there.
    """
    tree = parse_overrides(overrides)
    other = sorted(k for k in tree if k != "data")
    if other:
        raise ConfigError(f"--set {other[0]}.*: only data.KEY=VALUE applies here (the model's config is fixed)")
    return build_config({"data": merged(base or {}, tree.get("data", {}))}, origin, tree).data


def read_mapping(path: Path) -> dict[str, Any]:
    """A JSON (or, for .yaml, YAML) mapping a run wrote (run.yaml, result.json, status.json, config.json...);
    {} when absent; one line naming the file when damaged."""
    if not path.is_file():
        return {}
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: damaged ({why}); restore or delete it and run again") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: damaged (expected a mapping, found {type(data).__name__})")
    return data


def read_run_config(path: Path) -> RunConfig | None:
    """A run's typed config from its run.yaml (None when there is none); one line when damaged."""
    data = read_mapping(path)
    if not data:
        return None
    try:
        return build_config(data, str(path))
    except ConfigError as e:
        raise UserError(f"damaged ({e}); restore or delete {path.parent} and run again") from None


def saved_config_diff(saved: Path, spec: dict[str, Any], sections: tuple[str, ...], fix: str) -> list[str]:
    """The `section.key`s in which the config saved at `saved` (YAML) differs from `spec`, sorted;
    a damaged file is one line that ends with `fix`."""
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise ConfigError(f"{saved}: damaged; {fix}") from None
    if not isinstance(old, dict):
        raise ConfigError(f"{saved}: damaged (not a mapping); {fix}")
    return sorted(
        f"{s}.{k}"
        for s in sections
        for k in set(old.get(s) or {}) | set(spec.get(s) or {})
        if (old.get(s) or {}).get(k) != (spec.get(s) or {}).get(k)
    )
