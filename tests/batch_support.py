"""Helpers shared by the batch, server and browser tests: private copies of the example configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from np2torch.tasks.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "examples"


def write_conversion(example: str, dest: Path, out_root: Path, *, name: str | None = None, kwargs: dict[str, Any] | None = None) -> Path:
    """A copy of ``configs/examples/<example>.yaml`` with absolute inputs and outputs under ``out_root``.

    ``kwargs`` replaces model kwargs (a wrong shape makes a conversion that fails).
    """
    data = load_config(CONFIGS / f"{example}.yaml").model_dump(mode="json")
    data["name"] = name or example
    data["export"]["dir"] = str(out_root / data["name"])
    if kwargs:
        data["model"]["kwargs"] = {**data["model"]["kwargs"], **kwargs}
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_batch(path: Path, conversions: list[Path | dict[str, Any]], **settings: Any) -> Path:
    """A batch file; a conversion is a config path or an entry mapping ({config: PATH, set: [...]})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [c if isinstance(c, dict) else str(c) for c in conversions]
    path.write_text(yaml.safe_dump({"conversions": entries, **settings}, sort_keys=False))
    return path
