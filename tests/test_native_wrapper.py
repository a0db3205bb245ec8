"""The cffi wrapper around native/run.c: building, tokenization, logits, generation, errors.

Everything is checked against the Python side: SentencePiece's own encoder for tokenization and
`LlamaLM` for logits and greedy decoding. Needs a C compiler (skipped with a reason otherwise).
"""

from __future__ import annotations

import random
import shutil
import subprocess

import numpy as np
import pytest
import torch

from tiny_transformer import native
from tiny_transformer.export import export_llama2c
from tiny_transformer.model import LlamaConfig, LlamaLM
from tiny_transformer.native import (
    CompilerNotFoundError,
    NativeEngine,
    NativeStream,
    build_binary,
    build_native,
    find_compiler,
    run_binary,
    run_c_path,
)
from tiny_transformer.sentencepiece_tools import (
    export_tokenizer_bin,
    load_sentencepiece,
    train_sentencepiece,
)

try:
    find_compiler()
    HAVE_CC = True
except CompilerNotFoundError:
    HAVE_CC = False
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler (install build-essential)")

CORPUS = "\n".join(
    [
        "Now is the winter of our discontent made glorious summer by this sun of York.",
        "The model reads a prompt, then writes one token after another.",
        "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
        "  Indented lines keep their spaces, and so do    runs of spaces inside.",
        "In 1599 the Globe opened; in 2024 we still read the plays.",
        "KING HENRY: Once more unto the breach, dear friends, once more!",
    ]
    * 25
)

# Edge cases for the C tokenizer. All of these must encode exactly as SentencePiece does.
EDGE_CASES = [
    "",
    " ",
    "   ",
    " leading",
    "trailing ",
    "  two leading and two trailing  ",
    "many     spaces",
    "\n",
    "line one\nline two\n",
    "\n\nKING HENRY:\n",
    "tab\tseparated\r\nwindows line",
    "caf\u00e9 \u00fcber na\u00efve",  # not in the corpus: byte fallback
    "\u6f22\u5b57 \U0001F600 \u00a0nbsp \u3000wide space",
    "e\u0301 (combining accent)",
    "<0x41> <s> </s> <unk> are plain text here",
    "digits 0123456789 and 3.14159",
    "x\x01y\x7f",
    "summer summer summer's",
]


def spread_weights(model):
    """Larger weights than the initialisation (norm gains away from 1), so logits span several units
    and a wrong weight or a misplaced tensor shows up as a large difference."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A SentencePiece vocabulary, a small seeded Llama with that vocabulary, both exported."""
    tmp = tmp_path_factory.mktemp("native")
    sp_path = train_sentencepiece(CORPUS, vocab_size=340, model_prefix=tmp / "tok")
    tok = load_sentencepiece(sp_path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=340, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96)
    model = spread_weights(LlamaLM(config).eval())
    export_llama2c(model, tmp / "model.bin")
    export_tokenizer_bin(sp_path, tmp / "tokenizer.bin")
    return {"tmp": tmp, "tok": tok, "model": model, "bin": tmp / "model.bin", "tok_bin": tmp / "tokenizer.bin"}


@pytest.fixture(scope="module")
def engine(files):
    if not HAVE_CC:
        pytest.skip("no C compiler (install build-essential)")
    with NativeEngine(files["bin"], files["tok_bin"]) as e:
        yield e


# ---------------------------------------------------------------------------------------------
# building


@needs_cc
def test_rebuilt_library_gets_a_new_file_name(tmp_path):
    source = tmp_path / "run.c"
    shutil.copy(run_c_path(), source)
    first = build_native(source=source, out_dir=tmp_path)
    assert first.is_file() and first.name.startswith("librun-") and first.parent == tmp_path
    mtime = first.stat().st_mtime_ns
    assert build_native(source=source, out_dir=tmp_path) == first  # cached: same source, same flags
    assert first.stat().st_mtime_ns == mtime
    with open(source, "a", encoding="utf-8") as f:
        f.write("\n/* an edit */\n")
    second = build_native(source=source, out_dir=tmp_path)
    assert second != first and second.is_file()
    third = build_native(flags=("-O1",), source=source, out_dir=tmp_path)
    assert third not in (first, second)


@needs_cc
def test_cdef_matches_run_c(tmp_path):
    """cffi's ABI mode trusts our declarations blindly; the C compiler checks them against run.c.

    Redeclaring a function with different types is a compile error ("conflicting types"), so a
    file that includes run.c and then our CDEF compiles only if every signature matches.
    """
    check = tmp_path / "check_cdef.c"
    check.write_text(f'#include "{run_c_path().resolve()}"\n{native.CDEF}\n', encoding="utf-8")
    proc = subprocess.run([*find_compiler(), "-fsyntax-only", "-DRUN_LIBRARY", str(check)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"native.CDEF does not match run.c:\n{proc.stderr}"


@needs_cc
def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    assert native.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(native.CACHE_ENV)
    assert native.cache_dir() == run_c_path().parent / "build"


@needs_cc
def test_compile_error_is_reported(tmp_path):
    source = tmp_path / "broken.c"
    source.write_text("int main(void) { return missing_name; }\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="(?s)compiling failed.*missing_name"):
        build_native(source=source, out_dir=tmp_path)
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".*.tmp"))


def test_missing_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(CompilerNotFoundError, match="CC=.*was not found"):
        find_compiler()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no cc, gcc or clang
    with pytest.raises(CompilerNotFoundError, match="(?s)build-essential.*xcode-select --install"):
        find_compiler()
    with pytest.raises(RuntimeError, match="no C compiler found"):
        build_native(out_dir=tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="export_llama2c"):
        NativeEngine(tmp_path / "model.bin")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="export_tokenizer_bin"):
        NativeEngine(tmp_path / "model.bin", tmp_path / "tokenizer.bin")
    with pytest.raises(FileNotFoundError, match="run.c"):
        build_native(source=tmp_path / "nothing.c")


# ---------------------------------------------------------------------------------------------
# the engine


def test_config(engine, files):
    c = files["model"].config
    assert engine.config == native.NativeConfig(
        dim=c.dim, hidden_dim=c.hidden_dim, n_layers=c.n_layers, n_heads=c.n_heads,
        n_kv_heads=c.n_kv_heads, vocab_size=c.vocab_size, seq_len=c.max_seq_len,
    )


@pytest.mark.parametrize("text", EDGE_CASES)
def test_c_tokenizer_matches_sentencepiece_edge_cases(engine, files, text):
    tok = files["tok"]
    assert engine.encode(text) == tok.encode(text, bos=True)
    assert engine.encode(text, bos=False, eos=True) == tok.encode(text, eos=True)
    assert engine.decode(engine.encode(text)) == text


def test_c_tokenizer_matches_sentencepiece_on_many_strings(engine, files):
    tok = files["tok"]
    rng = random.Random(0)
    mismatches = []
    for _ in range(400):
        start = rng.randrange(len(CORPUS) - 100)
        text = CORPUS[start : start + rng.randrange(1, 100)]
        if engine.encode(text) != tok.encode(text, bos=True):
            mismatches.append(text)
    assert not mismatches, f"{len(mismatches)} strings tokenize differently, e.g. {mismatches[:3]}"


def test_known_difference_literal_whitespace_marker(engine, files):
    """A typed "▁" (U+2581): SentencePiece reads it as its space marker, run.c as three bytes.

    run.c is the faithful one here (it decodes back to the typed text); documented in native/README.
    """
    tok, text = files["tok"], "a\u2581b"
    assert tok.decode(tok.encode(text)) == "a b"
    c_ids = engine.encode(text, bos=False)
    assert [3 + b for b in "\u2581".encode()] == c_ids[1:4]
    assert engine.decode(c_ids) == text


def test_c_logits_equal_pytorch(engine, files):
    model, tok = files["model"], files["tok"]
    ids = tok.encode("Now is the winter of our discontent made glorious summer", bos=True)
    c_logits = engine.forward_logits(ids)
    with torch.no_grad():
        py_logits, _ = model(torch.tensor([ids]))
    py_logits = py_logits[0].numpy()
    assert c_logits.shape == py_logits.shape == (len(ids), 340) and c_logits.dtype == np.float32
    assert py_logits.std() > 0.5  # a meaningful comparison, not two vectors of near-zeros
    diff = np.abs(c_logits - py_logits).max()
    assert diff <= 1e-4, f"max |C - PyTorch| = {diff:.2e}"


def test_c_logits_over_the_whole_context(engine, files):
    model = files["model"]
    ids = torch.randint(0, 340, (96,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        py_logits, _ = model(ids[None])
    diff = np.abs(engine.forward_logits(ids) - py_logits[0].numpy()).max()
    assert diff <= 1e-4, f"max |C - PyTorch| = {diff:.2e}"


@pytest.mark.parametrize(
    "extras",
    [
        dict(qk_norm=True, logit_softcap=15.0),
        dict(tie_embeddings=False, pad_vocab_multiple=64, rope_theta=500.0, norm_eps=1e-6),
        dict(sliding_window=8, n_kv_heads=1),
    ],
    ids=["qknorm-softcap", "untied-padded-theta", "sliding-window-mqa"],
)
def test_c_logits_equal_pytorch_extended_format(files, tmp_path, extras):
    """Models that need our extended model.bin header (llama2.c's version 0 cannot describe them)."""
    if not HAVE_CC:
        pytest.skip("no C compiler")
    settings = dict(vocab_size=340, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    torch.manual_seed(1)
    model = LlamaLM(LlamaConfig(**{**settings, **extras})).eval()
    spread_weights(model)
    header = export_llama2c(model, tmp_path / "ext.bin")
    assert header.version == 1
    ids = torch.randint(0, 340, (32,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids[None])[0][0].numpy()
    with NativeEngine(tmp_path / "ext.bin", files["tok_bin"]) as e:
        diff = np.abs(e.forward_logits(ids) - expected).max()
    assert diff <= 1e-4, f"max |C - PyTorch| = {diff:.2e}"


def test_greedy_generation_equals_pytorch_greedy(engine, files):
    model, tok = files["model"], files["tok"]
    prompt = "KING HENRY:"
    out = engine.generate(prompt, steps=40, temperature=0.0)
    ids = tok.encode(prompt, bos=True)
    expected = []
    with torch.no_grad():
        while len(ids) < 40:
            logits, _ = model(torch.tensor([ids]))
            nxt = int(logits[0, -1].argmax())
            if nxt in (1, 2):  # run.c stops when the model ends the text
                break
            expected.append(nxt)
            ids.append(nxt)
    assert out.tokens == expected
    assert out.prompt == prompt and out.full_text == prompt + out.text
    assert out.full_text == engine.decode(tok.encode(prompt, bos=True) + out.tokens)
    assert out.tok_per_s > 0 and out.seconds > 0


def test_sampling_is_seeded(engine):
    a = engine.generate("Now is", steps=50, temperature=1.0, top_p=0.9, seed=123)
    b = engine.generate("Now is", steps=50, temperature=1.0, top_p=0.9, seed=123)
    c = engine.generate("Now is", steps=50, temperature=1.0, top_p=0.9, seed=124)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.tokens != c.tokens


def test_streaming_yields_the_same_text(engine):
    kwargs = dict(steps=60, temperature=1.0, top_p=0.95, seed=7)
    whole = engine.generate("Shall I", **kwargs)
    stream = engine.generate("Shall I", stream=True, **kwargs)
    assert isinstance(stream, NativeStream)
    pieces = list(stream)
    assert len(pieces) > 3 and "".join(pieces) == whole.text
    assert list(stream) == []  # consumed: a second loop ends at once
    assert stream.result.tokens == whole.tokens
    seen = []
    via_callback = engine.generate("Shall I", stream=seen.append, **kwargs)
    assert "".join(seen) == whole.text == via_callback.text


def test_stream_can_be_left_early(engine):
    stream = engine.generate("Shall I", steps=60, temperature=1.0, seed=7, stream=True)
    for _ in stream:
        break
    # the engine is free again afterwards
    assert len(engine.generate("Shall I", steps=10, temperature=0.0).tokens) > 0


def test_callback_errors_propagate(engine):
    def boom(piece):
        raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        # greedy, so the run is the same every time (a sampled run could end on EOS before any piece)
        engine.generate("Now", steps=10, temperature=0.0, stream=boom)


def test_bad_arguments(engine, files):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.forward_logits([1, 340])
    with pytest.raises(ValueError, match="do not fit the model's context of 96"):
        engine.forward_logits([5] * 97)
    with pytest.raises(ValueError, match="non-empty"):
        engine.forward_logits([])
    with pytest.raises(ValueError, match="temperature"):
        engine.generate("x", temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate("x", top_p=0)
    with pytest.raises(ValueError, match="NUL"):
        engine.encode("a\0b")
    with pytest.raises(RuntimeError, match="shorten the prompt"):
        engine.generate(CORPUS[:400], steps=20)
    with NativeEngine(files["bin"]) as no_tok:
        assert no_tok.forward_logits([1, 5]).shape == (2, 340)
        with pytest.raises(RuntimeError, match="tokenizer_path"):
            no_tok.encode("hello")
    closed = NativeEngine(files["bin"])
    closed.close()
    closed.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        closed.forward_logits([1])


def test_corrupt_or_mismatched_files(files, tmp_path):
    if not HAVE_CC:
        pytest.skip("no C compiler")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(files["bin"].read_bytes()[:-100])
    with pytest.raises(ValueError, match="run.c could not open"):
        NativeEngine(bad)
    other_sp = train_sentencepiece(CORPUS, vocab_size=330, model_prefix=tmp_path / "other")
    other_bin = export_tokenizer_bin(other_sp, tmp_path / "other.bin")
    with pytest.raises(ValueError, match="vocab_size"):
        NativeEngine(files["bin"], other_bin)


@needs_cc
def test_standalone_binary_prints_the_same_text(files, engine):
    binary = build_binary()
    assert binary.is_file() and build_binary() == binary
    proc = run_binary(files["bin"], files["tok_bin"], "Now is", steps=30, temperature=0.0)
    out = engine.generate("Now is", steps=30, temperature=0.0)
    printed = proc.stdout.decode("utf-8", errors="replace")

    def visible(ch: str) -> bool:  # the program skips lone ASCII control bytes (terminal safety)
        return ch >= "\x80" or " " <= ch < "\x7f" or ch in "\t\n\v\f\r"

    expected = "".join(ch for ch in out.full_text if visible(ch))
    assert printed.rstrip("\n") == expected.rstrip("\n")
    assert b"tok/s" in proc.stderr
