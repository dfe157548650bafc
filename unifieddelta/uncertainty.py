"""How sure a number is: intervals for the book's score changes and for means over random masks.

A score change against the post-trained model is measured on the same questions for both models, so its noise is
the noise of the questions the two answer differently, not of each score alone: :func:`paired_change` resamples the
questions (the same ones for both models: a paired bootstrap) and, when the edit was drawn with several masks or
seeds, the masks too, so its interval holds both sources of noise. :func:`mean_interval` is Student's t interval of
a mean over masks, for terms and loss changes. :func:`relation` says where an interval lies against a threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

#: The confidence of every interval the book prints.
LEVEL = 0.95
BOOTSTRAP = 2000  # resamples of a paired bootstrap


def pts(share: float) -> str:
    """A share as signed points with one decimal; a value that rounds to zero reads ``0.0``, not ``-0.0``."""
    text = f"{100 * share:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval: ``value`` in [``low``, ``high``] at confidence ``level``, from ``n`` questions
    (per task, the smallest task's count) and ``draws`` masks or seeds."""

    value: float
    low: float
    high: float
    n: int = 0
    draws: int = 1
    level: float = LEVEL

    def __str__(self) -> str:
        return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"

    @property
    def width(self) -> float:
        return self.high - self.low

    def points(self) -> str:
        """In points (hundredths of a share correct): ``−3.1 (−5.0 to −1.2)``."""
        return f"{pts(self.value)} ({pts(self.low)} to {pts(self.high)})"


NAN = Interval(math.nan, math.nan, math.nan, 0, 0)


def paired_change(
    post: Mapping[str, Sequence[float]],
    edited: Sequence[Mapping[str, Sequence[float]]],
    *,
    boot: int = BOOTSTRAP,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """The change of the mean score over tasks, edited minus post, with a paired bootstrap interval.

    ``post``: task -> the post-trained model's score on each question (0/1, or any per-question value);
    ``edited``: one such mapping per mask or seed of the edit, on the same questions in the same order. The estimate
    is the mean over tasks (each task weighs the same) of the mean over masks of the mean change per question. Each
    resample draws the questions of every task with replacement — the same ones for post and for every mask — and,
    with several masks, the masks with replacement."""
    return difference(edited, [post], boot=boot, level=level, seed=seed)


def difference(
    a: Sequence[Mapping[str, Sequence[float]]],
    b: Sequence[Mapping[str, Sequence[float]]],
    *,
    boot: int = BOOTSTRAP,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """Mean score over tasks of ``a`` minus that of ``b``, each a list of draws (masks or seeds) of per-question
    scores on the same questions, with a paired bootstrap interval: each resample draws the questions (shared by
    both sides) and, on each side with several draws, its draws."""
    tasks = [t for t in (a[0] if a else {}) if all(t in d for d in [*a, *b])] if b else []
    if not tasks:
        return NAN
    rng = np.random.default_rng(seed)
    weights = [_draw_weights(rng, len(side), boot) for side in (a, b)]  # boot × draws, per side
    value, stats = 0.0, np.zeros(boot)
    for t in tasks:
        sides = [np.stack([np.asarray(d[t], dtype=float) for d in side]) for side in (a, b)]  # draws × questions
        n = sides[0].shape[1]
        if any(x.shape[1] != n for x in sides):
            raise ValueError(f"task {t}: the two sides have {sides[0].shape[1]} and {sides[1].shape[1]} questions")
        value += sides[0].mean() - sides[1].mean()
        questions = rng.multinomial(n, [1 / n] * n, size=boot) / n  # boot × n, shared by both sides
        for sign, x, w in ((1.0, sides[0], weights[0]), (-1.0, sides[1], weights[1])):
            stats += sign * ((questions @ x.T) * w).sum(axis=1)
    value, stats = value / len(tasks), stats / len(tasks)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    # sums of shares in another order: an end a rounding error past the estimate is the estimate
    low, high = (value if abs(low - value) < EPS else low), (value if abs(high - value) < EPS else high)
    n = min(len(np.asarray(a[0][t])) for t in tasks)
    return Interval(float(value), float(low), float(high), n, len(a), level)


def _draw_weights(rng, draws: int, boot: int) -> np.ndarray:
    """boot × draws weights of the draws in each resample (multinomial counts / draws; all 1 for one draw)."""
    if draws == 1:
        return np.ones((boot, 1))
    return rng.multinomial(draws, [1 / draws] * draws, size=boot) / draws


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """The mean of ``values`` (one per mask or seed) with Student's t interval; a single value has no interval
    (NaN bounds), and an empty sequence gives NaN."""
    x = np.asarray([v for v in values if v == v], dtype=float)
    if len(x) == 0:
        return NAN
    if len(x) == 1:
        return Interval(float(x[0]), math.nan, math.nan, 0, 1, level)
    from scipy import stats

    half = stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return Interval(float(x.mean()), float(x.mean() - half), float(x.mean() + half), 0, len(x), level)


#: Floating-point slack: an interval end closer than this to the estimate is the estimate.
EPS = 1e-12


def relation(interval: Interval, threshold: float) -> str:
    """Where an interval lies against ``threshold``: ``"above"`` (its low end is above), ``"below"`` (its high end
    is below), or ``"straddles"`` (the threshold is inside it: not distinguishable at this n). An interval without
    bounds (one draw, no questions) is compared by its value alone."""
    low, high = (interval.low, interval.high) if interval.low == interval.low else (interval.value, interval.value)
    if low > threshold:
        return "above"
    if high < threshold:
        return "below"
    return "straddles"


def change_table(questions, by: Sequence[str], *, per_task: bool = False, boot: int = BOOTSTRAP, level: float = LEVEL):
    """Per pair and group of ``by`` columns (an edit's settings; its seeds are the draws), the paired change of the
    mean score over tasks against the pair's post-trained model (its α = 0 reference trial, scored the same way),
    with its interval (:func:`paired_change`). ``questions`` is ``experiments.question_table``. Columns: pair, the
    ``by`` columns, ``edit``, ``task`` (``"mean"``, or each task with ``per_task``), value, low, high, n (questions
    per task, the fewest), draws. Used by: every chapter with scores."""
    import pandas as pd

    rows = []
    columns = [*by, "edit"] if "edit" not in by else list(by)  # one edit per group: its seeds are the draws
    if questions.empty:
        return pd.DataFrame(columns=["pair", *columns, "task", "value", "low", "high", "n", "draws"])
    for (pair, _scoring), part in questions.groupby(["pair", "scoring"], sort=False):
        post = _reference(part)
        if not post:
            continue
        for key, group in part.groupby(columns, sort=True, dropna=False):
            draws = [_by_task(g) for _, g in group.groupby("seed", sort=True)]
            targets = [("mean", post)] + ([(t, {t: post[t]}) for t in post] if per_task else [])
            for task, base in targets:
                edited = [{t: d[t] for t in base if t in d} for d in draws]
                est = paired_change(base, edited, boot=boot, level=level)
                rows.append({"pair": pair, **dict(zip(columns, key)), "task": task, **_fields(est)})
    return pd.DataFrame(rows, columns=["pair", *columns, "task", "value", "low", "high", "n", "draws"])


def _reference(part) -> dict:
    """The post-trained model's per-question scores (the α = 0 extrapolation trial) of one pair and scoring."""
    alpha = part["alpha"] if "alpha" in part else None
    if alpha is None:
        return {}
    post = part[(part.method == "extrapolate") & (alpha == 0.0)]
    return _by_task(post) if len(post) else {}


def _by_task(rows) -> dict:
    """task -> its per-question values in question order, from rows of one trial."""
    return {t: g.sort_values("question")["value"].to_numpy(dtype=float) for t, g in rows.groupby("task", sort=False)}


def _fields(est: Interval) -> dict:
    return {"value": est.value, "low": est.low, "high": est.high, "n": est.n, "draws": est.draws}


def draws(questions, **where) -> list[dict]:
    """The per-question scores of one edit as a list of draws (one per seed or mask), each task -> values in
    question order: the rows of ``questions`` (``experiments.question_table``) whose columns equal ``where``."""
    rows = questions
    for column, value in where.items():
        rows = rows[rows[column] == value] if value == value else rows[rows[column].isna()]
    return [_by_task(g) for _, g in rows.groupby("seed", sort=True)]
