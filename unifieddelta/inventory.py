"""What the book is made of, for its setup page: the zoo's pairs, the tasks, the seeds, and the compute of a build.

Each function returns a table the setup page shows as it is; ``chapter_params`` is what the pipeline gives a page
that reads the other chapters (notebook name -> its resolved parameters). Used by: setup.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import chapters, provenance
from .pipeline import GENERATED


def model_cards(chapter_params: dict, *, smoke: bool = False):
    """One row per zoo pair the chapters use (``zoo.model_card``): built on first use, as the chapters build them."""
    from . import zoo

    names = []
    for name, params in chapter_params.items():
        for pair in chapters.bind(name, params).pairs:
            if pair.zoo and pair.zoo not in names:
                names.append(pair.zoo)
    return pd.DataFrame([zoo.model_card(n, smoke=smoke) for n in names])


def task_table(examples: int = 2):
    """One row per held-out example of each of the project's tasks (``examples`` each), with the task's kind and
    its number of test questions."""
    from .tasks import generate

    rows = []
    for task, spec in generate.TASKS.items():
        docs = generate.test_docs(task)
        for doc in docs[:examples]:
            choices = f" (choices: {', '.join(map(str, doc['choices']))})" if "choices" in doc else ""
            rows.append({"task": task, "kind": spec.output_type.replace("_", " "), "test questions": len(docs),
                         "question": doc["question"] + choices, "answer": doc["answer"]})  # fmt: skip
    return pd.DataFrame(rows)


def seed_table(chapter_params: dict):
    """Per chapter: the seeds (masks) of its random edits, and of its vision pairs or noise draws where it has
    them."""
    rows = []
    for name, params in chapter_params.items():
        if "seeds" not in params:
            continue
        extra = {k: params[k] for k in ("vision_seeds", "noise_seeds") if k in params}
        rows.append({"chapter": name, "seeds": ", ".join(map(str, params["seeds"])),
                     "other": "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in extra.items())})  # fmt: skip
    return pd.DataFrame(rows)


def compute_table(chapter_params: dict, folder: Path = GENERATED):
    """Per executed page of ``folder`` (the book's executed notebooks): its wall time and trials (from the store,
    computed), with the hardware and commit of its record (``provenance.read``)."""
    rows = []
    for name in chapter_params:
        rec = provenance.read(Path(folder) / f"{name}.ipynb")
        if rec:
            commit = rec["commit"] + (" (dirty)" if rec["dirty"] else "")
            rows.append({"page": name, "seconds": rec["seconds"], "trials": rec["trials"],
                         "from the store": rec["from_store"], "computed": rec["computed"], "executed": rec["date"],
                         "hardware": rec["hardware"], "commit": commit})  # fmt: skip
    columns = ["page", "seconds", "trials", "from the store", "computed", "executed", "hardware", "commit"]
    return pd.DataFrame(rows, columns=columns)
