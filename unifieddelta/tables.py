"""Pure reducers of the tidy table (``experiments.table``): no model, no checkpoint, no store, only pandas.

Each function takes the table a chapter's ``plan.run()`` returned (one row per trial × quantity, per task for
scores) and returns a smaller table or a number for a page. ``Used by:`` names the chapters that call it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from . import experiments
from .uncertainty import pts

#: The paper's approximation term: the left Riemann sum with C = 5 points, by backward passes.
PAPER_RULE = {"rule": "left", "points": 5, "mode": "grad"}


def nan_if_empty(values, how: str = "mean") -> float:
    """``values.mean()`` (or ``min``, ``max``, ``median``, ``sum``, the ``first`` or ``last`` value) as a float,
    NaN for no values: the guard every page needs where a profile measured nothing of a kind.
    Used by: every chapter."""
    values = pd.Series(values, dtype=float) if not isinstance(values, pd.Series) else values
    if values.dropna().empty:
        return math.nan
    if how in ("first", "last"):
        return float(values.iloc[0 if how == "first" else -1])
    return float(getattr(values, how)())


def with_columns(frame, *names):
    """``frame`` with the columns ``names`` added, empty, where it lacks them (the settings of an edit no chapter
    of the profile measured). Used by: randomness, reproduction."""
    return frame.reindex(columns=[*frame.columns, *(n for n in names if n not in frame)])


def extreme_labels(row, *, largest: bool = True, tie: float = 5e-5) -> str:
    """The label(s) of a Series at its largest (or smallest) value, with the value as a percentage; labels within
    ``tie`` of it are named together (``attention and MLP (0.26%)``). Used by: delta."""
    row = row.dropna()
    best = row.max() if largest else row.min()
    return " and ".join(str(k) for k in row.index[(row - best).abs() <= tie]) + f" ({best:.2%})"


def paper_terms(frame, rule: dict = PAPER_RULE):
    """The rows of the approximation term taken with ``rule`` (rule, points, mode; default the paper's
    ``PAPER_RULE``). Used by: identity, classification, gemma."""
    same = (frame["rule"] == rule["rule"]) & (frame["points"] == rule["points"]) & (frame["mode"] == rule["mode"])
    return frame[(frame.quantity == "term") & same]


def is_reference(frame) -> pd.Series:
    """True for the reference trials, the pre-trained (α = −1) and the post-trained model (α = 0): extrapolation
    by α = −1 and 0. Used by: expo, minilm, predicts, classification."""
    alpha = frame["alpha"] if "alpha" in frame else pd.Series(np.nan, index=frame.index)
    return (frame.method == "extrapolate") & alpha.isin([-1.0, 0.0])


def edited(frame):
    """``frame`` without the reference trials (``is_reference``). Used by: minilm, predicts, classification."""
    return frame[~is_reference(frame)]


def reference_scores(frame, pair: str | None = None) -> dict:
    """{"pre": task -> score, "post": task -> score}: the scores of α = −1 and α = 0 (the reference trials).
    Used by: every chapter with scores."""
    s = experiments.scores(frame)
    if pair is not None:
        s = s[s.pair == pair]
    ext = s[s.method == "extrapolate"]
    return {
        name: ext[ext.alpha == alpha].groupby("task")["value"].mean() for name, alpha in (("pre", -1.0), ("post", 0.0))
    }


def per_trial(frame, pair: str | None = None, rule: dict = PAPER_RULE):
    """One row per trial: its edit and settings, and the term taken with ``rule`` (default the paper's left C = 5,
    grad mode), the first-order term, the exact change, the second-order term, ‖D‖, and the score change against
    post (mean over tasks). Used by: every chapter with trials."""
    frame = frame if pair is None else frame[frame.pair == pair]
    settings = [c for c in frame.columns if c not in experiments.COLUMNS]
    keys = ["pair", "method", "edit", "seed", "scope", "trial"]
    base = frame.drop_duplicates("trial")[keys + settings].set_index("trial")
    ruled = (frame["rule"] == rule["rule"]) & (frame["points"] == rule["points"]) & (frame["mode"] == rule["mode"])
    keep = (frame.quantity != "term") | ruled
    wanted = ["term", "first_order", "loss_change", "second_order", "d_norm", "loss"]
    values = frame[keep & frame.quantity.isin(wanted)].pivot_table(
        index="trial", columns="quantity", values="value", aggfunc="first"
    )
    out = base.join(values)
    changes = _score_changes(frame)
    out["score_change"] = changes.groupby("trial").score_change.mean() if len(changes) else math.nan
    return out.reset_index()


def _score_changes(frame):
    """(trial, task, score_change): each primary score against the pair's own post-trained reference trial."""
    out = []
    for name, group in experiments.scores(frame).groupby("pair"):
        post = reference_scores(frame, name)["post"]
        group = group[group.task.isin(post.index)]
        out.append(group.assign(score_change=group.value.to_numpy() - post[group.task].to_numpy()))
    columns = ["trial", "task", "score_change"]
    return pd.concat(out)[columns] if out else pd.DataFrame(columns=columns)


def task_changes(frame):
    """One row per trial and task: the score change against post on that task (the pair's own reference trial),
    with the trial's term (left, C = 5), first-order term, exact change and ‖D‖ beside it. Used by: predicts."""
    rows = per_trial(frame).set_index("trial")
    changes = _score_changes(frame)
    if changes.empty:
        return rows.iloc[:0]
    columns = ("pair", "method", "edit", "seed", "term", "first_order", "loss_change", "d_norm", "loss")
    return changes.join(rows[[c for c in columns if c in rows]], on="trial")


def rule_errors(frame):
    """Per edit, rule and number of points: the term (mean over seeds), the exact change, and the relative error
    |term − ΔL| / |ΔL| of the quadrature (grad mode). Used by: identity, predicts."""
    terms = frame[(frame.quantity == "term") & (frame["mode"] == "grad")]
    exact = frame[frame.quantity == "loss_change"].groupby(["pair", "edit", "seed"])["value"].first()
    rows = terms.assign(loss_change=[exact.get((r.pair, r.edit, r.seed), math.nan) for r in terms.itertuples()])
    rows = rows.assign(error=(rows["value"] - rows["loss_change"]).abs() / rows["loss_change"].abs())
    out = rows.groupby(["pair", "edit", "rule", "points"], sort=False)[["value", "loss_change", "error"]].mean()
    return out.rename(columns={"value": "term"}).reset_index()


def cheapest_rules(errors, budgets=(0.1, 0.01, 0.001)):
    """For each relative error budget: the (rule, points) with the fewest points whose worst error over the edits
    of ``errors`` (``rule_errors``) is within it, and that worst error; None where no rule measured meets it.
    Used by: predicts."""
    worst = errors.groupby(["rule", "points"])["error"].max().reset_index().sort_values(["points", "error"])
    out = {}
    for budget in budgets:
        ok = worst[worst.error <= budget]
        out[budget] = None if ok.empty else (ok.iloc[0].rule, int(ok.iloc[0].points), float(ok.iloc[0].error))
    return out


def score_drops(frame, method: str = "dare", settings: Sequence[str] = ("p", "k")):
    """Per pair and setting: the mean score drop against the pair's post-trained model (over tasks and seeds, in
    share correct; > 0 is worse), beside the size of the edit, ‖D‖/‖ΔW‖ (mean over seeds).
    Used by: kfamily, dare_works, reproduction."""
    trials = per_trial(frame)
    rows = with_columns(trials[trials.method == method], *settings)
    norms = frame[frame.quantity == "delta_norm"].groupby("pair")["value"].first()
    out = rows.assign(drop=-rows.score_change, relative_d=rows.d_norm / norms.reindex(rows.pair).to_numpy())
    quantities = ["drop", "relative_d", "term", "loss_change", "second_order"]
    return out.groupby(["pair", *settings])[quantities].mean().reset_index()


def rank_correlation(x, y) -> float:
    """Spearman's ρ of two sequences (NaN pairs dropped). Used by: dare, kfamily, dare_works, minilm, predicts."""
    both = pd.DataFrame({"x": list(x), "y": list(y)}).dropna()
    return float(both.corr(method="spearman").iloc[0, 1]) if len(both) > 2 else math.nan


#: The columns of the paper's Table 1: which entries get k (random: DARE's mask; sign: Δ < 0; product: Δ·∇L < 0).
TABLE_ONE = {"dare": "random", "sign_biased": "sign-biased", "product_biased": "product-biased"}


def table_one(frame, p_random: float, pair: str | None = None):
    """The paper's Table 1 from a table holding the randomness chapter's trials: per k of the biased columns, the
    mean score over the pair's tasks (mean over masks) and the approximation term of each column (``TABLE_ONE``),
    the random column being DARE's k-family at drop rate ``p_random``. Used by: randomness, reproduction."""
    trials = with_columns(per_trial(frame, pair), "k", "p")
    trials = trials[trials.method.isin(TABLE_ONE) & trials.k.notna()].assign(column=lambda f: f.method.map(TABLE_ONE))
    ks = set(trials[trials.method != "dare"].k) or set(trials.k)
    trials = trials[trials.k.isin(ks) & ((trials.method != "dare") | (trials.get("p") == p_random))]
    post = float(reference_scores(frame, pair)["post"].mean())
    scores = trials.pivot_table(index="k", columns="column", values="score_change", aggfunc="mean") + post
    terms = trials.pivot_table(index="k", columns="column", values="term", aggfunc="mean")
    order = [c for c in TABLE_ONE.values() if c in scores]
    return pd.concat({"score (mean over tasks)": scores[order], "approximation term": terms[order]}, axis=1)


def delta_summary(stats, sizes: dict | None = None):
    """One row per pair of ``pairs.delta_table`` rows: parameters, tensors, the median relative change of its
    weight matrices, the largest relative change and entry, the share of entries unchanged, and, given ``sizes``
    (pair -> ``pairs.relative_size``), the relative size of the whole delta. Used by: delta, minilm."""
    rows = {}
    for name, part in stats.groupby("pair", sort=False):
        matrices = part[part["shape"].map(len) == 2]
        row = {"parameters": int(part["numel"].sum()), "tensors": len(part)}
        if sizes is not None:
            row["relative size of the delta"] = sizes[name]
        row["median relative change (matrices)"] = matrices["rel_change"].median()
        row["largest relative change"] = part["rel_change"].max()
        row["largest |ΔW_ij|"] = part["max_abs"].max()
        if sizes is None:
            row["entries unchanged"] = (part["frac_zero"] * part["numel"]).sum() / part["numel"].sum()
        rows[name] = row
    return pd.DataFrame(rows).T


def kept_fraction(frame, names: dict):
    """``frame`` with ``kept``, the fraction of the delta each edit keeps (low rank: its rank fraction; trimming:
    its entry fraction; DARE: 1 − p, rounded so budgets compare equal), and ``selection``, the method's name in
    ``names``. Used by: structure."""
    kept = np.where(
        frame.method == "low_rank",
        frame.get("rank"),
        np.where(frame.method == "magnitude_trim", frame.get("keep"), 1 - frame.get("p")),
    )
    return frame.assign(
        kept=pd.Series(kept, index=frame.index, dtype=float).round(6), selection=frame.method.map(names)
    )


def turn_and_cross(values) -> tuple[float, float, float]:
    """(the α of a curve's minimum, the minimum, the first α past it where the curve crosses zero upwards, by
    linear interpolation; NaN when it does not) of ``values``: a Series indexed by α. Used by: expo."""
    values = values.sort_index()
    low = values.idxmin()
    after = values[values.index >= low]
    cross = math.nan
    for (a0, v0), (a1, v1) in zip(after.items(), list(after.items())[1:]):
        if v0 < 0 <= v1:
            cross = a0 + (a1 - a0) * (-v0) / (v1 - v0)
            break
    return float(low), float(values.min()), float(cross)


def sample_sizes(questions, trials=None) -> dict:
    """What a page's intervals rest on: the questions per task (the fewest any task has), the tasks, and the
    masks or seeds per setting (the most any edit has, from ``trials``: ``per_trial`` rows).
    Used by: every chapter with scores."""
    per_task = questions.groupby(["trial", "task"]).size() if len(questions) else pd.Series(dtype=int)
    draws = trials.groupby("edit").seed.nunique().max() if trials is not None and len(trials) else 0
    return {
        "questions": int(per_task.min()) if len(per_task) else 0,
        "tasks": int(questions.task.nunique()) if len(questions) else 0,
        "draws": int(draws) if draws == draws else 0,
    }


def interval_table(changes, index: Sequence[str], column: str | None = None):
    """Changes with intervals (``uncertainty.change_table`` rows) as a table of ``+1.2 (−0.3 to +2.7)`` cells in
    points (hundredths of a share correct), rows ``index``, one column per value of ``column`` (default: the last
    of ``index``). Used by: every chapter with scores."""
    cells = changes.assign(
        cell=[f"{pts(v)} ({pts(lo)} to {pts(hi)})" for v, lo, hi in zip(changes.value, changes.low, changes.high)]
    )
    index = list(index)
    column = column or index[-1]
    rows = [i for i in index if i != column]
    out = cells.pivot_table(index=rows or None, columns=column, values="cell", aggfunc="first")
    out.columns = [f"{column} = {c:g}" if isinstance(c, float) else str(c) for c in out.columns]
    return out


def expectation_table(evidence):
    """``verdicts.expectation_check``'s evidence, formatted for a page. Used by: dare, kfamily."""
    out = evidence.copy()
    out["t = 0 node (95%)"] = [
        f"{v:+.2g} ({lo:+.2g} to {hi:+.2g})" for v, lo, hi in zip(out["t=0 mean"], out["t=0 low"], out["t=0 high"])
    ]
    out["term (95%)"] = [
        f"{v:+.2g} ({lo:+.2g} to {hi:+.2g})" for v, lo, hi in zip(out["term mean"], out["term low"], out["term high"])
    ]
    dropped = ("t=0 mean", "t=0 low", "t=0 high", "t=0 contains 0", "term mean", "term low", "term high")
    keep = [c for c in out.columns if c not in dropped]
    return out[keep].set_index(keep[0])


def interval_text(rows) -> str:
    """The first row of ``uncertainty.change_table`` rows as ``+1.2 (−0.3 to +2.7)`` points, or ``—``.
    Used by: bitdelta, structure, expo."""
    if not len(rows) or rows.value.iloc[0] != rows.value.iloc[0]:
        return "—"
    r = rows.iloc[0]
    return f"{pts(r.value)} ({pts(r.low)} to {pts(r.high)})"


def listing(values, unit: str = "", *, prefix: str = "", empty: str = "none of those measured") -> str:
    """``[4, 5], "bits"`` -> ``4 and 5 bits`` (after ``prefix``); no values -> ``empty``. Used by: bitdelta, expo."""
    values = [f"{v:g}" if isinstance(v, float) else str(v) for v in values]
    if not values:
        return empty
    text = values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]
    return f"{prefix}{text} {unit}".strip()


def ranks_used(stats, fractions: Sequence[float]):
    """The integer rank a rank fraction gives each weight matrix (``edits.resolve_rank``: floored, at least one),
    from ``pairs.delta_table`` rows: one row per fraction, one column per distinct smaller dimension of a matrix
    (``min(m, n) = 64``...). Used by: structure."""
    from .edits import resolve_rank

    dims = sorted({min(s) for s in stats["shape"] if len(s) == 2})
    rows = {f"{f:g}": {f"min(m, n) = {d}": resolve_rank(float(f), (d, d)) for d in dims} for f in fractions}
    return pd.DataFrame(rows).T.rename_axis("rank fraction")


def histogram(frame, x: str, by: Sequence[str], bins: int = 60):
    """Counts of ``x`` in ``bins`` equal-width bins over its whole range, per group of ``by``: the rows a histogram
    figure draws (its CSV), without the samples themselves. Used by: delta."""
    edges = np.linspace(float(frame[x].min()), float(frame[x].max()), bins + 1)
    rows = []
    for key, part in frame.groupby(list(by), sort=False):
        counts, _ = np.histogram(part[x], bins=edges)
        key = key if isinstance(key, tuple) else (key,)
        rows += [{**dict(zip(by, key)), "bin_low": lo, "bin_high": hi, "count": int(c)}
                 for lo, hi, c in zip(edges[:-1], edges[1:], counts)]  # fmt: skip
    return pd.DataFrame(rows)
