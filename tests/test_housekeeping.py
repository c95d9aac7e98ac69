"""``np2torch cache du|prune``: room is made, but never from what a current export needs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import run_pipeline
from np2torch import housekeeping
from np2torch.cli import main
from np2torch.tasks import audit
from np2torch.tasks.config import load_config
from np2torch.tasks.errors import ConfigError
from np2torch.tasks.paths import cache_dir

FP16 = ["convert.dtype=float16", "verify.rtol=0.01", "verify.atol=0.001"]


def _convert(config: Path, overrides: list[str] | None = None) -> dict:
    """The six stages, then the audit record the flow would append (keys of every stage)."""
    cfg = load_config(config, overrides or [])
    recs = run_pipeline(cfg)
    record = {"run_id": None, "name": cfg.name, "status": "success", "started_at": audit.now(), "finished_at": audit.now(),
              "outputs": recs["export"].outputs, "stages": {s: {"key": r.key, "cached": r.cached} for s, r in recs.items()}}
    audit.append_record(record)
    return recs


def _sha(p: str) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _entries() -> set[tuple[str, str]]:
    return {(e.stage, e.key) for e in housekeeping.scan_cache()}


def test_prune_keeps_the_current_export_and_drops_what_a_newer_run_replaced(tiny) -> None:
    config = tiny("conv", npy_dir=True)
    old = _convert(config)
    new = _convert(config, FP16)  # same export folder: the float32 export is gone
    outputs = {o["path"]: o["sha256"] for o in new["export"].outputs}
    assert len(_entries()) > 6

    res = housekeeping.prune()
    assert {(r["stage"], r["key"]) for r in res["removed"]} == {(s, old[s].key[:12]) for s in old if old[s].key != new[s].key}
    assert _entries() == {(s, r.key) for s, r in new.items()}
    assert {p: _sha(p) for p in outputs} == outputs  # the export is byte-identical
    again = run_pipeline(load_config(config, FP16))
    assert all(r.cached for r in again.values())  # and rerunning it is still all cache hits


def test_without_an_audit_log_the_entries_an_export_links_to_are_kept(tiny, tmp_path: Path) -> None:
    config = tiny("conv", npy_dir=True)
    recs = _convert(config)
    exported = next(o["path"] for o in recs["export"].outputs if o["path"].endswith("model.safetensors"))
    audit_log = tmp_path / "np2torch-data" / "audit.jsonl"
    audit_log.unlink()
    res = housekeeping.prune()
    kept = {k["stage"]: k["why"] for k in res["kept"]}
    assert kept == {"convert-to-device": "holds a file an export links to"}
    assert res["freed_bytes"] > 0
    assert _sha(exported) == next(o["sha256"] for o in recs["export"].outputs if o["path"] == exported)


def test_an_entry_in_use_is_never_removed(tiny) -> None:
    from filelock import FileLock

    config = tiny("conv", npy_dir=True)
    recs = run_pipeline(load_config(config))  # no audit record: nothing protected by an export's record
    key = recs["validate"].key
    with FileLock(str(cache_dir() / "validate" / f"{key}.lock")):
        res = housekeeping.prune()
    assert {"stage": "validate", "key": key[:12], "why": "in use by a running conversion"} in res["kept"]
    assert ("validate", key) in _entries()


def test_older_than_keeps_recent_entries_and_dry_run_removes_nothing(tiny, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny("conv", npy_dir=True)
    run_pipeline(load_config(config))
    before = _entries()
    assert main(["cache", "prune", "--older-than", "7d"]) == 0
    assert _entries() == before and "removed 0 cache entries" in capsys.readouterr().out
    assert main(["cache", "prune", "--dry-run"]) == 0
    assert _entries() == before and "would remove" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="is not an age"):
        housekeeping.parse_age("soon")
    assert housekeeping.parse_age("12h") == 43200 and housekeeping.parse_age("2") == 2 * 86400


def test_du_counts_shared_bytes_once(tiny, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny("conv", npy_dir=True)
    recs = _convert(config)
    size = Path(recs["convert-to-device"].file).stat().st_size
    du = housekeeping.disk_usage()
    by_stage = {r["stage"]: r for r in du["stages"]}
    assert by_stage["convert-to-device"]["shared_with_exports"] == size
    assert all(r["protected"] == r["entries"] == 1 for r in du["stages"])
    assert main(["cache", "du"]) == 0
    out = capsys.readouterr().out
    assert "shared with exports" in out and "convert-to-device" in out
