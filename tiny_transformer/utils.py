"""Small helpers every module shares: fast mode, device selection, seeding, repository paths."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

FAST_ENV = "TINY_TRANSFORMER_FAST"


def fast_mode() -> bool:
    """True when TINY_TRANSFORMER_FAST is set to 1/true/yes (CI and `pytest` set it).

    Notebooks read this once at the top and shrink every training run, so the whole course can be
    executed in CI in minutes. Learners get full mode by default.
    """
    return os.environ.get(FAST_ENV, "0").strip().lower() in {"1", "true", "yes", "on"}


def pick(full, fast):
    """Return `fast` in fast mode and `full` otherwise: `steps = pick(2000, 50)`."""
    return fast if fast_mode() else full


def select_device(preference: str = "auto") -> torch.device:
    """Pick a device: "auto" tries CUDA, then Apple's MPS, then the CPU.

    An explicit "cuda"/"mps" that is not available raises a clear error instead of failing later
    inside a kernel launch.
    """
    preference = (preference or "auto").lower()
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is visible; use --device cpu or auto")
    if preference == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise RuntimeError("device 'mps' was requested but MPS is not available; use --device cpu or auto")
    if preference not in {"cpu", "mps"} and not preference.startswith("cuda"):
        raise ValueError(f"unknown device {preference!r}: choose auto, cpu, cuda, cuda:N or mps")
    return torch.device(preference)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy (if installed) and PyTorch (CPU and all GPUs) in one call."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # numpy is optional for the core library
        pass
    torch.manual_seed(seed)


def repo_root() -> Path:
    """The repository root (the folder holding `tiny_transformer/`, `data/`, `native/`)."""
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Where datasets live: $TINY_TRANSFORMER_DATA or `<repo>/data`."""
    env = os.environ.get("TINY_TRANSFORMER_DATA")
    return Path(env) if env else repo_root() / "data"


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable: on POSIX the directory entry itself must be flushed.

    Used after `os.replace` by every atomic write (datasets, checkpoints); a no-op where directories
    cannot be opened.
    """
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
