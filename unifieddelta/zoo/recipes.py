"""Recipes: everything that determines a zoo checkpoint, as small frozen dataclasses hashed into its cache key.

Each training stage hashes only the fields it depends on (plus its parent's key), so changing the DPO learning
rate rebuilds the DPO model and nothing before it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..cache import stable_hash
from ..tasks.generate import N_TEST


def recipe_fields(recipe, prefixes: tuple[str, ...], exclude: tuple[str, ...] = ()) -> dict:
    """The recipe's fields whose names start with one of ``prefixes`` (``""`` matches all), minus ``exclude``.

    A field added after entries were built (listed in the recipe's ``_LATER``) is hashed only when it differs
    from the value those entries were built with, so adding it does not invalidate them.
    """
    later = getattr(recipe, "_LATER", {})
    return {
        k: v
        for k, v in dataclasses.asdict(recipe).items()
        if k.startswith(prefixes) and not k.startswith(exclude) and not (k in later and later[k] == v)
    }


@dataclass(frozen=True)
class LMRecipe:
    """A tiny ``LlamaForCausalLM``: its size, its tokenizer, and its three training stages (pre → SFT → DPO).

    Post-training is gentle on purpose (low learning rates, few steps), so that ‖ΔW‖/‖W_pre‖ stays small as in
    real post-training; the pre-training has to be long enough for the base model to know the facts.
    """

    width: int = 64
    layers: int = 4
    heads: int = 4
    vocab_size: int = 512
    # Std of the initial weights (transformers' ``initializer_range``, whose default 0.02 is sized for wide
    # models: 1.28/sqrt(4096) at width 4096 but only 0.16/sqrt(64) at width 64, so a tiny model's weights are
    # then mostly written by pre-training and any later update looks large against them). 0.06 = 0.48/sqrt(64)
    # lowered the default pair's median |dW|/|W_pre| and raised its gains (the README gives the measured sizes;
    # the book's delta chapter recomputes them for the pairs it is built with).
    init_std: float = 0.06
    seq_len: int = 96
    seed: int = 0
    n_test: int = N_TEST  # test items per task (tasks.generate), never trained on
    # pre-training on statements (causal LM loss on every token)
    pre_docs: int = 20000
    pre_steps: int = 1200
    pre_batch: int = 32
    pre_lr: float = 3e-3
    pre_qa_share: float = 0.15  # share of pre-training documents in question-answer format (other questions)
    # supervised fine-tuning on question -> answer (loss on the answer only)
    sft_examples: int = 6000
    sft_steps: int = 600
    sft_batch: int = 32
    sft_lr: float = 1e-4
    # DPO from the SFT model on (right, plausible wrong) answers
    dpo_pairs: int = 2000
    dpo_steps: int = 60
    dpo_batch: int = 16
    dpo_lr: float = 2e-5
    dpo_beta: float = 0.1

    _LATER = {"init_std": 0.02}

    def key(self, stage: str) -> str:
        """Cache key of a stage (``pre``, ``sft``, ``dpo``): a hash of the fields that stage depends on."""
        from ..tasks.generate import DATA_VERSION

        stages = ("pre", "sft", "dpo")
        if stage not in stages:
            raise ValueError(f"unknown stage {stage!r}")
        later = stages[stages.index(stage) + 1 :]
        return stable_hash("tiny-lm", stage, DATA_VERSION, recipe_fields(self, ("",), tuple(f"{s}_" for s in later)))


@dataclass(frozen=True)
class ViTRecipe:
    """A tiny ``ViTForImageClassification`` on upscaled 8x8 digits: a pre-trained backbone, then per task a
    linear probe (the pre checkpoint: frozen backbone, freshly trained head) and a gentle full fine-tune."""

    image_size: int = 16
    patch_size: int = 4
    width: int = 64
    layers: int = 4
    heads: int = 4
    init_std: float = 0.02  # as for the LM (LMRecipe.init_std)
    seed: int = 0
    pre_task: str = "digits"  # what the backbone learns first (tasks/digits.py: PRETRAIN_TASKS)
    pre_steps: int = 600
    pre_batch: int = 64
    pre_lr: float = 2e-3
    probe_c: float = 1.0
    ft_steps: int = 250
    ft_batch: int = 64
    ft_lr: float = 1.5e-4

    _LATER = {"pre_task": "digits", "init_std": 0.02}

    def key(self, stage: str, task: str | None = None) -> str:
        """Cache key of the backbone (``pre``) or of one task's pair (``task``)."""
        from ..tasks.digits import DATA_VERSION

        if stage == "pre":
            return stable_hash("tiny-vit", "pre", DATA_VERSION, recipe_fields(self, ("",), ("probe_", "ft_")))
        return stable_hash("tiny-vit", "task", DATA_VERSION, task, recipe_fields(self, ("",)))
