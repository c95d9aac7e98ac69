"""Seconds for the issue-19 diagnosis on a model of about 100 modules (target: under 10 s here).

The model: a stem conv, then blocks of Conv2d → BatchNorm2d → GELU (stride 2 every fourth
block, symmetric padding), an AvgPool2d, a Linear head, ~100 leaf modules. The "source" is the
same model with Keras' BatchNorm epsilon (1e-3) and GELU's tanh approximation; the user's port has
PyTorch's defaults. Rows:

- ``found (one difference)``: only the epsilon differs, the diagnosis names it;
- ``found (two, combined)``: epsilon and GELU differ: no single change reproduces, the greedy
  combination does;
- ``nothing explains it (worst case)``: one weight corrupted: every row is tried, the input map
  fitted, the greedy rounds run, and the diagnosis says nothing.

    PYTHONPATH=$PWD .venv/bin/python bench/diagnose.py [--blocks 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

from np2torch.tasks.diagnose import diagnose


def build(blocks: int, eps: float, approximate: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1)]
    for i in range(blocks):
        stride = 2 if i % 8 == 7 else 1
        layers += [nn.Conv2d(8, 8, 3, stride=stride, padding=1), nn.BatchNorm2d(8, eps=eps), nn.GELU(approximate=approximate)]
    layers += [nn.AvgPool2d(2), nn.Flatten(), nn.LazyLinear(10)]
    return nn.Sequential(*layers)


def _pair(blocks: int, x: torch.Tensor, eps: float, approximate: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    src = build(blocks, eps, approximate)
    src(x)  # materialise the lazy head
    for m in src.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.05, 0.5)  # small variances: epsilon matters
    user = build(blocks, 1e-5, "none")
    user(x)
    user.load_state_dict(src.state_dict())
    return src.eval(), user.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    rows = []
    for label, eps, approx, corrupt in (("found (one difference)", 1e-3, "none", False), ("found (two, combined)", 1e-3, "tanh", False),
                                        ("nothing explains it (worst case)", 1e-5, "none", True)):
        src, user = _pair(args.blocks, x, eps, approx)
        with torch.no_grad():
            ref = src(x).numpy()
            if corrupt:
                user[4].weight.mul_(1.5)
        n = sum(1 for m in user.modules() if not any(True for _ in m.children()))
        t = time.perf_counter()
        found = diagnose(user, [x.numpy()], [ref], rtol=1e-4, atol=1e-5)
        rows.append({"case": label, "modules": n, "seconds": round(time.perf_counter() - t, 2),
                     "finding": found.message().split(" — ")[0] if found else None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| case | leaf modules | seconds | finding |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['modules']} | {r['seconds']} | {r['finding'] or '(none: the failure stands as it is)'} |")


if __name__ == "__main__":
    main()
