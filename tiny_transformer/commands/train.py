"""`python -m tiny_transformer train`: train a model from a preset (or a JSON config) on a text file.

    python -m tiny_transformer train --config tiny --data data/tiny_shakespeare.txt --max-steps 100 \\
        --experiment-name quick_test
    python -m tiny_transformer train shakespeare            # the capstone: preset, data and name in one word
    python -m tiny_transformer train shakespeare --resume   # continue it from its latest checkpoint
    python -m tiny_transformer train cpu_fast --max-time 150s

Shortcuts: the preset may be given as the first word instead of `--config`; the experiment name
defaults to the preset name and the data to data/tiny_shakespeare.txt. `--max-time` accepts 90, 90s,
10m or 1.5h. Any preset value can be overridden with `--set training.lr=3e-4 --set model.dropout=0.2`.

Character-level models fit a `CharTokenizer` on the whole text and take its vocabulary size (65 for
Tiny Shakespeare) whatever the preset says. With `--tokenizer sentencepiece` (the default for the
Llama presets when SentencePiece is installed) a BPE vocabulary of the preset's vocab_size is
trained on the training split first.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch

from tiny_transformer.checkpoint import (
    CheckpointManager,
    load_checkpoint,
    tokenizer_from_checkpoint,
)
from tiny_transformer.config import build_model, list_presets, load_preset
from tiny_transformer.data import load_text, train_val_split
from tiny_transformer.tokenizers import CharTokenizer
from tiny_transformer.training import Trainer, TrainerConfig, apply_overrides
from tiny_transformer.utils import data_dir, set_seed

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|h)?\s*$")


def parse_duration(text: str) -> float:
    """'90' or '90s' -> 90.0, '10m' -> 600.0, '1.5h' -> 5400.0 (seconds)."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"--max-time {text!r} is not a duration; use seconds (90), or 90s, 10m, 1.5h")
    value = float(match.group(1)) * {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[match.group(2)]
    if value <= 0:
        raise ValueError(f"--max-time must be positive, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", nargs="?", default=None,
                        help=f"preset name (shortcut for --config): {', '.join(list_presets())}")
    parser.add_argument("--config", default=None, help="preset name or path of a JSON config (default: tiny)")
    parser.add_argument("--data", default=None, help="UTF-8 text file (default: data/tiny_shakespeare.txt)")
    parser.add_argument("--experiment-name", default=None,
                        help="names checkpoints/<name>/ and logs/<name>/ (default: the preset name)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps in all")
    parser.add_argument("--max-time", default=None, help="wall-clock budget: 90, 90s, 10m, 1.5h")
    parser.add_argument("--resume", action="store_true", help="continue from the experiment's latest checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over, deleting an earlier run's checkpoints of the same experiment name")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 1337)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--eval-interval", type=int, default=None, help="evaluate and checkpoint every N steps")
    parser.add_argument("--sample-interval", type=int, default=None, help="print a sample every N steps (0: never)")
    parser.add_argument("--prompt", default=None, help="prompt for the samples (default: 'ROMEO:' or a newline)")
    parser.add_argument("--precision", default=None, help="auto, fp32, bf16 or fp16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--tokenizer", default="auto", choices=("auto", "char", "sentencepiece"),
                        help="auto: SentencePiece for Llama presets (if installed), characters otherwise")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="end of the text kept for validation")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set training.lr=3e-4 --set model.dropout=0.2")
    parser.add_argument("--log-dir", default="logs", help="base folder of the JSONL logs (default: logs)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="base folder of checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")


def _sentencepiece_available() -> bool:
    try:
        import sentencepiece  # noqa: F401

        import tiny_transformer.sentencepiece_tools  # noqa: F401
    except ImportError:
        return False
    return True


def build_tokenizer(kind: str, cfg: dict, text: str, train_text: str, log_dir: Path):
    """Fit the tokenizer the run uses: characters, or a SentencePiece BPE of the preset's vocab size."""
    if kind == "auto":
        kind = "sentencepiece" if cfg.get("model_type") == "llama" and _sentencepiece_available() else "char"
    if kind == "char":
        return CharTokenizer().fit(text)
    if not _sentencepiece_available():
        raise RuntimeError("--tokenizer sentencepiece needs the sentencepiece package: pip install sentencepiece")
    from tiny_transformer.sentencepiece_tools import SentencePieceTokenizer

    vocab_size = int(cfg["model"].get("vocab_size", 512))
    # Byte fallback reserves 256 byte pieces (+3 specials) on top of the characters; a vocabulary
    # smaller than that (Baby Llama's 128) keeps characters and merges only.
    byte_fallback = vocab_size >= 3 + 256 + len(set(train_text))
    log_dir.mkdir(parents=True, exist_ok=True)
    return SentencePieceTokenizer.train(train_text, vocab_size=vocab_size, model_prefix=log_dir / f"tok{vocab_size}",
                                        byte_fallback=byte_fallback)


def run(args: argparse.Namespace) -> int:
    if args.preset and args.config and args.preset != args.config:
        raise ValueError(f"two configs given ({args.preset!r} and --config {args.config!r}); give one")
    config_name = args.preset or args.config or "tiny"
    cfg = apply_overrides(load_preset(config_name), args.set)
    preset_label = Path(config_name).stem
    training = dict(cfg.get("training") or {})
    for key, value in (("max_steps", args.max_steps), ("seed", args.seed), ("device", args.device),
                       ("batch_size", args.batch_size), ("lr", args.lr), ("eval_interval", args.eval_interval),
                       ("sample_interval", args.sample_interval), ("precision", args.precision)):
        if value is not None:
            training[key] = value
    if args.max_time is not None:
        training["max_time"] = parse_duration(args.max_time)
    if args.compile:
        training["compile"] = True
    if args.prompt is not None:
        training["sample_prompt"] = args.prompt
    training["experiment_name"] = args.experiment_name or training.get("experiment_name") or preset_label
    training["log_dir"], training["checkpoint_dir"] = args.log_dir, args.checkpoint_dir
    if args.no_progress:
        training["progress"] = False
    warmup_given = any(item.split("=", 1)[0].strip() == "training.warmup_steps" for item in args.set)
    if args.max_steps is not None and not warmup_given and training.get("warmup_steps", 100) > args.max_steps:
        # A short run (--max-steps 100) of a preset with a long warm-up: shrink the warm-up to fit.
        training["warmup_steps"] = max(1, args.max_steps // 10)
    tconfig = TrainerConfig.from_dict(training)
    tconfig.validate()

    data_path = Path(args.data) if args.data else data_dir() / "tiny_shakespeare.txt"
    text = load_text(data_path)  # a missing file names the download command
    if not 0.0 < args.val_fraction < 0.5:
        raise ValueError(f"--val-fraction must be between 0 and 0.5, got {args.val_fraction}")
    train_text, val_text = train_val_split(text, args.val_fraction)
    run_dir = Path(args.log_dir) / tconfig.experiment_name

    resume_ckpt = None
    manager = CheckpointManager(Path(args.checkpoint_dir) / tconfig.experiment_name)
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; give one")
    if not args.resume and not args.overwrite and (manager.latest() or manager.best()):
        latest = manager.latest() or manager.best()
        raise ValueError(
            f"{manager.directory} already holds checkpoints of an earlier run ({latest.name}); add --resume "
            "to continue it, --overwrite to start over, or choose another --experiment-name"
        )
    if args.resume:
        latest = manager.latest()
        if latest is None:
            raise FileNotFoundError(
                f"--resume: no checkpoint in {manager.directory}; "
                f"start the run without --resume, or check --experiment-name ({tconfig.experiment_name!r})"
            )
        resume_ckpt = latest
        tokenizer = tokenizer_from_checkpoint(load_checkpoint(latest, mmap=True))  # the run's own vocabulary
    else:
        tokenizer = build_tokenizer(args.tokenizer, cfg, text, train_text, run_dir)
    if isinstance(tokenizer, CharTokenizer):
        cfg["model"]["vocab_size"] = tokenizer.vocab_size
    elif tokenizer.vocab_size > cfg["model"].get("vocab_size", 0):
        cfg["model"]["vocab_size"] = tokenizer.vocab_size

    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    set_seed(tconfig.seed)  # the initial weights depend on the seed only
    model = build_model(cfg)
    if "sample_prompt" not in training:
        prompt = "ROMEO:"
        try:
            tokenizer.encode(prompt)
        except ValueError:
            prompt = "\n"
        tconfig.sample_prompt = prompt
    if "sample_interval" not in training:
        tconfig.sample_interval = tconfig.eval_interval

    chars_per_token = len(val_text) / max(1, len(val_ids))
    run_info = {"data": {"path": str(data_path), "val_fraction": args.val_fraction, "preset": preset_label},
                "chars_per_token": chars_per_token}
    trainer = Trainer(model, tconfig, train_ids, val_ids, tokenizer=tokenizer, run_info=run_info)
    tokens_per_step = trainer.tokens_per_step
    print(f"device: {trainer.device} ({trainer.precision}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"data: {data_path} — {len(text):,} characters; tokenizer {type(tokenizer).__name__} "
          f"(vocabulary {tokenizer.vocab_size}); {len(train_ids):,} train / {len(val_ids):,} validation tokens")
    print(f"model: {preset_label} ({cfg.get('model_type', 'gpt')}), {model.num_parameters():,} parameters "
          f"({model.num_parameters(exclude_embeddings=True):,} without embeddings)")
    budget = f", at most {tconfig.max_time:g} s" if tconfig.max_time else ""
    print(f"training: {tconfig.max_steps} steps{budget}, {tokens_per_step:,} tokens per step "
          f"(batch {tconfig.batch_size} x accumulation {tconfig.grad_accum_steps} x context {trainer.seq_len}), "
          f"{tconfig.optimizer} lr {tconfig.lr:g}, {tconfig.schedule} schedule")
    print(f"logs: {trainer.logger.path}  checkpoints: {trainer.checkpoints.directory}")
    if resume_ckpt is not None:
        trainer.resume(resume_ckpt)
        print(f"resumed from {resume_ckpt} at step {trainer.step}")
        if trainer.step >= tconfig.max_steps:
            print(f"the run already reached max_steps={tconfig.max_steps}; raise --max-steps to train further")

    summary = trainer.train()
    val = summary["val_loss"]
    if val is not None:
        bpc = val / math.log(2) / chars_per_token
        print(f"done: {summary['steps']} steps in {summary['elapsed']:.1f} s ({summary['stopped_by']}), "
              f"val loss {val:.4f} (perplexity {math.exp(val):.2f}, {bpc:.3f} bits per character), "
              f"{summary['tokens_per_s']:,.0f} tokens/s")
    best = trainer.checkpoints.best() or trainer.last_checkpoint
    if best is not None:
        print("generate text with:")
        print(f'  python -m tiny_transformer generate --checkpoint {best} --prompt "{tconfig.sample_prompt.strip() or "ROMEO:"}"')
        print(f"list the checkpoints with:\n  python -m tiny_transformer evaluate --experiment-name "
              f"{tconfig.experiment_name}" + (f" --checkpoint-dir {args.checkpoint_dir}"
                                               if args.checkpoint_dir != "checkpoints" else ""))
    return 0
