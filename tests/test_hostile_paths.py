"""Issue 25 item 7: errors about a run directory or model in a bucket name the `s3://...` path the user gave,
never a local temporary copy; an existing object at the `--out` prefix is refused as an existing local file is.
Against the session's S3 server, in this process; no Ray (each refusal comes before Ray would start)."""

from __future__ import annotations

import pytest
import torch

from allatt_dist import cli, remote
from allatt_dist.config import ModelConfig
from allatt_dist.data.vocab import Vocab
from allatt_dist.errors import UserError
from allatt_dist.model.transformer import LanguageModel
from allatt_dist.modelio import save_model_dir
from allatt_dist.rundir import open_out

PREFIX = "hostile-paths"


@pytest.fixture
def env(s3, monkeypatch, tmp_path):
    mirrors = tmp_path / "mirrors"
    for k, v in s3.env(ALLATT_MIRROR_DIR=str(mirrors)).items():
        monkeypatch.setenv(k, v)
    remote._FS_CACHE.clear()
    yield s3, mirrors
    remote._FS_CACHE.clear()


def _error_line(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


def test_existing_object_at_out_is_refused_like_a_local_file(env) -> None:
    s3, _ = env
    s3.client().put_object(Bucket="runs", Key=f"{PREFIX}/afile", Body=b"not a folder\n")
    uri = f"s3://runs/{PREFIX}/afile"
    with pytest.raises(UserError, match=f"^--out {uri}: exists and is not a folder$"):
        open_out(uri)
    assert s3.keys("runs", f"{PREFIX}/afile") == [f"{PREFIX}/afile"]  # no afile/ written


def test_evaluate_of_a_truncated_model_in_a_bucket_names_the_bucket(env, tmp_path, capsys, wt2_path) -> None:
    s3, mirrors = env
    vocab = Vocab(["<eos>", "<unk>", "a", "b"])
    cfg = ModelConfig(num_layers=1, hidden_dim=16, num_heads=4, num_persistent=4, seq_len=8, mem_len=8)
    torch.manual_seed(0)
    save_model_dir(LanguageModel(cfg, len(vocab)).eval(), vocab, tmp_path / "m")
    client = s3.client()
    for f in (tmp_path / "m").iterdir():
        body = f.read_bytes()[:200] if f.name == "model.safetensors" else f.read_bytes()
        client.put_object(Bucket="runs", Key=f"{PREFIX}/model/{f.name}", Body=body)
    uri = f"s3://runs/{PREFIX}/model"
    line = _error_line(capsys, ["evaluate", uri, "--set", f"data.path={wt2_path}"])
    assert f"{uri}/model.safetensors: corrupt or truncated" in line, line
    assert str(mirrors) not in line and "/tmp" not in line, line


def test_rank_of_a_dense_only_run_in_a_bucket_names_the_bucket(env, capsys) -> None:
    s3, mirrors = env
    client = s3.client()
    client.put_object(Bucket="runs", Key=f"{PREFIX}/dense-only/run.yaml", Body=b"model: {}\n")
    client.put_object(Bucket="runs", Key=f"{PREFIX}/dense-only/dense/result.json", Body=b"{}\n")
    uri = f"s3://runs/{PREFIX}/dense-only"
    line = _error_line(capsys, ["rank", uri])
    assert f"{uri}: not an experiment directory" in line, line
    assert str(mirrors) not in line and "allatt-driver" not in line, line
