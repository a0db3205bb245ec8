"""Sampling benchmark (`python -m tiny_transformer bench sample`): what the KV cache buys, and tokens/s.

Without a cache, every new token re-runs the model over the whole context: step t costs a forward
pass over t tokens, so n tokens cost about n²/2 token-passes. With a KV cache, each step runs the
model over ONE token and reuses the keys and values stored for the others: n token-passes in all.
The benchmark generates the same greedy text both ways, side by side in one run (so both see the
same machine load), checks that the tokens are identical, and reports the ratio of the times.

    python -m tiny_transformer bench sample                       shakespeare preset, 256 new tokens
    python -m tiny_transformer bench sample --threads 2 --json out.json
    python -m tiny_transformer bench sample --min-speedup 5       exit 1 if the cache gains < 5x

Models are randomly initialised (speed does not depend on the weights' values), so no training or
data is needed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from tiny_transformer.config import build_model, load_preset
from tiny_transformer.sampling import TextGenerator
from tiny_transformer.tokenizers import CharTokenizer
from tiny_transformer.utils import fast_mode, pick, select_device

# The 65 characters of Tiny Shakespeare (the vocabulary of the character-level presets).
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="shakespeare",
                        help="model for the cache comparison (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=256, metavar="N",
                        help="tokens to generate per run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None, metavar="R",
                        help="runs of each variant; the median is reported (default: 3, fast mode 1)")
    parser.add_argument("--speed-presets", nargs="+", default=["tiny", "shakespeare"], metavar="PRESET",
                        help="presets for the tokens/s table (default: tiny shakespeare)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: cpu)")
    parser.add_argument("--min-speedup", type=float, default=None, metavar="X",
                        help="exit with status 1 if the KV-cache speedup is below X")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON")


def bench_model(preset: str, device: torch.device, seed: int = 0):
    """A randomly initialised model of `preset` in eval mode, and a tokenizer that fits its vocabulary.

    Returns (model, tokenizer, prompt): the prompt is a single token.
    """
    vocab = load_preset(preset)["model"]["vocab_size"]
    torch.manual_seed(seed)
    model = build_model(preset).to(device).eval()
    if vocab == len(SHAKESPEARE_CHARS):
        return model, CharTokenizer(SHAKESPEARE_CHARS), "\n"
    # Any vocabulary: one distinct character per id (the text is meaningless; the speed is what counts).
    chars = [chr(0x4E00 + i) for i in range(vocab)]
    return model, CharTokenizer(chars), chars[0]


def _median_seconds(gen: TextGenerator, prompt: str, runs: int, **settings):
    results = [gen.generate(prompt, **settings) for _ in range(runs)]
    return statistics.median(r.seconds for r in results), results[-1]


def measure_cache_speedup(gen: TextGenerator, prompt: str, new_tokens: int = 256, repeats: int = 3) -> dict:
    """Greedy generation with and without the KV cache, alternating runs; returns times and ratio."""
    gen.generate(prompt, max_new_tokens=8, do_sample=False)  # warm-up (allocations, kernel choice)
    gen.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    cached, uncached = [], []
    for _ in range(repeats):  # alternate, so slow phases of a busy machine hit both variants
        a = gen.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        b = gen.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=False)
        if a.tokens != b.tokens:
            raise RuntimeError("cached and uncached generation produced different tokens; the KV cache is broken")
        cached.append(a.seconds)
        uncached.append(b.seconds)
    t_cached, t_uncached = statistics.median(cached), statistics.median(uncached)
    return {
        "new_tokens": new_tokens, "repeats": repeats,
        "cached_s": t_cached, "uncached_s": t_uncached,
        "cached_tokens_per_s": new_tokens / t_cached, "uncached_tokens_per_s": new_tokens / t_uncached,
        "speedup": t_uncached / t_cached, "same_tokens": True,
    }


def measure_speed(gen: TextGenerator, prompt: str, new_tokens: int = 256, repeats: int = 3) -> dict:
    """Tokens per second with the KV cache: greedy, and sampled (T=0.8, top-k 40)."""
    gen.generate(prompt, max_new_tokens=8, do_sample=False)
    greedy, _ = _median_seconds(gen, prompt, repeats, max_new_tokens=new_tokens, do_sample=False)
    sampled, _ = _median_seconds(gen, prompt, repeats, max_new_tokens=new_tokens, temperature=0.8, top_k=40, seed=0)
    return {"greedy_tokens_per_s": new_tokens / greedy, "sampled_tokens_per_s": new_tokens / sampled}


def main(args: argparse.Namespace) -> int:
    if args.new_tokens < 1:
        raise ValueError(f"--new-tokens must be >= 1, got {args.new_tokens}")
    repeats = args.repeats if args.repeats is not None else pick(3, 1)
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    threads = torch.get_num_threads()
    where = f"cpu, {threads} thread{'s' if threads > 1 else ''}" if device.type == "cpu" else str(device)

    model, tok, prompt = bench_model(args.preset, device)
    if args.new_tokens > model.max_seq_len:  # the prompt token + all new tokens but the last are fed
        print(f"note: {args.new_tokens} new tokens outgrow the context of {model.max_seq_len}; past it the "
              "window slides and the cache is rebuilt every step, so the speedup shrinks")
    gen = TextGenerator(model, tok)
    print(f"KV-cache speedup: preset {args.preset} ({model.num_parameters() / 1e6:.2f}M parameters, random init), "
          f"greedy, 1-token prompt + {args.new_tokens} new tokens, {where}, median of {repeats}")
    cache = measure_cache_speedup(gen, prompt, args.new_tokens, repeats)
    print(f"  with KV cache     {cache['cached_s']:8.2f} s  {cache['cached_tokens_per_s']:8.1f} tokens/s")
    print(f"  without (recompute){cache['uncached_s']:7.2f} s  {cache['uncached_tokens_per_s']:8.1f} tokens/s")
    print(f"  speedup           {cache['speedup']:8.2f}x   (identical tokens: yes)")

    speed = {}
    print(f"\nGeneration speed with the KV cache ({where}; sampled = temperature 0.8, top-k 40):")
    print(f"  {'preset':<14}{'parameters':>12}{'new tokens':>12}{'greedy tok/s':>15}{'sampled tok/s':>16}")
    for preset in args.speed_presets:
        m, t, p = (model, tok, prompt) if preset == args.preset else bench_model(preset, device)
        n = min(args.new_tokens, m.max_seq_len)  # stay within the context, where the cache works
        speed[preset] = {"parameters": m.num_parameters(), "new_tokens": n,
                         **measure_speed(TextGenerator(m, t), p, n, repeats)}
        s = speed[preset]
        print(f"  {preset:<14}{s['parameters'] / 1e6:>11.2f}M{n:>12}{s['greedy_tokens_per_s']:>15.1f}"
              f"{s['sampled_tokens_per_s']:>16.1f}")
    if fast_mode():
        print("(fast mode: one run per measurement)")

    if args.json is not None:
        report = {"preset": args.preset, "device": where, "cache": cache, "speed": speed}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    if args.min_speedup is not None and cache["speedup"] < args.min_speedup:
        print(f"KV-cache speedup {cache['speedup']:.2f}x is below the required {args.min_speedup:g}x")
        return 1
    return 0
