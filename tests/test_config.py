"""The config file: strict keys, relative paths, --set overrides."""

from __future__ import annotations

import json

import pytest

from np2torch.tasks.config import load_config
from np2torch.tasks.errors import ConfigError


def test_relative_paths_resolve_against_the_config_folder(tiny, tmp_path):
    cfg = load_config(tiny())
    assert cfg.source.path == tmp_path / "weights.npz"
    assert cfg.model.target == f"{tmp_path / 'tiny_model.py'}:Tiny"
    assert cfg.export.dir == tmp_path / "out"
    assert cfg.export.formats == ["safetensors", "pt"]


def test_unknown_key_is_named(tiny):
    path = tiny(convert={"dtyp": "float16"})
    with pytest.raises(ConfigError, match=r"unknown key `convert.dtyp`") as exc:
        load_config(path)
    assert exc.value.exit_code == 2


def test_wrong_value_names_key_and_value(tiny):
    with pytest.raises(ConfigError, match=r"`convert.dtype`: .*'float8'"):
        load_config(tiny(), ["convert.dtype=float8"])


def test_set_overrides_parse_yaml_values(tiny):
    cfg = load_config(tiny(), ["convert.dtype=float16", "verify.atol=0.5", "mapping.ignore=['opt/.*']"])
    assert cfg.convert.dtype == "float16" and cfg.verify.atol == 0.5 and cfg.mapping.ignore == ["opt/.*"]


def test_bad_set_syntax(tiny):
    with pytest.raises(ConfigError, match=r"must look like KEY=VALUE"):
        load_config(tiny(), ["convert.dtype"])


def test_unknown_transform_and_name_pattern(tiny):
    path = tiny(mapping={"rules": [{"source": "a", "target": "b", "transform": ["transpoze"]}]})
    with pytest.raises(ConfigError, match=r"unknown transform 'transpoze'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"name 'Tiny Model' must match"):
        load_config(tiny(), ["name=Tiny Model"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_digest_ignores_where_the_config_lives(tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert load_config(tiny(a)).digest() == load_config(tiny(b)).digest()
    assert load_config(tiny(a)).digest() != load_config(tiny(a), ["verify.atol=0.1"]).digest()


# ---------------------------------------------------------------------------------------------
# hostile config files (issue 13, item 6): bounded, and every failure is exit 2 with one message

import time  # noqa: E402

from np2torch.cli import main  # noqa: E402
from np2torch.tasks.config import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, load_batch_config  # noqa: E402

_LOL = '["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
HOSTILE = {
    # the "billion laughs": nine levels of nine aliases (9**9 strings if expanded)
    "alias-bomb": "a: &a " + _LOL + "\n" + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n"
                                                  for i in range(8)),
    "one-alias": "name: &n tiny\nexport: {dir: *n}\n",
    "nested-100000-flow": "name: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "nested-100000-map": "name: " + "{a: " * 100_000 + "1" + "}" * 100_000 + "\n",
    "python-tag": "name: !!python/object/apply:os.system [echo pwned]\n",
    "bad-syntax": "name: [1, 2\nsource: x\n",
    "not-utf8": b"name: \xff\xfe\n",
    "not-a-mapping": "- just\n- a list\n",
    "too-big": "name: x\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1),
}
EXPECT = {"alias-bomb": "uses the YAML alias *a; aliases are not allowed", "one-alias": "uses the YAML alias *n",
          "nested-100000-flow": f"nests deeper than {MAX_CONFIG_DEPTH} levels",
          "nested-100000-map": f"nests deeper than {MAX_CONFIG_DEPTH} levels",
          "python-tag": "could not determine a constructor for the tag", "bad-syntax": "line 2, column 7",
          "not-utf8": "is not UTF-8 text", "not-a-mapping": "must hold a mapping at the top level",
          "too-big": f"a config may be at most {MAX_CONFIG_BYTES:,} bytes"}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("command", ["convert", "plan", "batch"])
def test_a_hostile_config_is_exit_2_with_one_message_fast(tmp_path, isolated_data, capsys, case, command):
    path = tmp_path / f"{case}.yaml"
    content = HOSTILE[case]
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    import np2torch.flows.batch  # noqa: F401 - imports (prefect, torch) are not what is timed here
    import np2torch.flows.convert  # noqa: F401

    t0 = time.perf_counter()
    assert main([command, str(path)]) == 2
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert seconds < 5, seconds
    assert err.startswith(f"np2torch: error: [config] `{path}`: ") and EXPECT[case] in err, err
    assert "Traceback" not in err and "RecursionError" not in err and "MemoryError" not in err
    assert len(err) < 1000  # one message, not a dump
    # nothing started, nothing written but the audit log's line saying the command was rejected (issue 20)
    written = sorted(p.name for p in isolated_data.iterdir()) if isolated_data.exists() else []
    assert written in ([], ["audit.jsonl"]), written
    if written:
        (rec,) = [json.loads(line) for line in (isolated_data / "audit.jsonl").read_text().splitlines()]
        assert rec["status"] == "rejected" and rec["reason"].startswith(f"[config] `{path}`")


def test_a_config_just_under_the_cap_and_a_bomb_in_a_batch_file(tiny, tmp_path):
    path = tiny()
    path.write_text(path.read_text() + "#" * (MAX_CONFIG_BYTES - path.stat().st_size - 1) + "\n")
    assert path.stat().st_size == MAX_CONFIG_BYTES
    assert load_config(path).name == "tiny"
    batch = tmp_path / "batch.yaml"
    batch.write_text(f"conversions: [&c {path}, *c]\n")
    with pytest.raises(ConfigError, match=r"uses the YAML alias \*c") as exc:
        load_batch_config(batch)
    assert exc.value.exit_code == 2


def test_set_values_are_bounded_too(tiny):
    path = tiny()
    deep = "[" * 10_000 + "]" * 10_000
    with pytest.raises(ConfigError, match=r"`name`: .*must match") as exc:  # kept as a plain string, then refused by name's rule
        load_config(path, ["name=" + deep])
    assert "RecursionError" not in str(exc.value)
    cfg = load_config(path, ["model.kwargs={hidden: 4}"])  # ordinary YAML values still parse
    assert cfg.model.kwargs == {"hidden": 4}
