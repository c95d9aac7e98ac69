"""PyTorch models for tests/conformance/test_meaning_diffs.py, written as a PyTorch user writes them.

Each class is the user's natural port of one Keras model with PyTorch's defaults; its keyword
arguments are the fix np2torch states (``eps=1e-3``, ``softmax=True`` …), so the same class is
the failing model and, with the fix, the control. Nothing here knows about np2torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBN(nn.Module):
    """Conv2D(4, 3) → BatchNormalization → ReLU → Flatten → Dense(5), on (N, 3, 6, 6)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4, eps=eps)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.bn1(self.conv(x))), 1))


class DenseLN(nn.Module):
    """Dense(8) → LayerNormalization → Dense(3), on (N, 6)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8, eps=eps)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ln(self.fc1(x)))


class Classifier(nn.Module):
    """Dense(8, relu) → Dense(4, activation="softmax"), on (N, 6): a PyTorch model returns logits."""

    def __init__(self, softmax: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(F.relu(self.fc1(x)))
        return torch.softmax(y, -1) if self.softmax else y


class StridedConv(nn.Module):
    """Conv2D(4, 3, strides=2, padding="same") → GlobalAveragePooling2D → Dense(2), on (N, 3, 8, 8)."""

    def __init__(self, tf_same: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=0 if tf_same else 1)
        self.fc = nn.Linear(4, 2)
        self.tf_same = tf_same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_same:
            x = F.pad(x, [0, 1, 0, 1])
        return self.fc(self.conv(x).mean((2, 3)))


class GeluMLP(nn.Module):
    """Dense(8, gelu approximate=True) → Dense(3), on (N, 6)."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _hard_sigmoid(t: torch.Tensor) -> torch.Tensor:
    return F.relu6(t + 3) / 6  # Keras 3's hard_sigmoid


class HardSigmoidLSTM(nn.Module):
    """LSTM(4, recurrent_activation="hard_sigmoid") → Dense(2) on (N, 5, 3); ``custom_cell`` runs the
    same weights in a cell with Keras 3's hard_sigmoid gates (what nn.LSTM cannot express)."""

    def __init__(self, custom_cell: bool = False) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)
        self.custom_cell = custom_cell

    def _cell(self, x: torch.Tensor) -> torch.Tensor:
        r = self.lstm
        h = x.new_zeros(x.shape[0], 4)
        c = x.new_zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            i, f, g, o = (x[:, t] @ r.weight_ih_l0.T + r.bias_ih_l0 + h @ r.weight_hh_l0.T + r.bias_hh_l0).chunk(4, 1)
            c = _hard_sigmoid(f) * c + _hard_sigmoid(i) * torch.tanh(g)
            h = _hard_sigmoid(o) * torch.tanh(c)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self._cell(x) if self.custom_cell else self.lstm(x)[0][:, -1])


class ConvAvgPool(nn.Module):
    """Conv2D(4, 3, padding="same") → AveragePooling2D(3, strides=1, padding="same") → GlobalAveragePooling2D → Dense(2)."""

    def __init__(self, count_include_pad: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=count_include_pad)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).mean((2, 3)))


class SmallCNN(nn.Module):
    """Conv2D(4, 3) → ReLU → GlobalAveragePooling2D → Dense(2), on (N, 3, 8, 8); the input scaling cases
    add Rescaling's ``scale`` or Normalization's per-channel ``mean`` and ``variance``."""

    def __init__(self, scale: float = 1.0, mean: list[float] | None = None, variance: list[float] | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)
        self.scale = scale
        self.mean = torch.tensor(mean or [0.0] * 3).view(1, 3, 1, 1)
        self.std = torch.tensor(variance or [1.0] * 3).sqrt().view(1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * self.scale - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class Wider(nn.Module):
    """The wrong architecture: Dense(16) → Dense(10) where the source has Dense(16) → Dense(5)."""

    def __init__(self, out: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))



class GRUNet(nn.Module):
    """GRU(4) → Dense(2) on (N, 5, 3), the natural port of a Keras GRU."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gru(x)[0][:, -1])


class DenseLNGelu(nn.Module):
    """Flax Dense(8) → LayerNorm → gelu → Dense(3), on (N, 6): Flax's LayerNorm epsilon is 1e-6 and its gelu the tanh one."""

    def __init__(self, eps: float = 1e-5, approximate: str = "none") -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8, eps=eps)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.ln(self.fc1(x))))
