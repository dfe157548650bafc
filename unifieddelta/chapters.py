"""What each chapter of the book measures: one plan per notebook, from its parameters to its trials.

A notebook's parameters cell is the one place a chapter's grid is written. Its setup cell calls
``chapters.bind(NAME, globals())``, which hands the plan function of that name (``PLANS``) the parameters its
signature names, and the ones every chapter shares as a :class:`Setting`. The plan lists the trials and pairs
without running anything, so ``unifieddelta book --dry-run`` calls the same function on the profile's values.
``smoke=True`` shrinks every grid to its first and last values, one seed and a few documents, on the zoo's smoke
recipes (the test suite runs every notebook so).

From a figure to the store: a page draws ``tables.*(table)`` (or ``experiments.scores(table)``), ``table`` is
``plan.run()``, which measures what the store lacks and returns ``experiments.table(plan.trials)``: one row per
stored record.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from . import experiments
from .errors import InvalidParameterError
from .pairs import Pair

ALL = ("term", "loss_change", "second_order", "scores")


@dataclass
class Plan:
    """A chapter's trials and pairs, and the settings its page needs to say what was measured (``facts``).
    ``run`` measures what the store lacks and returns the tidy table."""

    name: str
    trials: list[experiments.Trial]
    pairs: list[Pair] = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    setting: "Setting | None" = None  # what the chapter was bound with (bind sets it): the device and dtype in use

    def __post_init__(self):
        self.pairs = list(dict.fromkeys([*self.pairs, *(t.pair for t in self.trials)]))

    def run(self, *, store=None, progress: bool = False, per_tensor: bool = False):
        return experiments.run(self.trials, store=store, progress=progress, per_tensor=per_tensor)

    def stored(self, store=None) -> tuple[int, int]:
        return experiments.stored(self.trials, store)

    def questions(self, store=None):
        """Each task's score on every question, for the trials' stored scores (``experiments.question_table``)."""
        return experiments.question_table(self.trials, store=store)


@dataclass(frozen=True)
class Setting:
    """What the language chapters share: the pair (a zoo name, or ``pre``/``post`` checkpoints with ``loss_data``),
    how its scores are taken (``tasks``, ``limit``, ``fewshot``), where it runs, and whether this is a smoke run.
    A notebook without one of these parameters gets the neutral value (no override, all tasks)."""

    pair: str = ""
    pre: str = ""
    post: str = ""
    loss_data: str = ""
    tasks: Sequence[str] | None = None
    limit: int | None = None
    fewshot: Mapping[str, int] | None = None
    device: str = "cpu"
    dtype: str = "float32"
    smoke: bool = False

    def the_pair(self, loss_data: bool = True) -> Pair:
        """The chapter's pair: pre/post when given (with the loss data), else the zoo pair."""
        if self.pre or self.post:
            data = self.loss_data if loss_data else ""
            return experiments.pair(pre=self.pre or None, post=self.post or None, loss_data=data or None)
        return experiments.pair(self.pair, smoke=self.smoke)

    def scoring(self) -> dict:
        """The measurement options of a scored trial (smoke: at most four documents per task)."""
        limit = min(self.limit or 4, 4) if self.smoke else self.limit
        return dict(tasks=self.tasks, limit=limit, device=self.device, dtype=self.dtype, fewshot=self.fewshot or None)

    def shrink(self, values: Sequence) -> list:
        """The first and the last value in smoke mode, else all of them."""
        values = list(values)
        return values if not self.smoke or len(values) <= 2 else [values[0], values[-1]]

    def seeds(self, seeds: Sequence[int]) -> list[int]:
        """One seed in smoke mode, else all of them."""
        return list(seeds[:1] if self.smoke else seeds)


PLANS: dict[str, Callable[..., Plan]] = {}


def _chapter(fn: Callable[..., list | Plan]) -> Callable[..., Plan]:
    def plan(s: Setting, **params) -> Plan:
        out = fn(s, **params)
        return out if isinstance(out, Plan) else Plan(fn.__name__, out)

    plan.__name__, plan.__doc__, plan.__signature__ = fn.__name__, fn.__doc__, inspect.signature(fn)
    PLANS[fn.__name__] = plan
    return plan


def bind(name: str, namespace: Mapping[str, Any]) -> Plan:
    """The plan of the notebook ``name`` for the parameters in ``namespace`` (a notebook's ``globals()``, or a
    profile's resolved parameters): its plan function's own parameters by name, the shared ones as a
    :class:`Setting`. A parameter the plan needs and the namespace lacks raises, naming it."""
    if name not in PLANS:
        return Plan(name, [])  # a page that measures nothing (the setup page, say)
    wanted = [n for n in inspect.signature(PLANS[name]).parameters if n != "s"]
    missing = [n for n in wanted if n not in namespace]
    if missing:
        raise InvalidParameterError(f"chapter {name}: no value for parameter(s) {', '.join(missing)}")
    shared = {f.name: namespace[f.name] for f in dataclasses.fields(Setting) if f.name in namespace}
    shared["device"], shared["dtype"] = resolve(shared.get("device", "cpu"), shared.get("dtype", "float32"))
    setting = Setting(**shared)
    plan = PLANS[name](setting, **{n: namespace[n] for n in wanted})
    plan.setting = setting
    return plan


def resolve(device: str, dtype: str) -> tuple[str, str]:
    """``device="best"``: a GPU when torch sees one, else the CPU; ``dtype="best"``: bfloat16 on a GPU, float32 on the
    CPU. Anything else as given (a notebook launched on a GPU runtime picks the GPU without being told)."""
    import torch

    gpu = torch.cuda.is_available()
    if device == "best":
        device = "cuda" if gpu else "cpu"
    if dtype == "best":
        dtype = "bfloat16" if device not in ("cpu",) and gpu else "float32"
    return device, dtype


def plan(name: str, **params) -> Plan:
    """``bind(name, params)``: the plan of the notebook ``name`` for these parameters."""
    return bind(name, params)


def edit_list(items) -> list[tuple[str, dict]]:
    """``[["dare", {"p": 0.5}], "bitdelta", ...]`` -> ``[("dare", {"p": 0.5}), ("bitdelta", {})]``."""
    return [(e, {}) if isinstance(e, str) else (e[0], dict(e[1])) for e in items]


# ---------------------------------------------------------------------------------------------- the chapters


@_chapter
def delta(s: Setting, *, compare) -> Plan:
    """What post-training changes: statistics of the deltas of the pair (or of pre/post) and the ``compare``
    pairs (no trials)."""
    return Plan("delta", [], [s.the_pair(loss_data=False), *(experiments.pair(p, smoke=s.smoke) for p in compare)])


@_chapter
def identity(s: Setting, *, edits, rules, points, seeds) -> list:
    """The exact loss change against the approximation term for each rule and number of points, for the paper's
    five edits; the paper's left C = 5 in jvp mode too (its cost against grad mode); per-tensor terms."""
    p, m = s.the_pair(), dict(device=s.device, dtype=s.dtype)
    trials = []
    for method, params in edit_list(edits):
        for seed in s.seeds(seeds):
            trials.append(experiments.trial(p, method, params, seed, measure=("loss_change", "second_order"), **m))
            trials.append(experiments.trial(p, method, params, seed, measure=("term",), mode="jvp", **m))
            trials.append(experiments.trial(p, method, params, seed, measure=("term",), **m))  # the paper's term
            for rule in s.shrink(rules):
                for c in s.shrink(points):
                    if rule == "trapezoid" and c < 2:
                        continue
                    rule_trial = experiments.trial(
                        p, method, params, seed, measure=("term",), rule=rule, points=int(c), **m
                    )
                    trials.append(rule_trial)
    return trials


@_chapter
def dare(s: Setting, *, seeds, ps, methods) -> list:
    """DARE (k = 0) against drop-only over the drop rate p: every quantity, at several seeds."""
    p, m = s.the_pair(), s.scoring()
    trials = experiments.references(p, measure=ALL, **m)
    for method in methods:
        trials += experiments.grid(p, method, {"p": s.shrink(ps)}, s.seeds(seeds), measure=ALL, **m)
    return trials


@_chapter
def kfamily(s: Setting, *, seeds, ps, ks, vision_pairs, vision_seeds) -> list:
    """DARE's k-family over the p × k grid: the language pair at several seeds, each vision pair at
    ``vision_seeds``."""
    grid = {"p": s.shrink(ps), "k": s.shrink(ks)}
    p, m = s.the_pair(), s.scoring()
    trials = experiments.references(p, measure=ALL, **m)
    trials += experiments.grid(p, "dare", grid, s.seeds(seeds), measure=ALL, **m)
    vm = Setting(device=s.device, dtype=s.dtype, smoke=s.smoke).scoring()
    for name in s.shrink(vision_pairs):
        v = experiments.pair(name, smoke=s.smoke)
        trials += experiments.references(v, measure=ALL, **vm)
        trials += experiments.grid(v, "dare", grid, s.seeds(vision_seeds), measure=ALL, **vm)
    return trials


@_chapter
def randomness(s: Setting, *, seeds, ks, p_random) -> list:
    """The paper's Table 1: random (DARE's k-family at ``p_random``), sign-biased and product-biased edits per k."""
    p, m, ks = s.the_pair(), s.scoring(), s.shrink(ks)
    trials = experiments.references(p, measure=ALL, **m)
    trials += experiments.grid(p, "dare", {"k": ks}, s.seeds(seeds), fixed={"p": p_random}, measure=ALL, **m)
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
def dare_works(s: Setting, *, sft_lrs, widths, seeds, ps) -> list:
    """DARE over p on the delta-size axis (``sft_lrs`` at the default width) and the width family (``widths``):
    where it stops working."""
    m = s.scoring()
    trials = []
    for name in s.shrink(size_axis_pairs(sft_lrs, widths)):
        p = experiments.pair(name, smoke=s.smoke)
        trials += experiments.references(p, measure=ALL, **m)
        trials += experiments.grid(p, "dare", {"p": s.shrink(ps)}, s.seeds(seeds), measure=ALL, **m)
    return trials


@_chapter
def bitdelta(s: Setting, *, seeds, scales, bits, dare_ps, scope, ablation_scope) -> list:
    """BitDelta against DARE, on the tensors ``scope`` selects (``linear``: the linear layers inside the blocks, as
    BitDelta's authors binarise them); the magnitude as a multiple of the mean (one magnitude, or random
    normal/uniform magnitudes with that mean, at several seeds); magnitude bits (2^b equal-count blocks). The
    ablation: one magnitude over ``scales`` and the ``bits`` on the tensors ``ablation_scope`` selects (``all``:
    embeddings, norms and the head binarised too)."""
    p, m, seeds = s.the_pair(), s.scoring(), s.seeds(seeds)
    trials = experiments.references(p, measure=ALL, **m)
    trials += experiments.grid(p, "dare", {"p": s.shrink(dare_ps)}, seeds, measure=ALL, **m)
    for magnitudes in ("mean", "normal", "uniform"):
        fixed = {"magnitudes": magnitudes}
        trials += experiments.grid(
            p, "bitdelta", {"scale": s.shrink(scales)}, seeds, fixed=fixed, measure=ALL, scope=scope, **m
        )
    trials += experiments.grid(p, "bitdelta", {"bits": s.shrink(bits)}, measure=ALL, scope=scope, **m)
    if ablation_scope and ablation_scope != scope:
        trials += experiments.grid(p, "bitdelta", {"scale": s.shrink(scales)}, measure=ALL, scope=ablation_scope, **m)
        trials += experiments.grid(p, "bitdelta", {"bits": s.shrink(bits)}, measure=ALL, scope=ablation_scope, **m)
    return list(dict.fromkeys(trials))


@_chapter
def structure(s: Setting, *, seeds, fractions) -> list:
    """Low rank (a fraction of the rank) and magnitude trimming (a fraction of the entries) against DARE keeping
    the same fraction of entries at random (p = 1 − fraction)."""
    p, m, fractions = s.the_pair(), s.scoring(), s.shrink(fractions)
    trials = experiments.references(p, measure=ALL, **m)
    trials += experiments.grid(p, "low_rank", {"rank": [float(f) for f in fractions]}, measure=ALL, **m)
    trials += experiments.grid(p, "magnitude_trim", {"keep": fractions}, measure=ALL, **m)
    kept = [round(1.0 - f, 10) for f in fractions if f < 1.0]
    trials += experiments.grid(p, "dare", {"p": kept}, s.seeds(seeds), measure=ALL, **m)
    return trials


@_chapter
def expo(s: Setting, *, dpo_pair, alphas_dpo, alphas, dpo_pre, dpo_post, dpo_loss_data, dpo_beta, dpo_examples) -> list:
    """EXPO: extrapolation along the DPO delta (the DPO loss) over ``alphas_dpo``; interpolation against
    extrapolation over ``alphas`` on the SFT pair and on the DPO pair. The DPO pair: the zoo's ``dpo_pair``, or
    ``dpo_pre`` -> ``dpo_post`` checkpoints with preference data ``dpo_loss_data`` (``dpo_examples`` of its
    triples; None: all) and β ``dpo_beta``."""
    if dpo_pre or dpo_post:
        dpo = experiments.pair(
            pre=dpo_pre or None, post=dpo_post or None, kind="dpo", loss_data=dpo_loss_data or None, dpo_beta=dpo_beta
        )
    else:
        dpo = experiments.pair(dpo_pair, smoke=s.smoke)
    m = s.scoring()
    d = {**m, "tasks": None if s.tasks is None else [*s.tasks, "preference"], "loss_examples": dpo_examples}
    trials = experiments.grid(dpo, "extrapolate", {"alpha": s.shrink(alphas_dpo)}, measure=ALL, **d)
    trials += experiments.grid(dpo, "extrapolate", {"alpha": s.shrink(alphas)}, measure=ALL, **d)
    trials += experiments.grid(s.the_pair(), "extrapolate", {"alpha": s.shrink(alphas)}, measure=ALL, **m)
    return list(dict.fromkeys(trials))


@_chapter
def minilm(s: Setting, *, compare, loss_pairs, seeds, dare_ps, drop_ps, bits, ranks, keeps, alphas) -> Plan:
    """The paper's edits on a real delta nobody here trained (``minilm-sre``, or pre/post sentence encoders): DARE
    over p at several masks, drop-only, BitDelta, low rank, trimming, extrapolation and interpolation; the term, the
    exact change and the embedding scores on held-out SRE paraphrases (``loss_pairs`` of them in the loss, ``limit``
    in the scores; None: all). ``compare``: zoo pairs shown beside it for the delta's size. Smoke: DARE's first and
    last p, the last value of every other grid, 8 pairs in the loss and 16 in the scores (``facts``)."""
    real = experiments.pair(pre=s.pre, post=s.post, kind="embedding") if s.pre or s.post else experiments.pair(s.pair)
    facts = {"loss_pairs": 8 if s.smoke else loss_pairs, "score_pairs": 16 if s.smoke else s.limit}
    facts["check_pairs"] = 16 if s.smoke else None  # fit/check pairs of the data check (None: all)
    m = dict(measure=("term", "loss_change", "scores"), tasks=s.tasks, device=s.device, dtype=s.dtype)
    m.update(loss_examples=facts["loss_pairs"], limit=facts["score_pairs"])
    seeds = s.seeds(seeds)
    last = (lambda values: list(values)[-1:]) if s.smoke else list  # smoke: each other edit once (3 s a trial)
    trials = experiments.references(real, **m)
    trials += experiments.grid(real, "dare", {"p": s.shrink(dare_ps)}, seeds, **m)
    trials += experiments.grid(real, "drop_only", {"p": last(drop_ps)}, seeds[:1], **m)
    trials += experiments.grid(real, "bitdelta", {"bits": last(bits)}, **m)
    trials += experiments.grid(real, "low_rank", {"rank": [float(r) for r in last(ranks)]}, **m)
    trials += experiments.grid(real, "magnitude_trim", {"keep": last(keeps)}, **m)
    trials += experiments.grid(real, "extrapolate", {"alpha": last(alphas)}, **m)
    pairs = [real, *(experiments.pair(c, smoke=s.smoke) for c in compare)]
    return Plan("minilm", list(dict.fromkeys(trials)), pairs, facts)


@_chapter
def gemma(
    s: Setting, *, compare, dpo_pair, dpo_examples, seeds, dare_ps, ks, k_ps, ranks, keeps, alphas_dpo, rule, points
):
    """The paper's core edits on a real pretrained LM post-trained here (``gemma-270m``), and the same edits on
    ``compare`` (the zoo's LM, trained from scratch on the same SFT data): DARE over p at ``seeds`` masks, the
    k-family slice ``ks`` × ``k_ps`` (one mask), BitDelta on the linear layers, low rank and trimming, each with the
    term by ``rule``/``points`` (cheaper than the paper's left C = 5, which DARE at the last of ``k_ps`` and BitDelta
    also take), the exact change and the scores; EXPO's α on ``dpo_pair`` (DPO loss on ``dpo_examples`` triples)."""
    paper_rule = dict(measure=ALL[:2], device=s.device, dtype=s.dtype)  # the identity check: left C = 5
    by_rule = dict(paper_rule, rule=rule, points=int(points))
    scored = {**by_rule, **s.scoring(), "measure": ("term", "loss_change", "scores")}
    pairs, trials = [s.the_pair(), *(experiments.pair(c, smoke=s.smoke) for c in compare)], []
    for p in pairs:
        trials += experiments.references(p, **{**scored, "measure": ("loss_change", "scores")})
        trials += experiments.grid(p, "dare", {"p": s.shrink(k_ps)[-1:]}, s.seeds(seeds)[:1], **paper_rule)
        trials += experiments.grid(p, "bitdelta", {}, scope="linear", **paper_rule)
        trials += experiments.grid(p, "dare", {"p": s.shrink(dare_ps)}, s.seeds(seeds), **scored)
        trials += experiments.grid(p, "dare", {"p": s.shrink(k_ps), "k": s.shrink(ks)}, s.seeds(seeds)[:1], **by_rule)
        trials += experiments.grid(p, "bitdelta", {}, scope="linear", **scored)
        trials += experiments.grid(p, "low_rank", {"rank": [float(r) for r in s.shrink(ranks)]}, **scored)
        trials += experiments.grid(p, "magnitude_trim", {"keep": s.shrink(keeps)}, **scored)
    dpo = experiments.pair(dpo_pair, smoke=s.smoke)
    expo = {**by_rule, "measure": ALL[:2] + ("scores",), "tasks": ["preference"], "loss_examples": dpo_examples}
    trials += experiments.grid(dpo, "extrapolate", {"alpha": [-1.0, 0.0, *s.shrink(alphas_dpo)]}, **expo)
    return Plan("gemma", list(dict.fromkeys(trials)), [*pairs, dpo], {"rule": rule, "points": int(points)})


@_chapter
def classification(s: Setting, *, chapter_params) -> Plan:
    """Every trial the other chapters measure (``chapter_params``: notebook name -> its parameters, given by the
    profile), to be sorted by the sign of the term."""
    trials = []
    for name, params in chapter_params.items():
        trials += bind(name, {**params, "smoke": s.smoke or params.get("smoke", False)}).trials
    return Plan("classification", list(dict.fromkeys(trials)))


@_chapter
def reproduction(s: Setting, *, chapter_params) -> Plan:
    """The paper's claims, checked on the trials of the chapters read (``chapter_params``, as for the
    classification)."""
    return Plan("reproduction", classification(s, chapter_params=chapter_params).trials)


@_chapter
def data(s: Setting, *, chapter_params) -> Plan:
    """Every trial of the chapters read (``chapter_params``): the whole store behind the book, as one table."""
    return Plan("data", classification(s, chapter_params=chapter_params).trials)


@_chapter
def predicts(s: Setting, *, chapter_params, sigmas, noise_seeds, loss_tasks, edits) -> Plan:
    """What the term predicts: every trial the other chapters measure (``chapter_params``, as for the
    classification), Gaussian perturbations D of growing relative size ``sigmas`` on the pair (or pre/post; term,
    exact change, scores), and ``edits`` with the term taken on other loss data, one at a time (``loss_tasks``: a
    zoo pair's task names, each task's held-out answers; for pre/post, loss-data specs: ``hf:…`` or JSONL files)."""
    trials = classification(s, chapter_params=chapter_params).trials
    p, m = s.the_pair(), s.scoring()
    trials += experiments.references(p, measure=ALL, **m)
    noise = {"sigma": s.shrink(sigmas)}
    trials += experiments.grid(
        p, "gaussian", noise, s.shrink(noise_seeds), measure=("term", "loss_change", "scores"), **m
    )
    for data in s.shrink(loss_tasks):
        q = other_loss_pair(s, data)
        for method, params in edit_list(edits):
            trials.append(
                experiments.trial(q, method, params, measure=("term", "loss_change"), device=s.device, dtype=s.dtype)
            )
    return Plan("predicts", list(dict.fromkeys(trials)))


def other_loss_pair(s: Setting, data: str) -> Pair:
    """The chapter's pair with its loss on other data: ``data`` is one of the project's tasks (its held-out
    answers, for a zoo pair or two checkpoints alike) or, for two checkpoints, a loss-data spec (``hf:…`` or a
    JSONL file)."""
    from .tasks import generate

    spec = f"task:{data}" if data in generate.TASKS else data
    if s.pre or s.post:
        return experiments.pair(pre=s.pre, post=s.post, loss_data=spec)
    return experiments.pair(s.pair, smoke=s.smoke, loss_data=spec)
