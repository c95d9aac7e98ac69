"""The layer kinds table (issue 17, section 2): one row per kind, read by presets, layouts and the strategies.

- every row's layouts bring a channels-last source shape to the shape real torch modules have;
- a kind added as one row (Keras PReLU → ``nn.PReLU``, registered on a copy of the table) is
  recognised, laid out and matched by structure, with no other edit;
- no module of the package compares a value with a kind's name outside ``tasks/kinds.py``.
"""

from __future__ import annotations

import ast
import itertools
import textwrap
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from conftest import REPO
from np2torch.tasks import kinds as K
from np2torch.tasks import layouts as L
from np2torch.tasks import presets as P
from np2torch.tasks import transforms as T
from np2torch.tasks.config import MappingSpec
from np2torch.tasks.infer_mapping import infer_manifest
from np2torch.tasks.load_arrays import scan_source
from np2torch.tasks.model import TargetInfo, describe_targets

# ---------------------------------------------------------------------------------------------
# the table against torch


def test_every_torch_class_of_a_row_exists() -> None:
    for kind in K.KINDS.values():
        for cls in kind.torch_classes:
            assert getattr(nn, cls, None) or getattr(nn.modules.linear, cls, None), f"{kind.name}: no torch class {cls}"
            assert K.module_kind(cls) == kind.name
    assert K.module_kind("MyCustomBlock") is None


_CONV = {1: (nn.Conv1d, nn.ConvTranspose1d), 2: (nn.Conv2d, nn.ConvTranspose2d), 3: (nn.Conv3d, nn.ConvTranspose3d)}


def _torch_weight(kind: str, leaf: str, keras_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The weight of the torch module a Keras layer with this kernel becomes, from real torch modules."""
    *s, a, b = keras_shape
    if kind == "dense":  # (in, out)
        return tuple(nn.Linear(a, b).weight.shape)
    if kind == "conv_transpose":  # (*S, O, I)
        return tuple(_CONV[len(s)][1](b, a, tuple(s)).weight.shape)
    if leaf == "depthwise_kernel":  # (*S, C, M): Conv(groups=C)
        return tuple(_CONV[len(s)][0](a, a * b, tuple(s), groups=a).weight.shape)
    return tuple(_CONV[len(s)][0](a, b, tuple(s)).weight.shape)  # (*S, I, O)


@pytest.mark.parametrize("kind", ["dense", "conv", "conv_transpose"])
def test_source_layouts_give_the_torch_modules_shapes(kind: str) -> None:
    for (leaf, nd), (spec, why) in K.KINDS[kind].source_layouts.items():
        src = (3, 2, 4, 5, 6)[-nd:] if leaf != "pointwise_kernel" else (*(1,) * (nd - 2), 8, 6)
        assert why and T.apply_shape(src, spec) == _torch_weight(kind, leaf, src), (kind, leaf, nd)


@pytest.mark.parametrize("kind, module", [("lstm", nn.LSTM(3, 5)), ("gru", nn.GRU(3, 5)), ("rnn", nn.RNN(3, 5))])
def test_recurrent_rows_fill_every_torch_leaf(kind: str, module: nn.Module) -> None:
    rec = K.recurrent(kind)
    assert rec is not None and len(rec.gate_order[0]) == rec.gates and sorted(rec.gate_order[0]) == sorted(rec.gate_order[1])
    keras = {leaf: tuple(shape) for leaf, shape in rec.source_shapes(3, 5, bias=True).items()}
    assert K.source_kind({k: v for k, v in keras.items() if k != "bias"}, "layer") == kind
    filled = {f"{leaf}_l0": T.apply_shape(keras[src], spec) for src, outs in rec.leaves.items() for leaf, spec, _ in outs}
    filled |= {f"{z}_l0": tuple(getattr(module, f"{z}_l0").shape) for z in rec.zeros}
    assert filled == {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_gru_reset_before_is_a_misfit_not_a_silent_load() -> None:
    rec = K.recurrent("gru")
    assert rec.misfit({"kernel": (3, 15), "bias": (15,)}).leaf == "bias"
    assert rec.misfit({"kernel": (3, 15), "bias": (2, 15)}) is None


# ---------------------------------------------------------------------------------------------
# a kind added as one row


def _prelu_row() -> K.Kind:
    """Keras PReLU(shared_axes=[1, 2]) after a conv: alpha (1, 1, C) → nn.PReLU(C).weight (C,)."""
    squeeze = [["index", 0], ["index", 0]]
    return K.Kind(
        "prelu", "Keras PReLU(shared_axes=[1, 2]) → nn.PReLU(C)", ("PReLU",),
        (K.Recogniser(65, lambda leaves, scope: set(leaves) == {"alpha"}, "a PReLU has one leaf, alpha"),),
        leaf_roles={"alpha": "weight"},
        source_layouts={("alpha", 3): (squeeze, "alpha (1, 1, C): H and W shared → weight (C,)")},
        target_layouts=(lambda nd: [K.TargetLayout(lambda t: (1, 1, *t), squeeze, "Keras alpha (1, 1, C)")] if nd == 1 else [],),
        channels=K.Channels("weight", 0, "num_parameters: the channels"))


def _prelu_case(tmp_path: Path) -> dict[str, dict]:
    tmp_path.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"dense/kernel:0": rng.standard_normal((3, 4)).astype(np.float32), "dense/bias:0": np.zeros(4, np.float32),
              "p_re_lu/alpha:0": rng.random((1, 1, 4)).astype(np.float32)}
    np.savez(tmp_path / "w.npz", **arrays)
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4))
    rows = infer_manifest(scan_source(tmp_path / "w.npz"), describe_targets(model), MappingSpec(preset="keras"))
    return {r["target_key"] or r["source_key"]: r for r in rows}


def test_a_kind_is_one_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alpha, target = (1, 1, 4), TargetInfo("act.weight", (4,), "float32", False, "act", "PReLU")
    before = _prelu_case(tmp_path / "before")
    assert K.source_kind({"alpha": alpha}, "p_re_lu") is None and K.module_kind("PReLU") is None
    assert P.view("p_re_lu/alpha:0", alpha, P.PRESETS["keras"]).transform == []
    assert L.source_layouts(alpha, target) == []
    assert before["1.weight"]["how"] != "structure"

    monkeypatch.setattr(K, "KINDS", {**K.KINDS, "prelu": _prelu_row()})
    squeeze = [["index", 0], ["index", 0]]
    assert K.source_kind({"alpha": alpha}, "p_re_lu") == "prelu" and K.module_kind("PReLU") == "prelu"
    assert K.source_kind({"kernel": (3, 4), "bias": (4,)}, "dense") == "dense"  # the other rows keep their order
    # presets: the name-only guess and the layer's layout
    assert P.view("p_re_lu/alpha:0", alpha, P.PRESETS["keras"]).transform == squeeze
    assert P.view("p_re_lu/alpha:0", alpha, P.PRESETS["none"]).transform == []  # channels-first source: no layout
    assert P.layer_leaf_transform("prelu", "alpha", alpha, P.PRESETS["keras"]) == squeeze
    # layouts: the target's known layouts, and the channel count a flatten after it sees
    assert L.source_layouts(alpha, target) == [squeeze]
    assert L.flatten_heuristic([target, TargetInfo("fc.weight", (2, 12), "float32", False, "fc", "Linear")]) == {"fc": [4, 3, 1]}
    # the mapping stage: structure matching pairs the layer with the module
    after = _prelu_case(tmp_path / "after")
    row = after["1.weight"]
    assert (row["source_key"], row["how"]) == ("p_re_lu/alpha:0", "structure")
    assert row.transform_spec == squeeze and row["confidence"] > before["1.weight"]["confidence"]


# ---------------------------------------------------------------------------------------------
# no kind branches outside the table

PACKAGE_FOLDERS = [REPO / "tasks", REPO / "flows", REPO / "np2torch"]
TABLE = REPO / "tasks" / "kinds.py"


def _kind_names(node: ast.AST) -> list[str]:
    """Kind names a constant or a literal tuple/list/set holds."""
    elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [e.value for e in elts if isinstance(e, ast.Constant) and e.value in K.KINDS]


def kind_branches(source: str, where: str = "") -> list[str]:
    """``x == "gru"``, ``kind in ("conv", "conv_transpose")``, ``{"dense", "conv"}``: code deciding by a kind's name.

    A substring test on a name (``"embedding" in scope``) is not one, nor is another table keyed by
    names that happen to be kind names (Keras layer names in a reader). Another ``kind`` (a dtype's,
    a msgpack type's) compared with strings that are not kind names is not one either.
    """
    out: dict[int, str] = {}  # one finding per line
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, (a, b) in zip(node.ops, itertools.pairwise(operands)):
                hits = (_kind_names(a) + _kind_names(b) if isinstance(op, (ast.Eq, ast.NotEq))
                        else _kind_names(b) if isinstance(op, (ast.In, ast.NotIn)) and not isinstance(b, ast.Constant) else [])
                if hits:
                    out.setdefault(node.lineno, f"{where}:{node.lineno} compares with {hits}")
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(_kind_names(node)) >= 2:
            out.setdefault(node.lineno, f"{where}:{node.lineno} lists kinds {_kind_names(node)}")
    return [out[n] for n in sorted(out)]


def test_the_checker_sees_kind_branches() -> None:
    bad = textwrap.dedent("""
        if kind == "gru": pass
        if kind in ("conv", "conv_transpose"): pass
        if TORCH_KINDS.get(t) != "dense": pass
        AMBIGUOUS = {"dense", "lstm"}
    """)
    assert [f.split(" ")[0] for f in kind_branches(bad)] == [":2", ":3", ":4", ":5"]
    fine = textwrap.dedent("""
        if "embedding" in scope.lower(): pass
        if kind == "ext" or kind in ("str", "bin"): pass
        VAR_NAMES = {"dense": ("kernel", "bias"), "embedding": ("embeddings",)}
        if K.recurrent(kind) is not None: pass
    """)
    assert kind_branches(fine) == []


def test_no_kind_branches_outside_the_table() -> None:
    found = []
    for folder in PACKAGE_FOLDERS:
        for f in sorted(folder.rglob("*.py")):
            if f != TABLE:
                found += kind_branches(f.read_text(), str(f.relative_to(REPO)))
    assert not found, "decide by the kinds table (tasks/kinds.py), not by a kind's name: " + "; ".join(found)
