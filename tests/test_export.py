"""llama2.c model.bin export: both layouts byte by byte, round trips, Q8_0 and Q4_0, validation, the CLI.

The C engine's side (logits, generation, rejected files) is tested in test_native_run.py.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from tiny_transformer.cli import main as cli_main
from tiny_transformer.export import (
    EXT_HEADER_BYTES,
    EXT_MAGIC,
    dequantize_q4_0,
    dequantize_q8_0,
    export_llama2c,
    load_llama2c,
    model_from_checkpoint,
    pack_q4,
    quantize_input_q8_0,
    quantize_q4_0,
    quantize_q8_0,
    read_llama2c_header,
    read_llama2c_tensors,
)
from tiny_transformer.model import LlamaConfig, LlamaLM, TinyTransformerLM, TransformerConfig


def make_model(seed=0, **overrides) -> LlamaLM:
    cfg = dict(vocab_size=67, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=24)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # give norms and heads non-trivial values so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def logits_of(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0]


def test_tied_model_writes_llama2c_version0_byte_layout(tmp_path):
    model = make_model()
    path = tmp_path / "model.bin"
    header = export_llama2c(model, path)
    assert header.version == 0 and header.shared_classifier
    data = path.read_bytes()
    assert struct.unpack_from("<7i", data, 0) == (32, 48, 2, 4, 2, 67, 24)
    # the first array after the 28-byte header is the token embedding, row-major
    emb = np.frombuffer(data, "<f4", 67 * 32, 28).reshape(67, 32)
    np.testing.assert_array_equal(emb, model.tok_embeddings.weight.detach().numpy())
    # wq of layer 0 follows rms_att: the first n_heads*hs rows of the fused qkv weight
    off = 28 + 4 * (67 * 32 + 2 * 32)
    wq0 = np.frombuffer(data, "<f4", 32 * 32, off).reshape(32, 32)
    np.testing.assert_array_equal(wq0, model.layers[0].attention.qkv.weight[:32].detach().numpy())
    hs = 32 // 4
    expected = 28 + 4 * (67 * 32 + 2 * (32 + 32 * 32 + 2 * 16 * 32 + 32 * 32 + 32 + 3 * 48 * 32) + 32 + 24 * hs)
    assert len(data) == expected == header.expected_size


def test_untied_model_has_negative_vocab_and_trailing_classifier(tmp_path):
    model = make_model(tie_embeddings=False)
    path = tmp_path / "model.bin"
    assert export_llama2c(model, path).version == 0
    data = path.read_bytes()
    assert struct.unpack_from("<7i", data, 0)[5] == -67
    cls = np.frombuffer(data[-67 * 32 * 4:], "<f4").reshape(67, 32)
    np.testing.assert_array_equal(cls, model.output.weight.detach().numpy())


def write_v0_by_hand(path, dim=16, hidden=40, layers=2, heads=4, kv_heads=2, vocab=50, seq=12, tied=False, seed=3):
    """A llama2.c version-0 file written straight from the format description (no exporter code)."""
    rng = np.random.default_rng(seed)
    hs, kv_dim = dim // heads, dim // heads * kv_heads
    shapes = [("emb", (vocab, dim)), ("rms_att", (layers, dim)), ("wq", (layers, dim, dim)),
              ("wk", (layers, kv_dim, dim)), ("wv", (layers, kv_dim, dim)), ("wo", (layers, dim, dim)),
              ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)), ("w2", (layers, dim, hidden)),
              ("w3", (layers, hidden, dim)), ("rms_final", (dim,)), ("freq_real", (seq, hs // 2)),
              ("freq_imag", (seq, hs // 2))]
    if not tied:
        shapes.append(("cls", (vocab, dim)))
    arrays = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab if tied else -vocab, seq))
        for name, shape in shapes:
            scale = 1.0 if name.startswith("rms") else 0.3
            a = (rng.standard_normal(shape) * scale + (1.0 if name.startswith("rms") else 0.0)).astype("<f4")
            arrays[name] = a
            f.write(a.tobytes())
    return arrays


def test_hand_written_v0_file_loads_into_the_right_parameters(tmp_path):
    path = tmp_path / "hand.bin"
    a = write_v0_by_hand(path)
    header = read_llama2c_header(path)
    assert (header.version, header.dim, header.hidden_dim, header.vocab_size, header.shared_classifier) == (
        0, 16, 40, 50, False)
    model = load_llama2c(path)
    layer = model.layers[1]
    torch.testing.assert_close(model.tok_embeddings.weight, torch.from_numpy(a["emb"]))
    torch.testing.assert_close(layer.attention.qkv.weight,
                               torch.from_numpy(np.concatenate([a["wq"][1], a["wk"][1], a["wv"][1]])))
    torch.testing.assert_close(layer.attention.proj.weight, torch.from_numpy(a["wo"][1]))
    torch.testing.assert_close(layer.feed_forward.w2.weight, torch.from_numpy(a["w2"][1]))
    torch.testing.assert_close(layer.ffn_norm.weight, torch.from_numpy(a["rms_ffn"][1]))
    torch.testing.assert_close(model.norm.weight, torch.from_numpy(a["rms_final"]))
    torch.testing.assert_close(model.output.weight, torch.from_numpy(a["cls"]))
    assert model.config.n_kv_heads == 2 and model.config.hidden_dim == 40
    # and writing it back gives the same bytes except the RoPE tables, which we recompute
    out = tmp_path / "again.bin"
    export_llama2c(model, out)
    orig, again = path.read_bytes(), out.read_bytes()
    assert len(orig) == len(again)
    freq_bytes = 2 * 12 * 2 * 4
    cls_bytes = 50 * 16 * 4
    assert orig[:-(freq_bytes + cls_bytes)] == again[:-(freq_bytes + cls_bytes)]
    assert orig[-cls_bytes:] == again[-cls_bytes:]


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(tie_embeddings=False),
    dict(tie_embeddings=False, pad_vocab_multiple=32),
    dict(qk_norm=True),
    dict(logit_softcap=4.0),
    dict(rope_theta=1234.5, norm_eps=1e-6),
    dict(sliding_window=5),
    dict(n_kv_heads=1),
])
def test_round_trip_reproduces_logits_exactly(tmp_path, overrides):
    model = make_model(**overrides)
    path = tmp_path / "m.bin"
    header = export_llama2c(model, path)
    v0_features = not {"pad_vocab_multiple", "qk_norm", "logit_softcap", "rope_theta", "sliding_window"} & set(overrides)
    assert header.version == (0 if v0_features else 1)
    back = load_llama2c(path)
    tokens = [int(t) for t in torch.randint(0, 67, (20,), generator=torch.Generator().manual_seed(1))]
    torch.testing.assert_close(logits_of(back, tokens), logits_of(model, tokens), rtol=0, atol=1e-6)
    assert back.config.qk_norm == model.config.qk_norm
    assert back.config.sliding_window == model.config.sliding_window
    assert back.output.weight.shape == model.output.weight.shape


def test_extended_header_layout_and_v0_reader_refusal(tmp_path):
    model = make_model(qk_norm=True, logit_softcap=7.5, rope_theta=500000.0, sliding_window=9,
                       tie_embeddings=False, pad_vocab_multiple=64)
    path = tmp_path / "ext.bin"
    header = export_llama2c(model, path)
    data = path.read_bytes()
    fields = struct.unpack_from("<Ii7iiiiifdfi", data, 0)
    assert fields == (EXT_MAGIC, 1, 32, 48, 2, 4, 2, 67, 24, 128, 2, 0, 0,
                      pytest.approx(1e-5), 500000.0, 7.5, 9)
    assert data[:4] == b"TTL\x8d"
    assert not any(data[72:EXT_HEADER_BYTES])
    assert len(data) == header.expected_size
    # What llama2.c's reader does: take the first 7 int32 as dim, hidden_dim, ... Its dim is negative,
    # so any reader that validates dimensions refuses the file instead of misreading it.
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack_from("<7i", data, 0)
    assert dim < 0


def test_version0_refuses_what_it_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="QK-norm.*soft-capping") as info:
        export_llama2c(make_model(qk_norm=True, logit_softcap=3.0), tmp_path / "a.bin", version=0)
    assert "version='auto' or 'ext'" in str(info.value)
    with pytest.raises(ValueError, match="fp32 only"):
        export_llama2c(make_model(), tmp_path / "b.bin", version=0, quantize="q8_0")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_version_ext_forces_the_extended_format(tmp_path):
    header = export_llama2c(make_model(), tmp_path / "m.bin", version="ext")
    assert header.version == 1 and (tmp_path / "m.bin").read_bytes()[:4] == b"TTL\x8d"


def test_q8_0_quantization_error_is_bounded():
    w = torch.randn(8, 64) * torch.linspace(0.01, 3, 64)
    q, s = quantize_q8_0(w, 16)
    assert q.dtype == torch.int8 and s.shape == (8 * 64 // 16,)
    assert int(q.abs().max()) == 127
    err = (dequantize_q8_0(q, s, 16) - w).abs().reshape(-1, 16)
    assert torch.all(err <= s[:, None] / 2 + 1e-7)
    q0, s0 = quantize_q8_0(torch.zeros(2, 8), 8)  # an all-zero group stays zero (no division by 0)
    assert not q0.any() and not s0.any()


def test_q8_0_file_round_trip_gives_the_dequantized_model(tmp_path):
    model = make_model(hidden_dim=40)  # 40 = 8 * 5: group size 64 is halved to 8
    path = tmp_path / "q8.bin"
    header = export_llama2c(model, path, quantize="q8_0", group_size=64)
    assert (header.version, header.weight_type, header.group_size) == (1, "q8_0", 8)
    assert path.stat().st_size < 0.4 * export_llama2c(model, tmp_path / "f.bin").file_size
    back = load_llama2c(path)
    expected = dequantize_q8_0(*quantize_q8_0(model.layers[1].feed_forward.w2.weight, 8), 8)
    torch.testing.assert_close(back.layers[1].feed_forward.w2.weight, expected, rtol=0, atol=0)
    torch.testing.assert_close(back.layers[0].attention_norm.weight, model.layers[0].attention_norm.weight)
    tokens = list(range(1, 21))
    diff = (logits_of(back, tokens) - logits_of(model, tokens)).abs().max()
    assert diff < 0.05 * logits_of(model, tokens).abs().max()


def test_q8_0_group_size_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4"):
        export_llama2c(make_model(), tmp_path / "a.bin", quantize="q8_0", group_size=6)
    with pytest.raises(ValueError, match="divides both dim"):
        export_llama2c(make_model(hidden_dim=42), tmp_path / "b.bin", quantize="q8_0", group_size=64)
    with pytest.raises(ValueError, match="quantize must be"):
        export_llama2c(make_model(), tmp_path / "c.bin", quantize="int4")
    with pytest.raises(ValueError, match="in 4..1024"):
        export_llama2c(make_model(), tmp_path / "d.bin", quantize="q8_0", group_size=2048)


def test_q4_0_quantization_and_packing():
    w = torch.randn(8, 64) * torch.linspace(0.01, 3, 64)
    q, s = quantize_q4_0(w, 16)
    assert q.dtype == torch.int8 and s.shape == (8 * 64 // 16,)
    assert int(q.min()) == -8 and int(q.max()) <= 7
    groups = w.reshape(-1, 16)
    err = (dequantize_q4_0(q, s, 16) - w).abs().reshape(-1, 16)
    # the weight of largest magnitude is exact (q = -8); the rest within half a step, except those
    # near the opposite extreme, clamped to 7: within one step
    extreme = groups.abs().argmax(dim=1)
    assert torch.all(err.gather(1, extreme[:, None]) <= 1e-6 * groups.abs().amax(dim=1, keepdim=True))
    assert torch.all(err <= s.abs()[:, None] + 1e-6)
    assert (err <= s.abs()[:, None] / 2 + 1e-6).float().mean() > 0.95
    q0, s0 = quantize_q4_0(torch.zeros(2, 8), 8)
    assert not q0.any() and not s0.any()
    # two values per byte, u = q + 8, the first in the low 4 bits
    assert pack_q4(torch.tensor([-8, 7, 0, -1], dtype=torch.int8)) == bytes([0x00 | 0xF0, 0x08 | 0x70])


def test_q4_0_file_round_trip_gives_the_dequantized_model(tmp_path):
    model = make_model(hidden_dim=40)  # 40 = 8 * 5: group size 64 is halved to 8
    path = tmp_path / "q4.bin"
    header = export_llama2c(model, path, quantize="q4_0", group_size=64)
    assert (header.version, header.weight_type, header.group_size) == (1, "q4_0", 8)
    assert struct.unpack_from("<i", path.read_bytes(), 44) == (2,)  # weight type 2
    fp32 = export_llama2c(model, tmp_path / "f.bin").file_size
    assert path.stat().st_size < 0.27 * fp32  # 4 bits + a 4-byte scale per 8 weights (norms stay fp32)
    back = load_llama2c(path)
    expected = dequantize_q4_0(*quantize_q4_0(model.layers[1].feed_forward.w2.weight, 8), 8)
    torch.testing.assert_close(back.layers[1].feed_forward.w2.weight, expected, rtol=0, atol=0)
    torch.testing.assert_close(back.tok_embeddings.weight,
                               dequantize_q4_0(*quantize_q4_0(model.tok_embeddings.weight, 8), 8), rtol=0, atol=0)
    torch.testing.assert_close(back.layers[0].attention_norm.weight, model.layers[0].attention_norm.weight)
    with pytest.raises(ValueError, match="multiple of 8"):
        export_llama2c(model, tmp_path / "a.bin", quantize="q4_0", group_size=4)
    with pytest.raises(ValueError, match="q8_0"):  # 20 and 10 are no multiples of 8: Q4_0 cannot, Q8_0 can
        export_llama2c(make_model(dim=40, hidden_dim=60, n_heads=4), tmp_path / "b.bin", quantize="q4_0",
                       group_size=64)
    with pytest.raises(ValueError, match="fp32 only"):
        export_llama2c(model, tmp_path / "c.bin", version=0, quantize="q4_0")


def test_quantized_inputs_model_quantizes_every_linear_input(tmp_path):
    path = tmp_path / "q8.bin"
    export_llama2c(make_model(), path, quantize="q8_0", group_size=16)
    seen = []
    model = load_llama2c(path, quantized_inputs=True)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))  # runs after the quantizing hook
    logits_of(model, list(range(1, 9)))
    assert len(seen) == 2 * 5 + 1  # qkv, proj, w1, w2, w3 in each layer, and the classifier
    for x in seen:  # every input is already on its grid: quantizing again changes nothing
        torch.testing.assert_close(quantize_input_q8_0(x, 16), x, rtol=0, atol=0)
    x = torch.tensor([[0.0] * 16, [1.0, -2.54, 0.5] + [0.0] * 13])
    q = quantize_input_q8_0(x, 16)
    assert not q[0].any()  # an all-zero group stays zero
    scale = torch.tensor(2.54) / 127  # float32 arithmetic: q = round(x * (1 / scale)), ties to even
    expected = torch.round(x[1] * torch.reciprocal(scale)) * scale
    torch.testing.assert_close(q[1], expected, rtol=0, atol=0)


def test_read_header_rejects_damaged_files(tmp_path):
    good = tmp_path / "good.bin"
    export_llama2c(make_model(), good)
    data = good.read_bytes()
    cases = {
        "truncated": data[:-4],
        "too long": data + b"\0\0\0\0",
        "n_heads = 5 must divide dim": struct.pack("<7i", 32, 48, 2, 5, 1, 67, 24) + data[28:],
        "n_kv_heads = 3 must divide": struct.pack("<7i", 32, 48, 2, 4, 3, 67, 24) + data[28:],
        "dim = -7": struct.pack("<7i", -7, 48, 2, 4, 2, 67, 24) + data[28:],
        "smaller than the 28-byte": data[:10],
        "version 1/2": struct.pack("<Ii", 0x616B3432, 2) + data[8:],
    }
    for message, content in cases.items():
        bad = tmp_path / "bad.bin"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            read_llama2c_header(bad)
    with pytest.raises(FileNotFoundError, match="export_llama2c"):
        read_llama2c_header(tmp_path / "missing.bin")
    ext = tmp_path / "ext.bin"
    export_llama2c(make_model(), ext, version="ext")
    raw = bytearray(ext.read_bytes())
    raw[200] = 1
    ext.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="reserved header bytes"):
        read_llama2c_header(ext)


def test_export_refuses_gpt_models_and_nan_weights(tmp_path):
    gpt = TinyTransformerLM(TransformerConfig(vocab_size=10, d_model=16, n_heads=2, n_layers=1, d_ff=32))
    with pytest.raises(ValueError, match="needs a LlamaLM"):
        export_llama2c(gpt, tmp_path / "g.bin")
    model = make_model()
    with torch.no_grad():
        model.layers[0].feed_forward.w1.weight[0, 0] = math.nan
    target = tmp_path / "nan.bin"
    target.write_bytes(b"previous")
    with pytest.raises(ValueError, match="NaN or infinite"):
        export_llama2c(model, target)
    assert target.read_bytes() == b"previous"  # the old file survives a failed export
    assert [p.name for p in tmp_path.iterdir()] == ["nan.bin"]


def test_tensors_reader_lists_every_array(tmp_path):
    path = tmp_path / "m.bin"
    export_llama2c(make_model(qk_norm=True), path)
    header, tensors = read_llama2c_tensors(path)
    assert list(tensors) == [name for name, _, _ in header.tensor_layout()]
    assert tensors["q_norm"].shape == (2, 8)


def checkpoint_dict(model, tokenizer=None):
    cfg = {k: getattr(model.config, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                                                  "hidden_dim", "max_seq_len", "qk_norm")}
    return {"model": model.state_dict(), "config": {"model_type": "llama", "model": cfg}, "tokenizer": tokenizer}


def test_model_from_checkpoint_accepts_files_dicts_and_models(tmp_path):
    model = make_model(qk_norm=True)
    ckpt = checkpoint_dict(model)
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    tokens = [1, 5, 9]
    for source in (path, str(path), ckpt, model):
        loaded, tok = model_from_checkpoint(source)
        torch.testing.assert_close(logits_of(loaded, tokens), logits_of(model, tokens))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        model_from_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        model_from_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="needs the keys"):
        model_from_checkpoint({"model": {}})


def test_export_command_writes_model_and_explains_errors(tmp_path, capsys):
    model = make_model()
    ckpt = tmp_path / "ckpt.pt"
    torch.save(checkpoint_dict(model, tokenizer={"type": "char", "chars": "ab"}), ckpt)
    out = tmp_path / "model.bin"
    assert cli_main(["export", "--checkpoint", str(ckpt), "--format", "llama2c", "--out", str(out)]) == 0
    assert "llama2.c version 0" in capsys.readouterr().out
    assert read_llama2c_header(out).dim == 32
    q8 = tmp_path / "q8.bin"
    assert cli_main(["export", "--checkpoint", str(ckpt), "--out", str(q8), "--quantize", "q8_0",
                     "--group-size", "16"]) == 0
    assert read_llama2c_header(q8).group_size == 16
    q4 = tmp_path / "q4.bin"
    assert cli_main(["export", "--checkpoint", str(ckpt), "--out", str(q4), "--quantize", "q4_0"]) == 0
    assert "q4_0, group size 16" in capsys.readouterr().out  # 64 halved until it divides hidden_dim 48
    assert read_llama2c_header(q4).weight_type == "q4_0"
    code = cli_main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--tokenizer-out",
                     str(tmp_path / "tok.bin")])
    assert code == 1 and "tokenizer.bin holds a SentencePiece vocabulary" in capsys.readouterr().err
    assert cli_main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(out)]) == 1
    assert "not found" in capsys.readouterr().err


def test_export_command_writes_a_sentencepiece_tokenizer_bin(tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    from tiny_transformer.sentencepiece_tools import SentencePieceTokenizer, read_tokenizer_bin

    text = "\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200))
    sp = SentencePieceTokenizer.train(text, vocab_size=300, model_prefix=str(tmp_path / "sp"))
    model = make_model(vocab_size=300)
    ckpt = tmp_path / "ckpt.pt"
    torch.save(checkpoint_dict(model, tokenizer=sp.to_dict()), ckpt)
    tok = tmp_path / "tokenizer.bin"
    assert cli_main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.bin"),
                     "--tokenizer-out", str(tok)]) == 0
    assert read_tokenizer_bin(tok, vocab_size=300).vocab_size == 300
    assert cli_main(["export", "--checkpoint", str(ckpt), "--format", "tokenizer", "--out",
                     str(tmp_path / "t2.bin")]) == 0
    assert (tmp_path / "t2.bin").read_bytes() == tok.read_bytes()
