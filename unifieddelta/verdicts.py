"""The paper's claims, and the verdicts the book gives on them: each computed from the tidy table by one function.

Reducers of the tidy table that decide something — a class, where an edit breaks, whether a pattern holds — live
here rather than in ``tables``, so every verdict word a page prints comes from one tested place. ``Used by:``
names the chapters that call each function.
"""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

from . import experiments
from .tables import is_reference, paper_terms, rank_correlation, reference_scores

#: The paper's classes, by the sign of the term (§4-6): its claim for each edit, where it makes one.
PAPER_CLASS = {
    "dare": "competitive",
    "drop_only": "decreased",
    "bitdelta": "decreased",
    "low_rank": "decreased",
    "magnitude_trim": "decreased",
    "sign_biased": "competitive",
    "product_biased": "decreased",
}
#: The order the classification lists methods in.
METHOD_ORDER = [
    "dare",
    "drop_only",
    "bitdelta",
    "low_rank",
    "magnitude_trim",
    "extrapolate",
    "sign_biased",
    "product_biased",
]


def paper_class(method: str, params: dict, kind: str) -> str | None:
    """The class the paper puts an edit in: competitive (term ≈ 0), decreased (> 0) or improved (< 0); None where
    it makes no claim (interpolation, EXPO off alignment data, the identity). DARE with any k (§4.2) and the
    sign-biased edit (Table 1) keep performance; the product-biased edit (Table 1) destroys it."""
    if method == "extrapolate":
        return "improved" if params.get("alpha", 0) > 0 and kind == "dpo" else None
    return PAPER_CLASS.get(method)


def our_class(term: float, loss: float, tolerance: float = 0.01, sd: float = math.nan, n: int = 1) -> str:
    """competitive when the term is about zero — |term| below ``tolerance`` × the loss at W_post, or, for a random
    edit measured at n > 1 seeds, its mean within two standard errors of zero (the paper's claim is about the
    expectation over masks) —, else decreased (> 0) or improved (< 0). Used by: classification, minilm, predicts."""
    if not math.isfinite(term):
        return "—"
    if abs(term) <= tolerance * abs(loss) or (n > 1 and math.isfinite(sd) and abs(term) <= 2 * sd / math.sqrt(n)):
        return "competitive"
    return "decreased" if term > 0 else "improved"


CLASS_COLUMNS = ["pair", "edit", "method", "seeds", "term", "term_sd", "loss_change", "score_change", "ours", "paper"]


def classify(frame, trials: Sequence[experiments.Trial], *, tolerance: float = 0.01):
    """One row per pair and edit (settings, seeds averaged): the paper's term, the exact change, the mean score
    change against post, our class by the term's sign, the paper's class, and whether they agree.
    Used by: classification, minilm, reproduction."""
    kinds = {t.pair.name: t.pair.kind for t in trials}
    params = {t.key: t.params for t in trials}
    terms = paper_terms(frame)
    terms = terms[~is_reference(terms)]
    rows = [
        _class_row(frame, group, params[group.trial.iloc[0]], kinds.get(group.pair.iloc[0], "lm"), tolerance)
        for _, group in terms.groupby(["pair", "edit"], sort=False)
    ]
    out = pd.DataFrame(rows, columns=["_trial", *CLASS_COLUMNS, "agree"])
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    out["_order"] = out.method.map(lambda m: order.get(m, len(order)))
    # settings in numeric order: p = 0.1, 0.2, ...
    out["_value"] = [tuple(v for _, v in sorted(params[t].items()) if isinstance(v, (int, float))) for t in out._trial]
    out = out.sort_values(["pair", "_order", "_value"]).drop(columns=["_order", "_value", "_trial"])
    return out.reset_index(drop=True)


def _class_row(frame, group, setting: dict, kind: str, tolerance: float) -> dict:
    """One edit's row of ``classify``: its terms over seeds (``group``), its exact change and score change."""
    pair_name, edit, method = group.pair.iloc[0], group.edit.iloc[0], group.method.iloc[0]
    post = reference_scores(frame, pair_name)["post"]
    s = experiments.scores(frame)
    scored = s[(s.pair == pair_name) & (s.edit == edit)].groupby("task")["value"].mean()
    loss = frame[(frame.quantity == "loss") & (frame.pair == pair_name)]["value"]
    change = frame[(frame.quantity == "loss_change") & (frame.pair == pair_name) & (frame.edit == edit)]["value"]
    term = float(group.value.mean())
    sd = float(group.value.std()) if len(group) > 1 else math.nan
    ours = our_class(term, float(loss.iloc[0]) if len(loss) else math.nan, tolerance, sd, len(group))
    theirs = paper_class(method, setting, kind)
    return {
        "_trial": group.trial.iloc[0],
        "pair": pair_name,
        "edit": edit,
        "method": method,
        "seeds": group.seed.nunique(),
        "term": term,
        "term_sd": sd,
        "loss_change": float(change.mean()) if len(change) else math.nan,
        "score_change": float((scored - post[scored.index]).mean()) if len(scored) and len(post) else math.nan,
        "ours": ours,
        "paper": theirs or "—",
        "agree": "—" if theirs is None else ("yes" if theirs == ours else "no"),
    }


def disagreements(classes) -> str:
    """The rows where our class differs from the paper's, in a few words per pair and method.
    Used by: classification, minilm."""
    bad = classes[classes.agree == "no"]
    parts = []
    for (pair, method), rows in bad.groupby(["pair", "method"], sort=False):
        settings = ", ".join(e[len(method) + 1 : -1] or "default settings" for e in rows.edit)
        paper = rows.paper.iloc[0]
        parts.append(f"{method} on {pair} at {settings} ({'/'.join(rows.ours.unique())}; the paper: {paper})")
    return "; ".join(parts) or "none"


def safe_until(frame, method: str, setting: str, *, tolerance: float = 0.02, pair: str | None = None) -> dict:
    """Where an edit stops being harmless: for each value of ``setting`` (in increasing order), the worst task's
    mean score drop against post (mean over seeds), and the largest value before the first one at which some task
    loses more than ``tolerance``. Returns {"largest_safe": value or None, "first_broken": value or None,
    "worst_drop": Series setting -> drop}. Used by: dare, dare_works."""
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


def breaks_sentence(frame, method: str, tolerance: float = 0.02) -> str:
    """Where ``method`` breaks over the drop rate p, in words, from ``safe_until``: the largest safe p, the first
    broken one and the task that loses most there. Used by: dare."""
    safe = safe_until(frame, method, "p", tolerance=tolerance)
    points = f"{100 * tolerance:.0f} points"
    if safe["first_broken"] is None:
        return f"stays within {points} of the post-trained model on every task at every p measured"
    s = experiments.scores(frame)
    means = s[(s.method == method) & (s.p == safe["first_broken"])].groupby("task")["value"].mean()
    drops = reference_scores(frame)["post"] - means
    task, drop = drops.idxmax(), float(drops.max())
    if safe["largest_safe"] is None:
        return (
            f"loses more than {points} on some task already at the smallest drop rate "
            f"measured, p = {safe['first_broken']:g} ({task}: {100 * drop:.1f} points on average)"
        )
    return (
        f"stays within {points} of the post-trained model up to p = {safe['largest_safe']:g} "
        f"and first breaks at p = {safe['first_broken']:g} ({task} loses {100 * drop:.1f} points on average)"
    )


def kfamily_pattern(drops) -> dict:
    """The paper's pattern for the k-family, tested on one pair's drops (columns p, k, drop): does the drop grow
    with |k| at each p (ρ(|k|, drop), averaged over p), does the spread over k grow with p (ρ(p, spread)), and is the
    worst k at each p negative (the share of p at which it is)? Beside it, ρ of the drop with |1 − k|·√(p/(1−p)),
    the size of D relative to ΔW that the variance argument predicts. Used by: kfamily."""
    by_p = drops.groupby("p")
    with_k = [rank_correlation(g.k.abs(), g["drop"]) for _, g in by_p]
    spread = by_p["drop"].agg(lambda d: d.max() - d.min())
    worst = by_p.apply(lambda g: g.loc[g["drop"].idxmax(), "k"], include_groups=False)
    predicted = (1 - drops.k).abs() * (drops.p / (1 - drops.p)) ** 0.5
    return {
        "rho_abs_k": float(sum(with_k) / len(with_k)) if with_k else math.nan,
        "rho_p_spread": rank_correlation(spread.index, spread.to_numpy()),
        "negative_worst": float((worst < 0).mean()) if len(worst) else math.nan,
        "rho_predicted": rank_correlation(predicted, drops["drop"]),
        "rho_relative_d": rank_correlation(drops.relative_d, drops["drop"]),
    }


def share_verdict(share_or_flag, partly: float = 0.5, full: float = 0.8) -> str:
    """reproduced / partly / not reproduced, from a share of agreeing cases (≥ ``full``, ≥ ``partly``) or a flag.
    Used by: reproduction."""
    if isinstance(share_or_flag, bool) or hasattr(share_or_flag, "dtype") and share_or_flag.dtype == bool:
        return "reproduced" if share_or_flag else "not reproduced"
    return "reproduced" if share_or_flag >= full else "partly" if share_or_flag >= partly else "not reproduced"


def largest_safe_text(p) -> str:
    """``safe_until``'s largest safe value in words: the value, or that none was safe. Used by: dare_works."""
    return "none of the measured ones (it breaks at the smallest)" if p is None or p != p else f"{p:g}"
