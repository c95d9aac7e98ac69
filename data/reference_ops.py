"""Pure-NumPy reference ops with Keras/TensorFlow semantics (channels-last).

Used to compute reference outputs on the *source* side, independently of PyTorch and of
np2torch, so a conversion is checked against what the original framework would compute.
Everything runs in float64.
"""
from __future__ import annotations

import numpy as np


def conv2d_nhwc(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None,
                stride: int = 1) -> np.ndarray:
    """Keras Conv2D, padding='valid': x (N,H,W,Cin), kernel HWIO (kh,kw,Cin,Cout).

    Cross-correlation (no kernel flip), like Keras and PyTorch.
    """
    x = np.asarray(x, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    kh, kw, cin, cout = kernel.shape
    n, h, w, c = x.shape
    if c != cin:
        raise ValueError(f"input has {c} channels, kernel expects {cin}")
    oh = (h - kh) // stride + 1
    ow = (w - kw) // stride + 1
    out = np.zeros((n, oh, ow, cout), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
            out += patch @ kernel[i, j]  # (N,oh,ow,Cin) @ (Cin,Cout)
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64)
    return out


def batchnorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, moving_mean: np.ndarray,
              moving_variance: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Keras BatchNormalization at inference over the last axis; eps defaults to Keras' 1e-3."""
    x = np.asarray(x, dtype=np.float64)
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(moving_variance, np.float64) + eps)
    return (x - np.asarray(moving_mean, np.float64)) * scale + np.asarray(beta, np.float64)


def maxpool2d_nhwc(x: np.ndarray, pool: int = 2) -> np.ndarray:
    """Keras MaxPooling2D(pool), stride = pool, padding='valid' (trailing rows/cols dropped)."""
    x = np.asarray(x, dtype=np.float64)
    n, h, w, c = x.shape
    oh, ow = h // pool, w // pool
    x = x[:, :oh * pool, :ow * pool, :].reshape(n, oh, pool, ow, pool, c)
    return x.max(axis=(2, 4))


def flatten_nhwc(x: np.ndarray) -> np.ndarray:
    """Keras Flatten on channels-last data: features in (H, W, C) order."""
    return np.asarray(x).reshape(x.shape[0], -1)


def dense(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Keras Dense: x @ kernel + bias, kernel (in, out)."""
    out = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
    if bias is not None:
        out = out + np.asarray(bias, np.float64)
    return out


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)
