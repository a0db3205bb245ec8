"""Tests for the notebook helpers: attention/heatmap/curve/bar plots (viz) and the explorers (widgets).

They run headless (matplotlib's Agg backend) and check what was drawn, not how it looks.
"""

import builtins
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_transformer import viz, widgets  # noqa: E402

TOKENS = ["the", "cat", "sat", "on", "the", "mat"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _scores(seed=0, heads=None):
    g = torch.Generator().manual_seed(seed)
    shape = (len(TOKENS), len(TOKENS)) if heads is None else (heads, len(TOKENS), len(TOKENS))
    return torch.randn(shape, generator=g)


# ---------------------------------------------------------------------------------------------
# viz


def test_plot_attention_draws_the_matrix_with_token_labels():
    weights = torch.softmax(_scores(), dim=-1)
    ax = viz.plot_attention(weights, TOKENS, highlight_query=2)
    image = ax.get_images()[0]
    assert image.get_array().shape == (6, 6)
    torch.testing.assert_close(torch.tensor(image.get_array().data, dtype=torch.float32), weights)
    assert [t.get_text() for t in ax.get_xticklabels()] == TOKENS
    assert [t.get_text() for t in ax.get_yticklabels()] == TOKENS
    assert len(ax.patches) == 1  # the highlight box
    assert len(ax.texts) == 36  # small matrices are annotated


def test_plot_attention_rectangular_uses_last_tokens_as_queries():
    weights = torch.softmax(torch.randn(2, 6), dim=-1)  # two new queries over six keys (decoding)
    ax = viz.plot_attention(weights, TOKENS, annotate=False)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["the", "mat"]
    assert not ax.texts


def test_plot_attention_rejects_bad_input_with_a_fix():
    with pytest.raises(ValueError, match=r"weights\[0, head\]"):
        viz.plot_attention(torch.rand(1, 2, 6, 6), TOKENS)
    with pytest.raises(ValueError, match="one label per key"):
        viz.plot_attention(torch.rand(6, 6), TOKENS[:5])
    with pytest.raises(ValueError, match="highlight_query=9"):
        viz.plot_attention(torch.rand(6, 6), TOKENS, highlight_query=9)


def test_plot_attention_heads_one_panel_per_head_shared_scale():
    weights = torch.softmax(_scores(heads=3), dim=-1)
    fig = viz.plot_attention_heads(weights, TOKENS, titles=["a", "b", "c"], ncols=2)
    visible = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in visible] == ["a", "b", "c"]
    assert len(fig.axes) == 4  # a 2 x 2 grid, the last panel switched off
    top = float(weights.max())
    assert all(ax.get_images()[0].norm.vmax == pytest.approx(top) for ax in visible)
    with pytest.raises(ValueError, match="one title per head"):
        viz.plot_attention_heads(weights, TOKENS, titles=["a"])


def test_plot_heatmap_annotates_and_labels():
    ax = viz.plot_heatmap([[0.0, 1.0], [2.0, 3.0]], row_labels=["r0", "r1"], col_labels=["c0", "c1"],
                          annotate=True, title="m")
    assert [t.get_text() for t in ax.texts] == ["0.00", "1.00", "2.00", "3.00"]
    assert ax.get_title() == "m"
    with pytest.raises(ValueError, match="2 labels for 3 rows"):
        viz.plot_heatmap(torch.zeros(3, 2), row_labels=["a", "b"])


def test_plot_curves_lines_and_log_axes():
    ax = viz.plot_curves([1, 2, 4, 8], {"raw": [1, 2, 4, 8], "scaled": [1, 1, 1, 1]}, logx=2,
                         logy=True, markers=True, xlabel="d")
    assert [line.get_label() for line in ax.get_lines()] == ["raw", "scaled"]
    assert list(ax.get_lines()[0].get_ydata()) == [1, 2, 4, 8]
    assert ax.get_lines()[0].get_marker() == "o"
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.xaxis.get_transform().base == 2
    ax = viz.plot_curves(torch.tensor([1e-4, 1e-3, 1e-2]), {"val loss": torch.tensor([2.1, 1.8, 2.5])}, logx=True)
    assert ax.xaxis.get_transform().base == 10  # True: decades, for learning rates
    assert ax.get_lines()[0].get_marker() == "None"  # smooth curves by default
    with pytest.raises(ValueError, match="3 values for 4 x values"):
        viz.plot_curves([1, 2, 3, 4], {"bad": [1, 2, 3]})
    with pytest.raises(ValueError, match="non-empty dict"):
        viz.plot_curves([1], {})
    with pytest.raises(ValueError, match="logx=0.5 is not a log base"):
        viz.plot_curves([1, 2], {"y": [1, 2]}, logx=0.5)


def test_plot_curves_with_markers_for_a_sweep():
    fig, ax = plt.subplots()
    out = viz.plot_curves([1e-4, 1e-3], {"loss": [2.0, 1.5]}, ax, xlabel="lr", title="sweep", logx=True, markers=True)
    assert out is ax and ax.get_title() == "sweep" and ax.get_xlabel() == "lr"
    assert ax.get_lines()[0].get_marker() == "o" and ax.xaxis.get_transform().base == 10


def test_plot_bars_single_grouped_and_highlight():
    ax = viz.plot_bars(["a", "b", "c"], [0.2, 0.5, 0.3], highlight=1)
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([0.2, 0.5, 0.3])
    assert ax.patches[1].get_facecolor() != ax.patches[0].get_facecolor()
    ax = viz.plot_bars(["a", "b"], {"x": [1, 2], "y": [3, 4]})
    assert len(ax.patches) == 4 and ax.get_legend() is not None
    with pytest.raises(ValueError, match="highlight=5"):
        viz.plot_bars(["a", "b"], [1, 2], highlight=5)


def test_plots_draw_into_a_given_axes():
    fig, (left, right) = plt.subplots(1, 2)
    assert viz.plot_attention(torch.eye(3), ["a", "b", "c"], left) is left
    assert viz.plot_bars(["a"], [1.0], right) is right


# ---------------------------------------------------------------------------------------------
# widgets


def test_attention_weights_causal_and_temperature():
    scores = _scores()
    w = widgets.attention_weights(scores, causal=True)
    assert torch.all(w.triu(1) == 0), "future keys must get zero weight"
    torch.testing.assert_close(w.sum(-1), torch.ones(6))
    hot = widgets.attention_weights(scores, causal=False, temperature=0.001)
    assert torch.equal(hot.argmax(-1), scores.argmax(-1))
    assert float(hot.max(-1).values.min()) > 0.99  # near one-hot
    flat = widgets.attention_weights(scores, causal=False, temperature=1000.0)
    torch.testing.assert_close(flat, torch.full((6, 6), 1 / 6), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        widgets.attention_weights(scores, temperature=0)


def test_show_attention_heatmap_and_bars():
    fig = widgets.show_attention(_scores(heads=2), TOKENS, query=3, causal=True, temperature=0.5, head=1)
    heat, bars = fig.axes[0], fig.axes[1]
    expected = widgets.attention_weights(_scores(heads=2)[1], causal=True, temperature=0.5)
    heights = [p.get_height() for p in bars.patches]
    assert heights == pytest.approx(expected[3].tolist(), abs=1e-6)
    assert heights[4:] == [0.0, 0.0]  # causal: query 3 cannot see positions 4 and 5
    assert "'on'" in bars.get_title()
    assert heat.get_images()[0].get_array().shape == (6, 6)
    with pytest.raises(ValueError, match="query=6"):
        widgets.show_attention(_scores(), TOKENS, query=6)
    with pytest.raises(ValueError, match="head=2"):
        widgets.show_attention(_scores(heads=2), TOKENS, head=2)
    with pytest.raises(ValueError, match="one token per position"):
        widgets.show_attention(_scores(), TOKENS[:-1])
    with pytest.raises(ValueError, match="square"):
        widgets.show_attention(torch.zeros(2, 6), TOKENS)


def test_attention_explorer_builds_controls():
    pytest.importorskip("ipywidgets")
    import ipywidgets

    box = widgets.attention_explorer(_scores(heads=2), TOKENS, query=1)
    assert isinstance(box, ipywidgets.VBox)
    controls, output = box.children
    assert isinstance(output, ipywidgets.Output)
    names = [c.description for c in controls.children]
    assert names == ["query", "causal mask", "temperature", "head"]
    assert controls.children[0].value == 1
    assert controls.children[3].max == 1
    controls.children[0].value = 4  # changing a control must not raise (it redraws)


def test_explore_calls_function_with_defaults_and_on_change():
    pytest.importorskip("ipywidgets")
    calls = []
    panel = widgets.explore(lambda k, t, mode, flag, fixed: calls.append((k, t, mode, flag, fixed)),
                            k=(0, 10, 1, 3), t=(0.1, 2.0, 0.1, 1.0), mode=["a", "b"], flag=True, fixed=7)
    assert calls == [(3, 1.0, "a", True, 7)]
    sliders = panel.children[0].children
    assert [type(c).__name__ for c in sliders] == ["IntSlider", "FloatSlider", "Dropdown", "Checkbox"]
    sliders[0].value = 5
    assert calls[-1] == (5, 1.0, "a", True, 7)


def test_explore_rejects_bad_controls():
    with pytest.raises(ValueError, match="slider is"):
        widgets.explore(print, x=(1, 2))
    with pytest.raises(ValueError, match="outside"):
        widgets.explore(print, x=(0, 1, 0.1, 5))
    with pytest.raises(ValueError, match="dropdown needs"):
        widgets.explore(print, x=[])
    with pytest.raises(ValueError, match="function"):
        widgets.explore(3)


def test_fallbacks_without_ipywidgets(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_ipywidgets(name, *args, **kwargs):
        if name == "ipywidgets" or name.startswith("ipywidgets."):
            raise ImportError("No module named 'ipywidgets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "ipywidgets", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_ipywidgets)
    assert not widgets.ipywidgets_available()
    calls = []
    assert widgets.explore(lambda t: calls.append(t), t=(0.5, 2.0, 0.5, 1.0)) is None
    assert calls == [1.0]
    assert widgets.attention_explorer(_scores(), TOKENS) is None
    out = capsys.readouterr().out
    assert out.count("pip install 'ipywidgets>=7.7'") == 2
    assert plt.get_fignums(), "the static fallback must still draw the figure"
