"""Issue 25 item 5: `rank` with a finished trial whose model folder was deleted, and another whose
model.safetensors is truncated: one warning line each, both listed as "not scored" (with the reason) in the
leaderboard, every other model ranked, the model an earlier ranking published for the deleted trial kept, and
an error (exit status 2) naming them. Uses the session's local Ray (`local_ray`), in this process."""

from __future__ import annotations

import json
import shutil

import pytest
from test_rank_outputs import _experiment, _short_corpus

from allatt_dist.errors import UserError
from allatt_dist.search.rank import rank
from allatt_dist.search.records import trial_run_name


@pytest.mark.ray
def test_rank_scores_the_others_and_keeps_published_models(local_ray, tmp_path, wt2_path, capsys) -> None:
    corpus = _short_corpus(tmp_path / "corpus", wt2_path, 40)
    exp = _experiment(tmp_path, corpus, {"a": 1, "b": 2, "c": 3})
    trials = {trial_run_name(t): t for t in sorted((exp / "trials").iterdir())}
    gone, damaged, kept = trials
    shutil.copytree(trials[gone] / "prune" / "model", exp / "models" / gone)  # as an earlier ranking published it
    shutil.rmtree(trials[gone] / "prune" / "model")
    weights = trials[damaged] / "prune" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()

    with pytest.raises(UserError) as err:
        rank(exp, progress=False)
    msg = str(err.value)
    assert "2 finished trial(s) could not be scored" in msg and gone in msg and damaged in msg, msg
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "not scored" in ln]
    assert len(warnings) == 2, warnings
    assert any(gone in w and "missing" in w for w in warnings), warnings
    assert any(damaged in w and str(weights) in w and "truncated" in w for w in warnings), warnings
    board = {m["name"]: m for m in json.loads((exp / "leaderboard.json").read_text())["models"]}
    for name in (gone, damaged):
        assert board[name]["status"] == "not scored" and board[name]["problem"] and board[name]["test_ppl"] is None
    assert board[kept]["status"] == "finished" and board[kept]["test_ppl"] is not None
    assert board["dense"]["test_ppl"] is not None
    assert board[gone]["model_dir"] and (exp / board[gone]["model_dir"] / "model.safetensors").is_file()
