"""native/run.c against PyTorch: logits, greedy generation, tokenizer, and every kind of bad input.

The engine is compiled here with the system C compiler (cached by source hash under native/build)
in three variants: the fast build (-O3 -march=native when accepted), the portable build (-O3) and
the plain-C build (-DRUN_NO_VECTORS, what compilers without vector extensions get). The library
build (-DRUN_LIBRARY) is driven through a few lines of ctypes; the command-line program through
subprocess.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

from tiny_transformer.export import (
    export_llama2c,
    load_llama2c,
    quantize_input_q8_0,
    read_llama2c_header,
)
from tiny_transformer.model import LlamaConfig, LlamaLM
from tiny_transformer.native_bench import (
    BENCH_CONFIGS,
    best_flags,
    compile_c,
    find_cc,
    flops_per_token,
    kv_bytes_per_token,
    native_dir,
    run_benchmark,
    weights_per_token,
    write_plain_tokenizer,
)

try:
    find_cc()
except RuntimeError:
    pytest.skip("no C compiler on this machine", allow_module_level=True)

RUN_C = native_dir() / "run.c"
BUILDS = {
    "fast": best_flags(),
    "portable": ["-O3"],
    "plain-c": ["-O2", "-DRUN_NO_VECTORS"],
}


# ----------------------------------------------------------------------------------------------
# ctypes view of the C API


class CEngine:
    """The C API of run.c (library build) seen through ctypes; closes itself on exit."""

    def __init__(self, lib, model, tokenizer=None):
        self.lib = lib
        self.err = ctypes.create_string_buffer(512)
        self.handle = lib.tt_open(str(model).encode(), str(tokenizer).encode() if tokenizer else None,
                                  self.err, 512)
        if not self.handle:
            raise ValueError(self.err.value.decode())
        cfg = (ctypes.c_int * 7)()
        assert lib.tt_config(self.handle, cfg) == 0
        self.dim, self.hidden, self.layers, self.heads, self.kv_heads, self.vocab, self.seq_len = cfg

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lib.tt_close(self.handle)

    def logits(self, tokens) -> np.ndarray:
        ids = (ctypes.c_int * len(tokens))(*tokens)
        out = np.zeros((len(tokens), self.vocab), dtype=np.float32)
        r = self.lib.tt_forward_all(self.handle, ids, len(tokens), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                    self.err, 512)
        if r != 0:
            raise ValueError(self.err.value.decode())
        return out

    def encode(self, text: str, bos=False, eos=False, capacity=None) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 3 if capacity is None else capacity
        out = (ctypes.c_int * max(cap, 1))()
        n = self.lib.tt_encode(self.handle, raw, int(bos), int(eos), out, cap, self.err, 512)
        if n < 0:
            raise ValueError(self.err.value.decode())
        return list(out[:n])

    def decode(self, prev: int, token: int) -> bytes:
        return self.lib.tt_decode_piece(self.handle, prev, token)

    def generate(self, prompt, steps, temperature=0.0, topp=0.9, seed=1):
        pieces = []
        callback = PIECE_FN(lambda piece, user: pieces.append(piece))
        out = (ctypes.c_int * max(steps, 1))()
        tps = ctypes.c_double()
        n = self.lib.tt_generate(self.handle, prompt.encode() if prompt is not None else None, steps, temperature,
                                 topp, seed, callback, None, out, steps, ctypes.byref(tps), self.err, 512)
        if n < 0:
            raise ValueError(self.err.value.decode())
        return list(out[:n]), b"".join(pieces), tps.value


PIECE_FN = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)


def load_library(flags):
    path = compile_c(RUN_C, "librun-test", [*flags, "-DRUN_LIBRARY", "-shared", "-fPIC"])
    lib = ctypes.CDLL(str(path))
    c_int, c_float, c_char_p, c_void_p = ctypes.c_int, ctypes.c_float, ctypes.c_char_p, ctypes.c_void_p
    p_int = ctypes.POINTER(c_int)
    lib.tt_open.restype = c_void_p
    lib.tt_open.argtypes = [c_char_p, c_char_p, c_char_p, c_int]
    lib.tt_close.argtypes = [c_void_p]
    lib.tt_config.argtypes = [c_void_p, p_int]
    lib.tt_forward_all.argtypes = [c_void_p, p_int, c_int, ctypes.POINTER(c_float), c_char_p, c_int]
    lib.tt_encode.argtypes = [c_void_p, c_char_p, c_int, c_int, p_int, c_int, c_char_p, c_int]
    lib.tt_decode_piece.restype = c_char_p
    lib.tt_decode_piece.argtypes = [c_void_p, c_int, c_int]
    lib.tt_generate.argtypes = [c_void_p, c_char_p, c_int, c_float, c_float, ctypes.c_ulonglong, PIECE_FN, c_void_p,
                                p_int, c_int, ctypes.POINTER(ctypes.c_double), c_char_p, c_int]
    return lib


@pytest.fixture(scope="module", params=list(BUILDS))
def lib(request):
    return load_library(BUILDS[request.param])


@pytest.fixture(scope="module")
def fast_lib():
    return load_library(BUILDS["fast"])


@pytest.fixture(scope="module")
def run_exe():
    return compile_c(RUN_C, "run-test", ["-Wall", *BUILDS["fast"]])


def run_cli(exe, *args, stdin=None):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, timeout=120,
                          stdin=subprocess.DEVNULL if stdin is None else None, input=stdin)


# ----------------------------------------------------------------------------------------------
# Models


def random_model(seed=0, zero_stop_rows=False, **overrides) -> LlamaLM:
    cfg = dict(vocab_size=300, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=80, max_seq_len=64)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init: logits spread over several units
            p.add_(torch.randn_like(p) * 0.08)
        if zero_stop_rows:
            # BOS/EOS logits become exactly 0, so greedy decoding (a positive logit wins) never stops
            model.output.weight[1:3].zero_()
    return model


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0].numpy()


CONFIGS = {
    "gqa-tied-v0": dict(),
    "mqa": dict(n_kv_heads=1),
    "untied-v0": dict(tie_embeddings=False),
    "padded-head": dict(tie_embeddings=False, pad_vocab_multiple=128),
    "qk-norm": dict(qk_norm=True),
    "softcap": dict(logit_softcap=3.0),
    "theta-eps": dict(rope_theta=500000.0, norm_eps=1e-6),
    "sliding-window": dict(sliding_window=7),
    "odd-sizes": dict(vocab_size=301, dim=40, n_heads=4, n_kv_heads=4, hidden_dim=75, max_seq_len=50),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_c_logits_match_pytorch(lib, tmp_path, name):
    model = random_model(**CONFIGS[name])
    path = tmp_path / "model.bin"
    export_llama2c(model, path)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, model.vocab_size, (model.max_seq_len,), generator=gen).tolist()
    with CEngine(lib, path) as engine:
        c = engine.logits(tokens)
    ref = torch_logits(model, tokens)
    assert c.shape == ref.shape
    assert np.abs(c - ref).max() <= 1e-4, f"{name}: max |C - PyTorch| = {np.abs(c - ref).max():.2e}"
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero numbers


def quantized_reference_logits(path, tokens, c_logits, margin=2e-4, tol=2e-5):
    """PyTorch's version of run.c's Q8_0/Q4_0 arithmetic: the dequantized weights, and every Linear
    input quantized like run.c's (`quantize_input_q8_0`), with rounding ties resolved the way C did.

    C and PyTorch compute the activations in float32 with different summation orders, so they differ
    in the last bits. That is harmless except for an entry whose scaled value x / scale lies within a
    hair of k + 1/2: there the two may round to different integers, which moves the logits by up to
    ~1e-2. Only such entries (within `margin` of a tie) may be rounded the other way here: at the
    first position whose logits differ from C's by more than `tol`, the near-tie entry at or before
    it (or the two) whose other rounding brings them closest is flipped, and so on (a position's logits
    depend on it and earlier positions only). Returns (logits, number of entries rounded the other way).
    """
    gs = read_llama2c_header(path).group_size
    model = load_llama2c(path)
    state = {"call": 0, "record": True, "flips": set()}
    ties = []  # (Linear call number, position, column) of near-tie entries

    def hook(module, args):
        x, call = args[0], state["call"]
        state["call"] += 1
        groups = x.float().reshape(*x.shape[:-1], -1, gs)
        scale = groups.abs().amax(-1, keepdim=True) / 127.0
        v = groups * torch.where(scale > 0, torch.reciprocal(scale), torch.zeros_like(scale))
        q = torch.round(v).clamp(-127, 127)
        if state["record"]:
            near = ((v - v.floor() - 0.5).abs() < margin).reshape(x.shape)[0]
            ties.extend((call, t, j) for t, j in near.nonzero().tolist())
        q = q.reshape(x.shape)
        if state["flips"]:
            other = torch.where(q == v.floor().reshape(x.shape), q + 1, q - 1)  # the other neighbour
            for c, t, j in state["flips"]:
                if c == call:
                    q[0, t, j] = other[0, t, j]
        quantized = (q.reshape(groups.shape) * scale).reshape(x.shape)
        assert state["flips"] or torch.equal(quantized, quantize_input_q8_0(x, gs))  # the library helper
        return (quantized,)

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(hook)

    def run(flips):
        state["call"], state["flips"] = 0, flips
        return torch_logits(model, tokens)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny forward passes: threads only get in each other's way
    try:
        reference = run(set())
        state["record"] = False
        flips = set()
        for _ in range(16):
            err = np.abs(reference - c_logits).max(-1)
            t = int(np.argmax(err > tol))
            if err[t] <= tol:
                break
            candidates = [tie for tie in ties if tie[1] <= t and tie not in flips]
            trials = sorted((np.abs(run(flips | {tie})[t] - c_logits[t]).max(), tie) for tie in candidates)
            if trials and trials[0][0] > tol:  # no single entry explains it: two at once, among the best
                best = [tie for _, tie in trials[:8]]
                trials += [(np.abs(run(flips | {a, b})[t] - c_logits[t]).max(), a, b)
                           for i, a in enumerate(best) for b in best[i + 1:]]
            if not trials or min(trials)[0] >= err[t]:
                break  # no near-tie explains the difference: leave it to the caller's assertion
            flips.update(min(trials)[1:])
            reference = run(flips)
    finally:
        torch.set_num_threads(threads)
    return reference, len(flips)


@pytest.mark.parametrize("name", ["gqa-tied-v0", "padded-head", "qk-norm"])
def test_q8_0_logits(lib, tmp_path, name):
    """Q8_0 in C (int8 weights times int8 activations) equals PyTorch with the dequantized weights and
    the same quantized Linear inputs (1e-4, rounding ties aside), and stays within 5% of the largest
    fp32 logit of the unquantized model (the stated int8 tolerance for these models) with >= 90% of
    the argmaxes unchanged."""
    check_quantized_logits(lib, tmp_path, name)


# The 256-bit kernel (AVX-VNNI without AVX-512), which this machine can run if its CPU has AVX-VNNI.
AVX_VNNI_FLAGS = ["-O3", "-mavx2", "-mfma", "-mavxvnni"]


def cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


@pytest.mark.parametrize("name", ["gqa-tied-v0", "padded-head", "qk-norm", "mqa"])
def test_q4_0_logits(lib, tmp_path, name):
    """Q4_0 in C (4-bit weights times int8 activations) equals PyTorch with the dequantized weights
    and the same quantized Linear inputs (1e-4, rounding ties aside). Against the unquantized model
    4 bits cost much more than 8 on these random-weight models, whose logits all lie close together
    (30% of the largest logit, >= 60% same argmax; for a trained model see native/README.md)."""
    check_quantized_logits(lib, tmp_path, name, "q4_0", group_size=8, max_deviation=0.3, min_agreement=0.6)


def test_quantized_logits_with_the_avx_vnni_kernels(tmp_path):
    if not cpu_has("avx_vnni"):
        pytest.skip("this CPU has no AVX-VNNI")
    try:
        lib = load_library(AVX_VNNI_FLAGS)
    except RuntimeError:
        pytest.skip("this compiler does not know -mavxvnni")
    check_quantized_logits(lib, tmp_path, "gqa-tied-v0")
    check_quantized_logits(lib, tmp_path, "mqa", "q4_0", group_size=8, max_deviation=0.3, min_agreement=0.6)


@pytest.mark.parametrize("build", [*BUILDS, "avx-vnni"])
def test_quantized_kernels_give_exact_integer_sums(build):
    """native/bench/kernels.c check: the build's Q8_0 and Q4_0 kernels (AVX-512 VNNI, AVX-VNNI or
    plain C) against 64-bit integer arithmetic, bit for bit, on every group size and panel remainder,
    the whole range of weights included; input quantization against its rule (zeros, inf, NaN, tiny
    values); the embedding rows."""
    flags = BUILDS.get(build, AVX_VNNI_FLAGS)
    if build == "avx-vnni" and not cpu_has("avx_vnni"):
        pytest.skip("this CPU has no AVX-VNNI")
    try:
        exe = compile_c(native_dir() / "bench" / "kernels.c", "kernels-check", ["-Wall", *flags], depends=[RUN_C])
    except RuntimeError:
        if build == "avx-vnni":
            pytest.skip("this compiler does not know -mavxvnni")
        raise
    proc = subprocess.run([str(exe), "check"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("check ok"), proc.stdout + proc.stderr[-2000:]


def check_quantized_logits(lib, tmp_path, name, quantize="q8_0", group_size=16, max_deviation=0.05,
                           min_agreement=0.9):
    model = random_model(**CONFIGS[name])
    path = tmp_path / f"{quantize}.bin"
    export_llama2c(model, path, quantize=quantize, group_size=group_size)
    tokens = torch.randint(0, model.vocab_size, (48,), generator=torch.Generator().manual_seed(2)).tolist()
    with CEngine(lib, path) as engine:
        c = engine.logits(tokens)
    reference, flipped = quantized_reference_logits(path, tokens, c)
    assert np.abs(c - reference).max() <= 1e-4, f"max |C - reference| = {np.abs(c - reference).max():.2e}"
    assert flipped <= 8  # a handful of ties among ~24,000 quantized entries
    fp32 = torch_logits(model, tokens)
    assert np.abs(c - fp32).max() <= max_deviation * np.abs(fp32).max()
    assert (c.argmax(-1) == fp32.argmax(-1)).mean() >= min_agreement


def test_hand_written_v0_file_runs_in_c_like_in_pytorch(fast_lib, tmp_path):
    """llama2.c byte compatibility: a file written from the format description alone."""
    rng = np.random.default_rng(0)
    dim, hidden, layers, heads, kv_heads, vocab, seq = 16, 40, 2, 4, 2, 50, 12
    hs, kv_dim = dim // heads, dim // heads * kv_heads
    shapes = [(vocab, dim), (layers, dim), (layers, dim, dim), (layers, kv_dim, dim), (layers, kv_dim, dim),
              (layers, dim, dim), (layers, dim), (layers, hidden, dim), (layers, dim, hidden),
              (layers, hidden, dim), (dim,), (seq, hs // 2), (seq, hs // 2), (vocab, dim)]
    path = tmp_path / "hand.bin"
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, -vocab, seq))
        for i, shape in enumerate(shapes):
            norm = i in (1, 6, 10)
            f.write((rng.standard_normal(shape) * (0.2 if norm else 0.4) + (1.0 if norm else 0.0)).astype("<f4").tobytes())
    tokens = list(range(0, 50, 5)) + [3, 3]
    with CEngine(fast_lib, path) as engine:
        assert (engine.dim, engine.vocab, engine.seq_len) == (16, 50, 12)
        c = engine.logits(tokens)
    assert np.abs(c - torch_logits(load_llama2c(path), tokens)).max() <= 1e-4


# ----------------------------------------------------------------------------------------------
# Generation through the command-line program


def piece_bytes(i: int, printed: bool = True) -> bytes:
    """The text of id i with the tokenizer of write_plain_tokenizer: raw (as the library streams
    it) or as the command line prints it, which skips lone control bytes (C's isprint/isspace)."""
    if 3 <= i < 259:
        b = i - 3
        visible = b >= 0x80 or 0x20 <= b < 0x7F or b in b" \t\n\v\f\r"
        return bytes([b]) if visible or not printed else b""
    return {259: b" "}.get(i, f"t{i}".encode()) if i >= 259 else b""


@pytest.mark.parametrize("variant", ["v0-untied", "ext-qknorm-softcap"])
def test_greedy_generation_matches_pytorch_for_200_steps(run_exe, tmp_path, variant):
    # Untied heads: with tied weights a random model soon repeats one token, a weak comparison.
    overrides = dict(max_seq_len=256, tie_embeddings=False)
    if variant != "v0-untied":
        overrides.update(qk_norm=True, logit_softcap=20.0, n_kv_heads=3)
    model = random_model(seed=7, zero_stop_rows=True, **overrides)
    path, tok = tmp_path / "model.bin", write_plain_tokenizer(tmp_path / "tok.bin", 300)
    export_llama2c(model, path)
    proc = run_cli(run_exe, path, "-z", tok, "-t", "0", "-n", 201, "-v", 1)
    assert proc.returncode == 0, proc.stderr.decode()
    stderr = proc.stderr.decode()
    assert "achieved tok/s:" in stderr
    c_ids = [int(t) for t in stderr.split("generated tokens:")[1].split()]

    # PyTorch's greedy sequence equals C's exactly when, fed C's sequence, its argmax at every
    # position is C's next token (by induction over the steps): one forward pass checks all 200.
    assert len(c_ids) == 200
    expected = torch_logits(model, [1] + c_ids[:-1]).argmax(-1).tolist()
    assert c_ids == expected
    assert len(set(c_ids)) > 30  # a varied sequence, not one token repeated
    assert proc.stdout == b"".join(piece_bytes(i) for i in c_ids) + b"\n"


def test_sampling_is_reproducible_with_a_seed(run_exe, tmp_path):
    model = random_model(zero_stop_rows=True)
    path, tok = tmp_path / "model.bin", write_plain_tokenizer(tmp_path / "tok.bin", 300)
    export_llama2c(model, path)
    runs = [run_cli(run_exe, path, "-z", tok, "-t", "1.0", "-p", "0.9", "-s", seed, "-n", 60, "-i", "ab")
            for seed in (7, 7, 8)]
    assert all(r.returncode == 0 for r in runs)
    assert runs[0].stdout == runs[1].stdout != runs[2].stdout
    assert runs[0].stdout.startswith(b"ab")  # the prompt is echoed (dummy-prefix space removed)


def test_library_generate_streams_new_pieces_only(fast_lib, tmp_path):
    model = random_model(zero_stop_rows=True)
    path, tok = tmp_path / "model.bin", write_plain_tokenizer(tmp_path / "tok.bin", 300)
    export_llama2c(model, path)
    with CEngine(fast_lib, path, tok) as engine:
        ids, text, tps = engine.generate("ab", steps=30, temperature=0.0)
        assert len(ids) == 30 - len(engine.encode("ab", bos=True))
        assert text == b"".join(piece_bytes(i, printed=False) for i in ids) and tps > 0
        again, text2, _ = engine.generate("ab", steps=30, temperature=0.7, seed=3)
        assert engine.generate("ab", steps=30, temperature=0.7, seed=3)[0] == again
        with pytest.raises(ValueError, match="temperature"):
            engine.generate("ab", 10, temperature=-1.0)
        with pytest.raises(ValueError, match="top-p"):
            engine.generate("ab", 10, topp=0.0)
        with pytest.raises(ValueError, match="leaves no room to generate"):
            engine.generate("ab" * 40, 10)


def test_chat_mode_runs_with_system_prompt(run_exe, tmp_path):
    model = random_model(max_seq_len=128)
    path, tok = tmp_path / "model.bin", write_plain_tokenizer(tmp_path / "tok.bin", 300)
    export_llama2c(model, path)
    proc = run_cli(run_exe, path, "-z", tok, "-m", "chat", "-i", "hi", "-y", "be brief", "-n", 100, "-s", 1)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.startswith(b"Assistant: ")
    proc = run_cli(run_exe, path, "-z", tok, "-m", "chat", "-n", 100, stdin=b"")  # asks, then input ends
    assert proc.returncode == 0 and b"Enter system prompt" in proc.stdout


# ----------------------------------------------------------------------------------------------
# Tokenizer


def write_tokenizer(path, pieces, scores=None, max_len=None):
    pieces = [p.encode("utf-8") if isinstance(p, str) else p for p in pieces]
    scores = scores or [0.0] * len(pieces)
    with open(path, "wb") as f:
        f.write(struct.pack("<I", max_len if max_len is not None else max(len(p) for p in pieces)))
        for piece, score in zip(pieces, scores):
            f.write(struct.pack("<fi", score, len(piece)) + piece)
    return path


SMALL = ["<unk>", "\n<s>\n", "\n</s>\n", " ", "a", "b", "c", "ab", "abc", " a", "bc", " abc"]
SMALL_SCORES = [0, 0, 0, 0, 0, 0, 0, 5.0, 3.0, 1.0, 4.0, 2.0]


def test_bpe_merges_by_score_with_dummy_prefix(fast_lib, tmp_path):
    model = random_model(vocab_size=len(SMALL))
    path = tmp_path / "m.bin"
    export_llama2c(model, path)
    tok = write_tokenizer(tmp_path / "tok.bin", SMALL, SMALL_SCORES)
    idx = {p: i for i, p in enumerate(SMALL)}
    with CEngine(fast_lib, path, tok) as engine:
        # " abc": "ab" (5) merges first, then "abc" (3); " abc" (2) merges last
        assert engine.encode("abc") == [idx[" abc"]]
        assert engine.encode("abc", bos=True, eos=True) == [1, idx[" abc"], 2]
        assert engine.encode("bc a") == [idx[" "], idx["bc"], idx[" a"]]
        assert engine.encode("") == [] and engine.encode("", bos=True) == [1]
        # no byte pieces in this vocabulary: an unknown character becomes <unk> (id 0), never a bad id
        assert engine.encode("azé") == [idx[" a"], 0, 0]
        assert engine.decode(1, idx[" abc"]) == b"abc"  # after BOS the dummy space is dropped
        assert engine.decode(idx["a"], idx[" abc"]) == b" abc"
        assert engine.decode(0, 10_000) == b"" and engine.decode(0, -1) == b""
        with pytest.raises(ValueError, match="output buffer holds 2 ids"):
            engine.encode("abcabc", capacity=2)


def test_byte_fallback_and_special_text(fast_lib, tmp_path):
    model = random_model(vocab_size=300)
    path = tmp_path / "m.bin"
    export_llama2c(model, path)
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(256)] + [" ", "a", "<", ">", "s", "<s>"]
    pieces += [f"x{i}" for i in range(300 - len(pieces))]
    tok = write_tokenizer(tmp_path / "tok.bin", pieces)
    with CEngine(fast_lib, path, tok) as engine:
        ids = engine.encode("aé")
        assert ids == [259, 260, 0xC3 + 3, 0xA9 + 3]  # " ", "a", then the two UTF-8 bytes of é
        assert engine.decode(260, 0xC3 + 3) == b"\xc3"
        # typed text never becomes a special or byte token, even if it spells one
        assert 1 not in engine.encode("\n<s>\n") and all(i >= 259 or i in (0xA + 3,) for i in engine.encode("<s>"))
        assert engine.encode("<0x41>")[1:] != [0x41 + 3]


# ----------------------------------------------------------------------------------------------
# Bad input: every failure exits non-zero with a message saying what is wrong


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("files")
    model = random_model(max_seq_len=32)
    export_llama2c(model, tmp / "v0.bin")
    export_llama2c(model, tmp / "ext.bin", version="ext")
    export_llama2c(model, tmp / "q8.bin", quantize="q8_0", group_size=16)
    export_llama2c(model, tmp / "q4.bin", quantize="q4_0", group_size=16)
    write_plain_tokenizer(tmp / "tok.bin", 300)
    return tmp


def patched(src, dst, offset, fmt, *values):
    data = bytearray(src.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    dst.write_bytes(bytes(data))
    return dst


def written(path, data: bytes):
    path.write_bytes(data)
    return path


BAD_MODELS = {
    "truncated": lambda f, d: written(d, f.read_bytes()[:-100]),
    "too long or corrupt": lambda f, d: written(d, f.read_bytes() + b"\0" * 8),
    "smaller than the smallest header": lambda f, d: written(d, b"\1\2\3"),
    "n_heads = 5 must be positive and divide dim = 48": lambda f, d: patched(f, d, 12, "<i", 5),
    "n_kv_heads = 4 must be positive and divide n_heads = 6": lambda f, d: patched(f, d, 16, "<i", 4),
    "head size dim/n_heads = 3 must be even": lambda f, d: patched(f, d, 0, "<ii", 18, 80),
    "dim = -48 is out of range": lambda f, d: patched(f, d, 0, "<i", -48),
    "seq_len = 0 is out of range": lambda f, d: patched(f, d, 24, "<i", 0),
    "hidden_dim = 2147483647 is out of range": lambda f, d: patched(f, d, 4, "<i", 2**31 - 1),
    "--version 1 or 2": lambda f, d: patched(f, d, 0, "<Ii", 0x616B3432, 1),
}


@pytest.mark.parametrize("message", list(BAD_MODELS))
def test_bad_model_files_are_refused_with_a_message(run_exe, files, tmp_path, message):
    bad = BAD_MODELS[message](files / "v0.bin", tmp_path / "bad.bin")
    proc = run_cli(run_exe, bad, "-z", files / "tok.bin", "-n", 4)
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert err.startswith("error: ") and message in err, err


BAD_EXT = {
    "format version 2": (4, "<i", 2),
    "reserved and must be zero": (100, "<B", 7),
    "unknown flags 0x10": (40, "<i", 16),
    "unknown weight type 5": (44, "<i", 5),
    "fp32 weights must have group_size 0": (48, "<i", 8),
    "rope_theta = 0 must be": (56, "<d", 0.0),
    "norm_eps = nan must lie in (0, 1)": (52, "<f", float("nan")),
    "logit_softcap = -1 must be finite": (64, "<f", -1.0),
    "sliding_window = -3 must be >= 0": (68, "<i", -3),
    "head_rows = 299 must lie in vocab_size": (36, "<i", 299),
}


@pytest.mark.parametrize("message", list(BAD_EXT))
def test_bad_extended_headers_are_refused(run_exe, files, tmp_path, message):
    offset, fmt, value = BAD_EXT[message]
    bad = patched(files / "ext.bin", tmp_path / "bad.bin", offset, fmt, value)
    proc = run_cli(run_exe, bad, "-z", files / "tok.bin", "-n", 4)
    assert proc.returncode != 0 and message in proc.stderr.decode(), proc.stderr.decode()


def test_bad_quantized_group_sizes_are_refused(run_exe, files, tmp_path):
    bad = patched(files / "q8.bin", tmp_path / "bad.bin", 48, "<i", 12)
    proc = run_cli(run_exe, bad, "-z", files / "tok.bin")
    assert proc.returncode != 0 and "Q8_0 group_size = 12 must divide dim = 48" in proc.stderr.decode()
    bad = patched(files / "q4.bin", tmp_path / "bad.bin", 48, "<i", 12)
    proc = run_cli(run_exe, bad, "-z", files / "tok.bin")
    assert proc.returncode != 0 and "Q4_0 group_size = 12 must be a multiple of 8" in proc.stderr.decode()
    bad = patched(files / "q4.bin", tmp_path / "bad.bin", 44, "<i", 1)  # the bytes of Q4_0, read as Q8_0
    proc = run_cli(run_exe, bad, "-z", files / "tok.bin")
    assert proc.returncode != 0 and "implies" in proc.stderr.decode() and "Q8_0" in proc.stderr.decode()


def test_bad_tokenizers_are_refused_with_a_message(run_exe, files, tmp_path):
    good = (files / "tok.bin").read_bytes()
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(256)]
    cases = {
        "tokenizer file ends after 259 pieces but the model has vocab_size = 300":
            write_tokenizer(tmp_path / "short.bin", pieces),
        "tokenizer has 301 pieces but the model has vocab_size = 300":
            written(tmp_path / "long.bin", good + struct.pack("<fi", 0.0, 2) + b"zz"),
        "piece 0 has length 5 outside 0..max_token_length (4)": write_tokenizer(
            tmp_path / "maxlen.bin", pieces + [f"t{i}" for i in range(41)], max_len=4),
        "piece 3 has a non-finite score": write_tokenizer(
            tmp_path / "nan.bin", pieces + [f"t{i}" for i in range(41)], [0, 0, 0, float("nan")] + [0] * 296),
        "max_token_length = 0 is out of range": written(tmp_path / "zero.bin", b"\0\0\0\0" + good[4:]),
        "truncated inside piece 299": written(tmp_path / "cut.bin", good[:-1]),
        "cannot open tokenizer file": tmp_path / "missing.bin",
    }
    for message, tok in cases.items():
        proc = run_cli(run_exe, files / "v0.bin", "-z", tok)
        err = proc.stderr.decode()
        assert proc.returncode != 0 and message in err, (message, err)


CLI_ERRORS = {
    ("-t", "-1"): "invalid -t '-1': temperature must be a number >= 0",
    ("-t", "hot"): "invalid -t 'hot'",
    ("-p", "0"): "invalid -p '0': top-p must be a number in (0, 1]",
    ("-p", "1.5"): "invalid -p '1.5'",
    ("-p", "nan"): "invalid -p 'nan'",
    ("-n", "-1"): "invalid -n '-1': steps must be an integer >= 0",
    ("-n", "12x"): "invalid -n '12x'",
    ("-s", "-3"): "invalid -s '-3': the seed must be an integer >= 0",
    ("-m", "talk"): "invalid -m 'talk': the mode must be generate or chat",
    ("-v", "2"): "invalid -v '2'",
    ("-x", "1"): "unknown option '-x'",
    ("-n",): "option -n needs a value",
    ("--steps", "3"): "unexpected argument '--steps'",
    ("-n", "4", "-i", "a b " * 10): "leaves no room to generate",
}


def test_bad_command_lines_are_refused(run_exe, files):
    for args, message in CLI_ERRORS.items():
        proc = run_cli(run_exe, files / "v0.bin", "-z", files / "tok.bin", *args)
        err = proc.stderr.decode()
        assert proc.returncode != 0 and message in err, (args, err)
    proc = run_cli(run_exe)
    assert proc.returncode != 0 and "no model file given" in proc.stderr.decode()
    proc = run_cli(run_exe, files / "v0.bin", "-z", files / "tok.bin", "-i", "x" * 70000)
    assert proc.returncode != 0 and "the limit is 65536 bytes" in proc.stderr.decode()
    proc = run_cli(run_exe, "-h")
    assert proc.returncode == 0 and b"Usage:" in proc.stdout


def test_steps_are_clamped_to_the_context(run_exe, files):
    proc = run_cli(run_exe, files / "v0.bin", "-z", files / "tok.bin", "-n", 100000, "-t", "0", "-v", 1)
    assert proc.returncode == 0
    generated = proc.stderr.decode().split("generated tokens:")[1].split()
    assert len(generated) <= 31  # seq_len 32, one position for BOS


def test_library_reports_errors_instead_of_exiting(fast_lib, files, tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes((files / "v0.bin").read_bytes()[:50])
    with pytest.raises(ValueError, match="truncated"):
        CEngine(fast_lib, bad)
    with pytest.raises(ValueError, match="tokenizer file ends after"):
        CEngine(fast_lib, files / "v0.bin", write_tokenizer(tmp_path / "t.bin", ["a", "b"]))
    with CEngine(fast_lib, files / "v0.bin") as engine:
        with pytest.raises(ValueError, match="token 300 at position 1 is outside the vocabulary"):
            engine.logits([1, 300])
        with pytest.raises(ValueError, match="pass 1..seq_len"):
            engine.logits(list(range(33)))
        with pytest.raises(ValueError, match="no tokenizer loaded"):
            engine.encode("hi")
        assert engine.decode(1, 5) == b""
        ids, text, _ = engine.generate(None, 8)  # no tokenizer: ids from BOS, no text
        assert len(ids) <= 7 and text == b""


# ----------------------------------------------------------------------------------------------
# Sanitizers, OpenMP and the benchmark


def sanitizer_flags_work() -> bool:
    try:
        compile_c(native_dir() / "bench" / "peak.c", "asan-probe", ["-O1", "-fsanitize=address,undefined"])
        return True
    except RuntimeError:
        return False


def test_cli_under_address_sanitizer(files, tmp_path):
    if not sanitizer_flags_work():
        pytest.skip("this compiler cannot build with -fsanitize=address,undefined")
    exe = compile_c(RUN_C, "run-asan-test", ["-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"])
    env = {**os.environ, "ASAN_OPTIONS": "abort_on_error=1:detect_leaks=1", "UBSAN_OPTIONS": "halt_on_error=1"}
    tok = files / "tok.bin"
    for args, code in [((files / "v0.bin", "-z", tok, "-n", 32, "-i", "héllo ab"), 0),
                       ((files / "q8.bin", "-z", tok, "-n", 32, "-t", 0.9, "-p", 0.5, "-s", 3), 0),
                       ((files / "q4.bin", "-z", tok, "-n", 32, "-t", 0.9, "-p", 0.5, "-s", 3), 0),
                       ((files / "ext.bin", "-z", tok, "-m", "chat", "-i", "hi", "-y", "sys"), 0),
                       ((files / "v0.bin", "-z", tok, "-p", 7), 1),
                       ((files / "v0.bin", "-z", files / "v0.bin"), 1)]:
        proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, timeout=120, env=env,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == code, proc.stderr.decode()[-2000:]
        assert b"Sanitizer" not in proc.stderr and b"runtime error" not in proc.stderr


def test_openmp_build_gives_the_same_logits(files, tmp_path):
    try:
        lib = load_library(["-O2", "-fopenmp"])
    except (RuntimeError, OSError):
        pytest.skip("this compiler has no OpenMP")
    single = load_library(BUILDS["portable"])
    tokens = list(range(1, 30))
    for path in (files / "v0.bin", files / "q8.bin", files / "q4.bin"):
        with CEngine(lib, path) as a, CEngine(single, path) as b:
            assert np.abs(a.logits(tokens) - b.logits(tokens)).max() <= 1e-5


def test_benchmark_formula_and_one_run(tmp_path):
    cfg = BENCH_CONFIGS["870K"]
    assert weights_per_token(cfg) == 4 * (4 * 128 * 128 + 3 * 352 * 128) + 512 * 128
    # attention adds 4 * dim * (pos + 1) per layer; averaged over 256 positions that is 4*128*128.5*4
    assert flops_per_token(cfg, 256) == pytest.approx(2 * weights_per_token(cfg) + 4 * 128 * 128.5 * 4)
    # keys and values of positions 0..pos, fp32, every layer: 128.5 positions on average
    assert kv_bytes_per_token(cfg, 256) == pytest.approx(4 * 2 * 128 * 4 * 128.5)
    rows = run_benchmark(models=("870K",), quantizations=(None,), repeats=1, verbose=False, workdir=tmp_path)
    (row,) = rows
    assert row["generated"] == 255 and row["cpu_tok_s"] > 0 and row["peak_gflops"] > 0
    assert 0 < row["percent_of_peak"] < 100 and 0 < row["kernel_percent_of_peak"] < 100
    assert shutil.which(find_cc().split()[0])
