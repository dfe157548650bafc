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
    return dict(
        tasks=tasks, limit=min(limit or 4, 4) if smoke else limit, device=device, dtype=dtype, fewshot=fewshot or None
    )


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
                    trials.append(
                        experiments.trial(p, method, params, seed, measure=("term",), rule=rule, points=int(c), **m)
                    )
    return trials


@_chapter
def dare(
    *, pair, pre, post, loss_data, tasks, limit, fewshot, seeds, ps, methods, device, dtype, smoke, **_
) -> list[Trial]:
    """DARE (k = 0) against drop-only over the drop rate p: every quantity, at several seeds."""
    p = _pair(pair, pre, post, smoke, loss_data)
    m = _measure(tasks, limit, device, dtype, smoke, fewshot)
    trials = experiments.references(p, measure=ALL, **m)
    for method in methods:
        trials += experiments.grid(p, method, {"p": shrink(ps, smoke)}, seeds[:1] if smoke else seeds, measure=ALL, **m)
    return trials


@_chapter
def kfamily(
    *,
    pair,
    pre,
    post,
    loss_data,
    tasks,
    limit,
    fewshot,
    seeds,
    ps,
    ks,
    vision_pairs,
    vision_seeds,
    device,
    dtype,
    smoke,
    **_,
) -> list[Trial]:
    """DARE's k-family over the p × k grid: the language pair at several seeds, each vision pair at ``vision_seeds``."""
    grid = {"p": shrink(ps, smoke), "k": shrink(ks, smoke)}
    p = _pair(pair, pre, post, smoke, loss_data)
    m = _measure(tasks, limit, device, dtype, smoke, fewshot)
    trials = experiments.references(p, measure=ALL, **m)
    trials += experiments.grid(p, "dare", grid, seeds[:1] if smoke else seeds, measure=ALL, **m)
    for name in shrink(vision_pairs, smoke):
        v = experiments.pair(name, smoke=smoke)
        vm = _measure(None, None, device, dtype, smoke)
        trials += experiments.references(v, measure=ALL, **vm)
        trials += experiments.grid(v, "dare", grid, vision_seeds[:1] if smoke else vision_seeds, measure=ALL, **vm)
    return trials


@_chapter
def randomness(
    *, pair, pre, post, loss_data, tasks, limit, fewshot, seeds, ks, p_random, device, dtype, smoke, **_
) -> list[Trial]:
    """The paper's Table 1: random (DARE's k-family at ``p_random``), sign-biased and product-biased edits per k."""
    p = _pair(pair, pre, post, smoke, loss_data)
    m = _measure(tasks, limit, device, dtype, smoke, fewshot)
    ks = shrink(ks, smoke)
    trials = experiments.references(p, measure=ALL, **m)
    trials += experiments.grid(
        p, "dare", {"k": ks}, seeds[:1] if smoke else seeds, fixed={"p": p_random}, measure=ALL, **m
    )
    for method in ("sign_biased", "product_biased"):
        trials += experiments.grid(p, method, {"k": ks}, measure=ALL, **m)
    return trials


def size_axis_pairs(sft_lrs: Sequence[float], widths: Sequence[int]) -> list[str]:
    """Zoo names of the delta-size axis (the default width at each SFT learning rate) and the width family."""
    from . import zoo

    default = zoo.recipe_for("tiny-lm").sft_lr
    names = ["tiny-lm" if lr == default else f"tiny-lm[sft_lr={lr!r}]" for lr in sft_lrs]
    return names + [f"tiny-lm/{w}" for w in widths if w != zoo.DEFAULT_WIDTH]


@_chapter
def dare_works(*, sft_lrs, widths, tasks, limit, fewshot, seeds, ps, device, dtype, smoke, **_) -> list[Trial]:
    """DARE over p on the delta-size axis (``sft_lrs`` at the default width) and the width family (``widths``):
    where it stops working."""
    m = _measure(tasks, limit, device, dtype, smoke, fewshot)
    trials = []
    for name in shrink(size_axis_pairs(sft_lrs, widths), smoke):
        p = experiments.pair(name, smoke=smoke)
        trials += experiments.references(p, measure=ALL, **m)
        trials += experiments.grid(p, "dare", {"p": shrink(ps, smoke)}, seeds[:1] if smoke else seeds, measure=ALL, **m)
    return trials


@_chapter
def bitdelta(
    *, pair, pre, post, loss_data, tasks, limit, fewshot, seeds, scales, bits, dare_ps, device, dtype, smoke, **_
) -> list[Trial]:
    """BitDelta against DARE; the magnitude as a multiple of the mean (one magnitude, or random normal/uniform
    magnitudes with that mean, at several seeds); magnitude bits (2^b equal-count blocks)."""
    p = _pair(pair, pre, post, smoke, loss_data)
    m = _measure(tasks, limit, device, dtype, smoke, fewshot)
    seeds = seeds[:1] if smoke else seeds
    trials = experiments.references(p, measure=ALL, **m)
    trials += experiments.grid(p, "dare", {"p": shrink(dare_ps, smoke)}, seeds, measure=ALL, **m)
    for magnitudes in ("mean", "normal", "uniform"):
        trials += experiments.grid(
            p, "bitdelta", {"scale": shrink(scales, smoke)}, seeds, fixed={"magnitudes": magnitudes}, measure=ALL, **m
        )
    trials += experiments.grid(p, "bitdelta", {"bits": shrink(bits, smoke)}, measure=ALL, **m)
    return trials


@_chapter
def structure(
    *, pair, pre, post, loss_data, tasks, limit, fewshot, seeds, fractions, device, dtype, smoke, **_
) -> list[Trial]:
    """Low rank (a fraction of the rank) and magnitude trimming (a fraction of the entries) against DARE keeping
    the same fraction of entries at random (p = 1 − fraction)."""
    p = _pair(pair, pre, post, smoke, loss_data)
    m = _measure(tasks, limit, device, dtype, smoke, fewshot)
    fractions = shrink(fractions, smoke)
    trials = experiments.references(p, measure=ALL, **m)
    trials += experiments.grid(p, "low_rank", {"rank": [float(f) for f in fractions]}, measure=ALL, **m)
    trials += experiments.grid(p, "magnitude_trim", {"keep": fractions}, measure=ALL, **m)
    kept = [round(1.0 - f, 10) for f in fractions if f < 1.0]
    trials += experiments.grid(p, "dare", {"p": kept}, seeds[:1] if smoke else seeds, measure=ALL, **m)
    return trials


@_chapter
def expo(
    *,
    pair,
    dpo_pair,
    pre,
    post,
    loss_data,
    tasks,
    limit,
    fewshot,
    alphas_dpo,
    alphas,
    device,
    dtype,
    smoke,
    dpo_pre,
    dpo_post,
    dpo_loss_data,
    dpo_beta,
    dpo_examples,
    **_,
) -> list[Trial]:
    """EXPO: extrapolation along the DPO delta (the DPO loss) over ``alphas_dpo``; interpolation against
    extrapolation over ``alphas`` on the SFT pair and on the DPO pair. The DPO pair: the zoo's ``dpo_pair``, or
    ``dpo_pre`` -> ``dpo_post`` checkpoints with preference data ``dpo_loss_data`` (``dpo_examples`` of its
    triples; None: all) and β ``dpo_beta``."""
    m = _measure(tasks, limit, device, dtype, smoke, fewshot)
    if dpo_pre or dpo_post:
        dpo = experiments.pair(
            pre=dpo_pre or None, post=dpo_post or None, kind="dpo", loss_data=dpo_loss_data or None, dpo_beta=dpo_beta
        )
    else:
        dpo = experiments.pair(dpo_pair, smoke=smoke)
    sft = _pair(pair, pre, post, smoke, loss_data)
    dpo_tasks = None if tasks is None else [*tasks, "preference"]
    d = {**m, "tasks": dpo_tasks, "loss_examples": dpo_examples}
    trials = experiments.grid(dpo, "extrapolate", {"alpha": shrink(alphas_dpo, smoke)}, measure=ALL, **d)
    trials += experiments.grid(dpo, "extrapolate", {"alpha": shrink(alphas, smoke)}, measure=ALL, **d)
    trials += experiments.grid(sft, "extrapolate", {"alpha": shrink(alphas, smoke)}, measure=ALL, **m)
    return list(dict.fromkeys(trials))


@_chapter
def minilm(
    *,
    pair,
    pre,
    post,
    compare,
    tasks,
    limit,
    loss_pairs,
    seeds,
    dare_ps,
    drop_ps,
    bits,
    ranks,
    keeps,
    alphas,
    device,
    dtype,
    smoke,
    **_,
) -> Plan:
    """The paper's edits on a real delta nobody here trained (``minilm-sre``, or pre/post sentence encoders): DARE
    over p at several masks, drop-only, BitDelta, low rank, trimming, extrapolation and interpolation; the term, the
    exact change and the embedding scores on held-out SRE paraphrases (``loss_pairs`` of them in the loss, ``limit``
    in the scores; None: all). ``compare``: zoo pairs shown beside it for the delta's size. Smoke: DARE's first and
    last p, the last value of every other grid, 8 pairs in the loss and 16 in the scores."""
    p = experiments.pair(pre=pre, post=post, kind="embedding") if pre or post else experiments.pair(pair)
    m = dict(
        measure=("term", "loss_change", "scores"),
        tasks=tasks,
        loss_examples=8 if smoke else loss_pairs,
        limit=16 if smoke else limit,
        device=device,
        dtype=dtype,
    )
    seeds = seeds[:1] if smoke else seeds
    last = (lambda values: list(values)[-1:]) if smoke else list  # smoke: each other edit once (3 s a trial)
    trials = experiments.references(p, **m)
    trials += experiments.grid(p, "dare", {"p": shrink(dare_ps, smoke)}, seeds, **m)
    trials += experiments.grid(p, "drop_only", {"p": last(drop_ps)}, seeds[:1], **m)
    trials += experiments.grid(p, "bitdelta", {"bits": last(bits)}, **m)
    trials += experiments.grid(p, "low_rank", {"rank": [float(r) for r in last(ranks)]}, **m)
    trials += experiments.grid(p, "magnitude_trim", {"keep": last(keeps)}, **m)
    trials += experiments.grid(p, "extrapolate", {"alpha": last(alphas)}, **m)
    return Plan("minilm", list(dict.fromkeys(trials)), [p, *(experiments.pair(c, smoke=smoke) for c in compare)])


@_chapter
def classification(*, chapters, smoke, **_) -> Plan:
    """Every trial the other chapters measure (``chapters``: notebook name -> its parameters, given by the
    profile), to be sorted by the sign of the term."""
    trials = []
    for name, params in chapters.items():
        trials += plan(name, **{**params, "smoke": smoke or params.get("smoke", False)}).trials
    return Plan("classification", list(dict.fromkeys(trials)))


@_chapter
def predicts(
    *,
    chapters,
    pair,
    tasks,
    limit,
    fewshot,
    sigmas,
    noise_seeds,
    loss_tasks,
    edits,
    device,
    dtype,
    smoke,
    pre,
    post,
    loss_data,
    **_,
) -> Plan:
    """What the term predicts: every trial the other chapters measure (``chapters``, as for the classification),
    Gaussian perturbations D of growing relative size ``sigmas`` on ``pair`` (or pre/post; term, exact change,
    scores), and ``edits`` with the term taken on other loss data, one at a time (``loss_tasks``: a zoo pair's task
    names, each task's held-out answers; for pre/post, loss-data specs: ``hf:…`` or JSONL files)."""
    trials = classification(chapters=chapters, smoke=smoke).trials
    p = _pair(pair, pre, post, smoke, loss_data)
    m = _measure(tasks, limit, device, dtype, smoke, fewshot)
    trials += experiments.references(p, measure=ALL, **m)
    trials += experiments.grid(
        p,
        "gaussian",
        {"sigma": shrink(sigmas, smoke)},
        shrink(noise_seeds, smoke),
        measure=("term", "loss_change", "scores"),
        **m,
    )
    for task in shrink(loss_tasks, smoke):
        q = (
            experiments.pair(pre=pre, post=post, loss_data=task)
            if pre or post
            else experiments.pair(pair, smoke=smoke, loss_data=f"task:{task}")
        )
        for method, params in _edits(edits):
            trials.append(
                experiments.trial(q, method, params, measure=("term", "loss_change"), device=device, dtype=dtype)
            )
    return Plan("predicts", list(dict.fromkeys(trials)))


# ---------------------------------------------------------------------------------------------- summaries


def styler_text(styler) -> str:
    """A pandas Styler as aligned plain text with its formatting applied (and its caption above): the form the
    book's PDF shows, where the HTML table cannot go."""
    rows = [line.split("\x1f") for line in styler.to_string(delimiter="\x1f").splitlines()]
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(max(map(len, rows)))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    caption = styler.caption if isinstance(styler.caption, str) else ""
    return "\n".join(([caption, ""] if caption else []) + lines)


def _tables_for_the_pdf() -> None:
    """In a notebook kernel: give every pandas Styler a text/markdown form beside its HTML (a code block of
    :func:`styler_text`), which the LaTeX builder of ``make pdf`` prefers to the HTML it cannot render (it would
    print the Styler's repr); the HTML pages keep the HTML table, which myst-nb ranks first."""
    try:
        from IPython import get_ipython
        from pandas.io.formats.style import Styler
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.display_formatter.formatters["text/markdown"].for_type(
            Styler, lambda st: "```text\n" + styler_text(st) + "\n```"
        )


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


def with_columns(frame, *names):
    """``frame`` with the columns ``names`` added, empty, where it lacks them (the settings of an edit no chapter
    of the profile measured)."""
    return frame.reindex(columns=[*frame.columns, *(n for n in names if n not in frame)])


def per_trial(frame, pair: str | None = None):
    """One row per trial: its edit and settings, and the paper's left C = 5 term (grad mode), the first-order term,
    the exact change, the second-order term, ‖D‖, and the score change against post (mean over tasks)."""
    frame = frame if pair is None else frame[frame.pair == pair]
    settings = [c for c in frame.columns if c not in experiments.COLUMNS]
    keys = ["pair", "method", "edit", "seed", "trial"]
    base = frame.drop_duplicates("trial")[keys + settings].set_index("trial")
    left = (frame.quantity != "term") | ((frame["rule"] == "left") & (frame["points"] == 5) & (frame["mode"] == "grad"))
    values = frame[
        left & frame.quantity.isin(["term", "first_order", "loss_change", "second_order", "d_norm", "loss"])
    ].pivot_table(index="trial", columns="quantity", values="value", aggfunc="first")
    out = base.join(values)
    changes = _score_changes(frame)
    out["score_change"] = changes.groupby("trial").score_change.mean() if len(changes) else math.nan
    return out.reset_index()


def _score_changes(frame):
    """(trial, task, score_change): each primary score against the pair's own post-trained reference trial."""
    import pandas as pd

    out = []
    for name, group in experiments.scores(frame).groupby("pair"):
        post = reference_scores(frame, name)["post"]
        group = group[group.task.isin(post.index)]
        out.append(group.assign(score_change=group.value.to_numpy() - post[group.task].to_numpy()))
    return (
        pd.concat(out)[["trial", "task", "score_change"]]
        if out
        else pd.DataFrame(columns=["trial", "task", "score_change"])
    )


def task_changes(frame):
    """One row per trial and task: the score change against post on that task (the pair's own reference trial),
    with the trial's term (left, C = 5), first-order term, exact change and ‖D‖ beside it."""
    rows = per_trial(frame).set_index("trial")
    changes = _score_changes(frame)
    if changes.empty:
        return rows.iloc[:0]
    keep = [
        c
        for c in ("pair", "method", "edit", "seed", "term", "first_order", "loss_change", "d_norm", "loss")
        if c in rows
    ]
    return changes.join(rows[keep], on="trial")


def cheapest_rules(errors, budgets=(0.1, 0.01, 0.001)):
    """For each relative error budget: the (rule, points) with the fewest points whose worst error over the edits
    of ``errors`` (``rule_errors``) is within it, and that worst error; None where no rule measured meets it."""
    worst = errors.groupby(["rule", "points"])["error"].max().reset_index().sort_values(["points", "error"])
    out = {}
    for budget in budgets:
        ok = worst[worst.error <= budget]
        out[budget] = None if ok.empty else (ok.iloc[0].rule, int(ok.iloc[0].points), float(ok.iloc[0].error))
    return out


#: The columns of the paper's Table 1: which entries get k (random: DARE's mask; sign: Δ < 0; product: Δ·∇L < 0).
TABLE_ONE = {"dare": "random", "sign_biased": "sign-biased", "product_biased": "product-biased"}


def table_one(frame, p_random: float, pair: str | None = None):
    """The paper's Table 1 from a table holding the randomness chapter's trials: per k of the biased columns, the
    mean score over the pair's tasks (mean over masks) and the approximation term of each column (``TABLE_ONE``),
    the random column being DARE's k-family at drop rate ``p_random``."""
    import pandas as pd

    trials = with_columns(per_trial(frame, pair), "k", "p")
    trials = trials[trials.method.isin(TABLE_ONE) & trials.k.notna()].assign(column=lambda f: f.method.map(TABLE_ONE))
    ks = set(trials[trials.method != "dare"].k) or set(trials.k)
    trials = trials[trials.k.isin(ks) & ((trials.method != "dare") | (trials.get("p") == p_random))]
    post = float(reference_scores(frame, pair)["post"].mean())
    scores = trials.pivot_table(index="k", columns="column", values="score_change", aggfunc="mean") + post
    terms = trials.pivot_table(index="k", columns="column", values="term", aggfunc="mean")
    order = [c for c in TABLE_ONE.values() if c in scores]
    return pd.concat({"score (mean over tasks)": scores[order], "approximation term": terms[order]}, axis=1)


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
    return {
        name: ext[ext.alpha == alpha].groupby("task")["value"].mean() for name, alpha in (("pre", -1.0), ("post", 0.0))
    }


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
PAPER_CLASS = {
    "dare": "competitive",
    "drop_only": "decreased",
    "bitdelta": "decreased",
    "low_rank": "decreased",
    "magnitude_trim": "decreased",
    "sign_biased": "competitive",
    "product_biased": "decreased",
}


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
        settings = ", ".join(e[len(method) + 1 : -1] or "default settings" for e in rows.edit)
        parts.append(
            f"{method} on {pair} at {settings} ({'/'.join(rows.ours.unique())}; the paper: {rows.paper.iloc[0]})"
        )
    return "; ".join(parts) or "none"


def classify(frame, trials: Sequence[Trial], *, rule: str = "left", points: int = 5, tolerance: float = 0.01):
    """One row per pair and edit (settings, seeds averaged): the term (the paper's rule unless asked otherwise),
    the exact change, the mean score change against post, our class by the term's sign, the paper's class, and
    whether they agree."""
    import pandas as pd

    kinds = {t.pair.name: t.pair.kind for t in trials}
    params = {t.key: t.params for t in trials}
    terms = frame[
        (frame.quantity == "term") & (frame["rule"] == rule) & (frame["points"] == points) & (frame["mode"] == "grad")
    ]
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
        rows.append(
            {
                "_trial": group.trial.iloc[0],
                "pair": pair_name,
                "edit": edit,
                "method": method,
                "seeds": group.seed.nunique(),
                "term": term,
                "term_sd": sd,
                "loss_change": float(change.get((pair_name, edit), math.nan)),
                "score_change": score_change,
                "ours": ours,
                "paper": theirs or "—",
                "agree": "—" if theirs is None else ("yes" if theirs == ours else "no"),
            }
        )
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(
            columns=[
                "pair",
                "edit",
                "method",
                "seeds",
                "term",
                "term_sd",
                "loss_change",
                "score_change",
                "ours",
                "paper",
                "agree",
            ]
        )
    order = {
        m: i
        for i, m in enumerate(
            [
                "dare",
                "drop_only",
                "bitdelta",
                "low_rank",
                "magnitude_trim",
                "extrapolate",
                "sign_biased",
                "product_biased",
            ]
        )
    }
    out["_order"] = out.method.map(lambda m: order.get(m, len(order)))
    out["_value"] = [
        tuple(v for _, v in sorted(params[t].items()) if isinstance(v, (int, float))) for t in out.pop("_trial")
    ]  # settings in numeric order: p = 0.1, 0.2, ...
    return out.sort_values(["pair", "_order", "_value"]).drop(columns=["_order", "_value"]).reset_index(drop=True)


def score_drops(frame, method: str = "dare", settings: Sequence[str] = ("p", "k")):
    """Per pair and setting: the mean score drop against the pair's post-trained model (over tasks and seeds, in
    share correct; > 0 is worse), beside the size of the edit, ‖D‖/‖ΔW‖ (mean over seeds)."""

    trials = per_trial(frame)
    rows = with_columns(trials[trials.method == method], *settings)
    out = rows.assign(
        drop=-rows.score_change, relative_d=rows.d_norm / _delta_norms(frame).reindex(rows.pair).to_numpy()
    )
    return (
        out.groupby(["pair", *settings])[["drop", "relative_d", "term", "loss_change", "second_order"]]
        .mean()
        .reset_index()
    )


def _delta_norms(frame):
    return frame[frame.quantity == "delta_norm"].groupby("pair")["value"].first()


def rank_correlation(x, y) -> float:
    """Spearman's ρ of two sequences (NaN pairs dropped)."""
    import pandas as pd

    both = pd.DataFrame({"x": list(x), "y": list(y)}).dropna()
    return float(both.corr(method="spearman").iloc[0, 1]) if len(both) > 2 else math.nan


def kfamily_pattern(drops) -> dict:
    """The paper's pattern for the k-family, tested on one pair's drops (columns p, k, drop): does the drop grow
    with |k| at each p (ρ(|k|, drop), averaged over p), does the spread over k grow with p (ρ(p, spread)), and is the
    worst k at each p negative (the share of p at which it is)? Beside it, ρ of the drop with |1 − k|·√(p/(1−p)),
    the size of D relative to ΔW that the variance argument predicts."""
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


def first_order_scale(pair: Pair, device: str = "cpu", dtype: str = "float32") -> float:
    """√Σ(ΔW_ij ∇_ij L)² at W_post on the pair's loss: DARE's first-order term ⟨∇L, D⟩ over masks has mean 0 and
    standard deviation √(p/(1−p)) times this (the k-family: times |1 − k| more)."""
    from . import deltas

    session = experiments.Session(pair, device, dtype, False)
    grad = session.gradient(None)
    total = sum(
        float((d * grad[name].double()).pow(2).sum()) for name, d in deltas.iter_deltas(session.pre, session.post)
    )
    return math.sqrt(total)


def relative_size(pair: Pair) -> float:
    """‖ΔW‖ / ‖W_pre‖ over every tensor the pair's delta covers, as one vector: the size of the whole delta."""
    from . import deltas
    from .checkpoints import open_checkpoint

    pre, post = pair.folders()
    change = base = 0.0
    with open_checkpoint(pre) as side:
        for name, d in deltas.iter_deltas(pre, post):
            change += float(d.pow(2).sum())
            base += float(side.get(name).double().pow(2).sum())
    return math.sqrt(change / base) if base else math.nan


def layer_of(name: str) -> str:
    """``layer 3`` for a tensor of an encoder's or decoder's block N = 3, else the first part of its name."""
    import re

    found = re.search(r"\.(?:layer|layers|h)\.(\d+)\.", name)
    return f"layer {found.group(1)}" if found else name.split(".")[0]


def paraphrase_check(pair: Pair, split: str = "fit", n: int | None = None, device: str = "cpu", dtype: str = "float32"):
    """Pre and post of an embedding pair on SRE paraphrase pairs of ``split``: the loss (mean 1 − cos), retrieval
    accuracy, the mean cosine of a sentence with its paraphrase and with an unrelated sentence (the next pair's)."""
    import pandas as pd
    import torch
    from transformers import AutoTokenizer

    from .evaluate import embed, retrieval_hits
    from .tasks import sre

    pairs = sre.pairs(split, n=n)
    sides = dict(zip(("pre", "post"), pair.folders()))
    tokenizer = AutoTokenizer.from_pretrained(sides["post"])
    rows = {}
    for side, folder in sides.items():
        model = experiments.KINDS["embedding"].load(folder, device, getattr(torch, dtype))
        e = embed(model, tokenizer, [p["a"] for p in pairs] + [p["b"] for p in pairs]).double()
        a, b = e[: len(pairs)], e[len(pairs) :]
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        other = torch.nn.functional.cosine_similarity(a, b.roll(1, 0), dim=-1)
        rows[side] = {
            "loss": float((1 - cos).mean()),
            "retrieval": float(retrieval_hits(a, b).double().mean()),
            "cos paraphrase": float(cos.mean()),
            "cos unrelated": float(other.mean()),
        }
    return pd.DataFrame(rows).T


def entries_at_least(pair: Pair, threshold: float) -> tuple[int, int]:
    """(entries of the pair's delta with |ΔW_ij| ≥ ``threshold``, all its entries), counted exactly."""
    from . import deltas

    big = total = 0
    for _, d in deltas.iter_deltas(pair.folders()[0], pair.folders()[1]):
        big += int((d.abs() >= threshold).sum())
        total += d.numel()
    return big, total


_tables_for_the_pdf()
