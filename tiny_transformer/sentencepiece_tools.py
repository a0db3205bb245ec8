"""SentencePiece vocabularies: train one, load it, and export it as llama2.c's `tokenizer.bin`.

A character vocabulary (65 symbols for Tiny Shakespeare) makes every sequence long. A small BPE
vocabulary (e.g. 512 pieces) packs ~1.8 characters into each token, so the same context window sees
more text. This module wraps Google's `sentencepiece` library with settings that keep the C engine
(`native/run.c`) able to reproduce its tokenization exactly:

* BPE (`model_type="bpe"`): run.c merges adjacent pieces by score, which is what BPE encoding does.
* `byte_fallback=True`: any character missing from the vocabulary becomes its UTF-8 bytes, tokens
  `<0x00>`..`<0xFF>` at ids 3..258, so nothing ever maps to `<unk>`.
* ids unk=0, bos=1, eos=2 and no pad: run.c hard-codes BOS=1 and EOS=2.
* `normalization_rule_name="identity"` and `remove_extra_whitespaces=False`: the text is used as-is,
  so repeated, leading and trailing spaces survive (run.c does no normalisation either).

`tokenizer.bin` layout (llama2.c, little-endian): `uint32 max_token_length`, then for every id in
order `float32 score, int32 length, length bytes of UTF-8`. BOS/EOS are written as "\\n<s>\\n" and
"\\n</s>\\n", the whitespace marker "▁" (U+2581) as a plain space, byte pieces as the text "<0xNN>".
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

WHITESPACE_MARK = "\u2581"  # "▁": SentencePiece's visible stand-in for a space
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3  # byte b is token id b + 3 when byte fallback is on (after unk, bos, eos)
_MAX_PLAUSIBLE_TOKEN_LENGTH = 1 << 16

_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def _import_sentencepiece():
    try:
        import sentencepiece as spm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the 'sentencepiece' package is not installed; install it with "
            "`pip install sentencepiece` (or `pip install -e .[native]`)"
        ) from exc
    return spm


# ----------------------------------------------------------------------------------------------
# Training


def _read_text(text_or_path) -> str:
    """A `Path`, or a `str` naming an existing file, is read; any other `str` is the text itself."""
    if isinstance(text_or_path, os.PathLike):
        path = Path(text_or_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"training text {path} not found; for Tiny Shakespeare run "
                "`python -m tiny_transformer download` first, or pass the text itself as a str"
            )
        return path.read_text(encoding="utf-8")
    if not isinstance(text_or_path, str):
        raise TypeError(
            f"train_sentencepiece expects the text (str) or a path, got {type(text_or_path).__name__}"
        )
    looks_like_path = len(text_or_path) < 4096 and "\n" not in text_or_path
    if looks_like_path and os.path.isfile(text_or_path):
        return Path(text_or_path).read_text(encoding="utf-8")
    return text_or_path


def train_sentencepiece(
    text_or_path,
    vocab_size: int = 512,
    model_prefix: str | os.PathLike | None = None,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    *,
    character_coverage: float = 1.0,
    split_digits: bool = True,
    allow_whitespace_only_pieces: bool = True,
    add_dummy_prefix: bool = True,
    remove_extra_whitespaces: bool = False,
    num_threads: int = 1,
    verbose: bool = False,
    **options,
) -> Path:
    """Train a SentencePiece vocabulary on a text and write `<model_prefix>.model` and `.vocab`.

    Args:
        text_or_path: the training text, or a path to a UTF-8 file (a `Path`, or a `str` naming an
            existing file). SentencePiece learns from lines: each line is one "sentence".
        vocab_size: number of pieces, including unk/bos/eos and (with byte fallback) 256 bytes.
        model_prefix: where to write; default `data/tok<vocab_size>` (git-ignored).
        model_type: "bpe" (what run.c can reproduce), or "unigram"/"char"/"word" for experiments.
        byte_fallback: unknown characters become UTF-8 byte tokens instead of `<unk>`.
        character_coverage, split_digits, allow_whitespace_only_pieces, add_dummy_prefix,
        remove_extra_whitespaces: SentencePiece trainer options (see the module docstring).
        num_threads: 1 keeps training bit-for-bit reproducible (it takes well under a second for
            Tiny Shakespeare at 512 pieces).
        verbose: show SentencePiece's own training log.
        **options: any other `sentencepiece.SentencePieceTrainer` option, passed through.

    Returns:
        The path of the written `.model` file.
    """
    spm = _import_sentencepiece()
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 4:
        raise ValueError(f"vocab_size must be an integer >= 4, got {vocab_size!r}")
    text = _read_text(text_or_path)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(
            "cannot train a SentencePiece vocabulary on an empty text: pass the text itself "
            "(a str with at least one non-blank line) or a path to a non-empty file"
        )
    if character_coverage >= 1.0:
        # Every distinct character needs its own piece; check before SentencePiece does, so the
        # message can say how large the vocabulary must be.
        n_chars = len(set("".join(lines)) - {" "}) + 1  # the space is always a piece ("▁")
        required = 3 + (256 if byte_fallback else 0) + n_chars
        if vocab_size < required:
            raise ValueError(
                f"vocab_size={vocab_size} is too small for this text: it needs at least {required} "
                f"pieces (3 special + {256 if byte_fallback else 0} byte pieces + {n_chars} "
                "characters); increase vocab_size or lower character_coverage"
            )
    longest = max(len(line.encode("utf-8")) for line in lines)
    prefix = Path(model_prefix) if model_prefix is not None else _default_prefix(vocab_size)
    prefix.parent.mkdir(parents=True, exist_ok=True)

    settings = dict(
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        split_digits=split_digits,
        allow_whitespace_only_pieces=allow_whitespace_only_pieces,
        byte_fallback=byte_fallback,
        normalization_rule_name="identity",
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=remove_extra_whitespaces,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        # Use every line, in order, with no sampling: the same text always gives the same vocab.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=max(4192, longest + 1),
        num_threads=num_threads,
        minloglevel=0 if verbose else 2,
    )
    settings.update(options)
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, **settings)
    except RuntimeError as exc:
        message = str(exc)
        too_high = re.search(r"Vocabulary size too high \((\d+)\).*?<= (\d+)", message)
        if too_high:
            raise ValueError(
                f"vocab_size={too_high.group(1)} is larger than this text supports: SentencePiece "
                f"can build at most {too_high.group(2)} pieces from it; lower vocab_size or use "
                "more text"
            ) from None
        raise ValueError(f"SentencePiece training failed: {message.strip()}") from None

    model_path = prefix.with_name(prefix.name + ".model")
    model_path.write_bytes(proto.getvalue())
    tokenizer = SentencePieceTokenizer(proto.getvalue())
    with open(prefix.with_name(prefix.name + ".vocab"), "w", encoding="utf-8") as f:
        for i in range(tokenizer.vocab_size):
            f.write(f"{tokenizer.id_to_piece(i)}\t{tokenizer.score(i):g}\n")
    return model_path


def _default_prefix(vocab_size: int) -> Path:
    from tiny_transformer.utils import data_dir

    return data_dir() / f"tok{vocab_size}"


# ----------------------------------------------------------------------------------------------
# Loading, and the tokenizer class the Trainer and generators use


def _read_proto_fields(buf: bytes):
    """Yield (field_number, wire_type, value) from one serialized protobuf message.

    A `.model` file is a protobuf `ModelProto`. Reading the few settings we check takes a dozen
    lines, so the `protobuf` package is not needed.
    """

    def varint(pos: int) -> tuple[int, int]:
        result = shift = 0
        while True:
            if pos >= len(buf):
                raise ValueError("truncated protobuf varint")
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return result, pos

    pos = 0
    while pos < len(buf):
        key, pos = varint(pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(pos)
        elif wire == 2:
            size, pos = varint(pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _submessage(buf: bytes, number: int) -> bytes:
    return b"".join(v for n, w, v in _read_proto_fields(buf) if n == number and w == 2)


def _varints(buf: bytes) -> dict[int, int]:
    return {n: v for n, w, v in _read_proto_fields(buf) if w == 0}


class SentencePieceTokenizer:
    """A trained SentencePiece model with the same interface as `CharTokenizer`.

    `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `vocab`, `save`/`load`,
    `to_dict`/`from_dict` (checkpoints store the serialized model, so a checkpoint is self-contained).

        >>> tok = SentencePieceTokenizer.train(text, vocab_size=512)   # doctest: +SKIP
        >>> tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"  # doctest: +SKIP
        True
    """

    def __init__(self, model_proto: bytes):
        spm = _import_sentencepiece()
        if not isinstance(model_proto, bytes | bytearray) or not model_proto:
            raise ValueError("SentencePieceTokenizer needs the bytes of a .model file")
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_proto)
        except RuntimeError:
            raise ValueError(
                "these bytes are not a SentencePiece model (the .model file is corrupt or of "
                "another kind); train one with train_sentencepiece(...)"
            ) from None

    # construction -----------------------------------------------------------------------------
    @classmethod
    def train(cls, text_or_path, vocab_size: int = 512, **kwargs) -> SentencePieceTokenizer:
        """Train a vocabulary (see `train_sentencepiece`) and return it as a tokenizer."""
        return cls.load(train_sentencepiece(text_or_path, vocab_size, **kwargs))

    @classmethod
    def load(cls, path) -> SentencePieceTokenizer:
        """Load a `.model` file written by `train_sentencepiece` (or by SentencePiece itself)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"SentencePiece model {path} not found; train one with "
                "tiny_transformer.sentencepiece_tools.train_sentencepiece(text, vocab_size=512)"
            )
        try:
            return cls(path.read_bytes())
        except ValueError:
            raise ValueError(
                f"{path} is not a SentencePiece .model file (corrupt or of another kind); "
                "train a new one with train_sentencepiece(...)"
            ) from None

    def save(self, path) -> Path:
        """Write the serialized model (a `.model` file SentencePiece itself can read)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.model_proto)
        return path

    def to_dict(self) -> dict:
        """A plain dict for checkpoints: `{"type": "sentencepiece", "model_proto": bytes}`."""
        return {"type": "sentencepiece", "model_proto": self.model_proto}

    @classmethod
    def from_dict(cls, d: dict) -> SentencePieceTokenizer:
        if not isinstance(d, dict) or d.get("type") != "sentencepiece" or "model_proto" not in d:
            raise ValueError(
                "not a SentencePiece tokenizer dict: expected {'type': 'sentencepiece', "
                "'model_proto': bytes} as written by SentencePieceTokenizer.to_dict()"
            )
        return cls(d["model_proto"])

    # vocabulary ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def vocab(self) -> list[str]:
        """All pieces in id order ("▁" marks a space, "<0x0A>" is the newline byte)."""
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def id_to_piece(self, i: int) -> str:
        self._check_ids([i])
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        """Id of a piece; unknown pieces give `unk_id`, as in SentencePiece."""
        return self.sp.piece_to_id(piece)

    def score(self, i: int) -> float:
        """The piece's score: BPE merge priority (higher merges first); 0 for special/byte pieces."""
        self._check_ids([i])
        return float(self.sp.get_score(int(i)))

    def is_byte(self, i: int) -> bool:
        return bool(self.sp.is_byte(int(i)))

    @property
    def settings(self) -> dict:
        """The trainer/normalizer settings that decide whether run.c can reproduce the encoding."""
        trainer = _varints(_submessage(self.model_proto, 2))
        normalizer = _varints(_submessage(self.model_proto, 3))
        return {
            "model_type": _MODEL_TYPES.get(trainer.get(3, 1), "unknown"),
            "byte_fallback": bool(trainer.get(35, 0)),
            "add_dummy_prefix": bool(normalizer.get(3, 1)),
            "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
        }

    # encode / decode ----------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` (optionally with BOS first / EOS last), like run.c's `encode`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.sp.encode(text) if text else []
        return ([self.bos_id] if bos else []) + list(ids) + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Text of a sequence of ids (a list, NumPy array or 1-D tensor). BOS/EOS print as nothing."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self.sp.decode(ids)

    def _check_ids(self, ids) -> None:
        n = self.vocab_size
        for pos, i in enumerate(ids):
            if not 0 <= int(i) < n:
                raise ValueError(
                    f"token id {i} at position {pos} is outside this vocabulary (0..{n - 1}); "
                    "was the model trained with a different tokenizer?"
                )

    def __eq__(self, other) -> bool:
        return isinstance(other, SentencePieceTokenizer) and other.model_proto == self.model_proto

    def __repr__(self) -> str:
        s = self.settings
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, model_type={s['model_type']!r})"


def load_sentencepiece(path) -> SentencePieceTokenizer:
    """Load a SentencePiece `.model` file as a `SentencePieceTokenizer`."""
    return SentencePieceTokenizer.load(path)


def _as_tokenizer(sp_model) -> SentencePieceTokenizer:
    if isinstance(sp_model, SentencePieceTokenizer):
        return sp_model
    if isinstance(sp_model, str | os.PathLike):
        return SentencePieceTokenizer.load(sp_model)
    raise TypeError(
        "expected a SentencePieceTokenizer or the path of a .model file, got "
        f"{type(sp_model).__name__}"
    )


# ----------------------------------------------------------------------------------------------
# llama2.c tokenizer.bin


def tokenizer_bin_pieces(sp_model) -> tuple[list[bytes], list[float]]:
    """The byte strings and scores that `tokenizer.bin` stores, in id order.

    This is where SentencePiece's conventions become run.c's: "▁" turns back into a space, and
    BOS/EOS get the texts "\\n<s>\\n" / "\\n</s>\\n" that llama2.c uses.
    """
    tok = _as_tokenizer(sp_model)
    pieces, scores = [], []
    for i in range(tok.vocab_size):
        if i == tok.bos_id:
            text = "\n<s>\n"
        elif i == tok.eos_id:
            text = "\n</s>\n"
        else:
            text = tok.id_to_piece(i).replace(WHITESPACE_MARK, " ")
        pieces.append(text.encode("utf-8"))
        scores.append(tok.score(i))
    return pieces, scores


def check_run_c_compatible(sp_model) -> list[str]:
    """Reasons why run.c's tokenizer would not reproduce this model's encoding (empty list: none).

    Hard requirements (BPE, ids 1/2 for BOS/EOS, byte pieces at ids 3..258) raise ValueError in
    `export_tokenizer_bin`; the soft ones returned here only change whitespace handling.
    """
    tok = _as_tokenizer(sp_model)
    s = tok.settings
    if s["model_type"] != "bpe":
        raise ValueError(
            f"this SentencePiece model is {s['model_type']!r}, but run.c encodes by merging pairs "
            "in score order, which only reproduces BPE; train with model_type='bpe'"
        )
    if tok.bos_id != BOS_ID or tok.eos_id != EOS_ID:
        raise ValueError(
            f"run.c expects BOS=1 and EOS=2 but this model has BOS={tok.bos_id}, EOS={tok.eos_id}; "
            "train with train_sentencepiece (it sets unk/bos/eos to 0/1/2)"
        )
    if tok.vocab_size < BYTE_OFFSET + 256 or not all(
        tok.is_byte(BYTE_OFFSET + b) and tok.id_to_piece(BYTE_OFFSET + b) == f"<0x{b:02X}>"
        for b in range(256)
    ):
        raise ValueError(
            "run.c maps unknown characters to byte tokens at ids 3..258, but this model has no "
            "byte pieces there; train with byte_fallback=True"
        )
    notes = []
    if s["remove_extra_whitespaces"]:
        notes.append(
            "the model collapses repeated spaces and strips leading/trailing ones "
            "(remove_extra_whitespaces=True) but run.c keeps them: texts with such spaces encode "
            "differently; train with remove_extra_whitespaces=False to match"
        )
    if not s["add_dummy_prefix"]:
        notes.append(
            "the model has add_dummy_prefix=False but run.c always prepends a space; train with "
            "add_dummy_prefix=True to match"
        )
    return notes


def export_tokenizer_bin(sp_model, out_path) -> Path:
    """Write llama2.c's `tokenizer.bin` for a SentencePiece model (path or tokenizer).

    Raises ValueError if run.c could not reproduce the model's tokenization (not BPE, wrong
    special ids, no byte fallback); warns about whitespace settings that only differ at the edges.
    """
    for note in check_run_c_compatible(sp_model):
        warnings.warn(note, stacklevel=2)
    pieces, scores = tokenizer_bin_pieces(sp_model)
    max_token_length = max(len(p) for p in pieces)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(struct.pack("<I", max_token_length))
        for piece, score in zip(pieces, scores):
            f.write(struct.pack("<fi", score, len(piece)))
            f.write(piece)
    return out_path


@dataclass
class TokenizerBin:
    """The contents of a `tokenizer.bin`: one byte string and one score per token id."""

    max_token_length: int
    pieces: list[bytes] = field(repr=False)
    scores: list[float] = field(repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def piece(self, i: int) -> str:
        """Piece `i` as text (invalid UTF-8, which byte-level pieces may hold, is replaced)."""
        return self.pieces[i].decode("utf-8", errors="replace")


def read_tokenizer_bin(path, vocab_size: int | None = None) -> TokenizerBin:
    """Read and validate a llama2.c `tokenizer.bin`.

    The file does not store its own token count (run.c takes it from model.bin), so by default
    records are read until the end of the file; pass `vocab_size` to require an exact count.
    Every length is checked against the header and the remaining file size before it is trusted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} not found; write one with "
            "export_tokenizer_bin('data/tok512.model', 'tokenizer.bin')"
        )
    data = path.read_bytes()
    hint = "is it a tokenizer.bin (and not a model.bin)? re-export it with export_tokenizer_bin"
    if len(data) < 4:
        raise ValueError(f"{path} is {len(data)} bytes, too short for a tokenizer.bin header; {hint}")
    (max_token_length,) = struct.unpack_from("<I", data, 0)
    if not 0 < max_token_length <= _MAX_PLAUSIBLE_TOKEN_LENGTH:
        raise ValueError(
            f"{path}: max_token_length={max_token_length} is implausible "
            f"(expected 1..{_MAX_PLAUSIBLE_TOKEN_LENGTH}); {hint}"
        )
    pos, pieces, scores = 4, [], []
    while pos < len(data) and (vocab_size is None or len(pieces) < vocab_size):
        i = len(pieces)
        if pos + 8 > len(data):
            raise ValueError(f"{path}: truncated record header for token {i} at byte {pos}; {hint}")
        score, length = struct.unpack_from("<fi", data, pos)
        pos += 8
        if not 0 <= length <= max_token_length:
            raise ValueError(
                f"{path}: token {i} claims length {length}, outside 0..{max_token_length} "
                f"(max_token_length); {hint}"
            )
        if pos + length > len(data):
            raise ValueError(f"{path}: token {i} runs past the end of the file; {hint}")
        if not math.isfinite(score):
            raise ValueError(f"{path}: token {i} has a non-finite score {score}; {hint}")
        pieces.append(data[pos : pos + length])
        scores.append(score)
        pos += length
    if not pieces:
        raise ValueError(f"{path} has a header but no tokens; {hint}")
    if vocab_size is not None and len(pieces) != vocab_size:
        raise ValueError(
            f"{path} holds {len(pieces)} tokens but the model expects vocab_size={vocab_size}; "
            "export the tokenizer that the model was trained with"
        )
    if pos != len(data):
        raise ValueError(
            f"{path} has {len(data) - pos} bytes after token {len(pieces) - 1}; the tokenizer has "
            f"more tokens than vocab_size={vocab_size}: export the tokenizer the model was trained with"
        )
    return TokenizerBin(max_token_length, pieces, scores)
