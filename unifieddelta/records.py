"""The store of measured records, and the tidy tables the pages read from it.

A *record* is one measured quantity of one trial: a JSON file named by the trial's ``record_key(quantity)``, written
atomically, never rewritten. :func:`table` turns the records of a list of trials into one tidy table (one row per
trial × quantity, per task and metric for scores); :func:`question_table` gives each task's score on every question,
for paired intervals; :func:`integrand` the integrand at every node of the stored terms.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .cache import atomic_write_bytes, cache_dir, stable_hash


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


def stored(trials: Iterable, store: Store | str | None = None) -> tuple[int, int]:
    """(trials whose every record is stored, all trials): what a run would take from the store."""
    st = store if isinstance(store, Store) else Store(store)
    trials = list(dict.fromkeys(trials))
    done = sum(all(st.has(t.record_key(q)) for q in t.quantities) for t in trials)
    return done, len(trials)


COLUMNS = [
    "pair",
    "method",
    "edit",
    "seed",
    "scope",
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


def table(trials: Iterable, *, store: Store | str | None = None, per_tensor: bool = False):
    """The stored records of the trials as one tidy table: one row per trial and quantity (per task and metric
    for scores, per tensor for ``tensor_term`` when ``per_tensor``), each setting of the edits in its own column.

    Quantities: ``term``, ``first_order`` (⟨∇L(W_post), D⟩, when t = 0 is a node), ``loss`` (L(W_post), likewise),
    ``loss_change``, ``second_order``, ``score`` (task, metric), ``d_norm``, ``delta_norm``, ``tensor_term``.
    Trials not (yet) in the store are left out.
    """
    import pandas as pd

    st = store if isinstance(store, Store) else Store(store)
    rows, settings, seen = [], {}, set()
    for t in dict.fromkeys(trials):
        base = _base_row(t, settings)
        for q in t.quantities:
            key = t.record_key(q)
            record = None if key in seen else st.get(key)  # two chapters' trials may share a record: once
            if record is not None:
                seen.add(key)
                rows += _rows(q, record, base, t, per_tensor)
    frame = pd.DataFrame(rows)
    for column in COLUMNS + list(settings):
        if column not in frame:
            frame[column] = None
    return frame[COLUMNS[:3] + list(settings) + COLUMNS[3:]]


def _base_row(t, settings: dict) -> dict:
    """The columns every row of a trial shares: its pair, edit, seed, key and each setting (noted in ``settings``)."""
    base = {"pair": t.pair.name, "method": t.method, "edit": t.label, "seed": t.seed, "scope": t.scope, "trial": t.key}
    for k, v in t.params.items():
        settings.setdefault(k, None)
        base[k] = v
    return base


def question_table(trials: Iterable, *, store: Store | str | None = None):
    """Each task's headline score on every question, for the trials' stored scores: one row per trial, task and
    question (``question`` is its index in the task's documents), with the trial's edit and settings and
    ``scoring``, which says how the scores were taken (tasks, limit, few-shot): the rows a paired comparison of two
    edits on the same questions reads (``uncertainty.change_table``)."""
    import pandas as pd

    st = store if isinstance(store, Store) else Store(store)
    frames, settings, seen = [], {}, set()
    for t in dict.fromkeys(trials):
        key = t.record_key("scores")
        record = None if "scores" not in t.quantities or key in seen else st.get(key)
        if record is None or not record["result"].get("questions"):
            continue
        seen.add(key)
        base = _base_row(t, settings) | {"scoring": stable_hash(t._options("scores"))}
        for task, values in record["result"]["questions"].items():
            frames.append(pd.DataFrame({**base, "task": task, "question": range(len(values)), "value": values}))
    columns = ["pair", "method", "edit", "seed", "scope", "trial", *settings, "scoring", "task", "question", "value"]
    return pd.concat(frames, ignore_index=True).reindex(columns=columns) if frames else pd.DataFrame(columns=columns)


def _rows(q: str, record: dict, base: dict, t, per_tensor: bool) -> list[dict]:
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


def integrand(trials: Iterable, *, store: Store | str | None = None):
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


#: What each column of the tidy table means (the Data page prints this), and of the tables derived from it that the
#: pages' figures draw: ``tables.per_trial`` (one row per trial) and ``uncertainty.change_table`` (intervals).
COLUMN_DOCS = {
    "pair": "the pair: a zoo name, a packaged pair, or 'pre -> post' checkpoints ('(loss: DATA)': other loss data)",
    "method": "the edit (edits.EDITS): dare, drop_only, bitdelta, low_rank, magnitude_trim, extrapolate, ...",
    "edit": "the edit and the settings that differ from its defaults, e.g. dare(p=0.5); [linear]: some tensors only",
    "p": "DARE's drop rate (dare, drop_only); Table 1's reweighted share (sign_biased, product_biased: measured)",
    "k": "the multiplier of the dropped (or reweighted) entries: 0 is DARE, 1 the identity",
    "bits": "BitDelta's magnitude bits: 2^bits magnitude-sorted blocks per matrix",
    "scale": "BitDelta's magnitude as a multiple of mean |ΔW|",
    "magnitudes": "BitDelta's magnitudes: mean (one per matrix), normal (folded) or uniform draws with that mean",
    "rank": "low rank's rank: a fraction of min(m, n), or an integer",
    "keep": "magnitude trimming's kept fraction of entries",
    "alpha": "extrapolation length: W_post + alpha·ΔW (-1 is the pre-trained model, 0 the post-trained one)",
    "sigma": "a Gaussian perturbation's size, relative to each tensor's rms delta",
    "svd": "low rank's SVD: exact or randomized",
    "seed": "the seed of a random edit (its mask or draw); 0 for a deterministic edit",
    "scope": "which tensors the edit touches: all, matrices, or linear (the linear layers inside the blocks)",
    "quantity": "term, first_order, loss, loss_change, second_order, score, d_norm, delta_norm, tensor_term",
    "task": "a score's task (the project's lm-eval tasks, a vision task, the embedding scores, preference)",
    "metric": "a score's metric (exact_match, acc, cosine, ...)",
    "filter": "a score's lm-eval filter",
    "primary": "whether the score is its task's headline metric (the one the pages use)",
    "value": "the quantity's value: nats for losses and terms, share correct for scores",
    "stderr": "a score's standard error as lm-eval reports it (binomial; not the book's paired interval)",
    "tensor": "a tensor_term's tensor name",
    "rule": "the term's quadrature rule (left: the paper's; right, midpoint, trapezoid, gauss)",
    "points": "the term's number of points C (the paper's: 5)",
    "mode": "how the term's nodes are computed: grad (backward passes) or jvp (forward-mode)",
    "seconds": "the wall time the record took when it was measured",
    "trial": "the trial's key in the store: a hash of its pair, edit, settings and seed",
    "term": "per trial: the paper's approximation term (left rule, C = 5, grad mode), nats",
    "first_order": "per trial: the t = 0 node alone, <∇L(W_post), D>, nats",
    "loss": "per trial: the loss at W_post, nats",
    "loss_change": "per trial: the exact L(W_post + D) - L(W_post), nats",
    "second_order": "per trial: ½·DᵀHD at W_post, nats",
    "d_norm": "per trial: ‖D‖ over the edited tensors",
    "score_change": "per trial: the mean score over the pair's tasks, minus the post-trained model's",
    "drop": "per setting: the mean score lost against the post-trained model (share correct; > 0 is worse)",
    "relative_d": "per setting: ‖D‖ / ‖ΔW‖, the size of the edit relative to the delta",
    "error": "a quadrature rule's relative error against the exact loss change, |term - ΔL| / |ΔL|",
    "t": "a node of the term along the path W_post + t·D",
    "f": "the integrand at a node, <∇L(W_post + t·D), D>, nats",
    "weight": "a node's quadrature weight",
    "low": "an interval's lower end (95%: paired bootstrap over questions and masks, or Student's t over masks)",
    "high": "an interval's upper end",
    "n": "an interval's questions per task (the fewest any task has)",
    "draws": "an interval's masks, seeds or draws",
}
