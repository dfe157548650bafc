"""Scores of in-memory models: lm-eval's HFLM on the project's tasks for language models, accuracy for ViTs.

Both take model *objects*, so an edited model is evaluated as it is, without being saved and reloaded.
"""

from __future__ import annotations

import logging

import pandas as pd
import torch

from .errors import InvalidParameterError
from .tasks import check_tasks, task_manager
from .tasks.digits import task_data


def evaluate_lm(model, tokenizer, tasks: str | list[str] | None = None, limit: int | None = None,
                *, batch_size: int = 32, seed: int = 0) -> pd.DataFrame:
    """Run lm-eval on the model and tokenizer objects; one row per task and metric.

    ``tasks=None`` means all the project's tasks; ``limit`` caps the documents per task. Columns: ``task``,
    ``metric``, ``value``, ``stderr`` (NaN where lm-eval gives none). lm-eval reseeds the global RNGs; the
    model's train/eval mode is restored afterwards.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    names = check_tasks(tasks)
    if limit is not None and limit < 1:
        raise InvalidParameterError(f"limit must be a positive number of documents, got {limit}")
    was_training = model.training
    # lm-eval warns about being handed a model object and about missing few-shot splits: not news here.
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=task_manager(), limit=limit,
                                      num_fewshot=0, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000)
    finally:
        quiet.setLevel(level)
        model.train(was_training)
    rows = []
    for task in names:
        res = out["results"][task]
        for key, value in res.items():
            if "," not in key or "_stderr," in key:  # "alias", "name" and the stderr entries
                continue
            metric, _, filt = key.partition(",")
            stderr = res.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) else float("nan")
            rows.append(dict(task=task, metric=metric, value=float(value), stderr=stderr))
    return pd.DataFrame(rows, columns=["task", "metric", "value", "stderr"])


def evaluate_vision(model, task: str, *, split: str = "test", batch_size: int = 256) -> float:
    """Accuracy of a ``ViTForImageClassification`` on one of the zoo's digit tasks (``split`` test or train)."""
    images, labels = task_data(task, split=split, image_size=model.config.image_size)
    return accuracy(model, images, labels, batch_size=batch_size)


@torch.no_grad()
def accuracy(model, images, labels, *, batch_size: int = 256) -> float:
    """Share of ``images`` an image classifier labels as ``labels`` (in eval mode, batched, no gradients)."""
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for i in range(0, len(labels), batch_size):
            logits = model(pixel_values=images[i:i + batch_size].to(model.device)).logits
            correct += (logits.argmax(-1).cpu() == labels[i:i + batch_size]).sum().item()
    finally:
        model.train(was_training)
    return correct / len(labels)
