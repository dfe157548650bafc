"""The paper's six findings, each turned into a test with a verdict and its evidence.

The findings are stated as the paper's summary states them (§4.1 of the project's notes): three classes by the sign of
the term; DARE's k-family, sign flips included; which randomness matters (Table 1); BitDelta's holistic statistic;
the data deciding between interpolation and extrapolation; the whole delta rather than single parameters. Each
function returns a ``verdicts.Verdict`` whose word is ``reproduced``, ``partly``, ``not reproduced``, ``not
tested``, or the undecided verdict where the intervals cannot tell. Used by: reproduction, intro.
"""

from __future__ import annotations

import pandas as pd

from . import verdicts
from .verdicts import UNDECIDED, Verdict

REPRODUCED, PARTLY, NOT = "reproduced", "partly", "not reproduced"
NOT_TESTED = "not tested"
#: The six findings, in the paper's words as the project's notes summarise them, and the chapter that tests each.
FINDINGS = [
    ("Three classes by the sign of the term", "classification"),
    ("DARE works for any k that keeps the term zero, sign flips included", "kfamily"),
    ("The randomness that matters is that of ΔW ⊙ ∇L (Table 1)", "randomness"),
    ("BitDelta: the mean magnitude, random magnitudes, 4 bits", "bitdelta"),
    ("The data decides between interpolation and extrapolation", "predicts"),
    ("Look at the whole delta, not at single parameters", "structure"),
]


def combine(parts: dict[str, str]) -> str:
    """A finding's verdict from its parts' outcomes (``holds``, ``fails`` or the undecided verdict): reproduced when
    every part holds, not reproduced when every decided part fails, partly when some hold and some fail, and the
    undecided verdict when no part is decided either way or the holding parts sit beside undecided ones."""
    outcomes = list(parts.values())
    if not outcomes:
        return NOT_TESTED
    holds, fails = outcomes.count("holds"), outcomes.count("fails")
    if holds == len(outcomes):
        return REPRODUCED
    if holds and fails:
        return PARTLY
    if fails:
        return NOT
    return UNDECIDED


def classes(sorted_edits, *, full: float = 0.8, partly: float = 0.5) -> Verdict:
    """Finding 1, from ``classes.classify`` rows: among the edits the paper classifies and our term decides, the
    share in the paper's class — reproduced at ≥ ``full``, partly at ≥ ``partly``, else not reproduced."""
    claimed = sorted_edits[sorted_edits.paper != "—"]
    decided = claimed[claimed.agree.isin(["yes", "no"])]
    if decided.empty:
        return Verdict(NOT_TESTED, "no edit the paper classifies was decided", claimed)
    share = float((decided.agree == "yes").mean())
    word = REPRODUCED if share >= full else PARTLY if share >= partly else NOT
    open_ = int((claimed.agree == "undecided").sum())
    sentence = (
        f"our term puts {int((decided.agree == 'yes').sum())} of the {len(decided)} decided edits in the paper's class "
        f"({share:.0%}); {open_} more are random edits whose interval over masks cannot decide"
    )
    return Verdict(word, sentence, claimed)


def kfamily(changes, *, tolerance: float = 0.02) -> Verdict:
    """Finding 2, from ``uncertainty.change_table`` rows of DARE's k-family (columns p, k) on one pair: every
    setting with |k| ≤ 0.5 and |kp| < 0.5 (the paper's "k and kp small") stays within ``tolerance`` of the
    post-trained model — two parts: the members with k ≥ 0, and the sign flips (k < 0 in that range)."""
    rows = changes[(changes.task == "mean") & changes.k.notna()]
    small = lambda r: abs(r.k) <= 0.5 + 1e-9 and abs(r.k * r.p) < 0.5
    parts = {}
    for name, scope in (("k ≥ 0", lambda r: small(r) and r.k >= 0), ("sign flips", lambda r: small(r) and r.k < 0)):
        grid = verdicts.tolerance_grid(rows, "p", "k", tolerance=tolerance, scope=scope)
        parts[name] = (grid.word, grid.sentence)
    outcome = {
        name: "holds" if word == "harmless at every setting" else "fails" if word.startswith("broken") else UNDECIDED
        for name, (word, _) in parts.items()
        if word != "not measured"
    }
    sentence = "; ".join(f"{name}: {text}" for name, (word, text) in parts.items() if word != "not measured")
    return Verdict(combine(outcome), sentence or "not measured", outcome)


def table_one(product: Verdict, sign: Verdict) -> Verdict:
    """Finding 3, from the randomness chapter's verdicts: the product-biased edit collapses
    (``verdicts.collapse``) and the sign-biased edit survives (``verdicts.survives``)."""
    outcome = {}
    if product.word != "not measured":
        outcome["product-biased collapses"] = {"collapses": "holds", "does not collapse": "fails"}.get(
            product.word, UNDECIDED
        )
    if sign.word != "not measured":
        outcome["sign-biased survives"] = {"survives": "holds", "does not survive": "fails"}.get(sign.word, UNDECIDED)
    return Verdict(combine(outcome), f"{product.sentence}; {sign.sentence}", outcome)


def bitdelta(best_scale: Verdict, on_par: list[Verdict], four_bits: str) -> Verdict:
    """Finding 4, from the BitDelta chapter's verdicts: the mean magnitude is the best single magnitude or not
    distinguishable from it (``verdicts.best``: its word is ``1×`` or undecided with 1× among the ties); random
    magnitudes are on par with it (``verdicts.on_par``); 4 bits surpass the post-trained model
    (``verdicts.against_post`` says ``above``)."""
    outcome = {}
    if best_scale.word != "not measured":
        tied = best_scale.word == UNDECIDED and "1×" in best_scale.sentence
        outcome["the mean is the best magnitude"] = "holds" if best_scale.word == "1×" or tied else "fails"
    words = [v.word for v in on_par if v.word != "not measured"]
    if words:
        outcome["random magnitudes on par"] = (
            "holds" if all(w == "on par" for w in words) else "fails" if "differs" in words else UNDECIDED
        )
    if four_bits != "not measured":
        outcome["4 bits surpass post"] = {"above": "holds", "undecided": UNDECIDED}.get(four_bits, "fails")
    sentence = "; ".join(f"{name}: {result}" for name, result in outcome.items())
    return Verdict(combine(outcome), sentence, outcome)


def data_decides(per_data: pd.Series) -> Verdict:
    """Finding 5, within one pair (one delta, so nothing but the data differs): ``per_data`` maps each loss dataset
    to our class of the same extrapolation. Reproduced when the class differs between datasets (the data decides),
    not reproduced when every decided dataset gives the same class."""
    decided = per_data[~per_data.isin([UNDECIDED, "—"])]
    if len(decided) < 2:
        return Verdict(NOT_TESTED, "fewer than two loss datasets decided a class", per_data)
    listed = "; ".join(f"on {data}: {cls}" for data, cls in per_data.items())
    word = REPRODUCED if decided.nunique() > 1 else NOT
    return Verdict(word, f"the same extrapolation of the same delta is {listed}", per_data)
