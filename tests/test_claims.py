"""The paper's six findings as tests, and the verdicts they are built from, on hand-built inputs whose answer is
known by construction: each rule's boundary included (an interval that straddles its threshold decides nothing)."""

import numpy as np
import pandas as pd
import pytest

from unifieddelta import claims, verdicts
from unifieddelta.verdicts import UNDECIDED, Verdict


def test_combine_is_the_stated_truth_table():
    assert claims.combine({"a": "holds", "b": "holds"}) == claims.REPRODUCED
    assert claims.combine({"a": "holds", "b": "fails"}) == claims.PARTLY
    assert claims.combine({"a": "fails", "b": UNDECIDED}) == claims.NOT
    assert claims.combine({"a": "holds", "b": UNDECIDED}) == UNDECIDED
    assert claims.combine({}) == claims.NOT_TESTED


def _classes(agree):
    return pd.DataFrame({"paper": ["decreased"] * len(agree), "agree": agree})


def test_finding_one_counts_decided_edits_only():
    assert claims.classes(_classes(["yes"] * 8 + ["no"] * 2 + ["undecided"] * 5)).word == claims.REPRODUCED  # 80%
    assert claims.classes(_classes(["yes"] * 7 + ["no"] * 3)).word == claims.PARTLY
    assert claims.classes(_classes(["yes"] * 4 + ["no"] * 6)).word == claims.NOT
    assert claims.classes(_classes(["undecided"] * 3)).word == claims.NOT_TESTED


def _grid(rows):
    """change_table rows (p, k, value, low, high) of the mean score."""
    return pd.DataFrame([{"p": p, "k": k, "task": "mean", "value": v, "low": lo, "high": hi, "n": 300, "draws": 5}
                         for p, k, v, lo, hi in rows])  # fmt: skip


def test_finding_two_tests_exactly_the_papers_scope():
    fine = [(p, k, 0.0, -0.01, 0.01) for p in (0.1, 0.5, 0.9) for k in (-0.5, 0.0, 0.5)]
    out_of_scope = [(0.9, -1.0, -0.3, -0.35, -0.25)]  # k = -1 is not "small": the paper claims nothing there
    assert claims.kfamily(_grid(fine + out_of_scope)).word == claims.REPRODUCED
    broken_flip = [(p, k, v, lo, hi) if k != -0.5 else (p, k, -0.1, -0.12, -0.08) for p, k, v, lo, hi in fine]
    assert claims.kfamily(_grid(broken_flip)).word == claims.PARTLY  # small k holds for k >= 0 only
    straddling = [(p, k, -0.02, -0.03, -0.01) for p, k, *_ in fine]  # every interval straddles -0.02
    assert claims.kfamily(_grid(straddling)).word == UNDECIDED


def test_finding_three_needs_the_collapse_and_the_survival():
    collapses, survives = Verdict("collapses", "c"), Verdict("survives", "s")
    assert claims.table_one(collapses, survives).word == claims.REPRODUCED
    assert claims.table_one(Verdict("does not collapse", "c"), survives).word == claims.PARTLY
    assert claims.table_one(Verdict(UNDECIDED, "c"), survives).word == UNDECIDED


def test_finding_four_reads_its_three_parts():
    mean_best = Verdict("1×", "1× scores best")
    tied = Verdict(UNDECIDED, "1.5× scores highest, but not distinguishably from 1×, 2×")
    other_best = Verdict("2×", "2× scores best")
    on_par = [Verdict("on par", ""), Verdict("on par", "")]
    assert claims.bitdelta(mean_best, on_par, "above").word == claims.REPRODUCED
    assert claims.bitdelta(tied, on_par, "above").word == claims.REPRODUCED  # the mean cannot be told from the best
    assert claims.bitdelta(other_best, on_par, "matches").word == claims.PARTLY
    assert claims.bitdelta(other_best, [Verdict("differs", "")], "below").word == claims.NOT


def test_finding_five_within_one_pair():
    assert claims.data_decides(pd.Series(["improved", "decreased"], index=["a", "b"])).word == claims.REPRODUCED
    assert claims.data_decides(pd.Series(["decreased", "decreased", UNDECIDED], index=list("abc"))).word == claims.NOT
    assert claims.data_decides(pd.Series(["decreased"], index=["a"])).word == claims.NOT_TESTED


def test_survives_and_collapse_at_their_boundaries():
    rows = pd.DataFrame({"k": [0.5, 1.5], "task": "mean", "value": [0.0, -0.01], "low": [-0.01, -0.019],
                         "high": [0.01, 0.0]})  # fmt: skip
    assert verdicts.survives(rows, "k").word == "survives"
    rows.loc[1, "low"] = -0.03  # the interval now straddles -0.02
    assert verdicts.survives(rows, "k").word == UNDECIDED
    rows.loc[1, ["value", "high"]] = [-0.05, -0.025]
    assert verdicts.survives(rows, "k").word == "does not survive"
    gain = 0.4  # post-training added 40 points: collapse below -20
    collapsed = pd.DataFrame({"k": [0.5], "task": "mean", "value": [-0.3], "low": [-0.33], "high": [-0.27]})
    assert verdicts.collapse(collapsed, "k", gain).word == "collapses"
    straddle = collapsed.assign(low=-0.25, high=-0.15)
    assert verdicts.collapse(straddle, "k", gain).word == UNDECIDED
    assert (
        verdicts.collapse(collapsed.assign(value=-0.05, low=-0.07, high=-0.03), "k", gain).word == "does not collapse"
    )
    assert verdicts.collapse(collapsed, "k", 0.0).word == "not measured"


def test_curve_shapes():
    u = pd.Series([0.0, -0.2, -0.3, -0.1, 0.2], index=[0.0, 0.2, 0.4, 0.6, 0.8])
    v = verdicts.curve_shape(u, what="the curve")
    assert v.word == "U-shaped" and "lowest at α = 0.4" in v.sentence and "α ≈ 0.67" in v.sentence  # 0.6 + 0.2·0.1/0.3
    falling = pd.Series([0.0, -0.1, -0.2], index=[0.0, 1.0, 2.0])
    assert verdicts.curve_shape(falling).word == "falls"
    assert verdicts.curve_shape(pd.Series([0.0, 0.1], index=[0.0, 1.0])).word == "rises"
    line = pd.Series([2.0, 1.5, 1.6], index=[-0.5, 0.0, 0.5])
    assert verdicts.lowest_point(line).word == "at post"
    later = pd.Series([2.0, 1.5, 1.4], index=[-0.5, 0.0, 0.5])
    assert verdicts.lowest_point(later).word == "past the post-trained model"


def test_sign_prediction_against_the_majority_baseline():
    """Nine edits lowered the score, one raised it: calling every positive term 'down' is right 9 times, but the
    baseline of always guessing 'down' is 90% too; the balanced accuracy sees that the one gain was missed."""
    edits = pd.DataFrame({"term": [1.0] * 10, "value": [-0.1] * 9 + [0.1], "low": [-0.12] * 9 + [0.08],
                          "high": [-0.08] * 9 + [0.12]})  # fmt: skip
    v = verdicts.sign_prediction(edits)
    assert v.evidence["accuracy"] == pytest.approx(0.9) and v.evidence["baseline"] == pytest.approx(0.9)
    assert v.evidence["balanced"] == pytest.approx(0.5) and v.word == "no better than the baseline"
    edits.loc[9, "term"] = -1.0
    better = verdicts.sign_prediction(edits)
    assert better.evidence["accuracy"] == pytest.approx(1.0) and better.word == "better than the baseline"
    assert better.evidence["negative_up"] == 1


def _questions(method_values, n=400, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for (method, p, seed_), share in method_values.items():
        values = (rng.random(n) < share).astype(float)
        base = {"method": method, "p": p, "seed": seed_, "task": "t"}
        rows += [{**base, "question": i, "value": v} for i, v in enumerate(values)]
    return pd.DataFrame(rows)


def test_compare_settings_and_on_par():
    q = _questions(
        {("dare", 0.5, 0): 0.8, ("drop_only", 0.5, 0): 0.3, ("dare", 0.9, 0): 0.5, ("drop_only", 0.9, 0): 0.5}
    )
    v = verdicts.compare_settings(q, "dare", "drop_only", "p")
    assert "higher than drop-only at p = 0.5" in v.sentence and "apart at p = 0.9" in v.sentence
    same = verdicts.on_par(q, {"method": "dare", "p": 0.9}, {"method": "drop_only", "p": 0.9}, tolerance=0.2)
    assert same.word == "on par"
    apart = verdicts.on_par(q, {"method": "dare", "p": 0.5}, {"method": "drop_only", "p": 0.5}, tolerance=0.02)
    assert apart.word == "differs"
    assert verdicts.on_par(q, {"method": "dare", "p": 0.9}, {"method": "drop_only", "p": 0.9}).word == UNDECIDED


def test_against_post():
    assert verdicts.against_post(0.01, 0.05, 0.02) == "above"
    assert verdicts.against_post(-0.01, 0.01, 0.02) == "matches"
    assert verdicts.against_post(-0.05, -0.03, 0.02) == "below"
    assert verdicts.against_post(-0.03, 0.01, 0.02) == "undecided"
