"""The paper's classes of edits, and ours: each edit sorted by its measured approximation term.

The paper sorts editing methods into three classes by the sign of their approximation term: *competitive* (about
zero: DARE), *decreased* (positive: BitDelta, Twin-Merging, TIES) and *improved* (negative: EXPO on alignment
data). :func:`paper_class` says which class the paper puts an edit in (or that it makes no claim), :func:`our_class`
which class our measured term puts it in, by one rule for every edit, and :func:`classify` sets the two side by side
for every edit a page read. ``Used by:`` names the chapters that call each function.
"""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

from . import experiments, uncertainty
from .tables import PAPER_RULE, is_reference, paper_terms
from .verdicts import UNDECIDED

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
METHOD_ORDER = ["dare", "drop_only", "bitdelta", "low_rank", "magnitude_trim", "extrapolate", "sign_biased"]
METHOD_ORDER += ["product_biased", "gaussian"]


def changes_nothing(method: str, params: dict) -> bool:
    """An edit whose D is zero by construction (keep everything, full rank, k = 1, α = 0, p = 0, no noise)."""
    return (
        (method == "low_rank" and params.get("rank") in (1.0,))
        or (method == "magnitude_trim" and params.get("keep") == 1.0)
        or (method in ("dare", "drop_only") and params.get("p") == 0.0)
        or (method in ("dare", "sign_biased", "product_biased") and params.get("k") == 1.0)
        or (method == "extrapolate" and params.get("alpha") == 0.0)
        or (method == "gaussian" and params.get("sigma") == 0.0)
    )


#: Where the paper's claims stop: TIES's term is low at low drop rates and rises at high ones (§5.2; Fig. 3's
#: p ≥ 0.7), Twin-Merging was measured at sparsity 0.9 only, and Fig. 6 follows EXPO to α = 0.6.
TRIM_KEEP_MAX, RANK_MAX, EXPO_ALPHA_MAX = 0.3, 0.1, 0.6


def paper_class(method: str, params: dict, kind: str) -> str | None:
    """The class the paper puts an edit in: competitive (term ≈ 0), decreased (> 0) or improved (< 0); None where
    it makes no claim: interpolation, EXPO off alignment data or past the α its Figure 6 measured, an edit that
    changes nothing, multi-bit BitDelta (the paper computes the term of 1-bit BitDelta only, and reports 4 bits
    *surpassing* the post-trained model), trimming that keeps more than 30% (its term is "low" there), and low rank
    above a tenth of the rank (Twin was measured at sparsity 0.9). DARE with any k (§4.2) and the sign-biased edit
    keep performance and the product-biased edit destroys it — for these two the paper reports accuracy (Table 1),
    not a term, so their class is our reading of it. Used by: classification, minilm, reproduction."""
    if changes_nothing(method, params):
        return None
    if method == "extrapolate":
        alpha = params.get("alpha", 0)
        return "improved" if 0 < alpha <= EXPO_ALPHA_MAX and kind == "dpo" else None
    if method == "bitdelta" and (params.get("bits", 0) or 0) > 0:
        return None
    if method == "magnitude_trim" and params.get("keep", 0.1) > TRIM_KEEP_MAX:
        return None
    rank = params.get("rank", 0.1)
    if method == "low_rank" and not (isinstance(rank, float) and rank <= RANK_MAX):
        return None
    return PAPER_CLASS.get(method)


def our_class(terms: Sequence[float], loss: float, tolerance: float = 0.01) -> tuple[str, uncertainty.Interval]:
    """The class of an edit by its term, one rule for every edit: *competitive* when the term is within
    ± ``tolerance`` × L(W_post), else *decreased* (> 0) or *improved* (< 0). With several masks the rule applies
    to the mean's t-interval: the class is given only when the whole interval is on one side of the band's edge,
    else the undecided verdict. One value (a deterministic edit, one mask): the value decides.
    Used by: classification, minilm, predicts."""
    est = uncertainty.mean_interval(terms)
    if est.value != est.value:
        return "—", est
    band = tolerance * abs(loss)
    low, high = (est.low, est.high) if est.low == est.low else (est.value, est.value)
    if -band <= low and high <= band:
        return "competitive", est
    if low > band:
        return "decreased", est
    if high < -band:
        return "improved", est
    return UNDECIDED, est


CLASS_COLUMNS = ["pair", "edit", "method", "seeds", "term", "term_low", "term_high", "loss_change", "ours", "paper"]


def classify(frame, trials: Sequence[experiments.Trial], *, tolerance: float = 0.01, rule: dict = PAPER_RULE):
    """One row per pair and edit (settings; seeds as the draws): the term taken with ``rule`` (default the paper's
    left C = 5; its mean and interval over masks),
    the exact change, our class (:func:`our_class`), the paper's class (:func:`paper_class`), and whether they
    agree (``undecided`` where our interval cannot tell). Used by: classification, minilm, reproduction."""
    kinds = {t.pair.name: t.pair.kind for t in trials}
    params = {t.key: t.params for t in trials}
    terms = paper_terms(frame, rule)
    terms = terms[~is_reference(terms)]
    loss = frame[frame.quantity == "loss"].groupby("pair")["value"].first()
    change = frame[frame.quantity == "loss_change"].groupby(["pair", "edit"])["value"].mean()
    rows = []
    for (pair, edit), g in terms.groupby(["pair", "edit"], sort=False):
        setting = params[g.trial.iloc[0]]
        ours, est = our_class(list(g.value), float(loss.get(pair, math.nan)), tolerance)
        theirs = paper_class(g.method.iloc[0], setting, kinds.get(pair, "lm"))
        agree = "—" if theirs is None else "undecided" if ours == UNDECIDED else ("yes" if theirs == ours else "no")
        rows.append([g.trial.iloc[0], pair, edit, g.method.iloc[0], g.seed.nunique(), est.value, est.low, est.high])
        rows[-1] += [float(change.get((pair, edit), math.nan)), ours, theirs or "—", agree]
    out = pd.DataFrame(rows, columns=["_trial", *CLASS_COLUMNS, "agree"])
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    out["_order"] = out.method.map(lambda m: order.get(m, len(order)))
    # settings in numeric order: p = 0.1, 0.2, ...
    out["_value"] = [tuple(v for _, v in sorted(params[t].items()) if isinstance(v, (int, float))) for t in out._trial]
    out = out.sort_values(["pair", "_order", "_value"]).drop(columns=["_order", "_value", "_trial"])
    return out.reset_index(drop=True)


def class_summary(classes):
    """Per pair and method: how many settings, how many our term puts in the paper's class, how many it puts
    elsewhere, how many it cannot decide, and how many the paper makes no claim about. Used by: classification."""
    counts = classes.groupby(["pair", "method"], sort=False).agg(
        settings=("edit", "size"),
        agree=("agree", lambda a: int((a == "yes").sum())),
        disagree=("agree", lambda a: int((a == "no").sum())),
        undecided=("agree", lambda a: int((a == "undecided").sum())),
        unclaimed=("agree", lambda a: int((a == "—").sum())),
    )
    return counts.reset_index()


def edit_settings(edit: str, method: str) -> str:
    """An edit's label without its method: ``dare(p=0.9)`` -> ``p=0.9``, ``bitdelta() [linear]`` -> ``linear``."""
    inner, _, scope = edit[len(method) + 1 :].partition(")")
    parts = [inner, scope.strip(" []")]
    return ", ".join(part for part in parts if part) or "default settings"


def disagreements(classes) -> str:
    """The rows where our class differs from the paper's, in a few words per pair and method.
    Used by: classification, minilm."""
    bad = classes[classes.agree == "no"]
    parts = []
    for (pair, method), rows in bad.groupby(["pair", "method"], sort=False):
        settings = [f"({edit_settings(e, method)})" for e in rows.edit]
        shown = ", ".join(settings[:3]) + (f" and {len(settings) - 3} more" if len(settings) > 3 else "")
        count = f"{len(settings)} setting{'s' if len(settings) > 1 else ''}"
        ours, paper = "/".join(rows.ours.unique()), rows.paper.iloc[0]
        parts.append(f"{method} on {pair}, {count} {shown} ({ours}; the paper: {paper})")
    return "; ".join(parts) or "none"
