"""Export a Llama-style model to the files the C engine `native/run.c` runs (llama2.c's `model.bin`).

    >>> from tiny_transformer.export import export_llama2c, load_llama2c
    >>> info = export_llama2c(model, "model.bin")            # doctest: +SKIP
    >>> same = load_llama2c("model.bin")                     # back into PyTorch

Two layouts exist. Both store every number little-endian, and matrices row-major in PyTorch's
`nn.Linear` orientation (out_features, in_features).

**llama2.c version 0** ("legacy", byte compatible with llama2.c's `run.c`): a 28-byte header of 7 int32
`dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len` (a negative vocab_size means the
classifier is stored separately: untied weights), then fp32 arrays, layers stacked::

    token_embedding (vocab, dim)       rms_att (L, dim)
    wq (L, dim, dim)                   wk (L, kv_dim, dim)        wv (L, kv_dim, dim)
    wo (L, dim, dim)                   rms_ffn (L, dim)
    w1 (L, hidden, dim)                w2 (L, dim, hidden)        w3 (L, hidden, dim)
    rms_final (dim)                    freq_cis_real (seq_len, hs/2)   freq_cis_imag (seq_len, hs/2)
    classifier (vocab, dim)            -- only when untied

with head size hs = dim / n_heads and kv_dim = n_kv_heads * hs. The format fixes RMSNorm eps = 1e-5
and RoPE theta = 10000 and has no room for anything else.

**Extended format, version 1** (ours): a fixed 256-byte header, then the same arrays in the same order
except that the RoPE tables are left out (the reader computes them), QK-norm weights follow wv, and the
matrices may be quantized to 8 or 4 bits::

    offset  type     field
    0       uint32   magic 0x8D4C5454 (bytes "TTL\\x8d"; read as llama2.c's int32 dim it is negative,
                     so a version-0 reader refuses the file instead of misreading it)
    4       int32    version = 1
    8       int32    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len (7 values)
    36      int32    head_rows: classifier rows, >= vocab_size (padding rows are never used)
    40      int32    flags: 1 = classifier shared with the embedding (tied), 2 = QK-norm
    44      int32    weight type: 0 = fp32, 1 = Q8_0, 2 = Q4_0
    48      int32    group size (Q8_0: multiple of 4, Q4_0: multiple of 8; <= 1024), 0 for fp32
    52      float32  norm_eps
    56      float64  rope_theta
    64      float32  logit_softcap (0 = off)
    68      int32    sliding_window (0 = off)
    72..255          reserved, zero

    token_embedding (vocab, dim) rms_att wq wk wv [q_norm (L, hs) k_norm (L, hs)] wo rms_ffn w1 w2 w3
    rms_final [classifier (head_rows, dim)]

Q8_0 stores a matrix of n weights as n int8 values followed by n / group_size float32 scales; each
row splits into groups of `group_size` consecutive weights, and weight = int8 * scale of its group
(symmetric: scale = max |w| / 127). Q4_0 stores n / 2 bytes followed by the n / group_size float32
scales: each byte holds two consecutive weights of a row as u = q + 8 (0..15), the first in its low
4 bits; weight = q * scale with q in -8..7 and scale = -m / 8, m the group's weight of largest
magnitude (so m is exact, as q = -8). Norm weights stay fp32. The token embedding and the
classifier are quantized too. run.c multiplies both by int8-quantized activations
(`quantize_input_q8_0`).

The model must be a `LlamaLM` (RMSNorm, RoPE, SwiGLU, no biases). Its fused `attention.qkv` rows are
[q | k | v], which split straight into wq, wk, wv; RoPE pairs (x[2i], x[2i+1]) like llama2.c does, so
no permutation is needed.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

V0_HEADER_BYTES = 28
EXT_HEADER_BYTES = 256
EXT_MAGIC = 0x8D4C5454
EXT_VERSION = 1
AK42_MAGIC = 0x616B3432  # llama2.c's export.py --version 1/2 (not supported)
FLAG_SHARED_CLASSIFIER = 1
FLAG_QK_NORM = 2
WEIGHT_TYPES = {"fp32": 0, "q8_0": 1, "q4_0": 2}
QUANTIZED = ("q8_0", "q4_0")
GROUP_STEP = {"q8_0": 4, "q4_0": 8}  # run.c reads 4 columns at a time; Q4_0 packs two per byte: 8
MAX_GROUP = 1024  # run.c's limit on the group size
V0_NORM_EPS = 1e-5
V0_ROPE_THETA = 10000.0

# The same upper limits run.c applies (they keep size arithmetic and allocations sane).
_LIMITS = {"dim": 1 << 16, "hidden_dim": 1 << 18, "n_layers": 1024, "vocab_size": 1 << 22, "seq_len": 1 << 20}


@dataclass
class Llama2cHeader:
    """What a model.bin header says (both formats), plus the file size it implies."""

    version: int  # 0 = llama2.c legacy, 1 = extended
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    head_rows: int
    shared_classifier: bool
    qk_norm: bool = False
    weight_type: str = "fp32"
    group_size: int = 0
    norm_eps: float = V0_NORM_EPS
    rope_theta: float = V0_ROPE_THETA
    logit_softcap: float = 0.0
    sliding_window: int = 0
    file_size: int | None = None

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def header_bytes(self) -> int:
        return V0_HEADER_BYTES if self.version == 0 else EXT_HEADER_BYTES

    def tensor_layout(self) -> list[tuple[str, tuple[int, ...], bool]]:
        """(name, shape, quantizable) of every array after the header, in file order."""
        L, dim, hid, hs = self.n_layers, self.dim, self.hidden_dim, self.head_size
        kv_dim = self.n_kv_heads * hs
        layout = [
            ("token_embedding", (self.vocab_size, dim), True),
            ("rms_att", (L, dim), False),
            ("wq", (L, dim, dim), True),
            ("wk", (L, kv_dim, dim), True),
            ("wv", (L, kv_dim, dim), True),
        ]
        if self.qk_norm:
            layout += [("q_norm", (L, hs), False), ("k_norm", (L, hs), False)]
        layout += [
            ("wo", (L, dim, dim), True),
            ("rms_ffn", (L, dim), False),
            ("w1", (L, hid, dim), True),
            ("w2", (L, dim, hid), True),
            ("w3", (L, hid, dim), True),
            ("rms_final", (dim,), False),
        ]
        if self.version == 0:
            layout += [("freq_cis_real", (self.seq_len, hs // 2), False),
                       ("freq_cis_imag", (self.seq_len, hs // 2), False)]
        if not self.shared_classifier:
            layout.append(("classifier", (self.head_rows, dim), True))
        return layout

    def tensor_bytes(self, shape: tuple[int, ...], quantizable: bool) -> int:
        n = math.prod(shape)
        if quantizable and self.weight_type == "q8_0":
            return n + n // self.group_size * 4
        if quantizable and self.weight_type == "q4_0":
            return n // 2 + n // self.group_size * 4
        return 4 * n

    @property
    def expected_size(self) -> int:
        """The exact file size this header implies."""
        return self.header_bytes + sum(self.tensor_bytes(s, q) for _, s, q in self.tensor_layout())

    def fits_v0(self) -> list[str]:
        """Reasons this model cannot be written as llama2.c version 0 (empty: it can)."""
        reasons = []
        if self.head_rows != self.vocab_size:
            reasons.append(f"a classifier padded to {self.head_rows} rows (vocab {self.vocab_size})")
        if self.qk_norm:
            reasons.append("QK-norm")
        if self.logit_softcap:
            reasons.append(f"logit soft-capping ({self.logit_softcap})")
        if self.rope_theta != V0_ROPE_THETA:
            reasons.append(f"rope_theta = {self.rope_theta} (version 0 fixes 10000)")
        if self.norm_eps != V0_NORM_EPS:
            reasons.append(f"norm_eps = {self.norm_eps} (version 0 fixes 1e-5)")
        if self.sliding_window:
            reasons.append(f"sliding-window attention ({self.sliding_window})")
        if self.weight_type != "fp32":
            reasons.append(f"{self.weight_type} weights")
        return reasons


# ----------------------------------------------------------------------------------------------
# Q8_0 and Q4_0 quantization


def quantize_q8_0(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization in groups of `group_size` consecutive weights along each row.

    Returns (int8 values with w's shape, float32 scales of shape (numel / group_size,)), such that
    w ≈ values * scale of the group. Each group's largest |weight| maps to ±127, so the error of a
    weight is at most scale / 2 = max|w| / 254 of its group.
    """
    w = w.detach().float().cpu().contiguous()
    if w.shape[-1] % group_size:
        raise ValueError(f"the last dimension ({w.shape[-1]}) must be a multiple of group_size ({group_size})")
    groups = w.reshape(-1, group_size)
    scale = groups.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
    q = torch.round(groups / safe[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize_q8_0(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of `quantize_q8_0` (up to the rounding it did): values * scale, float32."""
    groups = q.reshape(-1, group_size).float() * scale.float()[:, None]
    return groups.reshape(q.shape)


def quantize_q4_0(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit quantization in groups of `group_size` consecutive weights along each row.

    Returns (int8 values in -8..7 with w's shape, float32 scales of shape (numel / group_size,)) such
    that w ≈ values * scale of the group. The scale is -m / 8, where m is the group's weight of
    largest magnitude, so m itself is stored exactly (as -8: 4 bits reach one step further on that
    side) and the other weights round to the nearest of the 16 levels; the error of a weight is at
    most |scale| / 2, except for weights within 1/16 of -m, clamped to 7 (error below |scale|).
    An all-zero group gets scale 0.
    """
    w = w.detach().float().cpu().contiguous()
    if w.shape[-1] % group_size:
        raise ValueError(f"the last dimension ({w.shape[-1]}) must be a multiple of group_size ({group_size})")
    groups = w.reshape(-1, group_size)
    extreme = groups.gather(1, groups.abs().argmax(dim=1, keepdim=True))[:, 0]
    scale = extreme / -8.0
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    q = torch.round(groups / safe[:, None]).clamp(-8, 7).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize_q4_0(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of `quantize_q4_0` (up to the rounding it did): values * scale, float32."""
    return dequantize_q8_0(q, scale, group_size)


def pack_q4(q: torch.Tensor) -> bytes:
    """4-bit values (-8..7, an even count) as the file stores them: u = q + 8, two per byte, the
    first in the low 4 bits."""
    u = (q.reshape(-1).to(torch.int16) + 8).to(torch.uint8).numpy()
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_q4(data: np.ndarray, n: int) -> torch.Tensor:
    """Inverse of `pack_q4`: n values in -8..7 (int8) from n / 2 bytes."""
    u = np.empty(n, dtype=np.int8)
    u[0::2] = (data[: n // 2] & 15).astype(np.int8)
    u[1::2] = (data[: n // 2] >> 4).astype(np.int8)
    return torch.from_numpy(u - 8)


def quantize_input_q8_0(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """What run.c does to the input vector of every matrix product in Q8_0 and Q4_0 mode, in PyTorch.

    run.c multiplies int8 weights by int8 activations: it splits x (along its last dimension) into
    groups of `group_size`, and per group computes, in float32, scale = max|x| / 127 and
    q = round(x * (1 / scale)) (ties to even; an all-zero group gets scale 0 and q 0). This returns
    q * scale, the float32 values the integer product effectively uses, with the exact arithmetic
    of run.c's `quantize_vec`, so a model that feeds its Linear layers these values computes what
    run.c computes up to float rounding (see `quantize_linear_inputs`).
    """
    shape = x.shape
    if shape[-1] % group_size:
        raise ValueError(f"the last dimension ({shape[-1]}) must be a multiple of group_size ({group_size})")
    groups = x.float().reshape(-1, group_size)
    scale = groups.abs().amax(dim=1) / 127.0
    inv = torch.where(scale > 0, torch.reciprocal(scale), torch.zeros_like(scale))
    q = torch.round(groups * inv[:, None]).clamp(-127, 127)
    return (q * scale[:, None]).reshape(shape)


def quantize_linear_inputs(model: torch.nn.Module, group_size: int) -> list:
    """Make every `nn.Linear` in `model` (the classifier included) see its input the way run.c's Q8_0
    and Q4_0 products do: a forward pre-hook replaces the input by `quantize_input_q8_0(input,
    group_size)`.
    Returns the hook handles; `handle.remove()` undoes one."""
    def hook(module, args):
        return (quantize_input_q8_0(args[0], group_size), *args[1:])

    return [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _auto_group_size(requested: int, dim: int, hidden_dim: int, quantize: str = "q8_0") -> int:
    """The requested group size, halved until it divides dim and hidden_dim (rows are split into
    whole groups). run.c's kernels take 4 columns at a time (Q8_0) or 8 (Q4_0: two per byte), so it
    must stay a multiple of that, and at most 1024."""
    step = GROUP_STEP[quantize]
    if requested < step or requested % step or requested > MAX_GROUP:
        raise ValueError(f"group_size for {quantize} must be a multiple of {step} in {step}..{MAX_GROUP} "
                         f"(e.g. 32 or 64), got {requested}")
    g = requested
    while g >= step and g % step == 0 and (dim % g or hidden_dim % g):
        g //= 2
    if g < step or g % step or dim % g or hidden_dim % g:
        raise ValueError(
            f"no group size <= {requested} that is a multiple of {step} divides both dim ({dim}) and "
            f"hidden_dim ({hidden_dim}); {quantize} needs one: export in fp32 (quantize=None)"
            + (" or q8_0 (multiples of 4)" if quantize == "q4_0" else "")
        )
    return g


# ----------------------------------------------------------------------------------------------
# Export


def _unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    from tiny_transformer.model import LlamaLM

    if not isinstance(model, LlamaLM):
        raise ValueError(
            f"export_llama2c needs a LlamaLM (model_type 'llama'), got {type(model).__name__}; the "
            "llama2.c format has no LayerNorm, GELU or learned positions, so GPT-style models cannot "
            "be written to it. Train a Llama preset, e.g. llama_shakespeare_870k"
        )
    return model


def header_for_model(model, *, version="auto", quantize=None, group_size=64) -> Llama2cHeader:
    """The header `export_llama2c` would write for `model` (nothing is written)."""
    model = _unwrap(model)
    cfg = model.config
    if quantize not in (None, *QUANTIZED):
        raise ValueError(f"quantize must be None, 'q8_0' or 'q4_0', got {quantize!r}")
    if version not in ("auto", 0, "ext", 1):
        raise ValueError(f"version must be 'auto', 0 or 'ext', got {version!r}")
    tied = model.output.weight is model.tok_embeddings.weight
    header = Llama2cHeader(
        version=1, dim=cfg.dim, hidden_dim=cfg.hidden_dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size, seq_len=cfg.max_seq_len,
        head_rows=model.output.weight.shape[0], shared_classifier=tied, qk_norm=bool(cfg.qk_norm),
        weight_type=quantize or "fp32", group_size=0, norm_eps=float(cfg.norm_eps),
        rope_theta=float(cfg.rope_theta), logit_softcap=float(cfg.logit_softcap or 0.0),
        sliding_window=int(cfg.sliding_window or 0),
    )
    for name, limit in _LIMITS.items():
        if getattr(header, name) > limit:
            raise ValueError(f"{name} = {getattr(header, name)} exceeds run.c's limit of {limit}")
    if quantize:
        header.group_size = _auto_group_size(group_size, cfg.dim, cfg.hidden_dim, quantize)
    reasons = header.fits_v0()
    if version == 0 and reasons:
        raise ValueError(
            "this model cannot be written as llama2.c version 0, which has no room for: "
            + "; ".join(reasons) + ". Use version='auto' or 'ext' (our extended format; native/run.c reads it)"
        )
    if version == 0 or (version == "auto" and not reasons):
        header.version = 0
    return header


def _layer_tensors(model, header: Llama2cHeader) -> dict[str, torch.Tensor]:
    """Every array of the file, by layout name, as float32 CPU tensors."""
    hs = header.head_size
    q_rows, kv_rows = header.n_heads * hs, header.n_kv_heads * hs
    layers = list(model.layers)

    def stack(fn):
        return torch.stack([fn(layer).detach().float().cpu() for layer in layers])

    qkv = [layer.attention.qkv.weight.detach().float().cpu() for layer in layers]
    t = {
        "token_embedding": model.tok_embeddings.weight.detach().float().cpu(),
        "rms_att": stack(lambda m: m.attention_norm.weight),
        "wq": torch.stack([w[:q_rows] for w in qkv]),
        "wk": torch.stack([w[q_rows:q_rows + kv_rows] for w in qkv]),
        "wv": torch.stack([w[q_rows + kv_rows:] for w in qkv]),
        "wo": stack(lambda m: m.attention.proj.weight),
        "rms_ffn": stack(lambda m: m.ffn_norm.weight),
        "w1": stack(lambda m: m.feed_forward.w1.weight),
        "w2": stack(lambda m: m.feed_forward.w2.weight),
        "w3": stack(lambda m: m.feed_forward.w3.weight),
        "rms_final": model.norm.weight.detach().float().cpu(),
    }
    if header.qk_norm:
        t["q_norm"] = stack(lambda m: m.attention.q_norm.weight)
        t["k_norm"] = stack(lambda m: m.attention.k_norm.weight)
    if header.version == 0:
        from tiny_transformer.embeddings import rope_frequencies

        cos, sin = rope_frequencies(hs, header.seq_len, V0_ROPE_THETA)
        t["freq_cis_real"], t["freq_cis_imag"] = cos, sin
    if not header.shared_classifier:
        t["classifier"] = model.output.weight.detach().float().cpu()
    return t


def _pack_header(h: Llama2cHeader) -> bytes:
    if h.version == 0:
        vocab = h.vocab_size if h.shared_classifier else -h.vocab_size
        return struct.pack("<7i", h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, vocab, h.seq_len)
    flags = (FLAG_SHARED_CLASSIFIER if h.shared_classifier else 0) | (FLAG_QK_NORM if h.qk_norm else 0)
    head = struct.pack(
        "<Ii7iiiiifdfi", EXT_MAGIC, EXT_VERSION, h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads,
        h.vocab_size, h.seq_len, h.head_rows, flags, WEIGHT_TYPES[h.weight_type], h.group_size, h.norm_eps,
        h.rope_theta, h.logit_softcap, h.sliding_window,
    )
    return head + b"\0" * (EXT_HEADER_BYTES - len(head))


def _write_atomic(path: Path, chunks) -> None:
    """Write to a temporary file next to `path`, then rename: no half-written model.bin on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_llama2c(model, path, *, version="auto", quantize=None, group_size=64) -> Llama2cHeader:
    """Write `model` (a LlamaLM) as a model.bin that native/run.c runs.

    version: "auto" writes llama2.c version 0 when the model fits it (tied, or untied without padding;
    no QK-norm, soft-cap or sliding window; theta 10000; eps 1e-5; fp32) and our extended format
    otherwise; 0 insists on version 0 (ValueError naming what does not fit); "ext" always writes ours.
    quantize: None (fp32), "q8_0" (int8 weights) or "q4_0" (4-bit weights), both in the extended format.
    group_size: weights per scale, halved automatically until it divides dim and hidden_dim (the
    header records the value used).
    Returns the header written. The module docstring describes both layouts byte by byte.
    """
    model = _unwrap(model)
    if quantize and version == 0:
        raise ValueError(f"llama2.c version 0 stores fp32 only; use version='ext' (or 'auto') with "
                         f"quantize={quantize!r}")
    header = header_for_model(model, version=version, quantize=quantize, group_size=group_size)
    tensors = _layer_tensors(model, header)

    def chunks():
        yield _pack_header(header)
        for name, shape, quantizable in header.tensor_layout():
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}; the model is inconsistent")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or infinite values; the model diverged, export an earlier checkpoint")
            if quantizable and header.weight_type == "q8_0":
                q, s = quantize_q8_0(t, header.group_size)
                yield q.numpy().tobytes()
                yield s.numpy().astype("<f4").tobytes()
            elif quantizable and header.weight_type == "q4_0":
                q, s = quantize_q4_0(t, header.group_size)
                yield pack_q4(q)
                yield s.numpy().astype("<f4").tobytes()
            else:
                yield t.contiguous().numpy().astype("<f4").tobytes()

    path = Path(path)
    _write_atomic(path, chunks())
    header.file_size = path.stat().st_size
    assert header.file_size == header.expected_size, "internal error: written size differs from the layout"
    return header


# ----------------------------------------------------------------------------------------------
# Reading back


def read_llama2c_header(path) -> Llama2cHeader:
    """Read and validate the header of a model.bin (either format), including the file size check.

    Raises FileNotFoundError, or ValueError naming what is wrong and how to fix it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found; export one with export_llama2c(model, '{path}')")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(EXT_HEADER_BYTES)
    if len(raw) < V0_HEADER_BYTES:
        raise ValueError(f"{path} is {size} bytes, smaller than the 28-byte llama2.c header; export it again")
    (magic,) = struct.unpack_from("<I", raw, 0)
    if magic == AK42_MAGIC:
        raise ValueError(f"{path} was written by llama2.c's export.py --version 1/2, which is not supported; "
                         "export with --version 0, or with export_llama2c")
    if magic == EXT_MAGIC:
        if len(raw) < EXT_HEADER_BYTES:
            raise ValueError(f"{path} is {size} bytes, smaller than its 256-byte header: truncated, export it again")
        (_, version, dim, hidden, layers, heads, kv_heads, vocab, seq_len, head_rows, flags, wtype, gs, eps,
         theta, cap, window) = struct.unpack_from("<Ii7iiiiifdfi", raw, 0)
        if version != EXT_VERSION:
            raise ValueError(f"{path} has format version {version}; this reader knows {EXT_VERSION}: update tiny_transformer")
        if any(raw[72:]):
            raise ValueError(f"{path}: reserved header bytes are not zero; the file is corrupt or newer than this reader")
        if flags & ~(FLAG_SHARED_CLASSIFIER | FLAG_QK_NORM):
            raise ValueError(f"{path}: unknown flags {flags:#x}; update tiny_transformer")
        names = {v: k for k, v in WEIGHT_TYPES.items()}
        if wtype not in names:
            raise ValueError(f"{path}: unknown weight type {wtype} (0 = fp32, 1 = q8_0, 2 = q4_0); "
                             "update tiny_transformer")
        h = Llama2cHeader(
            version=1, dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
            vocab_size=vocab, seq_len=seq_len, head_rows=head_rows,
            shared_classifier=bool(flags & FLAG_SHARED_CLASSIFIER), qk_norm=bool(flags & FLAG_QK_NORM),
            weight_type=names[wtype], group_size=gs, norm_eps=eps, rope_theta=theta, logit_softcap=cap,
            sliding_window=window,
        )
    else:
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", raw, 0)
        h = Llama2cHeader(
            version=0, dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
            vocab_size=abs(vocab), seq_len=seq_len, head_rows=abs(vocab), shared_classifier=vocab > 0,
        )
    _validate_header(h, path)
    h.file_size = size
    if size != h.expected_size:
        state = "truncated" if size < h.expected_size else "too long"
        raise ValueError(f"{path} is {size} bytes but its header implies {h.expected_size}: the file is {state}; "
                         "export it again")
    return h


def _validate_header(h: Llama2cHeader, path) -> None:
    def bad(msg):
        raise ValueError(f"{path}: {msg}; the file is not a model.bin or is corrupt, export it again")

    for name, limit in _LIMITS.items():
        if not 0 < getattr(h, name) <= limit:
            bad(f"{name} = {getattr(h, name)} is out of range (1..{limit})")
    if not 0 < h.n_heads <= h.dim or h.dim % h.n_heads:
        bad(f"n_heads = {h.n_heads} must divide dim = {h.dim}")
    if not 0 < h.n_kv_heads <= h.n_heads or h.n_heads % h.n_kv_heads:
        bad(f"n_kv_heads = {h.n_kv_heads} must divide n_heads = {h.n_heads}")
    if h.head_size % 2:
        bad(f"the head size {h.head_size} must be even")
    if not h.vocab_size <= h.head_rows <= _LIMITS["vocab_size"] or (h.shared_classifier and h.head_rows != h.vocab_size):
        bad(f"head_rows = {h.head_rows} does not fit vocab_size = {h.vocab_size}")
    step = GROUP_STEP.get(h.weight_type)
    if step and (not step <= h.group_size <= MAX_GROUP or h.group_size % step or h.dim % h.group_size
                 or h.hidden_dim % h.group_size):
        bad(f"{h.weight_type} group_size = {h.group_size} must be a multiple of {step} in {step}..{MAX_GROUP} "
            "dividing dim and hidden_dim")
    if h.weight_type == "fp32" and h.group_size:
        bad("fp32 weights need group_size 0")
    if not (0 < h.norm_eps < 1 and 1 <= h.rope_theta < 1e30 and 0 <= h.logit_softcap < 1e30 and h.sliding_window >= 0):
        bad(f"norm_eps {h.norm_eps}, rope_theta {h.rope_theta}, logit_softcap {h.logit_softcap} or "
            f"sliding_window {h.sliding_window} is out of range")


def read_llama2c_tensors(path) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """Header and every array of a model.bin, as float32 tensors (Q8_0 and Q4_0 matrices dequantized)."""
    h = read_llama2c_header(path)
    data = np.fromfile(path, dtype=np.uint8)
    offset = h.header_bytes
    tensors = {}
    for name, shape, quantizable in h.tensor_layout():
        n = math.prod(shape)
        if quantizable and h.weight_type in QUANTIZED:
            nbytes = n if h.weight_type == "q8_0" else n // 2
            if h.weight_type == "q8_0":
                q = torch.from_numpy(data[offset:offset + n].view(np.int8).copy()).reshape(shape)
            else:
                q = unpack_q4(data[offset:offset + nbytes], n).reshape(shape)
            s = torch.from_numpy(data[offset + nbytes:offset + nbytes + n // h.group_size * 4].view("<f4")
                                 .astype(np.float32))
            tensors[name] = dequantize_q8_0(q, s, h.group_size)
        else:
            tensors[name] = torch.from_numpy(data[offset:offset + 4 * n].view("<f4").astype(np.float32)).reshape(shape)
        offset += h.tensor_bytes(shape, quantizable)
    return h, tensors


def load_llama2c(path, *, quantized_inputs: bool = False):
    """Read a model.bin (llama2.c version 0, or our extended format) back into a `LlamaLM`.

    Q8_0 and Q4_0 weights come back dequantized (float32 values equal to q * scale). run.c also
    quantizes the input of every matrix product to int8 in these modes; with `quantized_inputs=True`
    the model does the same (`quantize_linear_inputs`), and then computes what run.c computes up to
    float rounding. Without it, it shows the model with quantized weights and float32 activations.
    (For fp32 files the flag changes nothing.) Works for llama2.c's published model files too.
    """
    from tiny_transformer.model import LlamaConfig, LlamaLM

    h, t = read_llama2c_tensors(path)
    config = LlamaConfig(
        vocab_size=h.vocab_size, dim=h.dim, n_layers=h.n_layers, n_heads=h.n_heads, n_kv_heads=h.n_kv_heads,
        hidden_dim=h.hidden_dim, norm_eps=h.norm_eps, max_seq_len=h.seq_len, dropout=0.0,
        rope_theta=h.rope_theta, sliding_window=h.sliding_window or None, qk_norm=h.qk_norm,
        tie_embeddings=h.shared_classifier,
        # any multiple that rounds vocab_size up to head_rows reproduces the padded head
        pad_vocab_multiple=1 if h.shared_classifier else h.head_rows,
        logit_softcap=h.logit_softcap or None,
    )
    model = LlamaLM(config)
    hs = h.head_size
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(t["token_embedding"])
        for i, layer in enumerate(model.layers):
            layer.attention_norm.weight.copy_(t["rms_att"][i])
            layer.attention.qkv.weight.copy_(torch.cat([t["wq"][i], t["wk"][i], t["wv"][i]]))
            if h.qk_norm:
                layer.attention.q_norm.weight.copy_(t["q_norm"][i])
                layer.attention.k_norm.weight.copy_(t["k_norm"][i])
            layer.attention.proj.weight.copy_(t["wo"][i])
            layer.ffn_norm.weight.copy_(t["rms_ffn"][i])
            layer.feed_forward.w1.weight.copy_(t["w1"][i])
            layer.feed_forward.w2.weight.copy_(t["w2"][i])
            layer.feed_forward.w3.weight.copy_(t["w3"][i])
        model.norm.weight.copy_(t["rms_final"])
        if not h.shared_classifier:
            model.output.weight.copy_(t["classifier"])
    assert hs == model.layers[0].attention.head_dim
    if quantized_inputs and h.weight_type in QUANTIZED:
        quantize_linear_inputs(model, h.group_size)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Checkpoints


def model_from_checkpoint(checkpoint):
    """(model, tokenizer dict or None) from a checkpoint path, a checkpoint dict or a model.

    A checkpoint is a dict with "model" (a state_dict) and "config" ({"model_type": ..., "model":
    {...}}), as `python -m tiny_transformer train` writes; a file is read with
    torch.load(weights_only=True), which refuses anything but tensors and plain containers.
    """
    if isinstance(checkpoint, torch.nn.Module):
        return getattr(checkpoint, "_orig_mod", checkpoint), None
    source = "checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found; train a model first or check the path")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for bad files
            raise ValueError(
                f"cannot read {path} as a PyTorch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                "pass a file written by `python -m tiny_transformer train` (or export production)"
            ) from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise ValueError(f"{source} is not a tiny-transformer checkpoint: it needs the keys 'model' (weights) and "
                         "'config'; pass a file written by `python -m tiny_transformer train`")
    config = checkpoint["config"]
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{source}: 'config' must be a dict with 'model_type' and 'model' entries")
    from tiny_transformer.config import build_model

    model = build_model({"model_type": config.get("model_type", "gpt"), "model": dict(config["model"])})
    state = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as exc:
        raise ValueError(f"{source}: the weights do not match the model its config describes ({str(exc)[:300]}); "
                         "the file is damaged or was edited") from None
    return model.eval(), checkpoint.get("tokenizer")
