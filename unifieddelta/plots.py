"""The book's figures, in one house style: seaborn's colorblind palette, labelled axes with units, legends outside
the data, the pre-trained and post-trained models as reference lines. Each function takes a tidy table (as
``experiments.table`` returns it) and returns the matplotlib figure; the notebooks give it a caption.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

PALETTE = sns.color_palette("colorblind")
#: How each quantity of the tables is named on an axis (all losses are in nats per answer token, per triple or
#: per image, as the pair's loss is).
LABELS = {
    "term": "approximation term (nats)",
    "loss_change": r"exact $\Delta L$ (nats)",
    "second_order": r"$\frac{1}{2} D^\top H D$ (nats)",
    "first_order": r"$\langle \nabla L(W_{post}), D \rangle$ (nats)",
    "score": "score (share correct)",
    "d_norm": r"$\|D\|_F$",
}
REFERENCE_STYLE = {"pre": dict(color="0.45", ls="--", lw=1.2), "post": dict(color="black", ls="-", lw=1.2)}


def style() -> None:
    """The house style for every figure of the book (called on import)."""
    sns.set_theme(
        style="whitegrid",
        context="notebook",
        palette=PALETTE,
        rc={
            "figure.dpi": 100,
            "savefig.dpi": 100,
            "axes.titlesize": 12,
            "axes.labelsize": 11.5,
            "legend.fontsize": 11,
            "legend.title_fontsize": 11,
            "xtick.labelsize": 10.5,
            "ytick.labelsize": 10.5,
            "figure.autolayout": False,
        },
    )


style()


def symlog_axis(ax, values, axis: str = "y", decades: int = 3) -> None:
    """A symmetric log scale on ``axis`` whose linear part spans the ``decades``-th decade below the largest
    |value|, with at most three labelled ticks a side (10^k for the top decades, thinned) and 0: labels never
    crowd around zero, and a value of exactly zero stays on the axis."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    finite = np.abs(np.asarray(values, dtype=float))
    finite = finite[np.isfinite(finite) & (finite > 0)]
    top = float(finite.max()) if finite.size else 1.0
    high = int(np.ceil(np.log10(top)))
    linthresh = 10.0 ** (high - decades)
    getattr(ax, f"set_{axis}scale")("symlog", linthresh=linthresh)
    powers = list(range(high, high - decades, -1))[:3]
    ticks = sorted([0.0] + [s * 10.0**k for k in powers for s in (-1, 1)])
    target = getattr(ax, f"{axis}axis")
    target.set_major_locator(FixedLocator(ticks))
    target.set_minor_locator(NullLocator())
    target.set_major_formatter(FuncFormatter(lambda v, _: "0" if v == 0 else f"{v:.0e}".replace("e-0", "e-")))


def intervals(
    frame: pd.DataFrame,
    x: str,
    *,
    hue: str | None = None,
    panels: str | None = None,
    tolerance: float | None = None,
    xlabel: str | None = None,
    ylabel: str = "change of the mean score against post",
    hue_order: Sequence | None = None,
    cols: int = 2,
    logx: bool = False,
):
    """Estimates with their intervals (columns ``value``, ``low``, ``high``, as ``uncertainty.change_table``
    gives them) against ``x``: one line of points with error bars per ``hue`` value, a line at zero (no change) and,
    given a ``tolerance``, a dashed line at −tolerance (the loss a verdict tolerates)."""
    keys = list(dict.fromkeys(frame[panels])) if panels else [None]
    fig, axes = _grid(len(keys), cols, width=4.8 if panels else 6.4, height=3.4 if panels else 3.8)
    hues = list(hue_order) if hue_order is not None else (list(dict.fromkeys(frame[hue])) if hue else [None])
    for ax, key in zip(axes, keys):
        part = frame if key is None else frame[frame[panels] == key]
        span = float(part[x].max() - part[x].min()) if len(part) else 0.0
        for i, h in enumerate(hues):
            rows = (part if h is None else part[part[hue] == h]).sort_values(x)
            if rows.empty:
                continue
            dodge = 0.0 if logx else (i - (len(hues) - 1) / 2) * 0.012 * span  # error bars side by side
            err = np.vstack([rows["value"] - rows["low"], rows["high"] - rows["value"]]).clip(min=0)
            ax.errorbar(rows[x] + dodge, rows["value"], yerr=err, marker="o", ms=4, lw=1.4, capsize=3,
                        color=PALETTE[i % len(PALETTE)], label=None if h is None else str(h))  # fmt: skip
        ax.axhline(0.0, color="black", lw=1.0, zorder=0, label="post-trained model")
        if tolerance:
            ax.axhline(-tolerance, color="0.45", ls="--", lw=1.0, zorder=0, label=f"tolerance (−{tolerance:g})")
        if logx:
            ax.set_xscale("log")
        ax.set_title("" if key is None else str(key))
        ax.set_ylabel(ylabel)
        ax.set_xlabel(xlabel or x)
    _legend(fig, axes)
    return fig


def _grid(n: int, cols: int, width: float = 4.4, height: float = 3.2, sharex: bool = True):
    cols = max(1, min(cols, n))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), sharex=sharex, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _legend(fig, axes) -> None:
    """One legend for the figure, below the panels (labels gathered from every panel, each once)."""
    handles, labels = {}, []
    for ax in axes:
        pairs = list(zip(*ax.get_legend_handles_labels()))
        legend = ax.get_legend()
        if legend is not None:  # seaborn's own legends hold proxy artists
            pairs += list(zip(legend.legend_handles, [t.get_text() for t in legend.get_texts()]))
            legend.remove()
        for h, label in pairs:
            if label not in handles and not label.startswith("_"):
                handles[label] = h
                labels.append(label)
    if handles:
        fig.legend(
            [handles[k] for k in labels],
            labels,
            loc="lower center",
            ncol=min(len(labels), 5),
            frameon=False,
            bbox_to_anchor=(0.5, 0.0),
        )
        fig.tight_layout(rect=(0, 0.06 + 0.03 * (len(labels) > 5), 1, 1))
    else:
        fig.tight_layout()


def _mean_line(ax, rows: pd.DataFrame, x: str, y: str, color, label) -> None:
    """The mean of ``y`` per ``x`` as a line, with a band of ± one standard deviation where there are several."""
    if rows.empty:
        return
    stats = rows.groupby(x)[y].agg(["mean", "std", "count"]).reset_index().sort_values(x)
    ax.plot(
        stats[x], stats["mean"], marker="o", ms=3.5, lw=1.6, color=color, label=None if label is None else str(label)
    )
    if (stats["count"] > 1).any():
        sd = stats["std"].fillna(0.0)
        ax.fill_between(stats[x], stats["mean"] - sd, stats["mean"] + sd, color=color, alpha=0.18, lw=0)


def lines(
    frame: pd.DataFrame,
    x: str,
    panels: str,
    *,
    hue: str | None = None,
    y: str = "value",
    refs: dict[str, pd.Series] | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    logx: bool = False,
    yscale: str | None = None,
    cols: int = 2,
    titles: dict | None = None,
    order: Sequence | None = None,
    hue_order: Sequence | None = None,
    sharey: bool = False,
    zero: bool = False,
):
    """One panel per value of ``panels`` (a task, a quantity), ``y`` against ``x``, one line per ``hue`` value:
    the mean over seeds with a band of ± one standard deviation. ``refs``: name ("pre", "post") -> a value per
    panel, drawn as horizontal reference lines; ``zero``: a line at y = 0; ``yscale``: "log", "symlog"."""
    keys = list(order) if order is not None else list(dict.fromkeys(frame[panels]))
    fig, axes = _grid(len(keys), cols)
    hues = list(hue_order) if hue_order is not None else (list(dict.fromkeys(frame[hue])) if hue else [None])
    for ax, key in zip(axes, keys):
        part = frame[frame[panels] == key]
        for i, h in enumerate(hues):
            _mean_line(ax, part if h is None else part[part[hue] == h], x, y, PALETTE[i % len(PALETTE)], h)
        for name, values in (refs or {}).items():
            if key in values.index and np.isfinite(values[key]):
                ax.axhline(values[key], label=f"{name}-trained model", zorder=0, **REFERENCE_STYLE.get(name, {}))
        ax.set_title((titles or {}).get(key, str(key)))
        if zero:
            ax.axhline(0.0, color="0.3", lw=0.8, zorder=0)
        if logx:
            ax.set_xscale("log")
        if yscale == "symlog":
            symlog_axis(ax, part[y], "y")
        elif yscale:
            ax.set_yscale(yscale)
        ax.set_ylabel(ylabel or LABELS.get(str(key), y))
    for ax in axes[-min(cols, len(axes)) :]:
        ax.set_xlabel(xlabel or x)
    if sharey:
        lo = min(ax.get_ylim()[0] for ax in axes)
        hi = max(ax.get_ylim()[1] for ax in axes)
        for ax in axes:
            ax.set_ylim(lo, hi)
    _legend(fig, axes)
    return fig


def scatter(
    frame: pd.DataFrame,
    x: str,
    y: str,
    *,
    hue: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    diagonal: bool = True,
    symlog: bool = False,
    ax=None,
):
    """``y`` against ``x`` (two columns), one color per ``hue`` value, with the diagonal y = x."""
    fig, ax = plt.subplots(figsize=(5.2, 4.2)) if ax is None else (ax.figure, ax)
    groups = frame.groupby(hue, sort=False) if hue else [(None, frame)]
    for i, (h, rows) in enumerate(groups):
        ax.scatter(
            rows[x],
            rows[y],
            s=22,
            alpha=0.85,
            color=PALETTE[i % len(PALETTE)],
            label=None if h is None else str(h),
            edgecolor="white",
            linewidth=0.4,
        )
    if diagonal and len(frame):
        lo = float(np.nanmin([frame[x].min(), frame[y].min()]))
        hi = float(np.nanmax([frame[x].max(), frame[y].max()]))
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, ls=":", label="y = x", zorder=0)
    if symlog:
        values = frame[[x, y]].to_numpy().ravel()
        for axis in ("x", "y"):
            symlog_axis(ax, values, axis)
    ax.set_xlabel(xlabel or LABELS.get(x, x))
    ax.set_ylabel(ylabel or LABELS.get(y, y))
    if hue:
        ax.legend(title=hue, loc="best", frameon=True)
    fig.tight_layout()
    return fig


def boxes(
    frame: pd.DataFrame,
    x: str,
    y: str = "value",
    *,
    xlabel: str | None = None,
    ylabel: str | None = None,
    order: Sequence | None = None,
    symlog: bool = True,
):
    """Box plots of ``y`` per value of ``x`` (the paper's Figure 3: per-tensor terms per edit)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.25 * frame[x].nunique()), 3.8))
    n = len(order) if order is not None else frame[x].nunique()
    sns.boxplot(
        frame,
        x=x,
        y=y,
        order=order,
        hue=x,
        hue_order=order,
        palette=PALETTE[:n],
        legend=False,
        ax=ax,
        fliersize=2.5,
        linewidth=1,
    )
    ax.axhline(0.0, color="0.3", lw=0.8, zorder=0)
    if symlog:
        symlog_axis(ax, frame[y], "y")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or LABELS.get(y, y))
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    return fig


def hist(frame: pd.DataFrame, x: str, hue: str, *, xlabel: str | None = None, bins: int = 60, ax=None, hue_order=None):
    """Density histograms (outlines) of ``x`` per ``hue`` value; ``hue_order`` fixes each value's color (panels
    that share a legend must agree on it)."""
    fig, ax = plt.subplots(figsize=(6.0, 3.8)) if ax is None else (ax.figure, ax)
    order = list(hue_order) if hue_order is not None else list(dict.fromkeys(frame[hue]))
    sns.histplot(
        frame,
        x=x,
        hue=hue,
        stat="density",
        common_norm=False,
        element="step",
        fill=False,
        bins=bins,
        hue_order=[h for h in order if h in set(frame[hue])],
        palette=dict(zip(order, PALETTE)),
        ax=ax,
    )
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel("density")
    fig.tight_layout()
    return fig


def strips(
    frame: pd.DataFrame,
    x: str,
    y: str,
    hue: str,
    *,
    xlabel: str | None = None,
    logx: bool = True,
    order: Sequence | None = None,
):
    """A dot per row at ``x``, rows grouped by the category ``y`` and colored by ``hue`` (dodged apart)."""
    cats = [c for c in (order if order is not None else sorted(frame[y].unique())) if c in set(frame[y])]
    hues = list(dict.fromkeys(frame[hue]))
    zero = logx and (frame[x] <= 0).any()
    if zero:  # a tensor that did not move at all has no place on a log axis: it sits on a marked floor instead
        floor = float(frame.loc[frame[x] > 0, x].min()) / 4
        frame = frame.assign(**{x: frame[x].where(frame[x] > 0, floor)})
    fig, ax = plt.subplots(figsize=(8.8, 0.36 * len(cats) * max(2, len(hues)) + 1.2))
    sns.stripplot(
        frame,
        x=x,
        y=y,
        order=cats,
        hue=hue,
        hue_order=hues,
        palette=PALETTE[: len(hues)],
        dodge=True,
        size=5.5,
        jitter=0.15,
        ax=ax,
    )
    if logx:
        ax.set_xscale("log")
    if zero:
        ax.axvline(floor, color="0.5", ls=":", lw=1)
        ax.annotate("unchanged (0)", (floor, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                    fontsize=9, color="0.35")  # fmt: skip
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel("")
    for i in range(len(cats) - 1):
        ax.axhline(i + 0.5, color="0.85", lw=0.8)
    ax.legend(title=hue, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def hists(
    frame: pd.DataFrame, x: str, hue: str, panels: str, *, xlabel: str | None = None, bins: int = 60, cols: int = 2
):
    """One panel of :func:`hist` per value of ``panels``, one shared legend (one color per ``hue`` value in every
    panel)."""
    keys = list(dict.fromkeys(frame[panels]))
    order = list(dict.fromkeys(frame[hue]))
    fig, axes = _grid(len(keys), cols, width=4.2, height=3.0, sharex=False)
    for ax, key in zip(axes, keys):
        hist(frame[frame[panels] == key], x, hue, xlabel=xlabel, bins=bins, ax=ax, hue_order=order)
        ax.set_title(str(key))
    _legend(fig, axes)
    return fig


def scatters(
    frame: pd.DataFrame,
    xs: Sequence[str],
    y: str,
    *,
    hue: str | None = None,
    ylabel: str | None = None,
    symlog: bool = True,
    cols: int = 2,
):
    """One panel of ``y`` against each column of ``xs`` (a shared y axis label and one legend)."""
    fig, axes = _grid(len(xs), cols, width=4.8, height=3.6, sharex=False)
    for ax, x in zip(axes, xs):
        scatter(frame, x=x, y=y, hue=hue, diagonal=False, ax=ax, ylabel=ylabel)
        if symlog:
            symlog_axis(ax, frame[x], "x")
        ax.axhline(0.0, color="0.3", lw=0.8, zorder=0)
    _legend(fig, axes)
    return fig
