"""The tiny language-model chain: own BPE tokenizer, pre-training on statements, SFT on questions, DPO.

Every stage uses the ecosystem's trainers (transformers' ``Trainer``, TRL's ``DPOTrainer``) and ends in
``save_pretrained`` of model and tokenizer, so the pairs are ordinary Hugging Face checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import torch

from ..tasks import generate
from .recipes import LMRecipe
from .store import build_entry
from .training import final_loss, quiet, trainer_args

SPECIAL = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, digits always split one per token (so numbers are
    spelled digit by digit, which is what lets a tiny model learn arithmetic), as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def llama(
    *,
    width: int,
    layers: int,
    heads: int,
    vocab_size: int,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 128,
    tie: bool = False,
    init_std: float = 0.02,
    seed: int = 0,
    attn: str | None = None,
    **token_ids,
):
    """A freshly initialised ``LlamaForCausalLM`` (seeded): the one builder of small Llamas, for the zoo, the tests
    and the benchmarks. ``intermediate`` defaults to Llama's ≈ 8/3·width rounded up to a multiple of 8;
    ``token_ids``: ``pad_token_id``, ``eos_token_id``, ``bos_token_id``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate or int(8 * width / 3 + 7) // 8 * 8,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        initializer_range=init_std,
        **({"attn_implementation": attn} if attn else {}),
        **token_ids,
    )
    return LlamaForCausalLM(config)


def new_model(recipe: LMRecipe, tokenizer):
    """A freshly initialised ``LlamaForCausalLM`` of the recipe's width (seeded)."""
    return llama(
        width=recipe.width,
        layers=recipe.layers,
        heads=recipe.heads,
        vocab_size=len(tokenizer),
        max_positions=2 * recipe.seq_len,
        init_std=recipe.init_std,
        seed=recipe.seed,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def _pretrain(recipe: LMRecipe, out: Path, progress: bool) -> dict:
    """Train the tokenizer and the base model on statements; causal-LM loss on every token."""
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(recipe.seed)
    docs = generate.pretraining_texts(
        recipe.pre_docs, seed=recipe.seed, n_test=recipe.n_test, qa_share=recipe.pre_qa_share
    )
    tokenizer = train_tokenizer(docs, recipe.vocab_size)
    model = new_model(recipe, tokenizer)
    # Concatenate the documents (each closed by EOS) and cut the stream into equal blocks.
    stream = [t for d in docs for t in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]]
    n = len(stream) // recipe.seq_len
    blocks = torch.tensor(stream[: n * recipe.seq_len]).view(n, recipe.seq_len)
    data = [{"input_ids": b, "labels": b} for b in blocks]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model=model,
            train_dataset=data,
            args=TrainingArguments(
                **trainer_args(
                    recipe.seed, tmp, recipe.pre_steps, recipe.pre_batch, recipe.pre_lr, progress, weight_decay=0.01
                )
            ),
        )
        quiet(trainer, progress).train()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "train_loss": final_loss(trainer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_seen": recipe.pre_steps * recipe.pre_batch * recipe.seq_len,
    }


def _sft_collate(tokenizer):
    """Pad a batch of ``{input_ids, prompt_len}``; labels are -100 on the prompt and the padding."""

    def collate(batch):
        length = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), length), tokenizer.pad_token_id)
        labels = torch.full((len(batch), length), -100)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, b["prompt_len"] : n] = ids[i, b["prompt_len"] : n]
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def _sft(recipe: LMRecipe, parent: Path, out: Path, progress: bool) -> dict:
    """Supervised fine-tuning on ``Question: … Answer: …``; loss on the answer and the closing EOS only."""
    from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

    set_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(parent)
    model = LlamaForCausalLM.from_pretrained(parent)
    data = []
    for ex in generate.sft_examples(recipe.sft_examples, seed=recipe.seed, n_test=recipe.n_test):
        p = tokenizer(ex["prompt"])["input_ids"]
        c = tokenizer(ex["completion"])["input_ids"] + [tokenizer.eos_token_id]
        data.append({"input_ids": p + c, "prompt_len": len(p)})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model=model,
            train_dataset=data,
            data_collator=_sft_collate(tokenizer),
            args=TrainingArguments(
                **trainer_args(
                    recipe.seed,
                    tmp,
                    recipe.sft_steps,
                    recipe.sft_batch,
                    recipe.sft_lr,
                    progress,
                    remove_unused_columns=False,
                )
            ),
        )
        quiet(trainer, progress).train()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"train_loss": final_loss(trainer)}


def _dpo(recipe: LMRecipe, parent: Path, out: Path, progress: bool) -> dict:
    """DPO from the SFT model (also the frozen reference) on right vs plausible-wrong answers, with TRL."""
    import datasets
    from transformers import AutoTokenizer, LlamaForCausalLM, set_seed
    from trl import DPOConfig, DPOTrainer

    set_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(parent)
    model = LlamaForCausalLM.from_pretrained(parent)
    pairs = generate.preference_pairs(recipe.dpo_pairs, seed=recipe.seed, n_test=recipe.n_test)
    logging.getLogger("datasets").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            **trainer_args(recipe.seed, tmp, recipe.dpo_steps, recipe.dpo_batch, recipe.dpo_lr, progress),
            beta=recipe.dpo_beta,
            max_length=recipe.seq_len,
        )
        trainer = DPOTrainer(
            model=model, args=args, processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(pairs)
        )
        quiet(trainer, progress).train()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"train_loss": final_loss(trainer), **_heldout_preference(recipe, parent, model, tokenizer)}


@torch.no_grad()
def _heldout_preference(recipe: LMRecipe, parent: Path, model, tokenizer) -> dict:
    """DPO loss and preference accuracy on pairs made from *test* items, SFT model as reference.

    The SFT model itself scores log 2 ≈ 0.693 on the loss by definition; the DPO model should score less.
    """
    from transformers import LlamaForCausalLM

    from ..losses import dpo_loss, preference_margins

    pairs = generate.preference_pairs(240, seed=recipe.seed, n_test=recipe.n_test, split_name="test")
    triples = [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
    reference = LlamaForCausalLM.from_pretrained(parent).eval()
    model.eval()
    loss = dpo_loss(reference, triples, tokenizer, beta=recipe.dpo_beta, batch_size=48)
    # Preference accuracy: the chosen answer more likely than the rejected one under the model.
    margin, ref_margin = preference_margins(model, loss), preference_margins(reference, loss)
    return {
        "heldout_dpo_loss": float(loss(model)),
        "heldout_pref_acc": float((margin > 0).float().mean()),
        "heldout_pref_acc_sft": float((ref_margin > 0).float().mean()),
    }


def build(recipe: LMRecipe, stage: str, *, progress: bool = False) -> Path:
    """The cached checkpoint of ``stage`` (``pre``, ``sft`` or ``dpo``), building it and its parents if needed."""
    info = {"recipe": dataclasses.asdict(recipe), "stage": stage}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if stage == "pre":
        return build_entry("lm-pre", recipe.key("pre"), lambda out: _pretrain(recipe, out, progress), info=info)
    parent = build(recipe, {"sft": "pre", "dpo": "sft"}[stage], progress=progress)
    step = _sft if stage == "sft" else _dpo
    return build_entry(f"lm-{stage}", recipe.key(stage), lambda out: step(recipe, parent, out, progress), info=info)
