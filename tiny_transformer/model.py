"""The language models: `TinyTransformerLM` (GPT-style) and `LlamaLM` (Llama-style).

Both are decoder-only transformers that read token ids and predict the next token at every position:

    ids -> token embedding (+ positions) -> N × TransformerBlock -> final norm -> linear head -> logits

They share one forward pass (`CausalLM`); they differ in the parts they are built from:

| part            | TinyTransformerLM (GPT-2 defaults)      | LlamaLM                                  |
|-----------------|-----------------------------------------|------------------------------------------|
| positions       | learned table (or sinusoidal/RoPE/none) | RoPE inside attention                    |
| norm            | LayerNorm with bias                     | RMSNorm                                  |
| feed-forward    | GELU MLP, 4·d_model                     | SwiGLU, hidden rounded to `multiple_of`  |
| attention       | multi-head, biases                      | grouped-query, no biases, optional       |
|                 |                                         | QK-norm and sliding window               |
| head            | tied to the token embedding             | tied, or untied and padded (to 128 rows) |
|                 |                                         | with optional logit soft-capping         |

Initialisation (both): every weight matrix N(0, 0.02) as in GPT-2, the two projections that write
into the residual stream (attention output, MLP down) scaled by 1/sqrt(2·n_layers) so the residual
stream's variance does not grow with depth, biases 0, norm weights 1. `LlamaConfig.zero_init_proj`
instead starts those projections (and an untied head) at exactly zero, so every block begins as the
identity (a modded-nanogpt trick).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from tiny_transformer.attention import KVCache, build_attention_mask
from tiny_transformer.blocks import ACTIVATIONS, TransformerBlock, swiglu_hidden_dim
from tiny_transformer.embeddings import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    TokenEmbedding,
)
from tiny_transformer.norms import make_norm

POS_ENCODINGS = ("learned", "sinusoidal", "rope", "none")


def _check_positive(cfg, *names):
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive integer, got {value!r}")


class _ConfigMixin:
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**d)


@dataclass
class TransformerConfig(_ConfigMixin):
    """Hyperparameters of the GPT-style model. The defaults describe a small GPT-2-like model."""

    vocab_size: int = 65
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int | None = None  # None -> 4 * d_model
    max_seq_len: int = 128
    dropout: float = 0.0
    tie_weights: bool = True  # share the token embedding with the output head
    pos_encoding: str = "learned"  # learned | sinusoidal | rope | none
    activation: str = "gelu"  # gelu | gelu_tanh | relu | relu2 | silu | swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    bias: bool = True  # biases in linear layers and LayerNorm (GPT-2: True)
    norm_eps: float = 1e-5
    n_kv_heads: int | None = None  # None -> n_heads (plain multi-head attention)
    rope_theta: float = 10000.0
    qk_norm: bool = False

    def __post_init__(self):
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _check_positive(self, "vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_seq_len", "n_kv_heads")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"unknown pos_encoding {self.pos_encoding!r}: choose one of {POS_ENCODINGS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}: choose one of {ACTIVATIONS}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"unknown norm {self.norm!r}: choose 'layernorm' or 'rmsnorm'")
        if self.pos_encoding in ("rope", "sinusoidal") and (self.d_model // self.n_heads) % 2:
            raise ValueError("RoPE/sinusoidal encodings need an even head dimension (d_model / n_heads)")

    @classmethod
    def gpt2(cls, vocab_size: int = 50257, d_model: int = 768, n_heads: int = 12, n_layers: int = 12,
             max_seq_len: int = 1024) -> TransformerConfig:
        """Exactly GPT-2's architecture (124M at the defaults): learned positions, LayerNorm with
        bias, tanh-GELU, 4x MLP, tied head."""
        return cls(vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                   max_seq_len=max_seq_len, activation="gelu_tanh", pos_encoding="learned",
                   norm="layernorm", bias=True, tie_weights=True)


@dataclass
class LlamaConfig(_ConfigMixin):
    """Hyperparameters of the Llama-style model (names follow llama2.c's `ModelArgs`)."""

    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None -> n_heads
    hidden_dim: int | None = None  # None -> swiglu_hidden_dim(dim, multiple_of)
    multiple_of: int = 32
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # attend only to the last N positions
    # modded-nanogpt switches
    qk_norm: bool = False  # RMSNorm on each head's queries and keys
    zero_init_proj: bool = False  # attention/MLP output projections (and an untied head) start at 0
    tie_embeddings: bool = True
    pad_vocab_multiple: int = 1  # untied head rows padded to a multiple of this (e.g. 128)
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = swiglu_hidden_dim(self.dim, self.multiple_of)
        _check_positive(self, "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim",
                        "multiple_of", "max_seq_len", "pad_vocab_multiple")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("RoPE needs an even head dimension (dim / n_heads)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ValueError(f"logit_softcap must be positive or None, got {self.logit_softcap}")
        if self.tie_embeddings and self.pad_vocab_multiple != 1:
            raise ValueError("pad_vocab_multiple applies to an untied head; set tie_embeddings=False or pad_vocab_multiple=1")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return m * ((self.vocab_size + m - 1) // m)


class CausalLM(nn.Module):
    """The forward pass shared by both model families.

    Subclasses build: `tok_embeddings`, `pos_embedding` (or None), `layers`, `norm`, `output`,
    and set `vocab_size`, `max_seq_len`, `sliding_window`, `logit_softcap`.
    """

    config: TransformerConfig | LlamaConfig
    sliding_window: int | None = None
    logit_softcap: float | None = None

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids -> (logits (B, T, vocab_size), loss or None).

        targets: (B, T) next-token ids (-100 = ignore) -> mean cross-entropy loss.
        cache: a `KVCache` from `new_cache()`; the T tokens are appended after the cached ones.
        attention_mask: (B, past + T), 1 for real tokens and 0 for left padding; positions then count
        real tokens only, so a padded row computes exactly what the unpadded prompt would.
        last_only: compute logits for the last position only (what generation needs).
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        total = past + T
        if positions is None:
            if attention_mask is not None:
                positions = (attention_mask[:, :total].long().cumsum(-1) - 1).clamp(min=0)[:, past:total]
            else:
                positions = torch.arange(past, total, device=idx.device)
        if total > self.max_seq_len and self._has_position_table:
            raise ValueError(
                f"sequence of {total} tokens exceeds the model's context of {self.max_seq_len}; "
                "crop the input to the last max_seq_len tokens (TextGenerator does this for you)"
            )

        x = self.tok_embeddings(idx)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding(positions)
        x = self.drop(x)
        mask, is_causal = build_attention_mask(
            T, total, attention_mask=attention_mask, window=self.sliding_window, device=idx.device
        )
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, mask, is_causal=is_causal, cache=cache, layer=i)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if last_only and targets is None:
            x = x[:, -1:, :]
        logits = self.output(x)[..., : self.vocab_size]
        if self.logit_softcap is not None:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @property
    def _has_position_table(self) -> bool:
        return True  # learned, sinusoidal and RoPE tables all stop at max_seq_len

    def new_cache(self, batch_size: int = 1, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """An empty KV cache for incremental decoding of up to `max_len` (default: context) tokens."""
        attn = self.layers[0].attention
        param = next(self.parameters())
        return KVCache(
            len(self.layers), batch_size, attn.n_kv_heads, attn.head_dim, max_len or self.max_seq_len,
            device=device or param.device, dtype=dtype or param.dtype,
        )

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of trainable parameters (a tied head counts once). With `exclude_embeddings`, the
        token and learned position tables are left out (the usual "non-embedding" count)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
            if isinstance(self.pos_embedding, nn.Embedding):
                n -= self.pos_embedding.weight.numel()
        return n

    def parameter_table(self) -> dict[str, int]:
        """Parameter counts by component (embeddings, attention, feed-forward, norms, head)."""
        table = {"token embedding": self.tok_embeddings.weight.numel()}
        if isinstance(self.pos_embedding, nn.Embedding):
            table["position embedding"] = self.pos_embedding.weight.numel()
        table["attention"] = sum(p.numel() for layer in self.layers for p in layer.attention.parameters())
        table["feed-forward"] = sum(p.numel() for layer in self.layers for p in layer.feed_forward.parameters())
        table["norms"] = sum(
            p.numel() for layer in self.layers for n in (layer.attention_norm, layer.ffn_norm) for p in n.parameters()
        ) + sum(p.numel() for p in self.norm.parameters())
        table["output head"] = 0 if self.output.weight is self.tok_embeddings.weight else self.output.weight.numel()
        table["total"] = self.num_parameters()
        return table

    def _init_weights(self, n_layers: int, zero_proj: bool = False) -> None:
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        for layer in self.layers:
            for proj in (layer.attention.proj, layer.feed_forward.w2):
                if zero_proj:
                    nn.init.zeros_(proj.weight)
                else:
                    nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * n_layers))


class TinyTransformerLM(CausalLM):
    """GPT-style decoder-only language model. See the module docstring for the architecture.

    >>> model = TinyTransformerLM(TransformerConfig(vocab_size=65, d_model=64, n_heads=4, n_layers=2))
    >>> logits, loss = model(torch.zeros(1, 8, dtype=torch.long))
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.vocab_size, self.max_seq_len = config.vocab_size, config.max_seq_len
        head_dim = config.d_model // config.n_heads
        self.tok_embeddings = TokenEmbedding(config.vocab_size, config.d_model)
        self.pos_embedding = {
            "learned": lambda: LearnedPositionalEmbedding(config.max_seq_len, config.d_model),
            "sinusoidal": lambda: SinusoidalPositionalEncoding(config.max_seq_len, config.d_model),
            "rope": lambda: None,
            "none": lambda: None,
        }[config.pos_encoding]()
        rope = RotaryEmbedding(head_dim, config.max_seq_len, config.rope_theta) if config.pos_encoding == "rope" else None
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(
                config.d_model, config.n_heads, config.d_ff, n_kv_heads=config.n_kv_heads, dropout=config.dropout,
                activation=config.activation, norm=config.norm, norm_eps=config.norm_eps, bias=config.bias,
                rope=rope, qk_norm=config.qk_norm,
            )
            for _ in range(config.n_layers)
        )
        self.norm = make_norm(config.norm, config.d_model, config.norm_eps, config.bias)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            # Weight tying: the head that scores "which token next" reuses the embedding table, so
            # tokens with similar embeddings get similar scores, and the parameters are shared.
            self.output.weight = self.tok_embeddings.weight
        self._init_weights(config.n_layers)

    @property
    def _has_position_table(self) -> bool:
        return self.config.pos_encoding != "none"


class LlamaLM(CausalLM):
    """Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases.

    Parameter names and shapes follow llama2.c's layout so `tiny_transformer.export` can write a
    `model.bin` directly (the fused `attention.qkv` rows split into wq | wk | wv).
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.vocab_size, self.max_seq_len = config.vocab_size, config.max_seq_len
        self.sliding_window, self.logit_softcap = config.sliding_window, config.logit_softcap
        self.padded_vocab_size = config.padded_vocab_size if not config.tie_embeddings else config.vocab_size
        self.tok_embeddings = TokenEmbedding(config.vocab_size, config.dim)
        self.pos_embedding = None
        rope = RotaryEmbedding(config.dim // config.n_heads, config.max_seq_len, config.rope_theta)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(
                config.dim, config.n_heads, config.hidden_dim, n_kv_heads=config.n_kv_heads, dropout=config.dropout,
                activation="swiglu", norm="rmsnorm", norm_eps=config.norm_eps, bias=False, rope=rope,
                qk_norm=config.qk_norm,
            )
            for _ in range(config.n_layers)
        )
        self.norm = make_norm("rmsnorm", config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, self.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._init_weights(config.n_layers, zero_proj=config.zero_init_proj)
        if config.zero_init_proj and not config.tie_embeddings:
            nn.init.zeros_(self.output.weight)


MODEL_TYPES = {"gpt": (TransformerConfig, TinyTransformerLM), "llama": (LlamaConfig, LlamaLM)}


def model_type_of(model: nn.Module) -> str:
    """"gpt" or "llama" — the key under which checkpoints and presets record the family."""
    for name, (_, cls) in MODEL_TYPES.items():
        if type(model) is cls:
            return name
    raise ValueError(f"not a tiny_transformer model: {type(model).__name__}")
