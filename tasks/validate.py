"""Stage 3, ``validate``: the manifest as a pandera-checked table; every failure at once.

The schema is the contract between mapping and conversion: unique targets, every target mapped
or allowed missing, every source used or ignored, shapes equal after the transform, numel
consistent, dtypes castable and finite, values inside the target dtype's range. It runs with
``lazy=True`` so the user sees the whole failure table, not the first problem.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pandera.pandas as pa

from np2torch.tasks.dtypes import FLOAT_RANGE as _RANGE
from np2torch.tasks.errors import Problem, ValidationError
from np2torch.tasks.manifest import COLUMNS, ManifestRow, cell_text

__all__ = ["manifest_schema", "validate_manifest", "failure_table"]

_FIX = {
    "status_missing": "add a mapping rule for it, or allow it with mapping.allow_missing if its initial value is fine",
    "status_unused": "map it with a rule, or leave it out on purpose with mapping.ignore",
    "shape": "fix the transform (e.g. transpose instead of reshape) or the model's constructor arguments",
    "numel": "check the slice bounds / the source array",
    "dtype": "the source dtype cannot become the target's; re-save the array or map it elsewhere",
    "finite": "clean the source, or set source.allow_nonfinite: true if NaN/Inf is intended",
    "overflow": "choose a wider convert.dtype (float32 or bfloat16), or rescale the weights",
    "underflow": "choose convert.dtype float32/bfloat16, or accept with convert.dtype keep",
    "unique": "two rules or matches claim the same target; make the rules more specific",
}


_ERRORS = {
    "shape": "shape after the transform differs from the model's",
    "numel": "numel differs from the product of target_shape",
    "dtype": "source dtype cannot be cast to the target dtype",
    "overflow": "values exceed the target dtype's range",
    "underflow": "nonzero values would round to zero in the target dtype",
    "finite": "source array holds NaN or Inf",
    "unique": "target claimed more than once",
    "status_missing": "target has no source",
    "status_unused": "source array is not used",
}
_CHECK_BY_ERROR = {v: k for k, v in _ERRORS.items()}


def _is_target(df: pd.DataFrame) -> pd.Series:
    return df["target_key"].astype(str) != ""


def _shape_ok(df: pd.DataFrame) -> pd.Series:
    mapped = df["status"] == "mapped"
    tied = df["how"] == "tied"
    return ~mapped | tied | (df["result_shape"].map(tuple) == df["target_shape"].map(tuple))


def _numel_ok(df: pd.DataFrame) -> pd.Series:
    prods = df["target_shape"].map(lambda s: int(np.prod(s, dtype=np.int64)))
    return ~_is_target(df) | (prods == df["numel"].astype(np.int64))


def _dtype_ok(df: pd.DataFrame) -> pd.Series:
    def ok(row: pd.Series) -> bool:
        if row["status"] != "mapped" or not row["source_dtype"]:
            return True
        src = np.dtype(row["source_dtype"])
        if src.kind not in "fiub":
            return False
        tgt = row["target_dtype"]
        if tgt in _RANGE:  # any real number can become a float
            return True
        if tgt.startswith(("int", "uint")) or tgt == "bool":
            return src.kind in "iub" or float(row["absmax"]).is_integer()
        return False

    return df.apply(ok, axis=1) if len(df) else pd.Series([], dtype=bool)


def _in_range(df: pd.DataFrame) -> pd.Series:
    lim = df["target_dtype"].map(lambda d: _RANGE.get(d, (np.inf, 0.0))[0])
    return (df["status"] != "mapped") | (df["absmax"].astype(float) <= lim)


def _no_underflow(df: pd.DataFrame) -> pd.Series:
    tiny = df["target_dtype"].map(lambda d: _RANGE.get(d, (np.inf, 0.0))[1])
    a = df["absmin_nonzero"].astype(float)
    # a nonzero value at or below half the smallest subnormal rounds to zero (ties go to even, 0)
    return (df["status"] != "mapped") | (a == 0) | (a > tiny / 2)


def manifest_schema(*, allow_nonfinite: bool = False) -> pa.DataFrameSchema:
    """The pandera schema every manifest must pass before any tensor is converted."""
    checks = [
        pa.Check(_shape_ok, name="shape", error=_ERRORS["shape"]),
        pa.Check(_numel_ok, name="numel", error=_ERRORS["numel"]),
        pa.Check(_dtype_ok, name="dtype", error=_ERRORS["dtype"]),
        pa.Check(_in_range, name="overflow", error=_ERRORS["overflow"]),
        pa.Check(_no_underflow, name="underflow", error=_ERRORS["underflow"]),
    ]
    if not allow_nonfinite:
        checks.append(pa.Check(lambda df: (df["n_nonfinite"].astype(int) == 0) | (df["status"] == "ignored"), name="finite",
                               error="source array holds NaN or Inf"))
    return pa.DataFrameSchema(
        {
            "target_key": pa.Column(str, pa.Check(lambda s: ~s[s != ""].duplicated(keep=False).reindex(s.index, fill_value=False),
                                                  name="unique", error=_ERRORS["unique"])),
            "status": pa.Column(str, [
                pa.Check.ne("missing", name="status_missing", error=_ERRORS["status_missing"]),
                pa.Check.ne("unused", name="status_unused", error=_ERRORS["status_unused"]),
                pa.Check.isin(["mapped", "zeros", "allowed_missing", "ignored", "missing", "unused"]),
            ]),
            "confidence": pa.Column(float, pa.Check.in_range(0.0, 1.0)),
            "numel": pa.Column(int, pa.Check.ge(0)),
            **{c: pa.Column(nullable=True, required=True) for c in COLUMNS if c not in ("target_key", "status", "confidence", "numel")},
        },
        checks=checks,
        strict=True,
        coerce=False,
    )


def _frame(rows: list[ManifestRow]) -> pd.DataFrame:
    df = pd.DataFrame([r.cells() for r in rows], columns=COLUMNS)
    df["confidence"] = df["confidence"].astype(float)
    df["numel"] = df["numel"].astype(np.int64)
    for c in ("n_overflow", "n_underflow"):
        df[c] = df[c].replace("", 0).fillna(0).astype(np.int64)
    for c in ("target_key", "status", "source_key", "target_dtype", "source_dtype", "how"):
        df[c] = df[c].astype(str)
    return df


def failure_table(exc: pa.errors.SchemaErrors, df: pd.DataFrame) -> list[Problem]:
    """One problem per (row, check), named by the row's target (or source) key."""
    fc = exc.failure_cases
    problems: list[Problem] = []
    seen: set[tuple] = set()
    for _, f in fc.iterrows():
        check = str(f.get("check", ""))
        name = _CHECK_BY_ERROR.get(check, check.split("(")[0].removeprefix("<Check ").removesuffix(">").strip())
        idx = f.get("index")
        if idx is None or (isinstance(idx, float) and np.isnan(idx)) or int(idx) not in df.index:
            problems.append(Problem(str(f.get("column") or "manifest"), f"{check}: {f.get('failure_case')}"))
            continue
        row = df.loc[int(idx)]
        key = row["target_key"] or row["source_key"]
        if (key, name) in seen:
            continue
        seen.add((key, name))
        problems.append(_problem_for(name, row, key))
    return problems


def _problem_for(name: str, row: pd.Series, key: str) -> Problem:
    if name == "status_missing":
        return Problem(key, f"target {row['target_shape']} has no source array" + (f" ({row['note']})" if row["note"] else ""),
                       fix=_FIX[name])
    if name == "status_unused":
        note = f" ({row['note']})" if row["note"] else ""
        return Problem(key, f"source array {cell_text(row['source_shape'])} is not used by any target{note}", fix=_FIX[name])
    if name == "shape":
        src = f"{row['source_key']} {cell_text(row['source_shape'])}"
        return Problem(key, f"source {src} with transform [{row['transform']}] gives the wrong shape",
                       expected=cell_text(row["target_shape"]), actual=cell_text(row["result_shape"]), fix=_FIX[name])
    if name == "finite":
        return Problem(key, f"source {row['source_key'] or key} holds {row['n_nonfinite']} NaN/Inf value(s)", fix=_FIX[name])
    if name == "overflow":
        big, n = _RANGE[row["target_dtype"]][0], int(row["n_overflow"])
        return Problem(key, f"{_count(n, 'value(s)')} of source {row['source_key']} exceed {row['target_dtype']}'s maximum {big:.6g} "
                            f"(largest |x| {float(row['absmax']):.6g})",
                       expected=f"|x| ≤ {big:.6g}", actual=f"{_count(n, 'value(s)')} beyond it", fix=_FIX[name])
    if name == "underflow":
        n = int(row["n_underflow"])
        return Problem(key, f"{_count(n, 'nonzero value(s)')} of source {row['source_key']} become 0 in {row['target_dtype']} "
                            f"(smallest |x| {float(row['absmin_nonzero']):.3g})", fix=_FIX[name])
    if name == "dtype":
        return Problem(key, f"source dtype {row['source_dtype']} cannot become {row['target_dtype']}", expected=row["target_dtype"],
                       actual=row["source_dtype"], fix=_FIX[name])
    if name == "numel":
        return Problem(key, "numel is inconsistent with target_shape", expected=cell_text(row["target_shape"]), actual=row["numel"],
                       fix=_FIX[name])
    if name == "unique":
        return Problem(key, "claimed by more than one source/rule", fix=_FIX[name])
    return Problem(key, f"fails check {name}")


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n else what.replace("(s)", "s")  # 0: a manifest made before counts were recorded


def validate_manifest(rows: list[ManifestRow], *, allow_nonfinite: bool = False) -> list[ManifestRow]:
    """Validate the manifest; raise :class:`ValidationError` with every failure, else return it."""
    df = _frame(rows)
    try:
        manifest_schema(allow_nonfinite=allow_nonfinite).validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        problems = failure_table(exc, df)
        problems.sort(key=lambda p: (list(df["target_key"]).index(p["key"]) if p["key"] in set(df["target_key"]) else len(df), p["reason"]))
        from np2torch.tasks.diagnose import architecture_headline  # the wrong architecture, as one diff on the first line (issue 19)

        arch = architecture_headline(rows)
        for p in problems if arch else []:
            if p["key"] in arch[3]:  # the tensor exists on both sides in another shape: never "allow it missing", never "ignore it"
                p["fix"] = arch[1]
        raise ValidationError(
            f"the manifest fails {len(problems)} check(s); nothing was converted" + (f" — {arch[1]}" if arch else ""),
            key=arch[0] if arch else (problems[0]["key"] if problems else None),
            problems=problems,
            fix=arch[2] if arch else (problems[0]["fix"] if problems else None),
        ) from None
    return rows
