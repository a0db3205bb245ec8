"""SentencePiece training, the SentencePieceTokenizer, and llama2.c's tokenizer.bin format."""

from __future__ import annotations

import struct
import warnings

import pytest
import torch

from tiny_transformer.sentencepiece_tools import (
    SentencePieceTokenizer,
    check_run_c_compatible,
    export_tokenizer_bin,
    load_sentencepiece,
    read_tokenizer_bin,
    tokenizer_bin_pieces,
    train_sentencepiece,
)
from tiny_transformer.tokenizers import tokenizer_from_dict
from tiny_transformer.utils import data_dir

# A small corpus of our own: enough repeated words for BPE to learn merges like "▁the".
CORPUS = "\n".join(
    [
        "The quick brown fox jumps over the lazy dog.",
        "A tiny transformer reads the text one token at a time.",
        "Then the model predicts the next token, and the next, and the next.",
        "Attention lets every position look back at the positions before it.",
        "The king and the queen walked to the castle in 1603.",
        "  Two leading spaces, and three   inside, and a trailing one ",
        "Numbers like 42 and 2024 are split into digits.",
        "To be, or not to be: that is the question.",
    ]
    * 20
)

ROUND_TRIP_STRINGS = [
    "",
    "the",
    "The quick brown fox",
    "HAMLET:\nTo be, or not to be",
    " leading space",
    "trailing space ",
    "  two leading",
    "a   b",
    "\n",
    "\n\nstarts with newlines",
    "tabs\tand\rreturns",
    "caf\u00e9 na\u00efve \u00fcber",  # characters absent from the corpus -> byte fallback
    "\u6f22\u5b57 and emoji \U0001F600",
    "<0x41> <s> </s> <unk>",
    "digits 1234567890",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("sp") / "tok340"
    return train_sentencepiece(CORPUS, vocab_size=340, model_prefix=prefix)


@pytest.fixture(scope="module")
def tok(sp_model):
    return load_sentencepiece(sp_model)


# ---------------------------------------------------------------------------------------------
# training


def test_train_writes_model_and_vocab(sp_model, tok):
    assert sp_model.suffix == ".model" and sp_model.is_file()
    vocab_file = sp_model.with_suffix(".vocab")
    lines = vocab_file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 340 == tok.vocab_size == len(tok) == len(tok.vocab)
    assert lines[1].split("\t") == ["<s>", "0"]


def test_special_and_byte_ids(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab[:3] == ["<unk>", "<s>", "</s>"]
    assert tok.vocab[3] == "<0x00>" and tok.vocab[3 + 0x0A] == "<0x0A>" and tok.vocab[258] == "<0xFF>"
    assert all(tok.is_byte(i) for i in range(3, 259)) and not tok.is_byte(259)
    assert tok.settings == {
        "model_type": "bpe",
        "byte_fallback": True,
        "add_dummy_prefix": True,
        "remove_extra_whitespaces": False,
    }


def test_training_is_deterministic(sp_model, tmp_path):
    again = train_sentencepiece(CORPUS, vocab_size=340, model_prefix=tmp_path / "again")
    assert again.read_bytes() == sp_model.read_bytes()


def test_train_from_path_equals_train_from_text(sp_model, tmp_path):
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text(CORPUS, encoding="utf-8")
    from_path = train_sentencepiece(corpus_file, vocab_size=340, model_prefix=tmp_path / "p")
    from_str_path = train_sentencepiece(str(corpus_file), vocab_size=340, model_prefix=tmp_path / "s")
    assert from_path.read_bytes() == sp_model.read_bytes() == from_str_path.read_bytes()


def test_learns_frequent_words(tok):
    assert "\u2581the" in tok.vocab
    assert tok.encode("the") == [tok.piece_to_id("\u2581the")]
    # split_digits: every digit is its own piece
    pieces = [tok.id_to_piece(i) for i in tok.encode("2024")]
    assert pieces[-4:] == ["2", "0", "2", "4"]


def test_bad_training_input(tmp_path):
    with pytest.raises(ValueError, match="empty text"):
        train_sentencepiece("\n \n", vocab_size=340, model_prefix=tmp_path / "e")
    with pytest.raises(ValueError, match="too small.*at least 2"):
        train_sentencepiece("hello world", vocab_size=100, model_prefix=tmp_path / "s")
    with pytest.raises(ValueError, match="at most \\d+ pieces"):
        train_sentencepiece("hello world", vocab_size=400, model_prefix=tmp_path / "l")
    with pytest.raises(ValueError, match="vocab_size must be an integer"):
        train_sentencepiece("hello world", vocab_size=2.5, model_prefix=tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="download"):
        train_sentencepiece(tmp_path / "missing.txt", model_prefix=tmp_path / "m")
    with pytest.raises(ValueError, match="SentencePiece training failed"):
        train_sentencepiece(CORPUS, vocab_size=340, model_prefix=tmp_path / "x", no_such_option=1)


# ---------------------------------------------------------------------------------------------
# the tokenizer


@pytest.mark.parametrize("text", ROUND_TRIP_STRINGS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_bos_eos_and_byte_fallback(tok):
    assert tok.encode("") == [] and tok.encode("", bos=True, eos=True) == [1, 2]
    ids = tok.encode("\u00e9")  # é = C3 A9 in UTF-8, not in the corpus
    assert ids[-2:] == [3 + 0xC3, 3 + 0xA9]
    # a newline is never inside a piece (SentencePiece trains line by line): it is byte 0x0A
    assert [tok.id_to_piece(i) for i in tok.encode("a\nb")] == ["\u2581a", "<0x0A>", "b"]


def test_literal_whitespace_marker_reads_as_a_space(tok):
    """SentencePiece cannot tell a typed "▁" (U+2581) from its own space marker: it decodes as " "."""
    assert tok.decode(tok.encode("\u2581x")) == " x"


def test_decode_accepts_tensors_and_rejects_bad_ids(tok):
    ids = tok.encode("To be, or not to be")
    assert tok.decode(torch.tensor(ids)) == "To be, or not to be"
    with pytest.raises(ValueError, match="token id 340 at position 1"):
        tok.decode([5, 340])
    with pytest.raises(ValueError, match="outside this vocabulary"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(b"bytes")


def test_save_load_and_dict_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "copy.model")
    assert SentencePieceTokenizer.load(path) == tok
    d = tok.to_dict()
    assert d["type"] == "sentencepiece" and isinstance(d["model_proto"], bytes)
    assert tokenizer_from_dict(d) == tok
    # checkpoints hold the dict and are read back with weights_only=True
    torch.save({"tokenizer": d}, tmp_path / "ckpt.pt")
    restored = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    assert SentencePieceTokenizer.from_dict(restored).encode("the king") == tok.encode("the king")
    assert repr(tok) == "SentencePieceTokenizer(vocab_size=340, model_type='bpe')"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_sentencepiece"):
        load_sentencepiece(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="not a SentencePiece .model file"):
        load_sentencepiece(bad)
    with pytest.raises(ValueError, match="not a SentencePiece tokenizer dict"):
        SentencePieceTokenizer.from_dict({"type": "char", "chars": "ab"})


# ---------------------------------------------------------------------------------------------
# tokenizer.bin


def test_tokenizer_bin_layout_field_by_field(tok, sp_model, tmp_path):
    """Parse the file by hand against llama2.c's definition, independently of read_tokenizer_bin."""
    out = export_tokenizer_bin(sp_model, tmp_path / "tokenizer.bin")
    data = out.read_bytes()
    expected = []
    for i, piece in enumerate(tok.vocab):
        text = {1: "\n<s>\n", 2: "\n</s>\n"}.get(i, piece.replace("\u2581", " "))
        expected.append(text.encode("utf-8"))
    (max_len,) = struct.unpack_from("<I", data, 0)
    assert max_len == max(len(b) for b in expected)
    pos = 4
    for i, want in enumerate(expected):
        score, length = struct.unpack_from("<fi", data, pos)
        pos += 8
        assert length == len(want), i
        assert data[pos : pos + length] == want, i
        assert score == pytest.approx(tok.score(i), abs=0), i  # float32 holds these exactly
        pos += length
    assert pos == len(data) == 4 + sum(8 + len(b) for b in expected)
    # spot checks of the conventions
    assert expected[0] == b"<unk>" and expected[3 + 0x0A] == b"<0x0A>"
    assert b" the" in expected and not any("\u2581".encode() in b for b in expected)


def test_read_tokenizer_bin_round_trip(tok, tmp_path):
    path = export_tokenizer_bin(tok, tmp_path / "tokenizer.bin")
    tb = read_tokenizer_bin(path, vocab_size=340)
    pieces, scores = tokenizer_bin_pieces(tok)
    assert tb.vocab_size == 340 and tb.pieces == pieces and tb.scores == scores
    assert tb.piece(1) == "\n<s>\n" and tb.max_token_length == max(len(p) for p in pieces)
    assert read_tokenizer_bin(path).pieces == pieces  # count inferred from the file size


def test_read_tokenizer_bin_rejects_bad_files(tok, tmp_path):
    good = export_tokenizer_bin(tok, tmp_path / "tokenizer.bin").read_bytes()
    bad = tmp_path / "bad.bin"

    def check(data: bytes, match: str, **kw):
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=match):
            read_tokenizer_bin(bad, **kw)

    check(b"\x01\x00", "too short")
    check(struct.pack("<I", 0) + good[4:], "implausible")
    check(good + struct.pack("<fi", 0.0, 5) + b"ab", "token 340 runs past the end")
    check(good[:10], "truncated record header")
    check(good[:4], "no tokens")
    check(good, "holds 340 tokens but the model expects vocab_size=512", vocab_size=512)
    check(good, "bytes after token 99", vocab_size=100)
    longer = bytearray(good)
    struct.pack_into("<i", longer, 8, 1000)  # token 0's length > max_token_length
    check(bytes(longer), "token 0 claims length 1000")
    nan = bytearray(good)
    struct.pack_into("<f", nan, 4, float("nan"))
    check(bytes(nan), "non-finite score")
    # a llama2.c model.bin header (7 int32: dim 64, hidden 172, ...) is not a tokenizer
    check(struct.pack("<7i", 64, 172, 2, 4, 4, 300, 64) + bytes(64), "is it a tokenizer.bin")
    with pytest.raises(FileNotFoundError, match="export_tokenizer_bin"):
        read_tokenizer_bin(tmp_path / "missing.bin")


def test_export_refuses_what_run_c_cannot_reproduce(tmp_path):
    unigram = train_sentencepiece(CORPUS, 340, tmp_path / "uni", model_type="unigram")
    with pytest.raises(ValueError, match="model_type='bpe'"):
        export_tokenizer_bin(unigram, tmp_path / "u.bin")
    no_bytes = train_sentencepiece(CORPUS, 60, tmp_path / "nob", byte_fallback=False)
    with pytest.raises(ValueError, match="byte_fallback=True"):
        export_tokenizer_bin(no_bytes, tmp_path / "n.bin")
    collapsing = train_sentencepiece(CORPUS, 340, tmp_path / "col", remove_extra_whitespaces=True)
    assert any("remove_extra_whitespaces" in n for n in check_run_c_compatible(collapsing))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_tokenizer_bin(collapsing, tmp_path / "c.bin")
    assert any("remove_extra_whitespaces" in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------
# Tiny Shakespeare with the capstone's 512 vocabulary


def test_tiny_shakespeare_512(tmp_path):
    path = data_dir() / "tiny_shakespeare.txt"
    if not path.is_file():
        pytest.skip("data/tiny_shakespeare.txt missing: run data/download_shakespeare.sh first")
    text = path.read_text(encoding="utf-8")
    tok = SentencePieceTokenizer.train(path, vocab_size=512, model_prefix=tmp_path / "tok512")
    assert tok.vocab_size == 512
    sample = text[:20_000]
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    # 512 pieces pack well over 1.5 characters into a token (a char vocab packs exactly 1)
    assert len(sample) / len(ids) > 1.5
    assert {"\u2581the", "\u2581and", "ING"} <= set(tok.vocab)
    tb = read_tokenizer_bin(export_tokenizer_bin(tok, tmp_path / "tok512.bin"), vocab_size=512)
    assert tb.pieces[tok.piece_to_id("\u2581the")] == b" the"
