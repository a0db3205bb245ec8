"""Embeddings: how a model turns token ids and positions into vectors.

Attention on its own is blind to order: permuting the input permutes the output. Every model
therefore adds position information, in one of three ways shown here:

* **learned** positions (GPT-2): a second embedding table indexed by position;
* **sinusoidal** positions (the original Transformer): fixed sines and cosines of geometric frequencies;
* **rotary** embeddings, RoPE (Llama): rotate each query/key pair of features by an angle that grows
  with the position, so that the dot product q·k depends only on the *distance* between positions.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _compiling() -> bool:
    """True while torch.compile traces the model (a data-dependent check would break the graph)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


class TokenEmbedding(nn.Embedding):
    """A lookup table from token id to a `d_model`-dimensional vector (a trainable matrix)."""

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__(vocab_size, d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # A bad id on the GPU is a cryptic device-side assert; on the CPU we can afford a clear check.
        # (On CUDA the check would force a synchronisation every step, so it is skipped there.)
        if idx.device.type == "cpu" and idx.numel() and not _compiling() and (
            int(idx.min()) < 0 or int(idx.max()) >= self.num_embeddings
        ):
            raise ValueError(
                f"token id out of range: ids must lie in [0, {self.num_embeddings}), got "
                f"min {int(idx.min())}, max {int(idx.max())}; was the text encoded with the model's tokenizer?"
            )
        return super().forward(idx)


def sinusoidal_table(max_len: int, d_model: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed (max_len, d_model) table of "Attention Is All You Need".

    Even features hold sin(pos / base^(2i/d)), odd features cos(...). Low feature indices rotate
    quickly, high ones slowly, so each position gets a unique, smoothly varying code.
    """
    if d_model % 2:
        raise ValueError(f"sinusoidal encodings need an even d_model, got {d_model}")
    pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
    inv_freq = torch.exp(-math.log(base) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoidal position vectors; nothing to train. `forward(positions)` looks them up."""

    def __init__(self, max_len: int, d_model: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_len, d_model, base), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]


class LearnedPositionalEmbedding(nn.Embedding):
    """One trainable vector per position (GPT-2's `wpe`). Cannot extrapolate past `max_len`."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__(max_len, d_model)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return super().forward(positions)


def rope_frequencies(head_dim: int, max_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_len, head_dim // 2) for rotary embeddings.

    Feature pair i rotates at frequency theta^(-2i/head_dim): pair 0 once per position, the last pair
    very slowly. A larger theta stretches the slow end (used for long contexts).
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive feature pairs (x[2i], x[2i+1]) of `x` by the given angles.

    x: (..., T, head_dim); cos/sin broadcastable to (..., T, head_dim // 2). The pairing is the
    interleaved one that llama2.c's run.c uses, so exported weights need no permutation.
    """
    x_pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) with a configurable base `theta`.

    Applied to queries and keys inside attention (not added to the token embedding). Because a
    rotation by angle a followed by the dot product with a vector rotated by b depends only on a - b,
    attention scores become a function of relative position.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.max_len, self.theta = head_dim, max_len, theta
        cos, sin = rope_frequencies(head_dim, max_len, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, head_dim); positions: (T,) shared by the batch, or (B, T) per row."""
        cos, sin = self.cos[positions], self.sin[positions]  # (T, hd/2) or (B, T, hd/2)
        if positions.dim() == 2:  # per-row positions: add the head axis
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return apply_rotary(x, cos, sin)
