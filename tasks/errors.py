"""The np2torch exception family.

Every failure a user can cause is a :class:`ConversionError` (exit status 1) or a
:class:`ConfigError` (exit status 2). Each names the stage, the key or file, what was expected,
what was found, and the fix, so the CLI can print one clear message and no traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "ConfigError",
    "ConversionError",
    "ConvertError",
    "ExportError",
    "LoadError",
    "MappingError",
    "ModelError",
    "TransientIOError",
    "ValidationError",
    "VerifyError",
    "Problem",
    "short",
    "STATE_LIMIT",
]

# Keys and paths come from files: one 10 kB key must not make a 10 kB line, or more when it is
# repeated. Messages show at most this many characters of one, with the middle elided.
SHORT_LIMIT = 240
# A whole message line (a failure's one-line state message, a problem line) is never longer than
# this, whatever a file put into it: Prefect prints a failed state's message whole.
STATE_LIMIT = 2000


def one_line(text: object, limit: int = STATE_LIMIT) -> str:
    """A message on one line (its lines joined by " | "), for where a newline shows as a literal ``\\n`` (Prefect's UI and logs)."""
    return short(" | ".join(ln.strip() for ln in str(text).splitlines() if ln.strip()), limit)


def short(text: str, limit: int = SHORT_LIMIT) -> str:
    """``text`` unchanged when short, else its start and end around an "…(N chars)…" marker."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(limit - 20, 8)
    return f"{text[: keep // 2 + keep % 2]}…({len(text)} chars)…{text[len(text) - keep // 2:]}"



class Problem(dict):
    """One offending key: a small dict so that problems print as a table and pickle cleanly."""

    def __init__(self, key: str, reason: str, *, expected: Any = None, actual: Any = None, fix: str = ""):
        super().__init__(key=key, reason=reason, expected=expected, actual=actual, fix=fix)

    def line(self) -> str:
        parts = [f"`{short(self['key'])}`: {self['reason']}"]
        if self["expected"] is not None or self["actual"] is not None:
            parts.append(f"(expected {self['expected']}, got {self['actual']})")
        if self["fix"]:
            parts.append(f"— fix: {self['fix']}")
        return " ".join(parts)


class ConversionError(Exception):
    """A conversion failed for a reason the user can act on (CLI exit status 1)."""

    stage: str = "np2torch"
    exit_code: int = 1

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        expected: Any = None,
        actual: Any = None,
        fix: str | None = None,
        problems: Sequence[Problem] = (),
        stage: str | None = None,
    ):
        if stage is not None:
            self.stage = stage
        self.message = message
        self.key = key
        self.expected = expected
        self.actual = actual
        self.fix = fix
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        head = f"[{self.stage}] "
        if self.key is not None:
            head += f"`{short(self.key)}`: "
        head += self.message
        if self.expected is not None or self.actual is not None:
            head += f" (expected {self.expected}, got {self.actual})"
        lines = [short(head, STATE_LIMIT)]
        for p in self.problems[:50]:
            lines.append(f"  - {short(p.line(), STATE_LIMIT)}")
        if len(self.problems) > 50:
            lines.append(f"  … and {len(self.problems) - 50} more")
        if self.fix:
            lines.append(f"Fix: {short(self.fix, STATE_LIMIT)}")
        return "\n".join(lines)

    def __reduce__(self):  # keep the fields across pickling (Prefect persists failed states)
        return (
            _rebuild,
            (type(self), self.message, self.key, self.expected, self.actual, self.fix, self.problems, self.stage),
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "stage": self.stage,
            "key": self.key,
            "message": self.message,
            "expected": _jsonable(self.expected),
            "actual": _jsonable(self.actual),
            "fix": self.fix,
            "problems": [{k: _jsonable(v) for k, v in p.items()} for p in self.problems],
        }


def _rebuild(cls, message, key, expected, actual, fix, problems, stage):
    return cls(message, key=key, expected=expected, actual=actual, fix=fix,
               problems=[Problem(**p) for p in problems], stage=stage)


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


class ConfigError(ConversionError):
    """The command line or config file is wrong (CLI exit status 2)."""

    stage = "config"
    exit_code = 2


class LoadError(ConversionError):
    stage = "load-arrays"


class MappingError(ConversionError):
    stage = "infer-mapping"


class ValidationError(ConversionError):
    stage = "validate"


class ModelError(ConversionError):
    """The model could not be imported or built."""

    stage = "model"


class ConvertError(ConversionError):
    stage = "convert-to-device"


class VerifyError(ConversionError):
    stage = "verify-forward-pass"


class ExportError(ConversionError):
    stage = "export"


class TransientIOError(OSError):
    """An I/O error worth retrying (EIO, EAGAIN, a busy file system)."""
