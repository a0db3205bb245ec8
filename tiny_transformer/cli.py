"""Command line: `python -m tiny_transformer <command> ...` (or the `tiny-transformer` script).

Each command lives in its own module under `tiny_transformer/commands/` and provides two functions:
`add_arguments(parser)` and `run(args) -> int`. This file only wires them together, so adding a
command never touches another command's code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module under tiny_transformer.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("download", "download and verify a dataset (Tiny Shakespeare, simple sequences)"),
    "train": ("train", "train a model from a preset or config file"),
    "evaluate": ("evaluate", "list a run's checkpoints with validation loss and perplexity"),
    "generate": ("generate", "generate text from a checkpoint"),
    "export": ("export", "export a checkpoint (llama2.c model.bin, tokenizer.bin, production .pt)"),
    "presets": ("presets", "list the model presets with their parameter counts"),
    "bench": ("bench", "benchmarks: training quality, sampling speed, native inference speed"),
    "serve": ("serve", "serve a checkpoint over HTTP (JSON in, JSON out; concurrent requests batched)"),
}


def _load(name: str):
    module_name, _ = COMMANDS[name]
    try:
        return importlib.import_module(f"tiny_transformer.commands.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("tiny_transformer.commands"):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tiny_transformer",
        description="tiny-transformer: build, train and run a small language model.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        module = _load(name)
        if module is None:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Our own errors carry a message that names the problem and the fix: show it, not a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
