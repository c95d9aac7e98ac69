"""Many-to-one joins and per-head / per-gate layouts, as a table of join kinds (one manifest row per join).

Domain module of the mapping stage (no stage imports). Some frameworks store one torch tensor
as several arrays, or several torch tensors' worth as one:

- **attention per head**: Keras ``MultiHeadAttention`` (``EinsumDense`` query/key/value kernels
  ``(d, heads, head_dim)``, biases ``(heads, head_dim)``, output kernel ``(heads, head_dim, d)``)
  and Flax ``MultiHeadDotProductAttention`` (the same shapes) fill either one fused ``qkv``
  Linear ``(3·d, d)`` (timm), ``nn.MultiheadAttention``'s ``in_proj_weight``, or separate
  q/k/v/out Linears. Projections are paired by their role names (:data:`ROLES`), never by order;
- **recurrent cells gate by gate**: Flax ``LSTMCell`` / ``OptimizedLSTMCell`` (``ii if ig io``
  input kernels, ``hi hf hg ho`` hidden kernels with biases) and ``GRUCell`` (``ir iz in`` with
  biases, ``hr hz hn``, only ``hn`` with a bias) fill one layer of ``nn.LSTM`` / ``nn.GRU``
  (:data:`GATES`: torch's gate order).

A join is one manifest row with several ``sources``: every source gets the row's transform, then
they are concatenated on axis ``concat`` (what convert and evidence already do for a concat
rule). A square part (``d == heads·head_dim``, ``in == hidden``) is also loadable untransposed,
so such rows list both layouts as candidates, as every square kernel does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from np2torch.tasks import transforms as T
from np2torch.tasks.layouts import AMBIGUOUS_CONFIDENCE

__all__ = ["GATES", "JOINS", "ROLES", "Proposal", "Src", "attention_parts", "join_claims", "role_of", "source_join"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Src:
    """One source array as a layer sees it: ``prefix`` (e.g. ``layer i`` of a scanned stack) first."""

    key: str
    shape: Shape  # after the prefix
    stored: Shape  # the array's own shape
    prefix: tuple = ()

    def spec(self, *steps: list) -> list:
        return [list(s) for s in self.prefix] + [list(s) for s in steps]


@dataclass
class Proposal:
    """One row the families strategy proposes (the strategies module turns it into a claim)."""

    target: str
    sources: list[str]
    spec: list
    how: str = "role"  # a join: paired by role or gate names (never by position); plain layers say "structure"
    confidence: float = 0.8
    concat: int | None = None
    note: str = ""
    zeros: bool = False
    candidates: list = field(default_factory=list)


# role → the names frameworks give that projection (source layers and torch modules alike)
ROLES: dict[str, tuple[str, ...]] = {
    "q": ("query", "q", "q_proj", "to_q", "wq", "q_lin"),
    "k": ("key", "k", "k_proj", "to_k", "wk", "k_lin"),
    "v": ("value", "v", "v_proj", "to_v", "wv", "v_lin"),
    "o": ("out", "output", "attention_output", "o", "o_proj", "out_proj", "proj", "to_out", "wo", "out_lin"),
}
# fused torch projections: name → the roles it stacks on its output axis, in order
FUSED: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "in_proj": ("q", "k", "v"), "to_qkv": ("q", "k", "v")}


def role_of(name: str) -> str | None:
    low = name.lower()
    return next((r for r, names in ROLES.items() if low in names), None)


@dataclass(frozen=True)
class Gates:
    gates: tuple[str, ...]  # torch's gate order, as the source names them (ii, if, … / ir, iz, …)
    why: str


GATES: dict[str, Gates] = {
    "lstm": Gates(("i", "f", "g", "o"), "Flax LSTMCell/OptimizedLSTMCell: Dense ii/if/ig/io (no bias) on x, hi/hf/hg/ho (bias) on h; "
                  "torch's gate order is the same i, f, g, o"),
    "gru": Gates(("r", "z", "n"), "Flax GRUCell: Dense ir/iz/in (bias) on x, hr/hz (no bias), hn (bias) on h inside r·(…), "
                 "exactly torch's n = tanh(W_in x + b_in + r·(W_hn h + b_hn))"),
}


def _cell_kind(children: dict[str, dict[str, Src]]) -> str | None:
    for kind, g in GATES.items():
        names = {f"{side}{gate}" for side in "ih" for gate in g.gates}
        if set(children) == names and all("kernel" in leaves for leaves in children.values()):
            return kind
    return None


def source_join(children: dict[str, dict[str, Src]]) -> tuple[str, dict[str, dict[str, Src]]] | None:
    """(join kind, parts) when the child layers of one scope form a join: attention (parts by role)
    or a recurrent cell (parts by gate name)."""
    kind = _cell_kind(children)
    if kind is not None:
        return f"{kind}_cell", children
    roles: dict[str, dict[str, Src]] = {}
    for name, leaves in children.items():
        r = role_of(name)
        if r is not None and r not in roles and "kernel" in leaves:
            roles[r] = leaves
    if set(roles) == set(ROLES) and any(len(roles[r]["kernel"].shape) == 3 for r in ROLES):
        return "attention", roles
    return None


def attention_parts(module: str, module_type: str,
                    children: dict[str, dict[str, Any]]) -> list[tuple[tuple[str, ...], dict[str, str]]] | None:
    """A torch attention module's projections: [(roles stacked on the output axis, {weight/bias: key})].

    ``children``: the module's own parameters under ``""`` and its Linear children by name, each
    ``{leaf: target key}``. ``nn.MultiheadAttention`` keeps ``in_proj_weight``/``in_proj_bias`` itself.
    """
    own = children.get("", {})
    parts: dict[tuple[str, ...], dict[str, str]] = {}
    if module_type == "MultiheadAttention" and "in_proj_weight" in own:
        parts[FUSED["in_proj"]] = {"weight": own["in_proj_weight"], **({"bias": own["in_proj_bias"]} if "in_proj_bias" in own else {})}
    for name, leaves in children.items():
        if not name:
            continue
        if name.lower() in FUSED:
            parts.setdefault(FUSED[name.lower()], leaves)
        elif (r := role_of(name)) is not None:
            parts.setdefault((r,), leaves)
    roles = [r for p in parts for r in p]
    if sorted(roles) != sorted(ROLES):
        return None
    return list(parts.items())


# ---------------------------------------------------------------------------------------------
# claims


def _kernel_steps(role: str, src: Src) -> list | None:
    """Per-head kernel → (in, out) matrix: q/k/v (d, h, hd) → (d, h·hd); output (h, hd, d) → (h·hd, d)."""
    s = src.shape
    if len(s) == 2:
        return []
    if len(s) != 3:
        return None
    return [["reshape", [s[0], s[1] * s[2]]]] if role != "o" else [["reshape", [s[0] * s[1], s[2]]]]


def _bias_steps(src: Src) -> list:
    return [["reshape", [src.shape[0] * src.shape[1]]]] if len(src.shape) == 2 else []


def _joined(target: str, tshape: Shape, parts: list[Src], steps: list, note: str, square_ok: bool) -> Proposal | None:
    """One row: every part through ``steps`` (after its own prefix), concatenated on axis 0."""
    specs = [p.spec(*steps) for p in parts]
    if any(s != specs[0] for s in specs[1:]) or any(p.shape != parts[0].shape for p in parts):
        return None  # one spec for every part: parts of one join share their layout and shape
    try:
        one = T.apply_shape(parts[0].stored, specs[0])
    except T.TransformError:
        return None
    result = (one[0] * len(parts), *one[1:]) if one else ()
    if tuple(result) != tuple(tshape):
        return None
    cands: list = []
    if square_ok and steps and steps[-1] == ["transpose", None] and len(one) == 2 and one[0] == one[1]:
        cands = [specs[0], parts[0].spec(*steps[:-1])]  # a square part: (in, out) or already (out, in)
    return Proposal(target, [p.key for p in parts], specs[0], confidence=AMBIGUOUS_CONFIDENCE if cands else 0.8,
                    concat=0 if len(parts) > 1 else None, note=note, candidates=cands)


def _attention_claims(roles: dict[str, dict[str, Src]], parts: list[tuple[tuple[str, ...], dict[str, str]]],
                      shapes: dict[str, Shape]) -> list[Proposal] | None:
    out: list[Proposal] = []
    for stacked, keys in parts:
        names = "+".join(stacked)
        for leaf, tkey in keys.items():
            srcs = [roles[r].get("kernel" if leaf == "weight" else "bias") for r in stacked]
            if any(s is None for s in srcs):
                return None
            if leaf == "weight":
                steps = [_kernel_steps(r, s) for r, s in zip(stacked, srcs)]
                if any(st is None for st in steps) or any(st != steps[0] for st in steps[1:]):
                    return None
                steps = steps[0] + [["transpose", None]]
            else:
                steps = _bias_steps(srcs[0])
            what = f"per-head {leaf}s joined" if len(stacked) > 1 else f"per-head {leaf}"
            p = _joined(tkey, shapes[tkey], srcs, steps, f"attention {names}: {what} on the output axis in role order",
                        square_ok=leaf == "weight")
            if p is None:
                return None
            out.append(p)
        if "bias" not in keys and any("bias" in roles[r] for r in stacked):
            return None  # the source has biases the model cannot hold
    return out


def _cell_claims(kind: str, gates: dict[str, dict[str, Src]], keys: dict[str, str], shapes: dict[str, Shape]) -> list[Proposal] | None:
    g = GATES[kind]
    out: list[Proposal] = []
    for side, tw, tb in (("i", "weight_ih", "bias_ih"), ("h", "weight_hh", "bias_hh")):
        parts = [gates[f"{side}{x}"] for x in g.gates]
        if tw not in keys:
            return None
        p = _joined(keys[tw], shapes[keys[tw]], [x["kernel"] for x in parts], [["transpose", None]],
                    f"{kind} gates {', '.join(side + x for x in g.gates)} (in, u) kernels "
                    f"→ torch's order {', '.join(g.gates)}; {g.why}", True)
        if p is None:
            return None
        out.append(p)
        with_bias = [i for i, x in enumerate(parts) if "bias" in x]
        if tb not in keys:
            if with_bias:
                return None
            continue
        if not with_bias:
            out.append(Proposal(keys[tb], [], [["zeros", None]], zeros=True, note=f"{kind} cell: no {side}-side biases; zeros"))
            continue
        if len(with_bias) == len(parts):
            p = _joined(keys[tb], shapes[keys[tb]], [x["bias"] for x in parts], [], f"{kind} gate biases in torch's order", False)
        elif len(with_bias) == 1:
            i, b = with_bias[0], parts[with_bias[0]]["bias"]
            u = b.shape[0]
            p = _joined(keys[tb], shapes[keys[tb]], [b], [["pad", [i * u, (len(parts) - i - 1) * u]]],
                        f"{kind}: only gate {g.gates[i]} has a {side}-side bias; the others' are zeros", False)
        else:
            return None
        if p is None:
            return None
        out.append(p)
    return out


# the torch module kinds (tasks/kinds.py) an attention module's q/k/v/out projections are: Linear
PROJECTION_KINDS = frozenset({"dense"})


@dataclass(frozen=True)
class Join:
    source_kind: str  # what :func:`source_join` calls it
    target_kind: str  # the slot kind it fills
    claims: Any  # (parts, slot keys, target shapes) → proposals or None
    why: str


JOINS: dict[str, Join] = {
    "attention": Join("attention", "attention", _attention_claims, "per-head q/k/v/out projections → fused or split torch projections"),
    "lstm_cell": Join("lstm_cell", "lstm", lambda parts, keys, shapes: _cell_claims("lstm", parts, keys, shapes), GATES["lstm"].why),
    "gru_cell": Join("gru_cell", "gru", lambda parts, keys, shapes: _cell_claims("gru", parts, keys, shapes), GATES["gru"].why),
}


def join_claims(kind: str, parts: dict[str, dict[str, Src]], slot_keys: Any, shapes: dict[str, Shape]) -> list[Proposal] | None:
    return JOINS[kind].claims(parts, slot_keys, shapes)
