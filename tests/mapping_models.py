"""PyTorch models equivalent to the source-framework models of tests/test_mapping_cases.py.

Each takes its input in the source framework's layout (channels-last images, (N, T, F)
sequences), so one input file feeds both the NumPy reference and the converted model.
"""
from __future__ import annotations

import torch
from torch import nn


class LSTMNet(nn.Module):
    """Keras: LSTM(u, return_sequences=True) → Dense(out)."""

    def __init__(self, n_in: int = 3, units: int = 5, n_out: int = 2):
        super().__init__()
        self.rnn = nn.LSTM(n_in, units, batch_first=True)
        self.head = nn.Linear(units, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


class GRUNet(LSTMNet):
    """Keras: GRU(u, return_sequences=True, reset_after=True) → Dense(out)."""

    def __init__(self, n_in: int = 3, units: int = 5, n_out: int = 2):
        super().__init__(n_in, units, n_out)
        self.rnn = nn.GRU(n_in, units, batch_first=True)


class MLP(nn.Module):
    """Dense → tanh → … (sizes given); the last layer has no activation."""

    def __init__(self, sizes: list[int] = (4, 8, 8, 3)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


class FlaxCNN(nn.Module):
    """Flax: Conv(c, (3, 3), padding='VALID') → relu → reshape (channels-last flatten) → Dense(out)."""

    def __init__(self, in_ch: int = 2, ch: int = 4, size: int = 6, n_out: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, ch, 3)
        self.fc = nn.Linear(ch * (size - 2) ** 2, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x.permute(0, 3, 1, 2)))
        return self.fc(torch.flatten(x, 1))


class _SelfAttention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)


class _DenseNorm(nn.Module):
    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=1e-12)


class _BertAttention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.self = _SelfAttention(d)
        self.output = _DenseNorm(d, d)


class _BertLayer(nn.Module):
    def __init__(self, d: int, inter: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention = _BertAttention(d)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, inter)
        self.output = _DenseNorm(inter, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        hd = d // self.heads
        sa = self.attention.self

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(n, t, self.heads, hd).transpose(1, 2)  # (N, H, T, hd)

        q, k, v = split(sa.query(x)), split(sa.key(x)), split(sa.value(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, dim=-1)
        ctx = (a @ v).transpose(1, 2).reshape(n, t, d)
        x = self.attention.output.LayerNorm(self.attention.output.dense(ctx) + x)
        h = nn.functional.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(h) + x)


class BertEncoder(nn.Module):
    """HF-style names (encoder.layer.0.attention.self.query …) for a TF1 BERT checkpoint's encoder."""

    def __init__(self, d: int = 8, inter: int = 16, heads: int = 2, layers: int = 1):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_BertLayer(d, inter, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layer:
            x = layer(x)
        return x


class _Attn(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)  # timm: one fused projection, rows [q; k; v]
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(n, t, d))


class _Mlp(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = _Attn(d, heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = _Mlp(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """timm-style ViT blocks (blocks.0.attn.qkv …) on already-embedded tokens."""

    def __init__(self, d: int = 8, heads: int = 2, hidden: int = 16, depth: int = 1):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d, heads, hidden) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


class TiedLM(nn.Module):
    """Embedding → Linear → tanh → output head sharing the embedding matrix (tied weights)."""

    def __init__(self, vocab: int = 11, d: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(self.emb(idx))))


class DepthwiseNet(nn.Module):
    """Keras: DepthwiseConv2D(3, depth_multiplier=2) on channels-last input."""

    def __init__(self, ch: int = 3, mult: int = 2):
        super().__init__()
        self.dw = nn.Conv2d(ch, ch * mult, 3, groups=ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SeparableNet(nn.Module):
    """Keras: SeparableConv2D(out, 3, depth_multiplier=mult) on channels-last input: a depthwise conv
    (no bias) followed by a 1×1 pointwise conv (with the layer's bias)."""

    def __init__(self, ch: int = 3, mult: int = 2, out: int = 4):
        super().__init__()
        self.depthwise = nn.Conv2d(ch, ch * mult, 3, groups=ch, bias=False)
        self.pointwise = nn.Conv2d(ch * mult, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class BiLSTMNet(nn.Module):
    """Keras: Bidirectional(LSTM(u, return_sequences=True)) (merge_mode='concat') → Dense(out)."""

    def __init__(self, n_in: int = 3, units: int = 5, n_out: int = 2):
        super().__init__()
        self.rnn = nn.LSTM(n_in, units, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * units, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


class StackedLSTMNet(nn.Module):
    """Keras: LSTM(u, return_sequences=True) → LSTM(u, return_sequences=True) → Dense(out)."""

    def __init__(self, n_in: int = 3, units: int = 5, n_out: int = 2):
        super().__init__()
        self.rnn = nn.LSTM(n_in, units, num_layers=2, batch_first=True)
        self.head = nn.Linear(units, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])
