"""Sampling: turning a language model's next-token scores into text.

A model gives, for the next position, one score (a *logit*) per vocabulary entry. Generating text
is a loop: pick a token from those scores, append it, ask again. How we pick changes the text a lot:

* **greedy** — always the most probable token: deterministic, but it soon repeats itself;
* **temperature** T — divide the logits by T before the softmax: T < 1 sharpens the distribution
  (safer, duller), T > 1 flattens it (more surprising, more mistakes); T = 0 is greedy;
* **top-k** — sample only among the k most probable tokens;
* **top-p** (nucleus) — sample among the fewest tokens whose probabilities add up to at least p;
* **min-p** — drop tokens less than min_p times as probable as the best one (adapts to confidence);
* **repetition penalty** — make tokens that already appeared less likely;
* **Mirostat** — adjust the cut-off on the fly so that the text's average *surprise* stays at a target.

The pure functions below each take a logits tensor (..., V) and return a new one, so they can be
taught, plotted and tested one at a time. `TextGenerator` puts them together with a KV cache,
batching (left padding), streaming, stop strings, and the search methods of `decoding.py` (beam,
contrastive, speculative):

    >>> gen = TextGenerator(model, tokenizer)
    >>> print(gen.generate("ROMEO:", max_new_tokens=100, temperature=0.8, top_k=40, seed=0))
    >>> for piece in gen.stream("JULIET:", max_new_tokens=100):
    ...     print(piece, end="", flush=True)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from tiny_transformer.decoding import (
    ModelStepper,
    beam_search,
    contrastive_search,
    speculative_decode,
)

# ----------------------------------------------------------------------------------------------
# Argument checks. Every message names the parameter, the value, the allowed range and a fix.


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_temperature(t) -> None:
    if not _is_number(t) or t < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {t!r}; try 0.8")


def _check_top_k(k) -> None:
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k <= 0):
        raise ValueError(f"top_k must be a positive integer (or None to disable), got {k!r}; try 40")


def _check_top_p(p) -> None:
    if p is not None and (not _is_number(p) or not 0 < p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] (or None to disable), got {p!r}; try 0.9")


def _check_min_p(p) -> None:
    if p is not None and (not _is_number(p) or not 0 <= p < 1):
        raise ValueError(f"min_p must lie in [0, 1) (or None to disable), got {p!r}; try 0.05")


def _check_repetition_penalty(r) -> None:
    if not _is_number(r) or r <= 0:
        raise ValueError(f"repetition_penalty must be a number > 0 (1.0 = off), got {r!r}; try 1.1")


def _as_2d(logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (1, 2):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor of shape (V,) or (batch, V), got {shape}; "
                         "for model output (B, T, V) pass logits[:, -1]")
    return (logits[None], True) if logits.dim() == 1 else (logits, False)


# ----------------------------------------------------------------------------------------------
# The per-step building blocks (pure functions on logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by the temperature: softmax(logits / T).

    T = 1 leaves the distribution unchanged, T -> 0 approaches greedy, T -> infinity approaches
    uniform. T = 0 itself returns logits where only the maximum is finite (the rest -inf), so that
    sampling from them *is* greedy decoding.
    """
    _check_temperature(temperature)
    if temperature == 0:
        best = logits.argmax(dim=-1, keepdim=True)
        return torch.full_like(logits, float("-inf")).scatter(-1, best, logits.gather(-1, best))
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits, set the rest to -inf (ties with the k-th largest are kept).

    >>> top_k_filter(torch.tensor([1.0, 3.0, 2.0, 0.0]), 2)
    tensor([-inf, 3., 2., -inf])
    """
    _check_top_k(k)
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most probable tokens whose total probability is
    at least p; set the rest to -inf. The most probable token is always kept.

    Sorted probabilities 0.5, 0.3, 0.15, 0.05 with p = 0.75 keep the first two (0.5 < 0.75 <= 0.8).
    """
    _check_top_p(p)
    if p is None or p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p  # the nucleus already reached p without this token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Keep tokens whose probability is at least `min_p` times that of the most probable token.

    Unlike top-k/top-p the cut-off scales with the model's confidence: when one token dominates,
    few others survive; when the model is unsure, many do. min_p = 0 keeps everything.
    """
    _check_min_p(min_p)
    if not min_p:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, token_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens that already occur in `token_ids` less likely (the CTRL paper's penalty).

    For every token present (once or many times — it is applied once): a positive logit is divided
    by `penalty`, a negative one multiplied by it, so with penalty > 1 the token always loses
    probability. Tokens not present are untouched; penalty = 1 changes nothing; penalty < 1
    *encourages* repetition. logits: (V,) or (B, V); token_ids: (L,) or (B, L); negative ids (padding)
    are ignored.
    """
    _check_repetition_penalty(penalty)
    logits2d, squeeze = _as_2d(logits)
    ids = torch.as_tensor(token_ids, device=logits.device).long()
    ids = ids.view(1, -1) if ids.dim() == 1 else ids
    if ids.shape[0] != logits2d.shape[0]:
        raise ValueError(f"token_ids has {ids.shape[0]} rows but logits has {logits2d.shape[0]}")
    if penalty == 1 or ids.numel() == 0:
        return logits
    if int(ids.max()) >= logits2d.shape[-1]:
        raise ValueError(f"token id {int(ids.max())} is outside the vocabulary of {logits2d.shape[-1]} logits")
    counts = torch.zeros(logits2d.shape, device=logits.device).scatter_add_(
        1, ids.clamp(min=0), (ids >= 0).float()
    )
    penalised = torch.where(logits2d > 0, logits2d / penalty, logits2d * penalty)
    out = torch.where(counts > 0, penalised, logits2d)
    return out[0] if squeeze else out


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose the next token from logits (V,) or (B, V); returns a () or (B,) long tensor.

    The order is the usual one: temperature first, then top-k, top-p and min-p on the tempered
    distribution, then one draw from what is left. `do_sample=False` or temperature 0 returns the
    argmax (greedy). `generator` makes the draw reproducible without touching the global seed.
    """
    _check_temperature(temperature)
    logits2d, squeeze = _as_2d(logits)
    if not do_sample or temperature == 0:
        choice = logits2d.argmax(dim=-1)
    else:
        x = apply_temperature(logits2d.float(), temperature)
        x = top_k_filter(x, top_k)
        x = top_p_filter(x, top_p)
        x = min_p_filter(x, min_p)
        probs = torch.softmax(x, dim=-1)
        choice = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return choice[0] if squeeze else choice


def mirostat_step(
    logits: torch.Tensor,
    mu: torch.Tensor | float,
    *,
    tau: float,
    eta: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of Mirostat v2 (Basu et al. 2021): sampling that steers the *surprise* of the text.

    The surprise of a token is -log2 p (in bits): 1 bit for a coin flip, many bits for a token the
    model did not expect. Mirostat keeps a threshold mu (start: 2 * tau), drops every token whose
    surprise exceeds mu (the most probable token is always kept), samples from the rest, and then
    nudges the threshold with the error: mu <- mu - eta * (observed surprise - tau). Too surprising a
    token lowers the threshold, too boring a token raises it, so the average surprise settles near
    tau whatever the temperature or the model's confidence.

    logits: (V,) or (B, V) (temperature already applied); mu: float or (B,).
    Returns (tokens, new mu, observed surprise in bits under the model's distribution).
    """
    if not _is_number(tau) or tau <= 0:
        raise ValueError(f"mirostat tau (target surprise, bits) must be > 0, got {tau!r}; try 3.0")
    if not _is_number(eta) or eta <= 0:
        raise ValueError(f"mirostat eta (learning rate) must be > 0, got {eta!r}; try 0.1")
    logits2d, squeeze = _as_2d(logits)
    mu = torch.as_tensor(mu, dtype=torch.float32, device=logits.device).expand(logits2d.shape[0]).clone()
    log_probs = torch.log_softmax(logits2d.float(), dim=-1)
    surprise = -log_probs / math.log(2)
    keep = surprise <= mu[:, None]
    keep.scatter_(-1, log_probs.argmax(dim=-1, keepdim=True), True)
    truncated = log_probs.masked_fill(~keep, float("-inf"))
    tokens = torch.multinomial(torch.softmax(truncated, dim=-1), 1, generator=generator)
    observed = surprise.gather(-1, tokens)[:, 0]
    mu = mu - eta * (observed - tau)
    tokens = tokens[:, 0]
    if squeeze:
        return tokens[0], mu[0], observed[0]
    return tokens, mu, observed


# ----------------------------------------------------------------------------------------------
# Configuration and results


@dataclass
class GeneratorConfig:
    """How to generate. Pass one to `TextGenerator.generate`, or override fields by keyword.

    Decoding method, chosen by the fields that are set:
    greedy (`do_sample=False` or `temperature=0`), sampling (default), beam search (`num_beams > 1`),
    contrastive search (`penalty_alpha` with `top_k`), Mirostat (`mirostat_tau`).
    """

    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0  # 1.0 = off; applies to prompt and generated tokens
    do_sample: bool = True  # False = greedy
    seed: int | None = None  # None = use (and advance) torch's global random state
    stop: str | Sequence[str] | None = None  # stop before the first occurrence of any of these
    eos_token_id: int | Sequence[int] | None = None  # None = the tokenizer's EOS/BOS ids, if it has any
    add_bos: bool | None = None  # None = start with BOS when the tokenizer has one (as llama2.c does)
    use_cache: bool = True  # KV cache: reuse past keys/values instead of recomputing the prefix
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: score = log p / length ** length_penalty
    penalty_alpha: float | None = None  # contrastive search's degeneration penalty (0..1)
    mirostat_tau: float | None = None  # Mirostat v2 target surprise in bits (e.g. 3.0)
    mirostat_eta: float = 0.1  # Mirostat learning rate
    return_logits: bool = False  # greedy/sampling/Mirostat: keep each step's raw logits in result.logits

    def __post_init__(self):
        n = self.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {n!r}; try 200")
        _check_temperature(self.temperature)
        _check_top_k(self.top_k)
        _check_top_p(self.top_p)
        _check_min_p(self.min_p)
        _check_repetition_penalty(self.repetition_penalty)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.num_beams, int) or isinstance(self.num_beams, bool) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an integer >= 1 (1 = no beam search), got {self.num_beams!r}")
        if not _is_number(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}; try 1.0")
        if self.penalty_alpha is not None and (not _is_number(self.penalty_alpha) or not 0 <= self.penalty_alpha <= 1):
            raise ValueError(f"penalty_alpha must lie in [0, 1] (or None), got {self.penalty_alpha!r}; try 0.6")
        if self.penalty_alpha is not None and self.top_k is None:
            raise ValueError("contrastive search (penalty_alpha) needs top_k, the number of candidates; try top_k=4")
        if self.mirostat_tau is not None and (not _is_number(self.mirostat_tau) or self.mirostat_tau <= 0):
            raise ValueError(f"mirostat_tau (target surprise, bits) must be > 0, got {self.mirostat_tau!r}; try 3.0")
        if not _is_number(self.mirostat_eta) or self.mirostat_eta <= 0:
            raise ValueError(f"mirostat_eta must be > 0, got {self.mirostat_eta!r}; try 0.1")
        if sum([self.num_beams > 1, self.penalty_alpha is not None, self.mirostat_tau is not None]) > 1:
            raise ValueError("choose one decoding method: num_beams > 1, penalty_alpha or mirostat_tau")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if isinstance(self.eos_token_id, int) and not isinstance(self.eos_token_id, bool):
            self.eos_token_id = (self.eos_token_id,)
        if self.eos_token_id is not None:
            ids = tuple(self.eos_token_id)
            if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
                raise ValueError(f"eos_token_id must be a token id >= 0 or a list of them, got {self.eos_token_id!r}")
            self.eos_token_id = ids

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @property
    def method(self) -> str:
        """The decoding method these settings select."""
        if self.num_beams > 1:
            return "beam"
        if self.penalty_alpha is not None:
            return "contrastive"
        if self.mirostat_tau is not None:
            return "mirostat"
        return "greedy" if self.greedy else "sample"

    def describe(self) -> str:
        """A one-line summary of the settings that matter for the chosen method."""
        m = self.method
        parts = [m, f"max_new_tokens={self.max_new_tokens}"]
        if m == "sample":
            parts.append(f"temperature={self.temperature:g}")
            parts += [f"{k}={getattr(self, k):g}" for k in ("top_k", "top_p", "min_p") if getattr(self, k) is not None]
        if m == "mirostat":
            parts += [f"tau={self.mirostat_tau:g}", f"eta={self.mirostat_eta:g}", f"temperature={self.temperature:g}"]
        if m == "beam":
            parts += [f"num_beams={self.num_beams}", f"length_penalty={self.length_penalty:g}"]
        if m == "contrastive":
            parts += [f"penalty_alpha={self.penalty_alpha:g}", f"top_k={self.top_k}"]
        if self.repetition_penalty != 1:
            parts.append(f"repetition_penalty={self.repetition_penalty:g}")
        if m in ("sample", "mirostat"):
            parts.append(f"seed={self.seed}")
        if self.stop:
            parts.append(f"stop={list(self.stop)!r}")
        parts.append(f"kv_cache={'on' if self.use_cache else 'off'}")
        return ", ".join(parts)


@dataclass
class GenerationResult:
    """What `TextGenerator` returns. `str(result)` is the generated text.

    text: the continuation (without the prompt, cut before a stop string); tokens: the ids the model
    produced (an end token excluded); stop_reason: "length" (max_new_tokens), "eos" (an end token)
    or "stop" (a stop string); seconds: wall time including the prompt's forward pass;
    stats: method-specific numbers (acceptance rate, beam scores, surprises, ...).
    """

    text: str
    prompt: str
    tokens: list[int]
    prompt_tokens: list[int]
    stop_reason: str
    seconds: float
    logits: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def full_text(self) -> str:
        """Prompt followed by the continuation."""
        return self.prompt + self.text

    def __str__(self) -> str:
        return self.text


class _TextTracker:
    """Follows one row's generated tokens as text: end tokens, stop strings, and streaming.

    Text is re-decoded from all tokens each step (tokenizers like SentencePiece only know the right
    spacing in context). While the text ends with the beginning of a stop string (or an incomplete
    UTF-8 character), that tail is held back, so a stream never shows text it must later take back.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...], eos_ids: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.prompt_text = tokenizer.decode(prompt_ids) if prompt_ids else ""
        self.stop, self.eos_ids = stop, set(eos_ids)
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.reason: str | None = None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def _decode(self) -> str:
        full = self.tokenizer.decode(self.prompt_ids + self.tokens)
        if full.startswith(self.prompt_text):
            return full[len(self.prompt_text):]
        return self.tokenizer.decode(self.tokens)

    def add(self, token: int) -> str:
        """Record one token; return the text that became final (may be empty)."""
        if self.done:
            return ""
        if token in self.eos_ids:
            self.reason = "eos"
            return self.flush()
        self.tokens.append(token)
        text = self._decode()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.reason = text[:cut], "stop"
            return self.flush()
        self.text = text
        hold = 0
        for s in self.stop:  # longest tail of the text that could still become a stop string
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        # Byte-level tokens can end inside a UTF-8 character, which decodes as U+FFFD until the rest
        # arrives: hold such a tail back (a character has at most 4 bytes).
        hold = max(hold, min(4, len(text) - len(text.rstrip("\ufffd"))))
        end = max(self.emitted, len(text) - hold)
        chunk, self.emitted = text[self.emitted:end], end
        return chunk

    def flush(self) -> str:
        chunk, self.emitted = self.text[self.emitted:], len(self.text)
        return chunk


# ----------------------------------------------------------------------------------------------
# The generator


class TextGenerator:
    """Generate text from a model (`TinyTransformerLM` or `LlamaLM`) and its tokenizer.

    The model is put in eval mode (no dropout) and, if `device` is given, moved there. All methods
    take a `GeneratorConfig` and/or keyword overrides of its fields and return `GenerationResult`s:

        generate(prompt, ...)             one prompt (greedy, sampling, beam, contrastive, Mirostat)
        stream(prompt, ...)               the same, yielding text pieces as they are produced
        generate_batch(prompts, ...)      several prompts in one batch, padded on the left
        beam_search(prompt, num_beams)    shortcut for generate(..., num_beams=...)
        contrastive_search(prompt, ...)   shortcut for generate(..., penalty_alpha=..., top_k=...)
        speculative_generate(prompt, draft_model, ...)   a small draft model speeds up a large one

    After each call, `last_result` holds the result (handy after `stream`).

    The context window: a prompt longer than `model.max_seq_len` keeps only its last tokens (with a
    warning), and once generation outgrows the context the oldest tokens are dropped (a sliding
    window, as nanoGPT's `generate` does). Cached keys and values belong to positions that then no
    longer exist, so with the KV cache the last window is re-run instead: past the context, each new
    token costs one full forward pass, as without a cache (see `decoding.ModelStepper`).
    """

    def __init__(self, model, tokenizer, device: str | torch.device | None = None,
                 config: GeneratorConfig | None = None):
        if not hasattr(model, "new_cache") or not hasattr(model, "max_seq_len"):
            raise ValueError(f"TextGenerator needs a tiny_transformer model (TinyTransformerLM or LlamaLM), "
                             f"got {type(model).__name__}")
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.config = config or GeneratorConfig()
        tok_vocab = getattr(tokenizer, "vocab_size", None)
        if tok_vocab is not None and tok_vocab > model.vocab_size:
            raise ValueError(f"the tokenizer has {tok_vocab} tokens but the model only {model.vocab_size}; "
                             "use the tokenizer the model was trained with")
        # Logits beyond the tokenizer's vocabulary (a padded head) are never sampled.
        self.vocab_size = tok_vocab or model.vocab_size
        self.last_result: GenerationResult | None = None

    # -- settings and prompts ------------------------------------------------------------------
    def _config(self, config: GeneratorConfig | None, overrides: dict) -> GeneratorConfig:
        cfg = config or self.config
        if overrides:
            known = {f.name for f in fields(GeneratorConfig)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise ValueError(f"unknown generation setting(s) {unknown}; valid: {', '.join(sorted(known))}")
            cfg = replace(cfg, **overrides)
        return cfg

    def _special(self, name: str) -> int | None:
        value = getattr(self.tokenizer, f"{name}_id", None)
        value = value() if callable(value) else value
        return value if isinstance(value, int) and 0 <= value < self.vocab_size else None

    def _end_ids(self, cfg: GeneratorConfig) -> tuple[int, ...]:
        if cfg.eos_token_id is not None:
            return tuple(cfg.eos_token_id)
        # llama2.c-style data separates documents with BOS, so a BOS also ends a generation.
        return tuple(i for i in (self._special("eos"), self._special("bos")) if i is not None)

    def encode_prompt(self, prompt: str, cfg: GeneratorConfig | None = None) -> list[int]:
        """Prompt -> token ids: validated, BOS added if configured, cropped to the context."""
        cfg = cfg or self.config
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        try:
            ids = list(self.tokenizer.encode(prompt)) if prompt else []
        except ValueError as exc:
            raise ValueError(f"the prompt cannot be encoded: {exc}") from None
        bos = self._special("bos")
        if bos is not None and cfg.add_bos is not False:
            ids = [bos] + ids
        if not ids and bos is not None:
            raise ValueError("the prompt is empty and add_bos=False; give some text or allow the BOS token")
        if not ids:
            raise ValueError("the prompt is empty and this tokenizer has no BOS token to start from; "
                             "give at least one character, e.g. 'ROMEO:' or a newline")
        window = self.model.max_seq_len
        if len(ids) > window:
            warnings.warn(f"the prompt has {len(ids)} tokens but the model's context is {window}; "
                          f"only its last {window} tokens are used", stacklevel=3)
            ids = ids[-window:]
        return ids

    def _rng(self, cfg: GeneratorConfig, device=None) -> torch.Generator | None:
        if cfg.seed is None:
            return None
        return torch.Generator(device=device or self.device).manual_seed(cfg.seed)

    def _processor(self, cfg: GeneratorConfig):
        if cfg.repetition_penalty == 1:
            return None
        return lambda logits, history: apply_repetition_penalty(logits, history, cfg.repetition_penalty)

    # -- the sampling loop ---------------------------------------------------------------------
    def _sample_tokens(self, prompts: list[list[int]], cfg: GeneratorConfig, stats: dict) -> Iterator[torch.Tensor]:
        """Yield one (B,) tensor of next tokens per step (greedy, sampling or Mirostat)."""
        L = max(len(p) for p in prompts)
        batch = torch.full((len(prompts), L), -1, dtype=torch.long)
        for row, ids in enumerate(prompts):
            batch[row, L - len(ids):] = torch.tensor(ids)  # LEFT padding: -1 before the prompt
        stepper = ModelStepper(self.model, batch, use_cache=cfg.use_cache, vocab_size=self.vocab_size,
                               capacity=L + cfg.max_new_tokens)
        rng = self._rng(cfg)
        mu = torch.full((len(prompts),), 2.0 * (cfg.mirostat_tau or 0.0), device=self.device)
        if cfg.mirostat_tau is not None:
            stats["surprise"] = []
        stats["forward_calls"] = 0
        for step in range(cfg.max_new_tokens):
            logits = stepper.logits(1)[:, -1]
            stats["forward_calls"] = stepper.forward_calls
            if cfg.return_logits:
                stats.setdefault("logits", []).append(logits)
            if cfg.repetition_penalty != 1:
                logits = apply_repetition_penalty(logits, stepper.history(), cfg.repetition_penalty)
            if cfg.mirostat_tau is not None:
                tempered = logits / cfg.temperature if cfg.temperature > 0 else apply_temperature(logits, 0)
                tokens, mu, surprise = mirostat_step(tempered, mu, tau=cfg.mirostat_tau, eta=cfg.mirostat_eta,
                                                     generator=rng)
                stats["surprise"].append(surprise.tolist())
            else:
                tokens = sample_next_token(logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                           min_p=cfg.min_p, do_sample=cfg.do_sample, generator=rng)
            yield tokens
            if step + 1 < cfg.max_new_tokens:
                stepper.append(tokens)  # fed on the next step's logits() call

    # -- driving any token source into text ----------------------------------------------------
    def _run(self, prompts: list[str], ids: list[list[int]], cfg: GeneratorConfig, source: Callable) -> Iterator:
        """Generic driver: feeds tokens from `source(prompt_ids, stats)` into text trackers.

        A generator: yields (row, text piece) as text becomes final, returns the results.
        """
        end_ids = self._end_ids(cfg)
        trackers = [_TextTracker(self.tokenizer, i, cfg.stop, end_ids) for i in ids]
        stats: dict = {"method": cfg.method}
        start = time.perf_counter()
        produced = 0
        tokens_iter = source(ids, stats) if cfg.max_new_tokens > 0 else iter(())
        try:
            while produced < cfg.max_new_tokens and not all(t.done for t in trackers):
                # Inference mode only while the model works, never while suspended at a `yield`
                # (the caller's own code between two streamed pieces must run in normal mode).
                with torch.inference_mode():
                    new = next(tokens_iter, None)
                if new is None:
                    break
                if isinstance(new, torch.Tensor):
                    rows = new.view(len(prompts), -1).tolist()
                else:
                    rows = [[new]] if isinstance(new, int) else [list(new)]
                for row, tracker in enumerate(trackers):
                    for tok in rows[row]:
                        piece = tracker.add(int(tok))
                        if piece:
                            yield row, piece
                produced += len(rows[0])
        finally:
            if hasattr(tokens_iter, "close"):
                tokens_iter.close()
        seconds = time.perf_counter() - start
        results = []
        for row, tracker in enumerate(trackers):
            piece = tracker.flush()
            if piece:
                yield row, piece
            logits = None
            if "logits" in stats:
                logits = torch.stack([step[row] for step in stats["logits"]])
            row_stats = {k: v for k, v in stats.items() if k != "logits"}
            if "surprise" in row_stats:
                row_stats["surprise"] = [s[row] for s in row_stats["surprise"]]
            results.append(GenerationResult(
                text=tracker.text, prompt=prompts[row], tokens=tracker.tokens, prompt_tokens=ids[row],
                stop_reason=tracker.reason or "length", seconds=seconds, logits=logits, stats=row_stats,
            ))
        return results

    def _source(self, cfg: GeneratorConfig, batch: bool) -> Callable:
        method = cfg.method
        if method in ("greedy", "sample", "mirostat"):
            return lambda ids, stats: self._sample_tokens(ids, cfg, stats)
        if batch:
            raise ValueError(f"{method} search runs one prompt at a time; call generate() for each prompt")
        if method == "contrastive":
            return lambda ids, stats: contrastive_search(
                self.model, ids[0], top_k=cfg.top_k, penalty_alpha=cfg.penalty_alpha,
                max_new_tokens=cfg.max_new_tokens, use_cache=cfg.use_cache, vocab_size=self.vocab_size,
                process=self._processor(cfg))
        return self._beam_source(cfg)

    def _beam_source(self, cfg: GeneratorConfig) -> Callable:
        def source(ids, stats):
            hyps = beam_search(self.model, ids[0], num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                               eos_token_ids=self._end_ids(cfg), length_penalty=cfg.length_penalty,
                               use_cache=cfg.use_cache, vocab_size=self.vocab_size, process=self._processor(cfg))
            stats["score"] = hyps[0][1]
            stats["hypotheses"] = [(self.tokenizer.decode(seq), score) for seq, score in hyps]
            yield torch.tensor([hyps[0][0]])  # the best beam is known only at the end
        return source

    @staticmethod
    def _drain(events, on_text=None):
        while True:
            try:
                row, piece = next(events)
            except StopIteration as stop:
                return stop.value
            if on_text is not None:
                on_text(row, piece)

    # -- public API ----------------------------------------------------------------------------
    def generate(self, prompt: str, config: GeneratorConfig | None = None, *,
                 callback: Callable[[str], None] | None = None, **overrides) -> GenerationResult:
        """Continue `prompt`; returns a `GenerationResult` (`print(result)` shows the text).

        `callback(piece)` is called with each piece of text as soon as it is final.
        Example: `gen.generate("ROMEO:", max_new_tokens=100, temperature=0.8, top_k=40, seed=1)`.
        """
        cfg = self._config(config, overrides)
        source = self._source(cfg, batch=False)
        events = self._run([prompt], [self.encode_prompt(prompt, cfg)], cfg, source)
        result = self._drain(events, None if callback is None else lambda _row, piece: callback(piece))[0]
        self.last_result = result
        return result

    def stream(self, prompt: str, config: GeneratorConfig | None = None, **overrides) -> Iterator[str]:
        """Like `generate`, but yields text pieces as they are produced:

            for piece in gen.stream("ROMEO:", max_new_tokens=200):
                print(piece, end="", flush=True)

        The full result is in `gen.last_result` once the loop ends.
        """
        cfg = self._config(config, overrides)
        source = self._source(cfg, batch=False)
        # Checked and encoded now, so that bad input fails at the call, not at the first `next()`.
        events = self._run([prompt], [self.encode_prompt(prompt, cfg)], cfg, source)

        def pieces():
            while True:
                try:
                    _, piece = next(events)
                except StopIteration as stop:
                    self.last_result = stop.value[0]
                    return
                yield piece

        return pieces()

    def generate_batch(self, prompts: Sequence[str], config: GeneratorConfig | None = None, *,
                       callback: Callable[[int, str], None] | None = None, **overrides) -> list[GenerationResult]:
        """Generate for several prompts in ONE batch; returns one result per prompt.

        Prompts of different lengths are padded on the LEFT and the padding is masked out, so every
        row ends on its last real token and counts positions from its own first token: each result
        is what `generate` gives for that prompt alone (greedy: the same tokens). `callback(row,
        piece)` streams text. Sampling with a seed is reproducible, but draws differ from one-by-one.
        """
        if isinstance(prompts, str) or not prompts:
            raise ValueError("generate_batch needs a non-empty list of prompt strings")
        cfg = self._config(config, overrides)
        source = self._source(cfg, batch=True)
        events = self._run(list(prompts), [self.encode_prompt(p, cfg) for p in prompts], cfg, source)
        results = self._drain(events, callback)
        self.last_result = results[-1]
        return results

    def beam_search(self, prompt: str, num_beams: int = 4, config: GeneratorConfig | None = None,
                    **overrides) -> GenerationResult:
        """Beam search (see `decoding.beam_search`); `result.stats["hypotheses"]` lists every finished
        beam as (text, score), best first. Sampling settings (temperature, top-k, ...) do not apply."""
        return self.generate(prompt, config, num_beams=num_beams, **overrides)

    def contrastive_search(self, prompt: str, penalty_alpha: float = 0.6, top_k: int = 4,
                           config: GeneratorConfig | None = None, **overrides) -> GenerationResult:
        """Contrastive search (see `decoding.contrastive_search`): probable tokens that do not make
        the model's hidden state repeat an earlier one."""
        return self.generate(prompt, config, penalty_alpha=penalty_alpha, top_k=top_k, **overrides)

    def speculative_generate(self, prompt: str, draft_model, num_draft_tokens: int = 4,
                             config: GeneratorConfig | None = None, *, callback=None,
                             **overrides) -> GenerationResult:
        """Speculative decoding: `draft_model` (small, same tokenizer) proposes `num_draft_tokens`
        tokens, this generator's model checks them in one pass (see `decoding.speculative_decode`).

        Greedy output is identical to `generate(..., do_sample=False)`; sampled output follows the
        same distribution as plain sampling (with the same temperature/top-k/top-p/min-p/repetition
        penalty). `result.stats["acceptance_rate"]` is the fraction of draft tokens kept.
        """
        cfg = self._config(config, overrides)
        if not isinstance(num_draft_tokens, int) or isinstance(num_draft_tokens, bool) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}; try 4")
        if cfg.method not in ("greedy", "sample"):
            raise ValueError(f"speculative decoding works with greedy decoding or sampling, not {cfg.method}")
        if not hasattr(draft_model, "new_cache") or draft_model.vocab_size < self.vocab_size:
            raise ValueError("the draft model must be a tiny_transformer model with the same tokenizer "
                             f"(vocab_size >= {self.vocab_size})")
        draft_model = draft_model.to(self.device).eval()

        def to_probs(logits, history):
            if cfg.repetition_penalty != 1:
                logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty)
            if cfg.greedy:
                return torch.softmax(logits, dim=-1)  # only the argmax matters
            x = top_k_filter(apply_temperature(logits, cfg.temperature), cfg.top_k)
            return torch.softmax(min_p_filter(top_p_filter(x, cfg.top_p), cfg.min_p), dim=-1)

        def source(ids, stats):
            stats["method"] = "speculative " + cfg.method
            stats["num_draft_tokens"] = num_draft_tokens
            return speculative_decode(
                self.model, draft_model, ids[0], max_new_tokens=cfg.max_new_tokens,
                num_draft_tokens=num_draft_tokens, to_probs=to_probs, greedy=cfg.greedy,
                generator=self._rng(cfg, device="cpu"), use_cache=cfg.use_cache, vocab_size=self.vocab_size,
                stats=stats)

        events = self._run([prompt], [self.encode_prompt(prompt, cfg)], cfg, source)
        result = self._drain(events, None if callback is None else lambda _row, piece: callback(piece))[0]
        self.last_result = result
        return result
