"""The intervals behind every verdict, checked against independent computations: hand sums, the normal
approximation of the bootstrap, Student's t from its tabulated quantiles, and tables whose answer is known."""

import math

import numpy as np
import pandas as pd
import pytest

from unifieddelta import uncertainty
from unifieddelta.uncertainty import Interval, difference, mean_interval, paired_change, relation


def _binary(n, share, seed):
    return (np.random.default_rng(seed).random(n) < share).astype(float)


def test_the_estimate_is_the_mean_over_tasks_of_the_mean_change():
    post = {"a": [1, 1, 0, 0], "b": [1, 0, 1, 0, 1, 1]}
    edited = [{"a": [1, 0, 0, 0], "b": [1, 1, 1, 0, 1, 1]}, {"a": [0, 0, 0, 0], "b": [1, 0, 1, 0, 1, 1]}]
    # task a: masks change by -1/4 and -2/4 -> -3/8; task b: +1/6 and 0 -> +1/12; mean over tasks
    expected = (-3 / 8 + 1 / 12) / 2
    est = paired_change(post, edited)
    assert est.value == pytest.approx(expected)
    assert (est.n, est.draws) == (4, 2)


def test_one_draw_matches_the_normal_approximation_of_a_paired_mean():
    """One task, one draw: the bootstrap of a mean difference over n questions has sd(d)/√n; the 95% interval is
    about ±1.96 of that around the mean (checked to 10% at n = 2000)."""
    n = 2000
    post = _binary(n, 0.6, 0)
    edited = post.copy()
    flip = np.random.default_rng(1).random(n) < 0.2  # a fifth of the answers change
    edited[flip] = 1 - edited[flip]
    est = paired_change({"t": post}, [{"t": edited}], boot=4000)
    d = edited - post
    half = 1.96 * d.std(ddof=1) / math.sqrt(n)
    assert est.value == pytest.approx(d.mean())
    assert (est.high - est.low) / 2 == pytest.approx(half, rel=0.1)


def test_pairing_makes_the_interval_narrower_than_two_independent_scores():
    """An edit that changes 2% of 500 answers: the paired interval is far narrower than the one two unpaired
    binomial proportions would give (about ±6 points at 50%)."""
    n = 500
    post = _binary(n, 0.5, 2)
    edited = post.copy()
    edited[:10] = 1 - edited[:10]
    est = paired_change({"t": post}, [{"t": edited}])
    unpaired = 1.96 * math.sqrt(2 * 0.25 / n)
    assert est.width < unpaired / 2  # the whole paired interval is narrower than half the unpaired one's half


def test_identical_models_have_a_zero_width_interval():
    post = {"t": _binary(100, 0.5, 3)}
    est = paired_change(post, [post, post])
    assert est.value == 0.0 and est.low == pytest.approx(0.0, abs=1e-12) and est.high == pytest.approx(0.0, abs=1e-12)


def test_masks_are_resampled_too():
    """No noise across questions (every question moves alike), but two masks that disagree: the interval spans
    what resampling two masks gives, their two means and the middle."""
    post = {"t": np.zeros(50)}
    edited = [{"t": np.full(50, -0.1)}, {"t": np.full(50, -0.3)}]
    est = paired_change(post, edited, boot=4000)
    assert est.value == pytest.approx(-0.2)
    assert est.low == pytest.approx(-0.3) and est.high == pytest.approx(-0.1)


def test_difference_is_antisymmetric_and_refuses_unequal_questions():
    a, b = [{"t": _binary(80, 0.7, 4)}], [{"t": _binary(80, 0.4, 5)}, {"t": _binary(80, 0.5, 6)}]
    ab, ba = difference(a, b, seed=3), difference(b, a, seed=3)
    assert ab.value == pytest.approx(-ba.value)
    with pytest.raises(ValueError, match="questions"):
        difference([{"t": [1, 0]}], [{"t": [1, 0, 1]}])


def test_mean_interval_is_students_t():
    """Three values: t(0.975, 2) = 4.303 (tabulated), times s/√3."""
    x = [1.0, 2.0, 4.0]
    est = mean_interval(x)
    s = np.std(x, ddof=1)
    assert est.value == pytest.approx(7 / 3)
    assert est.high - est.value == pytest.approx(4.303 * s / math.sqrt(3), rel=1e-3)
    one = mean_interval([5.0])
    assert one.value == 5.0 and math.isnan(one.low)
    assert math.isnan(mean_interval([]).value)


def test_relation_at_the_boundary():
    assert relation(Interval(0.05, 0.03, 0.07), 0.02) == "above"
    assert relation(Interval(-0.05, -0.07, -0.03), 0.02) == "below"
    assert relation(Interval(0.02, 0.01, 0.03), 0.02) == "straddles"  # an interval that straddles the tolerance
    assert relation(Interval(0.02, 0.02, 0.03), 0.02) == "straddles"  # touching is not excluding
    assert relation(Interval(0.5, math.nan, math.nan), 0.02) == "above"  # no interval: the value decides


def _questions(edits: dict, post: dict, pair="p") -> pd.DataFrame:
    """A question table: edits maps (method, setting value) -> list of draws (task -> values)."""
    rows = []
    for (method, value), draws in {("extrapolate", 0.0): [post], **edits}.items():
        setting = {"p": np.nan, "alpha": value} if method == "extrapolate" else {"p": value, "alpha": np.nan}
        for seed, d in enumerate(draws):
            trial = {"pair": pair, "method": method, "edit": f"{method}({value})", "seed": seed, **setting}
            for task, values in d.items():
                for i, v in enumerate(values):
                    rows.append({**trial, "trial": f"{method}{value}{seed}", "scoring": "s", "task": task,
                                 "question": i, "value": v})  # fmt: skip
    return pd.DataFrame(rows)


def test_change_table_on_a_table_with_a_known_answer():
    post = {"a": [1.0] * 10, "b": [0.0] * 10}
    edits = {("dare", 0.5): [{"a": [1.0] * 9 + [0.0], "b": [0.0] * 10}, {"a": [1.0] * 10, "b": [1.0] + [0.0] * 9}]}
    out = uncertainty.change_table(_questions(edits, post), ["method", "p"], per_task=True)
    dare = out[out.method == "dare"].set_index("task")
    # mask 0: a -0.1, b 0; mask 1: a 0, b +0.1 -> a -0.05, b +0.05, mean 0
    assert dare.loc["mean", "value"] == pytest.approx(0.0)
    assert dare.loc["a", "value"] == pytest.approx(-0.05) and dare.loc["b", "value"] == pytest.approx(0.05)
    assert dare.loc["mean", "draws"] == 2 and dare.loc["mean", "n"] == 10
    ref = out[(out.method == "extrapolate") & (out.task == "mean")]
    assert ref.value.item() == 0.0 and ref.low.item() == 0.0


def test_points_never_print_a_negative_zero():
    from unifieddelta.uncertainty import pts

    assert pts(-0.0004) == "0.0" and pts(0.0004) == "0.0" and pts(-0.012) == "-1.2" and pts(0.012) == "+1.2"
    assert Interval(-0.007, -0.015, -0.0002).points() == "-0.7 (-1.5 to 0.0)"


def test_identical_draws_give_an_interval_that_holds_the_estimate():
    """Two masks that each change nothing: the estimate is 0 and the interval must not sit a rounding error beside
    it (a plot's error bar cannot be negative)."""
    rng = np.random.default_rng(0)  # six tasks of 40 questions, as on the Gemma page, where this was found
    post = {f"t{i}": list((rng.random(40) < 0.6).astype(float)) for i in range(6)}
    v = paired_change(post, [post, post])
    assert v.low <= v.value <= v.high and v.value == 0.0
