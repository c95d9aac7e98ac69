"""The parameter manifest: one row per target tensor, plus one per unused source key.

Inside the pipeline (infer-mapping through export, and the Python API) a row is a typed
:class:`ManifestRow`: shapes, candidates, evidence and transform specs are lists and dicts. JSON
appears only where the manifest is written and read: the stage cache entry
(:func:`write_manifest` / :func:`read_manifest`) and ``manifest.csv`` (:func:`to_csv`, list
cells in their compact JSON text, byte-identical on every machine: fixed column order, no
paths or timestamps).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from np2torch.tasks.paths import atomic_write_text

__all__ = ["COLUMNS", "ManifestRow", "new_row", "write_manifest", "read_manifest", "to_csv", "cell_text", "target_rows",
           "unused_rows"]

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


def _plain(v: Any) -> Any:
    """Tuples as lists, recursively: a row holds what its JSON form reads back as."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def new_row(**kw: Any) -> ManifestRow:
    """A row with every column at its default (a target row or an unused source's), then ``kw``."""
    unknown = set(kw) - set(COLUMNS)
    if unknown:
        raise KeyError(sorted(unknown)[0])
    return ManifestRow(**{k: _plain(v) if k in _JSON_COLUMNS else v for k, v in kw.items()})


def target_rows(rows: list[ManifestRow]) -> list[ManifestRow]:
    return [r for r in rows if r.target_key]


def unused_rows(rows: list[ManifestRow]) -> list[ManifestRow]:
    return [r for r in rows if not r.target_key]


def write_manifest(rows: list[ManifestRow], path: Path) -> None:
    atomic_write_text(path, json.dumps([r.to_dict() for r in rows], indent=1, sort_keys=True))


def read_manifest(path: str | Path) -> list[ManifestRow]:
    return [ManifestRow.from_dict(r) for r in json.loads(Path(path).read_text())]


_CSV_COLUMNS = [c for c in COLUMNS if c not in ("sources", "transform_spec")]


def cell_text(v: Any) -> str:
    """A list or dict cell as the manifest writes it (compact JSON: ``[6,4]``)."""
    return json.dumps(v, separators=(",", ":"))


def to_csv(rows: list[ManifestRow]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        r = row.to_dict()
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in _CSV_COLUMNS})
    return buf.getvalue()


_JSON_COLUMNS = ("source_shape", "target_shape", "result_shape", "candidates", "evidence", "sources", "transform_spec")


@dataclass
class ManifestRow:
    """One manifest row, typed: list and dict cells decoded (shapes as lists, evidence as a dict).

    ``row["status"]`` reads the same as ``row.status`` (the column names are the attribute names).
    """

    target_key: str = ""  # PyTorch state-dict key ("" for an unused source)
    source_key: str = ""  # source key(s), several joined with " + "
    transform: str = ""  # human-readable, e.g. "transpose"
    source_shape: list = field(default_factory=list)  # list of lists for several sources
    target_shape: list = field(default_factory=list)
    result_shape: list = field(default_factory=list)  # the source shape after the transform
    source_dtype: str = ""
    target_dtype: str = ""
    numel: int = 0
    fingerprint: str = ""
    status: str = ""  # mapped | zeros | allowed_missing | missing | unused | ignored
    confidence: float = 0.0  # 0..1
    verified: bool = True  # no other layout fits, or evidence chose among candidates
    candidates: list = field(default_factory=list)  # alternative transforms that fit the shapes
    evidence: dict = field(default_factory=dict)  # error per candidate when a reference chose one
    how: str = ""  # rule | name | preset-name | order | slice | shape | tied
    note: str = ""
    n_nonfinite: int = 0
    absmax: float = 0.0
    absmin_nonzero: float = 0.0
    n_overflow: int = 0
    n_underflow: int = 0
    sources: list = field(default_factory=list)
    transform_spec: list = field(default_factory=list)
    concat: Any = ""  # axis, or ""
    tied_to: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # columns this class does not name yet, as stored

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> ManifestRow:
        """The typed row of a stored manifest row (list cells as JSON text)."""
        names = {f.name for f in fields(cls)} - {"extra"}
        kw: dict[str, Any] = {n: row[n] for n in names if n in row}
        for c in _JSON_COLUMNS:
            v = kw.get(c, "")
            kw[c] = json.loads(v) if isinstance(v, str) and v else (v if v != "" else ([] if c != "evidence" else {}))
        return cls(**kw, extra={k: v for k, v in row.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        """The stored form: list and dict cells as compact JSON text."""
        d = asdict(self)
        extra = d.pop("extra")
        for c in _JSON_COLUMNS:
            d[c] = cell_text(d[c])
        return {**d, **extra}

    def cells(self) -> dict[str, Any]:
        """Every column, decoded (what a DataFrame of the manifest holds)."""
        d = asdict(self)
        return {**d.pop("extra"), **d}

    def __getitem__(self, name: str) -> Any:
        if name in self.extra:
            return self.extra[name]
        if name == "extra" or name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)
