"""The paper's claims, and the verdicts the book gives on them, each decided by one tested function.

Every verdict word a page prints — a class, "breaks at", "the gentlest k", "reproduced", "not distinguishable at
this n" — comes from a function here that returns a :class:`Verdict`: the word, the sentence the page prints around
it, and the evidence it used (the numbers, their intervals, n). A difference inside its interval is never a
finding: the function says so instead. ``Used by:`` names the chapters that call each function.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import uncertainty
from .tables import rank_correlation
from .uncertainty import pts

UNDECIDED = "not distinguishable at this n"


@dataclass(frozen=True)
class Verdict:
    """A verdict word, the sentence a page prints around it, and the evidence behind it."""

    word: str
    sentence: str
    evidence: Any = field(default=None, compare=False)

    def __str__(self) -> str:
        return self.sentence

    @property
    def opening(self) -> str:
        """The sentence with a capital first letter, for a page that starts a sentence with it."""
        return self.sentence[:1].upper() + self.sentence[1:]


def n_text(n: int, draws: int, what: str = "masks") -> str:
    """``n = 100 questions per task, 3 masks``: what an interval rests on, for a caption or a sentence."""
    return f"n = {n} questions per task, {draws} {what if draws != 1 else what.rstrip('s')}"


# ---------------------------------------------------------------------------------------------- against a tolerance


def against_tolerance(low: float, high: float, tolerance: float) -> str:
    """A score change's interval against a loss of ``tolerance``: ``harmless`` (the interval excludes a loss larger
    than the tolerance), ``broken`` (it excludes a smaller one), else ``undecided``. Used by: every scored chapter."""
    relation = uncertainty.relation(uncertainty.Interval(math.nan, low, high), -tolerance)
    return {"above": "harmless", "below": "broken"}.get(relation, "undecided")


def breaking_point(changes, setting: str, *, tolerance: float = 0.02, subject: str = "the edit") -> Verdict:
    """Where an edit stops being harmless over ``setting`` (p, say), from ``changes``: the rows of
    ``uncertainty.change_table`` of one pair and method with ``task == "mean"`` (the mean score over tasks). At each
    value: harmless, broken or undecided (:func:`against_tolerance`). The word: ``breaks at p = …`` (the first broken
    value), ``harmless at every p measured``, or the undecided verdict. Used by: dare, dare_works, minilm."""
    rows = changes[changes.task == "mean"].sort_values(setting)
    status = [against_tolerance(lo, hi, tolerance) for lo, hi in zip(rows.low, rows.high)]
    evidence = rows.assign(status=status)[[setting, "value", "low", "high", "n", "draws", "status"]]
    values = list(evidence[setting])
    safe = None
    for value, s in zip(values, status):
        if s != "harmless":
            break
        safe = value
    broken_all = [v for v, s in zip(values, status) if s == "broken"]
    broken = broken_all[0] if broken_all else None
    open_ = [v for v, s in zip(values, status) if s == "undecided"]
    points, n = f"{100 * tolerance:.0f} points", n_text(int(rows.n.min()) if len(rows) else 0, _draws(rows))
    parts = []
    if safe is not None:
        parts.append(
            f"{subject} keeps the mean score within {points} of the post-trained model up to {setting} = {safe:g}"
        )
    else:
        parts.append(f"{subject} is not shown to stay within {points} of the post-trained model at any {setting}")
    if broken is not None:
        parts.append(f"loses more than {points} at {setting} = {', '.join(f'{v:g}' for v in broken_all)}")
    if open_:
        listed = ", ".join(f"{v:g}" for v in open_)
        parts.append(f"at {setting} = {listed} the interval straddles the tolerance ({UNDECIDED})")
    sentence = "; ".join(parts) + f" ({n}, {uncertainty.LEVEL:.0%} intervals)"
    word = (
        f"breaks at {setting} = {broken:g}"
        if broken is not None
        else f"harmless at every {setting} measured"
        if not open_
        else UNDECIDED
    )
    return Verdict(word, sentence, evidence)


def _draws(rows) -> int:
    return int(rows.draws.max()) if len(rows) else 0


def tolerance_grid(changes, index: str, columns: str, *, tolerance: float = 0.02, scope=None) -> Verdict:
    """Every setting of a two-way grid (p × k) against the tolerance (:func:`against_tolerance`): a table of
    ``harmless`` / ``broken`` / ``undecided`` and the counts, over the settings ``scope(row)`` keeps (all by
    default). The word: ``harmless at every setting``, ``broken at some setting`` or the undecided verdict.
    Used by: kfamily, reproduction."""
    rows = changes[changes.task == "mean"]
    if scope is not None and len(rows):
        rows = rows[[bool(scope(r)) for r in rows.itertuples()]]
    status = rows.assign(status=[against_tolerance(lo, hi, tolerance) for lo, hi in zip(rows.low, rows.high)])
    grid = status.pivot_table(index=index, columns=columns, values="status", aggfunc="first")
    counts = status.status.value_counts()
    harmless, broken, open_ = (int(counts.get(k, 0)) for k in ("harmless", "broken", "undecided"))
    n = n_text(int(rows.n.min()) if len(rows) else 0, _draws(rows))
    sentence = (
        f"of {len(status)} settings, {harmless} stay within {100 * tolerance:.0f} points of the post-trained model "
        f"(the interval excludes a larger loss), {broken} lose more, and at {open_} the interval straddles the "
        f"tolerance ({n})"
    )
    word = (
        "not measured"
        if status.empty
        else "broken at some setting"
        if broken
        else "harmless at every setting"
        if not open_
        else UNDECIDED
    )
    return Verdict(word, sentence, grid)


def gentlest(questions, at: str, over: str, *, method: str = "dare", **fixed) -> Verdict:
    """At each value of ``at`` (p), which value of ``over`` (k) keeps the mean score highest, by :func:`best` (a
    paired bootstrap of each difference): the sentence lists, per ``at``, the winner or that the best cannot be
    told from the others. Used by: kfamily."""
    rows = questions[questions.method == method]
    for column, value in fixed.items():
        rows = rows[rows[column] == value]
    parts, evidence = [], []
    for a in sorted(set(rows[at].dropna())):
        part = rows[rows[at] == a]
        found = best(part, {f"{over} = {v:g}": {over: v} for v in sorted(set(part[over].dropna()))})
        evidence.append({at: a, "best": found.word, "sentence": found.sentence})
        parts.append(f"at {at} = {a:g}: {found.word}")
    decided = [e for e in evidence if e["best"] != UNDECIDED]
    word = "none" if not decided else f"{len(decided)} of {len(evidence)}"
    return Verdict(word, "; ".join(parts) or "not measured", pd.DataFrame(evidence))


def survives(changes, setting: str, *, tolerance: float = 0.02, subject: str = "the edit") -> Verdict:
    """Does an edit stay within ``tolerance`` of the post-trained model at every value of ``setting`` (Table 1's
    k)? ``survives`` when every interval excludes a larger loss, ``does not survive`` when one excludes a smaller
    one, else the undecided verdict. Used by: randomness, reproduction."""
    rows = changes[changes.task == "mean"].sort_values(setting)
    status = [against_tolerance(lo, hi, tolerance) for lo, hi in zip(rows.low, rows.high)]
    evidence = rows.assign(status=status)[[setting, "value", "low", "high", "status"]]
    broken = [f"{v:g}" for v, st in zip(rows[setting], status) if st == "broken"]
    open_ = [f"{v:g}" for v, st in zip(rows[setting], status) if st == "undecided"]
    low = float(rows.value.min()) if len(rows) else math.nan
    points = f"{100 * tolerance:.0f} points"
    if rows.empty:
        return Verdict("not measured", f"{subject} was not measured", evidence)
    if broken:
        sentence = f"{subject} loses more than {points} at {setting} = {', '.join(broken)}"
        return Verdict("does not survive", sentence, evidence)
    if open_:
        sentence = (
            f"{subject} stays within {points} where the data can tell, but at {setting} = {', '.join(open_)} the "
            f"interval straddles the tolerance ({UNDECIDED}; the largest mean loss is {-100 * low:.1f} points)"
        )
        return Verdict(UNDECIDED, sentence, evidence)
    return Verdict(
        "survives", f"{subject} stays within {points} of the post-trained model at every {setting}", evidence
    )


def collapse(changes, setting: str, gain: float, *, subject: str = "the edit") -> Verdict:
    """Does an edit lose more than half of what post-training added (``gain``: post minus pre, in mean score) at its
    worst value of ``setting``? ``collapses`` when that setting's interval lies below −gain/2, ``does not
    collapse`` when above, else the undecided verdict. Used by: randomness, reproduction."""
    rows = changes[changes.task == "mean"]
    if rows.empty or not gain == gain:
        return Verdict("not measured", f"{subject} was not measured", rows)
    if gain <= 0:
        return Verdict("not measured", "post-training added nothing to the mean score, so nothing can collapse", rows)
    worst = rows.loc[rows.value.idxmin()]
    lost = -worst.value / gain if gain else math.nan
    where = uncertainty.relation(uncertainty.Interval(worst.value, worst.low, worst.high), -gain / 2)
    word = {"below": "collapses", "above": "does not collapse"}.get(where, UNDECIDED)
    sentence = (
        f"{subject} loses {lost:.0%} of what post-training added at its worst {setting} = {worst[setting]:g} "
        f"(a change of {pts(worst.value)} points, 95% interval {pts(worst.low)} to {pts(worst.high)})"
    )
    return Verdict(word, sentence, {"worst": worst.to_dict(), "gain": gain, "lost": lost})


# ---------------------------------------------------------------------------------------------- comparisons


def best(questions, candidates: dict[str, dict], *, higher: bool = True) -> Verdict:
    """Which of several edits scores best, and whether the data can tell: ``candidates`` maps a label to the
    columns that select its rows of ``questions`` (``uncertainty.draws``). The best by the mean score over tasks is
    compared with every other by a paired bootstrap of the difference; the word is the best's label when every
    difference excludes zero, else the undecided verdict with the candidates it cannot be told from.
    Used by: kfamily, bitdelta, structure, expo."""
    sides = {label: uncertainty.draws(questions, **where) for label, where in candidates.items()}
    sides = {label: d for label, d in sides.items() if d}
    if not sides:
        return Verdict("not measured", "not measured", pd.DataFrame())
    means = {
        label: np.mean([np.mean([np.mean(v) for v in d.values()]) for d in draws]) for label, draws in sides.items()
    }
    top = max(means, key=means.get) if higher else min(means, key=means.get)
    rows = []
    for label, draws in sides.items():
        diff = uncertainty.difference(sides[top], draws) if label != top else uncertainty.Interval(0.0, 0.0, 0.0)
        rows.append(
            {"candidate": label, "mean": means[label], "best minus": diff.value, "low": diff.low, "high": diff.high}
        )
    evidence = pd.DataFrame(rows)
    ties = [r["candidate"] for r in rows if r["candidate"] != top and not (r["low"] > 0 or r["high"] < 0)]
    if not ties:
        return Verdict(top, f"{top} scores best, and every difference with it excludes zero", evidence)
    listed = ", ".join(ties)
    return Verdict(UNDECIDED, f"{top} scores highest, but not distinguishably from {listed} ({UNDECIDED})", evidence)


def compare_settings(questions, a: str, b: str, setting: str, *, names: dict | None = None) -> Verdict:
    """Edit method ``a`` against method ``b`` at each value of ``setting`` (DARE against drop-only at each p): the
    difference of their mean scores over tasks, on the same questions, with a paired bootstrap interval (questions
    and both sides' masks resampled). The sentence says where ``a`` scores higher, where lower, and where the two
    cannot be told apart. Used by: dare."""
    names = names or {}
    label = {m: names.get(m, {"dare": "DARE", "drop_only": "drop-only"}.get(m, m)) for m in (a, b)}
    rows = []
    values = sorted(set(questions[questions.method.isin([a, b])][setting].dropna()))
    for value in values:
        diff = uncertainty.difference(
            uncertainty.draws(questions, method=a, **{setting: value}),
            uncertainty.draws(questions, method=b, **{setting: value}),
        )
        if diff.value == diff.value:
            rows.append({setting: value, "difference": diff.value, "low": diff.low, "high": diff.high, "n": diff.n})
    evidence = pd.DataFrame(rows, columns=[setting, "difference", "low", "high", "n"])
    higher = [f"{v:g}" for v, lo in zip(evidence[setting], evidence.low) if lo > 0]
    lower = [f"{v:g}" for v, hi in zip(evidence[setting], evidence.high) if hi < 0]
    open_ = [f"{v:g}" for v, lo, hi in zip(evidence[setting], evidence.low, evidence.high) if lo <= 0 <= hi]
    parts = []
    if higher:
        parts.append(f"{label[a]} scores higher than {label[b]} at {setting} = {', '.join(higher)}")
    if lower:
        parts.append(f"lower at {setting} = {', '.join(lower)}")
    if open_:
        both = "the two" if parts else f"{label[a]} and {label[b]}"
        parts.append(f"{both} cannot be told apart at {setting} = {', '.join(open_)} ({UNDECIDED})")
    word = (
        "higher" if higher and not lower else "lower" if lower and not higher else "mixed" if parts else "not measured"
    )
    return Verdict(word, "; ".join(parts) or "not measured", evidence)


def on_par(questions, a: dict, b: dict, *, tolerance: float = 0.02, labels=("a", "b")) -> Verdict:
    """Is edit ``a`` on par with edit ``b`` (each the columns that select its rows of ``questions``)? The difference
    of their mean scores with a paired bootstrap interval: ``on par`` when the interval lies within ± ``tolerance``
    (an equivalence test), ``differs`` when it excludes zero and reaches past the tolerance, else the undecided
    verdict. Used by: bitdelta, reproduction."""
    diff = uncertainty.difference(uncertainty.draws(questions, **a), uncertainty.draws(questions, **b))
    if diff.value != diff.value:
        return Verdict("not measured", f"{labels[0]} or {labels[1]} was not measured", diff)
    where = (
        f"{labels[0]} minus {labels[1]}: {pts(diff.value)} points "
        f"({pts(diff.low)} to {pts(diff.high)}, {n_text(diff.n, diff.draws, 'draws')})"
    )
    if -tolerance < diff.low and diff.high < tolerance:
        return Verdict("on par", f"on par within {100 * tolerance:.0f} points ({where})", diff)
    if (diff.low > 0 or diff.high < 0) and (diff.low >= tolerance or diff.high <= -tolerance):
        return Verdict("differs", f"they differ ({where})", diff)
    return Verdict(UNDECIDED, f"{UNDECIDED} ({where})", diff)


def against_post(low: float, high: float, tolerance: float) -> str:
    """A score change's interval against the post-trained model: ``above`` (it excludes zero from above),
    ``matches`` (it lies within ± ``tolerance``), ``below`` (it excludes a loss smaller than the tolerance), else
    ``undecided``. Used by: bitdelta, expo."""
    if low > 0:
        return "above"
    if -tolerance < low and high < tolerance:
        return "matches"
    if high < -tolerance:
        return "below"
    return "undecided"


def rank_verdict(x: Sequence[float], y: Sequence[float], *, what: str = "the order") -> Verdict:
    """Spearman's ρ of two sequences with its exact permutation p-value (two-sided; every permutation for n ≤ 8,
    20,000 random ones above): the word says whether ρ is distinguishable from no association at the 5% level.
    Used by: dare_works, kfamily, predicts."""
    both = pd.DataFrame({"x": list(x), "y": list(y)}).dropna()
    n = len(both)
    rho = rank_correlation(both.x, both.y)
    if n < 3 or rho != rho:
        return Verdict(UNDECIDED, f"too few points (n = {n}) for {what}", {"rho": rho, "n": n, "p": math.nan})
    rx, ry = both.x.rank().to_numpy(), both.y.rank().to_numpy()
    if n <= 8:
        perms = np.array(list(itertools.permutations(ry)))
    else:
        rng = np.random.default_rng(0)
        perms = np.array([rng.permutation(ry) for _ in range(20_000)])
    rx_c = rx - rx.mean()
    null = (perms - perms.mean(axis=1, keepdims=True)) @ rx_c
    null /= np.sqrt((rx_c**2).sum() * ((perms - perms.mean(axis=1, keepdims=True)) ** 2).sum(axis=1))
    p = float((np.abs(null) >= abs(rho) - 1e-12).mean())
    evidence = {"rho": rho, "n": n, "p": p}
    if p < 0.05:
        shown = f"< {1 / len(perms):.0e}" if p == 0 else f"= {p:.3f}"  # no permutation as extreme: p below 1/draws
        return Verdict("orders", f"ρ = {rho:+.2f} (n = {n}, permutation test: P {shown})", evidence)
    return Verdict(UNDECIDED, f"ρ = {rho:+.2f} (n = {n}, permutation test: P = {p:.2f}: {UNDECIDED})", evidence)


def curve_shape(values, *, what: str = "the curve") -> Verdict:
    """The shape of a curve over α ≥ 0 (a Series indexed by α, starting at 0): whether it falls below its start and
    where it is lowest, and whether it crosses zero again past the minimum (``tables.turn_and_cross``). The paper's
    Figure 6 is U-shaped: it falls to a trough and rises above zero within α ≤ 0.6. Used by: expo."""
    from .tables import turn_and_cross

    values = values.sort_index()
    if len(values) < 2:
        return Verdict("not measured", f"{what} was not measured", values)
    low, minimum, cross = turn_and_cross(values)
    top = float(values.index.max())
    if minimum >= values.iloc[0]:
        return Verdict("rises", f"{what} does not fall below its value at α = 0 anywhere up to α = {top:g}", values)
    if low == top:
        return Verdict(
            "falls",
            f"{what} falls all the way to α = {top:g} (its lowest, {minimum:.3g}): no trough in this range",
            values,
        )
    crossing = f"crosses zero again at α ≈ {cross:.2f}" if cross == cross else f"has not crossed zero by α = {top:g}"
    return Verdict(
        "U-shaped" if cross == cross else "turns",
        f"{what} is lowest at α = {low:g} ({minimum:.3g}) and {crossing}",
        values,
    )


def lowest_point(values, *, what: str = "the curve") -> Verdict:
    """Where a curve over α (a Series indexed by α, 0 among them: the post-trained model) is lowest: at α = 0, on the
    interpolation side (α < 0) or past the post-trained model (α > 0), and by how much below its value at 0.
    Used by: expo."""
    values = values.sort_index()
    if values.empty or 0.0 not in values.index:
        return Verdict("not measured", f"{what} was not measured at α = 0", values)
    low, below = float(values.idxmin()), float(values[0.0] - values.min())
    if low == 0.0:
        return Verdict("at post", f"{what} is lowest at the post-trained model itself (α = 0)", values)
    side = "toward the pre-trained model" if low < 0 else "past the post-trained model"
    return Verdict(side, f"{what} is lowest at α = {low:g}, {side}, {below:.3g} nats below its value at α = 0", values)


def interpolation_or_extrapolation(questions, pair: str, *, tolerance: float = 0.0) -> Verdict:
    """Per task of ``pair``, the best interpolation (α < 0) against the best extrapolation (α > 0) along the delta:
    the difference of the two models' scores on the task's questions, with a paired bootstrap interval. The better
    side is named where the interval excludes zero, else the undecided verdict. Both are picked as the best of
    several α after looking, so the interval is optimistic about the winner's margin. Used by: expo."""
    rows = questions[(questions.pair == pair) & (questions.method == "extrapolate")]
    evidence = []
    for task, part in rows.groupby("task", sort=True):
        by_alpha = part.groupby("alpha").value.mean()
        inter, extra = by_alpha[by_alpha.index < 0], by_alpha[by_alpha.index > 0]
        if inter.empty or extra.empty:
            continue
        a_in, a_ex = float(inter.idxmax()), float(extra.idxmax())
        diff = uncertainty.difference(uncertainty.draws(part, alpha=a_in), uncertainty.draws(part, alpha=a_ex))
        better = "interpolation" if diff.low > 0 else "extrapolation" if diff.high < 0 else UNDECIDED
        evidence.append({"task": task, "best α < 0": a_in, "best α > 0": a_ex, "interpolation minus extrapolation":
                         diff.value, "low": diff.low, "high": diff.high, "better": better})  # fmt: skip
    evidence = pd.DataFrame(evidence)
    if evidence.empty:
        return Verdict("not measured", "not measured", evidence)
    counts = evidence.better.value_counts()
    inter, extra, open_ = (int(counts.get(k, 0)) for k in ("interpolation", "extrapolation", UNDECIDED))
    sentence = (
        f"interpolation is distinguishably better on {inter} of {len(evidence)} tasks, extrapolation on {extra}, "
        f"and on {open_} the two cannot be told apart"
    )
    word = "interpolation" if inter > extra else "extrapolation" if extra > inter else UNDECIDED
    return Verdict(word, sentence, evidence)


def sign_prediction(edits) -> Verdict:
    """Does the sign of the term predict the direction of the score change? ``edits``: one row per edit with its
    mean ``term`` and its change of the mean score with an interval (``value``, ``low``, ``high``). An edit's score
    moved *down* (*up*) when its interval excludes zero from below (above). Among the edits that moved: the share the
    term's sign called right (positive: down), the majority baseline (always guessing the commoner direction) and
    the balanced accuracy (the mean of the two directions' hit rates, 0.5 for a coin). Used by: predicts."""
    moved = np.where(edits.high < 0, "down", np.where(edits.low > 0, "up", "unchanged"))
    sign = np.where(edits.term > 0, "term > 0", "term < 0")
    table = pd.crosstab(pd.Series(sign, name="term"), pd.Series(moved, name="score"))
    table = table.reindex(index=["term > 0", "term < 0"], columns=["down", "unchanged", "up"], fill_value=0)
    down, up = int(table["down"].sum()), int(table["up"].sum())
    hits = int(table.loc["term > 0", "down"] + table.loc["term < 0", "up"])
    n = down + up
    accuracy = hits / n if n else math.nan
    baseline = max(down, up) / n if n else math.nan
    recalls = [
        table.loc["term > 0", "down"] / down if down else math.nan,
        table.loc["term < 0", "up"] / up if up else math.nan,
    ]
    balanced = float(np.nanmean(recalls)) if n else math.nan
    evidence = {"table": table, "moved": n, "accuracy": accuracy, "baseline": baseline, "balanced": balanced}
    evidence.update(negative_down=int(table.loc["term < 0", "down"]), negative_up=int(table.loc["term < 0", "up"]))
    if not n:
        return Verdict("not measured", "no edit moved the mean score distinguishably", evidence)
    better = accuracy > baseline
    sentence = (
        f"of the {n} edits whose mean score moved distinguishably ({down} down, {up} up), the sign of the term called "
        f"the direction of {hits} ({accuracy:.0%}), against {baseline:.0%} for always guessing the commoner direction; "
        f"its balanced accuracy is {balanced:.0%} (0.5 for a coin)"
    )
    return Verdict("better than the baseline" if better else "no better than the baseline", sentence, evidence)


# ---------------------------------------------------------------------------------------------- the expectation


def expectation_check(trials, by: Sequence[str] = ("p",), points: int = 5) -> Verdict:
    """The expectation argument, stated exactly, on a random mean-zero edit measured at several masks per setting
    (``tables.per_trial`` rows with ``first_order``, ``term``, ``second_order``, ``loss_change``). Only the t = 0 node
    ⟨∇L(W_post), D⟩ has zero mean; the left sum's other nodes see the curvature, so E[term] = (C − 1)/(2C)·E[DᵀHD] and
    E[ΔL] = ½·E[DᵀHD] to second order. Per setting: the t = 0 term's mean and t-interval over masks, the term's and
    the exact change's ratio to E[DᵀHD] (``second_order`` is ½DᵀHD) beside (C − 1)/(2C) and ½. The word: how many
    settings' t = 0 intervals contain 0. Used by: dare, kfamily."""
    predicted = (points - 1) / (2 * points)
    rows = []
    for key, g in trials.groupby(list(by), sort=True):
        first, term = uncertainty.mean_interval(g.first_order), uncertainty.mean_interval(g.term)
        dhd = 2 * g.second_order.mean()
        rows.append(
            {
                **dict(zip(by, key if isinstance(key, tuple) else (key,))),
                "masks": len(g),
                "t=0 mean": first.value,
                "t=0 low": first.low,
                "t=0 high": first.high,
                "t=0 contains 0": bool(first.low <= 0 <= first.high) if first.low == first.low else None,
                "term mean": term.value,
                "term low": term.low,
                "term high": term.high,
                "term / DᵀHD": g.term.mean() / dhd if dhd else math.nan,
                "ΔL / DᵀHD": g.loss_change.mean() / dhd if dhd else math.nan,
            }
        )
    evidence = pd.DataFrame(rows)
    tested = evidence["t=0 contains 0"].dropna() if len(evidence) else pd.Series(dtype=bool)
    zero = int(tested.sum())
    ratio = evidence["term / DᵀHD"].median() if len(evidence) else math.nan
    above = int((evidence["term low"] > 0).sum()) if len(evidence) else 0
    sentence = (
        f"the t = 0 term's interval contains zero at {zero} of {len(tested)} settings, while the C = {points} term's "
        f"lies above zero at {above}; the term is {ratio:.2f}·E[DᵀHD] at the median setting, against "
        f"(C − 1)/(2C) = {predicted:.2f} predicted"
    )
    word = "holds" if len(tested) and zero == len(tested) else "fails" if len(tested) else "not tested"
    return Verdict(word, sentence, evidence)


# ---------------------------------------------------------------------------------------------- summaries


def kfamily_pattern(drops) -> dict:
    """The paper's pattern for the k-family on one pair's drops (columns p, k, drop, relative_d), every ρ computed
    the same way — within each p, then averaged over p — so they compare: ρ(|k|, drop), ρ(‖D‖/‖ΔW‖, drop) and
    ρ(|1 − k|·√(p/(1−p)), drop) (the size of D the variance argument predicts); ρ(p, spread over k); and the share
    of drop rates at which the worst k is negative. Used by: kfamily."""
    by_p = drops.groupby("p")
    within = {
        "rho_abs_k": [rank_correlation(g.k.abs(), g["drop"]) for _, g in by_p],
        "rho_relative_d": [rank_correlation(g.relative_d, g["drop"]) for _, g in by_p],
        "rho_predicted": [rank_correlation((1 - g.k).abs(), g["drop"]) for _, g in by_p],
    }
    spread = by_p["drop"].agg(lambda d: d.max() - d.min())
    worst = by_p.apply(lambda g: g.loc[g["drop"].idxmax(), "k"], include_groups=False)
    out = {k: float(np.nanmean(v)) if len(v) and not np.all(np.isnan(v)) else math.nan for k, v in within.items()}
    out["rho_p_spread"] = rank_correlation(spread.index, spread.to_numpy())
    out["negative_worst"] = float((worst < 0).mean()) if len(worst) else math.nan
    return out


def share_verdict(share, partly: float = 0.5, full: float = 0.8) -> str:
    """reproduced / partly / not reproduced, from a share of agreeing cases (≥ ``full``, ≥ ``partly``).
    Used by: reproduction."""
    if share != share:
        return "not tested"
    return "reproduced" if share >= full else "partly" if share >= partly else "not reproduced"
