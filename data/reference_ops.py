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


# --- sequence and transformer layers (Keras / TF1-BERT semantics) ------------------------------


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def lstm_keras(x: np.ndarray, kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Keras LSTM (return_sequences=True): x (N, T, in); kernel (in, 4u), gates i, f, c, o."""
    x = np.asarray(x, np.float64)
    n, steps, _ = x.shape
    u = recurrent_kernel.shape[0]
    h = np.zeros((n, u))
    c = np.zeros((n, u))
    out = []
    for t in range(steps):
        z = x[:, t] @ kernel + h @ recurrent_kernel + bias
        i, f, g, o = (z[:, k * u:(k + 1) * u] for k in range(4))
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        out.append(h)
    return np.stack(out, axis=1)


def gru_keras(x: np.ndarray, kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Keras GRU(reset_after=True, return_sequences=True): gates z, r, h; bias (2, 3u) = input, recurrent."""
    x = np.asarray(x, np.float64)
    n, steps, _ = x.shape
    u = recurrent_kernel.shape[0]
    h = np.zeros((n, u))
    out = []
    for t in range(steps):
        xi = x[:, t] @ kernel + bias[0]
        hh = h @ recurrent_kernel + bias[1]
        z = sigmoid(xi[:, :u] + hh[:, :u])
        r = sigmoid(xi[:, u:2 * u] + hh[:, u:2 * u])
        cand = np.tanh(xi[:, 2 * u:] + r * hh[:, 2 * u:])
        h = z * h + (1 - z) * cand
        out.append(h)
    return np.stack(out, axis=1)


def layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """LayerNormalization over the last axis (BERT's eps is 1e-12)."""
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as BERT and torch's default."""
    from math import erf, sqrt

    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def attention(x: np.ndarray, wq, bq, wk, bk, wv, bv, wo, bo, heads: int) -> np.ndarray:
    """Multi-head self-attention with (in, out) kernels: x (N, T, D) → (N, T, D)."""
    x = np.asarray(x, np.float64)
    n, t, d = x.shape
    hd = d // heads

    def split(a):
        return a.reshape(n, t, heads, hd).transpose(0, 2, 1, 3)  # (N, H, T, hd)

    q, k, v = split(x @ wq + bq), split(x @ wk + bk), split(x @ wv + bv)
    a = softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd))
    ctx = (a @ v).transpose(0, 2, 1, 3).reshape(n, t, d)
    return ctx @ wo + bo


def depthwise_conv2d_nhwc(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Keras DepthwiseConv2D, padding='valid': kernel (kh, kw, C, mult) → (N, oh, ow, C*mult)."""
    x = np.asarray(x, np.float64)
    kh, kw, c, m = kernel.shape
    n, h, w, _ = x.shape
    oh, ow = h - kh + 1, w - kw + 1
    out = np.zeros((n, oh, ow, c, m))
    for i in range(kh):
        for j in range(kw):
            out += x[:, i:i + oh, j:j + ow, :, None] * kernel[i, j]
    out = out.reshape(n, oh, ow, c * m)
    return out if bias is None else out + bias


def separable_conv2d_nhwc(x: np.ndarray, depthwise_kernel: np.ndarray, pointwise_kernel: np.ndarray,
                          bias: np.ndarray | None = None) -> np.ndarray:
    """Keras SeparableConv2D, padding='valid': depthwise (kh, kw, C, mult), then pointwise (1, 1, C*mult, O) + bias."""
    return conv2d_nhwc(depthwise_conv2d_nhwc(x, depthwise_kernel), pointwise_kernel, bias)


def bidirectional_keras(x: np.ndarray, forward, backward) -> np.ndarray:
    """Keras Bidirectional(layer, merge_mode='concat', return_sequences=True).

    ``forward``/``backward`` map (N, T, F) → (N, T, u). The backward layer reads the sequence
    reversed and its outputs are reversed back, so step t of both halves belongs to input step t.
    """
    x = np.asarray(x, np.float64)
    return np.concatenate([forward(x), backward(x[:, ::-1])[:, ::-1]], axis=-1)
