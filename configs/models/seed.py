"""Architectures of the three examples in the seed article, done right.

- SeedLinear:  Example 1, a bare nn.Linear(2, 10) (state-dict keys ``weight``, ``bias``).
- SeedLayers:  Example 2, Conv2d -> Linear -> Linear on 3x28x28 images, with the ReLUs and
               the Flatten the article left out (without Flatten the forward pass fails).
- SeedPickled: Example 3, a small model named by import path instead of ``torch.load``-ing a
               pickled architecture.
"""
import torch
from torch import nn


class SeedLinear(nn.Linear):
    """Example 1: nn.Linear(2, 10). Keys: weight (10, 2), bias (10,)."""

    def __init__(self, in_features: int = 2, out_features: int = 10):
        super().__init__(in_features, out_features)


class SeedLayers(nn.Sequential):
    """Example 2: Conv2d(3,16,3) -> ReLU -> Flatten -> Linear(16*26*26,128) -> ReLU -> Linear(128,10).

    Input (N, 3, 28, 28). Keys: 0.weight, 0.bias, 3.weight, 3.bias, 5.weight, 5.bias.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 28, num_classes: int = 10):
        side = image_size - 2  # 3x3 conv, no padding
        super().__init__(
            nn.Conv2d(in_channels, 16, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * side * side, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )


class SeedPickled(nn.Module):
    """Example 3: Linear(4, 8) -> ReLU -> Linear(8, 3). Keys: fc1.*, fc2.*."""

    def __init__(self, in_features: int = 4, hidden: int = 8, out_features: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))
