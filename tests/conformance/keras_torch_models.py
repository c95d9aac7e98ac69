"""PyTorch ports of the Keras conformance models, written by hand as a user would (torch only).

Each class mirrors one Keras model of ``test_keras_*.py``; nothing here knows about np2torch.
Inputs are channels-first (NCHW) where Keras' are channels-last, as a PyTorch user keeps them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CNN(nn.Module):
    """Conv2D(4, 3) → BN → ReLU → Conv2D(8, 3) → BN → ReLU → MaxPool2D → Flatten → Dense(5), on 8×8×3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4, eps=1e-3)  # Keras' BatchNormalization epsilon
        self.conv2 = nn.Conv2d(4, 8, 3)
        self.bn2 = nn.BatchNorm2d(8, eps=1e-3)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # pooling as a function, not a module
        return self.fc(x.view(x.size(0), -1))  # flattens (C, H, W); Keras flattened (H, W, C)


class CNNChannelsLastFlatten(CNN):
    """The same layers; forward flattens channels-last like Keras, so the Dense kernel needs no reordering."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.avg_pool2d(F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2), 1)
        return self.fc(torch.flatten(x.permute(0, 2, 3, 1), 1))


class CNNModules(nn.Module):
    """CNN written with modules only (nn.Sequential, nn.MaxPool2d, nn.Flatten)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3), nn.ReLU(),
            nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8, eps=1e-3), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 2 * 2, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DepthwiseSeparable(nn.Module):
    """DepthwiseConv2D(3, depth_multiplier=2, relu) → SeparableConv2D(4, 3) → GlobalAveragePooling2D → Dense(3), on 8×8×3."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(3, 6, 3, groups=3)
        self.sep_dw = nn.Conv2d(6, 6, 3, groups=6, bias=False)  # SeparableConv2D = depthwise (no bias) …
        self.sep_pw = nn.Conv2d(6, 4, 1)  # … then a 1×1 pointwise conv that carries the bias
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.dw(x))
        x = self.sep_pw(self.sep_dw(x))
        return self.fc(x.mean(dim=(2, 3)))


class Recurrent(nn.Module):
    """LSTM(4, return_sequences=True) → GRU(6) → Dense(2), on (batch, 5 steps, 3 features)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.gru = nn.GRU(4, 6, batch_first=True)  # Keras 3 GRU: reset_after=True, torch's formulation
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return self.fc(y[:, -1])


class TwoBranch(nn.Module):
    """Dense(8, relu) → two same-shaped Dense(5) branches (tanh, relu) → Concatenate → Dense(3), on 6 features."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.right = nn.Linear(8, 5)  # the relu branch (registered first: Keras lists the other one first)
        self.left = nn.Linear(8, 5)  # the tanh branch
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.trunk(x))
        return self.head(torch.cat([torch.tanh(self.left(h)), F.relu(self.right(h))], dim=1))


class ConvBranches(nn.Module):
    """Two same-shaped Conv2D(4, 3, same) + BatchNormalization branches (tanh, relu) → Add → GlobalAveragePooling2D → Dense(3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_relu = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_relu = nn.BatchNorm2d(4, eps=1e-3)
        self.conv_tanh = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_tanh = nn.BatchNorm2d(4, eps=1e-3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.bn_tanh(self.conv_tanh(x))) + F.relu(self.bn_relu(self.conv_relu(x)))
        return self.fc(y.mean(dim=(2, 3)))


class BiLSTM(nn.Module):
    """Bidirectional(LSTM(4)) → Dense(2), on (batch, 5 steps, 3 features)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(x)  # final states: forward after x[-1], backward after x[0], as Keras merges them
        return self.fc(torch.cat([h[0], h[1]], dim=1))
