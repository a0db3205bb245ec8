"""Training: `TrainerConfig`, `Trainer`, learning-rate schedules, optimizers and JSON Lines logs.

    >>> trainer = Trainer(model, TrainerConfig(max_steps=500, lr=1e-3), train_tokens, val_tokens,
    ...                   tokenizer=tok)                                   # doctest: +SKIP
    >>> trainer.train()                                                    # doctest: +SKIP

One training step: draw `grad_accum_steps` random batches, run forward + backward on each (the
gradients add up), clip the gradient norm, set every parameter group's learning rate from the
schedule, and let the optimizer update the weights. Every `eval_interval` steps the model is
evaluated on fixed validation batches, a checkpoint is written (see `checkpoint.py`) and a line is
appended to `logs/<experiment>/train.log`.

Resuming is exact: a checkpoint stores the weights, the optimizer, every random generator and the
data sampler's position, so N steps in one go and N/2 + N/2 with a restart give identical losses.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from tiny_transformer.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    model_type_of,
    restore_rng_state,
)
from tiny_transformer.data import RandomBatchSampler
from tiny_transformer.utils import select_device, set_seed

# The training loop reads the time through this name, so tests can substitute a simulated clock.
_clock = time.perf_counter

SCHEDULES = ("cosine", "stable_cooldown", "constant")
OPTIMIZERS = ("adamw", "muon")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOG_KEYS = ("step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed")  # one JSON line per log step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped without saving the broken weights."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class TrainerConfig:
    """Every knob of a training run. Defaults suit a small character-level model on a CPU."""

    # the run
    experiment_name: str = "default"
    max_steps: int = 1000
    max_time: float | None = None  # seconds of wall clock for this call of train(); None = no limit
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # batches: one optimizer step sees batch_size * grad_accum_steps sequences of seq_len tokens
    batch_size: int = 32
    seq_len: int | None = None  # None: the model's context (max_seq_len)
    grad_accum_steps: int = 1
    # optimizer
    optimizer: str = "adamw"  # adamw | muon (orthogonalised updates for weight matrices)
    lr: float = 1e-3
    min_lr: float | None = None  # floor of the schedule; None: lr / 10
    weight_decay: float = 0.1  # applied to matrices (embeddings, projections, head), not to norms/biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # per-group learning rates (None: use lr); the schedule scales each group by the same factor
    embedding_lr: float | None = None
    matrix_lr: float | None = None
    scalar_lr: float | None = None
    head_lr: float | None = None
    muon_momentum: float = 0.95
    # schedule
    schedule: str = "cosine"  # cosine | stable_cooldown | constant
    warmup_steps: int = 100
    cooldown_frac: float = 0.2  # stable_cooldown: last fraction of the run decays linearly to min_lr
    schedule_by_time: bool = False  # with max_time: progress = elapsed / max_time instead of steps
    # speed
    precision: str = "auto"  # auto: bf16 on recent GPUs, fp16 (+ grad scaler) on older ones, fp32 on CPU
    compile: bool = False  # torch.compile the model (helps on GPUs; compile time costs on small runs)
    # evaluation, logging and checkpoints
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    save_checkpoints: bool = True
    keep_best: int = 2  # checkpoints kept: the best N by validation loss plus the latest
    sample_interval: int = 0  # print a generated sample every N steps (0: never)
    sample_prompt: str = "\n"
    sample_tokens: int = 200
    sample_temperature: float = 0.8
    log_dir: str = "logs"
    checkpoint_dir: str = "checkpoints"
    progress: bool = True  # tqdm progress bar
    verbose: bool = True  # print evaluations and samples

    @classmethod
    def from_dict(cls, d: dict) -> TrainerConfig:
        """Build from a dict (a preset's "training" section); unknown keys are an error with a hint."""
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown training setting {key!r}{hint}; valid settings: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def min_lr_value(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def validate(self, model_max_seq_len: int | None = None) -> None:
        """Reject bad values before any work is done, naming the field and what is allowed."""

        def need(ok: bool, field: str, allowed: str):
            if not ok:
                raise ValueError(f"training.{field} = {getattr(self, field)!r} is invalid: {allowed}")

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        need(isinstance(self.experiment_name, str) and self.experiment_name.strip() != ""
             and not any(c in self.experiment_name for c in "/\\") and self.experiment_name not in (".", ".."),
             "experiment_name", "use a non-empty name without slashes, e.g. 'quick_test'")
        need(is_int(self.max_steps) and self.max_steps > 0, "max_steps", "it must be a positive integer")
        need(self.max_time is None or (is_num(self.max_time) and self.max_time > 0), "max_time",
             "it must be a positive number of seconds or None")
        need(is_int(self.seed), "seed", "it must be an integer")
        need(is_int(self.batch_size) and self.batch_size > 0, "batch_size", "it must be a positive integer")
        need(is_int(self.grad_accum_steps) and self.grad_accum_steps > 0, "grad_accum_steps",
             "it must be a positive integer (1 = no accumulation)")
        need(self.seq_len is None or (is_int(self.seq_len) and self.seq_len > 0), "seq_len",
             "it must be a positive integer or None (= the model's context)")
        if model_max_seq_len is not None and self.seq_len is not None and self.seq_len > model_max_seq_len:
            raise ValueError(
                f"training.seq_len = {self.seq_len} is longer than the model's context "
                f"(max_seq_len = {model_max_seq_len}); use seq_len <= {model_max_seq_len} or raise model.max_seq_len"
            )
        need(self.optimizer in OPTIMIZERS, "optimizer", f"choose one of {', '.join(OPTIMIZERS)}")
        need(self.schedule in SCHEDULES, "schedule", f"choose one of {', '.join(SCHEDULES)}")
        need(self.precision in PRECISIONS, "precision", f"choose one of {', '.join(PRECISIONS)}")
        need(is_num(self.lr) and self.lr > 0, "lr", "the learning rate must be a positive number such as 1e-3")
        need(self.min_lr is None or (is_num(self.min_lr) and 0 <= self.min_lr <= self.lr), "min_lr",
             f"it must lie between 0 and lr ({self.lr}), or be None for lr / 10")
        for name in ("embedding_lr", "matrix_lr", "scalar_lr", "head_lr"):
            value = getattr(self, name)
            need(value is None or (is_num(value) and value > 0), name, "it must be a positive number or None (= lr)")
        need(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "it must be >= 0")
        need(is_num(self.beta1) and 0 <= self.beta1 < 1, "beta1", "it must lie in [0, 1)")
        need(is_num(self.beta2) and 0 <= self.beta2 < 1, "beta2", "it must lie in [0, 1)")
        need(is_num(self.eps) and self.eps > 0, "eps", "it must be a small positive number such as 1e-8")
        need(is_num(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "it must be >= 0 (0 disables clipping)")
        need(is_num(self.muon_momentum) and 0 <= self.muon_momentum < 1, "muon_momentum", "it must lie in [0, 1)")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "it must be an integer >= 0")
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"training.warmup_steps = {self.warmup_steps} is larger than training.max_steps = "
                f"{self.max_steps}; use warmup_steps <= max_steps (typically 1-10% of the run)"
            )
        need(is_num(self.cooldown_frac) and 0 <= self.cooldown_frac <= 1, "cooldown_frac", "it must lie in [0, 1]")
        if self.schedule_by_time and self.max_time is None:
            raise ValueError("training.schedule_by_time = True needs training.max_time (the budget the schedule spans)")
        need(is_int(self.eval_interval) and self.eval_interval > 0, "eval_interval", "it must be a positive integer")
        need(is_int(self.eval_batches) and self.eval_batches > 0, "eval_batches", "it must be a positive integer")
        need(is_int(self.log_interval) and self.log_interval > 0, "log_interval", "it must be a positive integer")
        need(is_int(self.keep_best) and self.keep_best > 0, "keep_best", "it must be a positive integer")
        need(is_int(self.sample_interval) and self.sample_interval >= 0, "sample_interval",
             "it must be an integer >= 0 (0 disables samples)")
        need(is_int(self.sample_tokens) and self.sample_tokens > 0, "sample_tokens", "it must be a positive integer")
        need(is_num(self.sample_temperature) and self.sample_temperature > 0, "sample_temperature",
             "it must be a positive number")
        need(isinstance(self.device, str), "device", "choose auto, cpu, cuda, cuda:N or mps")


def parse_value(text: str):
    """A command-line value as JSON when it parses (3e-4, true, null, [1, 2]), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: dict, assignments: list[str]) -> dict:
    """Apply `section.key=value` assignments (e.g. "training.lr=3e-4", "model.dropout=0.2") to a
    preset-style dict, returning a new dict. Unknown sections are an error; unknown keys are caught
    later by the config classes, which list the valid names."""
    import copy

    config = copy.deepcopy(config)
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"--set expects SECTION.KEY=VALUE (e.g. training.lr=3e-4), got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in ("model", "training") or not parts[1]:
            raise ValueError(f"--set key {key!r} must be model.NAME or training.NAME "
                             "(e.g. model.dropout=0.2, training.batch_size=64)")
        config.setdefault(parts[0], {})[parts[1]] = parse_value(value.strip())
    return config


# --------------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------------
def lr_multiplier(
    schedule: str,
    step: int,
    max_steps: int,
    warmup_steps: int = 0,
    min_ratio: float = 0.1,
    cooldown_frac: float = 0.2,
    progress: float | None = None,
) -> float:
    """The factor (0..1] that multiplies the base learning rate at optimizer step `step` (0-based).

    * warm-up (all schedules): linear from 1/warmup_steps up to 1 over the first `warmup_steps` steps,
      because Adam's moment estimates are noisy at first and big early steps can derail training;
    * "cosine": after warm-up, half a cosine from 1 down to `min_ratio` at `max_steps`;
    * "stable_cooldown" (warmup-stable-decay): flat at 1, then a linear cooldown to `min_ratio`
      over the last `cooldown_frac` of the run; the flat phase lets one run be extended and
      cooled down at any point;
    * "constant": 1 after warm-up.

    `progress` (0..1) replaces `step / max_steps` for the decay phase; a time-budgeted run passes
    elapsed / max_time so the schedule ends when the budget does.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if progress is None:
        span = max(1, max_steps - warmup_steps)
        progress = (step - warmup_steps) / span
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # stable_cooldown
    if cooldown_frac <= 0 or progress < 1.0 - cooldown_frac:
        return 1.0
    done = (progress - (1.0 - cooldown_frac)) / cooldown_frac
    return 1.0 - (1.0 - min_ratio) * done


def lr_at(config: TrainerConfig, step: int, progress: float | None = None) -> float:
    """The base learning rate of `config` at `step` (what `viz.plot_lr_schedule` draws)."""
    ratio = config.min_lr_value / config.lr
    return config.lr * lr_multiplier(
        config.schedule, step, config.max_steps, config.warmup_steps, ratio, config.cooldown_frac, progress
    )


# --------------------------------------------------------------------------------------------
# Parameter groups and optimizers
# --------------------------------------------------------------------------------------------
GROUP_NAMES = ("embedding", "matrix", "scalar", "head")


def classify_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Sort the trainable parameters into four groups, each parameter once (a tied head counts once):

    * "embedding": token and learned position tables (`nn.Embedding` weights)
    * "head": the output projection when it is not tied to the token embedding
    * "matrix": every other weight with 2+ dimensions (attention and MLP projections)
    * "scalar": 0/1-dimensional parameters (norm gains, biases)
    """
    groups: dict[str, list] = {name: [] for name in GROUP_NAMES}
    seen: set[int] = set()
    head = getattr(model, "output", None)
    head_weight = head.weight if isinstance(head, nn.Linear) else None
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.Embedding):
                groups["embedding"].append((full, p))
            elif p is head_weight:
                groups["head"].append((full, p))
            elif p.dim() >= 2:
                groups["matrix"].append((full, p))
            else:
                groups["scalar"].append((full, p))
    return groups


def param_groups(model: nn.Module, config: TrainerConfig) -> list[dict]:
    """Optimizer parameter groups with names, base learning rates and weight decay.

    Weight decay pulls weights towards zero; it is meant for the big matrices. Decaying norm gains
    (which should stay near 1) or biases only hurts, so those get none (nanoGPT's convention).
    """
    lrs = {
        "embedding": config.embedding_lr,
        "matrix": config.matrix_lr,
        "scalar": config.scalar_lr,
        "head": config.head_lr,
    }
    groups = []
    for name, named in classify_parameters(model).items():
        if not named:
            continue
        base_lr = lrs[name] if lrs[name] is not None else config.lr
        groups.append(
            {
                "name": name,
                "params": [p for _, p in named],
                "param_names": [n for n, _ in named],
                "lr": base_lr,
                "base_lr": base_lr,
                "weight_decay": 0.0 if name == "scalar" else config.weight_decay,
                "use_muon": config.optimizer == "muon" and name == "matrix",
            }
        )
    return groups


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately replace a matrix by the nearest orthogonal one (U Vᵀ of its SVD U S Vᵀ).

    A Newton-Schulz iteration with a quintic polynomial whose coefficients push every singular
    value quickly into a band around 1 (they need not converge to exactly 1 to work well). Only
    matrix multiplications, so it is cheap on any device.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:  # iterate on the wide orientation: the Gram matrix x xᵀ is then the small one
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # singular values now <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for weight matrices, AdamW for everything else, in one optimizer.

    Groups with `use_muon=True` take momentum SGD steps whose update matrix is orthogonalised
    (`orthogonalize`): every direction of the update gets the same size, so rare but useful
    directions are not drowned out by the dominant ones. Embeddings, the head and norm gains keep
    AdamW (their gradients are sparse or one-dimensional, where orthogonalising makes no sense).
    One class for both keeps `state_dict()`, gradient scaling and checkpoints simple.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        defaults = dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay, use_muon=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if wd:
                    p.mul_(1 - lr * wd)  # decoupled weight decay (the "W" in AdamW)
                if group["use_muon"]:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.lerp_(grad, 1 - group["momentum"])
                    update = grad.lerp(buf, group["momentum"])  # Nesterov: look one step ahead
                    update = orthogonalize(update.reshape(update.shape[0], -1)).view_as(p)
                    # An orthogonal (r x c) matrix has entries of size ~1/sqrt(max(r, c)); this factor
                    # makes tall matrices take steps as large as wide ones.
                    scale = max(1.0, p.shape[0] / p[0].numel()) ** 0.5
                    p.add_(update, alpha=-lr * scale)
                else:
                    beta1, beta2 = group["betas"]
                    if "step" not in state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    t = state["step"].item()
                    state["exp_avg"].lerp_(grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))
        return loss


def build_optimizer(model: nn.Module, config: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW (or Muon + AdamW) over the named parameter groups of `param_groups`."""
    groups = param_groups(model, config)
    if config.optimizer == "muon":
        return Muon(groups, lr=config.lr, momentum=config.muon_momentum, betas=(config.beta1, config.beta2),
                    eps=config.eps, weight_decay=config.weight_decay)
    device = next(model.parameters()).device
    # The fused CUDA kernel does the whole update in one launch; on the CPU the foreach path is fastest.
    extra = {"fused": True} if device.type == "cuda" else {}
    for g in groups:
        g.pop("use_muon")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                             weight_decay=config.weight_decay, **extra)


# --------------------------------------------------------------------------------------------
# Evaluation helpers
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_loss(model, tokens: torch.Tensor, seq_len: int, batch_size: int = 32, device=None,
                  max_windows: int | None = None, autocast=None) -> dict:
    """Mean next-token loss over non-overlapping windows covering `tokens` (the whole split).

    Returns {"loss", "stderr", "windows", "tokens"}. The standard error is computed from the
    per-window losses (std / sqrt(windows)), so two models can be compared with error bars.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"{len(tokens)} tokens are too few for one window of seq_len={seq_len} (+1 target)")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_window = []
    ctx = autocast or contextlib.nullcontext()
    try:
        for start in range(0, n_windows, batch_size):
            idx = torch.arange(start, min(start + batch_size, n_windows)) * seq_len
            windows = tokens[idx[:, None] + torch.arange(seq_len + 1)]
            x, y = windows[:, :-1].to(device), windows[:, 1:].to(device)
            with ctx:
                logits, _ = model(x)
            losses = nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
            )
            per_window.append(losses.view(len(idx), seq_len).mean(dim=1).double().cpu())
    finally:
        model.train(was_training)
    per_window = torch.cat(per_window)
    stderr = float(per_window.std() / math.sqrt(len(per_window))) if len(per_window) > 1 else float("nan")
    return {"loss": float(per_window.mean()), "stderr": stderr, "windows": len(per_window),
            "tokens": len(per_window) * seq_len}


def _fallback_sample(model, tokenizer, prompt, max_new_tokens, temperature, seed):
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [0]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -model.max_seq_len:], last_only=True)
            probs = torch.softmax(logits[0, -1].float().cpu() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).to(device)
            idx = torch.cat([idx, nxt[None]], dim=1)
    finally:
        model.train(was_training)
    return tokenizer.decode(idx[0, len(ids):].tolist())


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
                seed: int = 0) -> str:
    """A short text sample from `model` for progress reports.

    Uses `tiny_transformer.sampling.TextGenerator` when it is available, else a plain temperature
    sampling loop. The global random generators are saved and restored around it, so printing
    samples never changes the training run.
    """
    param = next(model.parameters())
    devices = [param.device.index or 0] if param.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            from tiny_transformer.sampling import GeneratorConfig, TextGenerator
        except ImportError:
            return _fallback_sample(model, tokenizer, prompt, max_new_tokens, temperature, seed)
        was_training = model.training
        model.eval()
        try:
            gen = TextGenerator(model, tokenizer)
            result = gen.generate(prompt, GeneratorConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                                          seed=seed))
            return result.text
        finally:
            model.train(was_training)


# --------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------
def read_log(path: str | os.PathLike) -> list[dict]:
    """Read a JSON Lines training log (one dict per line); damaged lines are skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "train.log"
    if not path.exists():
        raise FileNotFoundError(f"training log {path} not found; it is written by `python -m tiny_transformer train`")
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return records


class JsonlLogger:
    """Appends one JSON object per line to `path` and flushes it, so a crash loses nothing."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def reset(self) -> None:
        """Start an empty log (a fresh run replaces an earlier run of the same experiment)."""
        self.path.unlink(missing_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (they belong to a run that is being resumed earlier)."""
        if not self.path.exists():
            return
        kept = [r for r in read_log(self.path) if not (isinstance(r.get("step"), int) and r["step"] > step)]
        tmp = self.path.with_suffix(".log.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------
class Callback:
    """Hooks into the training loop; override the ones you need."""

    def on_train_begin(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        """After every optimizer step; `record` holds step, train_loss, lr (and val_loss after an eval)."""

    def on_evaluate(self, trainer: Trainer, record: dict) -> None: ...

    def on_train_end(self, trainer: Trainer, summary: dict) -> None: ...


class SampleCallback(Callback):
    """Print a generated sample every `every` steps, to watch the model learn."""

    def __init__(self, every: int, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8):
        self.every, self.prompt = every, prompt
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.samples: list[tuple[int, str]] = []

    def on_step_end(self, trainer, record):
        if trainer.tokenizer is None or trainer.step % self.every:
            return
        text = sample_text(trainer.raw_model, trainer.tokenizer, self.prompt, self.max_new_tokens,
                           self.temperature, seed=trainer.config.seed)
        self.samples.append((trainer.step, text))
        trainer.print(f"--- sample at step {trainer.step} ---\n{self.prompt}{text}\n---")


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
def _as_tokens(data, name: str) -> torch.Tensor:
    if data is None:
        return None
    t = data if isinstance(data, torch.Tensor) else torch.as_tensor(data, dtype=torch.long)
    if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name} must be a 1-D sequence of integer token ids, got shape {tuple(t.shape)} {t.dtype}")
    return t.long()


class Trainer:
    """Trains a `TinyTransformerLM`/`LlamaLM` on a token sequence. See the module docstring.

    Args:
        model: the model (moved to the chosen device).
        config: a `TrainerConfig` (checked by `validate` before anything runs).
        train_data, val_data: 1-D token id sequences (tensor or list).
        tokenizer: stored in checkpoints and used for samples (optional).
        callbacks: extra `Callback` objects (e.g. `viz.LiveLossPlot()`).
        run_info: extra entries for the checkpoint's config (e.g. the data path).
    """

    def __init__(self, model: nn.Module, config: TrainerConfig, train_data, val_data=None, tokenizer=None,
                 callbacks=(), run_info: dict | None = None):
        if not isinstance(config, TrainerConfig):
            raise TypeError("config must be a TrainerConfig (use TrainerConfig.from_dict for a dict)")
        config.validate(getattr(model, "max_seq_len", None))
        self.config = config
        self.seq_len = config.seq_len or model.max_seq_len
        self.train_data = _as_tokens(train_data, "train_data")
        self.val_data = _as_tokens(val_data, "val_data")
        if self.train_data is None or len(self.train_data) < self.seq_len + 1:
            n = 0 if self.train_data is None else len(self.train_data)
            raise ValueError(f"the training data has {n} tokens, too few for one window of seq_len={self.seq_len} "
                             "(+1 target); use a longer text or a smaller training.seq_len")
        if self.val_data is not None and len(self.val_data) < self.seq_len + 1:
            raise ValueError(f"the validation data has {len(self.val_data)} tokens, too few for one window of "
                             f"seq_len={self.seq_len}; use a larger validation fraction or a smaller seq_len")
        vocab = getattr(model, "vocab_size", None)
        if vocab is not None and int(self.train_data.max()) >= vocab:
            raise ValueError(f"the training data contains token id {int(self.train_data.max())} but the model's "
                             f"vocabulary has {vocab} entries; set model.vocab_size to the tokenizer's vocab_size")

        self.device = select_device(config.device)
        self.raw_model = model.to(self.device)
        self.model = self.raw_model
        self.tokenizer = tokenizer
        self.run_info = dict(run_info or {})
        set_seed(config.seed)  # dropout masks are reproducible from here on

        self.sampler = RandomBatchSampler(self.train_data, config.batch_size, self.seq_len, seed=config.seed)
        self.optimizer = build_optimizer(self.raw_model, config)

        # Mixed precision: bf16 keeps fp32's range (no scaler needed); fp16 needs loss scaling so that
        # small gradients do not underflow to zero. CPUs train in fp32 by default.
        self.precision = self._resolve_precision(config.precision)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.autocast = (torch.autocast(device_type=self.device.type, dtype=dtype) if dtype is not None
                         else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if config.compile:
            self.model = torch.compile(self.raw_model)

        self.callbacks = list(callbacks)
        if config.sample_interval and tokenizer is not None:
            self.callbacks.append(SampleCallback(config.sample_interval, config.sample_prompt,
                                                 config.sample_tokens, config.sample_temperature))
        self.checkpoints = CheckpointManager(Path(config.checkpoint_dir) / config.experiment_name, config.keep_best)
        self.logger = JsonlLogger(Path(config.log_dir) / config.experiment_name / "train.log")
        self.step = 0
        self.tokens_seen = 0
        self.train_loss: float | None = None
        self.val_loss: float | None = None
        self.best_val_loss: float | None = None
        self.history: list[dict] = []  # one {"step", "loss", "lr"} per optimizer step of this process
        self.last_checkpoint: Path | None = None
        self._pbar = None
        self._started = False  # train() called or resumed: later calls continue the same run

    # -- small helpers ------------------------------------------------------------------------
    def _resolve_precision(self, precision: str) -> str:
        kind = self.device.type
        if precision == "auto":
            if kind == "cuda":
                # bf16 needs Ampere (compute capability 8) or newer; Colab's T4 (7.5) gets fp16.
                return "bf16" if torch.cuda.get_device_capability(self.device)[0] >= 8 else "fp16"
            return "fp32"
        if precision == "fp16" and kind != "cuda":
            raise ValueError(f"training.precision = 'fp16' needs a CUDA GPU (device is {kind}); use 'bf16' or 'fp32'")
        return precision

    def print(self, message: str) -> None:
        """Print without breaking the progress bar."""
        if not self.config.verbose:
            return
        if self._pbar is not None:
            self._pbar.write(message)
        else:
            print(message, flush=True)

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.config.grad_accum_steps * self.seq_len

    def current_lr(self, progress: float | None = None) -> float:
        return lr_at(self.config, self.step, progress)

    def _set_lr(self, progress: float | None) -> float:
        ratio = self.config.min_lr_value / self.config.lr
        mult = lr_multiplier(self.config.schedule, self.step, self.config.max_steps, self.config.warmup_steps,
                             ratio, self.config.cooldown_frac, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * mult
        return self.config.lr * mult

    # -- one step -----------------------------------------------------------------------------
    def _diverged(self, what: str) -> TrainingDiverged:
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was written")
        msg = (f"{what} at step {self.step + 1}; training stopped and the weights were not saved ({where}). "
               f"Likely causes: the learning rate is too high (training.lr = {self.config.lr:g}; try a third "
               "of it or a longer warm-up), fp16 overflow (use precision 'bf16' or 'fp32'), or bad data "
               "(token ids out of range, an empty or binary file)")
        self.logger.log({"step": self.step + 1, "event": "diverged", "message": msg})
        return TrainingDiverged(msg)

    def _forward_loss(self, x, y) -> torch.Tensor:
        try:
            with self.autocast:
                return self.model(x, y)[1]
        except Exception as exc:
            if self.model is self.raw_model or self.step > 0:
                raise
            # torch.compile needs a working compiler toolchain; without one, train eagerly instead.
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            self.print(f"torch.compile failed ({type(exc).__name__}: {first_line}); training continues "
                       "without it (set training.compile=false to skip the attempt)")
            self.model = self.raw_model
            with self.autocast:
                return self.model(x, y)[1]

    def train_step(self, batches=None) -> float:
        """One optimizer step over `grad_accum_steps` micro-batches; returns the mean loss.

        `batches` (a list of (x, y) pairs) replaces the sampler, e.g. to check that accumulating two
        half batches equals one full batch.
        """
        self.raw_model.train()
        if batches is None:
            batches = [self.sampler.next_batch(self.device) for _ in range(self.config.grad_accum_steps)]
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in batches:
            loss = self._forward_loss(x, y)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise self._diverged(f"the loss became {loss_value}")
            # Dividing by the number of micro-batches makes the summed gradients equal those of
            # the mean loss over one big batch.
            self.scaler.scale(loss / len(batches)).backward()
            total += loss_value / len(batches)
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.config.grad_clip)
            if not self.scaler.is_enabled() and not math.isfinite(float(norm)):
                raise self._diverged(f"the gradient norm became {float(norm)}")
        self.scaler.step(self.optimizer)  # with fp16, skips the step if gradients overflowed
        self.scaler.update()
        self.tokens_seen += sum(x.numel() for x, _ in batches)
        return total

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str = "val", batches: int | None = None) -> float:
        """Mean loss over `eval_batches` random batches of a split (the same batches every call).

        A dedicated, freshly seeded sampler picks the batches: the estimate is comparable across
        steps, and evaluating never moves the training sampler or the global random generators.
        """
        data = {"val": self.val_data, "train": self.train_data}.get(split)
        if split not in ("val", "train"):
            raise ValueError(f"split must be 'val' or 'train', got {split!r}")
        if data is None:
            raise ValueError("no validation data was given to the Trainer; pass val_data to evaluate 'val'")
        sampler = RandomBatchSampler(data, self.config.batch_size, self.seq_len, seed=self.config.seed + 1)
        self.raw_model.eval()
        losses = []
        try:
            for _ in range(batches or self.config.eval_batches):
                x, y = sampler.next_batch(self.device)
                with self.autocast:
                    _, loss = self.model(x, y)
                losses.append(loss.item())
        finally:
            self.raw_model.train()
        return sum(losses) / len(losses)

    # -- checkpoints --------------------------------------------------------------------------
    def run_config(self) -> dict:
        return {
            "model_type": model_type_of(self.raw_model),
            "model": self.raw_model.config.to_dict(),
            "training": self.config.to_dict(),
            **self.run_info,
        }

    def checkpoint_dict(self) -> dict:
        """Everything needed to resume exactly (tensors and plain values only)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "kind": "training",
            "model": self.raw_model.state_dict(),
            "config": self.run_config(),
            "tokenizer": self.tokenizer.to_dict() if self.tokenizer is not None else None,
            "step": self.step,
            "epoch": self.tokens_seen / len(self.train_data),
            "tokens_seen": self.tokens_seen,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "best_val_loss": self.best_val_loss,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"schedule": self.config.schedule, "step": self.step},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": capture_rng_state(),
            "data_state": self.sampler.state_dict(),
            "metrics": {"chars_per_token": float(self.run_info.get("chars_per_token", 1.0))},
        }

    def save_checkpoint(self) -> Path:
        """Write `checkpoint_<step>.pt` (and `best.pt` if the validation loss improved)."""
        path = self.checkpoints.save(self.checkpoint_dict(), self.step, self.val_loss)
        self.last_checkpoint = path
        return path

    def resume(self, path: str | os.PathLike | None = None) -> Path:
        """Restore a training checkpoint (default: the experiment's latest) to continue exactly."""
        if path is None:
            path = self.checkpoints.latest()
            if path is None:
                raise FileNotFoundError(
                    f"no checkpoint to resume in {self.checkpoints.directory}; train without --resume first "
                    "or check --experiment-name"
                )
        ckpt = load_checkpoint(path)
        if ckpt.get("kind", "training") != "training" or "optimizer" not in ckpt:
            raise ValueError(f"{path} is a production export (weights only) and cannot resume training; "
                             "resume from a checkpoint_<step>.pt file")
        saved = ckpt["config"]
        mine = self.run_config()
        if saved.get("model_type") != mine["model_type"] or saved.get("model") != mine["model"]:
            diff = {k: (saved.get("model", {}).get(k), v) for k, v in mine["model"].items()
                    if saved.get("model", {}).get(k) != v}
            raise ValueError(
                f"{path} was trained with a different model config (checkpoint vs now: {diff}); use the "
                "same config to resume, or a new --experiment-name to start a fresh run"
            )
        self.raw_model.load_state_dict(ckpt["model"])
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise ValueError(f"the optimizer state in {path} does not fit this optimizer ({exc}); "
                             f"resume with the same training.optimizer ({saved['training'].get('optimizer')})") from exc
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng_state(ckpt["rng"])
        self.sampler.load_state_dict(ckpt["data_state"])
        self.step = int(ckpt["step"])
        self.tokens_seen = int(ckpt.get("tokens_seen", 0))
        self.train_loss, self.val_loss = ckpt.get("train_loss"), ckpt.get("val_loss")
        self.best_val_loss = ckpt.get("best_val_loss")
        self.last_checkpoint = Path(path)
        self.logger.truncate_after(self.step)
        self._started = True
        return Path(path)

    # -- the loop -----------------------------------------------------------------------------
    def train(self, steps: int | None = None) -> dict:
        """Train until `max_steps`, the `max_time` budget, or `steps` more steps, whichever first.

        Evaluates and saves a checkpoint every `eval_interval` steps and once more at the end.
        The first call of a fresh (not resumed) run removes an earlier run's checkpoints and log of
        the same experiment name; call `resume()` first to continue that run instead.
        Returns a summary: steps, losses, elapsed seconds, tokens/s and why it stopped.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        if not self._started and self.step == 0:
            # A fresh run: an earlier run's checkpoints and log under the same experiment name
            # would otherwise mix with this one (best.pt could even come from the old run).
            if cfg.save_checkpoints:
                self.checkpoints.clear()
            self.logger.reset()
        self._started = True
        stop_at = cfg.max_steps if steps is None else min(cfg.max_steps, self.step + steps)
        start_step, start_tokens = self.step, self.tokens_seen
        self.logger.log({"event": "start", "step": self.step, "time": time.time(), "device": str(self.device),
                         "precision": self.precision, "config": self.run_config()})
        for cb in self.callbacks:
            cb.on_train_begin(self)
        self._pbar = tqdm(total=cfg.max_steps, initial=self.step, disable=not cfg.progress,
                          desc=cfg.experiment_name, dynamic_ncols=True)
        t0 = _clock()
        t_last, tokens_last, losses_since_log = t0, self.tokens_seen, []
        reason = "max_steps"
        try:
            while self.step < stop_at:
                elapsed = _clock() - t0
                if cfg.max_time is not None and elapsed >= cfg.max_time:
                    reason = "max_time"
                    break
                progress = elapsed / cfg.max_time if cfg.schedule_by_time else None
                lr = self._set_lr(progress)
                loss = self.train_step()
                self.step += 1
                self.train_loss = loss
                losses_since_log.append(loss)
                self.history.append({"step": self.step, "loss": loss, "lr": lr})
                record = {"step": self.step, "train_loss": loss, "lr": lr}
                self._pbar.update(1)

                evaluate_now = self.step % cfg.eval_interval == 0 or self.step == stop_at
                if self.step % cfg.log_interval == 0 or evaluate_now:
                    now = _clock()
                    rate = (self.tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                    record.update({"train_loss": sum(losses_since_log) / len(losses_since_log),
                                   "tokens_per_s": rate, "elapsed": now - t0})
                    if evaluate_now:
                        self._evaluate_and_save(record)
                    self.logger.log({k: record.get(k) for k in LOG_KEYS})
                    self._pbar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{lr:.1e}",
                                           tok_s=f"{rate:,.0f}")
                    t_last, tokens_last, losses_since_log = _clock(), self.tokens_seen, []
                for cb in self.callbacks:
                    cb.on_step_end(self, record)
            else:
                reason = "max_steps" if self.step >= cfg.max_steps else "steps"
            if reason == "max_time" and self.step > start_step and self.step % cfg.eval_interval:
                # Stopped by the clock between evaluations: evaluate and save where we are.
                now = _clock()
                record = {"step": self.step, "train_loss": self.train_loss, "lr": self.history[-1]["lr"],
                          "tokens_per_s": (self.tokens_seen - tokens_last) / max(now - t_last, 1e-9),
                          "elapsed": now - t0}
                self._evaluate_and_save(record)
                self.logger.log({k: record.get(k) for k in LOG_KEYS})
        finally:
            self._pbar.close()
            self._pbar = None
        elapsed = _clock() - t0
        summary = {
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "best_val_loss": self.best_val_loss,
            "elapsed": elapsed,
            "tokens_per_s": (self.tokens_seen - start_tokens) / max(elapsed, 1e-9),
            "stopped_by": reason,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
        }
        self.logger.log({"event": "end", "step": self.step, **{k: v for k, v in summary.items() if k != "steps"}})
        for cb in self.callbacks:
            cb.on_train_end(self, summary)
        return summary

    def _evaluate_and_save(self, record: dict) -> None:
        if self.val_data is not None:
            self.val_loss = self.evaluate("val")
            record["val_loss"] = self.val_loss
            if self.best_val_loss is None or self.val_loss < self.best_val_loss:
                self.best_val_loss = self.val_loss
            self.print(f"step {self.step:>6}: train loss {record['train_loss']:.4f}, val loss {self.val_loss:.4f}, "
                       f"lr {record['lr']:.2e}, {record.get('tokens_per_s', 0):,.0f} tokens/s")
        else:
            self.print(f"step {self.step:>6}: train loss {record['train_loss']:.4f}, lr {record['lr']:.2e}")
        if self.config.save_checkpoints:
            self.save_checkpoint()
        for cb in self.callbacks:
            cb.on_evaluate(self, record)
