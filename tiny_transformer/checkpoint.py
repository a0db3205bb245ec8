"""Checkpoints: save training state atomically, resume exactly, and export a small production file.

A *training* checkpoint holds everything needed to continue a run as if it had never stopped:
the model weights, the optimizer and scheduler state, every random number generator (Python,
NumPy, PyTorch CPU and CUDA), the data sampler's position, the step and the losses. A *production*
checkpoint keeps only what inference needs: weights, config, tokenizer and a few metrics.

Both are plain dictionaries of tensors and primitive values (no pickled classes), so they load with
`torch.load(..., weights_only=True)`, which cannot run code hidden in a malicious file.

    checkpoint_<step>.pt   one file per saved step (the best N by validation loss + the latest are kept)
    best.pt                a copy of the checkpoint with the lowest validation loss so far
"""

from __future__ import annotations

import math
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tiny_transformer.utils import fsync_directory

FORMAT = "tiny-transformer-checkpoint"
VERSION = 1
# Keys that only a training checkpoint needs; a production export drops them.
TRAINING_ONLY_KEYS = ("optimizer", "scheduler", "scaler", "rng", "data_state")

_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")


# --------------------------------------------------------------------------------------------
# Saving and loading single files
# --------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    """Call `write(file_object)` on a temporary file next to `path`, then rename it over `path`.

    The temporary file lives in the same directory so that `os.replace` is a single atomic rename
    on the same file system: a reader (or a crash) sees either the old complete file or the new
    complete file, never half of one. If anything fails, the temporary file is removed and the
    previous `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(path.parent)


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> Path:
    """Write a checkpoint dictionary to `path` atomically (temp file + fsync + rename)."""
    path = Path(path)
    _atomic_write(path, lambda f: torch.save(checkpoint, f))
    return path


def _copy_atomic(src: Path, dst: Path) -> None:
    def write(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, length=1 << 20)

    _atomic_write(dst, write)


def load_checkpoint(path: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict:
    """Load a checkpoint file and check that it really is one of ours.

    Uses `weights_only=True`, so only tensors and plain containers are accepted. A missing file, a
    truncated or corrupt file, or a file from another program each raises an error that says what
    is wrong and what to do instead.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory, not a checkpoint file; pass a file such as "
            f"{path / 'best.pt'} or use `python -m tiny_transformer evaluate --experiment-name NAME`"
        )
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; train a model first "
            "(python -m tiny_transformer train --config tiny) or check the path"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes); the save was interrupted, use another checkpoint")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"checkpoint {path} is corrupt, truncated or not a checkpoint at all (PyTorch checkpoints are "
            "zip archives and this file is not one); use an earlier checkpoint from the same folder or train again"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} contains pickled Python objects, which could run code while loading, so it is "
            "refused (weights_only=True). Only files written by `python -m tiny_transformer train` "
            "or `export` are accepted"
        ) from exc
    except (zipfile.BadZipFile, EOFError, RuntimeError, OSError) as exc:
        raise ValueError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            "use an earlier checkpoint from the same folder or train again"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = ""
        if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            hint = " It looks like a bare state_dict (weights only, no config or tokenizer)."
        raise ValueError(
            f"{path} is not a tiny-transformer checkpoint (missing format marker {FORMAT!r}).{hint} "
            "Use a checkpoint written by `python -m tiny_transformer train`"
        )
    version = ckpt.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(
            f"{path} has checkpoint version {version!r}, but this library reads versions up to "
            f"{VERSION}; upgrade tiny_transformer (git pull) to load it"
        )
    for key in ("model", "config"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} has no {key!r} entry; it is incomplete, use another one")
    return ckpt


def checkpoint_summary(path: str | os.PathLike) -> dict:
    """Cheaply read a checkpoint's step and losses (memory-mapped: weights are not read into RAM)."""
    ckpt = load_checkpoint(path, mmap=True)
    metrics = ckpt.get("metrics") or {}
    return {
        "path": Path(path),
        "step": ckpt.get("step"),
        "train_loss": ckpt.get("train_loss"),
        "val_loss": ckpt.get("val_loss"),
        "kind": ckpt.get("kind", "training"),
        "chars_per_token": metrics.get("chars_per_token", 1.0),
    }


# --------------------------------------------------------------------------------------------
# Random number generator state as tensors (so weights_only=True can load it)
# --------------------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """Snapshot the Python, NumPy, PyTorch CPU and CUDA generators as tensors and primitives."""
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back generator states saved by `capture_rng_state`."""
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        try:
            import numpy as np

            np_state = state["numpy"]
            np.random.set_state(
                (
                    np_state["name"],
                    np_state["keys"].numpy().astype(np.uint32),
                    np_state["pos"],
                    np_state["has_gauss"],
                    np_state["cached_gaussian"],
                )
            )
        except ImportError:
            pass
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# --------------------------------------------------------------------------------------------
# Checkpoint directory management
# --------------------------------------------------------------------------------------------
@dataclass
class CheckpointInfo:
    """One checkpoint file in a run's folder."""

    step: int
    path: Path
    val_loss: float | None


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


class CheckpointManager:
    """Keeps `checkpoints/<experiment>/` tidy: numbered checkpoints, `best.pt`, retention.

    After every save it keeps the `keep_best` checkpoints with the lowest validation loss plus the
    most recent one (which resume needs even when it is not among the best), and deletes the rest.
    `best.pt` is an atomic copy of the best checkpoint, so `--checkpoint .../best.pt` always works.
    """

    def __init__(self, directory: str | os.PathLike, keep_best: int = 2):
        if not isinstance(keep_best, int) or keep_best < 1:
            raise ValueError(f"keep_best must be an integer >= 1 (got {keep_best!r})")
        self.directory = Path(directory)
        self.keep_best = keep_best
        self._val_losses: dict[int, float | None] | None = None  # step -> val loss, read lazily
        self._best_loss: float | None = None

    # -- reading ------------------------------------------------------------------------------
    def _scan(self) -> dict[int, float | None]:
        if self._val_losses is None:
            self._val_losses = {}
            for p in self._files():
                step = int(_CHECKPOINT_NAME.match(p.name).group(1))
                try:
                    self._val_losses[step] = checkpoint_summary(p)["val_loss"]
                except (ValueError, FileNotFoundError):
                    continue  # a foreign or damaged file is never chosen for resume or best
            best = self.directory / "best.pt"
            if best.exists():
                try:
                    self._best_loss = checkpoint_summary(best)["val_loss"]
                except ValueError:
                    self._best_loss = None
        return self._val_losses

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return [p for p in self.directory.iterdir() if _CHECKPOINT_NAME.match(p.name)]

    def path_for(self, step: int) -> Path:
        return self.directory / f"checkpoint_{step}.pt"

    def checkpoints(self) -> list[CheckpointInfo]:
        """All readable numbered checkpoints, oldest first."""
        losses = self._scan()
        return [
            CheckpointInfo(step, self.path_for(step), losses[step])
            for step in sorted(losses)
            if self.path_for(step).exists()
        ]

    def latest(self) -> Path | None:
        """The checkpoint with the highest step, or None if the folder has none."""
        infos = self.checkpoints()
        return infos[-1].path if infos else None

    def best(self) -> Path | None:
        """`best.pt` if it exists, else None."""
        path = self.directory / "best.pt"
        return path if path.exists() else None

    # -- writing ------------------------------------------------------------------------------
    def save(self, checkpoint: dict, step: int, val_loss: float | None = None) -> Path:
        """Save `checkpoint` as `checkpoint_<step>.pt`, update `best.pt`, then apply retention."""
        losses = self._scan()
        path = save_checkpoint(checkpoint, self.path_for(step))
        losses[step] = val_loss if _finite(val_loss) else None
        if _finite(val_loss) and (self._best_loss is None or val_loss < self._best_loss):
            _copy_atomic(path, self.directory / "best.pt")
            self._best_loss = float(val_loss)
        self.prune()
        return path

    def clear(self) -> None:
        """Delete every checkpoint of this folder (numbered files and best.pt): a fresh run starts."""
        for path in self._files() + [self.directory / "best.pt"]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self._val_losses, self._best_loss = {}, None

    def prune(self) -> list[Path]:
        """Delete checkpoints that are neither among the `keep_best` best nor the latest."""
        losses = self._scan()
        if not losses:
            return []
        latest = max(losses)
        ranked = sorted((s for s in losses if losses[s] is not None), key=lambda s: (losses[s], -s))
        keep = set(ranked[: self.keep_best]) | {latest}
        removed = []
        for step in sorted(losses):
            if step not in keep:
                path = self.path_for(step)
                try:
                    path.unlink()
                    removed.append(path)
                except FileNotFoundError:
                    pass
                del losses[step]
        return removed


# --------------------------------------------------------------------------------------------
# Rebuilding a model + tokenizer, and the production export
# --------------------------------------------------------------------------------------------
def build_model_from_config(config: dict):
    """Build an untrained model from a checkpoint's `config` entry ({"model_type", "model"})."""
    from tiny_transformer.config import build_model

    try:
        return build_model({"model_type": config.get("model_type", "gpt"), "model": dict(config.get("model") or {})})
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"cannot rebuild the model from the checkpoint's config ({exc}); the file was written by "
            "a different version of tiny_transformer, upgrade it (git pull) or use another checkpoint"
        ) from exc


def model_type_of(model) -> str:
    """'llama' for LlamaLM, 'gpt' for TinyTransformerLM (the two model families)."""
    from tiny_transformer.model import model_type_of as _model_type_of

    return _model_type_of(getattr(model, "_orig_mod", model))


def tokenizer_from_checkpoint(ckpt: dict):
    """The tokenizer stored in a checkpoint, or None when the checkpoint has none."""
    data = ckpt.get("tokenizer")
    if not data:
        return None
    from tiny_transformer.tokenizers import tokenizer_from_dict

    return tokenizer_from_dict(data)


def load_model_from_checkpoint(path: str | os.PathLike, device="cpu"):
    """Load a training or production checkpoint: returns `(model, tokenizer, meta)`.

    The model is in eval mode on `device`. `meta` holds step, losses, perplexity and the config.
    """
    ckpt = load_checkpoint(path)
    model = build_model_from_config(ckpt["config"])
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as exc:
        raise ValueError(
            f"weights in {path} do not match the model described by its own config ({exc}); "
            "the file was edited or is damaged, use another checkpoint"
        ) from exc
    model.to(device).eval()
    tokenizer = tokenizer_from_checkpoint(ckpt)
    val_loss = ckpt.get("val_loss")
    meta = {
        "path": str(path),
        "kind": ckpt.get("kind", "training"),
        "step": ckpt.get("step"),
        "epoch": ckpt.get("epoch"),
        "train_loss": ckpt.get("train_loss"),
        "val_loss": val_loss,
        "perplexity": math.exp(val_loss) if _finite(val_loss) else None,
        "config": ckpt["config"],
        "metrics": ckpt.get("metrics") or {},
    }
    return model, tokenizer, meta


def export_production(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None) -> dict:
    """Write an inference-only copy of a training checkpoint: weights + config + tokenizer + metrics.

    Dropping the optimizer (AdamW keeps two extra tensors per weight), RNG and data state typically
    makes the file about three times smaller; `dtype="float16"`/`"bfloat16"` halves it again.
    Returns the two sizes in bytes and the reduction factor.
    """
    dtypes = {None: None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of float32, float16, bfloat16 (got {dtype!r})")
    ckpt = load_checkpoint(src)
    weights = ckpt["model"]
    if dtypes[dtype] is not None:
        weights = {k: v.to(dtypes[dtype]) if v.is_floating_point() else v for k, v in weights.items()}
    val_loss = ckpt.get("val_loss")
    metrics = dict(ckpt.get("metrics") or {})
    metrics.update(
        {
            "val_loss": val_loss,
            "perplexity": math.exp(val_loss) if _finite(val_loss) else None,
            "steps": ckpt.get("step"),
        }
    )
    production = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "production",
        "model": {k.removeprefix("_orig_mod."): v.contiguous() for k, v in weights.items()},
        "config": {k: v for k, v in ckpt["config"].items()},
        "tokenizer": ckpt.get("tokenizer"),
        "step": ckpt.get("step"),
        "epoch": ckpt.get("epoch"),
        "train_loss": ckpt.get("train_loss"),
        "val_loss": val_loss,
        "metrics": metrics,
    }
    save_checkpoint(production, dst)
    src_size, dst_size = Path(src).stat().st_size, Path(dst).stat().st_size
    return {"source_bytes": src_size, "production_bytes": dst_size, "reduction": src_size / dst_size}
