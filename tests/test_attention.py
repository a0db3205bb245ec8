"""Attention: masks, the teaching path vs the fused path vs a float64 reference, MHA, GQA, KV cache."""

import math

import pytest
import torch

from tiny_transformer.attention import (
    KVCache,
    MultiHeadAttention,
    build_attention_mask,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    sliding_window_mask,
)
from tiny_transformer.embeddings import RotaryEmbedding


def reference_attention(q, k, v, mask=None):
    """Float64 attention written from the formula, independent of the library."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("...td,...sd->...ts", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = torch.where(mask, scores, torch.tensor(float("-inf"), dtype=torch.float64))
    return torch.einsum("...ts,...sd->...td", torch.softmax(scores, -1), v)


def test_causal_mask_values():
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # two new queries at the end of five keys (incremental decoding)
    assert causal_mask(2, 5).tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_sliding_window_mask_values():
    m = sliding_window_mask(5, 5, window=2)
    expected = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    assert m.int().tolist() == expected
    with pytest.raises(ValueError, match="positive"):
        sliding_window_mask(3, 3, window=0)


def test_padding_mask_shape_and_values():
    pm = padding_mask(torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert pm.shape == (2, 1, 1, 3)
    assert pm[0, 0, 0].tolist() == [False, True, True]


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_teaching_and_fused_match_float64(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16) for _ in range(3))
    mask = causal_mask(7) if causal else None
    ref = reference_attention(q, k, v, mask)
    teach, weights = scaled_dot_product_attention(q, k, v, mask, return_weights=True)
    fused = scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(teach.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 7))
    if causal:
        assert weights[..., 0, 1:].abs().max() == 0  # the first token sees only itself
        fused_flag = scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(fused_flag, fused)


def test_build_attention_mask_fast_paths_and_padding():
    assert build_attention_mask(5, 5) == (None, True)
    assert build_attention_mask(1, 9) == (None, False)
    mask, is_causal = build_attention_mask(4, 4, window=2)
    assert not is_causal and mask.shape == (1, 1, 4, 4)
    am = torch.tensor([[0, 0, 1, 1]])
    mask, _ = build_attention_mask(4, 4, attention_mask=am)
    # real query 3 sees real keys 2, 3 only; pad query 0 sees itself only (keeps softmax finite)
    assert mask[0, 0, 3].tolist() == [False, False, True, True]
    assert mask[0, 0, 0].tolist() == [True, False, False, False]


def _mha_reference(mha, x, mask):
    """Multi-head attention from its definition in float64, reading the module's weights."""
    B, T, C = x.shape
    H, Hkv, hd = mha.n_heads, mha.n_kv_heads, mha.head_dim
    W, b = mha.qkv.weight.double(), mha.qkv.bias
    qkv = x.double() @ W.T + (b.double() if b is not None else 0)
    q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], -1)
    q = q.view(B, T, H, hd).transpose(1, 2)
    k = k.view(B, T, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    v = v.view(B, T, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    y = reference_attention(q, k, v, mask).transpose(1, 2).reshape(B, T, H * hd)
    pb = mha.proj.bias
    return y @ mha.proj.weight.double().T + (pb.double() if pb is not None else 0)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_mha_against_float64_reference(n_kv_heads):
    torch.manual_seed(1)
    mha = MultiHeadAttention(32, 4, n_kv_heads, bias=True).eval()
    x = torch.randn(2, 6, 32)
    out = mha(x)
    ref = _mha_reference(mha, x, causal_mask(6))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_mha_need_weights_matches_fused():
    torch.manual_seed(2)
    mha = MultiHeadAttention(32, 4).eval()
    x = torch.randn(1, 5, 32)
    y_fused = mha(x)
    y_teach, w = mha(x, need_weights=True)
    torch.testing.assert_close(y_teach, y_fused, atol=1e-6, rtol=1e-5)
    assert w.shape == (1, 4, 5, 5)


def test_gqa_with_all_kv_heads_equals_mha():
    torch.manual_seed(3)
    mha = MultiHeadAttention(32, 4, None).eval()
    gqa = MultiHeadAttention(32, 4, 4).eval()
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(gqa(x), mha(x))


def test_gqa_shrinks_qkv_projection():
    assert MultiHeadAttention(64, 8, 2).qkv.weight.shape == ((8 + 2 * 2) * 8, 64)


@pytest.mark.parametrize("n_kv_heads,use_rope,qk_norm", [(4, False, False), (2, True, False), (1, True, True)])
def test_kv_cache_incremental_equals_full(n_kv_heads, use_rope, qk_norm):
    torch.manual_seed(4)
    rope = RotaryEmbedding(8, 32) if use_rope else None
    mha = MultiHeadAttention(32, 4, n_kv_heads, rope=rope, qk_norm=qk_norm).eval()
    x = torch.randn(2, 12, 32)
    full = mha(x, torch.arange(12))
    cache = KVCache(1, 2, n_kv_heads, 8, 32)
    pieces = []
    for start, end in [(0, 5), (5, 6), (6, 9), (9, 12)]:  # a prefill, single steps and a chunk
        mask, is_causal = build_attention_mask(end - start, end)
        pieces.append(mha(x[:, start:end], torch.arange(start, end), mask, is_causal=is_causal, cache=cache))
        cache.advance(end - start)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_crop_reorder_and_overflow():
    cache = KVCache(1, 2, 1, 4, max_len=3)
    k = torch.arange(2 * 2 * 4, dtype=torch.float32).view(2, 1, 2, 4)
    cache.update(0, k, k)
    cache.advance(2)
    cache.crop(1)
    assert cache.length == 1
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.k[0, 0], cache.k[0, 1])
    with pytest.raises(ValueError, match="KV cache is full"):
        cache.update(0, torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4))
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(5)


def test_sliding_window_limits_what_attention_sees():
    """With window w, the output at position t does not change when tokens before t-w+1 change."""
    torch.manual_seed(5)
    mha = MultiHeadAttention(16, 2).eval()
    x = torch.randn(1, 10, 16)
    mask, _ = build_attention_mask(10, 10, window=3)
    y1 = mha(x, mask=mask, is_causal=False)
    x2 = x.clone()
    x2[:, :6] = torch.randn(1, 6, 16)
    y2 = mha(x2, mask=mask, is_causal=False)
    torch.testing.assert_close(y1[:, 8:], y2[:, 8:])  # positions 8, 9 see only 6.. and 7..
    assert not torch.allclose(y1[:, 7], y2[:, 7])


def test_qk_norm_bounds_attention_logits():
    """With QK-norm every q and k has RMS 1 (weights at init), so |q·k|/sqrt(d) <= sqrt(d)."""
    torch.manual_seed(6)
    mha = MultiHeadAttention(32, 4, qk_norm=True).eval()
    with torch.no_grad():
        mha.qkv.weight.mul_(1000.0)  # huge activations: without the norm, softmax would saturate
    x = torch.randn(1, 8, 32)
    q, k, _ = mha.qkv(x).split([32, 32, 32], -1)
    q = mha.q_norm(q.view(1, 8, 4, 8).transpose(1, 2))
    k = mha.k_norm(k.view(1, 8, 4, 8).transpose(1, 2))
    logits = q @ k.transpose(-2, -1) / math.sqrt(8)
    assert logits.abs().max() <= math.sqrt(8) + 1e-4
    assert torch.isfinite(mha(x)).all()


def test_bad_head_configuration_messages():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="divisible by n_kv_heads"):
        MultiHeadAttention(32, 4, 3)
