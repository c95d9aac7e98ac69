"""The config file: strict keys, relative paths, --set overrides."""

from __future__ import annotations

import pytest

from conftest import write_tiny_case
from np2torch.tasks.config import load_config
from np2torch.tasks.errors import ConfigError


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    cfg = load_config(write_tiny_case(tmp_path))
    assert cfg.source.path == tmp_path / "weights.npz"
    assert cfg.model.target == f"{tmp_path / 'tiny_model.py'}:Tiny"
    assert cfg.export.dir == tmp_path / "out"
    assert cfg.export.formats == ["safetensors", "pt"]


def test_unknown_key_is_named(tmp_path):
    path = write_tiny_case(tmp_path, convert={"dtyp": "float16"})
    with pytest.raises(ConfigError, match=r"unknown key `convert.dtyp`") as exc:
        load_config(path)
    assert exc.value.exit_code == 2


def test_wrong_value_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"`convert.dtype`: .*'float8'"):
        load_config(write_tiny_case(tmp_path), ["convert.dtype=float8"])


def test_set_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(write_tiny_case(tmp_path), ["convert.dtype=float16", "verify.atol=0.5", "mapping.ignore=['opt/.*']"])
    assert cfg.convert.dtype == "float16" and cfg.verify.atol == 0.5 and cfg.mapping.ignore == ["opt/.*"]


def test_bad_set_syntax(tmp_path):
    with pytest.raises(ConfigError, match=r"must look like KEY=VALUE"):
        load_config(write_tiny_case(tmp_path), ["convert.dtype"])


def test_unknown_transform_and_name_pattern(tmp_path):
    path = write_tiny_case(tmp_path, mapping={"rules": [{"source": "a", "target": "b", "transform": ["transpoze"]}]})
    with pytest.raises(ConfigError, match=r"unknown transform 'transpoze'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"name 'Tiny Model' must match"):
        load_config(write_tiny_case(tmp_path), ["name=Tiny Model"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_digest_ignores_where_the_config_lives(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert load_config(write_tiny_case(a)).digest() == load_config(write_tiny_case(b)).digest()
    assert load_config(write_tiny_case(a)).digest() != load_config(write_tiny_case(a), ["verify.atol=0.1"]).digest()
