"""tiny_transformer: a small, readable GPT/Llama library for learning how language models work.

The pieces, one module per concept:

    tokenizers  CharTokenizer (and SentencePiece tools)    data        splits, TextDataset, batches
    embeddings  token, sinusoidal, learned, rotary          attention   masks, SDPA, MHA/GQA, KV cache
    norms/blocks LayerNorm, RMSNorm, FFN, TransformerBlock  model       TinyTransformerLM, LlamaLM
    config      presets (tiny, shakespeare, base, ...)      training    Trainer, schedules, checkpoints
    sampling    TextGenerator and decoding strategies        export/native  llama2.c files and C inference
"""

from tiny_transformer.attention import KVCache, MultiHeadAttention, scaled_dot_product_attention
from tiny_transformer.blocks import FeedForward, LayerNorm, RMSNorm, TransformerBlock
from tiny_transformer.config import build_model, list_presets, load_preset
from tiny_transformer.data import RandomBatchSampler, TextDataset, load_text, train_val_split
from tiny_transformer.embeddings import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    TokenEmbedding,
)
from tiny_transformer.model import LlamaConfig, LlamaLM, TinyTransformerLM, TransformerConfig
from tiny_transformer.tokenizers import CharTokenizer

__version__ = "0.1.0"

__all__ = [
    "CharTokenizer", "TextDataset", "RandomBatchSampler", "load_text", "train_val_split",
    "TokenEmbedding", "SinusoidalPositionalEncoding", "LearnedPositionalEmbedding", "RotaryEmbedding",
    "scaled_dot_product_attention", "MultiHeadAttention", "KVCache",
    "LayerNorm", "RMSNorm", "FeedForward", "TransformerBlock",
    "TransformerConfig", "TinyTransformerLM", "LlamaConfig", "LlamaLM",
    "build_model", "load_preset", "list_presets",
]
