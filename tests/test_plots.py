"""The figures' conventions that a reader relies on and a picture cannot show is wrong: one color per category in
every panel that shares a legend."""

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402

from unifieddelta import plots  # noqa: E402


def _line_colors(ax) -> dict:
    """Category -> color of its entry in the legend seaborn drew for one panel."""
    legend = ax.get_legend()
    return {t.get_text(): h.get_color() for t, h in zip(legend.get_texts(), legend.legend_handles)}


def test_hists_give_a_category_the_same_color_in_every_panel():
    # the second panel meets its categories in another order and lacks one: colors must still match the legend
    rows = [("a", "head", v) for v in (1.0, 2.0)] + [("a", "norm", v) for v in (1.5, 2.5)]
    rows += [("a", "mlp", v) for v in (0.5, 1.0)]
    rows += [("b", "mlp", v) for v in (1.0, 2.0)] + [("b", "norm", v) for v in (0.2, 0.4)]
    frame = pd.DataFrame(rows, columns=["panel", "kind", "x"])
    colors = []
    for panel in ("a", "b"):
        ax = plots.hist(frame[frame.panel == panel], "x", "kind", bins=4, hue_order=["head", "norm", "mlp"])
        colors.append(_line_colors(ax.axes[0]))
    assert colors[0]["norm"] == colors[1]["norm"] and colors[0]["mlp"] == colors[1]["mlp"]
    assert set(colors[1]) == {"mlp", "norm"}
    fig = plots.hists(frame, "x", "kind", "panel", bins=4)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["head", "norm", "mlp"]
