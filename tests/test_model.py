"""Models: causality, KV cache, padding, tying, presets, initialisation, Llama switches, GPT-2 shape."""

import math

import pytest
import torch

from tiny_transformer.config import build_model, list_presets, load_preset, preset_parameter_counts
from tiny_transformer.model import LlamaConfig, LlamaLM, TinyTransformerLM, TransformerConfig

SMALL_GPT = dict(vocab_size=50, d_model=32, n_heads=4, n_layers=2, max_seq_len=64)
SMALL_LLAMA = dict(vocab_size=70, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)

VARIANTS = {
    "gpt-learned": lambda: TinyTransformerLM(TransformerConfig(**SMALL_GPT)),
    "gpt-sinusoidal-relu2": lambda: TinyTransformerLM(
        TransformerConfig(**SMALL_GPT, pos_encoding="sinusoidal", activation="relu2")),
    "gpt-rope-gqa-rms-swiglu": lambda: TinyTransformerLM(
        TransformerConfig(**SMALL_GPT, pos_encoding="rope", n_kv_heads=2, norm="rmsnorm", activation="swiglu",
                          bias=False, qk_norm=True)),
    "llama": lambda: LlamaLM(LlamaConfig(**SMALL_LLAMA)),
    "llama-modded": lambda: _unzeroed(LlamaLM(LlamaConfig(
        **SMALL_LLAMA, qk_norm=True, zero_init_proj=True, tie_embeddings=False, pad_vocab_multiple=128,
        logit_softcap=5.0, sliding_window=6))),
}


def _unzeroed(model):
    """Zero-initialised projections make every block the identity; perturb them so tests see attention."""
    torch.manual_seed(123)
    for p in model.parameters():
        if p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.fixture(params=sorted(VARIANTS))
def model(request):
    torch.manual_seed(0)
    return VARIANTS[request.param]().eval()


def test_causality(model):
    torch.manual_seed(1)
    x = torch.randint(0, model.vocab_size, (1, 16))
    logits, _ = model(x)
    x2 = x.clone()
    x2[0, 10] = (x2[0, 10] + 1) % model.vocab_size
    logits2, _ = model(x2)
    torch.testing.assert_close(logits[:, :10], logits2[:, :10])
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])


def test_kv_cache_incremental_decoding_equals_full_forward(model):
    torch.manual_seed(2)
    x = torch.randint(0, model.vocab_size, (2, 20))
    full, _ = model(x)
    cache = model.new_cache(batch_size=2)
    steps = [model(x[:, :7], cache=cache)[0]]
    steps += [model(x[:, t : t + 1], cache=cache)[0] for t in range(7, 20)]
    assert cache.length == 20
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_left_padding_gives_the_unpadded_result(model):
    torch.manual_seed(3)
    long = torch.randint(0, model.vocab_size, (1, 9))
    short = torch.randint(0, model.vocab_size, (1, 5))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    logits, _ = model(batch, attention_mask=mask)
    torch.testing.assert_close(logits[0], model(long)[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, 4:], model(short)[0][0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logits).all()


def test_last_only_and_loss_shapes(model):
    x = torch.randint(0, model.vocab_size, (3, 8))
    logits, loss = model(x)
    assert logits.shape == (3, 8, model.vocab_size) and loss is None
    last, _ = model(x, last_only=True)
    torch.testing.assert_close(last[:, 0], logits[:, -1])
    _, loss = model(x, x)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_context_overflow_is_a_clear_error():
    m = TinyTransformerLM(TransformerConfig(**SMALL_GPT))
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        m(torch.zeros(1, 65, dtype=torch.long))


def test_out_of_range_token_is_a_clear_error():
    m = TinyTransformerLM(TransformerConfig(**SMALL_GPT))
    with pytest.raises(ValueError, match=r"token id out of range.*\[0, 50\)"):
        m(torch.tensor([[1, 2, 50]]))


@pytest.mark.parametrize("name", ["gpt-learned", "llama"])
def test_loss_at_initialisation_is_about_ln_vocab(name):
    torch.manual_seed(4)
    m = VARIANTS[name]().eval()
    x = torch.randint(0, m.vocab_size, (8, 32))
    y = torch.randint(0, m.vocab_size, (8, 32))
    _, loss = m(x, y)
    assert abs(loss.item() - math.log(m.vocab_size)) < 0.1, (loss.item(), math.log(m.vocab_size))


def test_tied_weights_are_one_parameter():
    m = TinyTransformerLM(TransformerConfig(**SMALL_GPT))
    assert m.output.weight is m.tok_embeddings.weight
    with torch.no_grad():
        m.tok_embeddings.weight[3, 0] = 42.0
    assert m.output.weight[3, 0].item() == 42.0
    untied = TinyTransformerLM(TransformerConfig(**SMALL_GPT, tie_weights=False))
    assert untied.num_parameters() - m.num_parameters() == 50 * 32


def test_init_is_deterministic_with_a_seed():
    torch.manual_seed(7)
    a = LlamaLM(LlamaConfig(**SMALL_LLAMA)).state_dict()
    torch.manual_seed(7)
    b = LlamaLM(LlamaConfig(**SMALL_LLAMA)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(8)
    c = LlamaLM(LlamaConfig(**SMALL_LLAMA)).state_dict()
    assert not torch.equal(a["tok_embeddings.weight"], c["tok_embeddings.weight"])


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    m = TinyTransformerLM(TransformerConfig(vocab_size=50, d_model=256, n_heads=4, n_layers=8))
    expected = 0.02 / math.sqrt(2 * 8)
    assert abs(m.layers[0].attention.proj.weight.std().item() - expected) < 0.1 * expected
    assert abs(m.layers[0].attention.qkv.weight.std().item() - 0.02) < 0.002


def test_zero_init_projections_make_blocks_identity():
    m = LlamaLM(LlamaConfig(**SMALL_LLAMA, zero_init_proj=True, tie_embeddings=False))
    assert m.layers[0].attention.proj.weight.abs().max() == 0
    assert m.layers[1].feed_forward.w2.weight.abs().max() == 0
    x = torch.randint(0, 70, (1, 5))
    logits, loss = m(x, x)
    assert logits.abs().max() == 0  # zero head
    assert abs(loss.item() - math.log(70)) < 1e-5


def test_padded_head_and_softcap():
    m = _unzeroed(LlamaLM(LlamaConfig(**SMALL_LLAMA, tie_embeddings=False, pad_vocab_multiple=128,
                                      logit_softcap=2.0)))
    assert m.output.weight.shape == (128, 32)
    with torch.no_grad():
        m.output.weight.mul_(100.0)
    x = torch.randint(0, 70, (2, 6))
    logits, _ = m(x)
    assert logits.shape[-1] == 70  # padded rows never reach the user
    assert logits.abs().max() <= 2.0  # |cap·tanh(z/cap)| <= cap (float tanh may round to exactly 1)
    assert logits.abs().max() > 1.9  # the cap is really active
    m.logit_softcap = None
    raw, _ = m(x)
    assert raw.abs().max() > 10
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))


def test_pad_multiple_requires_untied_head():
    with pytest.raises(ValueError, match="untied"):
        LlamaConfig(**SMALL_LLAMA, pad_vocab_multiple=128)


def test_swiglu_hidden_dim_follows_multiple_of():
    assert LlamaConfig(dim=128, multiple_of=32).hidden_dim == 352  # 2/3·512 = 341 -> 352
    assert LlamaConfig(dim=288, n_heads=6, multiple_of=32).hidden_dim == 768


def test_config_validation_messages():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        TransformerConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="unknown pos_encoding"):
        TransformerConfig(pos_encoding="alibi")
    with pytest.raises(ValueError, match="positive integer"):
        TransformerConfig(n_layers=0)
    with pytest.raises(ValueError, match="unknown TransformerConfig field"):
        TransformerConfig.from_dict({"d_modle": 3})


EXPECTED_PRESET_PARAMS = {
    "tiny": 421_504,
    "shakespeare": 10_770_816,  # 384 wide x 6 layers: about 10.8M (not "3.5M")
    "base": 19_079_680,
    "llama_shakespeare_870k": 869_504,
    "baby_llama_128": 5_968_640,
}


def test_preset_parameter_counts():
    counts = preset_parameter_counts()
    for name, expected in EXPECTED_PRESET_PARAMS.items():
        assert counts[name] == expected, (name, counts[name])
    assert set(EXPECTED_PRESET_PARAMS) <= set(list_presets())


def test_shakespeare_preset_values_and_hand_count():
    cfg = load_preset("shakespeare")["model"]
    assert (cfg["d_model"], cfg["n_heads"], cfg["n_layers"], cfg["d_ff"], cfg["max_seq_len"]) == (384, 6, 6, 1536, 256)
    d, L, V, T, F = 384, 6, 65, 256, 1536
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * F + F) + (F * d + d) + 4 * d
    assert EXPECTED_PRESET_PARAMS["shakespeare"] == V * d + T * d + L * per_layer + 2 * d


def test_parameter_table_sums_to_total():
    m = build_model("shakespeare")
    table = m.parameter_table()
    assert sum(v for k, v in table.items() if k != "total") == table["total"] == m.num_parameters()


def test_unknown_preset_message():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny"):
        build_model("huge")


def test_gpt2_config_is_exactly_gpt2_124m():
    cfg = TransformerConfig.gpt2()
    with torch.device("meta"):
        m = TinyTransformerLM(cfg)
    assert m.num_parameters() == 124_439_808
    assert (cfg.activation, cfg.norm, cfg.bias, cfg.pos_encoding, cfg.tie_weights) == (
        "gelu_tanh", "layernorm", True, "learned", True)
    assert m.layers[0].attention.qkv.weight.shape == (3 * 768, 768)  # llm.c's fused qkvw layout


def test_gpt_style_forward_matches_a_hand_written_gpt2_block():
    """One GPT-2 layer spelled out with torch.nn.functional on the model's own weights."""
    import torch.nn.functional as F

    torch.manual_seed(9)
    cfg = TransformerConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=1, max_seq_len=8, activation="gelu_tanh")
    m = TinyTransformerLM(cfg).eval()
    idx = torch.randint(0, 20, (1, 8))
    sd = {k: v.double() for k, v in m.state_dict().items()}
    x = sd["tok_embeddings.weight"][idx] + sd["pos_embedding.weight"][:8]
    h = F.layer_norm(x, (16,), sd["layers.0.attention_norm.weight"], sd["layers.0.attention_norm.bias"], 1e-5)
    qkv = h @ sd["layers.0.attention.qkv.weight"].T + sd["layers.0.attention.qkv.bias"]
    q, k, v = (t.view(1, 8, 2, 8).transpose(1, 2) for t in qkv.split(16, -1))
    att = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(~torch.ones(8, 8).tril().bool(), float("-inf"))
    y = (att.softmax(-1) @ v).transpose(1, 2).reshape(1, 8, 16)
    x = x + y @ sd["layers.0.attention.proj.weight"].T + sd["layers.0.attention.proj.bias"]
    h = F.layer_norm(x, (16,), sd["layers.0.ffn_norm.weight"], sd["layers.0.ffn_norm.bias"], 1e-5)
    h = F.gelu(h @ sd["layers.0.feed_forward.w1.weight"].T + sd["layers.0.feed_forward.w1.bias"], approximate="tanh")
    x = x + h @ sd["layers.0.feed_forward.w2.weight"].T + sd["layers.0.feed_forward.w2.bias"]
    x = F.layer_norm(x, (16,), sd["norm.weight"], sd["norm.bias"], 1e-5)
    ref = x @ sd["tok_embeddings.weight"].T
    torch.testing.assert_close(m(idx)[0].double(), ref, atol=1e-5, rtol=1e-5)
