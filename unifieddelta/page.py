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


#: The output type that carries the data behind a figure or table in an executed notebook; the pipeline writes it
#: out as ``book/generated/data/NAME.csv`` beside the page, where the page's download link points, and removes it
#: from the copy the book shows.
DATA_MIME = "application/vnd.unifieddelta.data+json"
DATA_FOLDER = "data"


def data_link(name: str, what: str = "figure") -> str:
    """The download link a page shows for the data behind a figure or table: ``data/NAME.csv`` beside the page."""
    return f"{{download}}`The data behind this {what} (CSV) <{DATA_FOLDER}/{name}.csv>`"


def _attach(frame, name: str, link: bool) -> None:
    """Carry the CSV of ``frame`` in an output of its own (see ``DATA_MIME``), with its link when ``link``."""
    attach(
        f"{name}.csv", frame.to_csv(index=not _plain_index(frame)).encode(), data_link(name, "table") if link else ""
    )


def attach(filename: str, content: bytes, markdown: str = "") -> None:
    """Carry a file in an output of the page (see ``DATA_MIME``): the pipeline writes it as ``data/FILENAME`` beside
    the page. ``markdown``: what the output shows (a link to the file, say), or nothing."""
    import base64

    from IPython.display import display

    bundle = {DATA_MIME: {"file": filename, "base64": base64.b64encode(content).decode()}}
    if markdown:
        bundle["text/markdown"] = markdown
    display(bundle, raw=True)


def _plain_index(frame) -> bool:
    """An index that only numbers the rows (no name): left out of the CSV."""
    return all(name is None for name in frame.index.names)


def show_figure(fig, data, name: str) -> None:
    """Show a figure and carry the CSV of exactly the rows it draws (``data``). ``name`` is the figure's label
    (``fig-dare-scores``): the file is ``data/fig-dare-scores.csv`` beside the page, and the figure's caption links
    it (``pipeline.as_ipynb`` adds the link to every named figure's caption)."""
    import matplotlib.pyplot as plt
    from IPython.display import display

    display(fig)
    plt.close(fig)
    _attach(data, name, link=False)


def show_table(shown, name: str, data=None) -> None:
    """Show a table (a pandas Styler or DataFrame), then a link to the CSV of its rows (``data``, or the table's own
    data): ``data/NAME.csv`` beside the page."""
    from IPython.display import display

    display(shown)
    _attach(data if data is not None else getattr(shown, "data", shown), name, link=True)


def split_data(notebook_bytes: bytes) -> tuple[bytes, dict[str, bytes]]:
    """An executed notebook without the files its outputs carry (``show_figure``, ``show_table``, ``attach``), and
    those files: file name -> content. The book shows the first and writes the second beside it."""
    import base64

    import nbformat

    nb = nbformat.reads(notebook_bytes.decode(), as_version=4)
    out = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for o in cell.get("outputs", []):
            payload = o.get("data", {}).pop(DATA_MIME, None)
            if payload:
                out[payload["file"]] = base64.b64decode(payload["base64"])
        cell["outputs"] = [o for o in cell.get("outputs", []) if "data" not in o or o["data"]]
    return (nbformat.writes(nb).encode() if out else notebook_bytes), out
