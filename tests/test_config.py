"""Typed configuration: YAML files, `--set` overrides, and one-line `ConfigError`s for bad input.

(That docs/configuration.md names exactly these keys is checked in test_config_doc.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from allatt_dist.config import GateConfig, ModelConfig, RunConfig
from allatt_dist.errors import ConfigError
from allatt_dist.recipe import build_config, data_config, load_config, parse_overrides


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# ---- loading -------------------------------------------------------------------------------------


def test_yaml_and_overrides(tmp_path):
    path = write(
        tmp_path,
        "model:\n  num_layers: 2\n  hidden_dim: 64\n  num_heads: 4\n"
        "gates:\n  sparsity_target: 0.5\n  temperature: 0.25\ntrain:\n  lr: 0.01\n",
    )
    cfg = load_config(path, ["gates.temperature=0.5", "model.adaptive_cutoffs=[100, 1000]", "train.max_steps=7"])
    assert isinstance(cfg, RunConfig)
    assert (cfg.model.num_layers, cfg.model.hidden_dim, cfg.model.head_dim) == (2, 64, 16)
    assert cfg.gates.temperature == 0.5  # --set wins over the file
    assert cfg.gates.sparsity_target == 0.5 and cfg.gates.mode == "target"
    assert cfg.model.adaptive_cutoffs == [100, 1000] and cfg.train.max_steps == 7 and cfg.train.lr == 0.01
    assert cfg.model.num_persistent == ModelConfig().num_persistent  # untouched keys keep defaults
    assert build_config(cfg.to_dict()) == cfg  # the dump is a valid config again


def test_defaults_and_overrides_without_file():
    cfg = load_config(None, ["gates.l0_coefficient=0.01", "model.architecture=transformer_xl"])
    assert cfg.gates.mode == "l0" and cfg.model.architecture == "transformer_xl"
    assert load_config(None).gates.mode == "none"
    assert GateConfig(l0_coefficient=0.0).mode == "none"


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RunConfig()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.max_steps=true", "--set: train.max_steps: expected a whole number, got True"),
        ("model.num_heads=false", "--set: model.num_heads: expected a whole number, got False"),
        ("train.lr=.inf", "--set: train.lr: Input should be a finite number"),
        ("gates.temperature=.nan", "--set: gates.temperature: Input should be a finite number"),
        ("=1", "an empty name"),
        (".x=1", "an empty name"),
    ],
)
def test_numbers_are_numbers_and_keys_are_named(tmp_path, override, needle):
    msg = config_error(write(tmp_path, "train:\n  max_steps: 5\n"), [override])
    assert needle in msg and "\n" not in msg, msg


def test_an_error_names_the_file_when_the_file_is_wrong(tmp_path):
    path = write(tmp_path, "train:\n  lr: -1\n")
    assert config_error(path, ["train.max_steps=3"]).startswith(f"{path}: train.lr")
    assert config_error(path, ["train.lr=-2"]).startswith("--set: train.lr")


def test_a_mapping_given_with_set_replaces_the_files(tmp_path):
    path = write(tmp_path, "tune:\n  space:\n    gates.temperature: {grid: [0.3, 0.6]}\n")
    cfg = load_config(path, ["tune.space={gates.sparsity_target: {uniform: [0.1, 0.5]}}", "tune.search=random"])
    assert cfg.tune.space == {"gates.sparsity_target": {"uniform": [0.1, 0.5]}}
    assert load_config(path, ["tune.search=random"]).tune.space == {"gates.temperature": {"grid": [0.3, 0.6]}}


def test_a_folder_or_binary_file_as_config_is_one_line(tmp_path):
    assert "is a folder; give a recipe YAML file" in config_error(tmp_path)
    binary = tmp_path / "x.yaml"
    binary.write_bytes(b"\xff\xfe\x00model")
    assert "not a text file" in config_error(binary)


def test_parse_overrides():
    tree = parse_overrides(["a.b=1", "a.c=x y", "d=[1, 2]", "e.f.g=true", "h="])
    assert tree == {"a": {"b": 1, "c": "x y"}, "d": [1, 2], "e": {"f": {"g": True}}, "h": None}


@pytest.mark.parametrize(
    "overrides,key", [(["gates.temperature"], "gates.temperature"), (["model=1", "model.num_layers=2"], "model")]
)
def test_bad_override_syntax(overrides, key):
    msg = config_error(None, overrides)
    assert key in msg and "--set" in msg


# ---- one-line errors that name the file and the key ----------------------------------------------

BAD = [
    ("model: [1, 2\n", "malformed YAML"),
    ("bogus: 1\n", "bogus"),
    ("model:\n  num_layer: 2\n", "model.num_layer"),
    ("gates:\n  temprature: 0.5\n", "gates.temprature"),
    ("model:\n  hidden_dim: 30\n  num_heads: 4\n", "hidden_dim"),
    ("gates:\n  temperature: 0\n", "gates.temperature"),
    ("gates:\n  temperature: -0.5\n", "gates.temperature"),
    ("gates:\n  sparsity_target: 1.0\n", "gates.sparsity_target"),
    ("gates:\n  sparsity_target: -0.1\n", "gates.sparsity_target"),
    ("model:\n  num_layers: 0\n", "model.num_layers"),
    ("model:\n  seq_len: -1\n", "model.seq_len"),
    ("model:\n  num_heads: many\n", "model.num_heads"),
    ("gates:\n  l0_coefficient: 0.1\n  sparsity_target: 0.5\n", "gates.sparsity_target"),
    ("train:\n  batch_size: 10\nscaling:\n  num_workers: 4\n", "train.batch_size"),
    ("train:\n  batch_size: 8\ndeepspeed:\n  grad_accum_steps: 3\n", "train.batch_size"),
    ("model:\n  architecture: all_attention\n  num_persistent: 0\n", "model.num_persistent"),
    ("model:\n  adaptive_cutoffs: [200, 100]\n", "model.adaptive_cutoffs"),
    ("- model\n- gates\n", "top level must be a mapping"),
    ("just a string\n", "top level must be a mapping"),
]


@pytest.mark.parametrize("text,needle", BAD)
def test_bad_file(tmp_path, text, needle):
    path = write(tmp_path, text)
    msg = config_error(path)
    assert str(path) in msg and needle in msg, msg


def test_malformed_yaml_names_line(tmp_path):
    path = write(tmp_path, "model:\n  num_layers: 2\n  hidden_dim: [64\ngates: {}\n")
    msg = config_error(path)
    assert re.search(r"line \d+", msg), msg


def test_both_modes_message(tmp_path):
    msg = config_error(write(tmp_path, "gates:\n  l0_coefficient: 0.1\n  sparsity_target: 0.5\n"))
    assert "gates.l0_coefficient" in msg and "gates.sparsity_target" in msg


def test_batch_message_names_the_divisor(tmp_path):
    msg = config_error(write(tmp_path, "train:\n  batch_size: 10\nscaling:\n  num_workers: 4\n"))
    assert "scaling.num_workers" in msg and "(4)" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = config_error(path)
    assert str(path) in msg and "not found" in msg


@pytest.mark.parametrize(
    "override,key",
    [
        ("gates.temperature=-1", "gates.temperature"),
        ("gates.sparsity_target=1.0", "gates.sparsity_target"),
        ("model.num_layers=0", "model.num_layers"),
        ("model.bogus=1", "model.bogus"),
        ("data.path=/x", "data: source is hub but path is set"),
    ],
)
def test_bad_override_value(override, key):
    msg = config_error(None, [override, *(["data.source=hub"] if override.startswith("data.") else [])])
    assert msg.startswith("--set: ") and key in msg, msg


def test_bad_override_on_top_of_file(tmp_path):
    path = write(tmp_path, "model:\n  num_layers: 2\n")
    msg = config_error(path, ["gates.temperature=0"])
    assert msg.startswith("--set: gates.temperature"), msg  # the bad value came from the command line


def test_micro_batch():
    cfg = load_config(None, ["train.batch_size=24", "scaling.num_workers=2", "deepspeed.grad_accum_steps=3"])
    assert cfg.micro_batch == 4


def test_data_config_amends_a_saved_data_section():
    saved = {"path": "/old/place", "eval_batch_size": 4}
    assert data_config(saved, ["data.path=/new/place"], "run.yaml").model_dump() == {
        **data_config(saved, [], "run.yaml").model_dump(),
        "path": "/new/place",
    }
    with pytest.raises(ConfigError, match=r"^run.yaml: data.source: .*'auto', 'local' or 'hub'"):
        data_config({"source": "ftp"}, [], "run.yaml")
    with pytest.raises(ConfigError, match=r"--set gates.\*: only data.KEY=VALUE"):
        data_config(saved, ["gates.temperature=0.5"], "run.yaml")
