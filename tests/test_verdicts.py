"""Every verdict function on hand-built tables whose answer is known by construction, the boundary included (an
interval that straddles the tolerance gives no verdict)."""

import math
import zlib

import numpy as np
import pandas as pd
import pytest

from unifieddelta import classes, verdicts
from unifieddelta.verdicts import UNDECIDED


def _changes(rows):
    """change_table rows of one pair and method: (p, value, low, high)."""
    return pd.DataFrame(
        [
            {"pair": "x", "p": p, "task": "mean", "value": v, "low": lo, "high": hi, "n": 100, "draws": 3}
            for p, v, lo, hi in rows
        ]
    )


def test_breaking_point_needs_the_interval_to_decide():
    changes = _changes(
        [(0.1, 0.0, -0.01, 0.01), (0.3, -0.01, -0.015, -0.005), (0.5, -0.02, -0.035, -0.005), (0.9, -0.3, -0.35, -0.25)]
    )
    v = verdicts.breaking_point(changes, "p", tolerance=0.02, subject="DARE")
    assert v.word == "breaks at p = 0.9"
    assert list(v.evidence.status) == ["harmless", "harmless", "undecided", "broken"]
    assert "up to p = 0.3" in v.sentence and "at p = 0.5 the interval straddles" in v.sentence
    assert "n = 100 questions per task, 3 masks" in v.sentence


def test_breaking_point_at_the_boundary_and_without_a_break():
    touching = _changes([(0.1, -0.01, -0.02, 0.0)])  # the low end exactly at the tolerance: not excluded
    assert verdicts.breaking_point(touching, "p").word == UNDECIDED
    fine = _changes([(0.1, 0.0, -0.01, 0.01), (0.2, 0.0, -0.019, 0.01)])
    v = verdicts.breaking_point(fine, "p")
    assert v.word == "harmless at every p measured" and "up to p = 0.2" in v.sentence
    early = _changes([(0.1, -0.1, -0.12, -0.08)])
    assert "not shown to stay within" in verdicts.breaking_point(early, "p").sentence
    # every broken value is named, not only the first (a reader must not think the rates after it recover)
    late = _changes([(0.1, 0.0, -0.01, 0.01), (0.8, -0.1, -0.12, -0.08), (0.9, -0.2, -0.22, -0.18)])
    v = verdicts.breaking_point(late, "p")
    assert v.word == "breaks at p = 0.8" and "loses more than 2 points at p = 0.8, 0.9" in v.sentence


def _question_rows(label_values: dict, n=200, seeds=1):
    """A question table: label -> per-question probability of a correct answer (drawn once, seeded by the label:
    not by hash(), which differs between processes)."""
    rows = []
    for label, share in label_values.items():
        for seed in range(seeds):
            values = (np.random.default_rng([zlib.crc32(label.encode()), seed]).random(n) < share).astype(float)
            rows += [
                {"edit": label, "seed": seed, "task": "t", "question": i, "value": v} for i, v in enumerate(values)
            ]
    return pd.DataFrame(rows)


def test_best_names_a_clear_winner_and_refuses_a_tie():
    q = _question_rows({"k=0": 0.9, "k=1": 0.5, "k=-1": 0.2}, n=300)
    v = verdicts.best(q, {label: {"edit": label} for label in ("k=0", "k=1", "k=-1")})
    assert v.word == "k=0"
    tie = _question_rows({"a": 0.60, "b": 0.60}, n=100)
    v = verdicts.best(tie, {"a": {"edit": "a"}, "b": {"edit": "b"}})
    assert v.word == UNDECIDED and "not distinguishably" in v.sentence


def test_rank_verdict_is_the_exact_permutation_test():
    v = verdicts.rank_verdict([1, 2, 3, 4], [1, 2, 3, 4])
    assert v.evidence["rho"] == pytest.approx(1.0)
    assert v.evidence["p"] == pytest.approx(2 / 24)  # ρ = ±1: two of the 24 orders
    assert v.word == UNDECIDED  # four points can never reach 5%
    v = verdicts.rank_verdict(range(8), range(8))
    assert v.word == "orders" and v.evidence["p"] == pytest.approx(2 / math.factorial(8))


def test_the_expectation_check_reads_the_t0_node_and_the_ratio():
    """Masks whose t = 0 terms average zero, a term of 0.4·DᵀHD and an exact change of 0.5·DᵀHD: the check
    finds zero in every t = 0 interval and the predicted ratios."""
    rows = []
    for p, dhd in ((0.5, 0.1), (0.9, 1.0)):
        for first in (-0.02, 0.0, 0.02):
            rows.append(
                {"p": p, "first_order": first, "term": 0.4 * dhd, "second_order": dhd / 2, "loss_change": dhd / 2}
            )
    v = verdicts.expectation_check(pd.DataFrame(rows))
    assert v.word == "holds"
    assert list(v.evidence["term / DᵀHD"]) == pytest.approx([0.4, 0.4])
    assert list(v.evidence["ΔL / DᵀHD"]) == pytest.approx([0.5, 0.5])
    assert "C = 5 term's lies above zero at 2" in v.sentence  # a positive term at every setting, unlike its t = 0 node
    shifted = pd.DataFrame(rows).assign(first_order=lambda f: f.first_order + 1.0)
    assert verdicts.expectation_check(shifted).word == "fails"


def test_our_class_is_one_rule_with_its_interval():
    loss = 2.0  # band ± 0.02 at tolerance 1%
    assert classes.our_class([0.01], loss)[0] == "competitive"
    assert classes.our_class([0.03], loss)[0] == "decreased"
    assert classes.our_class([-0.03], loss)[0] == "improved"
    assert classes.our_class([0.05, 0.06, 0.07], loss)[0] == "decreased"
    assert classes.our_class([0.0, 0.04, 0.01], loss)[0] == UNDECIDED  # the interval straddles the band's edge
    assert classes.our_class([0.01, 0.02, 0.03], loss)[0] == UNDECIDED  # from inside the band to above it
    assert classes.our_class([-0.01, -0.02, -0.03], loss)[0] == UNDECIDED  # from inside the band to below it
    assert classes.our_class([0.001, 0.002, 0.0015], loss)[0] == "competitive"


def test_the_paper_makes_no_claim_about_edits_that_change_nothing_or_multi_bit_bitdelta():
    assert classes.paper_class("low_rank", {"rank": 1.0}, "lm") is None
    assert classes.paper_class("magnitude_trim", {"keep": 1.0}, "lm") is None
    assert classes.paper_class("low_rank", {"rank": 0.1}, "lm") == "decreased"
    assert classes.paper_class("bitdelta", {"bits": 0, "scale": 1.0}, "lm") == "decreased"
    assert classes.paper_class("bitdelta", {"bits": 4}, "lm") is None
    assert classes.paper_class("extrapolate", {"alpha": 0.5}, "dpo") == "improved"
    assert classes.paper_class("extrapolate", {"alpha": 0.5}, "lm") is None
    assert classes.paper_class("dare", {"p": 0.9, "k": -1.0}, "lm") == "competitive"
    # where the paper's own measurements stop, so do its claims
    assert classes.paper_class("extrapolate", {"alpha": 1.0}, "dpo") is None
    assert classes.paper_class("magnitude_trim", {"keep": 0.5}, "lm") is None
    assert classes.paper_class("magnitude_trim", {"keep": 0.1}, "lm") == "decreased"
    assert classes.paper_class("low_rank", {"rank": 0.5}, "lm") is None
    assert classes.paper_class("low_rank", {"rank": 8}, "lm") is None


def _frame(rows):
    base = {"rule": "left", "points": 5, "mode": "grad", "alpha": np.nan}
    return pd.DataFrame([{**base, **r} for r in rows])


class _Pair:
    name, kind = "x", "lm"


class _Trial:
    pair = _Pair()

    def __init__(self, key, params):
        self.key, self.params = key, params


def test_classify_counts_each_mask_once_and_applies_one_rule():
    term = {"pair": "x", "quantity": "term", "seed": 0}
    rows = [{**term, "edit": "dare(p=0.5)", "method": "dare", "seed": s, "trial": f"d{s}", "value": v}
            for s, v in enumerate([0.001, -0.001, 0.0])]  # fmt: skip
    rows += [{**term, "edit": "bitdelta()", "method": "bitdelta", "trial": "b", "value": 0.5}]
    rows += [{**term, "edit": "low_rank(rank=1.0)", "method": "low_rank", "trial": "l", "value": 0.0}]
    rows += [{**term, "edit": "e", "method": "extrapolate", "trial": "r", "quantity": "loss", "value": 1.0}]
    trials = [_Trial(f"d{s}", {"p": 0.5, "k": 0.0}) for s in range(3)]
    trials += [_Trial("b", {"bits": 0, "scale": 1.0}), _Trial("l", {"rank": 1.0})]
    out = classes.classify(_frame(rows), trials).set_index("method")
    assert (
        out.loc["dare", "seeds"] == 3 and out.loc["dare", "ours"] == "competitive" and out.loc["dare", "agree"] == "yes"
    )
    assert out.loc["bitdelta", "ours"] == "decreased" and out.loc["bitdelta", "agree"] == "yes"
    assert out.loc["low_rank", "paper"] == "—" and out.loc["low_rank", "agree"] == "—"
    summary = classes.class_summary(out.reset_index())
    assert summary.set_index("method").loc["low_rank", "unclaimed"] == 1


def test_disagreements_name_each_setting_and_scope():
    rows = [
        ["x", "dare(p=0.9)", "dare", "decreased", "competitive", "no"],
        ["x", "bitdelta() [linear]", "bitdelta", "competitive", "decreased", "no"],
        ["x", "low_rank(rank=0.1)", "low_rank", "decreased", "decreased", "yes"],
    ]
    frame = pd.DataFrame(rows, columns=["pair", "edit", "method", "ours", "paper", "agree"])
    text = classes.disagreements(frame)
    assert text == (
        "dare on x, 1 setting (p=0.9) (decreased; the paper: competitive); "
        "bitdelta on x, 1 setting (linear) (competitive; the paper: decreased)"
    )
    assert classes.disagreements(frame[frame.agree == "yes"]) == "none"
    rows = [["x", f"dare(p={p})", "dare", "decreased", "competitive", "no"] for p in (0.5, 0.7, 0.9, 0.99)]
    many = pd.DataFrame(rows, columns=frame.columns)
    assert classes.disagreements(many) == (
        "dare on x, 4 settings (p=0.5), (p=0.7), (p=0.9) and 1 more (decreased; the paper: competitive)"
    )


def test_extreme_labels_name_ties_together():
    from unifieddelta import tables

    row = pd.Series({"attention": 0.002634, "MLP": 0.002627, "norm": 0.001, "head": float("nan")})
    assert tables.extreme_labels(row) == "attention and MLP (0.26%)"
    assert tables.extreme_labels(row, largest=False) == "norm (0.10%)"
