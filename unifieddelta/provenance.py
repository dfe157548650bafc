"""Where each page's numbers came from: the record the pipeline keeps of every executed page, and its box.

When the pipeline executes a notebook it writes a *record* into the executed notebook's metadata
(``metadata["unifieddelta"]``): the profile and the parameters injected, the commit of the book (and whether the tree
had uncommitted changes), the package version, the date, the hardware, the page's wall time, and how many of its
trials came from the experiment store and how many were computed. It then appends a box, "About this page", that
shows the record and the commands that re-run the page. A page read from the cache keeps the record of the run
that executed it. The setup page reads every page's record (:func:`read`) for the book's compute.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

from . import __version__

KEY = "unifieddelta"


def commit(root: Path) -> tuple[str, bool]:
    """(the short hash of the book's commit, whether the tree has uncommitted changes), or ("unknown", False)
    outside a git repository."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True
        )
        if head.returncode:
            return "unknown", False
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True)
        return head.stdout.strip(), bool(status.stdout.strip())
    except OSError:  # no git on this machine
        return "unknown", False


def hardware() -> str:
    """The machine in words: its GPU's name when torch sees one, else the CPU's model and core count."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (GPU), {os.cpu_count()} CPU cores"
    except Exception:  # torch missing or broken: the CPU is what is left to describe
        pass
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPU cores, no GPU"


def record(name: str, profile: str, parameters: dict, root: Path, seconds: float, stored: tuple[int, int]) -> dict:
    """The record of one executed page (see the module's docstring). ``stored``: (trials the store held before
    the page ran, the page's trials)."""
    sha, dirty = commit(root)
    held, total = stored
    return {
        "page": name,
        "links": launch_links(repository(root), name),
        "profile": profile,
        "parameters": parameters,
        "commit": sha,
        "dirty": dirty,
        "version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": hardware(),
        "seconds": round(seconds, 1),
        "trials": total,
        "from_store": held,
        "computed": total - held,
    }


DEFAULT_REPOSITORY = "https://github.com/unifieddelta/unifieddelta"
INSTALL_LINE = '    %pip install --quiet "unifieddelta @ git+{}"'


def repository(root: Path) -> str:
    """The book's repository URL: CITATION.cff's ``repository-code`` (the one line a fork changes)."""
    import yaml

    try:
        data = yaml.safe_load((Path(root) / "CITATION.cff").read_text()) or {}
    except (OSError, ValueError):
        data = {}
    return str(data.get("repository-code") or DEFAULT_REPOSITORY).rstrip("/")


def launch_links(repo: str, name: str, branch: str = "main") -> dict[str, str]:
    """Where a reader opens page ``name``'s *source* notebook (``notebooks/NAME.md``, not the executed copy): on
    GitHub, in Binder (JupyterLab opens the MyST notebook with jupytext), and in Colab (the source converted to
    .ipynb, which the published book carries at ``notebooks/NAME.ipynb`` on its gh-pages branch)."""
    slug = repo.removeprefix("https://github.com/")
    return {
        "source": f"{repo}/blob/{branch}/notebooks/{name}.md",
        "Binder": f"https://mybinder.org/v2/gh/{slug}/{branch}?labpath=notebooks%2F{name}.md",
        "Colab": f"https://colab.research.google.com/github/{slug}/blob/gh-pages/notebooks/{name}.ipynb",
    }


def launch_line(links: dict[str, str]) -> str:
    """The line at the top of an executed page that opens its source notebook elsewhere."""
    return (
        f"Run this page yourself: [open it in Binder]({links['Binder']}) · [in Colab]({links['Colab']}) (set `pre` "
        "and `post` to your checkpoints; a GPU runtime is used when present) · "
        f"[its source notebook]({links['source']})"
    )


def rerun_commands(name: str, profile: str) -> tuple[str, str]:
    """(the command that re-runs this page of the book, the commands that run its notebook on another pair)."""
    book = f"unifieddelta book --only {name}" + ("" if profile == "tiny" else f" --profile {profile}")
    own = (
        f"jupytext --to ipynb notebooks/{name}.md -o {name}.ipynb && "
        f"papermill {name}.ipynb {name}-mine.ipynb -p pre PRE -p post POST"
    )
    return book, own


def box(rec: dict) -> str:
    """The markdown of the "About this page" box of a page's record: a collapsed admonition, the injected
    parameters in a nested fold (the chapters a summary page reads are named, not repeated)."""
    book, own = rerun_commands(rec["page"], rec["profile"])
    shown = {k: (sorted(v) if k == "chapter_params" else v) for k, v in rec["parameters"].items()}
    params = json.dumps(shown, indent=1, sort_keys=True, default=str)
    dirty = " (with uncommitted changes)" if rec["dirty"] else ""
    lines = [
        ":::{admonition} About this page: where its numbers came from",
        ":class: dropdown",
        "",
        f"- **Built** {rec['date']} from commit `{rec['commit']}`{dirty}, unifieddelta {rec['version']}, "
        f"profile `{rec['profile']}`.",
        f"- **Hardware**: {rec['hardware']}.",
        f"- **Compute**: {rec['seconds']:.0f} s of wall time; {rec['trials']} trials, {rec['from_store']} from the "
        f"experiment store and {rec['computed']} computed.",
        f"- **Re-run this page**: `{book}`.",
        f"- **On your own pair**: `{own}` (any parameter of the parameters cell can be set with `-p NAME VALUE`).",
        "",
        "::::{admonition} The parameters injected by the profile",
        ":class: dropdown",
        "",
        "```json",
        params,
        "```",
        "::::",
        ":::",
    ]
    return "\n".join(lines)


def annotate(path: Path, rec: dict) -> None:
    """Write ``rec`` into an executed notebook's metadata, put the launch line under its first markdown cell (the
    title and introduction) and append its box as the last cell."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    nb.metadata[KEY] = rec
    launch = nbformat.v4.new_markdown_cell(launch_line(rec["links"]))
    launch["id"] = f"{rec['page']}-launch"
    first = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"), -1)
    nb.cells.insert(first + 1, launch)
    cell = nbformat.v4.new_markdown_cell(box(rec))
    cell["id"] = f"{rec['page']}-provenance"
    nb.cells.append(cell)
    nbformat.write(nb, str(path))


def read(notebook: Path) -> dict | None:
    """The record of an executed page, or None (a page executed before records were kept, or no page)."""
    import nbformat

    try:
        return dict(nbformat.read(str(notebook), as_version=4).metadata.get(KEY) or {}) or None
    except (OSError, ValueError):
        return None
