"""The embedded default model pairs, trained here on first use and cached by a hash of their recipe.

Names: ``tiny-lm`` (pre-trained → SFT at the default width), ``tiny-lm/<width>`` (the same recipe at another
width), ``tiny-lm-dpo`` (SFT → DPO), ``tiny-vit/<task>`` (pre-trained backbone with a linear head → the
fine-tune on that task), and a real pretrained LM post-trained here: ``gemma-270m`` (Gemma-3-270m's base → its full
SFT on the project's tasks) and ``gemma-270m-dpo`` (that SFT → DPO; ``gemma``). ``load_pair(name)`` returns the
two checkpoint folders, ready for ``from_pretrained`` or for ``unifieddelta edit --pre … --post …``. Any name may
carry recipe changes in brackets, ``tiny-lm[sft_lr=5e-5]``: the same pair trained with those fields changed (cached
under its own key).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import InvalidParameterError
from ..settings import parse_settings
from ..tasks.digits import TASKS as VISION_TASKS
from . import gemma, lm, vit
from .gemma import GemmaRecipe
from .recipes import LMRecipe, ViTRecipe
from .store import read_manifest

#: Default LM recipe per width (about 0.27M, 0.92M and 3.4M parameters). The default width is the one measured
#: to build in minutes on 2 cores; the wider ones get more pre-training steps (equal quality needs more tokens
#: for more parameters) and are built only on request (``zoo build --widths``). Everything else is shared —
#: the init (0.06, about 1/sqrt(256)), the data and the SFT — so the family differs in width and pre-training.
LM_WIDTHS: dict[int, LMRecipe] = {
    64: LMRecipe(),
    128: LMRecipe(width=128, pre_steps=2000),
    256: LMRecipe(width=256, pre_steps=1500, pre_lr=1.5e-3),
}
DEFAULT_WIDTH = 64
VIT = ViTRecipe()

#: The smoke recipes: the same pipeline in seconds (the test suite, and every notebook with ``smoke=True``). Their
#: models learn little; they exist to run every code path, not to show the paper's phenomena.
SMOKE_LM = LMRecipe(
    width=32,
    layers=2,
    heads=2,
    seq_len=64,
    pre_docs=300,
    pre_steps=20,
    pre_batch=8,
    sft_examples=120,
    sft_steps=10,
    sft_batch=8,
    dpo_pairs=32,
    dpo_steps=4,
    dpo_batch=8,
)
SMOKE_VIT = ViTRecipe(width=16, layers=1, heads=2, pre_steps=10, pre_batch=32, ft_steps=5, ft_batch=32)


def names(*, widths: bool = True) -> list[str]:
    """Every name ``load_pair`` knows; the default pairs first."""
    out = ["tiny-lm", "tiny-lm-dpo"] + [f"tiny-vit/{t}" for t in VISION_TASKS] + list(gemma.NAMES)
    if widths:
        out += [f"tiny-lm/{w}" for w in LM_WIDTHS]
    return out


def default_names() -> list[str]:
    """The pairs the book's default profile needs (what ``zoo build`` builds without ``--widths``)."""
    return names(widths=False)


def with_overrides(recipe: LMRecipe | ViTRecipe, changes: dict) -> LMRecipe | ViTRecipe:
    """The recipe with some fields changed, each value cast to the field's type (``"5e-5"`` or 5e-5 for a float)."""
    fields = {f.name: f for f in dataclasses.fields(recipe)}
    out = {}
    for key, value in changes.items():
        if key not in fields:
            raise InvalidParameterError(f"{type(recipe).__name__} has no field {key!r}; fields: {', '.join(fields)}")
        kind = type(getattr(recipe, key))
        try:
            out[key] = kind(value) if not isinstance(value, kind) else value
        except (TypeError, ValueError):
            raise InvalidParameterError(f"{key}={value!r}: expected a {kind.__name__}") from None
    return dataclasses.replace(recipe, **out)


def split_name(name: str) -> tuple[str, dict]:
    """``"tiny-lm[sft_lr=5e-5,sft_steps=300]"`` -> ``("tiny-lm", {"sft_lr": 5e-05, "sft_steps": 300})``: a zoo name
    may carry recipe changes in brackets, so a variant (the delta-size axis, say) is a name like any other."""
    base, bracket, rest = name.partition("[")
    if not bracket:
        return name, {}
    if not rest.endswith("]") or not rest[:-1].strip():
        raise InvalidParameterError(f"zoo name {name!r}: expected NAME[FIELD=VALUE,...]")
    return base, parse_settings([s for s in rest[:-1].split(",") if s.strip()], what=f"zoo name {name!r}")


def recipe_for(name: str, *, smoke: bool = False) -> LMRecipe | ViTRecipe:
    """The recipe behind a name (with its bracketed changes); raises ``InvalidParameterError`` for an unknown name.

    ``smoke``: the smoke recipe instead (``tiny-lm/<width>`` 16 wider per doubling of the width), the changes
    applied to it.
    """
    base, changes = split_name(name)
    recipe = _default_recipe(base)
    if smoke and isinstance(recipe, GemmaRecipe):
        recipe = gemma.SMOKE
    elif smoke:
        smoke_recipe = SMOKE_VIT if isinstance(recipe, ViTRecipe) else SMOKE_LM
        if isinstance(recipe, LMRecipe) and recipe.width != DEFAULT_WIDTH:
            doublings = (recipe.width // DEFAULT_WIDTH).bit_length() - 1
            smoke_recipe = dataclasses.replace(smoke_recipe, width=SMOKE_LM.width + 16 * doublings)
        recipe = smoke_recipe
    return with_overrides(recipe, changes) if changes else recipe


def _default_recipe(name: str) -> LMRecipe | ViTRecipe | GemmaRecipe:
    if name in ("tiny-lm", "tiny-lm-dpo"):
        return LM_WIDTHS[DEFAULT_WIDTH]
    if name in gemma.NAMES:
        return GemmaRecipe()
    kind, _, arg = name.partition("/")
    if kind == "tiny-lm" and arg:
        try:
            return LM_WIDTHS[int(arg)]
        except (ValueError, KeyError):
            raise InvalidParameterError(
                f"unknown width {arg!r} in {name!r}; widths: {', '.join(map(str, LM_WIDTHS))}"
            ) from None
    if kind == "tiny-vit" and arg in VISION_TASKS:
        return VIT
    raise InvalidParameterError(f"unknown zoo name {name!r}; known: {', '.join(names())}")


def pair_kind(name: str) -> str:
    """The pair kind (``kinds.KINDS``) of a zoo name: ``dpo`` for the SFT -> DPO pair, ``vision`` for a ViT pair,
    ``lm`` otherwise."""
    base = split_name(name)[0]
    return "dpo" if base.endswith("-dpo") else "vision" if base.startswith("tiny-vit/") else "lm"


def _stages(base: str) -> tuple[str, str]:
    """The two checkpoints of a language pair: SFT → DPO for the DPO pairs, else pre → SFT."""
    return ("sft", "dpo") if base.endswith("-dpo") else ("pre", "sft")


def recipe_keys(name: str, recipe: LMRecipe | ViTRecipe) -> list[str]:
    """The cache keys of the checkpoints a zoo pair is made of: its identity in the experiment store."""
    base = split_name(name)[0]
    if base.startswith("tiny-vit/"):
        return [recipe.key("task", base.partition("/")[2])]
    return [recipe.key(s) for s in _stages(base)]


def load_pair(name: str, *, recipe: LMRecipe | ViTRecipe | None = None, progress: bool = False) -> tuple[Path, Path]:
    """``(pre_dir, post_dir)`` of a zoo pair, trained on first use and then read from the cache.

    ``recipe`` replaces the default recipe (same kind), e.g. a tiny one for tests or a gentler post-training.
    """
    default = recipe_for(name)
    recipe = recipe or default
    if type(recipe) is not type(default):
        raise InvalidParameterError(f"{name!r} needs a {type(default).__name__}, got {type(recipe).__name__}")
    name = split_name(name)[0]
    if isinstance(recipe, ViTRecipe):
        return vit.build(recipe, name.partition("/")[2], progress=progress)
    build = gemma.build if isinstance(recipe, GemmaRecipe) else lm.build
    return tuple(build(recipe, stage, progress=progress) for stage in _stages(name))


def describe(name: str, *, recipe: LMRecipe | ViTRecipe | None = None) -> dict:
    """What the cache holds for a name, without building: ``{name, built, pre, post, metrics}``."""
    recipe = recipe or recipe_for(name)
    name = split_name(name)[0]
    if isinstance(recipe, ViTRecipe):
        from .store import entry_path

        entry = entry_path("vit-task", recipe.key("task", name.partition("/")[2]))
        manifest = read_manifest(entry)
        return {
            "name": name,
            "built": manifest is not None,
            "pre": entry / "pre",
            "post": entry / "post",
            "metrics": (manifest or {}).get("metrics", {}),
            "recipe": dataclasses.asdict(recipe),
        }
    from .store import entry_path

    prefix = "gemma" if isinstance(recipe, GemmaRecipe) else "lm"
    paths = [entry_path(f"{prefix}-{s}", recipe.key(s)) for s in _stages(name)]
    manifests = [read_manifest(p) for p in paths]
    return {
        "name": name,
        "built": all(m is not None for m in manifests),
        "pre": paths[0],
        "post": paths[1],
        "metrics": (manifests[1] or {}).get("metrics", {}),
        "recipe": dataclasses.asdict(recipe),
    }


def model_card(name: str, *, smoke: bool = False) -> dict:
    """One zoo pair in a few numbers, read from its recipe and its built checkpoint (built on first use): its
    architecture, parameters, layers, width, heads and vocabulary, what each training stage did, and how long the
    stages took to build. Used by: the setup page."""
    from ..deltas import delta_stats

    recipe = recipe_for(name, smoke=smoke)
    pre, post = load_pair(name, recipe=recipe)
    config = json.loads((Path(post) / "config.json").read_text())
    stats = delta_stats(pre, post)
    card = {
        "pair": name,
        "architecture": config.get("architectures", ["?"])[0],
        "parameters": int(stats["numel"].sum()),
        "layers": config.get("num_hidden_layers"),
        "width": config.get("hidden_size"),
        "heads": config.get("num_attention_heads"),
    }
    if isinstance(recipe, (LMRecipe, GemmaRecipe)):
        card["vocabulary"] = config.get("vocab_size")
        card["training"] = "; ".join(_stage_text(recipe, s) for s in _stages(split_name(name)[0]))
    else:
        card["vocabulary"] = None
        card["training"] = (
            f"backbone: {recipe.pre_steps} steps of {recipe.pre_batch} images; fine-tune: {recipe.ft_steps} steps "
            f"of {recipe.ft_batch}"
        )
    manifest = describe(name, recipe=recipe)
    card["post metrics"] = ", ".join(f"{k} {v:.3g}" for k, v in manifest["metrics"].items() if isinstance(v, float))
    return card


def _stage_text(recipe: LMRecipe | GemmaRecipe, stage: str) -> str:
    if stage == "pre" and isinstance(recipe, GemmaRecipe):
        return "pre: Gemma-3-270m, the pretrained base (a third party's Q4_K_M GGUF, upcast to float32)"
    if stage == "pre":
        return (
            f"pre-training: {recipe.pre_steps} steps × {recipe.pre_batch} documents of statements, lr {recipe.pre_lr:g}"
        )
    if stage == "sft":
        return (
            f"SFT: {recipe.sft_steps} steps × {recipe.sft_batch} of {recipe.sft_examples} question–answer examples, "
            f"lr {recipe.sft_lr:g}"
        )
    pairs = f"{recipe.dpo_steps} steps × {recipe.dpo_batch} of {recipe.dpo_pairs} preference pairs"
    return f"DPO: {pairs}, β {recipe.dpo_beta:g}"


__all__ = [
    "GemmaRecipe",
    "LMRecipe",
    "ViTRecipe",
    "load_pair",
    "names",
    "default_names",
    "recipe_for",
    "describe",
    "with_overrides",
    "split_name",
    "SMOKE_LM",
    "SMOKE_VIT",
    "LM_WIDTHS",
    "DEFAULT_WIDTH",
]
