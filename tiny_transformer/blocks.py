"""Transformer blocks: normalisation, the feed-forward network, and the residual block around them.

A block is "communicate, then compute": attention mixes information across positions, then a
feed-forward network (the same small MLP applied to every position) transforms each token on its
own. Both sit on a *residual* path — x + f(norm(x)) — so gradients reach early layers unimpeded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tiny_transformer.attention import KVCache, MultiHeadAttention
from tiny_transformer.embeddings import RotaryEmbedding
from tiny_transformer.norms import LayerNorm, RMSNorm, make_norm

__all__ = ["LayerNorm", "RMSNorm", "make_norm", "FeedForward", "TransformerBlock", "swiglu_hidden_dim", "ACTIVATIONS"]

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "relu2", "silu", "swiglu")


def swiglu_hidden_dim(dim: int, multiple_of: int = 32, ffn_dim_multiplier: float | None = None) -> int:
    """Llama's hidden size: 2/3 of 4·dim (SwiGLU has three matrices, not two, so this keeps the
    parameter count of a 4·dim GELU MLP), optionally scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class FeedForward(nn.Module):
    """Position-wise MLP: d_model -> hidden -> d_model.

    activation: "gelu" (exact), "gelu_tanh" (GPT-2's approximation), "relu", "relu2" (relu(x)², from
    Primer / modded-nanogpt), "silu", or "swiglu" (gated: w2(silu(w1 x) · w3 x), as in Llama).
    Weight names follow llama2.c: w1 (up / gate), w2 (down), w3 (the SwiGLU value branch).
    """

    def __init__(self, d_model: int, hidden: int, activation: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.w1 = nn.Linear(d_model, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, d_model, bias=bias)
        self.w3 = nn.Linear(d_model, hidden, bias=bias) if activation == "swiglu" else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        if self.activation == "swiglu":
            h = F.silu(h) * self.w3(x)
        elif self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:  # silu
            h = F.silu(h)
        return self.w2(self.dropout(h))


class TransformerBlock(nn.Module):
    """One transformer layer.

    Pre-norm (the default, GPT-2 onwards): x = x + attn(norm(x)); x = x + ffn(norm(x)).
    Post-norm (the 2017 original): x = norm(x + attn(x)); x = norm(x + ffn(x)) — kept for comparison;
    it needs warm-up and small learning rates to train deep stacks.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        n_kv_heads: int | None = None,
        dropout: float = 0.0,
        activation: str = "gelu",
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        bias: bool = True,
        rope: RotaryEmbedding | None = None,
        qk_norm: bool = False,
        prenorm: bool = True,
    ):
        super().__init__()
        self.prenorm = prenorm
        self.attention_norm = make_norm(norm, d_model, norm_eps, bias)
        self.attention = MultiHeadAttention(
            d_model, n_heads, n_kv_heads, bias=bias, dropout=dropout, rope=rope, qk_norm=qk_norm, norm_eps=norm_eps
        )
        self.ffn_norm = make_norm(norm, d_model, norm_eps, bias)
        self.feed_forward = FeedForward(d_model, d_ff, activation, bias=bias)
        self.dropout = nn.Dropout(dropout)  # on each residual branch's output

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        is_causal: bool = True,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        def attend(h):
            return self.attention(h, positions, mask, is_causal=is_causal, cache=cache, layer=layer)

        if self.prenorm:
            x = x + self.dropout(attend(self.attention_norm(x)))
            return x + self.dropout(self.feed_forward(self.ffn_norm(x)))
        x = self.attention_norm(x + self.dropout(attend(x)))
        return self.ffn_norm(x + self.dropout(self.feed_forward(x)))
