"""Deterministic data for the project's tasks: one universe of items per task, split once into train and test.

Each item knows three surface forms of one fact: a pre-training *statement* ("12 + 7 = 19."), an instruction
*question* with its *answer* (the SFT and evaluation format), and a plausible *wrong* answer (the DPO rejection).
Pre-training sees only statements, post-training only questions, so a pre-trained model knows the facts but not
the format: post-training can then move the weights a little and still change the scores a lot, the regime of
real post-training. Test items are removed from every training form by a canonical key (``test_key``), so no
test question, nor its statement, nor a reordering of its numbers, is ever trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

#: Bump when the generators change: it is part of every cache key that depends on the data. 3: 300 test items.
DATA_VERSION = 3
#: Test items per task: held out of every training form, and what lm-eval scores. 300 rather than 100: a paired
#: comparison of two models on 6 × 300 questions resolves a score change of about ±1.3 points (95%).
N_TEST = 300

NAMES = ["Anna", "Ben", "Cara", "Dan", "Eva", "Finn", "Gina", "Hugo", "Ida", "Jon", "Kim", "Leo"]
OBJECTS = ["apples", "books", "coins", "cards", "pens", "shells", "stamps", "marbles", "cups", "stones"]


@dataclass(frozen=True)
class TaskSpec:
    """A task: its lm-eval output type and the function listing its universe of items."""

    name: str
    output_type: str  # "generate_until" or "multiple_choice"
    universe: object = field(repr=False)  # callable(rng) -> list[dict]


def _add(rng: random.Random) -> list[dict]:
    """Two-digit plus one-digit addition, with and without carry."""
    items = []
    for a in range(10, 100):
        for b in range(0, 10):
            c = a + b
            items.append(
                dict(
                    key=f"add:{a}+{b}",
                    statement=f"{a} + {b} = {c}.",
                    question=f"What is {a} + {b}?",
                    answer=str(c),
                    wrong=str(c + rng.choice([-10, -1, 1, 10])),
                )
            )
    return items


def _max(rng: random.Random) -> list[dict]:
    """The larger of two two-digit numbers (the skill the pilot saw learned first)."""
    items, seen = [], set()
    while len(items) < 3000:
        a, b = rng.sample(range(10, 100), 2)
        key = f"max:{min(a, b)},{max(a, b)}"
        if key in seen:
            continue
        seen.add(key)
        m, other = max(a, b), min(a, b)
        items.append(
            dict(
                key=key,
                statement=f"The larger of {a} and {b} is {m}.",
                question=f"Which number is larger, {a} or {b}?",
                answer=str(m),
                wrong=str(other),
            )
        )
    return items


def _word(rng: random.Random) -> list[dict]:
    """GSM8K-like one-step word problems over one-digit numbers."""
    items = []
    for name in NAMES:
        for obj in OBJECTS:
            for a in range(1, 10):
                for b in range(1, 10):
                    c = a + b
                    items.append(
                        dict(
                            key=f"word:{name}:{obj}:{a}:{b}",
                            statement=f"{name} had {a} {obj} and got {b} more, so {name} had {c} {obj}.",
                            question=(
                                f"{name} has {a} {obj}. {name} gets {b} more. How many {obj} does {name} have now?"
                            ),
                            answer=str(c),
                            wrong=str(rng.choice([a, c - 1, c + 1])),
                        )
                    )
    return items


def _parity(rng: random.Random) -> list[dict]:
    """Even or odd, as a two-way multiple choice."""
    items = []
    for n in range(0, 1000):
        right, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
        items.append(
            dict(
                key=f"parity:{n}",
                statement=f"{n} is an {right} number.",
                question=f"Is {n} even or odd?",
                answer=right,
                wrong=wrong,
                choices=["even", "odd"],
                label=["even", "odd"].index(right),
            )
        )
    return items


def _sequence(rng: random.Random) -> list[dict]:
    """HellaSwag-like: pick the continuation of an arithmetic sequence among four."""
    items = []
    for start in range(1, 51):
        for step in range(1, 10):
            seq = [start + i * step for i in range(5)]
            nxt = seq[4]
            choices = [nxt, nxt - 1, nxt + 1, nxt + step if step > 1 else nxt + 2]
            rng.shuffle(choices)
            shown = ", ".join(map(str, seq[:4]))
            items.append(
                dict(
                    key=f"seq:{start}:{step}",
                    statement=", ".join(map(str, seq)) + ".",
                    question=f"What comes next: {shown}?",
                    answer=str(nxt),
                    wrong=str(next(c for c in choices if c != nxt)),
                    choices=[str(c) for c in choices],
                    label=choices.index(nxt),
                )
            )
    return items


def _smallest(rng: random.Random) -> list[dict]:
    """ARC-like: the smallest of four numbers, as a four-way multiple choice."""
    items, seen = [], set()
    while len(items) < 3000:
        nums = rng.sample(range(10, 100), 4)
        key = "smallest:" + ",".join(map(str, sorted(nums)))
        if key in seen:
            continue
        seen.add(key)
        m = min(nums)
        items.append(
            dict(
                key=key,
                statement=f"The smallest of {nums[0]}, {nums[1]}, {nums[2]} and {nums[3]} is {m}.",
                question=f"Which is the smallest: {nums[0]}, {nums[1]}, {nums[2]} or {nums[3]}?",
                answer=str(m),
                wrong=str(sorted(nums)[1]),
                choices=[str(n) for n in nums],
                label=nums.index(m),
            )
        )
    return items


TASKS: dict[str, TaskSpec] = {
    "ud_add": TaskSpec("ud_add", "generate_until", _add),
    "ud_max": TaskSpec("ud_max", "generate_until", _max),
    "ud_word": TaskSpec("ud_word", "generate_until", _word),
    "ud_parity": TaskSpec("ud_parity", "multiple_choice", _parity),
    "ud_sequence": TaskSpec("ud_sequence", "multiple_choice", _sequence),
    "ud_smallest": TaskSpec("ud_smallest", "multiple_choice", _smallest),
}


def split(task: str, *, n_test: int = N_TEST, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` items of a task: a seeded shuffle of its universe, the first ``n_test`` held out."""
    train, test = _split(task, n_test, seed)
    return list(train), list(test)


@lru_cache(maxsize=64)
def _split(task: str, n_test: int, seed: int) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    rng = random.Random(f"{task}:{seed}")
    items = TASKS[task].universe(rng)
    rng.shuffle(items)
    test, train = items[:n_test], items[n_test:]
    test_keys = {it["key"] for it in test}
    return tuple(it for it in train if it["key"] not in test_keys), tuple(test)


def prompt(question: str) -> str:
    """The instruction format shared by SFT, DPO and the lm-eval YAMLs (``doc_to_text``)."""
    return f"Question: {question}\nAnswer:"


WORDS = [
    "cat",
    "dog",
    "tree",
    "house",
    "river",
    "stone",
    "light",
    "bird",
    "cloud",
    "apple",
    "green",
    "table",
    "music",
    "road",
    "ship",
    "window",
    "garden",
    "paper",
    "horse",
    "winter",
    "summer",
    "bread",
    "chair",
    "lamp",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "old": "new",
    "light": "dark",
    "open": "closed",
    "early": "late",
    "wet": "dry",
    "full": "empty",
    "high": "low",
    "long": "short",
}


def general_qa(rng: random.Random, n: int) -> list[str]:
    """Question-answer pairs about other things than the tasks (first letters, days, opposites, list lookups).

    Real base models have seen questions and answers; mixing these into pre-training gives the tiny base model
    the format without any task's questions, so post-training only has to connect known facts to new questions.
    """
    out = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            w = rng.choice(WORDS)
            q, a = f"Which letter does the word {w} start with?", w[0]
        elif kind == 1:
            i = rng.randrange(7)
            q, a = f"What day comes after {DAYS[i]}?", DAYS[(i + 1) % 7]
        elif kind == 2:
            w, o = rng.choice(list(OPPOSITES.items()))
            q, a = f"What is the opposite of {w}?", o
        else:
            nums = [rng.randrange(0, 100) for _ in range(rng.randrange(3, 6))]
            where = "first" if kind == 3 else "last"
            q, a = (
                f"What is the {where} number in the list {', '.join(map(str, nums))}?",
                str(nums[0 if kind == 3 else -1]),
            )
        out.append(f"{prompt(q)} {a}")
    return out


def pretraining_texts(
    n_docs: int, *, seed: int = 0, statements_per_doc: int = 6, n_test: int = N_TEST, qa_share: float = 0.0
) -> list[str]:
    """Pre-training documents: runs of training statements of all tasks, mixed, never a test item; a share
    ``qa_share`` of the documents are instead runs of ``general_qa`` pairs, one per line."""
    pools = [[it["statement"] for it in split(t, n_test=n_test, seed=seed)[0]] for t in TASKS]
    rng = random.Random(f"pretrain:{seed}")
    docs = []
    for _ in range(n_docs):
        if rng.random() < qa_share:
            docs.append("\n".join(general_qa(rng, 3)))
        else:
            # Task first, then item: each task gets an equal share however large its universe.
            docs.append(" ".join(rng.choice(rng.choice(pools)) for _ in range(statements_per_doc)))
    return docs


def sft_examples(n: int, *, seed: int = 0, n_test: int = N_TEST) -> list[dict]:
    """``n`` instruction examples ``{prompt, completion}`` drawn evenly from the tasks' training items."""
    rng = random.Random(f"sft:{seed}")
    trains = [split(t, n_test=n_test, seed=seed)[0] for t in TASKS]
    out = []
    for i in range(n):
        it = rng.choice(trains[i % len(trains)])
        out.append(dict(prompt=prompt(it["question"]), completion=" " + it["answer"]))
    return out


def preference_pairs(n: int, *, seed: int = 0, n_test: int = N_TEST, split_name: str = "train") -> list[dict]:
    """``n`` DPO pairs ``{prompt, chosen, rejected}``: the right answer against a plausible wrong one.

    ``split_name="test"`` draws them from the test items instead, to measure the preference loss held out.
    """
    rng = random.Random(f"dpo:{split_name}:{seed}")
    index = 0 if split_name == "train" else 1
    pools = [split(t, n_test=n_test, seed=seed)[index] for t in TASKS]
    out = []
    for i in range(n):
        it = rng.choice(pools[i % len(pools)])
        out.append(dict(prompt=prompt(it["question"]), chosen=" " + it["answer"], rejected=" " + it["wrong"]))
    return out


def test_docs(task: str, *, n_test: int = N_TEST, seed: int = 0) -> list[dict]:
    """The evaluation documents of a task, as lm-eval reads them (question, answer, and choices/label for MC)."""
    keep = ("question", "answer", "choices", "label")
    return [{k: it[k] for k in keep if k in it} for it in split(task, n_test=n_test, seed=seed)[1]]
