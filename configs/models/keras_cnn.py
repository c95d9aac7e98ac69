"""PyTorch equivalent of a small Keras CNN (used by configs/examples/keras-cnn.yaml).

Keras reference (channels-last):
    Conv2D(8, 3) -> BatchNormalization -> ReLU -> MaxPooling2D(2)
    -> Conv2D(16, 3) -> BatchNormalization -> ReLU -> Flatten -> Dense(32, relu) -> Dense(num_classes)

Two Keras conventions matter when porting its weights:
- BatchNormalization's default epsilon is 1e-3 (PyTorch's is 1e-5), so BatchNorm2d uses eps=1e-3.
- Keras' Flatten runs over (H, W, C); this model flattens (C, H, W). The first Dense kernel's
  input features must therefore be reordered (transform ``flatten_nhwc_to_nchw``).
"""
import torch
from torch import nn


class KerasCNN(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3)
        self.bn1 = nn.BatchNorm2d(8, eps=1e-3)  # Keras default epsilon
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.bn2 = nn.BatchNorm2d(16, eps=1e-3)
        side = ((image_size - 2) // 2) - 2  # 28 -> 26 -> 13 -> 11
        self.fc1 = nn.Linear(16 * side * side, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The input is channels-last (N, H, W, C), exactly as the Keras model takes it, so one
        # verify input file feeds both the Keras-side reference and this model.
        x = x.permute(0, 3, 1, 2)
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(x, 1)  # (C, H, W) order; Keras flattened (H, W, C)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)
