"""PyTorch ports of the Flax models in test_flax_models.py, as a user would write them.

Each takes the same input array as its Flax original (channels-last images), so one verify
input feeds both; nothing here knows how the Flax parameters are named or laid out.
"""

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 12, hidden: int = 32, d_out: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    """Conv(8, 3×3) → BatchNorm → ReLU → avg-pool 2 → Conv(16, 3×3) → ReLU → flatten → Dense(10)."""

    def __init__(self, in_channels: int = 3, image_size: int = 12, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3)
        self.bn1 = nn.BatchNorm2d(8, eps=1e-5)  # flax.linen.BatchNorm's default epsilon
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3)
        side = (image_size - 2) // 2 - 2
        self.fc = nn.Linear(16 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # the Flax model takes (N, H, W, C)
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))  # (C, H, W) order; Flax's reshape flattened (H, W, C)


class Recurrent(nn.Module):
    """``nn.LSTM`` / ``nn.GRU`` (batch first, several layers) returning the last layer's sequence,
    as Flax's ``nn.RNN(LSTMCell(h))`` stacked ``layers`` times does."""

    def __init__(self, cell: str = "lstm", d_in: int = 3, hidden: int = 6, layers: int = 1):
        super().__init__()
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(d_in, hidden, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class ScanBlock(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=1e-6)  # flax.linen.LayerNorm's epsilon
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(torch.tanh(self.norm(x)))


class ScanNet(nn.Module):
    """Dense → ``depth`` residual blocks (LayerNorm, Dense) → Dense: the unrolled form of a Flax ``nn.scan`` model."""

    def __init__(self, d_in: int = 4, d: int = 8, depth: int = 3, d_out: int = 2):
        super().__init__()
        self.stem = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(ScanBlock(d) for _ in range(depth))
        self.head = nn.Linear(d, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention → Dense, three ways torch code writes the projections:
    ``fused`` (one ``qkv`` Linear, as timm), ``split`` (q, k, v, out Linears) or ``torch``
    (``nn.MultiheadAttention``)."""

    def __init__(self, d: int = 16, heads: int = 2, d_out: int = 4, style: str = "fused"):
        super().__init__()
        self.heads, self.style = heads, style
        if style == "fused":
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
        elif style == "split":
            self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        else:
            self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "torch":
            return self.head(self.mha(x, x, x, need_weights=False)[0])
        b, n, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1) if self.style == "fused" else (self.q(x), self.k(x), self.v(x))
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.head(self.proj(y) if self.style == "fused" else self.out(y))


def _divisible(v: float, d: int = 8) -> int:
    n = max(d, int(v + d / 2) // d * d)
    return n + d if n < 0.9 * v else n


def _conv_bn(c_in: int, c_out: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    pad = [nn.ZeroPad2d((0, 1, 0, 1))] if stride == 2 else []  # Keras' 'same'/correct_pad on even sizes: bottom/right only
    return [*pad, nn.Conv2d(c_in, c_out, k, stride, padding=k // 2 if stride == 1 else 0, groups=groups, bias=False),
            nn.BatchNorm2d(c_out, eps=1e-3), *([nn.ReLU6()] if act else [])]


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        mid = c_in * expansion
        layers = _conv_bn(c_in, mid) if expansion != 1 else []
        self.body = nn.Sequential(*layers, *_conv_bn(mid, mid, 3, stride, groups=mid), *_conv_bn(mid, c_out, act=False))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """keras.applications.MobileNetV2 (channels-first input, even image sizes, logits)."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # t, c, n, s

    def __init__(self, alpha: float = 0.35, num_classes: int = 10):
        super().__init__()
        c = _divisible(32 * alpha)
        layers: list[nn.Module] = _conv_bn(3, c, 3, 2)
        for t, ch, n, s in self.SETTINGS:
            out = _divisible(ch * alpha)
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        last = _divisible(1280 * alpha) if alpha > 1.0 else 1280
        self.features = nn.Sequential(*layers, *_conv_bn(c, last))
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))
