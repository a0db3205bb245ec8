"""Training benchmarks: `python -m tiny_transformer bench train`.

Quality (the default): train a character-level model on Tiny Shakespeare for a fixed wall-clock
budget (150 s on 2 CPU threads) and report the validation loss on the 90/10 split, with a standard
error, measured over every non-overlapping window of the validation text. Two recipes:

* `reference`: the widely used minimal-GPT CPU recipe (4 layers, 4 heads, d_model 128, context 64,
  batch 12, AdamW 1e-3 with cosine decay over 2000 iterations, no dropout);
* `ours`: the recipe of the `cpu_fast` preset (see `tiny_transformer/configs/cpu_fast.json`).

`--recipe both` measures them back to back on the same machine. `--ablation` trains a list of
variants of `ours` (each with one change undone or one idea added) and prints a table. A time
budget means nothing on a busy machine (other processes steal the cores and the run makes fewer
steps), so `--steps N` trains exactly N steps instead: the losses then depend only on the recipe,
and the ms/step column tells what each step costs. `--match-budget` combines the two: it times a few
training steps of each recipe (ideally while the machine is quiet: the timing takes seconds, not
minutes), converts the budget into that recipe's number of steps, and trains exactly that many with
the schedule spanning them. A quiet 150 s run and its matched-steps run train the same number of
steps with the same learning-rate curve, so the loss is what the budget buys without the clock's noise.

Throughput (`--throughput`): tokens/s and achieved FLOP/s of training steps for the `tiny` and
`shakespeare` presets, with FLOPs per token = 6·N + 12·L·T·d, where N counts every weight that takes
part in a matrix multiplication (all parameters except the position table; a tied embedding counts
once, as the output head), L is the number of layers, T the context and d the model width (the
second term is attention's QKᵀ and AV products, forward and backward, as in the PaLM paper).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

from tiny_transformer.config import build_model, load_preset
from tiny_transformer.data import load_text, train_val_split
from tiny_transformer.tokenizers import CharTokenizer
from tiny_transformer.training import Trainer, TrainerConfig, apply_overrides, evaluate_loss
from tiny_transformer.utils import data_dir

REFERENCE_RECIPE = {
    "model_type": "gpt",
    "description": "minimal-GPT CPU recipe: 4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 iterations",
    "model": {
        "d_model": 128, "n_heads": 4, "n_layers": 4, "d_ff": 512, "max_seq_len": 64, "dropout": 0.0,
        "tie_weights": True, "pos_encoding": "learned", "activation": "gelu", "norm": "layernorm", "bias": False,
    },
    "training": {
        "batch_size": 12, "max_steps": 2000, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100,
        "schedule": "cosine", "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99, "grad_clip": 1.0,
    },
}

# Each ablation undoes one ingredient of `ours` (applied as --set style overrides).
ABLATIONS: list[tuple[str, list[str]]] = [
    ("ours (cpu_fast)", []),
    ("AdamW instead of Muon", ["training.optimizer=adamw", "training.matrix_lr=null"]),
    ("AdamW at the reference lr 1e-3", ["training.optimizer=adamw", "training.matrix_lr=null", "training.lr=1e-3",
                                        "training.min_lr=1e-4"]),
    ("cosine over 2000 steps, not the clock", ["training.schedule_by_time=false", "training.max_steps=2000"]),
    ("context 128, batch 32", ["model.max_seq_len=128", "training.batch_size=32"]),
    ("batch 12 (the reference's)", ["training.batch_size=12"]),
    ("no QK-norm", ["model.qk_norm=false"]),
    ("GPT-2 parts: learned positions, LayerNorm, GELU", ["model.pos_encoding=learned", "model.norm=layernorm",
                                                          "model.activation=gelu", "model.d_ff=512"]),
    ("with biases", ["model.bias=true"]),
]


def recipe(name: str) -> dict:
    """The config dict ({"model_type", "model", "training"}) of a named recipe."""
    if name == "reference":
        return copy.deepcopy(REFERENCE_RECIPE)
    if name == "ours":
        return load_preset("cpu_fast")
    return load_preset(name)


def _load_shakespeare(path: str | None):
    path = Path(path) if path else data_dir() / "tiny_shakespeare.txt"
    text = load_text(path)
    tokenizer = CharTokenizer().fit(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = train_val_split(ids, 0.1)
    return tokenizer, train_ids, val_ids


def run_quality(cfg: dict, budget: float | None, tokenizer, train_ids, val_ids, seed: int = 1337, label: str = "",
                verbose: bool = False, steps: int | None = None, matched: bool = False) -> dict:
    """Train `cfg` for `budget` seconds (or exactly `steps` steps) and evaluate on the whole
    validation split.

    With `steps`, the schedule spans those steps and no clock is involved: the result does not
    depend on the machine or on how busy it is. With `matched` (steps that fit a time budget), a
    recipe whose schedule is counted in steps (it sets max_steps, not schedule_by_time) keeps its
    own schedule and stops after `steps`, as the time budget would have stopped it.
    """
    own = cfg.get("training") or {}
    changes, run_steps = {}, None
    if steps is not None:
        if not matched or own.get("schedule_by_time") or "max_steps" not in own:
            # the schedule follows the budget: it spans exactly the steps we train
            changes.update(max_steps=steps, schedule_by_time=False,
                           warmup_steps=min(own.get("warmup_steps", 100), steps))
        else:
            # a recipe with its own step schedule (e.g. cosine over 2000 steps) keeps it, and stops
            # early if the budget ends first, as a time-limited run would
            run_steps = min(steps, own["max_steps"])
        changes["max_time"] = None
    else:
        changes["max_time"] = budget
    trainer = _bench_trainer(cfg, tokenizer.vocab_size, train_ids, seed, tokenizer=tokenizer, verbose=verbose,
                             **changes)
    model = trainer.raw_model
    summary = trainer.train(steps=run_steps)
    seq_len = trainer.seq_len
    result = evaluate_loss(model, val_ids, seq_len, batch_size=64)
    return {
        "label": label,
        "params": model.num_parameters(),
        "steps": summary["steps"],
        "tokens": trainer.tokens_seen,
        "train_seconds": summary["elapsed"],
        "tokens_per_s": summary["tokens_per_s"],
        "val_loss": result["loss"],
        "stderr": result["stderr"],
        "windows": result["windows"],
        "seq_len": seq_len,
    }


def time_steps(cfg: dict, vocab_size: int, train_ids, steps: int = 8, warmup: int = 3, seed: int = 1337) -> float:
    """Seconds per training step of `cfg` (median of `steps` timed steps after `warmup` untimed ones)."""
    total = warmup + steps
    own = cfg.get("training") or {}
    trainer = _bench_trainer(cfg, vocab_size, train_ids, seed, max_steps=total, max_time=None, schedule_by_time=False,
                             warmup_steps=min(own.get("warmup_steps", 100), total))
    times = []
    for i in range(total):
        t0 = time.perf_counter()
        trainer.train_step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _bench_trainer(cfg: dict, vocab_size: int, train_ids, seed: int, tokenizer=None, verbose: bool = False,
                   **training_changes) -> Trainer:
    """A fresh model of `cfg` (seeded) and a Trainer for it with the recipe's training settings plus
    `training_changes`, on the CPU, without checkpoints, progress bar or validation data (the
    budget goes to training steps only)."""
    cfg = copy.deepcopy(cfg)
    cfg["model"]["vocab_size"] = vocab_size
    torch.manual_seed(seed)
    model = build_model(cfg)
    training = {**(cfg.get("training") or {}), **training_changes}
    training.update(seed=seed, device="cpu", experiment_name="bench", save_checkpoints=False, progress=False,
                    verbose=verbose, log_dir=str(_scratch() / "logs"), checkpoint_dir=str(_scratch() / "checkpoints"))
    return Trainer(model, TrainerConfig.from_dict(training), train_ids, None, tokenizer=tokenizer)


def _scratch() -> Path:
    import tempfile

    path = Path(tempfile.gettempdir()) / "tiny_transformer_bench"
    path.mkdir(exist_ok=True)
    return path


def _print_table(rows: list[dict]) -> None:
    print(f"{'recipe':<40} {'params':>7} {'steps':>6} {'tokens':>7} {'ms/step':>7} {'tok/s':>7} {'val loss':>16}")
    for r in rows:
        ms = 1000 * r["train_seconds"] / max(1, r["steps"])
        print(f"{r['label']:<40} {r['params'] / 1e6:>6.2f}M {r['steps']:>6} {r['tokens'] / 1e6:>6.2f}M {ms:>7.0f} "
              f"{r['tokens_per_s']:>7,.0f} {r['val_loss']:>8.4f} ± {r['stderr']:.4f}")


def matmul_params(model) -> int:
    """Parameters used in matrix multiplications: everything but the learned position table."""
    n = model.num_parameters()
    pos = getattr(model, "pos_embedding", None)
    if isinstance(pos, torch.nn.Embedding):
        n -= pos.weight.numel()
    if model.output.weight is not model.tok_embeddings.weight:
        n -= model.tok_embeddings.weight.numel()  # an untied input table is a lookup, not a matmul
    return n


def flops_per_token(model, seq_len: int) -> int:
    """Training FLOPs per token: 6·N + 12·L·T·d (see the module docstring)."""
    cfg = model.config
    d = getattr(cfg, "d_model", None) or cfg.dim
    return 6 * matmul_params(model) + 12 * cfg.n_layers * seq_len * d


def run_throughput(preset: str, vocab_size: int, seconds: float, batch_size: int | None = None) -> dict:
    """Time training steps of a preset on random tokens; returns tokens/s and FLOP/s."""
    cfg = load_preset(preset)
    cfg["model"]["vocab_size"] = vocab_size
    cfg["model"]["dropout"] = 0.0
    torch.manual_seed(0)
    model = build_model(cfg)
    training = TrainerConfig.from_dict(dict(cfg.get("training") or {}))
    bs = batch_size or training.batch_size
    seq_len = training.seq_len or model.max_seq_len
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab_size, (bs, seq_len))
    y = torch.randint(0, vocab_size, (bs, seq_len))

    def step():
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up: allocator and kernel selection
        step()
    steps, t0 = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    dt = (time.perf_counter() - t0) / steps
    tok_s = bs * seq_len / dt
    fpt = flops_per_token(model, seq_len)
    return {"preset": preset, "params": model.num_parameters(), "batch": bs, "seq_len": seq_len,
            "ms_per_step": dt * 1000, "tokens_per_s": tok_s, "flops_per_token": fpt, "flops_per_s": fpt * tok_s}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="ours", help="ours (default), reference, both, or a preset name")
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per run (default 150)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train exactly this many steps instead of a time budget (load-independent)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--data", default=None, help="text file (default data/tiny_shakespeare.txt)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set training.lr=3e-3 (repeatable)")
    parser.add_argument("--match-budget", action="store_true",
                        help="time a few steps of each recipe, then train the number of steps that fit in --budget "
                             "(load-independent losses; time the steps on a quiet machine)")
    parser.add_argument("--train-threads", type=int, default=None,
                        help="with --match-budget: CPU threads for the training runs after the timing (the losses "
                             "do not depend on it; 1 suffers least when other programs share the machine)")
    parser.add_argument("--ablation", action="store_true",
                        help="train each ablation of `ours` for --budget seconds and print a table")
    parser.add_argument("--throughput", action="store_true",
                        help="tokens/s and FLOP/s of training steps for the tiny and shakespeare presets")
    parser.add_argument("--presets", default="tiny,shakespeare", help="presets for --throughput")
    parser.add_argument("--seconds", type=float, default=20.0, help="timing seconds per preset for --throughput")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size for --throughput (default: the preset's training batch size)")
    parser.add_argument("--verbose", action="store_true", help="print the trainer's progress")


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if args.throughput:
        print("FLOPs/token = 6*N + 12*L*T*d (N: weights in matmuls, L layers, T context, d width)")
        print(f"{'preset':<12} {'params':>8} {'batch':>5} {'T':>4} {'ms/step':>8} {'tokens/s':>9} "
              f"{'MFLOP/token':>11} {'GFLOP/s':>8}")
        for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
            r = run_throughput(preset, 65, args.seconds, batch_size=args.batch_size)
            print(f"{preset:<12} {r['params'] / 1e6:>7.2f}M {r['batch']:>5} {r['seq_len']:>4} "
                  f"{r['ms_per_step']:>8.1f} {r['tokens_per_s']:>9,.0f} {r['flops_per_token'] / 1e6:>11.2f} "
                  f"{r['flops_per_s'] / 1e9:>8.2f}")
        return 0

    tokenizer, train_ids, val_ids = _load_shakespeare(args.data)
    print(f"data: {len(train_ids):,} train / {len(val_ids):,} validation characters, vocabulary {tokenizer.vocab_size}")
    if args.ablation:
        runs = [(label, apply_overrides(recipe("ours"), sets + args.set)) for label, sets in ABLATIONS]
    else:
        names = ["reference", "ours"] if args.recipe == "both" else [args.recipe]
        runs = [(name, apply_overrides(recipe(name), args.set)) for name in names]
    if args.steps is not None and args.steps <= 0:
        raise ValueError(f"--steps must be a positive number of steps, got {args.steps}")
    if args.steps is None and args.budget <= 0:
        raise ValueError(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.steps is not None and args.match_budget:
        raise ValueError("--steps and --match-budget exclude each other: --match-budget chooses the steps")
    budget = f"{args.steps} steps" if args.steps else f"{args.budget:g} s"
    steps = {label: args.steps for label, _ in runs}
    if args.match_budget:
        # Time every recipe first, back to back, so that all timings see the same machine.
        budget = f"the steps that fit in {args.budget:g} s"
        print(f"timing a few steps of each recipe (machine load {_load()}) ...", flush=True)
        for label, cfg in runs:
            dt = time_steps(cfg, tokenizer.vocab_size, train_ids, seed=args.seed)
            steps[label] = max(1, int(args.budget / dt))
            own_max = cfg.get("training", {}).get("max_steps")
            if own_max:
                steps[label] = min(steps[label], own_max)  # a recipe that ends before the budget stops there
            print(f"  {label:<48} {dt * 1000:7.0f} ms/step -> {steps[label]:>6} steps", flush=True)
        print(f"machine load after timing: {_load()}")
        if args.train_threads:
            torch.set_num_threads(args.train_threads)
    rows = []
    for label, cfg in runs:
        print(f"training {label} for {f'{steps[label]} steps' if steps[label] else budget} ...", flush=True)
        row = run_quality(cfg, args.budget, tokenizer, train_ids, val_ids, seed=args.seed, label=label,
                          verbose=args.verbose, steps=steps[label], matched=args.match_budget)
        rows.append(row)
        _print_table([row])
    print()
    print(f"validation loss over all {rows[0]['windows']} windows of the validation split (± standard error); "
          f"{budget} of training on {args.threads} threads; machine load {_load()}")
    _print_table(rows)
    return 0


def _load() -> str:
    """The 1-minute load average (a busy machine makes a time budget worth fewer steps)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "unknown"

