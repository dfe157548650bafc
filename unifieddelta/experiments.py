"""Trials -> measured rows, kept in a resumable store: the engine every chapter of the book runs on.

A *trial* (:class:`Trial`) is (pair, edit, settings, seed) and the quantities to measure (``QUANTITIES``); the pair
(``pairs.Pair``) says which two checkpoints, its kind (``kinds.KINDS``) how they are loaded, lossed and scored.

* ``term``: the approximation term Σ_k w_k ⟨∇L(W_post + t_k D), D⟩ (any rule, points and mode), per tensor in
  grad mode, and the first-order term ⟨∇L(W_post), D⟩ when t = 0 is a node;
* ``loss_change``: the exact L(W_post + D) − L(W_post);
* ``second_order``: ½·DᵀHD at W_post;
* ``scores``: the edited model's task scores (lm-eval, or accuracy), measured at W_post + D, the very point the
  exact loss change is taken at;
* ``d_norm``: ‖D‖ and ‖ΔW‖ (always measured; it costs nothing beyond D).

Each quantity of a trial is one *record* in the store: a JSON file named by a hash of everything that determines it
(the pair's identity, the edit and its settings with their defaults, the seed when the edit draws, the edit's
version, the loss data, the measurement options, the device, dtype and library versions, ``STORE_VERSION``),
written atomically. So a killed sweep resumes where it stopped, a grid that gains a value computes only the new
trials, chapters that need the same measurement share it, and a notebook re-executed for a new page layout
recomputes nothing. :func:`run` measures what the store lacks; :func:`table` turns records into one tidy table.
Several workers can share a store: ``shard=(i, n)`` gives worker i the trials whose key is i modulo n.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import platform
import socket
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Sequence

import torch

from . import approx, deltas, edits, losses
from . import pairs as _pairs
from .cache import stable_hash
from .errors import InvalidParameterError
from .kinds import KINDS
from .pairs import Pair
from .records import COLUMNS, Store, integrand, question_table, scores, stored, table  # noqa: F401 - its results

#: Bump when a change of the code alters stored numbers for the same inputs (a fixed bug in a loss, say): every
#: stored record is then recomputed. An edit whose output changes bumps its own ``EditSpec.version`` instead.
STORE_VERSION = 1
#: 2: a scores record keeps each task's headline score on every question (for paired intervals).
SCORES_FORMAT = 2
QUANTITIES = ("term", "loss_change", "second_order", "scores", "d_norm")
MEASURES = ("term", "loss_change", "second_order", "scores")  # what a caller asks for; d_norm comes with any


# ---------------------------------------------------------------------------------------------- trials


def _canonical(value):
    """Settings as JSON has them (tuples as lists, numpy scalars as numbers), so equal settings hash equally."""
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


@dataclass(frozen=True)
class Trial:
    """(pair, edit, settings, seed) and how to measure it. Build grids of them with :func:`grid`."""

    pair: Pair
    method: str
    params_json: str  # the settings with their defaults, as sorted JSON (hashable)
    seed: int = 0
    measure: tuple[str, ...] = ("term", "loss_change")
    rule: str = "left"
    points: int = 5
    mode: str = "grad"
    tasks: tuple[str, ...] | None = None  # None: the pair's default tasks
    limit: int | None = None  # documents per task (None: all)
    fewshot: tuple[tuple[str, int], ...] | None = None  # few-shot count per task (None: each task's default)
    loss_examples: int | None = None  # None: the kind's default
    device: str = "cpu"
    dtype: str = "float32"
    scope: str = "all"  # which tensors the edit touches: a preset of deltas.PRESETS (linear: inside the blocks)

    @property
    def params(self) -> dict:
        return json.loads(self.params_json)

    @property
    def label(self) -> str:
        """``dare(p=0.5)``: the method and the settings that differ from its defaults (the columns hold them all)."""
        defaults = edits.with_defaults(self.method, {})
        shown = {k: v for k, v in self.params.items() if k not in defaults or defaults[k] != v}
        scope = "" if self.scope == "all" else f" [{self.scope}]"
        return self.method + "(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")" + scope

    @cached_property
    def key(self) -> str:
        """The trial's identity: its pair, edit and seed (shared by its records; sharding splits by it), and for
        an edit that reads the loss gradient (``product_biased``), the loss data it is taken on."""
        grad = self._options("loss_change") if edits.spec(self.method).needs_grad else None
        return stable_hash(
            "trial",
            STORE_VERSION,
            self.pair.identity(),
            self.method,
            self.params_json,
            self.seed,
            edits.spec(self.method).version,
            grad,
            *(() if self.scope == "all" else (self.scope,)),  # the default scope keeps the keys it always had
        )

    def record_key(self, quantity: str) -> str:
        """The store key of one quantity of this trial: the trial and the options that quantity depends on."""
        return stable_hash("record", self.key, quantity, self._options(quantity), self.device, self.dtype, _versions())

    def _options(self, quantity: str) -> dict:
        loss = {"examples": self.loss_examples, "data": KINDS[self.pair.kind].loss_version}
        if quantity == "term":
            return {"rule": self.rule, "points": self.points, "mode": self.mode, "loss": loss}
        if quantity in ("loss_change", "second_order"):
            return {"loss": loss}
        if quantity == "scores":
            return {
                "format": SCORES_FORMAT,
                "tasks": list(self.tasks or self.pair.default_tasks),
                "limit": self.limit,
                "fewshot": [list(f) for f in self.fewshot] if self.fewshot else None,
                "scores": KINDS[self.pair.kind].scores_version,
            }
        return {}

    @property
    def quantities(self) -> list[str]:
        return [q for q in self.measure if q in MEASURES] + ["d_norm"]


def trial(pair: Pair, method: str, params: dict | None = None, seed: int = 0, **measure) -> Trial:
    """One trial, its settings checked now (an unknown method or setting, a value out of range raise here).

    ``measure``: ``measure=("term", "scores")``, ``rule``, ``points``, ``mode``, ``tasks``, ``limit``,
    ``loss_examples``, ``device``, ``dtype``. The seed of an edit that draws nothing is set to 0: seeds of a
    deterministic edit are one trial, not several.
    """
    params = {k: _canonical(v) for k, v in (params or {}).items()}
    edits.check_settings(method, params)
    full = edits.with_defaults(method, params)
    if not edits.spec(method).seeded(full):
        seed = 0
    m = dict(measure)
    if "measure" in m:
        m["measure"] = tuple(_check_measures(m["measure"]))
    if m.get("tasks") is not None:
        m["tasks"] = tuple([m["tasks"]] if isinstance(m["tasks"], str) else m["tasks"])
    if m.get("fewshot"):
        m["fewshot"] = tuple(sorted((str(k), int(v)) for k, v in dict(m["fewshot"]).items()))
    else:
        m.pop("fewshot", None)
    approx.quadrature(m.get("points", 5), m.get("rule", "left"))  # raises on a bad rule or number of points
    if m.get("scope", "all") not in deltas.PRESETS:
        raise InvalidParameterError(f"unknown scope {m['scope']!r}; expected one of {', '.join(deltas.PRESETS)}")
    if m.get("mode", "grad") not in approx.MODES:
        raise InvalidParameterError(f"unknown mode {m['mode']!r}; expected one of {', '.join(approx.MODES)}")
    return Trial(pair, method, json.dumps(full, sort_keys=True), int(seed), **m)


def _check_measures(measure: Iterable[str]) -> list[str]:
    measure = [measure] if isinstance(measure, str) else list(measure)
    for q in measure:
        if q not in MEASURES:
            raise InvalidParameterError(f"unknown quantity {q!r} to measure; expected some of {', '.join(MEASURES)}")
    return measure


def grid(
    pair: Pair,
    method: str,
    values: dict[str, Sequence] | None = None,
    seeds: Sequence[int] = (0,),
    fixed: dict | None = None,
    **measure,
) -> list[Trial]:
    """The cartesian product of ``values`` (setting -> values) with ``fixed`` settings, at each seed (once for an
    edit that draws nothing), as trials."""
    values = values or {}
    out, seen = [], set()
    for combo in itertools.product(*values.values()):
        params = {**(fixed or {}), **dict(zip(values, combo))}
        for seed in seeds:
            t = trial(pair, method, params, seed, **measure)
            if t not in seen:
                seen.add(t)
                out.append(t)
    return out


def references(pair: Pair, **measure) -> list[Trial]:
    """The pre-trained and the post-trained model as trials: extrapolation by α = −1 (W_post − ΔW = W_pre) and
    α = 0 (the identity): the reference lines of every figure."""
    return [
        trial(pair, "extrapolate", {"alpha": -1.0}, **measure),
        trial(pair, "extrapolate", {"alpha": 0.0}, **measure),
    ]


def _versions() -> dict:
    """The library versions that move stored numbers (cached once per process)."""
    global _VERSIONS
    if _VERSIONS is None:
        from importlib.metadata import version

        import transformers

        try:
            lm_eval_version = version("lm_eval")
        except Exception:  # any failure means "unknown"
            lm_eval_version = "unknown"
        _VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__, "lm_eval": lm_eval_version}
    return _VERSIONS


_VERSIONS: dict | None = None


# ---------------------------------------------------------------------------------------------- running


def parse_shard(text: str | None = None) -> tuple[int, int] | None:
    """``"I/N"`` (0 ≤ I < N), else the launcher's variables: torchrun's ``RANK``/``WORLD_SIZE``, or a SLURM array's
    ``SLURM_ARRAY_TASK_ID`` (minus ``SLURM_ARRAY_TASK_MIN``) of ``SLURM_ARRAY_TASK_COUNT``; None: one worker."""
    if text:
        i, sep, n = str(text).partition("/")
        try:
            index, count = int(i), int(n)
        except ValueError:
            raise InvalidParameterError(f"--shard expects I/N (e.g. 0/4), got {text!r}") from None
    elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        index, count = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    elif "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        count = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    else:
        return None
    if not (count >= 1 and 0 <= index < count):
        raise InvalidParameterError(f"shard {index}/{count}: expected 0 <= I < N")
    return (index, count) if count > 1 else None


def run(
    trials: Iterable[Trial],
    *,
    store: Store | str | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    per_tensor: bool = False,
) -> "pd.DataFrame":  # noqa: F821
    """Measure every trial whose records are not in the store (this worker's share of them, with ``shard``),
    write each record as soon as it is measured, and return the tidy table of all the trials' stored records."""
    from tqdm.auto import tqdm

    st = store if isinstance(store, Store) else Store(store)
    trials = list(dict.fromkeys(trials))
    mine = [t for t in trials if shard is None or int(t.key, 16) % shard[1] == shard[0]]
    sessions: dict[tuple, Session] = {}
    from_store = computed = 0
    bar = tqdm(total=len(mine), desc="trials", unit="trial", disable=not progress)
    try:
        for t in mine:
            missing = [q for q in t.quantities if not st.has(t.record_key(q))]
            if missing:  # measured here; a worker never recomputes what the store holds
                where = (t.pair, t.device, t.dtype)
                if where not in sessions:
                    sessions.clear()  # one pair in memory at a time
                    sessions[where] = Session(t.pair, t.device, t.dtype, progress)
                _measure_trial(sessions[where], t, missing, st)
                computed += 1
            else:
                from_store += 1
            bar.set_postfix_str(f"{from_store} from the store, {computed} measured")
            bar.update()
    finally:
        bar.close()
    return table(trials, store=st, per_tensor=per_tensor)


class Session:
    """One pair loaded for measuring: pre and post on the device in the dtype, the loss, the scorer's data. Loaded
    on the first trial that needs the pair."""

    def __init__(self, pair: Pair, device: str, dtype: str, progress: bool):
        self.pair, self.device, self.dtype = pair, device, getattr(torch, dtype)
        self.kind = KINDS[pair.kind]
        pre, post = pair.folders(progress=progress)
        self.post = self.kind.load(post, self.device, self.dtype)
        # pre as a model of the same class too: transformers may rename tensors on load (ViT's encoder.layer.* ->
        # layers.*), so a folder's names need not be the module's; two modules always pair by name.
        self.pre = self.kind.load(pre, self.device, self.dtype, like=self.post)
        self._losses: dict[Any, losses.BatchLoss] = {}
        self.state: dict[str, Any] = {}  # what a kind keeps between trials (a tokenizer, a reference model)

    def loss(self, examples: int | None) -> losses.BatchLoss:
        if examples not in self._losses:
            self._losses[examples] = self.kind.loss(self, examples)
        return self._losses[examples]

    def gradient(self, examples: int | None) -> dict[str, torch.Tensor]:
        """∇L(W_post) by parameter name, on the pair's loss data (for ``product_biased``); the model untouched."""
        key = ("gradient", examples)
        if key not in self.state:
            params = dict(self.post.named_parameters())
            total = {n: torch.zeros_like(p) for n, p in params.items()}
            for part in self.loss(examples).parts():
                grads = torch.autograd.grad(part(self.post), list(params.values()), allow_unused=True)
                for (n, _), g in zip(params.items(), grads):
                    if g is not None:
                        total[n] += g
            self.state[key] = total
        return self.state[key]


def _measure_trial(session: Session, t: Trial, quantities: list[str], st: Store) -> None:
    """Compute D once, then each missing quantity, each written to the store as soon as it is known."""
    model = session.post
    start = time.perf_counter()
    grad = session.gradient(t.loss_examples) if edits.spec(t.method).needs_grad else None
    d = deltas.direction(session.pre, model, t.method, seed=t.seed, grad=grad, preset=t.scope, **t.params)
    d_seconds = time.perf_counter() - start
    for q in quantities:
        start = time.perf_counter()
        result = _QUANTITY[q](session, t, d)
        seconds = time.perf_counter() - start + (d_seconds if q == "d_norm" else 0.0)
        st.put(
            t.record_key(q),
            {
                "key": t.record_key(q),
                "trial": t.key,
                "pair": t.pair.name,
                "pair_identity": t.pair.identity(),
                "method": t.method,
                "params": t.params,
                "seed": t.seed,
                "quantity": q,
                "options": t._options(q),
                "device": t.device,
                "dtype": t.dtype,
                "versions": _versions(),
                "result": result,
                "seconds": seconds,
                "worker": f"{socket.gethostname()}:{os.getpid()}",
                "python": platform.python_version(),
            },
        )


def _term(session, t, d) -> dict:
    res = approx.approximation_term(
        session.post, d, session.loss(t.loss_examples), points=t.points, rule=t.rule, mode=t.mode
    )
    return {
        "term": res.term,
        "per_tensor": res.per_tensor,
        "nodes": res.nodes,
        "weights": res.weights,
        "values": res.values,
        "losses": res.losses,
        "forward": res.forward_passes,
        "backward": res.backward_passes,
    }


def _loss_change(session, t, d) -> dict:
    return {"value": approx.loss_change(session.post, d, session.loss(t.loss_examples))}


def _second_order(session, t, d) -> dict:
    return {"value": approx.second_order_term(session.post, d, session.loss(t.loss_examples))}


def _scores(session, t, d) -> dict:
    edited = copy.deepcopy(session.post)
    with torch.no_grad():
        for name, x in d.items():
            edited.get_parameter(name).add_(x)  # W_post + D: where loss_change evaluates L
    try:
        tasks, fewshot = list(t.tasks or t.pair.default_tasks), dict(t.fewshot) if t.fewshot else None
        rows, questions = session.kind.scores(session, edited, tasks, t.limit, fewshot)
    finally:
        del edited
    return {"rows": rows, "questions": questions}


def _d_norm(session, t, d) -> dict:
    if "delta_norm" not in session.state:  # ‖ΔW‖ over every tensor, once per pair
        session.state["delta_norm"] = math.sqrt(
            sum(float(x.pow(2).sum()) for _, x in deltas.iter_deltas(session.pre, session.post))
        )
    return {
        "d_norm": math.sqrt(sum(float(x.double().pow(2).sum()) for x in d.values())),
        "delta_norm": session.state["delta_norm"],
    }


_QUANTITY = {
    "term": _term,
    "loss_change": _loss_change,
    "second_order": _second_order,
    "scores": _scores,
    "d_norm": _d_norm,
}


def first_order_scale(pair: Pair, device: str = "cpu", dtype: str = "float32") -> float:
    """√Σ(ΔW_ij ∇_ij L)² at W_post on the pair's loss: DARE's first-order term ⟨∇L, D⟩ over masks has mean 0 and
    standard deviation √(p/(1−p)) times this (the k-family: times |1 − k| more). Used by: dare_works."""
    session = Session(pair, device, dtype, False)
    grad = session.gradient(None)
    parts = deltas.iter_deltas(session.pre, session.post)
    return math.sqrt(sum(float((d * grad[name].double()).pow(2).sum()) for name, d in parts))


def negative_shares(pair: Pair, device: str = "cpu", dtype: str = "float32") -> tuple[float, float]:
    """(the share of the delta's entries that are negative, the share of the products ΔW_ij·∇_ij L(W_post) that
    are): the p that Table 1's sign-biased and product-biased edits reweight, over the whole model. Used by:
    randomness."""
    session = Session(pair, device, dtype, False)
    grad = session.gradient(None)
    negative = products = total = 0
    for name, d in deltas.iter_deltas(session.pre, session.post):
        negative += int((d < 0).sum())
        products += int((d * grad[name].double() < 0).sum())
        total += d.numel()
    return negative / total, products / total


#: The engine's way in: ``experiments.pair(...)``, then ``grid(...)`` and ``run(...)``.
pair = _pairs.pair
