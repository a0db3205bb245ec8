"""Tests for tiny_transformer.sampling and tiny_transformer.decoding (tiny random models, d_model 32)."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from tiny_transformer.decoding import ModelStepper, speculative_accept
from tiny_transformer.model import LlamaConfig, LlamaLM, TinyTransformerLM, TransformerConfig
from tiny_transformer.sampling import (
    GeneratorConfig,
    TextGenerator,
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    mirostat_step,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)
from tiny_transformer.tokenizers import CharTokenizer

INF = float("-inf")
CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYabcdefghijklmnopqrstuvwxyz"  # 60 characters, no 'Z'
TOK = CharTokenizer(CHARS)
V = len(CHARS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gpt(seed=0, vocab=V, sharpen=1.0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_seq_len=48)
    model = TinyTransformerLM(TransformerConfig(**{**cfg, **overrides})).eval()
    return _sharpen(model, sharpen)


def llama(seed=0, vocab=V, sharpen=1.0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=48)
    model = LlamaLM(LlamaConfig(**{**cfg, **overrides})).eval()
    return _sharpen(model, sharpen)


def _sharpen(model, factor):
    """Scale the output head: a random model's near-uniform predictions become confident ones."""
    with torch.no_grad():
        model.output.weight.mul_(factor)
    return model


MODELS = {
    "gpt-learned": lambda: gpt(),
    "gpt-rope-gqa": lambda: gpt(pos_encoding="rope", n_kv_heads=2, norm="rmsnorm", activation="swiglu"),
    "llama-gqa": lambda: llama(),
    "llama-untied-padded-window": lambda: llama(tie_embeddings=False, pad_vocab_multiple=64, sliding_window=16,
                                                qk_norm=True, logit_softcap=10.0),
}


@torch.no_grad()
def argmax_loop(model, ids, n):
    """The textbook greedy loop: run the whole (cropped) sequence, take the argmax, append."""
    ids = list(ids)
    for _ in range(n):
        x = torch.tensor([ids[-model.max_seq_len:]])
        logits, _ = model(x)
        ids.append(int(logits[0, -1, : len(CHARS)].argmax()))
    return ids


# ----------------------------------------------------------------------------------------------
# The pure functions, against hand-computed examples


def probs_logits(*probs):
    return torch.tensor(probs).log()


def test_apply_temperature():
    logits = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(apply_temperature(logits, 2.0), torch.tensor([0.5, 1.0, 2.0]))
    assert torch.equal(apply_temperature(logits, 1.0), logits)
    assert apply_temperature(logits, 0).tolist() == [INF, INF, 4.0]  # T = 0 is greedy
    entropy = [torch.distributions.Categorical(logits=apply_temperature(logits, t)).entropy() for t in (0.5, 1, 2)]
    assert entropy[0] < entropy[1] < entropy[2]  # hotter = flatter


def test_top_k_filter():
    assert top_k_filter(torch.tensor([1.0, 3.0, 2.0, 0.0]), 2).tolist() == [INF, 3.0, 2.0, INF]
    assert top_k_filter(torch.tensor([1.0, 3.0, 2.0, 0.0]), 1).tolist() == [INF, 3.0, INF, INF]
    assert top_k_filter(torch.tensor([2.0, 3.0, 2.0, 0.0]), 2).tolist() == [2.0, 3.0, 2.0, INF]  # ties kept
    x = torch.tensor([[1.0, 3.0, 2.0], [5.0, 4.0, 6.0]])
    assert top_k_filter(x, 2).tolist() == [[INF, 3.0, 2.0], [5.0, INF, 6.0]]
    assert torch.equal(top_k_filter(x, 3), x) and top_k_filter(x, None) is x


def test_top_p_filter():
    # probabilities 0.15, 0.5, 0.05, 0.3 -> sorted 0.5, 0.3, 0.15, 0.05; cumulative 0.5, 0.8, 0.95, 1.0
    logits = probs_logits(0.15, 0.5, 0.05, 0.3)
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False]  # 0.5 alone reaches 0.4
    assert kept(0.75) == [False, True, False, True]  # 0.5 + 0.3 = 0.8 >= 0.75
    assert kept(0.9) == [True, True, False, True]  # 0.95 >= 0.9
    assert kept(1.0) == [True, True, True, True]
    torch.testing.assert_close(top_p_filter(logits, 0.75)[1], logits[1])  # kept values unchanged
    batch = torch.stack([logits, probs_logits(0.7, 0.1, 0.1, 0.1)])
    assert torch.isfinite(top_p_filter(batch, 0.6)).tolist() == [[False, True, False, True], [True, False, False, False]]


def test_min_p_filter():
    logits = probs_logits(0.5, 0.3, 0.15, 0.05)
    kept = lambda m: torch.isfinite(min_p_filter(logits, m)).tolist()  # noqa: E731
    assert kept(0.2) == [True, True, True, False]  # threshold 0.2 * 0.5 = 0.1
    assert kept(0.5) == [True, True, False, False]  # threshold 0.25
    assert kept(0.7) == [True, False, False, False]  # threshold 0.35
    assert kept(0.0) == [True, True, True, True]
    # the cut-off follows the model's confidence: a flat distribution keeps everything at 0.5
    assert torch.isfinite(min_p_filter(probs_logits(0.3, 0.25, 0.25, 0.2), 0.5)).all()


def test_repetition_penalty_semantics():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    # present tokens: positive divided, negative multiplied (once, however often they occur); others untouched
    assert out.tolist() == [1.0, -2.0, 0.5, -3.0]
    assert apply_repetition_penalty(logits, torch.tensor([3]), 1.0).tolist() == logits.tolist()
    assert apply_repetition_penalty(logits, torch.tensor([0]), 0.5).tolist() == [4.0, -1.0, 0.5, -3.0]  # < 1 rewards
    # batches: each row has its own history; -1 (left padding) is ignored
    batch = apply_repetition_penalty(logits.repeat(2, 1), torch.tensor([[-1, 2], [3, 3]]), 2.0)
    assert batch.tolist() == [[2.0, -1.0, 0.25, -3.0], [2.0, -1.0, 0.5, -6.0]]


def test_sample_next_token():
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 1.0]])
    assert sample_next_token(logits, do_sample=False).tolist() == [1, 0]
    assert sample_next_token(logits, temperature=0).tolist() == [1, 0]
    assert sample_next_token(logits[0], do_sample=False).shape == ()
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a = [int(sample_next_token(logits[0], generator=g())) for _ in range(3)]
    assert len(set(a)) == 1  # same generator seed, same draw
    # frequencies follow softmax(logits / T) restricted to the top-k tokens
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([1.0, 0.0, 2.0, -1.0]).repeat(20000, 1)
    draws = sample_next_token(x, temperature=0.5, top_k=2, generator=gen)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    expected = torch.softmax(torch.tensor([1.0, INF, 2.0, INF]) / 0.5, dim=-1)
    assert (freq - expected).abs().max() < 0.015


def test_mirostat_keeps_surprise_near_target():
    # A toy "model" with a fixed Zipf-like distribution over 200 tokens (entropy ~5.6 bits).
    logits = -1.1 * torch.arange(1, 201).float().log()
    gen = torch.Generator().manual_seed(0)
    for tau in (2.0, 4.0):
        mu, surprises = 2 * tau, []
        for _ in range(3000):
            _, mu, s = mirostat_step(logits, mu, tau=tau, eta=0.1, generator=gen)
            surprises.append(float(s))
        mean = sum(surprises[1000:]) / 2000
        assert abs(mean - tau) < 0.25, (tau, mean)


# ----------------------------------------------------------------------------------------------
# TextGenerator: greedy, seeds, cache


def test_greedy_equals_argmax_loop():
    model = gpt()
    gen = TextGenerator(model, TOK)
    ids = TOK.encode("ROMEO:")
    for n in (1, 20, 60):  # 60 runs past the context of 48: the window slides
        result = gen.generate("ROMEO:", max_new_tokens=n, do_sample=False)
        assert result.tokens == argmax_loop(model, ids, n)[len(ids):]
        assert result.text == TOK.decode(result.tokens) and result.stop_reason == "length"
    assert gen.generate("ROMEO:", max_new_tokens=5, temperature=0).tokens == argmax_loop(model, ids, 5)[6:]


def test_same_seed_same_text():
    gen = TextGenerator(gpt(sharpen=5), TOK)
    a = gen.generate("JULIET:", max_new_tokens=40, temperature=1.0, top_k=20, seed=123)
    torch.manual_seed(999)  # the global random state does not matter when a seed is given
    b = gen.generate("JULIET:", max_new_tokens=40, temperature=1.0, top_k=20, seed=123)
    c = gen.generate("JULIET:", max_new_tokens=40, temperature=1.0, top_k=20, seed=124)
    assert a.text == b.text and a.tokens == b.tokens
    assert a.text != c.text


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cache_equals_no_cache(name):
    model = MODELS[name]()
    gen = TextGenerator(model, TOK)
    for kwargs in (dict(do_sample=False), dict(temperature=0.9, top_p=0.95, seed=5)):
        for n in (30, 70):  # within the context, and past it (sliding window)
            fast = gen.generate("KING LEAR:", max_new_tokens=n, return_logits=True, **kwargs)
            slow = gen.generate("KING LEAR:", max_new_tokens=n, return_logits=True, use_cache=False, **kwargs)
            assert fast.tokens == slow.tokens
            assert fast.logits.shape == (n, len(CHARS))
            assert (fast.logits - slow.logits).abs().max() <= 1e-5
    # the cache really is used: one forward per new token, each over one token
    stepper = ModelStepper(model, torch.tensor([TOK.encode("ab")]))
    stepper.logits()
    stepper.append(torch.tensor([3]))
    stepper.logits()
    assert stepper.cache.length == 3 and stepper.forward_calls == 2


# ----------------------------------------------------------------------------------------------
# Batches: left padding is exact, naive right padding is not

PROMPTS = ["ROMEO:", "A", "KING LEAR:", "Is this a dagger"]


@pytest.mark.parametrize("make", [lambda: gpt(sharpen=3), lambda: llama(sharpen=3)], ids=["gpt", "llama"])
def test_batch_equals_one_by_one(make):
    gen = TextGenerator(make(), TOK)
    for use_cache in (True, False):
        batch = gen.generate_batch(PROMPTS, max_new_tokens=50, do_sample=False, use_cache=use_cache,
                                   return_logits=True)
        for prompt, row in zip(PROMPTS, batch):
            alone = gen.generate(prompt, max_new_tokens=50, do_sample=False, return_logits=True)
            assert row.prompt == prompt and row.tokens == alone.tokens
            assert (row.logits - alone.logits).abs().max() < 1e-4


@torch.no_grad()
def naive_right_padded_greedy(model, prompts, n):
    """The tempting recipe: pad on the right with id 0, no mask, read the last column."""
    rows = [TOK.encode(p) for p in prompts]
    width = max(map(len, rows))
    x = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    for _ in range(n):
        logits, _ = model(x)
        x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return [TOK.decode(row[width:].tolist()) for row in x]


def test_naive_right_padding_corrupts_shorter_prompts():
    model = gpt(sharpen=3)
    gen = TextGenerator(model, TOK)
    naive = naive_right_padded_greedy(model, PROMPTS, 20)
    alone = [gen.generate(p, max_new_tokens=20, do_sample=False).text for p in PROMPTS]
    longest = max(range(len(PROMPTS)), key=lambda i: len(PROMPTS[i]))
    assert naive[longest] == alone[longest]  # no padding in that row: fine
    assert all(naive[i] != alone[i] for i in range(len(PROMPTS)) if i != longest)  # every padded row is wrong
    batch = gen.generate_batch(PROMPTS, max_new_tokens=20, do_sample=False)
    assert [r.text for r in batch] == alone  # ours, left padded with a mask, is exact


# ----------------------------------------------------------------------------------------------
# Beam search


@torch.no_grad()
def all_continuations(model, prompt_ids, n, vocab):
    """Brute force: log-probability of every possible continuation of length n."""
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=n)))
    x = torch.cat([torch.tensor(prompt_ids).expand(len(seqs), -1), seqs], dim=1)
    logits, _ = model(x)
    logp = torch.log_softmax(logits[:, len(prompt_ids) - 1: -1], dim=-1)
    return seqs, logp.gather(-1, seqs[..., None])[..., 0].sum(-1)


def test_beam_search_finds_the_most_probable_sequence():
    tok = CharTokenizer("abcde")
    model = gpt(seed=1, vocab=5, sharpen=20, tie_weights=False)
    gen = TextGenerator(model, tok)
    seqs, scores = all_continuations(model, tok.encode("ab"), 4, 5)
    best = seqs[scores.argmax()].tolist()
    greedy = gen.generate("ab", max_new_tokens=4, do_sample=False).tokens
    greedy_score = float(scores[[i for i, s in enumerate(seqs.tolist()) if s == greedy][0]])
    assert greedy != best and greedy_score < float(scores.max()) - 0.5  # greedy is suboptimal here
    for num_beams in (2, 3):
        assert gen.beam_search("ab", num_beams=num_beams, max_new_tokens=4, length_penalty=0.0).tokens == best
    beam = gen.beam_search("ab", num_beams=3, max_new_tokens=4, length_penalty=0.0)
    assert abs(beam.stats["score"] - float(scores.max())) < 1e-4
    ranked = [s for _, s in beam.stats["hypotheses"]]
    assert ranked == sorted(ranked, reverse=True) and len(ranked) == 3
    # with as many beams as prefixes, beam search is exhaustive: its top 5 are the true top 5
    wide = gen.beam_search("ab", num_beams=125, max_new_tokens=4, length_penalty=0.0, use_cache=False)
    top5 = torch.topk(scores, 5).values.tolist()
    assert [round(s, 4) for _, s in wide.stats["hypotheses"][:5]] == [round(s, 4) for s in top5]


def test_beam_search_stops_at_end_token():
    tok = CharTokenizer("abcde")
    model = llama(seed=1, vocab=5, sharpen=20)
    gen = TextGenerator(model, tok)
    free = gen.beam_search("ab", num_beams=2, max_new_tokens=6, length_penalty=0.0)
    end = free.tokens[2]  # make the third generated token an end token
    result = gen.beam_search("ab", num_beams=2, max_new_tokens=6, length_penalty=0.0, eos_token_id=end)
    assert result.stop_reason == "eos" and len(result.tokens) <= 6 and end not in result.tokens


# ----------------------------------------------------------------------------------------------
# Speculative decoding


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_speculative_greedy_equals_target_greedy(family):
    make = gpt if family == "gpt" else llama
    target = make(seed=0, sharpen=4, n_layers=3)
    draft = make(seed=1, sharpen=4, n_layers=1)
    gen = TextGenerator(target, TOK)
    for k in (1, 3, 5):
        for n in (1, 25, 70):  # 70 runs past the 48-token context
            spec = gen.speculative_generate("ROMEO:", draft, num_draft_tokens=k, max_new_tokens=n, do_sample=False)
            plain = gen.generate("ROMEO:", max_new_tokens=n, do_sample=False)
            assert spec.tokens == plain.tokens, (k, n)
            assert 0 <= spec.stats["acceptance_rate"] <= 1
    no_cache = gen.speculative_generate("ROMEO:", draft, num_draft_tokens=3, max_new_tokens=60, do_sample=False,
                                        use_cache=False)
    assert no_cache.tokens == gen.generate("ROMEO:", max_new_tokens=60, do_sample=False).tokens
    # a draft identical to the target is always right
    same = gen.speculative_generate("ROMEO:", target, num_draft_tokens=4, max_new_tokens=30, do_sample=False)
    assert same.stats["acceptance_rate"] == 1.0 and same.stats["rounds"] == 6


def _lively(model, seed, gain=2.0):
    """Redraw the weights at a larger scale. At the usual 0.02 init a random model hardly looks past
    the last token, so a prediction made from a slightly different window (a token fewer, positions
    shifted) keeps its argmax; this model's greedy choice depends on the whole window."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if "embedding" in name else gain / p.shape[1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_stepper_logits_for_several_positions_match_one_at_a_time(use_cache):
    """logits(num) gives, for each of the num positions, what one-at-a-time generation sees there:
    the last max_seq_len tokens up to it. Past the context that is a different window per position."""
    W = 16
    model = _lively(gpt(max_seq_len=W), seed=0)
    seq = torch.randint(0, V, (2, 3 * W + 4), generator=torch.Generator().manual_seed(0))
    seq[1, :3] = -1  # the second row is a shorter prompt, left-padded

    @torch.no_grad()
    def alone(row, m):  # next-token logits after m tokens, the row run alone on its cropped window
        ids = seq[row, max(0, m - W): m]
        return model(ids[ids >= 0][None])[0][0, -1]

    stepper = ModelStepper(model, seq[:, :5], use_cache=use_cache)
    n, checked = 5, 0
    for num in itertools.cycle([1, 3, 6, 2, W, 5]):
        add = min(num, seq.shape[1] - n)
        stepper.append(seq[:, n: n + add])
        n += add
        got = stepper.logits(num)
        expected = torch.stack([torch.stack([alone(r, m) for m in range(n - num + 1, n + 1)]) for r in range(2)])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        checked += num
        if n == seq.shape[1]:
            break
        n -= num // 2  # roll back as speculative decoding does after a rejection
        stepper.truncate(n)
    assert checked > 3 * W


def _with_context(model, make, max_seq_len):
    """The same weights in a model with another context length (position tables cut or extended)."""
    other = make(max_seq_len=max_seq_len)
    state = other.state_dict()
    for key, value in model.state_dict().items():
        rows = min(len(value), len(state[key]))
        state[key][:rows] = value[:rows]
    other.load_state_dict(state)
    return other


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_speculative_greedy_equals_plain_greedy_past_the_window(family, use_cache):
    """Three times the target's context; drafts with a shorter and a longer context than the target
    (its own weights, so they are often but not always right); prompts that fill the window or
    nearly; more draft tokens than the window has room for, or than it holds at all."""
    make = gpt if family == "gpt" else llama
    W = 24
    target = _lively(make(max_seq_len=W), seed=0)
    short, long = _with_context(target, make, W // 2), _with_context(target, make, 2 * W)
    gen = TextGenerator(target, TOK)
    text = "ROMEO: But soft, what light through yonder window breaks?"
    for prompt in ("ROMEO:", text[: W - 2], text[:W]):
        ids = TOK.encode(prompt)
        reference = argmax_loop(target, ids, 3 * W)[len(ids):]
        assert gen.generate(prompt, max_new_tokens=3 * W, do_sample=False, use_cache=use_cache).tokens == reference
        for draft, k in ((short, 1), (short, 4), (long, 4), (long, W + 8)):
            spec = gen.speculative_generate(prompt, draft, num_draft_tokens=k, max_new_tokens=3 * W,
                                            do_sample=False, use_cache=use_cache)
            assert spec.tokens == reference, (prompt, draft.max_seq_len, k)
            assert 0 < spec.stats["acceptance_rate"] < 1
        # a draft identical to the target is always right, inside and past the window
        same = gen.speculative_generate(prompt, target, num_draft_tokens=5, max_new_tokens=3 * W,
                                        do_sample=False, use_cache=use_cache)
        assert same.tokens == reference and same.stats["acceptance_rate"] == 1.0


def test_speculative_accept_preserves_target_distribution():
    """Accept/reject + residual sampling turns draft proposals q into exact samples of p."""
    g = torch.Generator().manual_seed(0)
    V, k, N = 6, 2, 8000
    p = torch.softmax(torch.randn(k + 1, V, generator=g) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(k, V, generator=g) * 1.5, dim=-1)
    first = torch.zeros(V)
    first_accepted = 0
    for _ in range(N):
        draft = torch.stack([torch.multinomial(q[i], 1, generator=g)[0] for i in range(k)])
        tokens, n_acc = speculative_accept(p, q, draft, generator=g)
        first[tokens[0]] += 1
        first_accepted += n_acc >= 1
    tv_target = 0.5 * (first / N - p[0]).abs().sum()
    tv_draft = 0.5 * (first / N - q[0]).abs().sum()
    assert tv_target < 0.025, tv_target  # sampling noise at N = 8000 is about 0.01
    assert tv_draft > 0.2  # and it is not just the draft's distribution
    # the first draft token is accepted with probability sum_x min(p(x), q(x))
    assert abs(first_accepted / N - float(torch.minimum(p[0], q[0]).sum())) < 0.02


def test_speculative_sampling_matches_target_distribution_end_to_end():
    tok = CharTokenizer("abcdef")
    target = gpt(seed=0, vocab=6, sharpen=5, tie_weights=False)
    draft = gpt(seed=6, vocab=6, sharpen=5, n_layers=1, tie_weights=False)
    gen = TextGenerator(target, tok)
    prompt = tok.encode("abc")
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]))[0][0, -1], dim=-1)
        q1 = torch.softmax(draft(torch.tensor([prompt]))[0][0, -1], dim=-1)
        nxt = torch.softmax(target(torch.tensor([prompt + [x] for x in range(6)]))[0][:, -1], dim=-1)
    p2 = p1 @ nxt  # exact marginal of the second token: sum_x p(x) p(y | x)
    assert 0.5 * (p1 - q1).abs().sum() > 0.25  # the draft really disagrees with the target
    N = 1000
    counts = torch.zeros(2, 6)
    for seed in range(N):
        r = gen.speculative_generate("abc", draft, num_draft_tokens=3, max_new_tokens=2, seed=seed)
        counts[0, r.tokens[0]] += 1
        counts[1, r.tokens[1]] += 1
    for observed, expected in zip(counts, (p1, p2)):
        chi2 = float(((observed - N * expected) ** 2 / (N * expected)).sum())
        assert chi2 < 20.5, chi2  # chi-square with 5 degrees of freedom: the p = 0.001 critical value
    chi2_draft = float(((counts[0] - N * q1) ** 2 / (N * q1)).sum())
    assert chi2_draft > 100  # the same test clearly rejects the draft's own distribution


# ----------------------------------------------------------------------------------------------
# Contrastive search and Mirostat in the generator


@torch.no_grad()
def contrastive_reference(model, ids, n, k, alpha):
    """Straight from the paper, without caches: score every candidate by a full forward pass."""
    hidden = {}
    handle = model.norm.register_forward_hook(lambda _m, _i, out: hidden.__setitem__("h", out))
    try:
        ids = list(ids)
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            context = hidden["h"][0]
            probs = torch.softmax(logits[0, -1], dim=-1)
            top_p, top_ids = probs.topk(k)
            best, best_score = None, -math.inf
            for p, c in zip(top_p.tolist(), top_ids.tolist()):
                model(torch.tensor([ids + [c]]))
                h = hidden["h"][0, -1]
                sim = torch.cosine_similarity(h[None], context, dim=-1).max()
                score = (1 - alpha) * p - alpha * float(sim)
                if score > best_score:
                    best, best_score = c, score
            ids.append(best)
        return ids
    finally:
        handle.remove()


def test_contrastive_search_matches_reference():
    model = llama(sharpen=3)
    gen = TextGenerator(model, TOK)
    ids = TOK.encode("ROMEO:")
    expected = contrastive_reference(model, ids, 12, 4, 0.6)[len(ids):]
    for use_cache in (True, False):
        result = gen.contrastive_search("ROMEO:", penalty_alpha=0.6, top_k=4, max_new_tokens=12, use_cache=use_cache)
        assert result.tokens == expected
    greedy = gen.generate("ROMEO:", max_new_tokens=12, do_sample=False).tokens
    assert gen.contrastive_search("ROMEO:", penalty_alpha=0.0, top_k=4, max_new_tokens=12).tokens == greedy


def test_mirostat_in_generator():
    gen = TextGenerator(gpt(sharpen=16, tie_weights=False), TOK)  # about 4 bits of entropy per token
    for tau in (2.0, 3.0):
        result = gen.generate("ROMEO:", max_new_tokens=300, mirostat_tau=tau, mirostat_eta=0.2, seed=0)
        surprise = result.stats["surprise"]
        assert len(surprise) == 300 and result.stats["method"] == "mirostat"
        assert abs(sum(surprise[100:]) / 200 - tau) < 0.3, (tau, sum(surprise[100:]) / 200)


# ----------------------------------------------------------------------------------------------
# Text: streaming, stop strings, end tokens, BOS


def test_stream_pieces_add_up_to_the_text():
    gen = TextGenerator(gpt(sharpen=3), TOK)
    pieces = list(gen.stream("ROMEO:", max_new_tokens=30, seed=1))
    assert len(pieces) > 1 and "".join(pieces) == gen.last_result.text
    assert gen.last_result.text == gen.generate("ROMEO:", max_new_tokens=30, seed=1).text
    assert not torch.is_inference_mode_enabled()  # nothing leaks out of the generator
    seen = []
    gen.generate("ROMEO:", max_new_tokens=10, seed=1, callback=seen.append)
    assert "".join(seen) == gen.last_result.text


def test_stop_strings_and_end_tokens():
    gen = TextGenerator(gpt(sharpen=3), TOK)
    full = gen.generate("ROMEO:", max_new_tokens=40, seed=2).text
    stop = full[10:12]
    cut = full.find(stop)
    result = gen.generate("ROMEO:", max_new_tokens=40, seed=2, stop=[stop, "never there"])
    assert result.text == full[:cut] and result.stop_reason == "stop"
    pieces = list(gen.stream("ROMEO:", max_new_tokens=40, seed=2, stop=stop))
    assert "".join(pieces) == full[:cut]  # streaming never shows the stop string, even in parts
    end = TOK.encode(full[5])[0]
    result = gen.generate("ROMEO:", max_new_tokens=40, seed=2, eos_token_id=end)
    assert result.stop_reason == "eos" and result.text == full[: full.find(full[5])]


class BosTokenizer(CharTokenizer):
    """A character tokenizer whose id 0 is a BOS token (like SentencePiece's)."""

    bos_id = 0


def test_empty_prompt_starts_from_bos_when_the_tokenizer_has_one():
    tok = BosTokenizer("\x02" + CHARS[1:])
    gen = TextGenerator(gpt(), tok)
    result = gen.generate("", max_new_tokens=5, do_sample=False)
    assert result.prompt_tokens == [0] and len(result.tokens) <= 5
    assert gen.generate("a", max_new_tokens=3, do_sample=False).prompt_tokens == [0, tok.encode("a")[0]]


# ----------------------------------------------------------------------------------------------
# Bad input: clear messages naming the parameter, the value and the allowed range


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), r"temperature must be a number >= 0 .*got -0.5"),
        (dict(temperature=float("nan")), r"temperature must be a number >= 0"),
        (dict(top_p=0.0), r"top_p must lie in \(0, 1\].*got 0.0"),
        (dict(top_p=1.5), r"top_p must lie in \(0, 1\].*got 1.5"),
        (dict(top_k=0), r"top_k must be a positive integer.*got 0"),
        (dict(top_k=2.5), r"top_k must be a positive integer.*got 2.5"),
        (dict(min_p=1.0), r"min_p must lie in \[0, 1\).*got 1.0"),
        (dict(min_p=-0.1), r"min_p must lie in \[0, 1\).*got -0.1"),
        (dict(repetition_penalty=0), r"repetition_penalty must be a number > 0.*got 0"),
        (dict(max_new_tokens=-1), r"max_new_tokens must be an integer >= 0, got -1"),
        (dict(num_beams=0), r"num_beams must be an integer >= 1"),
        (dict(penalty_alpha=0.5), r"needs top_k"),
        (dict(penalty_alpha=1.5, top_k=4), r"penalty_alpha must lie in \[0, 1\]"),
        (dict(mirostat_tau=-1.0), r"mirostat_tau .* must be > 0"),
        (dict(num_beams=2, mirostat_tau=3.0), r"choose one decoding method"),
        (dict(stop=[""]), r"stop must be a non-empty string"),
        (dict(eos_token_id=-3), r"eos_token_id must be a token id >= 0"),
        (dict(colour="red"), r"unknown generation setting\(s\) \['colour'\]"),
    ],
)
def test_bad_settings(kwargs, message):
    gen = TextGenerator(gpt(), TOK)
    with pytest.raises(ValueError, match=message):
        gen.generate("ROMEO:", **{"max_new_tokens": 5, **kwargs})


def test_bad_settings_in_pure_functions():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(x, -1)
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(x, 2)
    with pytest.raises(ValueError, match="min_p"):
        min_p_filter(x, 1)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(x, -1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        apply_repetition_penalty(x, torch.tensor([1]), -2)
    with pytest.raises(ValueError, match=r"logits\[:, -1\]"):
        sample_next_token(torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="mirostat tau"):
        mirostat_step(x, 1.0, tau=0)
    with pytest.raises(ValueError, match="temperature"):
        GeneratorConfig(temperature=-1)


def test_bad_prompts():
    gen = TextGenerator(gpt(), TOK)
    with pytest.raises(ValueError, match="prompt is empty.*no BOS token"):
        gen.generate("", max_new_tokens=5)
    with pytest.raises(ValueError, match=r"cannot be encoded: character 'Z' .* at position 3"):
        gen.generate("ROMZ", max_new_tokens=5)
    with pytest.raises(ValueError, match="list of prompt strings"):
        gen.generate_batch("ROMEO:")
    with pytest.raises(ValueError, match="one prompt at a time"):
        gen.generate_batch(["a", "b"], num_beams=2)
    with pytest.raises(ValueError, match="num_draft_tokens must be an integer >= 1"):
        gen.speculative_generate("ROMEO:", gpt(seed=1), num_draft_tokens=0)
    with pytest.raises(ValueError, match="needs a tiny_transformer model"):
        TextGenerator(torch.nn.Linear(2, 2), TOK)
    big_vocab = CharTokenizer([chr(i) for i in range(200, 300)])
    with pytest.raises(ValueError, match="the tokenizer has 100 tokens but the model only 60"):
        TextGenerator(gpt(), big_vocab)
    long_prompt = "To be, or not to be: that is the question. " * 3  # 132 characters, context 48
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = gen.generate(long_prompt, max_new_tokens=5, do_sample=False)
    assert [w.filename for w in caught if "only its last 48 tokens are used" in str(w.message)] == [__file__]
    with pytest.raises(ValueError, match="temperature"):
        gen.stream("ROMEO:", temperature=-1)  # checked at the call, before any iteration
    assert result.prompt_tokens == TOK.encode(long_prompt)[-48:]
    assert result.tokens == gen.generate(long_prompt[-48:], max_new_tokens=5, do_sample=False).tokens
    assert gen.generate("ROMEO:", max_new_tokens=0).text == ""


def test_bench_sample_runs_and_reports(tmp_path, capsys):
    """The benchmark's plumbing on a small preset (no timing is asserted: timings are noisy)."""
    import argparse
    import json

    from tiny_transformer import bench_sample

    parser = argparse.ArgumentParser()
    bench_sample.add_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--new-tokens", "12", "--repeats", "1", "--speed-presets", "tiny",
                              "llama_shakespeare_870k", "--json", str(tmp_path / "bench.json")])
    assert bench_sample.main(args) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "identical tokens: yes" in out and "llama_shakespeare_870k" in out
    report = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert report["cache"]["same_tokens"] and report["cache"]["speedup"] > 0
    assert set(report["speed"]) == {"tiny", "llama_shakespeare_870k"}
    with pytest.raises(ValueError, match="--new-tokens must be >= 1"):
        bench_sample.main(parser.parse_args(["--new-tokens", "0"]))


def test_sentencepiece_tokenizer_bos_eos_and_partial_characters(tmp_path):
    """Subword tokenizers: BOS starts the prompt, EOS ends the text, and a character split over
    several byte tokens is never streamed half-done (U+FFFD)."""
    pytest.importorskip("sentencepiece")
    from tiny_transformer.sentencepiece_tools import SentencePieceTokenizer, train_sentencepiece

    lines = ["ROMEO: But soft, what light through yonder window breaks?",
             "JULIET: O Romeo, Romeo, wherefore art thou Romeo?",
             "HAMLET: To be, or not to be, that is the question."] * 30
    sp = SentencePieceTokenizer.load(train_sentencepiece("\n".join(lines), vocab_size=320,
                                                         model_prefix=tmp_path / "sp"))
    model = llama(vocab=320, sharpen=3)
    gen = TextGenerator(model, sp)
    result = gen.generate("ROMEO:", max_new_tokens=20, do_sample=False)
    assert result.prompt_tokens[0] == sp.bos_id and result.prompt_tokens[1:] == sp.encode("ROMEO:")
    assert result.text == sp.decode(result.prompt_tokens + result.tokens)[len("ROMEO:"):]
    # EOS (and BOS, which separates documents in llama2.c-style data) end the text by default
    first = result.tokens[0]
    ended = gen.generate("ROMEO:", max_new_tokens=20, do_sample=False, eos_token_id=[sp.eos_id, first])
    assert ended.stop_reason == "eos" and ended.tokens == [] and ended.text == ""
    # "é" is two byte tokens (byte fallback): the stream holds back the first half
    from tiny_transformer.sampling import _TextTracker

    e_acute = [3 + b for b in "é".encode()]  # byte b is token 3 + b
    assert sp.decode(e_acute) == "é" and sp.decode(e_acute[:1]) == "\ufffd"
    tracker = _TextTracker(sp, sp.encode("ROMEO:"), (), ())
    pieces = [tracker.add(tok) for tok in sp.encode("caf") + e_acute + sp.encode("!")]
    assert pieces[-4:] == ["", "é", " ", "!"]  # nothing shown until the character is complete
    assert "".join(pieces) + tracker.flush() == " café !"
