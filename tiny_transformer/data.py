"""Data: from a text file to batches of (input, target) token windows.

* `load_text` reads a corpus and, if it is missing, says how to download it.
* `train_val_split` keeps the *end* of the text for validation (a temporal split): random windows
  from the same passages would leak near-duplicates of the training text into validation.
* `TextDataset` is the teaching view: every window of `seq_len` tokens with its target shifted by
  one, taken every `stride` tokens (stride = seq_len: no overlap).
* `RandomBatchSampler` is the training view: random windows gathered with one indexing operation
  (no Python loop per token), with a seeded generator whose state is saved in checkpoints so that a
  resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

DOWNLOAD_HINT = (
    "download it with `bash data/download_shakespeare.sh` (or `python -m tiny_transformer download "
    "shakespeare`; offline: add `--source /path/to/tiny_shakespeare.txt`)"
)


def load_text(path: str | Path) -> str:
    """Read a UTF-8 text corpus; a missing file raises FileNotFoundError with the download command."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}; {DOWNLOAD_HINT}")
    text = path.read_text(encoding="utf-8")
    if not text:
        raise ValueError(f"dataset {path} is empty; {DOWNLOAD_HINT}")
    return text


def train_val_split(data, val_fraction: float = 0.1):
    """Split a sequence (text, list or tensor) into its first (1 - val_fraction) and last part."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n = int(len(data) * (1.0 - val_fraction))
    return data[:n], data[n:]


def _as_tensor(tokens) -> torch.Tensor:
    t = tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(tokens, dtype=torch.long)
    if t.dim() != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {tuple(t.shape)}")
    return t.long()


class TextDataset(Dataset):
    """Sliding windows over a token sequence.

    Item i is (x, y) with x = tokens[i·stride : i·stride + seq_len] and y the same window shifted by
    one. There are floor((N - seq_len - 1) / stride) + 1 windows (0 if the text is too short).
    """

    def __init__(self, tokens, seq_len: int, stride: int | None = None):
        self.tokens = _as_tensor(tokens)
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len
        self.stride = seq_len if stride is None else stride
        if self.stride <= 0:
            raise ValueError(f"stride must be positive, got {self.stride}")
        usable = len(self.tokens) - seq_len - 1
        self.n_windows = usable // self.stride + 1 if usable >= 0 else 0

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i < 0:
            i += self.n_windows
        if not 0 <= i < self.n_windows:
            raise IndexError(f"window {i} out of range for {self.n_windows} windows")
        start = i * self.stride
        chunk = self.tokens[start : start + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


class RandomBatchSampler:
    """Random (x, y) batches from a token sequence, vectorised and exactly resumable.

    `next_batch()` draws `batch_size` start offsets from a seeded `torch.Generator` and gathers all
    windows with one fancy-indexing call. `state_dict()` captures the generator state and the number
    of batches drawn; `load_state_dict()` restores both.
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int = 0):
        self.tokens = _as_tensor(tokens)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if len(self.tokens) < seq_len + 1:
            raise ValueError(
                f"text of {len(self.tokens)} tokens is too short for windows of seq_len={seq_len} "
                "(+1 for the target); use a longer text or a smaller seq_len"
            )
        self.batch_size, self.seq_len = batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        self._offsets = torch.arange(seq_len + 1)

    def next_batch(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.tokens) - self.seq_len
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        windows = self.tokens[starts[:, None] + self._offsets]  # (B, seq_len + 1), one gather
        self.batches_drawn += 1
        x, y = windows[:, :-1], windows[:, 1:]
        if device is not None and torch.device(device).type != "cpu":
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x, y

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])
