"""Issue 25 item 9: the search-only check (`train.checkpoint_every >= train.eval_every`) applies only when a
search runs: `train` of a recipe with a `tune:` section runs no search and is not refused; `tune`/`run`
still refuse it before anything starts. No Ray: every check here runs on the recipe alone."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from allatt_dist.errors import ConfigError
from allatt_dist.recipe import load_config

RECIPE = "train:\n  checkpoint_every: 10\n  eval_every: 20\ntune:\n  space: {gates.temperature: {grid: [0.5]}}\n"


def _args(path: Path, out: Path) -> argparse.Namespace:
    return argparse.Namespace(config=str(path), overrides=None, out=str(out), verbose=False, force=False)


def test_train_of_recipe_with_tune_section_is_not_refused(tmp_path: Path) -> None:
    from allatt_dist.cli import _plan

    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    cfg = load_config(path)
    assert cfg.train.checkpoint_every == 10 and cfg.tune is not None
    assert _plan(_args(path, tmp_path / "run"), "runs", search=False).cfg.train.eval_every == 20


@pytest.mark.parametrize(
    "text",
    [
        RECIPE,
        # the base recipe is fine, but one end of a searched domain is not
        "train:\n  checkpoint_every: 20\n  eval_every: 20\ntune:\n  space: {train.eval_every: {grid: [10, 40]}}\n",
    ],
    ids=["recipe", "domain-end"],
)
def test_search_refuses_first_report_without_ppl(tmp_path: Path, text: str) -> None:
    from allatt_dist.cli import _plan

    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"r\.yaml: train\.checkpoint_every \(\d+\) must be at least .* in a search"):
        _plan(_args(path, tmp_path / "exp"), "experiments", search=True)
    assert not (tmp_path / "exp").exists()


# Issue 25 item 8: corpus checks that need no cluster run before Ray starts (they ran in the workers).


def _corpus(tmp_path: Path, train: bytes) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "train.txt").write_bytes(train)
    for split in ("valid", "test"):
        (d / f"{split}.txt").write_text("the cat sat on the mat\n")
    return d


def _train_recipe(tmp_path: Path, corpus: Path) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(f"data:\n  path: {corpus}\n  cache_dir: {tmp_path / 'cache'}\nmodel:\n  seq_len: 16\n")
    return path


@pytest.mark.parametrize(
    "train,needle",
    [
        (b"one short line of words\n", r"train\.txt: the train split has \d+ tokens; train\.batch_size"),
        (b"good words\nbad \xff byte\n" * 200, r"train\.txt: not UTF-8 text \(byte \d+\)"),
    ],
    ids=["one-line", "not-utf8"],
)
def test_corpus_refused_before_ray(tmp_path: Path, train: bytes, needle: str) -> None:
    from allatt_dist.cli import _plan
    from allatt_dist.errors import DataError

    path = _train_recipe(tmp_path, _corpus(tmp_path, train))
    with pytest.raises(DataError, match=needle):
        _plan(_args(path, tmp_path / "run"), "runs", search=False)  # the CLI connects to Ray after this
    assert not (tmp_path / "run").exists()
