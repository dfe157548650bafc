"""The project's lm-eval tasks: deterministic data, no train/test overlap, offline runs on in-memory models."""

import json
import re

import pytest
import torch
import yaml

from unifieddelta.errors import DataUnavailableError, InvalidParameterError
from unifieddelta.tasks import check_tasks, generate, materialize, task_names

N_TEST = generate.N_TEST


def test_at_least_four_tasks_of_both_kinds():
    names = task_names()
    assert set(names) == set(generate.TASKS)
    kinds = [generate.TASKS[n].output_type for n in names]
    assert kinds.count("generate_until") >= 2 and kinds.count("multiple_choice") >= 2


@pytest.mark.parametrize("task", sorted(generate.TASKS))
def test_no_test_item_in_any_training_data(task):
    train, test = generate.split(task, n_test=N_TEST)
    assert len(test) == N_TEST
    assert not {it["key"] for it in train} & {it["key"] for it in test}
    test_questions = {generate.prompt(it["question"]) for it in test}
    test_statements = {it["statement"] for it in test}
    # Every training form: the whole training pools, and the samples the default recipes draw.
    assert not test_questions & {generate.prompt(it["question"]) for it in train}
    assert not test_statements & {it["statement"] for it in train}
    assert not test_questions & {ex["prompt"] for ex in generate.sft_examples(3000, n_test=N_TEST)}
    assert not test_questions & {ex["prompt"] for ex in generate.preference_pairs(1000, n_test=N_TEST)}
    docs = generate.pretraining_texts(2000, n_test=N_TEST, qa_share=0.2)
    corpus = {s for doc in docs for s in re.split(r"(?<=\.) ", doc)}
    assert len(corpus) > 1000 and not test_statements & corpus
    qa_docs = [d for d in docs if d.startswith("Question:")]
    assert qa_docs and not [q for q in test_questions for d in qa_docs if q in d]


def test_data_is_deterministic():
    assert generate.split("ud_word", n_test=N_TEST) == generate.split("ud_word", n_test=N_TEST)
    assert generate.pretraining_texts(5) == generate.pretraining_texts(5)
    assert generate.split("ud_max", seed=1)[1] != generate.split("ud_max", seed=0)[1]


def test_materialized_yaml_points_at_absolute_data():
    folder = materialize()
    assert folder.is_absolute()
    for name in task_names():
        config = yaml.safe_load((folder / f"{name}.yaml").read_text())
        path = config["dataset_kwargs"]["data_files"]
        assert path.startswith("/") and path.endswith(f"{name}.jsonl")
        docs = [json.loads(line) for line in open(path)]
        assert len(docs) == N_TEST and all("question" in d and "answer" in d for d in docs)
        if generate.TASKS[name].output_type == "multiple_choice":
            assert all(d["choices"][d["label"]] == d["answer"] for d in docs)
    assert materialize() == folder


def test_unknown_task_is_a_clear_error():
    with pytest.raises(InvalidParameterError, match="unknown task 'gsm8kk'"):
        check_tasks(["ud_add", "gsm8kk"])
    assert check_tasks(["ud_add", "gsm8k"]) == ["ud_add", "gsm8k"]  # lm-eval's own tasks are accepted by name
    assert check_tasks(None) == task_names()
    assert check_tasks("ud_add") == ["ud_add"]


def _tiny_lm():
    from transformers import AutoTokenizer, LlamaForCausalLM

    from unifieddelta.zoo import LMRecipe, lm

    recipe = LMRecipe(width=32, layers=2, heads=2, seq_len=64, pre_docs=300, pre_steps=20, pre_batch=8)
    folder = lm.build(recipe, "pre")
    return LlamaForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_tasks_run_offline_through_lm_eval_on_an_in_memory_model():
    from unifieddelta.evaluate import evaluate_lm

    model, tok = _tiny_lm()
    model.train()
    df = evaluate_lm(model, tok, limit=4)
    assert model.training  # the caller's mode is restored
    assert list(df.columns) == ["task", "metric", "filter", "value", "stderr"]
    assert set(df["task"]) == set(task_names())
    assert set(df["metric"]) == {"exact_match", "acc"}
    assert df["value"].between(0, 1).all()

    # An edited model is evaluated as it is in memory: zeroing the output layer makes every choice equally
    # likely, so the first choice always wins (lm-eval's argmax) and accuracy equals the share of label 0.
    with torch.no_grad():
        model.lm_head.weight.zero_()
    df2 = evaluate_lm(model, tok, tasks=["ud_parity"], limit=8)
    docs = [json.loads(line) for line in open(materialize() / "ud_parity.jsonl")][:8]
    assert df2["value"].iloc[0] == pytest.approx(sum(d["label"] == 0 for d in docs) / 8)

    with pytest.raises(InvalidParameterError, match="unknown task 'no_such_task'"):
        evaluate_lm(model, tok, tasks=["ud_add", "no_such_task"])
    # a built-in task is accepted by name; offline its data is missing: one clear error
    with pytest.raises(DataUnavailableError, match="arc_easy.*internet access"):
        evaluate_lm(model, tok, tasks=["arc_easy"], limit=2)
    assert model.training


def test_fewshot_counts_group_the_tasks():
    from unifieddelta.evaluate import fewshot_groups

    assert fewshot_groups(["ud_add", "gsm8k", "mmlu"], None) == {0: ["ud_add"], None: ["gsm8k", "mmlu"]}
    assert fewshot_groups(
        ["ud_add", "gsm8k", "mmlu", "arc_challenge"], {"gsm8k": 5, "mmlu": 5, "arc_challenge": 25}
    ) == {0: ["ud_add"], 5: ["gsm8k", "mmlu"], 25: ["arc_challenge"]}
    assert fewshot_groups(["ud_add", "gsm8k"], 3) == {3: ["ud_add", "gsm8k"]}


def test_primary_score_per_task():
    import pandas as pd

    from unifieddelta.evaluate import primary

    scores = pd.DataFrame(
        [
            dict(task="gsm8k", metric="exact_match", filter="flexible-extract", value=0.4, stderr=0.1),
            dict(task="gsm8k", metric="exact_match", filter="strict-match", value=0.3, stderr=0.1),
            dict(task="ud_add", metric="exact_match", filter="number", value=0.9, stderr=0.1),
            dict(task="arc_challenge", metric="acc", filter="none", value=0.5, stderr=0.1),
            dict(task="arc_challenge", metric="acc_norm", filter="none", value=0.6, stderr=0.1),
        ]
    )
    got = primary(scores).set_index("task")["value"].to_dict()
    assert got == {"gsm8k": 0.3, "ud_add": 0.9, "arc_challenge": 0.6}


def test_per_question_scores_match_the_summary_and_lm_evals_own_path(monkeypatch):
    """Each task's per-question scores average to its headline score, and the faster path (each template compiled
    once, no environment report) gives the very scores lm-eval's own path gives, question for question."""
    import contextlib

    from unifieddelta import evaluate
    from unifieddelta.evaluate import evaluate_lm, primary

    model, tok = _tiny_lm()
    fast, questions = evaluate_lm(model, tok, limit=12, per_question=True)
    heads = primary(fast).set_index("task")["value"]
    assert set(questions) == set(task_names())
    for task, values in questions.items():
        assert len(values) == 12 and sum(values) / 12 == pytest.approx(heads[task])
    monkeypatch.setattr(evaluate, "_faster_lm_eval", contextlib.nullcontext)
    slow, slow_questions = evaluate_lm(model, tok, limit=12, per_question=True)
    assert slow_questions == questions
    assert slow.equals(fast)
