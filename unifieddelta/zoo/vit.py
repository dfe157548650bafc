"""The tiny vision pairs: a ``ViTForImageClassification`` pre-trained on scikit-learn's 8x8 digits (upscaled),
then, for each of eight tasks made by transforming the digits, a pair of checkpoints:

* pre: the pre-trained backbone with a freshly trained linear head for the task (logistic regression on its
  frozen features) — the best the backbone does without being changed;
* post: that model fine-tuned gently in full on the task (transformers' ``Trainer``).

The digits are split once into train and test images; every task's test images come from the test split, so
neither pre-training nor any fine-tune sees them.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidParameterError
from .recipes import ViTRecipe
from .store import build_entry

PRETRAIN_TASK = "digits"
#: Bump when a transform or the split changes: it is part of every vision cache key.
DATA_VERSION = 2
N_TEST = 400  # test images, fixed so that every recipe and evaluate_vision agree on the split


def _shift(x: torch.Tensor) -> torch.Tensor:
    return torch.roll(x, shifts=(2, 2), dims=(-2, -1))


def _noise(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return x + 0.3 * torch.randn(x.shape, generator=g)


#: Each task is the 10-way digit label on transformed images, like the paper's eight datasets sharing a backbone.
TRANSFORMS = {
    PRETRAIN_TASK: lambda x: x,
    "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(-2, -1)),
    "rot270": lambda x: torch.rot90(x, 3, dims=(-2, -1)),
    "flip_lr": lambda x: torch.flip(x, dims=(-1,)),
    "flip_ud": lambda x: torch.flip(x, dims=(-2,)),
    "invert": lambda x: 1.0 - x,
    "shift": _shift,
    "noise": _noise,
}
TASKS = [t for t in TRANSFORMS if t != PRETRAIN_TASK]


def _upright(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x, y


def _low_digits(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = y < 5
    return x[keep], y[keep]


def _rotation(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-supervised: each image at 0, 90, 180 and 270 degrees, labelled by its rotation (0..3)."""
    xs = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return torch.cat(xs), torch.arange(4).repeat_interleave(len(x))


#: What the backbone can be pre-trained on (``ViTRecipe.pre_task``): ``(images, labels) -> (images, labels)`` of
#: the upright digits. ``digits``: the ten digits; ``digits_low``: only 0-4; ``rotation``: which way an image is
#: turned (no digit labels at all), so a linear probe on its features is a weak start for the digit tasks.
PRETRAIN_TASKS = {"digits": _upright, "digits_low": _low_digits, "rotation": _rotation}


@lru_cache(maxsize=4)
def _digits(n_test: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's digits in [0, 1], shape (N, 1, 8, 8), split once by a seeded permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:n_test], order[n_test:]
    return {"train": (x[train], y[train]), "test": (x[test], y[test])}


def task_data(task: str, *, split: str = "test", image_size: int = 16,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values, labels)`` of a task: the split's digits, transformed, upscaled to ``image_size``."""
    if task not in TRANSFORMS:
        raise InvalidParameterError(f"unknown vision task {task!r}; known: {', '.join(TRANSFORMS)}")
    if split not in ("train", "test"):
        raise InvalidParameterError(f"split must be 'train' or 'test', got {split!r}")
    x, y = _digits(N_TEST, seed)[split]
    x = TRANSFORMS[task](x)
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x, y


def pretrain_data(recipe: ViTRecipe, *, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values, labels)`` of the recipe's pre-training task (training digits only, upscaled)."""
    if recipe.pre_task not in PRETRAIN_TASKS:
        raise InvalidParameterError(
            f"unknown pre-training task {recipe.pre_task!r}; known: {', '.join(PRETRAIN_TASKS)}")
    x, y = _digits(N_TEST, recipe.seed)[split]
    x, y = PRETRAIN_TASKS[recipe.pre_task](x, y)
    if recipe.image_size != x.shape[-1]:
        x = F.interpolate(x, size=(recipe.image_size, recipe.image_size), mode="bilinear", align_corners=False)
    return x, y


def new_model(recipe: ViTRecipe):
    """A freshly initialised one-channel ``ViTForImageClassification`` with ten labels (seeded)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(recipe.seed)
    config = ViTConfig(image_size=recipe.image_size, patch_size=recipe.patch_size, num_channels=1,
                       hidden_size=recipe.width, num_hidden_layers=recipe.layers,
                       num_attention_heads=recipe.heads, intermediate_size=4 * recipe.width, num_labels=10,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       initializer_range=recipe.init_std)
    return ViTForImageClassification(config)


def _train(model, recipe: ViTRecipe, xy: tuple[torch.Tensor, torch.Tensor], steps: int, batch: int, lr: float,
           progress: bool) -> float:
    """Train ``model`` on images ``xy = (x, y)`` with the ``Trainer``; return the last logged loss."""
    from transformers import Trainer, TrainingArguments, set_seed

    from .lm import _final_loss, _quiet

    set_seed(recipe.seed)
    x, y = xy
    data = [{"pixel_values": a, "labels": b} for a, b in zip(x, y)]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch,
                                 learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20),
                                 weight_decay=0.01, seed=recipe.seed, data_seed=recipe.seed, use_cpu=True,
                                 report_to="none", save_strategy="no", logging_steps=max(1, steps // 10),
                                 disable_tqdm=not progress, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        _quiet(trainer, progress).train()
    return _final_loss(trainer)


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


def _pretrain(recipe: ViTRecipe, out: Path, progress: bool) -> dict:
    from ..evaluate import accuracy, evaluate_vision

    model = new_model(recipe)
    loss = _train(model, recipe, pretrain_data(recipe), recipe.pre_steps, recipe.pre_batch, recipe.pre_lr, progress)
    model.save_pretrained(out)
    return {"train_loss": loss, "pretrain_test_accuracy": accuracy(model, *pretrain_data(recipe, split="test")),
            "digits_test_accuracy": evaluate_vision(model, PRETRAIN_TASK),
            "parameters": sum(p.numel() for p in model.parameters())}


def _task_pair(recipe: ViTRecipe, task: str, backbone: Path, out: Path, progress: bool) -> dict:
    from transformers import ViTForImageClassification

    from ..evaluate import evaluate_vision

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
    backbone = build_entry("vit-pre", recipe.key("pre"), lambda out: _pretrain(recipe, out, progress),
                           info={"recipe": info["recipe"]})
    entry = build_entry("vit-task", recipe.key("task", task),
                        lambda out: _task_pair(recipe, task, backbone, out, progress), info=info)
    return entry / "pre", entry / "post"
