"""Plots for the course: loss curves from a training log, learning-rate schedules, a live loss plot.

Every function is independent and takes an optional matplotlib `ax`, so notebooks can combine them
in one figure. matplotlib is imported only when a plot is drawn (the library itself does not need it).

    >>> from tiny_transformer.viz import plot_training_log, plot_lr_schedule
    >>> plot_training_log("logs/quick_test/train.log")          # doctest: +SKIP
    >>> plot_lr_schedule(TrainerConfig(max_steps=2000))           # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tiny_transformer.training import Callback, TrainerConfig, lr_at, read_log


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install matplotlib") from exc
    return plt


def _new_ax(ax, figsize=(7, 4)):
    if ax is not None:
        return ax
    plt = _pyplot()
    _, ax = plt.subplots(figsize=figsize)
    return ax


def loss_curves(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{"train": (steps, losses), "val": (steps, losses)} from training-log records."""
    curves = {"train": ([], []), "val": ([], [])}
    for r in records:
        step = r.get("step")
        if not isinstance(step, int) or r.get("event"):
            continue
        for key, name in (("train_loss", "train"), ("val_loss", "val")):
            value = r.get(key)
            if isinstance(value, (int, float)):
                curves[name][0].append(step)
                curves[name][1].append(float(value))
    return curves


def plot_training_log(log, ax=None, title: str | None = None, logy: bool = False):
    """Train and validation loss against the step, from a JSONL log path, a run folder or records.

    Accepts `logs/<experiment>/train.log`, `logs/<experiment>` or a list of dicts (`read_log`).
    Returns the matplotlib Axes.
    """
    records = log if isinstance(log, list) else read_log(log)
    curves = loss_curves(records)
    if not curves["train"][0] and not curves["val"][0]:
        raise ValueError("the log has no loss records yet; train for at least log_interval steps")
    ax = _new_ax(ax)
    if curves["train"][0]:
        ax.plot(*curves["train"], label="train", color="tab:blue", alpha=0.8)
    if curves["val"][0]:
        ax.plot(*curves["val"], "o-", label="validation", color="tab:orange", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats)")
    if logy:
        ax.set_yscale("log")
    if title is None and not isinstance(log, list):
        path = Path(log)
        title = f"training run: {path.name if path.is_dir() else path.parent.name}"
    ax.set_title(title or "training run")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_lr_schedule(configs, ax=None, title: str = "learning-rate schedule"):
    """Draw the learning rate of each step for one `TrainerConfig`, or for a {label: config} dict."""
    if isinstance(configs, TrainerConfig):
        configs = {f"{configs.schedule} (warm-up {configs.warmup_steps})": configs}
    if not isinstance(configs, dict) or not configs:
        raise ValueError("plot_lr_schedule expects a TrainerConfig or a dict {label: TrainerConfig}")
    ax = _new_ax(ax)
    for label, cfg in configs.items():
        cfg.validate()
        steps = list(range(cfg.max_steps))
        ax.plot(steps, [lr_at(cfg, s) for s in steps], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def sparkline(values: list[float], width: int = 40) -> str:
    """A one-line text chart of a series (for terminals): '█▇▆▅▄▃▂▁'."""
    if not values:
        return ""
    bars = "▁▂▃▄▅▆▇█"
    step = max(1, len(values) // width)
    points = [min(values[i : i + step]) for i in range(0, len(values), step)][-width:]
    lo, hi = min(points), max(points)
    span = (hi - lo) or 1.0
    return "".join(bars[int((v - lo) / span * (len(bars) - 1))] for v in points)


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class LiveLossPlot(Callback):
    """A loss plot that updates while the Trainer runs.

    In a notebook it redraws one figure in place every `every` steps. In a terminal or a headless
    run it prints a one-line text chart instead (`▇▅▄▃▂▁ loss 1.92 (val 2.01)`), and, if `path` is
    given, also saves the figure there as a PNG.

        >>> trainer = Trainer(model, cfg, train, val, callbacks=[LiveLossPlot(every=50)])  # doctest: +SKIP
    """

    def __init__(self, every: int = 50, path: str | os.PathLike | None = None, figsize=(7, 4)):
        if every <= 0:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.every, self.path, self.figsize = every, Path(path) if path else None, figsize
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.val_steps: list[int] = []
        self.val_losses: list[float] = []
        self._handle = None
        self._fig = None
        self.notebook = _in_notebook()
        self.lines_printed = 0

    def on_step_end(self, trainer, record):
        self.steps.append(record["step"])
        self.losses.append(record["train_loss"])
        if record.get("val_loss") is not None:
            self.val_steps.append(record["step"])
            self.val_losses.append(record["val_loss"])
        if record["step"] % self.every == 0:
            self.update(trainer)

    def on_train_end(self, trainer, summary):
        if self.steps:
            self.update(trainer)
        if self._fig is not None:
            _pyplot().close(self._fig)

    def _draw(self):
        plt = _pyplot()
        if self._fig is None:
            self._fig, self._ax = plt.subplots(figsize=self.figsize)
        ax = self._ax
        ax.clear()
        ax.plot(self.steps, self.losses, label="train", color="tab:blue", alpha=0.8)
        if self.val_steps:
            ax.plot(self.val_steps, self.val_losses, "o-", label="validation", color="tab:orange", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        return self._fig

    def update(self, trainer=None) -> None:
        """Redraw (notebook), save (path) and/or print the text chart (terminal)."""
        if self.notebook or self.path is not None:
            fig = self._draw()
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(self.path, dpi=80)
            if self.notebook:
                from IPython.display import display

                if self._handle is None:
                    self._handle = display(fig, display_id=True)
                else:
                    self._handle.update(fig)
                return
        val = f" (val {self.val_losses[-1]:.3f})" if self.val_losses else ""
        line = f"{sparkline(self.losses)} step {self.steps[-1]}: loss {self.losses[-1]:.3f}{val}"
        self.lines_printed += 1
        if trainer is not None:
            trainer.print(line)
        else:
            print(line, flush=True)


# --------------------------------------------------------------------------------------------
# Capstone plots: a corpus's characters, several runs side by side, a sweep of one setting
# --------------------------------------------------------------------------------------------
def plot_char_frequencies(text: str, ax=None, top: int | None = None, title: str = "character frequencies"):
    """Bar chart of how often each character occurs, most frequent first (log scale).

    Newline and space are labelled "\\n" and "␣" so they are visible. Returns the Axes."""
    from collections import Counter

    if not text:
        raise ValueError("plot_char_frequencies needs a non-empty text")
    counts = Counter(text).most_common(top)
    labels = ["\\n" if ch == "\n" else "␣" if ch == " " else ch for ch, _ in counts]
    ax = _new_ax(ax, figsize=(12, 3.5))
    ax.bar(range(len(counts)), [n for _, n in counts], color="tab:blue")
    ax.set_xticks(range(len(counts)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("count (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    return ax


def plot_runs(runs: dict, ax=None, which: str = "val", title: str | None = None, logy: bool = False):
    """Overlay the `which` ("train" or "val") loss curves of several runs: {label: log}.

    Each log is a JSONL path, a run folder or a list of records (as for `plot_training_log`).
    Non-finite losses (a diverged run) are left out of the line. Returns the Axes."""
    import math

    if which not in ("train", "val"):
        raise ValueError(f"which must be 'train' or 'val', got {which!r}")
    if not isinstance(runs, dict) or not runs:
        raise ValueError("plot_runs expects a non-empty dict {label: log}")
    ax = _new_ax(ax)
    for label, log in runs.items():
        steps, losses = loss_curves(log if isinstance(log, list) else read_log(log))[which]
        kept = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
        if kept:
            ax.plot(*zip(*kept), "o-" if which == "val" else "-", label=label, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{'validation' if which == 'val' else 'training'} loss (nats)")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title or f"{which} loss of {len(runs)} runs")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


# --------------------------------------------------------------------------------------------
# Modules 01-04: attention maps, heatmaps, function curves and bar charts
# --------------------------------------------------------------------------------------------
def _as_array(values, name: str, ndim: int | None = None):
    """Tensor, array or list -> float NumPy array, checking the number of dimensions."""
    import numpy as np

    if hasattr(values, "detach"):
        values = values.detach().to("cpu").float().numpy()
    array = np.asarray(values, dtype=float)
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(array.shape)}; "
                         "select one example (and one head) first, e.g. weights[0, head]")
    return array


def _check_labels(labels, n: int, what: str) -> list[str] | None:
    if labels is None:
        return None
    labels = [str(t) for t in labels]
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} {what}s; pass one label per {what}")
    return labels


def plot_heatmap(matrix, ax=None, *, row_labels=None, col_labels=None, title: str = "",
                 xlabel: str = "", ylabel: str = "", cmap: str = "viridis", vmin=None, vmax=None,
                 annotate: bool = False, colorbar: bool = True, figsize=(6, 5)):
    """Draw a 2-D matrix as a grid of colours (row 0 at the top). Returns the Axes.

    `annotate` writes each value into its cell (readable for matrices up to ~12 × 12).
    """
    data = _as_array(matrix, "matrix", 2)
    rows, cols = data.shape
    row_labels = _check_labels(row_labels, rows, "row")
    col_labels = _check_labels(col_labels, cols, "column")
    ax = _new_ax(ax, figsize)
    image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    if col_labels is not None:
        ax.set_xticks(range(cols))
        ax.set_xticklabels(col_labels, rotation=60, ha="right")
    if row_labels is not None:
        ax.set_yticks(range(rows))
        ax.set_yticklabels(row_labels)
    if annotate:
        middle = (image.norm.vmin + image.norm.vmax) / 2
        for i in range(rows):
            for j in range(cols):
                # viridis is dark at the low end: light text there, dark text on light cells.
                colour = "white" if data[i, j] < middle else "black"
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


def plot_attention(weights, tokens=None, ax=None, *, query_tokens=None, title: str = "attention weights",
                   annotate: bool | None = None, highlight_query: int | None = None, vmax=None,
                   colorbar: bool = True, figsize=(6, 5)):
    """Heatmap of one attention matrix: row i shows where query i looks. Returns the Axes.

    weights: (T, S) tensor or array; pick one example and head first (`weights[0, h]`).
    tokens: labels of the S keys; the queries default to the last T of them (queries are the newest
    positions). Values are written into the cells when the matrix is at most 12 × 12.
    `highlight_query` draws a red box around that query's row. The colours run from 0 to `vmax`
    (default: the largest weight), so several heatmaps can share one scale.
    """
    data = _as_array(weights, "attention weights", 2)
    T, S = data.shape
    tokens = _check_labels(tokens, S, "key")
    if tokens is not None and query_tokens is None:
        query_tokens = tokens[S - T:]
    if annotate is None:
        annotate = T <= 12 and S <= 12
    top = vmax if vmax is not None else max(1e-9, float(data.max()))
    ax = plot_heatmap(data, ax, row_labels=query_tokens, col_labels=tokens, title=title,
                      xlabel="key (attended to)", ylabel="query (attending)", vmin=0.0, vmax=top,
                      annotate=annotate, colorbar=colorbar, figsize=figsize)
    if highlight_query is not None:
        if not 0 <= highlight_query < T:
            raise ValueError(f"highlight_query={highlight_query} is outside the {T} query rows")
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((-0.5, highlight_query - 0.5), S, 1, fill=False, edgecolor="red", lw=2))
    return ax


def plot_attention_heads(weights, tokens=None, *, titles=None, ncols: int = 4, size: float = 3.2):
    """One heatmap per head, side by side, on one shared colour scale. Returns the Figure.

    weights: (n_heads, T, S), e.g. `weights[0]` of what `MultiHeadAttention(..., need_weights=True)`
    returns for a batch.
    """
    plt = _pyplot()
    data = _as_array(weights, "per-head attention weights", 3)
    n_heads = data.shape[0]
    if titles is not None and len(titles) != n_heads:
        raise ValueError(f"got {len(titles)} titles for {n_heads} heads; pass one title per head")
    ncols = max(1, min(ncols, n_heads))
    nrows = -(-n_heads // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False,
                             layout="constrained")
    for h, ax in enumerate(axes.flat):
        if h >= n_heads:
            ax.axis("off")
            continue
        plot_attention(data[h], tokens, ax, title=titles[h] if titles else f"head {h}", annotate=False,
                       vmax=float(data.max()), colorbar=False)
        ax.set_xlabel("")
        ax.set_ylabel("")
    return fig


def plot_curves(x, curves: dict, ax=None, *, xlabel: str = "", ylabel: str = "", title: str = "",
                logx: bool | float = False, logy: bool = False, markers: bool = False, figsize=(6, 4)):
    """Several lines y(x) on one set of axes: {legend label: y values}. Returns the Axes.

    For smooth functions (activation curves) leave `markers` off; for a handful of measured points
    (variance per dimension, gradient norm per layer, a learning-rate sweep) turn it on.
    `logx=True` draws x on a base-10 log scale (learning rates); a number picks the base, e.g.
    `logx=2` for dimensions 1, 2, 4, 8, ...
    """
    xs = _as_array(x, "x", 1)
    if not isinstance(curves, dict) or not curves:
        raise ValueError("plot_curves expects a non-empty dict {label: y values}")
    if logx and logx is not True and not (isinstance(logx, (int, float)) and logx > 1):
        raise ValueError(f"logx={logx!r} is not a log base; use True (base 10) or a base above 1 such as 2")
    ax = _new_ax(ax, figsize)
    for label, ys in curves.items():
        ys = _as_array(ys, f"curve {label!r}", 1)
        if len(ys) != len(xs):
            raise ValueError(f"curve {label!r} has {len(ys)} values for {len(xs)} x values")
        ax.plot(xs, ys, "o-" if markers else "-", markersize=4, label=str(label))
    if logx:
        ax.set_xscale("log", base=10 if logx is True else logx)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_bars(labels, values, ax=None, *, title: str = "", ylabel: str = "", ylim=None,
              highlight: int | None = None, figsize=(6, 3.5)):
    """Bars for one series (a list of numbers) or grouped bars ({legend label: numbers}).

    `highlight` colours one bar of a single series red (e.g. the query's own position).
    Returns the Axes.
    """
    import numpy as np

    labels = [str(t) for t in labels]
    series = values if isinstance(values, dict) else {"": values}
    if not series or not labels:
        raise ValueError("plot_bars needs labels and values (a list of numbers or {label: numbers})")
    ax = _new_ax(ax, figsize)
    width = 0.8 / len(series)
    where = np.arange(len(labels))
    for k, (name, ys) in enumerate(series.items()):
        ys = _as_array(ys, f"bar values {name!r}", 1)
        if len(ys) != len(labels):
            raise ValueError(f"got {len(ys)} values for {len(labels)} labels in series {name!r}")
        bars = ax.bar(where + (k - (len(series) - 1) / 2) * width, ys, width, label=name or None)
        if highlight is not None and len(series) == 1:
            if not 0 <= highlight < len(labels):
                raise ValueError(f"highlight={highlight} is outside the {len(labels)} bars")
            bars[highlight].set_color("tab:red")
    ax.set_xticks(where)
    ax.set_xticklabels(labels, rotation=45 if max(len(t) for t in labels) > 3 else 0)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return ax
