"""Production: package a trained model for inference, and measure what each step costs or gains.

Training leaves a PyTorch checkpoint. Serving a model usually wants something else:

* **TorchScript** (`export_torchscript`): the forward pass recorded as a graph that runs without our
  Python code (in C++ through libtorch, or with `torch.jit.load` alone). We *trace* the model: run
  it once on an example and record the tensor operations. Python `if`s are frozen at the value they
  took on the example, so we check the traced graph against the original on a *different* length.
* **ONNX** (`export_onnx`): a framework-neutral graph file that ONNX Runtime (and many other
  engines) can execute. Needs the optional packages `onnx` and `onnxruntime`.
* **int8 dynamic quantization** (`quantize_int8`): every `nn.Linear` stores its weights as 8-bit
  integers with one scale per tensor (4x smaller than float32), and activations are quantized on
  the fly. On a CPU the int8 matrix products are often faster; the price is a small loss of
  accuracy, which `compare_variants` measures as a change in validation perplexity.

Every export here is *checked*: the exported model is run on the same input as the original and
the largest absolute difference of the logits is reported (and must be below a tolerance).

    >>> from tiny_transformer.production import export_torchscript, quantize_int8, compare_variants
    >>> report = export_torchscript(model, "model.ts")     # {"path", "bytes", "max_abs_diff", ...}
    >>> rows = compare_variants({"fp32": model, "int8": quantize_int8(model)}, val_tokens)
    >>> print(format_table(rows))

TorchScript and `torch.ao.quantization` are in maintenance mode in recent PyTorch releases (their
successors are `torch.export` and the `torchao` package); they still work, and they are what
deployment tools widely accept today, so the course uses them and silences their deprecation notes.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ONNX_INSTALL_HINT = "pip install onnx onnxruntime"


class LogitsOnly(nn.Module):
    """Wraps a language model so that `forward(idx)` returns only the logits tensor.

    Tracing and ONNX export need a forward whose inputs and outputs are plain tensors; our models
    return `(logits, loss)` with `loss=None` and take optional keyword arguments (cache, mask).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(idx)
        return logits


def _check_model(model) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "max_seq_len"):
        raise ValueError(
            f"expected a tiny_transformer language model (TinyTransformerLM or LlamaLM), got "
            f"{type(model).__name__}; load one with tiny_transformer.checkpoint.load_model_from_checkpoint"
        )


def example_input(model, batch_size: int = 1, seq_len: int | None = None, seed: int = 0) -> torch.Tensor:
    """A seeded (batch_size, seq_len) tensor of random token ids on the model's device."""
    _check_model(model)
    seq_len = seq_len or min(32, model.max_seq_len)
    if not 1 <= seq_len <= model.max_seq_len:
        raise ValueError(f"seq_len must be between 1 and the model's context {model.max_seq_len}, got {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    return torch.randint(0, model.vocab_size, (batch_size, seq_len), generator=gen).to(device)


@torch.inference_mode()
def max_abs_diff(reference, candidate, idx: torch.Tensor) -> float:
    """Largest |reference(idx) - candidate(idx)| over all logits. Both return logits (or (logits, loss))."""
    a, b = reference(idx), candidate(idx)
    a = a[0] if isinstance(a, tuple) else a
    b = b[0] if isinstance(b, tuple) else b
    if a.shape != b.shape:
        raise RuntimeError(f"exported model returned shape {tuple(b.shape)}, the original {tuple(a.shape)}")
    return float((a.float() - b.float()).abs().max())


# --------------------------------------------------------------------------------------------
# TorchScript
# --------------------------------------------------------------------------------------------
def trace_torchscript(model, example_len: int | None = None) -> torch.jit.ScriptModule:
    """Trace `model` (on the CPU, in eval mode) into a TorchScript module mapping ids -> logits."""
    _check_model(model)
    model = copy.deepcopy(model).cpu().eval()
    idx = example_input(model, 1, example_len)
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about every Python-level check on tensor values (e.g. the embedding's
        # range check); they are evaluated once and dropped from the graph, which is what we want.
        warnings.simplefilter("ignore")
        return torch.jit.trace(LogitsOnly(model), idx, check_trace=False)


def export_torchscript(model, path: str | os.PathLike, example_len: int | None = None,
                       check_len: int | None = None, atol: float = 1e-4) -> dict:
    """Trace, save to `path`, load back, and check the loaded graph against `model`.

    The check runs on a batch of 2 sequences of `check_len` tokens (default: a length different
    from the traced example's), so a trace that froze a shape would be caught. Raises RuntimeError
    if the logits differ by more than `atol`. Returns {"path", "bytes", "max_abs_diff", "check_shape"}.
    """
    _check_model(model)
    example_len = example_len or min(16, model.max_seq_len)
    check_len = check_len or min(example_len + 7, model.max_seq_len)
    traced = trace_torchscript(model, example_len)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    reference = copy.deepcopy(model).cpu().eval()
    idx = example_input(reference, 2, check_len, seed=1)
    diff = max_abs_diff(reference, loaded, idx)
    if not diff <= atol:
        raise RuntimeError(f"TorchScript output differs from the model by {diff:.3g} (> atol={atol}); "
                           "the trace froze something input-dependent; do not deploy this file")
    return {"path": str(path), "bytes": path.stat().st_size, "max_abs_diff": diff, "check_shape": tuple(idx.shape)}


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load a file written by `export_torchscript` (ids -> logits), on the CPU."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"TorchScript file {path} not found; write it with export_torchscript(model, path)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise ValueError(f"{path} is not a TorchScript file ({str(exc).splitlines()[0]}); "
                             "write one with export_torchscript(model, path)") from exc


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------
def onnx_status() -> tuple[bool, str]:
    """(available, message): whether `onnx` and `onnxruntime` are importable, and what to do if not."""
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        return False, (f"ONNX export skipped: the package(s) {', '.join(missing)} are not installed; "
                       f"install them with `{ONNX_INSTALL_HINT}` and run this again")
    return True, "onnx and onnxruntime are installed"


def export_onnx(model, path: str | os.PathLike, example_len: int | None = None, check_len: int | None = None,
                atol: float = 1e-4, opset: int = 17) -> dict:
    """Export `model` to an ONNX file with dynamic batch and sequence axes, then run the file in
    ONNX Runtime and compare its logits with PyTorch's.

    Raises RuntimeError naming the install command when onnx/onnxruntime are missing, and when the
    outputs differ by more than `atol`. Returns {"path", "bytes", "max_abs_diff", "check_shape"}.
    """
    _check_model(model)
    available, message = onnx_status()
    if not available:
        raise RuntimeError(message)
    import onnxruntime as ort

    example_len = example_len or min(16, model.max_seq_len)
    check_len = check_len or min(example_len + 7, model.max_seq_len)
    reference = copy.deepcopy(model).cpu().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    idx = example_input(reference, 1, example_len)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # dynamo=False: the TorchScript-based exporter, which needs only `onnx` (the newer exporter
        # also needs `onnxscript`). Axes 0 and 1 of the ids stay symbolic: any batch, any length.
        torch.onnx.export(
            LogitsOnly(reference), (idx,), str(path), input_names=["idx"], output_names=["logits"],
            dynamic_axes={"idx": {0: "batch", 1: "time"}, "logits": {0: "batch", 1: "time"}},
            opset_version=opset, dynamo=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = example_input(reference, 2, check_len, seed=1)
    ort_logits = torch.from_numpy(session.run(["logits"], {"idx": check.numpy()})[0])
    diff = max_abs_diff(LogitsOnly(reference), lambda _: ort_logits, check)
    if not diff <= atol:
        raise RuntimeError(f"ONNX Runtime output differs from PyTorch by {diff:.3g} (> atol={atol})")
    return {"path": str(path), "bytes": path.stat().st_size, "max_abs_diff": diff, "check_shape": tuple(check.shape)}


# --------------------------------------------------------------------------------------------
# int8 dynamic quantization
# --------------------------------------------------------------------------------------------
def quantize_int8(model) -> nn.Module:
    """A CPU copy of `model` whose `nn.Linear` layers compute with int8 weights (dynamic quantization).

    Embeddings and norms stay in float32: the embedding is a table lookup (no matrix product to
    speed up) and norms are tiny. The original model is not modified. With tied weights, the output
    head gets its own int8 copy of the embedding matrix.
    """
    _check_model(model)
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm", "qnnpack")):
        raise RuntimeError(f"this PyTorch build has no int8 CPU engine (supported: {engines}); "
                           "use an official PyTorch build from pytorch.org")
    float_model = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # maintenance-mode notice, see the module docstring
        try:
            from torch.ao.quantization import quantize_dynamic
        except ImportError as exc:
            raise RuntimeError("torch.ao.quantization is not available in this PyTorch version; "
                               "install torch<=2.13 or use the torchao package's int8 quantization") from exc
        return quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes that `torch.save(model.state_dict())` writes (what a weights file costs on disk)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
@torch.inference_mode()
def time_forward(model, idx: torch.Tensor, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of one forward pass of `model(idx)` (after `warmup` untimed calls).

    The median of several runs is robust to the odd slow run (another process taking the CPU).
    Timings depend on the machine and its load: compare variants measured side by side only.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        model(idx)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(idx)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare_variants(variants: dict, val_tokens=None, *, seq_len: int | None = None, batch_size: int = 8,
                     max_windows: int | None = 32, timing_batch: int = 8, timing_len: int | None = None,
                     repeats: int = 10, chars_per_token: float = 1.0) -> list[dict]:
    """Measure size, CPU speed and (if `val_tokens` is given) validation loss of model variants.

    variants: {"name": model}; the first entry is the baseline for the speed-up and the change in
    perplexity. Sizes are `state_dict_bytes` (a TorchScript module's size is measured the same way).
    Each row: name, bytes, ms (median per forward of a (timing_batch, timing_len) batch), speedup,
    and with validation data: loss, perplexity, bits_per_char, ppl_change (relative, vs baseline).
    """
    if not variants:
        raise ValueError("variants is empty: pass a dict such as {'fp32': model, 'int8': quantize_int8(model)}")
    from tiny_transformer.training import evaluate_loss

    first = next(iter(variants.values()))
    base = getattr(first, "model", first)  # a LogitsOnly wrapper exposes the model inside
    max_len = getattr(base, "max_seq_len", None)
    vocab = getattr(base, "vocab_size", None)
    if max_len is None or vocab is None:
        raise ValueError("the first variant must be a tiny_transformer model (it sets the context and vocabulary)")
    seq_len = seq_len or max_len
    timing_len = timing_len or max_len
    gen = torch.Generator().manual_seed(0)
    timing_idx = torch.randint(0, vocab, (timing_batch, timing_len), generator=gen)
    rows = []
    for name, model in variants.items():
        row = {"name": name, "bytes": state_dict_bytes(model), "ms": 1000 * time_forward(model, timing_idx, repeats)}
        if val_tokens is not None:
            stats = evaluate_loss(_TupleOutput(model), val_tokens, seq_len, batch_size=batch_size,
                                  device="cpu", max_windows=max_windows)
            row["loss"] = stats["loss"]
            row["perplexity"] = math.exp(stats["loss"])
            row["bits_per_char"] = stats["loss"] / math.log(2) / chars_per_token
        rows.append(row)
    for row in rows:
        row["speedup"] = rows[0]["ms"] / row["ms"]
        if "perplexity" in row:
            row["ppl_change"] = row["perplexity"] / rows[0]["perplexity"] - 1.0
    return rows


class _TupleOutput(nn.Module):
    """Adapts a logits-only module (TorchScript, LogitsOnly) to the `(logits, loss)` convention."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, idx):
        out = self.inner(idx)
        return out if isinstance(out, tuple) else (out, None)


def format_table(rows: list[dict]) -> str:
    """Rows from `compare_variants` as an aligned text table."""
    has_loss = any("loss" in r for r in rows)
    header = f"{'variant':<14}{'size (MB)':>10}{'ms/forward':>12}{'speed-up':>10}"
    if has_loss:
        header += f"{'val loss':>10}{'perplexity':>12}{'bits/char':>11}{'ppl change':>12}"
    lines = [header, "-" * len(header)]
    for r in rows:
        line = f"{r['name']:<14}{r['bytes'] / 1e6:>10.2f}{r['ms']:>12.2f}{r['speedup']:>9.2f}x"
        if has_loss and "loss" in r:
            line += (f"{r['loss']:>10.4f}{r['perplexity']:>12.3f}{r['bits_per_char']:>11.3f}"
                     f"{100 * r['ppl_change']:>+11.2f}%")
        lines.append(line)
    return "\n".join(lines)
