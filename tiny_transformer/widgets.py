"""Interactive explorers for the notebooks, built from core ipywidgets (7.7+ on Colab, 8.x in JupyterLab).

Every explorer has a plain-Python twin that draws the same picture for fixed settings, so a notebook
still works where widgets do not (in CI, in a terminal, or when ipywidgets is not installed):

    attention_explorer(scores, tokens)                  # a dropdown, a checkbox and a slider
    show_attention(scores, tokens, query=3)             # the same figure, once

`explore(fn, temperature=(0.1, 2.0, 0.05, 1.0), causal=True, mode=["a", "b"])` turns any function
that prints or plots into a small panel of controls; without ipywidgets it calls `fn` once with
the default values. Only `interactive_output`, sliders, dropdowns, checkboxes and boxes are used:
they behave the same in ipywidgets 7 and 8.
"""

from __future__ import annotations

import numbers

import torch

from tiny_transformer.attention import causal_mask

INSTALL_HINT = (
    "ipywidgets is not installed, so this is the static view. For the interactive version run "
    "pip install 'ipywidgets>=7.7' and restart the kernel."
)


def _widgets():
    """The ipywidgets module, or None when it is not installed."""
    try:
        import ipywidgets
    except ImportError:
        return None
    return ipywidgets


def ipywidgets_available() -> bool:
    """True when ipywidgets can be imported (the explorers then return live widgets)."""
    return _widgets() is not None


# ----------------------------------------------------------------------------------------------
# Attention explorer


def _check_scores(scores, tokens) -> tuple[torch.Tensor, list[str]]:
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float32)
    if scores.dim() not in (2, 3):
        raise ValueError(
            f"scores must be (T, T) or (n_heads, T, T) attention logits, got shape {tuple(scores.shape)}; "
            "pick one example first, e.g. scores[0]"
        )
    T, S = scores.shape[-2:]
    if T != S:
        raise ValueError(f"scores must be square (every token is a query and a key), got {T} x {S}")
    tokens = [str(t) for t in tokens]
    if len(tokens) != T:
        raise ValueError(f"got {len(tokens)} tokens for {T} positions; pass one token per position")
    return scores, tokens


def attention_weights(scores, *, causal: bool = True, temperature: float = 1.0) -> torch.Tensor:
    """softmax(scores / temperature) over the keys (last axis), hiding future keys when `causal`.

    scores: (..., T, S) attention logits, i.e. q·k / sqrt(d). A temperature below 1 sharpens the
    weights towards the largest score; above 1 flattens them towards uniform.
    """
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float32)
    if scores.dim() < 2:
        raise ValueError(f"scores need at least 2 dimensions (queries, keys), got shape {tuple(scores.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}; use e.g. 0.5, 1.0 or 2.0")
    scores = scores / temperature
    if causal:
        mask = causal_mask(scores.shape[-2], scores.shape[-1])
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def show_attention(scores, tokens, *, query: int | None = None, causal: bool = True,
                   temperature: float = 1.0, head: int = 0, figsize=(11, 4.2)):
    """Plot attention weights for fixed settings: the whole matrix, and one query's weights as bars.

    scores: (T, T) or (n_heads, T, T) attention logits; tokens: the T token strings; query: the
    row to show (default: the last token). Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    from tiny_transformer.viz import plot_attention, plot_bars

    scores, tokens = _check_scores(scores, tokens)
    if scores.dim() == 3:
        if not 0 <= head < scores.shape[0]:
            raise ValueError(f"head={head} is out of range: these scores have {scores.shape[0]} heads")
        scores = scores[head]
    T = len(tokens)
    query = T - 1 if query is None else query
    if not 0 <= query < T:
        raise ValueError(f"query={query} is out of range: pick a position in [0, {T})")
    weights = attention_weights(scores, causal=causal, temperature=temperature)
    fig, (left, right) = plt.subplots(1, 2, figsize=figsize, layout="constrained",
                                      gridspec_kw={"width_ratios": [1.1, 1]})
    setting = f"causal={causal}, temperature={temperature:g}"
    plot_attention(weights, tokens, title=f"all queries ({setting})", highlight_query=query,
                   annotate=False, ax=left)
    plot_bars(tokens, weights[query], title=f"query {query} {tokens[query]!r} looks at ...",
              ylabel="attention weight", ylim=(0, 1), highlight=query, ax=right)
    return fig


def attention_explorer(scores, tokens, *, query: int | None = None, causal: bool = True,
                       temperature: float = 1.0):
    """Explore attention over a sentence: pick the query word, toggle the causal mask, change the
    softmax temperature (and the head, for (n_heads, T, T) scores).

    Returns an ipywidgets box to display (the last line of a notebook cell). Without ipywidgets it
    prints how to install it, draws `show_attention(...)` once and returns None.
    """
    scores, tokens = _check_scores(scores, tokens)
    query = len(tokens) - 1 if query is None else query
    w = _widgets()
    if w is None:
        import matplotlib.pyplot as plt

        print(INSTALL_HINT)
        show_attention(scores, tokens, query=query, causal=causal, temperature=temperature)
        plt.show()
        return None
    style = {"description_width": "initial"}  # show whole labels ("temperature", not "temperat...")
    controls = {
        "query": w.Dropdown(options=[(f"{i}: {t}", i) for i, t in enumerate(tokens)], value=query,
                            description="query", style=style),
        "causal": w.Checkbox(value=causal, description="causal mask", style=style),
        "temperature": w.FloatSlider(value=temperature, min=0.1, max=3.0, step=0.05,
                                     description="temperature", continuous_update=False, style=style),
    }
    if scores.dim() == 3:
        controls["head"] = w.IntSlider(value=0, min=0, max=scores.shape[0] - 1, description="head",
                                       continuous_update=False, style=style)

    def update(query, causal, temperature, head=0):
        import matplotlib.pyplot as plt

        show_attention(scores, tokens, query=query, causal=causal, temperature=temperature, head=head)
        plt.show()

    output = w.interactive_output(update, controls)
    return w.VBox([_row(w, controls.values()), output])


# ----------------------------------------------------------------------------------------------
# A generic panel of controls


def _row(w, children):
    return w.HBox(list(children), layout=w.Layout(flex_flow="row wrap"))


def _control_default(name: str, spec):
    """The value a control starts at (and the value the plain fallback uses)."""
    if isinstance(spec, bool):
        return spec
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"control {name!r}: a dropdown needs at least one option")
        first = spec[0]
        return first[1] if isinstance(first, tuple) and len(first) == 2 else first
    if isinstance(spec, tuple):
        if len(spec) not in (3, 4) or not all(isinstance(v, numbers.Real) for v in spec):
            raise ValueError(
                f"control {name!r}: a slider is (min, max, step) or (min, max, step, value), got {spec!r}"
            )
        low, high = spec[0], spec[1]
        value = spec[3] if len(spec) == 4 else low
        if not low <= value <= high:
            raise ValueError(f"control {name!r}: start value {value} lies outside [{low}, {high}]")
        return value
    if isinstance(spec, (numbers.Real, str)) or spec is None:
        return spec  # a fixed argument, passed through without a control
    raise ValueError(
        f"control {name!r}: use (min, max, step[, value]) for a slider, a list of options for a "
        f"dropdown, True/False for a checkbox, or a plain value to keep fixed; got {spec!r}"
    )


def _make_control(w, name: str, spec):
    value = _control_default(name, spec)
    style = {"description_width": "initial"}  # the whole argument name as the label
    if isinstance(spec, bool):
        return w.Checkbox(value=value, description=name, style=style)
    if isinstance(spec, list):
        return w.Dropdown(options=spec, value=value, description=name, style=style)
    if isinstance(spec, tuple):
        integral = all(isinstance(v, numbers.Integral) for v in spec)
        slider = w.IntSlider if integral else w.FloatSlider
        return slider(value=value, min=spec[0], max=spec[1], step=spec[2], description=name,
                      continuous_update=False, style=style)
    return w.fixed(value)


def explore(fn, **controls):
    """Call `fn(**values)` again whenever a control changes; return the panel to display.

    Each keyword becomes a control for the argument of that name:
      (min, max, step) or (min, max, step, value)  -> a slider (IntSlider if all are ints)
      [option, ...] or [(label, value), ...]       -> a dropdown (the first option is the default)
      True / False                                 -> a checkbox
      any other plain value                        -> passed through unchanged
    `fn` prints or plots (ending with plt.show()). Without ipywidgets it prints how to install it and
    calls `fn` once with the default values (returning None).

    >>> explore(lambda temperature, top_k: print(temperature, top_k),
    ...         temperature=(0.1, 2.0, 0.05, 1.0), top_k=[0, 5, 20])
    """
    if not callable(fn):
        raise ValueError(f"explore needs a function to call, got {type(fn).__name__}")
    defaults = {name: _control_default(name, spec) for name, spec in controls.items()}
    w = _widgets()
    if w is None:
        print(INSTALL_HINT)
        fn(**defaults)
        return None
    widgets = {name: _make_control(w, name, spec) for name, spec in controls.items()}
    output = w.interactive_output(fn, widgets)
    visible = [c for c in widgets.values() if isinstance(c, w.DOMWidget)]
    return w.VBox([_row(w, visible), output])
