"""Loss callables with fixed data and batch size, for the approximation term: ``loss(model) -> scalar``.

Each loss is a mean over *all* its data (tokens for the NLL, examples otherwise), split into fixed batches.
``loss.parts()`` gives one callable per batch of this process, each returning that batch's share of the mean,
so the parts sum to the loss. Under ``torch.distributed`` every process takes every world-size-th batch, and
the shares summed over processes are the one-process loss exactly; :mod:`unifieddelta.approx` sums them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidParameterError

IGNORE = -100  # label of a token that does not count (prompt, padding), as in Hugging Face


class BatchLoss:
    """A mean over fixed batches: ``batch_sum(model, batch)`` sums the loss over a batch, ``total`` counts the data."""

    def __init__(self, batches: list, batch_sum: Callable[[nn.Module, Any], torch.Tensor], total: float, name: str):
        if not batches or total <= 0:
            raise InvalidParameterError(f"{name}: no data to compute a loss on")
        self.batches, self.batch_sum, self.total, self.name = batches, batch_sum, float(total), name

    def parts(self) -> list[Callable[[nn.Module], torch.Tensor]]:
        """This process's batches, each as ``model -> its share of the mean``."""
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return [functools.partial(self._part, i) for i in range(rank, len(self.batches), world)]

    def _part(self, i: int, model: nn.Module) -> torch.Tensor:
        return self.batch_sum(model, self.batches[i]) / self.total

    def __call__(self, model: nn.Module) -> torch.Tensor:
        return sum(part(model) for part in self.parts())

    def __repr__(self) -> str:
        return f"{self.name}({len(self.batches)} batches, total={self.total:g})"


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    if not isinstance(size, int) or size < 1:
        raise InvalidParameterError(f"batch_size must be an integer >= 1, got {size!r}")
    return [items[i : i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------------------------------------- causal LM


def encode_pair(prompt, answer, tokenizer, max_length: int | None) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer and their labels (IGNORE on the prompt); strings need a tokenizer."""
    if isinstance(prompt, str) or isinstance(answer, str):
        if tokenizer is None:
            raise InvalidParameterError("text data needs a tokenizer (or pass token ids)")
        prompt = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        answer = tokenizer(answer, add_special_tokens=False)["input_ids"] if isinstance(answer, str) else list(answer)
    ids, labels = list(prompt) + list(answer), [IGNORE] * len(prompt) + list(answer)
    if max_length is not None:  # keep the end, where the answer is
        ids, labels = ids[-max_length:], labels[-max_length:]
    if all(label == IGNORE for label in labels):
        raise InvalidParameterError("a (prompt, answer) pair has no answer tokens")
    return ids, labels


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    n = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [pad_id] * (n - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [IGNORE] * (n - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i, _ in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token | earlier tokens) at every labelled position (0 elsewhere), and the mask of those positions."""
    dev = _device(model)
    logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # softmax in >= float32
    labels = batch["labels"][:, 1:].to(dev)
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return logp * mask, mask


#: Architectures whose logits are the output layer applied to the base model's last hidden state (Gemma: with its
#: optional soft cap), so the output layer can be applied at the answer positions only.
HEAD_APART = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2")


def answer_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], *, chunk: int = 512) -> torch.Tensor:
    """Per row of ``batch``, the summed log-probability of its labelled tokens: ``token_logprobs(...)[0].sum(-1)``.

    For the architectures of ``HEAD_APART`` only the labelled positions go through the output layer, ``chunk`` at a
    time: with a large vocabulary (Gemma's 262k rows) that is most of a forward and backward pass saved, and the
    logits stay small. Other models take the whole-sequence path.
    """
    if getattr(model.config, "model_type", None) not in HEAD_APART:
        return token_logprobs(model, batch)[0].sum(-1)
    dev = _device(model)
    hidden = model.base_model(
        input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)
    ).last_hidden_state
    labels = batch["labels"][:, 1:].to(dev)
    rows, cols = (labels != IGNORE).nonzero(as_tuple=True)
    states, targets = hidden[:, :-1][rows, cols], labels[rows, cols]
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    parts = []
    for i in range(0, len(states), chunk):
        logits = head(states[i : i + chunk])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax in >= float32
        if cap:
            logits = torch.tanh(logits / cap) * cap
        parts.append(torch.log_softmax(logits, -1).gather(-1, targets[i : i + chunk, None])[:, 0])
    logp = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return logp.new_zeros(len(labels)).index_add(0, rows, logp)


def causal_lm_nll(
    pairs: Sequence[tuple], tokenizer=None, *, batch_size: int = 8, max_length: int | None = None
) -> BatchLoss:
    """Mean negative log-likelihood per answer token of (prompt, answer) pairs, prompt tokens masked.

    Pairs are strings (with a tokenizer; the prompt gets the tokenizer's special tokens, the answer none) or
    lists of token ids. This is how the paper's term is computed on GSM8K (question → worked answer).
    """
    rows = [encode_pair(p, a, tokenizer, max_length) for p, a in pairs]
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    batches = [pad_rows(list(chunk), pad_id) for chunk in _chunks(rows, batch_size)]
    total = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)

    def batch_sum(model, batch):
        return -answer_logprobs(model, batch).sum()

    return BatchLoss(batches, batch_sum, total, "causal_lm_nll")


# ---------------------------------------------------------------------------------------------- classification


def classification_ce(
    inputs: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 64, input_name: str | None = "pixel_values"
) -> BatchLoss:
    """Mean cross-entropy of a classifier over fixed examples (``model(**{input_name: x}).logits``, or ``model(x)``)."""
    if len(inputs) != len(labels):
        raise InvalidParameterError(f"{len(inputs)} inputs but {len(labels)} labels")
    batches = list(zip(_chunks(inputs, batch_size), _chunks(torch.as_tensor(labels), batch_size)))

    def batch_sum(model, batch):
        x, y = batch
        dev = _device(model)
        out = model(**{input_name: x.to(dev)}) if input_name else model(x.to(dev))
        logits = getattr(out, "logits", out)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, y.to(dev), reduction="sum")

    return BatchLoss(batches, batch_sum, len(inputs), "classification_ce")


# ---------------------------------------------------------------------------------------------- DPO


def dpo_loss(
    reference: nn.Module,
    triples: Sequence[tuple],
    tokenizer=None,
    *,
    beta: float = 0.1,
    batch_size: int = 8,
    max_length: int | None = None,
) -> BatchLoss:
    """Mean DPO loss −log σ(β[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]).

    ``triples`` are (prompt, chosen, rejected); sequence log-probabilities sum over the answer tokens. The
    reference model (usually the SFT checkpoint) is fixed, so its log-probabilities are computed once per batch.
    """
    if beta <= 0:
        raise InvalidParameterError(f"beta must be > 0, got {beta}")
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    batches = []
    for chunk in _chunks(list(triples), batch_size):  # one batch: the chosen rows, then the rejected rows
        rows = [encode_pair(p, c, tokenizer, max_length) for p, c, _ in chunk]
        rows += [encode_pair(p, r, tokenizer, max_length) for p, _, r in chunk]
        batches.append(pad_rows(rows, pad_id))
    ref_cache: dict[int, torch.Tensor] = {}

    def seq_logp(model, batch):
        return answer_logprobs(model, batch)

    def batch_sum(model, batch):
        key = id(batch)
        if key not in ref_cache:
            with torch.no_grad():
                ref_cache[key] = seq_logp(reference, batch).double().cpu()
        logp = seq_logp(model, batch)
        margin = logp - ref_cache[key].to(device=logp.device, dtype=logp.dtype)
        n = len(margin) // 2
        return -F.logsigmoid(beta * (margin[:n] - margin[n:])).sum()

    return BatchLoss(batches, batch_sum, len(triples), "dpo_loss")


@torch.no_grad()
def preference_margins(model: nn.Module, loss: BatchLoss) -> torch.Tensor:
    """log π(chosen) − log π(rejected) under ``model`` for every triple of a :func:`dpo_loss`, in order: the
    preference accuracy is the share above zero."""
    out = []
    for batch in loss.batches:  # one batch: the chosen rows, then the rejected rows
        logp = answer_logprobs(model, batch)
        n = len(logp) // 2
        out.append((logp[:n] - logp[n:]).double().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- sentence embeddings


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the token states over the attention mask (sentence-transformers' mean pooling), in ≥ float32."""
    hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    mask = attention_mask[..., None].to(device=hidden.device, dtype=hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def sentence_embeddings(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled last hidden states of an encoder (a ``BertModel``) for a tokenized batch, one row per sentence."""
    dev = _device(model)
    out = model(**{k: v.to(dev) for k, v in batch.items()})
    return mean_pool(out.last_hidden_state, batch["attention_mask"])


def tokenize_sentences(tokenizer, sentences: Sequence[str], max_length: int = 256) -> dict[str, torch.Tensor]:
    """A padded batch of sentences, truncated at ``max_length`` tokens (the folders' sentence-transformers setting)."""
    if tokenizer is None:
        raise InvalidParameterError("sentences need a tokenizer")
    return dict(tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def cosine_embedding_loss(
    pairs: Sequence[tuple[str, str]], tokenizer, *, batch_size: int = 32, max_length: int = 256
) -> BatchLoss:
    """Mean of 1 − cos(e(a), e(b)) over paraphrase pairs (a, b), e the mean-pooled embedding: 0 when every pair's
    two sentences map to the same direction. Each batch holds the pairs' first sentences, then their second ones."""
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(isinstance(s, str) and s for s in pair):
            raise InvalidParameterError(f"pair {i}: expected two non-empty sentences, got {pair!r}")
    batches = [
        tokenize_sentences(tokenizer, [a for a, _ in chunk] + [b for _, b in chunk], max_length)
        for chunk in _chunks(list(pairs), batch_size)
    ]

    def batch_sum(model, batch):
        e = sentence_embeddings(model, batch)
        n = len(e) // 2
        return (1.0 - F.cosine_similarity(e[:n], e[n:], dim=-1)).sum()

    return BatchLoss(batches, batch_sum, len(pairs), "cosine_embedding_loss")
