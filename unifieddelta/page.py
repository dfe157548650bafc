"""Page plumbing for the book's notebooks: the setup every page runs, glued numbers, tables the PDF can print.

A notebook calls :func:`setup` once (quiet progress bars, the PDF's form of tables) and :func:`glue` for every
number its text shows, so a page built with another profile or model never contradicts itself.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence


def setup() -> None:
    """What every page needs before its first cell computes: no download or progress bars from transformers in
    the rendered page, and a text form of every pandas Styler for the PDF (:func:`tables_for_the_pdf`)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice, not the page's business
    tables_for_the_pdf()


def glue(name: str, value) -> None:
    """``myst_nb.glue`` for a page's text (not displayed where computed): numpy scalars become Python numbers,
    which the text's ``{glue:text}`` roles can format; None becomes NaN."""
    from myst_nb import glue as myst_glue

    if value is None:
        value = math.nan
    if hasattr(value, "sentence"):  # a verdict: the page prints its sentence
        value = value.sentence
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    myst_glue(name, value, display=False)


def glue_slots(key: str, names: Sequence[str], value_of: Callable, slots: int, missing=math.nan) -> None:
    """Glue ``key_0`` … ``key_{n-1}`` with ``value_of(name)`` for each of ``names`` (at least ``slots`` of them:
    a text that names four pairs shows ``missing`` where a profile has fewer)."""
    for i in range(max(slots, len(names))):
        glue(f"{key}_{i}", value_of(names[i]) if i < len(names) else missing)


def styler_text(styler) -> str:
    """A pandas Styler as aligned plain text with its formatting applied (and its caption above): the form the
    book's PDF shows, where the HTML table cannot go."""
    rows = [line.split("\x1f") for line in styler.to_string(delimiter="\x1f").splitlines()]
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(max(map(len, rows)))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    caption = styler.caption if isinstance(styler.caption, str) else ""
    return "\n".join(([caption, ""] if caption else []) + lines)


def tables_for_the_pdf() -> None:
    """In a notebook kernel: give every pandas Styler a text/markdown form beside its HTML (a code block of
    :func:`styler_text`), which the LaTeX builder of ``make pdf`` prefers to the HTML it cannot render (it would
    print the Styler's repr); the HTML pages keep the HTML table, which myst-nb ranks first."""
    try:
        from IPython import get_ipython
        from pandas.io.formats.style import Styler
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.display_formatter.formatters["text/markdown"].for_type(
            Styler, lambda st: "```text\n" + styler_text(st) + "\n```"
        )


def glued_values(notebook) -> dict:
    """Every value an executed notebook glued, by name (its ``text/plain`` form, as the page's text shows it)."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    out = {}
    for cell in nb.cells:
        for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
            record = o.get("metadata", {}).get("scrapbook", {})
            if "name" in record:
                out[record["name"]] = o.get("data", {}).get(record.get("mime_prefix", "") + "text/plain")
    return out


def glue_diff(old: str, new: str) -> list[str]:
    """The glued values that differ between two folders of executed notebooks (``book/generated`` of two builds),
    one line each: notebook, name, old value, new value; names only one side has are listed too."""
    from pathlib import Path

    lines = []
    for path in sorted(Path(old).glob("*.ipynb")):
        other = Path(new) / path.name
        if not other.is_file():
            lines.append(f"{path.stem}: missing in {new}")
            continue
        a, b = glued_values(path), glued_values(other)
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                lines.append(f"{path.stem}.{name}: {a.get(name)!r} -> {b.get(name)!r}")
    return lines
