"""`python -m tiny_transformer evaluate`: how good are a run's checkpoints?

    python -m tiny_transformer evaluate --experiment-name quick_test
        lists checkpoints/quick_test/: step, validation loss, perplexity, bits per character
    python -m tiny_transformer evaluate --checkpoint checkpoints/quick_test/best.pt
        evaluates one checkpoint on every window of the validation split (loss ± standard error)

Perplexity = exp(loss): the model is as unsure as a uniform choice among that many tokens.
Bits per character = loss / ln 2 / (characters per token): comparable across tokenizers.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from tiny_transformer.checkpoint import (
    CheckpointManager,
    checkpoint_summary,
    load_model_from_checkpoint,
)
from tiny_transformer.data import load_text, train_val_split
from tiny_transformer.training import evaluate_loss
from tiny_transformer.utils import select_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment-name", default=None, help="list the checkpoints of this run")
    parser.add_argument("--checkpoint", default=None, help="evaluate this checkpoint file on the validation split")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="base folder of checkpoints")
    parser.add_argument("--data", default=None, help="text file (default: the one the run was trained on)")
    parser.add_argument("--val-fraction", type=float, default=None, help="default: the run's own (0.1)")
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")


def _metrics(loss: float | None, chars_per_token: float) -> str:
    if loss is None or not math.isfinite(loss):
        return f"{'-':>9} {'-':>10} {'-':>8}"
    return f"{loss:>9.4f} {math.exp(loss):>10.2f} {loss / math.log(2) / chars_per_token:>8.3f}"


def list_checkpoints(directory: Path) -> int:
    manager = CheckpointManager(directory)
    infos = manager.checkpoints()
    best = manager.best()
    if not infos and best is None:
        raise FileNotFoundError(
            f"no checkpoints in {directory}; train first, e.g. `python -m tiny_transformer train --config tiny "
            f"--experiment-name {directory.name}`, or check --experiment-name / --checkpoint-dir"
        )
    print(f"{'checkpoint':<28} {'step':>7} {'val loss':>9} {'perplexity':>10} {'bits/char':>8}")
    rows = [(i.path, checkpoint_summary(i.path)) for i in infos]
    if best is not None:
        rows.append((best, checkpoint_summary(best)))
    for path, s in rows:
        print(f"{path.name:<28} {s['step']:>7} {_metrics(s['val_loss'], s['chars_per_token'])}")
    print("(losses as measured during training on the run's fixed validation batches; "
          "--checkpoint PATH evaluates one file on the whole validation split)")
    return 0


def evaluate_checkpoint(args) -> int:
    device = select_device(args.device)
    model, tokenizer, meta = load_model_from_checkpoint(args.checkpoint, device=device)
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} holds no tokenizer, so its text cannot be encoded; "
                         "use a checkpoint written by `python -m tiny_transformer train`")
    data_info = meta["config"].get("data") or {}
    data_path = args.data or data_info.get("path")
    if not data_path:
        raise ValueError(f"{args.checkpoint} does not record its training text; pass --data PATH")
    val_fraction = args.val_fraction or data_info.get("val_fraction", 0.1)
    text = load_text(data_path)
    _, val_text = train_val_split(text, val_fraction)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    chars_per_token = len(val_text) / max(1, len(val_ids))
    if args.max_tokens is not None:
        if args.max_tokens < 2:
            raise ValueError(f"--max-tokens must be at least 2, got {args.max_tokens}")
        val_ids = val_ids[: args.max_tokens]
    seq_len = (meta["config"].get("training") or {}).get("seq_len") or model.max_seq_len
    seq_len = min(seq_len, len(val_ids) - 1)
    result = evaluate_loss(model, val_ids, seq_len, batch_size=args.batch_size, device=device)
    loss = result["loss"]
    print(f"checkpoint: {args.checkpoint} (step {meta['step']}, {meta['kind']})")
    print(f"data: {data_path}, validation = last {val_fraction:.0%}: {result['tokens']:,} tokens in "
          f"{result['windows']} windows of {seq_len}")
    print(f"val loss {loss:.4f} ± {result['stderr']:.4f} (standard error), perplexity {math.exp(loss):.2f}, "
          f"{loss / math.log(2) / chars_per_token:.3f} bits per character")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.checkpoint:
        return evaluate_checkpoint(args)
    if not args.experiment_name:
        raise ValueError("give --experiment-name NAME (list a run's checkpoints) or --checkpoint PATH (evaluate one)")
    return list_checkpoints(Path(args.checkpoint_dir) / args.experiment_name)
