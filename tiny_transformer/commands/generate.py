"""`python -m tiny_transformer generate`: text from a trained checkpoint.

    generate --checkpoint checkpoints/shakespeare/best.pt --prompt "ROMEO:" --max-tokens 200 --temperature 0.8
    generate --checkpoint best.pt --greedy                    the most probable token every step
    generate --checkpoint best.pt --top-k 40 --top-p 0.9      sample from the head of the distribution
    generate --checkpoint best.pt --stream                    print text as it is produced
    generate --checkpoint best.pt --num-beams 4               beam search
    generate --checkpoint best.pt --penalty-alpha 0.6 --top-k 4   contrastive search
    generate --checkpoint best.pt --mirostat 3.0              Mirostat v2 (target surprise in bits)
    generate --checkpoint best.pt --draft small.pt --greedy   speculative decoding with a draft model
    generate --checkpoint best.pt --compare                   greedy, T=0.5, 0.8, 1.2 side by side
    generate --checkpoint best.pt --batch --output plays.txt  five characters in one left-padded batch

Every run prints the settings it used (including the seed, so a sample can be reproduced) and
the speed in tokens per second.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import textwrap
from itertools import zip_longest
from pathlib import Path

from tiny_transformer.sampling import GenerationResult, GeneratorConfig, TextGenerator

BATCH_PROMPTS = ("ROMEO:", "JULIET:", "HAMLET:", "KING LEAR:", "MACBETH:")
COMPARE = (("greedy", 0.0), ("T=0.5", 0.5), ("T=0.8", 0.8), ("T=1.2", 1.2))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a checkpoint written by `train` or `export` (e.g. checkpoints/NAME/best.pt)")
    parser.add_argument("--prompt", default="ROMEO:", help="text to continue (default: %(default)r)")
    parser.add_argument("--max-tokens", type=int, default=200, metavar="N",
                        help="number of new tokens (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8, metavar="T",
                        help="< 1 safer, > 1 wilder, 0 = greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most probable tokens")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="nucleus sampling: the fewest tokens with total probability >= P")
    parser.add_argument("--min-p", type=float, default=None, metavar="P",
                        help="drop tokens less than P times as probable as the best one")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                        help="> 1 discourages tokens already present (default: off)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (default: a fresh one, printed so the sample can be repeated)")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="stop before this text (repeatable), e.g. --stop $'\\n\\n'")
    parser.add_argument("--greedy", action="store_true", help="always take the most probable token")
    parser.add_argument("--num-beams", type=int, default=1, metavar="N", help="beam search with N beams")
    parser.add_argument("--penalty-alpha", type=float, default=None, metavar="A",
                        help="contrastive search with degeneration penalty A (needs --top-k, e.g. 4)")
    parser.add_argument("--mirostat", type=float, default=None, metavar="TAU",
                        help="Mirostat v2 sampling with target surprise TAU bits (e.g. 3.0)")
    parser.add_argument("--mirostat-eta", type=float, default=0.1, metavar="ETA", help="Mirostat learning rate")
    parser.add_argument("--draft", default=None, metavar="PATH",
                        help="speculative decoding: a smaller checkpoint with the same tokenizer")
    parser.add_argument("--draft-tokens", type=int, default=4, metavar="K",
                        help="tokens the draft model proposes per round (default: %(default)s)")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument("--compare", action="store_true", help="greedy, T=0.5, 0.8 and 1.2 side by side")
    parser.add_argument("--batch", action="store_true",
                        help=f"generate for {', '.join(BATCH_PROMPTS)} in one batch")
    parser.add_argument("--output", type=Path, default=None, metavar="FILE", help="also write the text(s) to FILE")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole context every step (slow; to see what the KV cache saves)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")


def _check_modes(args) -> None:
    modes = [name for name, on in (("--compare", args.compare), ("--batch", args.batch),
                                   ("--num-beams", args.num_beams > 1), ("--draft", args.draft),
                                   ("--penalty-alpha", args.penalty_alpha is not None),
                                   ("--mirostat", args.mirostat is not None)) if on]
    if len(modes) > 1:
        raise ValueError(f"{' and '.join(modes)} cannot be combined; choose one")
    if args.stream and modes and modes[0] in ("--compare", "--batch", "--num-beams"):
        raise ValueError(f"--stream prints one text as it grows; it does not work with {modes[0]}")
    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")


def _config(args) -> GeneratorConfig:
    return GeneratorConfig(
        max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, do_sample=not args.greedy, seed=args.seed,
        stop=args.stop, use_cache=not args.no_cache, num_beams=args.num_beams, penalty_alpha=args.penalty_alpha,
        mirostat_tau=args.mirostat, mirostat_eta=args.mirostat_eta,
    )


def _load(path: str, device: str):
    from tiny_transformer.checkpoint import load_model_from_checkpoint
    from tiny_transformer.utils import select_device

    model, tokenizer, meta = load_model_from_checkpoint(path, device=select_device(device))
    if tokenizer is None:
        raise ValueError(f"checkpoint {path} holds no tokenizer, so its ids cannot be turned into text; "
                         "use a checkpoint written by `python -m tiny_transformer train`")
    return model, tokenizer, meta


def _describe_checkpoint(model, meta) -> str:
    parts = [f"{meta.get('config', {}).get('model_type', 'gpt')}", f"{model.num_parameters() / 1e6:.2f}M parameters"]
    if meta.get("step") is not None:
        parts.append(f"step {meta['step']}")
    if meta.get("val_loss") is not None:
        parts.append(f"val loss {meta['val_loss']:.3f}")
    return f"checkpoint: {meta['path']} ({', '.join(parts)})"


def _speed(results: list[GenerationResult]) -> str:
    tokens = sum(r.num_tokens for r in results)
    seconds = max(r.seconds for r in results)
    rate = tokens / seconds if seconds > 0 else float("inf")
    reasons = sorted({r.stop_reason for r in results})
    return f"{tokens} tokens in {seconds:.2f} s ({rate:.1f} tokens/s), stopped by: {', '.join(reasons)}"


def _side_by_side(blocks: list[tuple[str, str]], width: int) -> str:
    """Lay texts out in columns (a terminal-width table); each column wraps its own lines."""
    gap = " | "
    col = (width - len(gap) * (len(blocks) - 1)) // len(blocks)
    columns = []
    for title, text in blocks:
        lines = [title.center(col, "-")]
        for line in text.split("\n"):
            lines += textwrap.wrap(line, col, replace_whitespace=False, drop_whitespace=False) or [""]
        columns.append(lines)
    rows = zip_longest(*columns, fillvalue="")
    return "\n".join(gap.join(cell.ljust(col) for cell in row).rstrip() for row in rows)


def _sections(blocks: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"=== {title} ===\n{text}" for title, text in blocks)


def run(args: argparse.Namespace) -> int:
    _check_modes(args)
    if args.seed is None:
        args.seed = random.randrange(2**31)  # chosen here so that it can be printed
    config = _config(args)
    model, tokenizer, meta = _load(args.checkpoint, args.device)
    gen = TextGenerator(model, tokenizer)
    print(_describe_checkpoint(model, meta))

    if args.compare:
        blocks, results = [], []
        for title, temperature in COMPARE:
            r = gen.generate(args.prompt, config, temperature=temperature, do_sample=True)
            blocks.append((title, args.prompt + r.text))
            results.append(r)
        print(f"settings (each column changes only the temperature): {config.describe()}")
        width = shutil.get_terminal_size((120, 24)).columns
        print(_side_by_side(blocks, width) if width >= 100 else _sections(blocks))
        output, speed = _sections(blocks), _speed(results)
    elif args.batch:
        results = gen.generate_batch(list(BATCH_PROMPTS), config)
        print(f"settings: {config.describe()}, batch of {len(BATCH_PROMPTS)} prompts (left-padded)")
        output = _sections([(r.prompt, r.full_text) for r in results])
        print(output)
        speed = _speed(results)
    else:
        settings = config.describe()
        if args.draft:
            draft, draft_tok, _ = _load(args.draft, args.device)
            if draft_tok.to_dict() != tokenizer.to_dict():
                raise ValueError(f"the draft checkpoint {args.draft} uses a different tokenizer; "
                                 "speculative decoding needs both models to share one vocabulary")
            settings = f"speculative ({args.draft_tokens} draft tokens from {args.draft}), {settings}"
        print(f"settings: {settings}")
        print("-" * 40)
        pieces = None
        if args.stream:
            print(args.prompt, end="", flush=True)

            def pieces(piece: str) -> None:
                print(piece, end="", flush=True)
        if args.draft:
            result = gen.speculative_generate(args.prompt, draft, args.draft_tokens, config, callback=pieces)
        else:
            result = gen.generate(args.prompt, config, callback=pieces)
        if args.stream:
            print()
        else:
            print(result.full_text)
        print("-" * 40)
        output, results = result.full_text, [result]
        speed = _speed(results)
        if "acceptance_rate" in result.stats:
            speed += f", draft acceptance {result.stats['acceptance_rate']:.0%}"
    print(speed)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(output + "\n")
        print(f"wrote {args.output}")
    sys.stdout.flush()
    return 0
