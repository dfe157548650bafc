"""The tiny vision pairs: a ``ViTForImageClassification`` pre-trained on scikit-learn's 8x8 digits (upscaled),
then, for each of eight tasks made by transforming the digits, a pair of checkpoints:

* pre: the pre-trained backbone with a freshly trained linear head for the task (logistic regression on its
  frozen features) — the best the backbone does without being changed;
* post: that model fine-tuned gently in full on the task (transformers' ``Trainer``).

The images and the tasks are in ``tasks/digits.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidParameterError
from ..evaluate import accuracy, evaluate_vision
from ..tasks.digits import PRETRAIN_TASK, TASKS, pretrain_data, task_data
from .recipes import ViTRecipe
from .store import build_entry
from .training import final_loss, quiet, trainer_args


def new_model(recipe: ViTRecipe):
    """A freshly initialised one-channel ``ViTForImageClassification`` with ten labels (seeded)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(recipe.seed)
    config = ViTConfig(
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        num_channels=1,
        hidden_size=recipe.width,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        intermediate_size=4 * recipe.width,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=recipe.init_std,
    )
    return ViTForImageClassification(config)


def _train(
    model, recipe: ViTRecipe, xy: tuple[torch.Tensor, torch.Tensor], steps: int, batch: int, lr: float, progress: bool
) -> float:
    """Train ``model`` on images ``xy = (x, y)`` with the ``Trainer``; return the last logged loss."""
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(recipe.seed)
    x, y = xy
    data = [{"pixel_values": a, "labels": b} for a, b in zip(x, y)]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(**trainer_args(recipe.seed, tmp, steps, batch, lr, progress, weight_decay=0.01))
        trainer = Trainer(model=model, args=args, train_dataset=data)
        quiet(trainer, progress).train()
    return final_loss(trainer)


@torch.no_grad()
def _fit_head(model, recipe: ViTRecipe, task: str) -> None:
    """Replace the classifier by a logistic regression fitted on the frozen backbone's CLS features."""
    from sklearn.linear_model import LogisticRegression

    x, y = task_data(task, split="train", image_size=recipe.image_size, seed=recipe.seed)
    model.eval()
    feats = model.vit(pixel_values=x).last_hidden_state[:, 0].numpy().astype(np.float64)
    clf = LogisticRegression(C=recipe.probe_c, max_iter=2000).fit(feats, y.numpy())
    model.classifier.weight.copy_(torch.tensor(clf.coef_, dtype=torch.float32))
    model.classifier.bias.copy_(torch.tensor(clf.intercept_, dtype=torch.float32))


def _pretrain_data(recipe: ViTRecipe, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    return pretrain_data(recipe.pre_task, split=split, image_size=recipe.image_size, seed=recipe.seed)


def _pretrain(recipe: ViTRecipe, out: Path, progress: bool) -> dict:
    model = new_model(recipe)
    loss = _train(model, recipe, _pretrain_data(recipe), recipe.pre_steps, recipe.pre_batch, recipe.pre_lr, progress)
    model.save_pretrained(out)
    return {
        "train_loss": loss,
        "pretrain_test_accuracy": accuracy(model, *_pretrain_data(recipe, "test")),
        "digits_test_accuracy": evaluate_vision(model, PRETRAIN_TASK),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _task_pair(recipe: ViTRecipe, task: str, backbone: Path, out: Path, progress: bool) -> dict:
    from transformers import ViTForImageClassification

    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = ViTForImageClassification.from_pretrained(backbone)
    _fit_head(model, recipe, task)
    model.save_pretrained(out / "pre")
    pre_acc = evaluate_vision(model, task)
    data = task_data(task, split="train", image_size=recipe.image_size, seed=recipe.seed)
    loss = _train(model, recipe, data, recipe.ft_steps, recipe.ft_batch, recipe.ft_lr, progress)
    model.save_pretrained(out / "post")
    return {"pre_accuracy": pre_acc, "post_accuracy": evaluate_vision(model, task), "train_loss": loss}


def build(recipe: ViTRecipe, task: str, *, progress: bool = False) -> tuple[Path, Path]:
    """The cached ``(pre_dir, post_dir)`` of a task, building the backbone and the pair if needed."""
    if task not in TASKS:
        raise InvalidParameterError(f"unknown vision task {task!r}; known: {', '.join(TASKS)}")
    info = {"recipe": dataclasses.asdict(recipe), "task": task}
    backbone = build_entry(
        "vit-pre", recipe.key("pre"), lambda out: _pretrain(recipe, out, progress), info={"recipe": info["recipe"]}
    )
    entry = build_entry(
        "vit-task", recipe.key("task", task), lambda out: _task_pair(recipe, task, backbone, out, progress), info=info
    )
    return entry / "pre", entry / "post"
