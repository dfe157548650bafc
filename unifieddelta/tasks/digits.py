"""The vision tasks' data: scikit-learn's 8x8 digits, split once into train and test images, and transformed.

Each of the eight tasks is the 10-way digit label on transformed images (rotations, flips, inversion, shift,
noise), like the paper's eight datasets sharing one backbone; a backbone is pre-trained on one of
``PRETRAIN_TASKS``. Every task's test images come from the one test split, so neither pre-training nor any
fine-tune sees them. The zoo trains on this data (``zoo/vit.py``) and ``evaluate.evaluate_vision`` scores on it.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from ..errors import InvalidParameterError

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


def _upscale(x: torch.Tensor, image_size: int) -> torch.Tensor:
    if image_size == x.shape[-1]:
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)


def task_data(
    task: str, *, split: str = "test", image_size: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values, labels)`` of a task: the split's digits, transformed, upscaled to ``image_size``."""
    if task not in TRANSFORMS:
        raise InvalidParameterError(f"unknown vision task {task!r}; known: {', '.join(TRANSFORMS)}")
    if split not in ("train", "test"):
        raise InvalidParameterError(f"split must be 'train' or 'test', got {split!r}")
    x, y = _digits(N_TEST, seed)[split]
    return _upscale(TRANSFORMS[task](x), image_size), y


def pretrain_data(
    pre_task: str, *, split: str = "train", image_size: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values, labels)`` of a backbone's pre-training task (``PRETRAIN_TASKS``), upscaled."""
    if pre_task not in PRETRAIN_TASKS:
        raise InvalidParameterError(f"unknown pre-training task {pre_task!r}; known: {', '.join(PRETRAIN_TASKS)}")
    x, y = PRETRAIN_TASKS[pre_task](*_digits(N_TEST, seed)[split])
    return _upscale(x, image_size), y
