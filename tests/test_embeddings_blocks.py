"""Embeddings (sinusoidal, learned, RoPE) and blocks (norms, feed-forward, transformer block)."""

import math

import pytest
import torch
import torch.nn.functional as F

from tiny_transformer.blocks import (
    FeedForward,
    LayerNorm,
    RMSNorm,
    TransformerBlock,
    swiglu_hidden_dim,
)
from tiny_transformer.embeddings import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    apply_rotary,
    rope_frequencies,
    sinusoidal_table,
)


def test_sinusoidal_table_values():
    t = sinusoidal_table(10, 8)
    assert t.shape == (10, 8)
    assert torch.allclose(t[0, 0::2], torch.zeros(4)) and torch.allclose(t[0, 1::2], torch.ones(4))
    assert abs(t[3, 2].item() - math.sin(3 / 10000 ** (2 / 8))) < 1e-6
    assert abs(t[5, 7].item() - math.cos(5 / 10000 ** (6 / 8))) < 1e-6
    pe = SinusoidalPositionalEncoding(10, 8)
    assert torch.equal(pe(torch.tensor([3])), t[3:4])
    assert sum(p.numel() for p in pe.parameters()) == 0


def test_learned_positions_are_trainable():
    pe = LearnedPositionalEmbedding(16, 4)
    assert pe(torch.arange(5)).shape == (5, 4)
    assert pe.weight.requires_grad


def _rotate_complex(x, positions, theta=10000.0):
    """RoPE as complex multiplication in float64: pair (a, b) -> (a + ib) * e^{i pos w}."""
    hd = x.shape[-1]
    w = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], hd // 2, 2).contiguous())
    z = z * torch.exp(1j * positions.double()[:, None] * w)
    return torch.view_as_real(z).flatten(-2)


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_matches_complex_rotation(theta):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 16)
    rope = RotaryEmbedding(16, 32, theta=theta)
    pos = torch.arange(7)
    torch.testing.assert_close(rope(x, pos).double(), _rotate_complex(x, pos, theta), atol=1e-5, rtol=1e-5)


def test_rope_relative_position_property():
    """q·k after rotating to positions (m, n) equals the same at (m + s, n + s)."""
    torch.manual_seed(1)
    rope = RotaryEmbedding(32, 128)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    def score(m, n):
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum().item()
    base = score(5, 2)
    for shift in (1, 17, 60):
        assert abs(score(5 + shift, 2 + shift) - base) < 1e-4
    assert abs(score(9, 2) - base) > 1e-3  # a different distance gives a different score


def test_rope_preserves_norm_and_per_row_positions():
    torch.manual_seed(2)
    rope = RotaryEmbedding(8, 16)
    x = torch.randn(2, 2, 4, 8)
    y = rope(x, torch.arange(4))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    per_row = rope(x, torch.stack([torch.arange(4), torch.arange(4) + 3]))
    torch.testing.assert_close(per_row[0], y[0])
    torch.testing.assert_close(per_row[1], rope(x[1:], torch.arange(3, 7))[0])


def test_rope_needs_even_dim():
    with pytest.raises(ValueError, match="even"):
        rope_frequencies(7, 4)
    cos, sin = rope_frequencies(4, 3)
    assert torch.allclose(apply_rotary(torch.ones(3, 4), cos, sin).norm(dim=-1), torch.full((3,), 2.0))


def test_layernorm_and_rmsnorm_against_formulas():
    torch.manual_seed(3)
    x = torch.randn(4, 10) * 3 + 1
    ln = LayerNorm(10)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (10,), eps=1e-5))
    rms = RMSNorm(10, eps=1e-6)
    x64 = x.double()
    ref = x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rms(x).double(), ref, atol=1e-6, rtol=1e-6)
    assert LayerNorm(10, bias=False).bias is None


@pytest.mark.parametrize(
    "activation,fn",
    [("gelu", F.gelu), ("gelu_tanh", lambda h: F.gelu(h, approximate="tanh")), ("relu", F.relu),
     ("relu2", lambda h: F.relu(h) ** 2), ("silu", F.silu)],
)
def test_feed_forward_activations(activation, fn):
    torch.manual_seed(4)
    ff = FeedForward(8, 16, activation)
    x = torch.randn(3, 8)
    torch.testing.assert_close(ff(x), ff.w2(fn(ff.w1(x))))
    assert ff.w3 is None


def test_swiglu_feed_forward():
    torch.manual_seed(5)
    ff = FeedForward(8, 24, "swiglu", bias=False)
    x = torch.randn(3, 8)
    torch.testing.assert_close(ff(x), ff.w2(F.silu(ff.w1(x)) * ff.w3(x)))
    assert swiglu_hidden_dim(8, multiple_of=8) == 24
    with pytest.raises(ValueError, match="unknown activation"):
        FeedForward(8, 8, "tanh")


def test_transformer_block_pre_and_post_norm():
    torch.manual_seed(6)
    block = TransformerBlock(16, 2, 32).eval()
    x = torch.randn(1, 5, 16)
    attn = block.attention(block.attention_norm(x))
    h = x + attn
    torch.testing.assert_close(block(x), h + block.feed_forward(block.ffn_norm(h)))
    post = TransformerBlock(16, 2, 32, prenorm=False).eval()
    post.load_state_dict(block.state_dict())
    h = post.attention_norm(x + post.attention(x))
    torch.testing.assert_close(post(x), post.ffn_norm(h + post.feed_forward(h)))


def test_block_dropout_only_in_training():
    torch.manual_seed(7)
    block = TransformerBlock(16, 2, 32, dropout=0.5)
    x = torch.randn(1, 5, 16)
    block.eval()
    torch.testing.assert_close(block(x), block(x))
    block.train()
    assert not torch.allclose(block(x), block(x))
