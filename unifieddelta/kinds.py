"""Kinds of pairs: how each is loaded, what its loss is, how it is scored (``KINDS``), kept apart from the engine.

The experiment engine (``experiments``) never knows what a model is: it asks a pair's kind to load the two sides,
to build the loss on held-out data (a ``losses.BatchLoss`` at W_post) and to score an edited model.

* ``lm``: a causal LM; the NLL of held-out answers (the project's tasks, some of them ``task:NAME``, a JSONL file or
  ``hf:NAME[:CONFIG][:SPLIT]``); lm-eval tasks.
* ``dpo``: an SFT -> DPO pair; the DPO loss on held-out preference triples with pre (the SFT model) as the reference;
  lm-eval tasks and the held-out preference accuracy.
* ``vision``: a ViT classifier; cross-entropy and accuracy on its task's test images.
* ``embedding``: a sentence encoder; 1 − cosine on held-out SRE paraphrase pairs; retrieval and agreement with the
  post-trained model's embeddings.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from . import losses
from .errors import CheckpointError, DataUnavailableError, InvalidParameterError
from .tasks import sre as _sre


class Measuring(Protocol):
    """What a kind's functions get: one pair loaded for measuring (``experiments.Session``)."""

    pair: Any  # pairs.Pair
    pre: nn.Module
    post: nn.Module
    dtype: torch.dtype
    state: dict  # what a kind keeps between trials (a tokenizer, a reference model, data)

    def loss(self, examples: int | None) -> losses.BatchLoss: ...


#: (folder, device, dtype, like=None) -> the model in eval mode (``like``: a model placed already, placed alike)
Loader = Callable[..., nn.Module]
#: (session, examples) -> the loss at W_post on held-out data (``examples``: how many; None: the kind's default)
LossMaker = Callable[[Measuring, "int | None"], losses.BatchLoss]
#: (session, edited model, tasks, limit, fewshot) -> (rows {task, metric, filter, value, stderr}, each task's
#: headline score on every question {task: [score, ...]}, in the order of the task's questions)
Scorer = Callable[[Measuring, nn.Module, list, "int | None", "dict | None"], tuple]


@dataclass(frozen=True)
class Kind:
    """How a kind of pair is loaded, what its loss is, how its scores are measured."""

    load: Loader
    loss: LossMaker
    scores: Scorer
    default_tasks: Callable[[Any], list]  # (pair) -> task names
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


def loss_tasks(spec: str) -> list[str] | None:
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


def hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][:SPLIT]`` -> (name, config, split): the split defaults to ``test`` and may be sliced as
    ``datasets`` allows (``train[:1319]``)."""
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
    tasks = loss_tasks(session.pair.loss_data)
    if tasks:  # a zoo pair's loss on some of its tasks only
        return losses.causal_lm_nll(_project_pairs(tok, per_task, tasks), batch_size=8)
    if session.pair.loss_data:
        return losses.causal_lm_nll(_named_pairs(session.pair.loss_data, examples), tok, batch_size=8, max_length=512)
    return losses.causal_lm_nll(_project_pairs(tok, per_task), batch_size=8)


def _lm_scores(session, model, tasks, limit, fewshot=None):
    from .evaluate import evaluate_lm

    tok = _tokenizer(session)
    table, questions = evaluate_lm(model, tok, tasks=tasks, limit=limit, num_fewshot=fewshot, per_question=True)
    return table.to_dict("records"), questions


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
    rows, questions = _lm_scores(session, model, lm_tasks, limit, fewshot) if lm_tasks else ([], {})
    if "preference" in tasks:
        won = (losses.preference_margins(model, session.loss(None)) > 0).double()
        stderr = float(won.std() / math.sqrt(len(won)))
        rows.append(dict(task="preference", metric="acc", filter="none", value=float(won.mean()), stderr=stderr))
        questions["preference"] = won.tolist()
    return rows, questions


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

        x, y = task_data(_vision_task(session.pair), split="test", image_size=session.post.config.image_size)
        session.state["images"] = (x.to(session.dtype), y)
    return session.state["images"]


def _vision_task(pair) -> str:
    """The digits task of a vision zoo pair: ``tiny-vit/rot90[...]`` -> ``rot90``."""
    return pair.zoo.partition("[")[0].partition("/")[2]


def _vision_loss(session, examples):
    x, y = _vision_data(session)
    n = examples or (64 if session.pair.smoke else VISION_LOSS_IMAGES)
    return losses.classification_ce(x[:n], y[:n], batch_size=200)


def _vision_scores(session, model, tasks, limit, fewshot=None):
    from .evaluate import correct

    x, y = _vision_data(session)
    n = limit or len(y)
    hits = correct(model, x[:n], y[:n]).double()
    acc = float(hits.mean())
    row = dict(task=tasks[0], metric="acc", filter="none", value=acc, stderr=math.sqrt(acc * (1 - acc) / n))
    return [row], {tasks[0]: hits.tolist()}


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
    return embedding_scores(model, _tokenizer(session), pairs, tasks, reference=session.state[key], per_question=True)


def _embedding_tasks(pair):
    from .evaluate import EMBEDDING_TASKS

    return list(EMBEDDING_TASKS)


KINDS: dict[str, Kind] = {
    "lm": Kind(_load_causal_lm, _lm_loss, _lm_scores, _lm_tasks),
    "dpo": Kind(_load_causal_lm, _dpo_loss, _dpo_scores, lambda pair: _lm_tasks(pair) + ["preference"]),
    # loss_version 2: 200 images
    "vision": Kind(_load_vision, _vision_loss, _vision_scores, lambda pair: [_vision_task(pair)], loss_version=2),
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


def paraphrase_check(pair, split: str = "fit", n: int | None = None, device: str = "cpu", dtype: str = "float32"):
    """Pre and post of an embedding pair on SRE paraphrase pairs of ``split``: the loss (mean 1 − cos), retrieval
    accuracy, the mean cosine of a sentence with its paraphrase and with an unrelated sentence (the next pair's).
    Used by: minilm."""
    import pandas as pd
    from transformers import AutoTokenizer

    from .evaluate import embed, retrieval_hits

    pairs = _sre.pairs(split, n=n)
    sides = dict(zip(("pre", "post"), pair.folders()))
    tokenizer = AutoTokenizer.from_pretrained(sides["post"])
    rows = {}
    for side, folder in sides.items():
        model = _load_embedding(folder, device, getattr(torch, dtype))
        e = embed(model, tokenizer, [p["a"] for p in pairs] + [p["b"] for p in pairs]).double()
        a, b = e[: len(pairs)], e[len(pairs) :]
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        other = torch.nn.functional.cosine_similarity(a, b.roll(1, 0), dim=-1)
        rows[side] = {
            "loss": float((1 - cos).mean()),
            "retrieval": float(retrieval_hits(a, b).double().mean()),
            "cos paraphrase": float(cos.mean()),
            "cos unrelated": float(other.mean()),
        }
    return pd.DataFrame(rows).T
