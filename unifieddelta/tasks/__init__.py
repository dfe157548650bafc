"""The project's lm-eval tasks: YAMLs shipped beside this file, data generated deterministically into the cache.

lm-eval resolves ``data_files`` against the working directory, so the shipped YAMLs carry a placeholder file
name; ``materialize`` writes each task's test documents and a copy of its YAML with the absolute path filled in
into one cache folder (keyed by the data version, the split and the YAML text), and ``task_manager`` points a
``TaskManager`` at that folder only (``include_defaults=False`` skips indexing lm-eval's thousands of tasks).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import yaml

from ..cache import atomic_dir, cache_dir, stable_hash
from ..errors import InvalidParameterError
from . import generate

TASK_DIR = Path(__file__).parent


def task_names() -> list[str]:
    """The names of the shipped tasks, sorted."""
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def check_tasks(tasks: str | list[str] | None) -> list[str]:
    """Validate task names (None means all the project's tasks): the project's own, or lm-eval's built-in ones
    (``gsm8k``, ``arc_challenge``, ...); raise ``InvalidParameterError`` naming an unknown one."""
    known = task_names()
    if tasks is None:
        return known
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise InvalidParameterError("no task given")
    others = [t for t in tasks if t not in known]
    if others:
        builtin = builtin_tasks()
        for t in others:
            if t not in builtin:
                raise InvalidParameterError(
                    f"unknown task {t!r}; the project's tasks are: {', '.join(known)}; "
                    f"lm-eval's {len(builtin)} built-in tasks are accepted too"
                )
    return tasks


@functools.lru_cache(maxsize=1)
def builtin_tasks() -> frozenset[str]:
    """The names of lm-eval's built-in tasks and groups (defined in the installed package even offline; their
    data is fetched from the hub when they run). Indexing them takes a few seconds, so only when asked."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def is_project_task(name: str) -> bool:
    return name in task_names()


def materialize(*, n_test: int = generate.N_TEST, seed: int = 0) -> Path:
    """Write every task's test documents and its YAML (absolute ``data_files``) into the cache; return the folder.

    Written once per key, atomically; later calls return the existing folder.
    """
    texts = {name: (TASK_DIR / f"{name}.yaml").read_text() for name in task_names()}
    key = stable_hash("tasks", generate.DATA_VERSION, n_test, seed, texts)
    target = cache_dir("tasks") / key
    if (target / "complete").exists():
        return target
    with atomic_dir(target, overwrite=True) as tmp:
        for name, text in texts.items():
            config = yaml.safe_load(text)
            docs = generate.test_docs(name, n_test=n_test, seed=seed)
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
            # The path is the final one, not tmp's: the folder is renamed into place below.
            config["dataset_kwargs"]["data_files"] = str(target / f"{name}.jsonl")
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "complete").write_text("")
    return target


def task_manager(names: list[str] | None = None, *, n_test: int = generate.N_TEST, seed: int = 0):
    """An lm-eval ``TaskManager`` that knows the project's tasks, and lm-eval's built-in ones only if ``names``
    has one (``include_defaults=False`` otherwise skips indexing thousands of YAMLs)."""
    from lm_eval.tasks import TaskManager

    builtin = any(not is_project_task(n) for n in names or [])
    return TaskManager(include_path=str(materialize(n_test=n_test, seed=seed)), include_defaults=builtin)
