"""Scores of in-memory models: lm-eval's HFLM on the project's tasks for language models, accuracy for ViTs.

Both take model *objects*, so an edited model is evaluated as it is, without being saved and reloaded.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import pandas as pd
import torch

from .errors import DataUnavailableError, InvalidParameterError
from .tasks import check_tasks, is_project_task, task_manager
from .tasks.digits import task_data


def evaluate_lm(
    model,
    tokenizer,
    tasks: str | list[str] | None = None,
    limit: int | None = None,
    *,
    num_fewshot: int | dict[str, int] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    per_question: bool = False,
):
    """Run lm-eval on the model and tokenizer objects; one row per task, metric and filter.

    ``tasks``: the project's tasks (None: all of them) and/or lm-eval's built-in ones (``gsm8k``, ...).
    ``num_fewshot``: one count for all, or a count per task; by default the project's tasks are zero-shot and a
    built-in one uses its own default. ``limit`` caps the documents per task. Columns: ``task``, ``metric``,
    ``filter``, ``value``, ``stderr`` (NaN where lm-eval gives none). A built-in task whose data cannot be loaded
    (offline, say) raises one ``DataUnavailableError``. lm-eval reseeds the global RNGs; the model's train/eval
    mode is restored afterwards. ``per_question=True``: also each task's headline score (``primary``) on every
    question, in the order of the task's documents — ``(table, {task: [score, ...]})`` —, which is what a paired
    comparison of two models on the same questions needs.
    """
    names = check_tasks(tasks)
    if limit is not None and limit < 1:
        raise InvalidParameterError(f"limit must be a positive number of documents, got {limit}")
    groups = fewshot_groups(names, num_fewshot)
    was_training = model.training
    # lm-eval warns about being handed a model object and about missing few-shot splits: not news here.
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one "Generating train split" bar per task and call otherwise
    results, samples = {}, {}
    try:
        lm = _quiet_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
        manager = task_manager(names)
        with _no_request_bars(), _faster_lm_eval():
            for shots, group in groups.items():  # lm-eval takes one few-shot count per call
                out = _run_group(lm, group, shots, manager, limit, seed, per_question)
                results.update(out["results"])
                samples.update(out.get("samples") or {})
    finally:
        quiet.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
        model.train(was_training)
    table = _result_rows(results, names)
    return (table, per_question_scores(samples, table)) if per_question else table


def _result_rows(results: dict, names: list[str]) -> pd.DataFrame:
    """lm-eval's results as rows (task, metric, filter, value, stderr; NaN where lm-eval gives no stderr)."""
    rows = []
    for task in names:
        res = results[task]
        for key, value in res.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue  # "alias", "name" and the stderr entries
            metric, _, filt = key.partition(",")
            stderr = res.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) else float("nan")
            rows.append(dict(task=task, metric=metric, filter=filt, value=float(value), stderr=stderr))
    return pd.DataFrame(rows, columns=["task", "metric", "filter", "value", "stderr"])


def per_question_scores(samples: dict, table: pd.DataFrame) -> dict[str, list[float]]:
    """Each task's headline score (``primary(table)``) on every question lm-eval logged, in document order."""
    out = {}
    for head in primary(table).itertuples():
        logged = [x for x in samples.get(head.task, []) if x.get("filter") == head.filter and head.metric in x]
        out[head.task] = [float(x[head.metric]) for x in sorted(logged, key=lambda x: x["doc_id"])]
    return out


@contextlib.contextmanager
def _no_request_bars():
    """lm-eval draws a progress bar per task while it builds the requests (no option turns it off)."""
    import lm_eval.api.task as task_module

    bar = task_module.tqdm
    task_module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = bar


@contextlib.contextmanager
def _faster_lm_eval():
    """lm-eval compiles each task's Jinja template anew for every document (half the time of an evaluation of a
    small model) and collects the machine's environment (pip, git) for every call: compile each template once, and
    skip the environment, which the store records itself. The scores are the same, document for document."""
    import lm_eval.evaluator as evaluator
    import lm_eval.utils as utils

    compiled = functools.lru_cache(maxsize=512)(utils.env.from_string)
    saved = utils.apply_template, evaluator.add_env_info
    utils.apply_template = lambda template, doc: compiled(template).render(**doc)
    evaluator.add_env_info = lambda results: None
    try:
        yield
    finally:
        utils.apply_template, evaluator.add_env_info = saved


def _quiet_hflm():
    """lm-eval's HFLM without its per-request progress bars (a sweep has its own bar over trials)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def fewshot_groups(names: list[str], num_fewshot: int | dict[str, int] | None) -> dict[int | None, list[str]]:
    """Tasks grouped by their few-shot count (None: the task's own default; the project's tasks default to 0)."""
    groups: dict[int | None, list[str]] = {}
    for name in names:
        shots = num_fewshot.get(name) if isinstance(num_fewshot, dict) else num_fewshot
        groups.setdefault(0 if shots is None and is_project_task(name) else shots, []).append(name)
    return groups


def _run_group(lm, names: list[str], shots: int | None, manager, limit, seed: int, log: bool = False) -> dict:
    import lm_eval

    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            limit=limit,
            num_fewshot=shots,
            log_samples=log,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=1000,
        )
    except (ConnectionError, OSError) as e:  # datasets/huggingface_hub: no network, or not in the local cache
        raise DataUnavailableError(
            f"the data of task(s) {', '.join(names)} could not be loaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); lm-eval's built-in tasks download their data from the "
            "hub on first use: run once with internet access (without HF_DATASETS_OFFLINE) to cache it"
        ) from None
    return out


#: The score a chapter reports for a task: (metric, filter) preferred in this order, the first one present.
PRIMARY = {
    "arc_challenge": ("acc_norm", "none"),
    "hellaswag": ("acc_norm", "none"),
    "gsm8k": ("exact_match", "strict-match"),
    "ifeval": ("prompt_level_strict_acc", "none"),
    "truthfulqa_mc2": ("acc", "none"),
    "humaneval": ("pass@1", "create_test"),
}
_FALLBACK = ("exact_match", "acc", "pass@1", "prompt_level_strict_acc")


def primary(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per task: its headline score (``PRIMARY``, else the first of exact_match, acc, pass@1 present)."""
    keep = []
    for task, rows in scores.groupby("task", sort=False):
        want = PRIMARY.get(task)
        hit = rows[(rows.metric == want[0]) & (rows["filter"] == want[1])] if want else rows.iloc[:0]
        if hit.empty:
            for metric in _FALLBACK:
                hit = rows[rows.metric == metric]
                if not hit.empty:
                    break
        keep.append(hit.iloc[:1] if not hit.empty else rows.iloc[:1])
    return pd.concat(keep, ignore_index=True) if keep else scores.iloc[:0]


def evaluate_vision(model, task: str, *, split: str = "test", batch_size: int = 256) -> float:
    """Accuracy of a ``ViTForImageClassification`` on one of the zoo's digit tasks (``split`` test or train)."""
    images, labels = task_data(task, split=split, image_size=model.config.image_size)
    return accuracy(model, images, labels, batch_size=batch_size)


def accuracy(model, images, labels, *, batch_size: int = 256) -> float:
    """Share of ``images`` an image classifier labels as ``labels`` (in eval mode, batched, no gradients)."""
    return float(correct(model, images, labels, batch_size=batch_size).double().mean())


@torch.no_grad()
def correct(model, images, labels, *, batch_size: int = 256) -> torch.Tensor:
    """For each of ``images``: does the classifier label it as ``labels`` says (in eval mode, batched)."""
    was_training = model.training
    model.eval()
    try:
        hits = []
        for i in range(0, len(labels), batch_size):
            logits = model(pixel_values=images[i : i + batch_size].to(model.device)).logits
            hits.append(logits.argmax(-1).cpu() == labels[i : i + batch_size])
    finally:
        model.train(was_training)
    return torch.cat(hits)


# ---------------------------------------------------------------------------------------------- sentence embeddings

#: The scores of an embedding pair: paraphrase retrieval, and agreement with the post-trained model's embeddings.
EMBEDDING_TASKS = ("sre_retrieval", "sre_agreement")


@torch.no_grad()
def embed(model, tokenizer, sentences, *, batch_size: int = 128) -> torch.Tensor:
    """Mean-pooled embeddings of ``sentences`` (one row each, float32 or wider), in eval mode, without gradients."""
    from .losses import sentence_embeddings, tokenize_sentences

    was_training = model.training
    model.eval()
    try:
        sentences = list(sentences)
        return torch.cat(
            [
                sentence_embeddings(model, tokenize_sentences(tokenizer, sentences[i : i + batch_size])).cpu()
                for i in range(0, len(sentences), batch_size)
            ]
        )
    finally:
        model.train(was_training)


def retrieval_hits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For row i of ``a``: is row i of ``b`` its nearest row of ``b`` by cosine, and the same from ``b`` to ``a``:
    2n booleans (a's queries, then b's)."""
    sim = torch.nn.functional.normalize(a.double(), dim=-1) @ torch.nn.functional.normalize(b.double(), dim=-1).T
    target = torch.arange(len(a))
    return torch.cat([sim.argmax(1) == target, sim.argmax(0) == target])


def embedding_scores(
    model, tokenizer, pairs, tasks=EMBEDDING_TASKS, *, reference: torch.Tensor | None = None, per_question=False
):
    """Scores of an encoder on paraphrase pairs (a, b): ``sre_retrieval`` (acc: the share of the 2n sentences
    whose nearest sentence of the other side is their paraphrase) and ``sre_agreement`` (cosine: the mean cosine
    between its embeddings of the 2n sentences and ``reference``, the post-trained model's, in the order a's, b's).
    ``per_question=True``: also each score on every one of the 2n sentences, ``(rows, {task: [...]})``."""
    unknown = sorted(set(tasks) - set(EMBEDDING_TASKS))
    if unknown:
        raise InvalidParameterError(
            f"unknown task(s) {', '.join(unknown)} for an embedding pair; known: {', '.join(EMBEDDING_TASKS)}"
        )
    if not pairs:
        raise InvalidParameterError("no pairs to score")
    e = embed(model, tokenizer, [a for a, _ in pairs] + [b for _, b in pairs])
    n, rows, items = len(pairs), [], {}
    if "sre_retrieval" in tasks:
        hits = retrieval_hits(e[:n], e[n:]).double()
        acc = float(hits.mean())
        stderr = (acc * (1 - acc) / (2 * n)) ** 0.5
        rows.append(dict(task="sre_retrieval", metric="acc", filter="none", value=acc, stderr=stderr))
        items["sre_retrieval"] = hits.tolist()
    if "sre_agreement" in tasks:
        if reference is None or reference.shape != e.shape:
            raise InvalidParameterError(f"sre_agreement needs the post-trained model's {tuple(e.shape)} embeddings")
        cos = torch.nn.functional.cosine_similarity(e.double(), reference.double(), dim=-1)
        stderr = float(cos.std() / len(cos) ** 0.5)
        rows.append(dict(task="sre_agreement", metric="cosine", filter="none", value=float(cos.mean()), stderr=stderr))
        items["sre_agreement"] = cos.tolist()
    return (rows, items) if per_question else rows
