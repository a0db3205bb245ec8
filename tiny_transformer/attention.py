"""Attention: the one operation that lets tokens look at each other.

For each position, a *query* vector is compared with the *keys* of the positions it may see
(dot products, scaled by 1/sqrt(d) so their variance does not grow with the dimension); a softmax
turns the scores into weights, and the output is the weighted sum of the *values*.

This module holds:

* masks — causal (no peeking at the future), padding (ignore left-padding in a batch) and sliding
  window (only the last `window` positions);
* `scaled_dot_product_attention` — the teaching version that can return its weights, and otherwise
  PyTorch's fused kernel, which computes the same thing faster and with less memory;
* `KVCache` — keys and values of past tokens, so generation computes only the new token each step;
* `MultiHeadAttention` — fused QKV projection, grouped-query attention (several query heads share one
  key/value head), optional RoPE and QK-normalisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tiny_transformer.embeddings import RotaryEmbedding
from tiny_transformer.norms import RMSNorm

# ----------------------------------------------------------------------------------------------
# Masks. Convention everywhere: True means "this query may attend to this key" (as in PyTorch's
# scaled_dot_product_attention). Queries are the *last* q_len positions of the k_len keys, which is
# what happens during incremental decoding.


def causal_mask(q_len: int, k_len: int | None = None, device=None) -> torch.Tensor:
    """(q_len, k_len) boolean mask: query i (at absolute position k_len - q_len + i) sees keys <= it."""
    k_len = q_len if k_len is None else k_len
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    return k_pos[None, :] <= q_pos[:, None]


def sliding_window_mask(q_len: int, k_len: int | None, window: int, device=None) -> torch.Tensor:
    """Causal mask restricted to the last `window` keys (the query itself included)."""
    if window <= 0:
        raise ValueError(f"sliding window must be positive, got {window}")
    k_len = q_len if k_len is None else k_len
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    return (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) of 1 = real token / 0 = padding  ->  (B, 1, 1, S) boolean, broadcastable over heads and queries."""
    return attention_mask.bool()[:, None, None, :]


def build_attention_mask(
    q_len: int,
    k_len: int,
    *,
    attention_mask: torch.Tensor | None = None,
    window: int | None = None,
    device=None,
) -> tuple[torch.Tensor | None, bool]:
    """Combine causal, sliding-window and padding masks for a forward over `q_len` new tokens.

    Returns `(mask, is_causal)`. In the common cases no mask tensor is needed at all — plain causal
    attention (`is_causal=True`), or one new token that may see everything — which lets PyTorch pick
    its fastest kernel.
    """
    window_matters = window is not None and k_len > window
    if attention_mask is None and not window_matters:
        if q_len == k_len:
            return None, True
        if q_len == 1:
            return None, False
    if window_matters:
        mask = sliding_window_mask(q_len, k_len, window, device=device)
    else:
        mask = causal_mask(q_len, k_len, device=device)
    mask = mask[None, None]  # (1, 1, q_len, k_len)
    if attention_mask is not None:
        if attention_mask.shape[-1] < k_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but the sequence has {k_len}; "
                "pass the mask for the whole sequence so far (past tokens included)"
            )
        mask = mask & padding_mask(attention_mask[:, :k_len].to(device))
        # A padding query sees no real key; a fully masked softmax row is NaN. Letting every query see
        # itself keeps the (ignored) padding rows finite without affecting real tokens.
        mask = mask | _self_mask(q_len, k_len, device)
    return mask, False


def _self_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """(q_len, k_len) mask that is True only where a query meets its own key."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    return torch.arange(k_len, device=device)[None, :] == q_pos[:, None]


# ----------------------------------------------------------------------------------------------


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    return_weights: bool = False,
):
    """softmax(q kᵀ / sqrt(d) + mask) v.

    q: (..., T, d); k, v: (..., S, d); mask: boolean, broadcastable to (..., T, S), True = attend.
    With `return_weights=True` the computation is spelled out step by step and the (..., T, S)
    attention weights are returned too (for teaching and heatmaps). Otherwise PyTorch's fused
    `scaled_dot_product_attention` does the same work without materialising the weights.
    """
    if not return_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        mask = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).type_as(q)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return dropped @ v, weights


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to `max_len`.

    Each layer writes the new tokens' keys/values at positions [length, length + T) and reads
    [0, length + T). After all layers ran, the model calls `advance(T)`. `crop(n)` forgets everything
    after the first n tokens (speculative decoding rejects draft tokens this way) and `reorder(index)`
    picks batch rows (beam search).
    """

    def __init__(self, n_layers, batch_size, n_kv_heads, head_dim, max_len, device=None, dtype=torch.float32):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KV cache is full: {end} tokens do not fit in max_len={self.max_len}; "
                "crop the context or create a larger cache"
            )
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def crop(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {n}")
        self.length = n

    def reorder(self, index: torch.Tensor) -> None:
        self.k = self.k[:, index]
        self.v = self.v[:, index]


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection and grouped-query attention.

    One linear layer computes queries for `n_heads` heads and keys/values for `n_kv_heads` heads at
    once (rows [q | k | v] of `qkv.weight`). With n_kv_heads < n_heads, each key/value head serves
    n_heads // n_kv_heads query heads: the KV cache shrinks by that factor while quality barely moves.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        bias: bool = False,
        dropout: float = 0.0,
        rope: RotaryEmbedding | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.rope = rope
        # QK-norm: normalising each head's query and key bounds the attention logits, which lets
        # training use larger learning rates without the softmax saturating.
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        is_causal: bool = True,
        cache: KVCache | None = None,
        layer: int = 0,
        need_weights: bool = False,
    ):
        """x: (B, T, d_model) -> (B, T, d_model); with `need_weights`, also (B, n_heads, T, S) weights."""
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q = q.view(B, T, self.n_heads, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_heads, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            if positions is None:
                positions = torch.arange(T, device=x.device)
            q, k = self.rope(q, positions), self.rope(k, positions)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            y, weights = scaled_dot_product_attention(
                q, k, v, mask, is_causal=is_causal, dropout_p=dropout_p, return_weights=True
            )
        else:
            y = scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, dropout_p=dropout_p)
        y = self.proj(y.transpose(1, 2).reshape(B, T, self.n_heads * hd))
        return (y, weights) if need_weights else y
