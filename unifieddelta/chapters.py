"""What each chapter of the book measures, and the summaries its page shows.

One plan function per notebook (``PLANS``) turns the notebook's parameters into the trials it runs and the pairs it
uses, without running anything: the notebook calls it, and so does ``unifieddelta book --dry-run``, which reads the
parameters from the notebook's parameters cell and the profile. The parameters cell is the one place a chapter's
grid is written; the plan functions have no defaults of their own. ``smoke=True`` shrinks every grid to its first
and last values, one seed and a few documents, on the zoo's smoke recipes (the test suite runs every notebook so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from . import experiments
from .experiments import Pair, Trial

ALL = ("term", "loss_change", "second_order", "scores")


@dataclass
class Plan:
    """A chapter's trials and pairs. ``run`` measures what the store lacks and returns the tidy table."""

    name: str
    trials: list[Trial]
    pairs: list[Pair] = field(default_factory=list)

    def __post_init__(self):
        self.pairs = list(dict.fromkeys([*self.pairs, *(t.pair for t in self.trials)]))

    def run(self, *, store=None, progress: bool = True, per_tensor: bool = False):
        return experiments.run(self.trials, store=store, progress=progress, per_tensor=per_tensor)

    def stored(self, store=None) -> tuple[int, int]:
        return experiments.stored(self.trials, store)


PLANS: dict[str, Callable[..., Plan]] = {}


def _chapter(fn: Callable[..., list[Trial] | Plan]) -> Callable[..., Plan]:
    def plan(**params) -> Plan:
        out = fn(**params)
        return out if isinstance(out, Plan) else Plan(fn.__name__, out)

    plan.__name__, plan.__doc__ = fn.__name__, fn.__doc__
    PLANS[fn.__name__] = plan
    return plan


def plan(name: str, **params) -> Plan:
    """The plan of the notebook ``name`` for these parameters (its parameters cell, with the profile's values)."""
    if name not in PLANS:
        return Plan(name, [])  # a page that measures nothing (the citation page, say)
    return PLANS[name](**params)


# ---------------------------------------------------------------------------------------------- shared pieces


def _pair(pair: str, pre: str, post: str, smoke: bool, loss_data: str = "") -> Pair:
    if pre or post:
        return experiments.pair(pre=pre or None, post=post or None, loss_data=loss_data or None)
    return experiments.pair(pair, smoke=smoke)


def _measure(tasks, limit, device, dtype, smoke, fewshot=None) -> dict:
    return dict(tasks=tasks, limit=min(limit or 4, 4) if smoke else limit, device=device, dtype=dtype,
                fewshot=fewshot or None)


def shrink(values: Sequence, smoke: bool) -> list:
    """The first and the last value in smoke mode, else all of them."""
    values = list(values)
    return values if not smoke or len(values) <= 2 else [values[0], values[-1]]


def _edits(items) -> list[tuple[str, dict]]:
    """``[["dare", {"p": 0.5}], "bitdelta", ...]`` -> ``[("dare", {"p": 0.5}), ("bitdelta", {})]``."""
    return [(e, {}) if isinstance(e, str) else (e[0], dict(e[1])) for e in items]


# ---------------------------------------------------------------------------------------------- the chapters


@_chapter
def delta(*, pair, compare, pre, post, smoke, **_) -> Plan:
    """What post-training changes: statistics of the deltas of ``pair`` (or of pre/post) and the ``compare`` pairs
    (no trials)."""
    first = _pair(pair, pre, post, smoke)
    return Plan("delta", [], [first, *(experiments.pair(p, smoke=smoke) for p in compare)])


@_chapter
def identity(*, pair, pre, post, loss_data, edits, rules, points, seeds, device, dtype, smoke, **_) -> list[Trial]:
    """The exact loss change against the approximation term for each rule and number of points, for the paper's
    five edits; the paper's left C = 5 in jvp mode too (its cost against grad mode); per-tensor terms."""
    p = _pair(pair, pre, post, smoke, loss_data)
    m = dict(device=device, dtype=dtype)
    trials = []
    for method, params in _edits(edits):
        for seed in seeds[:1] if smoke else seeds:
            trials.append(experiments.trial(p, method, params, seed, measure=("loss_change", "second_order"), **m))
            trials.append(experiments.trial(p, method, params, seed, measure=("term",), mode="jvp", **m))
            trials.append(experiments.trial(p, method, params, seed, measure=("term",), **m))  # the paper's term
            for rule in shrink(rules, smoke):
                for c in shrink(points, smoke):
                    if rule == "trapezoid" and c < 2:
                        continue
                    trials.append(experiments.trial(p, method, params, seed, measure=("term",), rule=rule,
                                                    points=int(c), **m))  # fmt: skip
    return trials


@_chapter
def dare(*, pair, pre, post, loss_data, tasks, limit, fewshot, seeds, ps, methods, device, dtype, smoke,
         **_) -> list[Trial]:  # fmt: skip
    """DARE (k = 0) against drop-only over the drop rate p: every quantity, at several seeds."""
    p = _pair(pair, pre, post, smoke, loss_data)
    m = _measure(tasks, limit, device, dtype, smoke, fewshot)
    trials = experiments.references(p, measure=ALL, **m)
    for method in methods:
        trials += experiments.grid(p, method, {"p": shrink(ps, smoke)}, seeds[:1] if smoke else seeds,
                                   measure=ALL, **m)  # fmt: skip
    return trials


@_chapter
def classification(*, chapters, smoke, **_) -> Plan:
    """Every trial the other chapters measure (``chapters``: notebook name -> its parameters, given by the
    profile), to be sorted by the sign of the term."""
    trials = []
    for name, params in chapters.items():
        trials += plan(name, **{**params, "smoke": smoke or params.get("smoke", False)}).trials
    return Plan("classification", list(dict.fromkeys(trials)))


# ---------------------------------------------------------------------------------------------- summaries


def glue(name: str, value) -> None:
    """``myst_nb.glue`` for a page's text (not displayed where computed): numpy scalars become Python numbers,
    which the text's ``{glue:text}`` roles can format; None becomes NaN."""
    from myst_nb import glue as myst_glue

    if value is None:
        value = math.nan
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    myst_glue(name, value, display=False)


def delta_table(pairs: Sequence[Pair]):
    """``deltas.delta_stats`` of each pair, one row per tensor, with the pair's name and each tensor's kind."""
    import pandas as pd

    from . import deltas

    frames = []
    for p in pairs:
        pre, post = p.folders()
        stats = deltas.delta_stats(pre, post)
        frames.append(stats.assign(pair=p.name, kind=stats["name"].map(deltas.tensor_kind)))
    return pd.concat(frames, ignore_index=True)


def delta_samples(pairs: Sequence[Pair], per_tensor: int = 20_000, seed: int = 0):
    """log10 |ΔW_ij| of up to ``per_tensor`` nonzero entries of each tensor (drawn with a seeded generator), with
    the pair and the tensor's kind: the distributions of the delta's entries."""
    import numpy as np
    import pandas as pd

    from . import deltas

    rng = np.random.default_rng(seed)
    frames = []
    for p in pairs:
        pre, post = p.folders()
        for name, d in deltas.iter_deltas(pre, post):
            x = d.abs().flatten()
            x = x[x > 0].numpy()
            if len(x) > per_tensor:
                x = rng.choice(x, per_tensor, replace=False)
            frames.append(pd.DataFrame({"pair": p.name, "kind": deltas.tensor_kind(name), "log10_abs": np.log10(x)}))
    return pd.concat(frames, ignore_index=True)


def per_trial(frame, pair: str | None = None):
    """One row per trial: its edit and settings, and the paper's left C = 5 term (grad mode), the first-order term,
    the exact change, the second-order term, ‖D‖, and the score change against post (mean over tasks)."""
    import pandas as pd

    frame = frame if pair is None else frame[frame.pair == pair]
    settings = [c for c in frame.columns if c not in experiments.COLUMNS]
    keys = ["pair", "method", "edit", "seed", "trial"]
    base = frame.drop_duplicates("trial")[keys + settings].set_index("trial")
    left = (frame.quantity != "term") | ((frame["rule"] == "left") & (frame["points"] == 5) & (frame["mode"] == "grad"))
    values = frame[left & frame.quantity.isin(["term", "first_order", "loss_change", "second_order", "d_norm",
                                               "loss"])].pivot_table(index="trial", columns="quantity",
                                                                     values="value", aggfunc="first")
    out = base.join(values)
    s = experiments.scores(frame)
    changes = {}
    for name, group in s.groupby("pair"):
        post = reference_scores(frame, name)["post"]
        for trial, rows in group.groupby("trial"):
            rows = rows[rows.task.isin(post.index)]
            changes[trial] = float((rows.value.to_numpy() - post[rows.task].to_numpy()).mean()) if len(rows) else math.nan
    out["score_change"] = pd.Series(changes)
    return out.reset_index()


def rule_errors(frame):
    """Per edit, rule and number of points: the term (mean over seeds), the exact change, and the relative error
    |term − ΔL| / |ΔL| of the quadrature (grad mode)."""
    terms = frame[(frame.quantity == "term") & (frame["mode"] == "grad")]
    exact = frame[frame.quantity == "loss_change"].groupby(["pair", "edit", "seed"])["value"].first()
    rows = terms.assign(loss_change=[exact.get((r.pair, r.edit, r.seed), math.nan) for r in terms.itertuples()])
    rows = rows.assign(error=(rows["value"] - rows["loss_change"]).abs() / rows["loss_change"].abs())
    out = rows.groupby(["pair", "edit", "rule", "points"], sort=False)[["value", "loss_change", "error"]].mean()
    return out.rename(columns={"value": "term"}).reset_index()


def reference_scores(frame, pair: str | None = None) -> dict:
    """{"pre": task -> score, "post": task -> score}: the scores of α = −1 and α = 0 (the reference trials)."""
    s = experiments.scores(frame)
    if pair is not None:
        s = s[s.pair == pair]
    ext = s[s.method == "extrapolate"]
    return {name: ext[ext.alpha == alpha].groupby("task")["value"].mean() for name, alpha in (("pre", -1.0), ("post", 0.0))}


def safe_until(frame, method: str, setting: str, *, tolerance: float = 0.02, pair: str | None = None) -> dict:
    """Where an edit stops being harmless: for each value of ``setting`` (in increasing order), the worst task's
    mean score drop against post (mean over seeds), and the largest value before the first one at which some task
    loses more than ``tolerance``. Returns {"largest_safe": value or None, "first_broken": value or None,
    "worst_drop": Series setting -> drop}."""
    s = experiments.scores(frame)
    if pair is not None:
        s = s[s.pair == pair]
    post = reference_scores(frame, pair)["post"]
    rows = s[s.method == method]
    means = rows.groupby([setting, "task"])["value"].mean().unstack("task")
    drop = (post[means.columns] - means).max(axis=1).sort_index()
    largest, broken = None, None
    for value, worst in drop.items():
        if worst > tolerance + 1e-12:
            broken = value
            break
        largest = value
    return {"largest_safe": largest, "first_broken": broken, "worst_drop": drop}


#: The paper's classes, by the sign of the term (§4-6): its claim for each edit, where it makes one.
PAPER_CLASS = {"dare": "competitive", "drop_only": "decreased", "bitdelta": "decreased", "low_rank": "decreased",
               "magnitude_trim": "decreased"}


def paper_class(method: str, params: dict, kind: str) -> str | None:
    """The class the paper puts an edit in: competitive (term ≈ 0), decreased (> 0) or improved (< 0); None where
    it makes no claim (interpolation, EXPO off alignment data, the identity)."""
    if method == "extrapolate":
        return "improved" if params.get("alpha", 0) > 0 and kind == "dpo" else None
    return PAPER_CLASS.get(method)


def our_class(term: float, loss: float, tolerance: float = 0.01, sd: float = math.nan, n: int = 1) -> str:
    """competitive when the term is about zero — |term| below ``tolerance`` × the loss at W_post, or, for a random
    edit measured at n > 1 seeds, its mean within two standard errors of zero (the paper's claim is about the
    expectation over masks) —, else decreased (> 0) or improved (< 0)."""
    if not math.isfinite(term):
        return "—"
    if abs(term) <= tolerance * abs(loss) or (n > 1 and math.isfinite(sd) and abs(term) <= 2 * sd / math.sqrt(n)):
        return "competitive"
    return "decreased" if term > 0 else "improved"


def disagreements(classes) -> str:
    """The rows where our class differs from the paper's, in a few words per pair and method."""
    bad = classes[classes.agree == "no"]
    parts = []
    for (pair, method), rows in bad.groupby(["pair", "method"], sort=False):
        settings = ", ".join(e[len(method) + 1:-1] or "default settings" for e in rows.edit)
        parts.append(f"{method} on {pair} at {settings} ({'/'.join(rows.ours.unique())}; the paper: {rows.paper.iloc[0]})")
    return "; ".join(parts) or "none"


def classify(frame, trials: Sequence[Trial], *, rule: str = "left", points: int = 5, tolerance: float = 0.01):
    """One row per pair and edit (settings, seeds averaged): the term (the paper's rule unless asked otherwise),
    the exact change, the mean score change against post, our class by the term's sign, the paper's class, and
    whether they agree."""
    import pandas as pd

    kinds = {t.pair.name: t.pair.kind for t in trials}
    params = {t.key: t.params for t in trials}
    terms = frame[(frame.quantity == "term") & (frame["rule"] == rule) & (frame["points"] == points)
                  & (frame["mode"] == "grad")]  # fmt: skip
    loss = frame[frame.quantity == "loss"].groupby("pair")["value"].first()
    change = frame[frame.quantity == "loss_change"].groupby(["pair", "edit"])["value"].mean()
    s = experiments.scores(frame)
    rows = []
    for (pair_name, edit), group in terms.groupby(["pair", "edit"], sort=False):
        method = group.method.iloc[0]
        setting = params[group.trial.iloc[0]]
        if method == "extrapolate" and setting.get("alpha") in (0.0, -1.0):
            continue  # the reference models
        post = reference_scores(frame, pair_name)["post"]
        edited = s[(s.pair == pair_name) & (s.edit == edit)].groupby("task")["value"].mean()
        score_change = float((edited - post[edited.index]).mean()) if len(edited) and len(post) else math.nan
        term = float(group.value.mean())
        sd = float(group.value.std()) if len(group) > 1 else math.nan
        ours = our_class(term, float(loss.get(pair_name, math.nan)), tolerance, sd, len(group))
        theirs = paper_class(method, setting, kinds.get(pair_name, "lm"))
        rows.append({"_trial": group.trial.iloc[0], "pair": pair_name, "edit": edit, "method": method,
                     "seeds": group.seed.nunique(), "term": term,
                     "term_sd": sd,
                     "loss_change": float(change.get((pair_name, edit), math.nan)), "score_change": score_change,
                     "ours": ours, "paper": theirs or "—",
                     "agree": "—" if theirs is None else ("yes" if theirs == ours else "no")})
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=["pair", "edit", "method", "seeds", "term", "term_sd", "loss_change",
                                     "score_change", "ours", "paper", "agree"])
    order = {m: i for i, m in enumerate(["dare", "drop_only", "bitdelta", "low_rank", "magnitude_trim",
                                         "extrapolate", "sign_biased", "product_biased"])}
    out["_order"] = out.method.map(lambda m: order.get(m, len(order)))
    out["_value"] = [tuple(v for _, v in sorted(params[t].items()) if isinstance(v, (int, float)))
                     for t in out.pop("_trial")]  # settings in numeric order: p = 0.1, 0.2, ...
    return out.sort_values(["pair", "_order", "_value"]).drop(columns=["_order", "_value"]).reset_index(drop=True)
