"""The parameter manifest: one row per target tensor, plus one per unused source key.

Rows are plain dicts with JSON-encoded list fields, so the manifest is a small record that can
travel between Prefect tasks, be cached as JSON, validated as a pandas table and exported as
CSV byte-identically on every machine (fixed column order, no paths or timestamps).
:class:`ManifestRow` is the typed view of one row (JSON decoded once, at this boundary) that
the Python API hands to users.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from np2torch.tasks.paths import atomic_write_text

__all__ = ["COLUMNS", "ManifestRow", "new_row", "write_manifest", "read_manifest", "to_csv", "target_rows", "unused_rows"]

COLUMNS = [
    "target_key",  # PyTorch state-dict key ("" for an unused source row)
    "source_key",  # source key(s); several joined with " + " (concat)
    "transform",  # human-readable transform list
    "source_shape",  # JSON list (list of lists for several sources)
    "target_shape",  # JSON list: the model's shape
    "result_shape",  # JSON list: the source shape after the transform (must equal target_shape)
    "source_dtype",
    "target_dtype",
    "numel",
    "fingerprint",  # source array fingerprint(s)
    "status",  # mapped | zeros | allowed_missing | missing | unused | ignored
    "confidence",  # 0..1: how sure the mapping is
    "verified",  # true when no other layout fits, or evidence chose among candidates
    "candidates",  # JSON list of alternative transforms that fit the shapes
    "evidence",  # JSON: error per candidate when a reference chose one
    "how",  # rule | name | preset-name | order | slice | shape | tied
    "note",
    "n_nonfinite",
    "absmax",
    "absmin_nonzero",
    "n_overflow",  # source values beyond target_dtype's range (they would become inf)
    "n_underflow",  # nonzero source values that would become 0 in target_dtype
    "sources",  # JSON list of source keys (machine form of source_key)
    "transform_spec",  # JSON list of [name, arg] (machine form of transform)
    "concat",  # axis to join several sources on, or ""
    "tied_to",  # target key this one shares storage with, or ""
]


def new_row(**kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {c: "" for c in COLUMNS}
    row.update(confidence=0.0, verified=True, candidates="[]", evidence="{}", numel=0, n_nonfinite=0, absmax=0.0,
               absmin_nonzero=0.0, n_overflow=0, n_underflow=0, sources="[]", transform_spec="[]", source_shape="[]", target_shape="[]", result_shape="[]")
    for k, v in kw.items():
        if k not in row:
            raise KeyError(k)
        row[k] = json.dumps(v, separators=(",", ":")) if isinstance(v, (list, tuple, dict)) else v
    return row


def target_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["target_key"]]


def unused_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r["target_key"]]


def write_manifest(rows: list[dict[str, Any]], path: Path) -> None:
    atomic_write_text(path, json.dumps(rows, indent=1, sort_keys=True))


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())


_CSV_COLUMNS = [c for c in COLUMNS if c not in ("sources", "transform_spec")]


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in _CSV_COLUMNS})
    return buf.getvalue()


_JSON_COLUMNS = ("source_shape", "target_shape", "result_shape", "candidates", "evidence", "sources", "transform_spec")


@dataclass(frozen=True)
class ManifestRow:
    """One manifest row with its JSON cells decoded (shapes as lists, evidence as a dict)."""

    target_key: str  # PyTorch state-dict key ("" for an unused source)
    source_key: str  # source key(s), several joined with " + "
    transform: str  # human-readable, e.g. "transpose"
    source_shape: list  # list of lists for several sources
    target_shape: list
    result_shape: list  # the source shape after the transform
    source_dtype: str
    target_dtype: str
    numel: int
    fingerprint: str
    status: str  # mapped | zeros | allowed_missing | missing | unused | ignored
    confidence: float  # 0..1
    verified: bool  # no other layout fits, or evidence chose among candidates
    candidates: list  # alternative transforms that fit the shapes
    evidence: dict  # error per candidate when a reference chose one
    how: str  # rule | name | preset-name | order | slice | shape | tied
    note: str
    n_nonfinite: int
    absmax: float
    absmin_nonzero: float
    n_overflow: int
    n_underflow: int
    sources: list
    transform_spec: list
    concat: Any  # axis, or ""
    tied_to: str
    extra: dict[str, Any] = field(default_factory=dict)  # columns this class does not name yet, as stored

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> ManifestRow:
        """The typed row of a stored manifest row (the dict form :func:`read_manifest` returns)."""
        names = {f.name for f in fields(cls)} - {"extra"}
        kw: dict[str, Any] = {n: row.get(n, "") for n in names}
        for c in _JSON_COLUMNS:
            v = kw[c]
            kw[c] = json.loads(v) if isinstance(v, str) and v else (v if v != "" else ([] if c != "evidence" else {}))
        return cls(**kw, extra={k: v for k, v in row.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        """The stored form: list and dict cells JSON-encoded, as :func:`new_row` writes them."""
        d = asdict(self)
        extra = d.pop("extra")
        for c in _JSON_COLUMNS:
            d[c] = json.dumps(d[c], separators=(",", ":"))
        return {**d, **extra}

    def cells(self) -> dict[str, Any]:
        """Every column with JSON decoded (what a DataFrame of the manifest holds)."""
        d = asdict(self)
        return {**d.pop("extra"), **d}
