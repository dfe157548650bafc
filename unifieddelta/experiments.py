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
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from . import approx, deltas, edits, losses
from .cache import atomic_write_bytes, cache_dir, stable_hash
from .errors import InvalidParameterError
from .kinds import KINDS
from .pairs import Pair, pair  # noqa: F401 - the engine's way in: experiments.pair(...), grid(...), run(...)

#: Bump when a change of the code alters stored numbers for the same inputs (a fixed bug in a loss, say): every
#: stored record is then recomputed. An edit whose output changes bumps its own ``EditSpec.version`` instead.
STORE_VERSION = 1
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

    @property
    def params(self) -> dict:
        return json.loads(self.params_json)

    @property
    def label(self) -> str:
        """``dare(p=0.5)``: the method and the settings that differ from its defaults (the columns hold them all)."""
        defaults = edits.with_defaults(self.method, {})
        shown = {k: v for k, v in self.params.items() if k not in defaults or defaults[k] != v}
        return self.method + "(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")"

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


# ---------------------------------------------------------------------------------------------- the store


class Store:
    """A folder of records, one JSON file per measured quantity of a trial, written atomically."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder).expanduser() if folder else cache_dir("store")  # created on the first record

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    def get(self, key: str) -> dict | None:
        """The record, or None if it is absent or unreadable (a corrupt file is measured again)."""
        try:
            record = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and "result" in record else None

    def put(self, key: str, record: dict) -> None:
        atomic_write_bytes(self.path(key), json.dumps(record, sort_keys=True, default=str).encode())

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*/*.json")) if self.folder.is_dir() else []


def stored(trials: Iterable[Trial], store: Store | str | None = None) -> tuple[int, int]:
    """(trials whose every record is stored, all trials): what a run would take from the store."""
    st = store if isinstance(store, Store) else Store(store)
    trials = list(dict.fromkeys(trials))
    done = sum(all(st.has(t.record_key(q)) for q in t.quantities) for t in trials)
    return done, len(trials)


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
    d = deltas.direction(session.pre, model, t.method, seed=t.seed, grad=grad, **t.params)
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
        rows = session.kind.scores(
            session, edited, list(t.tasks or t.pair.default_tasks), t.limit, dict(t.fewshot) if t.fewshot else None
        )
    finally:
        del edited
    return {"rows": rows}


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


# ---------------------------------------------------------------------------------------------- the tidy table

COLUMNS = [
    "pair",
    "method",
    "edit",
    "seed",
    "quantity",
    "task",
    "metric",
    "filter",
    "primary",
    "value",
    "stderr",
    "tensor",
    "rule",
    "points",
    "mode",
    "seconds",
    "trial",
]


def table(trials: Iterable[Trial], *, store: Store | str | None = None, per_tensor: bool = False):
    """The stored records of the trials as one tidy table: one row per trial and quantity (per task and metric
    for scores, per tensor for ``tensor_term`` when ``per_tensor``), each setting of the edits in its own column.

    Quantities: ``term``, ``first_order`` (⟨∇L(W_post), D⟩, when t = 0 is a node), ``loss`` (L(W_post), likewise),
    ``loss_change``, ``second_order``, ``score`` (task, metric), ``d_norm``, ``delta_norm``, ``tensor_term``.
    Trials not (yet) in the store are left out.
    """
    import pandas as pd

    st = store if isinstance(store, Store) else Store(store)
    rows, settings = [], {}
    for t in dict.fromkeys(trials):
        base = {"pair": t.pair.name, "method": t.method, "edit": t.label, "seed": t.seed, "trial": t.key}
        for k, v in t.params.items():
            settings.setdefault(k, None)
            base[k] = v
        for q in t.quantities:
            record = st.get(t.record_key(q))
            if record is not None:
                rows += _rows(q, record, base, t, per_tensor)
    frame = pd.DataFrame(rows)
    for column in COLUMNS + list(settings):
        if column not in frame:
            frame[column] = None
    return frame[COLUMNS[:3] + list(settings) + COLUMNS[3:]]


def _rows(q: str, record: dict, base: dict, t: Trial, per_tensor: bool) -> list[dict]:
    r, seconds = record["result"], record["seconds"]
    if q == "term":
        term = dict(base, quantity="term", value=r["term"], rule=t.rule, points=t.points, mode=t.mode, seconds=seconds)
        out = [term]
        if r["nodes"] and r["nodes"][0] == 0.0:
            out.append(dict(base, quantity="first_order", value=r["values"][0], seconds=seconds / len(r["nodes"])))
            out.append(dict(base, quantity="loss", value=r["losses"][0]))
        if per_tensor:
            out += [
                dict(base, quantity="tensor_term", tensor=n, value=v, rule=t.rule, points=t.points, mode=t.mode)
                for n, v in r["per_tensor"].items()
            ]
        return out
    if q in ("loss_change", "second_order"):
        return [dict(base, quantity=q, value=r["value"], seconds=seconds)]
    if q == "scores":
        import pandas as pd

        from .evaluate import primary

        rows = pd.DataFrame(r["rows"], columns=["task", "metric", "filter", "value", "stderr"])
        heads = {(h.task, h.metric, h.filter) for h in primary(rows).itertuples()}
        return [
            dict(
                base,
                quantity="score",
                seconds=seconds,
                primary=(row["task"], row["metric"], row["filter"]) in heads,
                **row,
            )
            for row in r["rows"]
        ]
    return [
        dict(base, quantity="d_norm", value=r["d_norm"], seconds=seconds),
        dict(base, quantity="delta_norm", value=r["delta_norm"]),
    ]


def integrand(trials: Iterable[Trial], *, store: Store | str | None = None):
    """The integrand f(t) = ⟨∇L(W_post + tD), D⟩ and the loss L(W_post + tD) at every node of the stored term
    records: one row per trial and node (pair, edit, seed, rule, points, mode, t, weight, f, loss)."""
    import pandas as pd

    st = store if isinstance(store, Store) else Store(store)
    rows = []
    for t in dict.fromkeys(trials):
        if "term" not in t.measure or (record := st.get(t.record_key("term"))) is None:
            continue
        r = record["result"]
        for node, weight, f, loss in zip(r["nodes"], r["weights"], r["values"], r["losses"]):
            rows.append(
                {
                    "pair": t.pair.name,
                    "edit": t.label,
                    "seed": t.seed,
                    "rule": t.rule,
                    "points": t.points,
                    "mode": t.mode,
                    "t": node,
                    "weight": weight,
                    "f": f,
                    "loss": loss,
                }
            )
    return pd.DataFrame(rows, columns=["pair", "edit", "seed", "rule", "points", "mode", "t", "weight", "f", "loss"])


def scores(frame, *, primary: bool = True):
    """The score rows of a table: each task's headline metric only (``evaluate.PRIMARY``) unless ``primary=False``."""
    rows = frame[frame.quantity == "score"]
    return rows[rows["primary"] == True] if primary else rows  # noqa: E712 - a column of True/False/None


def first_order_scale(pair: Pair, device: str = "cpu", dtype: str = "float32") -> float:
    """√Σ(ΔW_ij ∇_ij L)² at W_post on the pair's loss: DARE's first-order term ⟨∇L, D⟩ over masks has mean 0 and
    standard deviation √(p/(1−p)) times this (the k-family: times |1 − k| more). Used by: dare_works."""
    session = Session(pair, device, dtype, False)
    grad = session.gradient(None)
    parts = deltas.iter_deltas(session.pre, session.post)
    return math.sqrt(sum(float((d * grad[name].double()).pow(2).sum()) for name, d in parts))


__all__ = [
    "Pair",
    "pair",
    "Session",
    "Trial",
    "trial",
    "grid",
    "references",
    "Store",
    "stored",
    "run",
    "table",
    "scores",
    "integrand",
    "parse_shard",
    "first_order_scale",
    "QUANTITIES",
    "MEASURES",
    "STORE_VERSION",
]
