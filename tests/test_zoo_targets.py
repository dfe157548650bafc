"""benchmarks/zoo_targets.py: the script that measures the zoo's targets, run on a tiny recipe."""

import dataclasses
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_zoo import TINY_LM

from unifieddelta import zoo
from unifieddelta.errors import InvalidParameterError

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "zoo_targets.py"


@pytest.fixture(scope="module")
def zt():
    spec = importlib.util.spec_from_file_location("zoo_targets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_overrides() -> list[str]:
    default = zoo.recipe_for("tiny-lm")
    return [
        f"{f.name}={getattr(TINY_LM, f.name)}"
        for f in dataclasses.fields(TINY_LM)
        if getattr(TINY_LM, f.name) != getattr(default, f.name)
    ]


def test_overrides_cast_to_the_field_type_and_reject_unknown_fields(zt):
    recipe = zt.with_overrides(zoo.recipe_for("tiny-lm"), ["sft_lr=5e-5", "width=32", "ft_steps=3"])
    assert recipe.sft_lr == 5e-5 and recipe.width == 32  # ft_steps is a ViT field: skipped for an LM
    with pytest.raises(SystemExit, match="no recipe has a field"):
        zt.with_overrides(recipe, ["sft_rate=1"])
    with pytest.raises(InvalidParameterError, match="KEY=VALUE"):
        zt.with_overrides(recipe, ["sft_lr"])


def test_breaks_at_is_the_first_p_losing_more_than_two_points(zt):
    table = pd.DataFrame(
        {"post": [0.50, 0.90], "DARE p=0.3": [0.49, 0.90], "DARE p=0.5": [0.48, 0.89], "DARE p=0.7": [0.47, 0.90]}
    )
    assert zt.breaks_at(table, [0.7, 0.3, 0.5]) == 0.7  # 0.48 is exactly 2 points below: not broken
    assert zt.breaks_at(table, [0.3, 0.5]) is None


def test_runs_end_to_end_on_a_tiny_recipe(zt, tmp_path, monkeypatch):
    out = tmp_path / "targets.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "zoo_targets.py",
            "--names",
            "tiny-lm",
            "--dare-sweep",
            "0.5",
            "--dare-seeds",
            "2",
            "--json",
            str(out),
            "--set",
            *_tiny_overrides(),
        ],
    )
    zt.main()
    result = json.loads(out.read_text())["tiny-lm"]
    pre, post = zoo.load_pair("tiny-lm", recipe=TINY_LM)  # the overrides built exactly this recipe's pair
    a, b = load_file(str(pre / "model.safetensors")), load_file(str(post / "model.safetensors"))
    rel = statistics.median(
        ((b[k].double() - a[k].double()).norm() / a[k].double().norm()).item() for k in a if a[k].ndim == 2
    )
    assert result["rel_change"] == pytest.approx(rel, rel=1e-5)
    runs = result["dare_per_seed"]["DARE p=0.5"]
    assert len(runs) == 2
    for task, mean in result["scores"]["DARE p=0.5"].items():
        assert mean == pytest.approx((runs[0][task] + runs[1][task]) / 2)
    assert set(result["scores"]["post"]) == set(runs[0]) and len(runs[0]) == 6
    assert all(0 <= v <= 1 for v in result["scores"]["pre"].values())
    assert torch.tensor(list(result["eval_seconds"].values())).gt(0).all()
