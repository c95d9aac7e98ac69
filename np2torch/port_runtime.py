"""Helpers that ``np2torch port`` copies (source text, via :func:`inspect.getsource`) into a
generated ``model.py`` when a layer needs one, and uses as they are to trace the module while
writing it: one definition for both. Only torch here (the generated file imports nothing else),
and no line over 120 columns (the generated file's limit)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["HELPERS", "LayerScale", "MultiHeadAttention", "Normalization", "Separable", "merge_directions",
           "placeholder"]


class Separable(nn.Module):
    """Keras SeparableConv: a depthwise conv (no bias), then a 1x1 pointwise conv."""

    def __init__(self, depthwise: nn.Module, pointwise: nn.Module) -> None:
        super().__init__()
        self.depthwise = depthwise
        self.pointwise = pointwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class Normalization(nn.Module):
    """Keras Normalization: (x - mean) / max(sqrt(variance), 1e-7) along channel dim `dim`.

    Statistics Keras adapted are buffers loaded from the checkpoint; ones written in the Keras
    config (``mean=[...]``) are constants of the module (not in its state dict)."""

    def __init__(self, channels: int, dim: int, mean: list[float] | None = None, variance: list[float] | None = None,
                 invert: bool = False) -> None:
        super().__init__()
        fixed = mean is not None
        self.register_buffer("mean", torch.tensor(mean) if fixed else torch.zeros(channels), persistent=not fixed)
        self.register_buffer("variance", torch.tensor(variance if fixed else [1.0] * channels), persistent=not fixed)
        self.dim = dim
        self.invert = invert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [-1] + [1] * (x.dim() - self.dim - 1)
        mean = self.mean.reshape(shape)
        std = self.variance.sqrt().clamp(min=1e-7).reshape(shape)
        return mean + x * std if self.invert else (x - mean) / std


class LayerScale(nn.Module):
    """ConvNeXt's LayerScale: x * gamma per channel (Keras's `gamma`, torch's `weight`)."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.reshape([-1] + [1] * (x.dim() - self.dim - 1))


def merge_directions(out: torch.Tensor, mode: str, last: bool) -> torch.Tensor:
    """Keras Bidirectional: torch's (N, T, 2u) output split into the directions and merged as Keras does.

    Without return_sequences Keras keeps the forward pass's last step and the backward pass's
    last step, which is time step 0."""
    fwd, bwd = out.chunk(2, dim=-1)
    if last:
        fwd, bwd = fwd[:, -1], bwd[:, 0]
    if mode == "concat":
        return torch.cat([fwd, bwd], dim=-1)
    if mode == "sum":
        return fwd + bwd
    if mode == "mul":
        return fwd * bwd
    return (fwd + bwd) / 2


def placeholder(layer: str, *xs: torch.Tensor) -> torch.Tensor:
    """PLACEHOLDER written by `np2torch port --allow-placeholders`: a Keras layer np2torch cannot port."""
    raise NotImplementedError(f"Keras layer {layer} was not ported: write it by hand")




class MultiHeadAttention(nn.Module):
    """Keras MultiHeadAttention over the time axis of (N, T, C) tensors: query/key/value projections
    per head, softmax(q k^T / sqrt(key_dim)) v, then the output projection (Keras's layer names)."""

    def __init__(self, query_dim: int, value_dim_in: int, key_dim_in: int, heads: int, key_dim: int, value_dim: int,
                 out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.query = nn.Linear(query_dim, heads * key_dim, bias=bias)
        self.key = nn.Linear(key_dim_in, heads * key_dim, bias=bias)
        self.value = nn.Linear(value_dim_in, heads * value_dim, bias=bias)
        self.attention_output = nn.Linear(heads * value_dim, out_dim, bias=bias)
        self.heads = heads
        self.scale = key_dim ** -0.5

    def forward(self, query: torch.Tensor, value: torch.Tensor, key: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        key = value if key is None else key
        q = self.query(query).unflatten(-1, (self.heads, -1)).transpose(1, 2) * self.scale
        k = self.key(key).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        v = self.value(value).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        scores = q @ k.transpose(-1, -2)
        if causal:
            keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        return self.attention_output((scores.softmax(-1) @ v).transpose(1, 2).flatten(2))


HELPERS = {f.__name__: f for f in (Separable, Normalization, LayerScale, MultiHeadAttention, merge_directions,
                                   placeholder)}
