"""Decoding machinery: feeding a model step by step, and the search methods built on top of it.

`sampling.py` holds the simple, per-step choices (temperature, top-k, top-p, ...) and the friendly
`TextGenerator`. This module holds the parts that drive the model itself:

* `ModelStepper` — keeps the token buffer, the KV cache, left padding and the context window in
  one place, so every decoding method below is a short loop over "append tokens, get logits";
* `beam_search` — keep the `num_beams` most probable partial sequences instead of one;
* `speculative_decode` / `speculative_accept` — a small draft model proposes a few tokens, the big
  target model checks them all in one forward pass; the accept/reject rule makes the output follow
  the target's distribution exactly;
* `contrastive_search` — pick among the top-k tokens the one that is probable *and* whose hidden
  state is unlike everything said so far (a penalty against repeating oneself).

Every function here works with both model families (`TinyTransformerLM`, `LlamaLM`): they share the
forward signature `model(idx, cache=..., attention_mask=..., last_only=...)` and `model.new_cache()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

# A function that turns raw next-token logits (N, V) into the logits to decode with, given the
# tokens each row has seen so far (N, L; -1 marks padding). Used for repetition penalties etc.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ModelStepper:
    """Feeds a growing batch of token sequences to a model and hands back next-token logits.

    tokens: (B, L) prompt ids, with -1 where a shorter prompt was padded on the LEFT.

    The bookkeeping it hides:

    * **KV cache** (`use_cache=True`): only tokens the model has not processed yet are fed; the keys
      and values of earlier tokens are reused. Without a cache, every call re-runs the whole sequence
      (simpler, and the reference the cache is tested against).
    * **Left padding**: padded slots are fed as token 0 together with an attention mask of 0s there;
      the model then skips them and counts positions from each row's first real token, so every row
      computes exactly what it would alone.
    * **The context window**: a model has no position beyond `model.max_seq_len`. When the
      sequence grows longer, the oldest tokens are dropped (a *sliding window*). The cached keys were
      computed at the old positions, so the cache is rebuilt from the last window: past the context
      each new token costs one full window forward, the same as without a cache. Logits for several
      positions at once (`logits(num)`) are exactly what asking after each position in turn would
      give: past the context every position has a window of its own, and those windows run as one
      batch (the compute of as many single steps, in one call).
    * **Rollback**: `truncate(n)` forgets tokens after the first n (speculative decoding), and
      `reorder(index)` picks, duplicates or drops batch rows (beam and contrastive search).
    """

    def __init__(self, model, tokens: torch.Tensor, *, use_cache: bool = True, vocab_size: int | None = None,
                 capacity: int | None = None):
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape (batch, length >= 1), got {tuple(tokens.shape)}")
        self.model = model
        self.device = next(model.parameters()).device
        self.window = int(model.max_seq_len)
        self.vocab_size = vocab_size or model.vocab_size
        B, L = tokens.shape
        capacity = max(capacity or 0, L + 1)
        self.tokens = torch.full((B, capacity), -1, dtype=torch.long, device=self.device)
        self.tokens[:, :L] = tokens.to(self.device)
        self.length = L
        # Padding only ever exists in the prompt, so this is decided once.
        self.padded = bool((tokens < 0).any())
        if self.padded and bool((tokens[:, -1] < 0).any()):
            raise ValueError("pad prompts on the LEFT: the last column must hold a real token in every row")
        self.cache = model.new_cache(B) if use_cache else None
        self.cache_start = 0  # buffer column of the first token held in the cache
        self.forward_calls = 0

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def sequence(self, row: int = 0) -> list[int]:
        """The real (unpadded) tokens of one row so far."""
        ids = self.tokens[row, : self.length]
        return ids[ids >= 0].tolist()

    def history(self) -> torch.Tensor:
        """(B, length) view of all tokens so far, -1 where padded."""
        return self.tokens[:, : self.length]

    def append(self, new: torch.Tensor) -> None:
        """Append one token per row ((B,) tensor) or several ((B, T) tensor)."""
        new = new.to(self.device).view(self.batch_size, -1)
        end = self.length + new.shape[1]
        if end > self.tokens.shape[1]:  # grow rarely: double the buffer
            grown = torch.full((self.batch_size, max(end, 2 * self.tokens.shape[1])), -1,
                               dtype=torch.long, device=self.device)
            grown[:, : self.length] = self.tokens[:, : self.length]
            self.tokens = grown
        self.tokens[:, self.length:end] = new
        self.length = end

    def truncate(self, n: int) -> None:
        """Forget every token after the first `n` (and roll the cache back with `cache.crop`)."""
        if not 1 <= n <= self.length:
            raise ValueError(f"cannot truncate a sequence of {self.length} tokens to {n}")
        self.tokens[:, n: self.length] = -1
        self.length = n
        if self.cache is not None and self.cache_start + self.cache.length > n:
            self.cache.crop(max(0, n - self.cache_start))

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (rows may repeat: beam search copies its best beams)."""
        index = index.to(self.device)
        self.tokens = self.tokens[index]
        if self.cache is not None:
            self.cache.reorder(index)

    def logits(self, num: int = 1) -> torch.Tensor:
        """(B, num, V) float32 logits predicting the token after each of the last `num` positions.

        Feeds whatever the model has not seen yet. `num > 1` is what speculative decoding needs to
        check several draft tokens in one pass. Each position is conditioned on what one-at-a-time
        generation would have fed the model at that point: the last `model.max_seq_len` tokens up to
        and including it, the first of them at position 0.
        """
        n = self.length
        if not 1 <= num <= min(n, self.window):
            raise ValueError(f"can return logits for 1..{min(n, self.window)} positions, not {num}")
        first = n - num + 1  # sequence length seen by the first of the `num` positions
        if n <= self.window or num == 1:
            return self._window_logits(n, num)
        # Past the context, the position after m tokens sees tokens[m - window : m]: one window per
        # position. Positions with m <= window still share the window starting at token 0.
        inside = max(0, self.window - first + 1)
        parts = [self._window_logits(self.window, inside)] if inside else []
        parts.append(self._sliding_logits(first + inside, n))
        return torch.cat(parts, dim=1)

    def _window_logits(self, end: int, num: int) -> torch.Tensor:
        """Logits after each of tokens[:end]'s last `num` positions, all inside one window: the one
        that ends at `end` (which must hold every one of them: `num == 1` or `end <= window`)."""
        if self.cache is None:
            start = max(0, end - self.window)
            return self._forward(start, end, num, None, start)
        if end - self.cache_start > self.window or end - num < self.cache_start:
            # Outgrew the context (or rolled back before the window): rebuild from the last window.
            self.cache_start = max(0, end - self.window)
            self.cache.crop(0)
        elif self.cache_start + self.cache.length > end - num:
            # Logits were asked for positions already in the cache (after a rollback): redo them.
            self.cache.crop(end - num - self.cache_start)
        return self._forward(self.cache_start + self.cache.length, end, num, self.cache, self.cache_start)

    def _sliding_logits(self, first: int, last: int) -> torch.Tensor:
        """Logits after m tokens for every m in [first, last] (all > window), each computed from its
        own window tokens[m - window : m], as one batch of (last - first + 1) * B rows. The cache is
        not used (each window has different positions) and is left as it was."""
        W, B = self.window, self.batch_size
        count = last - first + 1
        ids = self.tokens[:, first - W: last].unfold(1, W, 1).reshape(B * count, W)
        mask = None
        if self.padded:
            mask = (ids >= 0).long()
            ids = ids.clamp(min=0)
        self.forward_calls += 1
        logits, _ = self.model(ids, attention_mask=mask, last_only=True)
        return logits[:, -1, : self.vocab_size].float().view(B, count, -1)

    def _forward(self, a: int, b: int, num: int, cache, mask_start: int) -> torch.Tensor:
        """Run tokens[:, a:b] through the model; the mask covers [mask_start, b)."""
        ids = self.tokens[:, a:b]
        mask = None
        if self.padded:
            mask = (self.tokens[:, mask_start:b] >= 0).long()
            ids = ids.clamp(min=0)
        self.forward_calls += 1
        logits, _ = self.model(ids, cache=cache, attention_mask=mask, last_only=num == 1)
        return logits[:, -num:, : self.vocab_size].float()


# ----------------------------------------------------------------------------------------------
# Beam search


def beam_search(
    model,
    prompt_ids: list[int],
    *,
    num_beams: int = 4,
    max_new_tokens: int = 50,
    eos_token_ids: tuple[int, ...] = (),
    length_penalty: float = 1.0,
    use_cache: bool = True,
    vocab_size: int | None = None,
    process: LogitsProcessor | None = None,
) -> list[tuple[list[int], float]]:
    """Approximate the most probable continuation by keeping the `num_beams` best partial ones.

    Greedy decoding commits to the single best token at each step; a token that looks slightly worse
    now can lead to a much better sequence later. Beam search keeps `num_beams` candidates ("beams"),
    extends each by every token, and keeps the best `num_beams` of all extensions by total
    log-probability. All beams run as one batch; `cache.reorder` copies the surviving beams' caches.

    A beam that emits an end token is finished; finished sequences are ranked by
    `sum log p / length ** length_penalty` (a penalty > 0 stops short sequences from winning just
    because they have fewer negative terms). Search stops after `max_new_tokens`, or once `num_beams`
    sequences are finished and the best running beam scores below the worst of them (exact for
    length_penalty = 0, where scores can only fall; the usual heuristic otherwise).

    Returns up to `num_beams` `(new_tokens, score)` pairs, best first (a finished one ends with its
    end token).
    """
    device = next(model.parameters()).device
    stepper = ModelStepper(model, torch.tensor([prompt_ids]), use_cache=use_cache, vocab_size=vocab_size,
                           capacity=len(prompt_ids) + max_new_tokens)
    if max_new_tokens == 0:
        return [([], 0.0)]
    logits = stepper.logits(1)[:, -1]
    stepper.reorder(torch.zeros(num_beams, dtype=torch.long))  # every beam starts from the prompt
    logits = logits.expand(num_beams, -1)
    # Only beam 0 is "real" at the start; the others would duplicate it, so they start at -inf.
    scores = torch.full((num_beams,), float("-inf"), device=device)
    scores[0] = 0.0
    L = len(prompt_ids)
    finished: list[tuple[list[int], float]] = []

    def normalised(score: float, length: int) -> float:
        return score / max(length, 1) ** length_penalty

    for step in range(max_new_tokens):
        if process is not None:
            logits = process(logits, stepper.history())
        logp = torch.log_softmax(logits, dim=-1)
        V = logp.shape[-1]
        total = (scores[:, None] + logp).view(-1)
        # 2 * num_beams candidates: enough to refill every beam even if num_beams of them end.
        top_scores, top_flat = total.topk(min(2 * num_beams, total.numel()))
        keep_beam, keep_tok, keep_score = [], [], []
        for s, flat in zip(top_scores.tolist(), top_flat.tolist()):
            beam, tok = divmod(flat, V)
            if s == float("-inf"):
                break
            if tok in eos_token_ids:
                seq = stepper.tokens[beam, L: stepper.length].tolist() + [tok]
                finished.append((seq, normalised(s, len(seq))))
                continue
            keep_beam.append(beam)
            keep_tok.append(tok)
            keep_score.append(s)
            if len(keep_beam) == num_beams:
                break
        if not keep_beam:
            break
        while len(keep_beam) < num_beams:  # pad with dead beams (can only happen for tiny vocabularies)
            keep_beam.append(keep_beam[0])
            keep_tok.append(keep_tok[0])
            keep_score.append(float("-inf"))
        index = torch.tensor(keep_beam, device=device)
        scores = torch.tensor(keep_score, device=device)
        stepper.reorder(index)
        stepper.append(torch.tensor(keep_tok, device=device))
        if len(finished) >= num_beams:
            worst = sorted(f[1] for f in finished)[-num_beams]
            best_running = normalised(float(scores.max()), step + 1)
            if best_running <= worst:
                break
        if step + 1 < max_new_tokens:
            logits = stepper.logits(1)[:, -1]

    for beam in range(num_beams):
        s = float(scores[beam])
        if s > float("-inf"):
            seq = stepper.tokens[beam, L: stepper.length].tolist()
            finished.append((seq, normalised(s, len(seq))))
    finished.sort(key=lambda f: f[1], reverse=True)
    return finished[:num_beams]


# ----------------------------------------------------------------------------------------------
# Speculative decoding


def speculative_accept(
    p: torch.Tensor,
    q: torch.Tensor,
    draft: torch.Tensor,
    *,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[list[int], int]:
    """Decide which draft tokens to keep. Returns (new tokens, number of draft tokens accepted).

    p: (k + 1, V) target probabilities at the k draft positions plus the one after them;
    q: (k, V) draft probabilities the draft tokens were sampled from; draft: (k,) token ids.

    Sampling (Leviathan et al. 2023, Chen et al. 2023): accept draft token x with probability
    min(1, p(x) / q(x)). At the first rejection, sample a replacement from the *residual*
    distribution norm(max(0, p - q)) and stop. If all k are accepted, sample a bonus token from the
    last row of p. Whatever q is, every emitted token is distributed exactly as p: where the draft
    over-proposes a token it is thinned out, and the residual adds back what it under-proposed.

    Greedy: keep draft tokens while they equal the target's argmax; the first mismatch is replaced by
    the target's argmax. The output is then identical to greedy decoding with the target alone.
    """
    k = draft.shape[0]
    out: list[int] = []
    for i in range(k):
        x = int(draft[i])
        if greedy:
            best = int(p[i].argmax())
            if best == x:
                out.append(x)
                continue
            return out + [best], i
        r = float(torch.rand((), generator=generator))
        if r * float(q[i, x]) <= float(p[i, x]):  # r < p/q without dividing by a tiny q
            out.append(x)
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: rejection was a rounding accident
            residual = p[i]
        t = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
        return out + [t], i
    bonus = int(p[k].argmax()) if greedy else int(torch.multinomial(p[k], 1, generator=generator))
    return out + [bonus], k


def speculative_decode(
    target,
    draft,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    num_draft_tokens: int = 4,
    to_probs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    greedy: bool = False,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
    stats: dict | None = None,
) -> Iterator[list[int]]:
    """Yield lists of new tokens, one list per draft-and-verify round (batch of one prompt).

    Each round: the draft model proposes `num_draft_tokens` tokens one at a time (cheap), then the
    target model scores all of them in ONE forward pass (its cost is close to that of one token when
    the model is memory-bound), and `speculative_accept` keeps a prefix. Both models' KV caches are
    rolled back past the rejected tokens with `cache.crop`.

    Every target prediction is conditioned exactly as in plain generation (`ModelStepper.logits`),
    so greedy output equals the target's own greedy decoding at any length. Past the target's
    context window that means one window of the last `max_seq_len` tokens per checked position: the
    check then runs k + 1 windows as one batch, the compute of k + 1 plain steps, so the gain there
    comes only from making fewer, batched calls.

    to_probs(logits (N, V), history (N, L)) -> probabilities: the same processing (temperature,
    top-k, ...) is applied to both models, so the output follows the *processed* target
    distribution. `stats` (if given) receives rounds, drafted, accepted and acceptance_rate.
    """
    k = num_draft_tokens
    vocab = vocab_size or target.vocab_size
    prompt = torch.tensor([prompt_ids])
    cap = len(prompt_ids) + max_new_tokens + k + 1
    tgt = ModelStepper(target, prompt, use_cache=use_cache, vocab_size=vocab, capacity=cap)
    dft = ModelStepper(draft, prompt, use_cache=use_cache, vocab_size=vocab, capacity=cap)
    stats = {} if stats is None else stats
    stats.update(rounds=0, drafted=0, accepted=0, acceptance_rate=0.0)
    produced = 0
    while produced < max_new_tokens:
        n = tgt.length
        # At most as many drafts as tokens still wanted and as the target's window can check at once.
        k_now = max(1, min(k, max_new_tokens - produced - 1, tgt.window - 1))
        q_rows, drafts = [], []
        for _ in range(k_now):
            q_i = to_probs(dft.logits(1)[:, -1], dft.history())[0]
            x = q_i.argmax() if greedy else torch.multinomial(q_i.cpu(), 1, generator=generator)[0]
            q_rows.append(q_i.cpu())
            drafts.append(int(x))
            dft.append(torch.tensor([[int(x)]]))
        drafts_t = torch.tensor(drafts)
        tgt.append(drafts_t.view(1, -1))
        logits = tgt.logits(k_now + 1)[0]  # (k_now + 1, V): after the last real token and each draft
        hist = tgt.history()
        # Row i is conditioned on the prompt plus the first i drafts: give each its own history.
        p = torch.cat([to_probs(logits[i: i + 1], hist[:, : n + i]) for i in range(k_now + 1)]).cpu()
        new, accepted = speculative_accept(p, torch.stack(q_rows), drafts_t, greedy=greedy,
                                           generator=generator)
        tgt.truncate(n + accepted)
        dft.truncate(n + accepted)
        last = torch.tensor([[new[-1]]])
        tgt.append(last)
        dft.append(last)
        stats["rounds"] += 1
        stats["drafted"] += k_now
        stats["accepted"] += accepted
        stats["acceptance_rate"] = stats["accepted"] / stats["drafted"]
        new = new[: max_new_tokens - produced]
        produced += len(new)
        yield new


# ----------------------------------------------------------------------------------------------
# Contrastive search


def contrastive_search(
    model,
    prompt_ids: list[int],
    *,
    top_k: int = 4,
    penalty_alpha: float = 0.6,
    max_new_tokens: int = 50,
    use_cache: bool = True,
    vocab_size: int | None = None,
    process: LogitsProcessor | None = None,
) -> Iterator[int]:
    """Yield tokens chosen by contrastive search (Su et al. 2022, "A Contrastive Framework for
    Neural Text Generation").

    Among the top-k most probable next tokens v, pick the one maximising

        (1 - alpha) * p(v | context)  -  alpha * max_j cos(h_v, h_j)

    where h_v is the model's final hidden state after appending v, and h_j are the hidden states
    of the tokens already in the context. The second term (the *degeneration penalty*) punishes
    tokens that would make the model's state look like an earlier one, which is what happens when
    a model starts repeating itself. alpha = 0 is greedy decoding.

    Hidden states: we read the output of the model's final norm (`model.norm`, present in both
    model families) with a forward hook, so the model needs no extra output. All k candidates run
    as one batch of k rows that share the context (`reorder` copies the winner's cache to every row).
    """
    norm = getattr(model, "norm", None)
    if norm is None:
        raise ValueError("contrastive search reads hidden states from the model's final norm `model.norm`, "
                         f"which {type(model).__name__} does not have")
    captured: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda _m, _inp, out: captured.append(out))
    try:
        stepper = ModelStepper(model, torch.tensor([prompt_ids]), use_cache=use_cache, vocab_size=vocab_size,
                               capacity=len(prompt_ids) + max_new_tokens)
        logits = stepper.logits(1)[:, -1]
        context = captured.pop()[0].float()  # (L, D) hidden states of the prompt
        captured.clear()
        k = min(top_k, logits.shape[-1])
        stepper.reorder(torch.zeros(k, dtype=torch.long))
        for _ in range(max_new_tokens):
            if process is not None:
                logits = process(logits, stepper.history()[:1])
            probs = torch.softmax(logits[0], dim=-1)
            top_p, top_ids = probs.topk(k)
            stepper.append(top_ids)
            cand_logits = stepper.logits(1)[:, -1]  # (k, V)
            h = captured.pop()[:, -1].float()  # (k, D): hidden state of each candidate
            captured.clear()
            sim = F.normalize(h, dim=-1) @ F.normalize(context, dim=-1).T  # (k, L) cosine similarities
            score = (1 - penalty_alpha) * top_p - penalty_alpha * sim.max(dim=-1).values
            best = int(score.argmax())
            yield int(top_ids[best])
            stepper.reorder(torch.full((k,), best, dtype=torch.long))
            context = torch.cat([context, h[best: best + 1]])[-stepper.window:]
            logits = cand_logits[best: best + 1]
    finally:
        handle.remove()
