"""Production tools: TorchScript and ONNX exports checked against the model, int8 quantization,
the variant comparison, and the fine-tuning text helpers."""

import importlib.util
import math

import pytest
import torch
from torch import nn

from tiny_transformer import finetune, production
from tiny_transformer.model import LlamaConfig, LlamaLM, TinyTransformerLM, TransformerConfig
from tiny_transformer.tokenizers import CharTokenizer

# The 65 characters of Tiny Shakespeare (so these tests need no data file).
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def gpt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=65, d_model=64, n_heads=4, n_layers=2, max_seq_len=48)
    cfg.update(kw)
    return TinyTransformerLM(TransformerConfig(**cfg)).eval()


def llama(seed=0):
    torch.manual_seed(seed)
    return LlamaLM(LlamaConfig(vocab_size=70, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48)).eval()


# ----------------------------------------------------------------------------------------------
# TorchScript


@pytest.mark.parametrize("make", [gpt, llama], ids=["gpt", "llama"])
def test_torchscript_export_matches_model_on_other_lengths(tmp_path, make):
    model = make()
    report = production.export_torchscript(model, tmp_path / "m.ts", example_len=16, check_len=40)
    assert report["max_abs_diff"] <= 1e-5
    assert report["check_shape"] == (2, 40)
    assert report["bytes"] == (tmp_path / "m.ts").stat().st_size > 0
    loaded = production.load_torchscript(tmp_path / "m.ts")
    # A third length and batch size, neither used while tracing nor in the export's own check.
    idx = torch.randint(0, model.vocab_size, (3, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx)[0], rtol=1e-5, atol=1e-5)


def test_torchscript_export_leaves_model_untouched(tmp_path):
    model = gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    production.export_torchscript(model, tmp_path / "m.ts")
    assert model.training, "export must not switch the caller's model to eval mode"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_torchscript_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="tiny_transformer language model"):
        production.export_torchscript(nn.Linear(2, 2), tmp_path / "x.ts")
    with pytest.raises(FileNotFoundError, match="export_torchscript"):
        production.load_torchscript(tmp_path / "missing.ts")
    bad = tmp_path / "bad.ts"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        production.load_torchscript(bad)
    with pytest.raises(ValueError, match="between 1 and the model's context 48"):
        production.example_input(gpt(), seq_len=49)


# ----------------------------------------------------------------------------------------------
# ONNX


def test_onnx_missing_packages_give_install_hint(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnx", "onnxruntime") else real(name, *a))
    ok, message = production.onnx_status()
    assert not ok and "pip install onnx onnxruntime" in message
    with pytest.raises(RuntimeError, match="pip install onnx onnxruntime"):
        production.export_onnx(gpt(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.skipif(not production.onnx_status()[0], reason="onnx/onnxruntime not installed")
def test_onnx_export_matches_onnxruntime(tmp_path):
    report = production.export_onnx(gpt(), tmp_path / "m.onnx", example_len=16, check_len=30)
    assert report["max_abs_diff"] <= 1e-4
    assert report["check_shape"] == (2, 30)


# ----------------------------------------------------------------------------------------------
# int8 quantization and comparison


def test_int8_quantization_is_smaller_close_and_does_not_touch_original():
    model = gpt(d_model=128, max_seq_len=32)
    q = production.quantize_int8(model)
    assert not any(isinstance(m, nn.Linear) for m in q.modules()), "every nn.Linear must be quantized"
    assert sum(m._get_name() == "DynamicQuantizedLinear" for m in q.modules()) == 2 * 4 + 1
    assert any(isinstance(m, nn.Linear) for m in model.modules()), "the original model must keep float layers"
    fp32_bytes, int8_bytes = production.state_dict_bytes(model), production.state_dict_bytes(q)
    # Linear weights shrink 4x; embeddings stay float32 and the tied head gets an int8 copy.
    assert int8_bytes < 0.5 * fp32_bytes, (fp32_bytes, int8_bytes)
    idx = production.example_input(model, 4, 32)
    with torch.no_grad():
        a, b = model(idx)[0], q(idx)[0]
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_compare_variants_measures_size_speed_and_perplexity(tmp_path):
    model = gpt()
    production.export_torchscript(model, tmp_path / "m.ts")
    variants = {"fp32": model, "int8": production.quantize_int8(model),
                "torchscript": production.load_torchscript(tmp_path / "m.ts")}
    tokens = torch.randint(0, 65, (2000,), generator=torch.Generator().manual_seed(0))
    rows = production.compare_variants(variants, tokens, seq_len=32, max_windows=8, timing_batch=2,
                                       timing_len=16, repeats=2)
    assert [r["name"] for r in rows] == ["fp32", "int8", "torchscript"]
    base, q, ts = rows
    assert base["speedup"] == 1.0 and base["ppl_change"] == 0.0
    assert all(r["ms"] > 0 and r["bytes"] > 0 for r in rows)
    # The traced graph computes exactly what the model computes.
    assert ts["loss"] == pytest.approx(base["loss"], abs=1e-5)
    assert q["bytes"] < base["bytes"]
    # Untrained model: loss near ln(65); int8 changes perplexity by well under 5 %.
    assert base["loss"] == pytest.approx(math.log(65), abs=0.3)
    assert abs(q["ppl_change"]) < 0.05
    assert base["perplexity"] == pytest.approx(math.exp(base["loss"]))
    assert base["bits_per_char"] == pytest.approx(base["loss"] / math.log(2))
    table = production.format_table(rows)
    assert "torchscript" in table and "perplexity" in table and table.count("\n") == 4


def test_compare_variants_rejects_bad_input():
    with pytest.raises(ValueError, match="variants is empty"):
        production.compare_variants({})
    with pytest.raises(ValueError, match="repeats must be"):
        production.time_forward(gpt(), torch.zeros(1, 4, dtype=torch.long), repeats=0)


# ----------------------------------------------------------------------------------------------
# Fine-tuning text


def test_demo_text_fits_the_shakespeare_vocabulary():
    tok = CharTokenizer(SHAKESPEARE_CHARS)
    assert tok.vocab_size == 65
    text = finetune.demo_text()
    assert 3000 < len(text) < 10000
    finetune.check_vocabulary(text, tok)  # raises if any character is unknown
    assert len(tok.encode(text)) == len(text)
    assert text.count("You will need") >= 5, "the demo text is a recipe notebook"


def test_write_and_load_demo_text(tmp_path):
    path = finetune.write_demo_text(tmp_path / "sub" / "demo.txt")
    assert path.read_text(encoding="utf-8") == finetune.DEMO_TEXT
    assert finetune.load_finetune_text(path) == finetune.DEMO_TEXT
    assert finetune.load_finetune_text(None) == finetune.DEMO_TEXT
    with pytest.raises(FileNotFoundError, match="UTF-8 text file"):
        finetune.load_finetune_text(tmp_path / "missing.txt")


def test_fit_to_vocabulary_replaces_and_reports():
    tok = CharTokenizer(SHAKESPEARE_CHARS)
    text = "\u201cBake\u201d for 45 min \u2014 then (gently) cool\u2026 caf\u00e9\ttime 3"
    with pytest.raises(ValueError, match="clean it with"):
        finetune.check_vocabulary(text, tok)
    clean, report = finetune.fit_to_vocabulary(text, tok)
    assert clean == "'Bake' for four five min - then ,gently, cool... caf time 3"
    finetune.check_vocabulary(clean, tok)
    assert "2 digit(s) -> words" in report and "'\u00e9' x1 -> removed" in report
    assert finetune.fit_to_vocabulary("ROMEO:", tok) == ("ROMEO:", "every character is in the vocabulary; nothing changed")
    # A letter in the other case is used when only that case is known.
    lower = CharTokenizer("abc ")
    assert finetune.fit_to_vocabulary("Abc", lower)[0] == "abc"




def _trained_checkpoint(tmp_path):
    """A real checkpoint as `train` writes it: a tiny GPT after two steps."""
    from tiny_transformer.training import Trainer, TrainerConfig

    text = "to be or not to be, that is the question\n" * 40
    tok = CharTokenizer().fit(text)
    ids = torch.tensor(tok.encode(text))
    model = gpt(vocab_size=tok.vocab_size)
    cfg = TrainerConfig(max_steps=2, warmup_steps=1, batch_size=2, seq_len=16, eval_interval=2, eval_batches=1, progress=False,
                        verbose=False, experiment_name="ts", log_dir=str(tmp_path / "logs"),
                        checkpoint_dir=str(tmp_path / "ckpt"), device="cpu")
    Trainer(model, cfg, ids[:1000], ids[1000:], tokenizer=tok).train()
    return tmp_path / "ckpt" / "ts" / "best.pt"


def test_export_command_torchscript_runs_without_the_library(tmp_path, capsys):
    from tiny_transformer.checkpoint import load_model_from_checkpoint
    from tiny_transformer.cli import main as cli_main

    ckpt = _trained_checkpoint(tmp_path)
    out = tmp_path / "model.ts"
    assert cli_main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    assert "max |difference| from the model" in capsys.readouterr().out
    model, _, _ = load_model_from_checkpoint(ckpt)
    idx = torch.randint(0, model.vocab_size, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(production.load_torchscript(out)(idx), model(idx)[0], atol=1e-5, rtol=1e-5)
    # options of other formats are refused, not ignored
    assert cli_main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out),
                     "--quantize", "q8_0"]) == 1
    assert "do not apply to --format torchscript" in capsys.readouterr().err


def test_export_command_onnx_names_the_install_when_missing(tmp_path, capsys, monkeypatch):
    from tiny_transformer.cli import main as cli_main

    ckpt = _trained_checkpoint(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnx", "onnxruntime") else real(name, *a))
    assert cli_main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 1
    assert "pip install onnx onnxruntime" in capsys.readouterr().err
