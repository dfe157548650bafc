"""The book pipeline: execute a profile's notebooks with papermill (cached), then build the Jupyter Book.

A profile (YAML) lists notebooks and the parameters papermill injects into them. An executed notebook is
cached under ``cache_dir("notebooks")`` by a hash of (notebook source, parameters, package version and
source), so an unchanged notebook is never executed twice. The HTML is built in a staging folder and only
replaces ``_build/html`` when the whole build succeeded.
"""

from __future__ import annotations

import ast
import functools
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import __version__, estimates, provenance
from .cache import atomic_dir, atomic_write_bytes, cache_dir, stable_hash
from .errors import NotebookError, ProfileError, UnifiedDeltaError

PROFILE_DIR = Path(__file__).parent / "profiles"
PACKAGE_DIR = Path(__file__).parent
GENERATED = Path("book") / "generated"  # where _toc.yml expects the executed notebooks


@dataclass(frozen=True)
class NotebookRun:
    name: str
    source: Path
    output: Path
    parameters: dict  # what papermill injects
    resolved: dict = field(default_factory=dict)  # every parameter as the notebook will see it
    profile: str = ""  # the profile that asked for it (its provenance record names it)


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(profile: str | os.PathLike, _seen: tuple = ()) -> dict:
    """A shipped profile by name (``tiny``, ``paper``) or a YAML file by path, checked for shape. A profile with
    ``extends: OTHER`` (a name or a path) takes OTHER's notebooks unless it lists its own, and OTHER's defaults
    updated with its own (``paper-mistral`` is ``paper`` on another pair)."""
    path = Path(profile)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILE_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise ProfileError(f"unknown profile {str(profile)!r} (shipped profiles: {', '.join(shipped_profiles())})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ProfileError(f"profile {path} is not valid YAML: {e}") from None
    if isinstance(data, dict) and data.get("extends"):
        if path.resolve() in _seen:
            raise ProfileError(f"profile {path}: 'extends' goes round in a circle")
        parent = data["extends"]
        parent = parent if Path(str(parent)).suffix not in (".yaml", ".yml") else path.parent / parent
        base = load_profile(parent, (*_seen, path.resolve()))
        defaults = {**base["defaults"], **(data.get("defaults") or {})}
        data = {**base, "description": "", **data, "name": data.get("name", path.stem), "defaults": defaults}
    notebooks = data.get("notebooks") if isinstance(data, dict) else None
    if not isinstance(notebooks, list) or not all(isinstance(n, dict) and "name" in n for n in notebooks):
        raise ProfileError(f"profile {path} must have a 'notebooks' list of entries with a 'name'")
    data.setdefault("name", path.stem)
    data.setdefault("defaults", {})
    return data


def find_root(start: str | os.PathLike | None = None) -> Path:
    """The book's root: the nearest folder (from ``start`` upwards) holding ``_config.yml`` and ``_toc.yml``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_config.yml").is_file() and (folder / "_toc.yml").is_file():
            return folder
    raise UnifiedDeltaError(f"no book root (_config.yml and _toc.yml) in {here} or above; pass --root")


def notebook_runs(profile: dict, root: Path) -> list[NotebookRun]:
    """Resolve each notebook of the profile and its parameters: the notebook's own defaults (its parameters cell),
    then the profile's ``defaults`` it declares, then the entry's ``parameters``. An entry with ``reads: [names]``
    (or ``reads: all``) also gets ``chapter_params``: each named notebook's resolved parameters (the classification
    page reads the other chapters' trials), so its cache key changes when theirs do. A parameter a notebook does
    not declare raises a ``ProfileError`` naming it (and the closest declared name)."""
    import papermill

    runs = []
    for entry in profile["notebooks"]:
        name = entry["name"]
        source = notebook_source(root, name, profile["name"])
        declared = papermill.inspect_notebook(str(as_ipynb(source)))
        given = entry.get("parameters") or {}
        _check_declared(profile["name"], name, given, declared)
        params = {k: v for k, v in profile["defaults"].items() if k in declared} | given
        if entry.get("reads"):
            if "chapter_params" not in declared:
                raise ProfileError(
                    f"profile {profile['name']}: notebook {name!r} has 'reads' but no 'chapter_params' parameter"
                )
            read = [r.name for r in runs] if entry["reads"] == "all" else list(entry["reads"])
            missing = sorted(set(read) - {r.name for r in runs})
            if missing:
                raise ProfileError(
                    f"profile {profile['name']}: {name!r} reads {', '.join(missing)}, not listed before it"
                )
            params["chapter_params"] = {r.name: r.resolved for r in runs if r.name in read}
            if "chapter_keys" in declared:  # a page that reads the others' executed copies re-runs when they do
                params["chapter_keys"] = {r.name: cache_key(r) for r in runs if r.name in read}
        defaults = {k: _literal(v["default"], name, k) for k, v in declared.items()}
        output = root / GENERATED / f"{name}.ipynb"
        runs.append(NotebookRun(name, source, output, params, defaults | params, profile["name"]))
    return runs


def _check_declared(profile: str, notebook: str, given: dict, declared: dict) -> None:
    """A profile's parameters for a notebook must be parameters the notebook declares: a misspelled one raises,
    naming it and the closest declared name."""
    import difflib

    unknown = sorted(set(given) - set(declared))
    if unknown:
        hints = [
            f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, declared, 1)) else u for u in unknown
        ]
        raise ProfileError(
            f"profile {profile}: notebook {notebook!r} does not declare parameter(s) {', '.join(hints)}"
            f" (it declares: {', '.join(declared) or 'none'})"
        )


def notebook_source(root: Path, name: str, profile: str = "") -> Path:
    """The source of notebook ``name``: ``notebooks/NAME.md`` (a MyST Markdown notebook, as the book's are kept),
    or ``notebooks/NAME.ipynb``."""
    for suffix in (".md", ".ipynb"):
        if (root / "notebooks" / f"{name}{suffix}").is_file():
            return root / "notebooks" / f"{name}{suffix}"
    where = root / "notebooks" / f"{name}.md"
    raise ProfileError(f"profile {profile}: notebook {name!r} not found at {where} (or .ipynb)")


def with_repository(text: str, repo: str) -> str:
    """A notebook's text with its install cell pointed at ``repo`` (CITATION.cff's, the one place a fork changes)."""
    import re

    return re.sub(
        r'^    %pip install --quiet "unifieddelta @ git\+[^"]*"$',
        provenance.INSTALL_LINE.format(repo),
        text,
        flags=re.M,
    )


def as_ipynb(source: Path) -> Path:
    """A MyST Markdown notebook converted to .ipynb for papermill (once per text: cached by its hash); an .ipynb
    source as it is."""
    if source.suffix == ".ipynb":
        return source
    import jupytext
    import nbformat

    from . import page

    repo = provenance.repository(source.parent.parent)
    text = source.read_text()
    out = cache_dir("sources") / f"{source.stem}-{stable_hash(text, repo, _package_digest())}.ipynb"
    if not out.is_file():
        nb = jupytext.reads(with_repository(text, repo), fmt="md:myst")
        for i, cell in enumerate(nb.cells):  # stable ids: the same text gives the same notebook, byte for byte
            cell["id"] = f"{source.stem}-{i}"
            figure = cell.get("metadata", {}).get("mystnb", {}).get("figure", {})
            if figure.get("name"):  # the figure's caption links the CSV of the rows it draws
                figure["caption"] = f"{figure.get('caption', '').rstrip()} {page.data_link(figure['name'])}."
        atomic_write_bytes(out, nbformat.writes(nb).encode())
    return out


def _literal(text: str, notebook: str, name: str):
    """A parameters cell's default value (a Python literal: the dry run reads it without running the notebook)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ProfileError(
            f"notebook {notebook!r}: parameter {name} = {text} is not a literal; parameters cells "
            "hold literals only (numbers, strings, lists, dicts, None)"
        ) from None


@functools.lru_cache(maxsize=1)
def _package_digest() -> str:
    """A hash of the package's own code, so a changed module re-executes the notebooks that use it."""
    files = sorted(p for p in PACKAGE_DIR.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts)
    return stable_hash(*[(str(p.relative_to(PACKAGE_DIR)), p.read_bytes().hex()) for p in files])


def cache_key(run: NotebookRun) -> str:
    """The executed notebook's identity: its source text, its parameters, the package's version and code."""
    return stable_hash(run.source.read_bytes(), run.parameters, __version__, _package_digest())


def execute(run: NotebookRun, *, force: bool = False, cwd: Path | None = None) -> bool:
    """Execute one notebook unless the cache has it; place the executed copy at ``run.output``.

    Returns True if it was executed, False on a cache hit. A raising cell becomes a ``NotebookError``
    naming the notebook and the cell; nothing is cached then.
    """
    import papermill

    cached = cache_dir("notebooks") / f"{run.name}-{cache_key(run)}.ipynb"
    executed = False
    if force or not cached.is_file():
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.running.ipynb")
        stored, start = _stored(run), time.perf_counter()
        try:
            papermill.execute_notebook(
                str(as_ipynb(run.source)),
                str(tmp),
                parameters=run.parameters,
                cwd=str(cwd or run.source.parent),
                progress_bar=True,
                kernel_name="python3",
            )
            _hide_injected(tmp)
            root = (cwd or run.source.parent).resolve()
            rec = provenance.record(run.name, run.profile, run.parameters, root, time.perf_counter() - start, stored)
            provenance.annotate(tmp, rec)
            os.replace(tmp, cached)  # only a notebook that ran to the end enters the cache
        except papermill.PapermillExecutionError as e:
            raise NotebookError(
                f"notebook {run.name} ({run.source}): cell {e.cell_index} (execution count {e.exec_count}) "
                f"raised {e.ename}: {e.evalue}"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
        executed = True
    place(cached.read_bytes(), run.output)
    return executed


def place(executed: bytes, output: Path) -> None:
    """Put an executed notebook where the book expects it, without the data its figures and tables carry, and that
    data as CSV files beside it (``page.show_figure``): what the page's download links point at. Files already
    equal are left alone, so Sphinx need not re-read an unchanged page."""
    from . import page

    shown, data = page.split_data(executed)
    if not output.is_file() or output.read_bytes() != shown:
        atomic_write_bytes(output, shown)
    for name, content in data.items():
        target = output.parent / page.DATA_FOLDER / name
        if not target.is_file() or target.read_bytes() != content:
            atomic_write_bytes(target, content)


def _stored(run: NotebookRun) -> tuple[int, int]:
    """(trials of the page's plan the store holds now, all its trials): what the page takes from the store."""
    from . import chapters

    return chapters.bind(run.name, run.resolved).stored()


def _hide_injected(path: Path) -> None:
    """Papermill's injected-parameters cell is hidden in the page, like the notebook's own parameters cell."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
    nbformat.write(nb, path)


def build_html(root: Path) -> Path:
    """Run ``jupyter-book build -W`` in a staging folder; on success swap the HTML into ``_build/html``."""
    staging = root / "_build" / ".staging"
    # Sphinx keeps the book's own static files from an earlier build rather than overwrite them: drop the stale ones.
    for own in (root / "_static").glob("**/*") if (root / "_static").is_dir() else []:
        built = staging / "_build" / "html" / "_static" / own.relative_to(root / "_static")
        if own.is_file() and built.is_file() and built.read_bytes() != own.read_bytes():
            built.unlink()
    cmd = [
        sys.executable,
        "-c",
        "from jupyter_book.cli.main import main; main()",
        "build",
        str(root),
        "--path-output",
        str(staging),
        "-W",
        "--keep-going",
    ]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        log = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr).splitlines()
        problems = [ln.strip() for ln in log if re.search(r"WARNING|ERROR|[Ee]rror:", ln)]
        detail = problems[0] if problems else "no warning printed"
        raise UnifiedDeltaError(f"jupyter-book build failed ({len(problems)} problem(s)); first: {detail}")
    with atomic_dir(root / "_build" / "html", overwrite=True) as tmp:
        shutil.copytree(staging / "_build" / "html", tmp, dirs_exist_ok=True)
        _launch_copies(root, tmp / "notebooks")
    return root / "_build" / "html" / "index.html"


def _launch_copies(root: Path, folder: Path) -> None:
    """The source notebooks converted to .ipynb (install cell pointed at the repository, no outputs) beside the
    published HTML, where the Colab links of the pages point (``provenance.launch_links``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in sorted((root / "notebooks").glob("*.md")):
        shutil.copy(as_ipynb(source), folder / f"{source.stem}.ipynb")


def build_book(
    profile: str = "tiny", only: list[str] | None = None, root: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Execute the profile's notebooks (all, or ``only`` these), then build the book; return index.html."""
    prof = load_profile(profile)
    book_root = Path(root).resolve() if root else find_root()
    runs = notebook_runs(prof, book_root)
    names = [r.name for r in runs]
    missing = sorted(set(only or []) - set(names))
    if missing:
        raise ProfileError(
            f"notebook(s) {', '.join(missing)} not in profile {prof['name']} (it lists: {', '.join(names)})"
        )
    for run in runs:
        if only and run.name not in only and not run.output.is_file():
            raise ProfileError(f"notebook {run.name} has not been executed yet; run without --only first")
    previous = {run.output: run.output.read_bytes() if run.output.is_file() else None for run in runs}
    try:
        for run in runs:
            if not only or run.name in only:
                execute(run, force=force, cwd=book_root)
        return build_html(book_root)
    except BaseException:  # a failing notebook or build: the executed notebooks of the good book come back too
        for output, data in previous.items():
            if data is None:
                output.unlink(missing_ok=True)
            elif not output.is_file() or output.read_bytes() != data:
                atomic_write_bytes(output, data)
        raise


def _pair_status(pair) -> str:
    """Whether a pair is ready, would be trained here, or fetched from the hub."""
    if pair.zoo:
        from . import zoo

        return "built" if zoo.describe(pair.zoo, recipe=pair.recipe)["built"] else "to build here (zoo)"
    sides = [s for s in (pair.pre, pair.post) if not Path(s).expanduser().is_dir()]
    return "local folders" if not sides else f"to fetch from the hub: {', '.join(sides)}"


def profile_estimate(profile: str = "paper", root: str | os.PathLike | None = None):
    """The cost of a profile on the paper's hub models, not measured: one row per chapter with term trials (trials,
    term trials, GPU memory in GiB, term GPU-hours), and the profile's totals (parameters, distinct term trials and
    their GPU-hours, the minutes of one GSM8K term). Used by: own_models."""
    import pandas as pd

    from . import chapters
    from .estimates import KNOWN_LOSS_DATA, estimate, term_seconds, trial_term_seconds

    runs = notebook_runs(load_profile(profile), Path(root).resolve() if root else find_root())
    plans = [(run.name, chapters.bind(run.name, run.resolved)) for run in runs]  # each chapter's trials, once
    rows, first = [], None
    for name, chapter in plans:
        cost = estimate(chapter)
        if cost and cost.get("parameters") is not None:
            first = first or cost
            if cost["term_trials"]:
                gib, hours = cost["memory"] / 2**30, (cost["term_seconds"] or 0.0) / 3600
                rows.append([name, len(chapter.trials), cost["term_trials"], gib, hours])
    columns = ["chapter", "trials", "term trials", "GPU memory (GiB)", "term (GPU-hours)"]
    distinct = {t for _, chapter in plans for t in chapter.trials if trial_term_seconds(t) is not None}
    gsm8k, tokens = KNOWN_LOSS_DATA["hf:openai/gsm8k:main:test"]
    totals = {
        "parameters": first["parameters"] if first else None,
        "distinct_terms": len(distinct),
        "hours": sum(trial_term_seconds(t) for t in distinct) / 3600,
        "gsm8k": (gsm8k, tokens),
        "minutes_per_term": term_seconds(first["parameters"], gsm8k, tokens, 5) / 60 if first else math.nan,
    }
    return pd.DataFrame(rows, columns=columns), totals


def dry_run(profile: str = "tiny", root: str | os.PathLike | None = None, store=None) -> str:
    """What ``build_book`` would do, without executing anything: each notebook with its parameters, the pairs it
    would build or fetch, how many of its trials the store holds and how many it would compute, and for the
    paper's hub models an estimate of GPU memory and of the term's time (labelled as an estimate)."""
    from . import chapters, experiments

    prof = load_profile(profile)
    book_root = Path(root).resolve() if root else find_root()
    st = experiments.Store(store)
    lines = [f"profile {prof['name']}: {len(prof['notebooks'])} notebook(s); store {st.folder}"]
    every, pending_pairs = [], {}
    for run in notebook_runs(prof, book_root):
        shown = {k: v for k, v in run.resolved.items() if k != "chapter_params"}
        lines.append(f"\n{run.name}  ({run.source.relative_to(book_root)})")
        lines.append("  parameters: " + ", ".join(f"{k}={v!r}" for k, v in shown.items()))
        if "chapter_params" in run.resolved:
            lines.append(f"  reads the trials of: {', '.join(run.resolved['chapter_params'])}")
        chapter = chapters.bind(run.name, run.resolved)
        for pair in chapter.pairs:
            status = _pair_status(pair)
            lines.append(f"  pair {pair.name}: {status}")
            if status != "built" and status != "local folders":
                pending_pairs[pair.name] = status
        stored, n = chapter.stored(st)
        every += chapter.trials
        lines.append(f"  trials: {n} ({stored} in the store, {n - stored} to compute)")
        cost = estimates.estimate(chapter)
        if cost:
            lines.append(estimates.estimate_line(cost))
    done, total = experiments.stored(every, st)
    lines.append(
        f"\ntotal: {total} distinct trial(s), {done} in the store, {total - done} to compute"
        + (f"; pairs to build or fetch: {', '.join(pending_pairs)}" if pending_pairs else "")
    )
    return "\n".join(lines)
