"""`python -m tiny_transformer train`: train a model from a preset (or a JSON config) on a text file.

    python -m tiny_transformer train --config tiny --data data/tiny_shakespeare.txt --max-steps 100 \\
        --experiment-name quick_test
    python -m tiny_transformer train shakespeare            # the capstone: preset, data and name in one word
    python -m tiny_transformer train shakespeare --resume   # continue it from its latest checkpoint
    python -m tiny_transformer train cpu_fast --max-time 150s
    python -m tiny_transformer train --init-from checkpoints/shakespeare/best.pt --data my_text.txt \\
        --experiment-name my_finetune --lr 3e-4 --max-steps 60       # fine-tune on another text

Shortcuts: the preset may be given as the first word instead of `--config`; the experiment name
defaults to the preset name and the data to data/tiny_shakespeare.txt. `--max-time` accepts 90, 90s,
10m or 1.5h. Any preset value can be overridden with `--set training.lr=3e-4 --set model.dropout=0.2`.

Character-level models fit a `CharTokenizer` on the whole text and take its vocabulary size (65 for
Tiny Shakespeare) whatever the preset says. With `--tokenizer sentencepiece` (the default for the
Llama presets when SentencePiece is installed) a BPE vocabulary of the preset's vocab_size is
trained on the training split first.

Fine-tuning (`--init-from FILE`) starts from the weights, model config and tokenizer stored in a
training or production checkpoint, with a fresh optimizer and learning-rate schedule from step 0.
The training settings default to the source run's (a fine-tune usually wants a lower `--lr` and
far fewer `--max-steps`); the new text may only use characters the checkpoint's tokenizer knows, and
the run needs a new `--experiment-name`. A fine-tuning run that stopped continues with `--resume`:
its model config and settings are read back from its own checkpoints.
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
    load_model_from_checkpoint,
    tokenizer_from_checkpoint,
)
from tiny_transformer.config import build_model, list_presets, load_preset
from tiny_transformer.data import load_text, train_val_split
from tiny_transformer.finetune import check_vocabulary
from tiny_transformer.tokenizers import CharTokenizer
from tiny_transformer.training import Trainer, TrainerConfig, apply_overrides
from tiny_transformer.utils import data_dir, set_seed

# Training settings that belong to one run or one machine rather than to the recipe: a run that
# starts from (or resumes) a checkpoint's stored config takes them from the command line instead.
RUN_SETTINGS = ("experiment_name", "log_dir", "checkpoint_dir", "device", "compile", "progress", "verbose",
                "sample_prompt", "sample_interval")

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
    parser.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                        help="fine-tune: start from the weights, model config and tokenizer of a training or "
                             "production checkpoint, with a fresh optimizer and schedule from step 0 and the "
                             "source run's training settings (lower them with --lr, --max-steps, --set); "
                             "needs a new --experiment-name, and --data may only use characters the "
                             "checkpoint's tokenizer knows")
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
    parser.epilog = ("fine-tuning: python -m tiny_transformer train --init-from checkpoints/shakespeare/best.pt "
                     "--data my_text.txt --experiment-name my_finetune --lr 3e-4 --max-steps 60 "
                     "(if it stops, continue it with: train --resume --experiment-name my_finetune)")


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


def _check_init_from_options(args: argparse.Namespace) -> None:
    """Refuse the options that contradict `--init-from` (the model comes from the checkpoint)."""
    if args.resume:
        raise ValueError("--init-from starts a new run from another run's weights and --resume continues this "
                         "experiment's own latest checkpoint; give one of them (a fine-tuning run that stopped "
                         "continues with --resume --experiment-name NAME, without --init-from)")
    if args.preset or args.config:
        raise ValueError(f"--init-from takes the model from the checkpoint, so the preset "
                         f"{args.preset or args.config!r} cannot apply; leave it out and change training settings "
                         "with --lr, --max-steps or --set training.KEY=VALUE")
    model_sets = [item for item in args.set if item.split("=", 1)[0].strip().startswith("model.")]
    if model_sets:
        raise ValueError(f"--init-from keeps the checkpoint's model config, so --set {model_sets[0]} cannot apply; "
                         "leave it out (training.KEY=VALUE settings can change)")
    if args.tokenizer != "auto":
        raise ValueError(f"--init-from uses the checkpoint's own tokenizer, so --tokenizer {args.tokenizer} cannot "
                         "apply; leave it out")
    if not args.experiment_name:
        raise ValueError("--init-from needs --experiment-name NAME, a new name for the fine-tuning run "
                         "(its checkpoints go to checkpoints/NAME/ and its log to logs/NAME/)")


def _load_init_checkpoint(args: argparse.Namespace):
    """The model, tokenizer and metadata of `--init-from` (weights_only=True, checked by the loader)."""
    path = Path(args.init_from)
    try:
        model, tokenizer, meta = load_model_from_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"--init-from: {exc}") from exc
    if tokenizer is None:
        raise ValueError(f"--init-from: {path} stores no tokenizer, so a new text cannot be encoded the way the "
                         "model was trained; use a checkpoint written by `train` or `export --format production`")
    source_name = (meta["config"].get("training") or {}).get("experiment_name")
    new_dir = Path(args.checkpoint_dir) / args.experiment_name
    if args.experiment_name == source_name or path.resolve().parent == new_dir.resolve():
        raise ValueError(f"--experiment-name {args.experiment_name!r} is the run {path} comes from; a fine-tuning "
                         "run needs a new name, so that it neither mixes with nor deletes the source's "
                         f"checkpoints (e.g. --experiment-name {args.experiment_name}_finetune)")
    return model, tokenizer, meta


def _finetune_config_to_resume(args: argparse.Namespace) -> dict | None:
    """The stored config of the fine-tuning run that `--resume` continues; None for any other run.

    A run started with --init-from has no preset behind it: its model config and training settings
    live only in its own checkpoints, so resuming it reads them from there.
    """
    if not args.resume or args.preset or args.config or not args.experiment_name:
        return None
    latest = CheckpointManager(Path(args.checkpoint_dir) / args.experiment_name).latest()
    if latest is None:
        return None  # the resume step below explains that there is nothing to resume
    config = load_checkpoint(latest, mmap=True)["config"]
    return config if config.get("init_from") else None


def _config_from_checkpoint(config: dict) -> dict:
    """A preset-style dict from a checkpoint's config: its model, and its run's training settings
    without the ones that belong to that run or machine (`RUN_SETTINGS`)."""
    training = {k: v for k, v in (config.get("training") or {}).items() if k not in RUN_SETTINGS}
    return {"model_type": config.get("model_type", "gpt"), "model": dict(config.get("model") or {}),
            "training": training}


def run(args: argparse.Namespace) -> int:
    if args.preset and args.config and args.preset != args.config:
        raise ValueError(f"two configs given ({args.preset!r} and --config {args.config!r}); give one")
    source_model = source_tokenizer = source_meta = None  # fine-tuning: what --init-from holds
    if args.init_from:
        _check_init_from_options(args)
        source_model, source_tokenizer, source_meta = _load_init_checkpoint(args)
    # A fine-tuning run (new, or resumed) has no preset: its model and recipe come from a checkpoint.
    stored = source_meta["config"] if source_meta else _finetune_config_to_resume(args)
    if stored is not None:
        cfg = apply_overrides(_config_from_checkpoint(stored), args.set)
        preset_label = (stored.get("data") or {}).get("preset") or "checkpoint"
        init_from = str(args.init_from) if source_meta else stored["init_from"]
    else:
        config_name = args.preset or args.config or "tiny"
        cfg = apply_overrides(load_preset(config_name), args.set)
        preset_label = Path(config_name).stem
        init_from = None
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

    if args.data:
        data_path = Path(args.data)
    elif stored is not None and source_meta is None and (stored.get("data") or {}).get("path"):
        data_path = Path(stored["data"]["path"])  # resuming a fine-tuning run: its own text
    else:
        data_path = data_dir() / "tiny_shakespeare.txt"
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
        resume = "--resume (without --init-from)" if args.init_from else "--resume"
        raise ValueError(
            f"{manager.directory} already holds checkpoints of an earlier run ({latest.name}); add {resume} "
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
    elif source_tokenizer is not None:
        tokenizer = source_tokenizer  # the model can only read what its tokenizer produced
    else:
        tokenizer = build_tokenizer(args.tokenizer, cfg, text, train_text, run_dir)
    if source_model is None:
        if isinstance(tokenizer, CharTokenizer):
            cfg["model"]["vocab_size"] = tokenizer.vocab_size
        elif tokenizer.vocab_size > cfg["model"].get("vocab_size", 0):
            cfg["model"]["vocab_size"] = tokenizer.vocab_size
    elif isinstance(tokenizer, CharTokenizer):
        # Name every character the source's vocabulary lacks at once, not just the first one.
        # (SentencePiece encodes unseen characters as it did in the source run: as bytes, or as <unk>.)
        check_vocabulary(text, tokenizer, fix=(
            f"the checkpoint's character-level model knows only the {tokenizer.vocab_size} characters it was "
            f"trained on: replace or remove these in {data_path} (in Python, "
            "tiny_transformer.finetune.fit_to_vocabulary(text, tokenizer) does it), or fine-tune on another text"))

    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    if source_model is not None:
        model = source_model  # the source's weights; the Trainer builds a fresh optimizer and schedule
    else:
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
    if init_from is not None:
        run_info["init_from"] = init_from  # marks a fine-tuning run (and lets --resume find its config)
    trainer = Trainer(model, tconfig, train_ids, val_ids, tokenizer=tokenizer, run_info=run_info)
    tokens_per_step = trainer.tokens_per_step
    print(f"device: {trainer.device} ({trainer.precision}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"data: {data_path} — {len(text):,} characters; tokenizer {type(tokenizer).__name__} "
          f"(vocabulary {tokenizer.vocab_size}); {len(train_ids):,} train / {len(val_ids):,} validation tokens")
    print(f"model: {preset_label} ({cfg.get('model_type', 'gpt')}), {model.num_parameters():,} parameters "
          f"({model.num_parameters(exclude_embeddings=True):,} without embeddings)")
    if source_meta is not None:
        source_val = source_meta["val_loss"]
        source_val = f", val loss {source_val:.4f}" if isinstance(source_val, float) else ""
        print(f"fine-tuning: weights, model config and tokenizer from {args.init_from} ({source_meta['kind']} "
              f"checkpoint, step {source_meta['step']}{source_val}); a fresh optimizer and schedule from step 0")
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
