"""Tests for `python -m tiny_transformer generate` (tiny random checkpoints written per the contract)."""

from __future__ import annotations

import pytest
import torch

from tiny_transformer.checkpoint import FORMAT, VERSION, save_checkpoint
from tiny_transformer.cli import main
from tiny_transformer.model import LlamaConfig, LlamaLM, TinyTransformerLM, TransformerConfig
from tiny_transformer.sampling import TextGenerator
from tiny_transformer.tokenizers import CharTokenizer

SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TOK = CharTokenizer(SHAKESPEARE_CHARS)
RULE = "-" * 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_checkpoint(path, model, model_type="gpt", tokenizer=TOK):
    ckpt = {
        "format": FORMAT, "version": VERSION, "model": model.state_dict(),
        "config": {"model_type": model_type, "model": model.config.to_dict()},
        "step": 100, "val_loss": 2.5,
    }
    if tokenizer is not None:
        ckpt["tokenizer"] = tokenizer.to_dict()
    save_checkpoint(ckpt, path)
    return str(path)


def tiny_gpt(seed=0, n_layers=2):
    torch.manual_seed(seed)
    model = TinyTransformerLM(TransformerConfig(vocab_size=65, d_model=32, n_heads=4, n_layers=n_layers, d_ff=64,
                                                max_seq_len=64, tie_weights=False))
    with torch.no_grad():
        model.output.weight.mul_(8)  # confident predictions, so different settings give different text
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", tiny_gpt())


@pytest.fixture(scope="module")
def gen():
    return TextGenerator(tiny_gpt(), TOK)


def generate(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def body(out: str) -> str:
    """The generated text printed between the two rules."""
    return out.split(RULE + "\n")[1].removesuffix("\n")


def test_sampling_prints_settings_text_and_speed(capsys, ckpt, gen):
    code, out, _ = generate(capsys, "--checkpoint", ckpt, "--prompt", "ROMEO:", "--max-tokens", "40",
                            "--temperature", "0.8", "--top-k", "20", "--seed", "7")
    assert code == 0
    assert "step 100, val loss 2.500" in out
    assert "settings: sample, max_new_tokens=40, temperature=0.8, top_k=20, seed=7, kv_cache=on" in out
    expected = gen.generate("ROMEO:", max_new_tokens=40, temperature=0.8, top_k=20, seed=7)
    assert body(out) == "ROMEO:" + expected.text
    assert "40 tokens in" in out and "tokens/s" in out


def test_without_seed_a_fresh_one_is_printed(capsys, ckpt, gen):
    _, out, _ = generate(capsys, "--checkpoint", ckpt, "--max-tokens", "20")
    seed = int(out.split("seed=")[1].split(",")[0])
    assert body(out) == "ROMEO:" + gen.generate("ROMEO:", max_new_tokens=20, temperature=0.8, seed=seed).text


def test_greedy_stream_and_no_cache_agree(capsys, ckpt, gen):
    expected = "ROMEO:" + gen.generate("ROMEO:", max_new_tokens=50, do_sample=False).text
    _, out, _ = generate(capsys, "--checkpoint", ckpt, "--max-tokens", "50", "--greedy")
    assert body(out) == expected and "settings: greedy" in out
    _, out, _ = generate(capsys, "--checkpoint", ckpt, "--max-tokens", "50", "--greedy", "--stream")
    assert body(out) == expected
    _, out, _ = generate(capsys, "--checkpoint", ckpt, "--max-tokens", "50", "--greedy", "--no-cache")
    assert body(out) == expected and "kv_cache=off" in out


def test_compare_shows_four_settings(capsys, ckpt, gen, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # too narrow for columns: one section per setting
    _, out, _ = generate(capsys, "--checkpoint", ckpt, "--max-tokens", "30", "--compare", "--seed", "3")
    for title in ("greedy", "T=0.5", "T=0.8", "T=1.2"):
        assert f"=== {title} ===" in out
    greedy = gen.generate("ROMEO:", max_new_tokens=30, do_sample=False).text
    hot = gen.generate("ROMEO:", max_new_tokens=30, temperature=1.2, seed=3).text
    assert f"=== greedy ===\nROMEO:{greedy}\n" in out and f"=== T=1.2 ===\nROMEO:{hot}\n" in out
    assert "120 tokens in" in out
    monkeypatch.setenv("COLUMNS", "160")  # wide: side by side
    _, out, _ = generate(capsys, "--checkpoint", ckpt, "--max-tokens", "30", "--compare", "--seed", "3")
    header = next(line for line in out.splitlines() if "greedy" in line and "T=1.2" in line)
    assert header.index("greedy") < header.index("T=0.5") < header.index("T=0.8") < header.index("T=1.2")


def test_batch_writes_every_character(capsys, ckpt, gen, tmp_path):
    path = tmp_path / "plays" / "out.txt"
    code, out, _ = generate(capsys, "--checkpoint", ckpt, "--max-tokens", "25", "--batch", "--greedy",
                            "--output", str(path))
    assert code == 0 and "batch of 5 prompts (left-padded)" in out and f"wrote {path}" in out
    written = path.read_text(encoding="utf-8")
    for name in ("ROMEO:", "JULIET:", "HAMLET:", "KING LEAR:", "MACBETH:"):
        alone = gen.generate(name, max_new_tokens=25, do_sample=False).text
        assert f"=== {name} ===\n{name}{alone}" in written  # same as generating it alone
    assert "125 tokens in" in out


def test_beam_contrastive_mirostat_and_speculative(capsys, ckpt, gen, tmp_path):
    _, out, _ = generate(capsys, "--checkpoint", ckpt, "--max-tokens", "12", "--num-beams", "3")
    assert "settings: beam" in out
    assert body(out) == "ROMEO:" + gen.beam_search("ROMEO:", num_beams=3, max_new_tokens=12).text
    _, out, _ = generate(capsys, "--checkpoint", ckpt, "--max-tokens", "12", "--penalty-alpha", "0.6", "--top-k", "4")
    assert "settings: contrastive" in out
    assert body(out) == "ROMEO:" + gen.contrastive_search("ROMEO:", 0.6, 4, max_new_tokens=12).text
    _, out, _ = generate(capsys, "--checkpoint", ckpt, "--max-tokens", "12", "--mirostat", "3", "--seed", "1")
    assert "settings: mirostat" in out and "tau=3" in out
    draft = write_checkpoint(tmp_path / "draft.pt", tiny_gpt(seed=1, n_layers=1))
    _, out, _ = generate(capsys, "--checkpoint", ckpt, "--max-tokens", "40", "--greedy", "--draft", draft)
    assert body(out) == "ROMEO:" + gen.generate("ROMEO:", max_new_tokens=40, do_sample=False).text
    assert "speculative (4 draft tokens" in out and "draft acceptance" in out


def test_llama_checkpoint_with_stop_string(capsys, tmp_path):
    torch.manual_seed(0)
    model = LlamaLM(LlamaConfig(vocab_size=65, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                                max_seq_len=64)).eval()
    path = write_checkpoint(tmp_path / "llama.pt", model, model_type="llama")
    full = TextGenerator(model, TOK).generate("ROMEO:", max_new_tokens=30, seed=4, temperature=0.8).text
    stop = full[8:10]
    _, out, _ = generate(capsys, "--checkpoint", path, "--max-tokens", "30", "--seed", "4", "--stop", stop)
    assert body(out) == "ROMEO:" + full[: full.find(stop)] and "stopped by: stop" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temperature", "-1"], "temperature must be a number >= 0"),
        (["--top-p", "1.5"], r"top_p must lie in (0, 1]"),
        (["--top-k", "0"], "top_k must be a positive integer"),
        (["--min-p", "1"], "min_p must lie in [0, 1)"),
        (["--repetition-penalty", "0"], "repetition_penalty must be a number > 0"),
        (["--max-tokens", "-5"], "--max-tokens must be >= 0, got -5"),
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "ROMEO\u2019s"], "cannot be encoded: character '\u2019'"),
        (["--compare", "--batch"], "--compare and --batch cannot be combined"),
        (["--batch", "--stream"], "--stream prints one text as it grows; it does not work with --batch"),
        (["--penalty-alpha", "0.5"], "needs top_k"),
        (["--draft-tokens", "0", "--draft", "SELF"], "num_draft_tokens must be an integer >= 1"),
    ],
)
def test_bad_input_gives_one_clear_line(capsys, ckpt, argv, message):
    argv = [ckpt if a == "SELF" else a for a in argv]
    code, _, err = generate(capsys, "--checkpoint", ckpt, "--max-tokens", "5", *argv)
    assert code == 1
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_bad_checkpoints(capsys, tmp_path, ckpt):
    code, _, err = generate(capsys, "--checkpoint", str(tmp_path / "missing.pt"))
    assert code == 1 and "does not exist" in err
    bare = write_checkpoint(tmp_path / "no_tokenizer.pt", tiny_gpt(), tokenizer=None)
    code, _, err = generate(capsys, "--checkpoint", bare)
    assert code == 1 and "holds no tokenizer" in err
    other = write_checkpoint(tmp_path / "other.pt", tiny_gpt(), tokenizer=CharTokenizer(SHAKESPEARE_CHARS[::-1] + "~"))
    code, _, err = generate(capsys, "--checkpoint", ckpt, "--draft", other, "--greedy")
    assert code == 1 and "uses a different tokenizer" in err
