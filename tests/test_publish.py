"""Publishing the book and its PDF: `make publish` (ghp-import to gh-pages), the GitHub Pages workflow, `make pdf`.

The Make targets run in a temporary copy of the project (the Makefile, an up-to-date .venv stamp, this
interpreter's bin/ as BIN), so nothing here installs, builds a book or pushes anywhere but a temporary bare repo.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WORKFLOW = ROOT / ".github" / "workflows" / "pages.yml"

needs_make = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("git") is None, reason="needs make and git"
)


def readme_section(title: str) -> str:
    text = README.read_text()
    assert f"\n## {title}\n" in text, f"README has no section {title!r}"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def readme_book_command() -> str:
    """The README's set-up command that builds the book (the one whose comment says it builds the HTML)."""
    block = re.search(r"```bash\n(.*?)```", readme_section("Set-up: two commands"), re.S).group(1)
    commands = [ln.split("#", 1)[0].strip() for ln in block.splitlines() if "HTML" in ln.partition("#")[2]]
    assert len(commands) == 1, block
    return commands[0]


def recipe(target: str) -> list[str]:
    """The recipe lines of a Makefile rule, continuation lines joined."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, re.M)
    assert match, f"Makefile has no rule {target}"
    return [ln.strip() for ln in match.group(1).splitlines()]


# --- make publish --------------------------------------------------------------------------------------------


def project(tmp_path: Path) -> Path:
    """A temporary project whose .venv stamp is up to date: Make runs the target's own recipe and nothing else."""
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("Makefile", "_toc.yml"):
        shutil.copy(ROOT / name, proj / name)
    for name in ("pyproject.toml", "constraints.txt"):
        (proj / name).write_text("")
        os.utime(proj / name, (0, 0))
    (proj / ".venv").mkdir()
    (proj / ".venv" / ".installed").write_text("")
    return proj


def make(proj: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.org",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.org",
    )
    return subprocess.run(
        ["make", *args, f"BIN={Path(sys.executable).parent}"],
        cwd=proj,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_publish_recipe_pushes_the_built_html_with_ghp_import():
    lines = recipe("publish")
    assert any("_build/html/index.html" in ln and "make book" in ln for ln in lines)
    (command,) = [ln for ln in lines if "ghp-import " in ln and "install" not in ln]
    flags = command.split()
    assert "-n" in flags and "-p" in flags and flags[-1] == "_build/html"


@needs_make
def test_publish_without_a_built_book_says_to_run_make_book(tmp_path):
    proj = project(tmp_path)
    git("init", "-q", cwd=proj)
    result = make(proj, "publish")
    assert result.returncode != 0
    assert "make book" in result.stderr and "_build/html/index.html" in result.stderr
    assert "gh-pages" not in git("branch", "--list", cwd=proj)


@needs_make
def test_publish_puts_the_html_on_gh_pages_of_origin(tmp_path):
    import ghp_import  # noqa: F401  (the dev extra installs it: this test never skips)

    proj = project(tmp_path)
    remote = tmp_path / "remote.git"
    git("init", "-q", "--bare", str(remote), cwd=tmp_path)
    git("init", "-q", cwd=proj)
    git("remote", "add", "origin", str(remote), cwd=proj)
    html = proj / "_build" / "html"
    (html / "_static").mkdir(parents=True)
    (html / "_static" / "book.css").write_text("body {}\n")
    for version in ("first", "second"):
        (html / "index.html").write_text(f"<html>{version}</html>\n")
        result = make(proj, "publish")
        assert result.returncode == 0, result.stdout + result.stderr
    files = git("ls-tree", "-r", "--name-only", "gh-pages", cwd=remote).split()
    assert sorted(files) == [".nojekyll", "_static/book.css", "index.html"]
    assert git("show", "gh-pages:index.html", cwd=remote) == "<html>second</html>\n"
    assert not git("status", "--porcelain", "--untracked-files=no", cwd=proj)  # the work tree is left alone


# --- make pdf ------------------------------------------------------------------------------------------------


def test_pdf_recipe_uses_the_latex_builder_and_checks_its_inputs_first():
    lines = recipe("pdf")
    build = [i for i, ln in enumerate(lines) if "jupyter-book build" in ln]
    assert len(build) == 1 and "--builder pdflatex" in lines[build[0]]
    checks = [i for i, ln in enumerate(lines) if "book/generated" in ln and "make book" in ln]
    installs = [i for i, ln in enumerate(lines) if "apt-get install" in ln]
    assert checks and installs and checks[0] < installs[0] < build[0]


@needs_make
def test_pdf_without_executed_notebooks_says_to_run_make_book(tmp_path):
    proj = project(tmp_path)
    result = make(proj, "pdf")
    assert result.returncode != 0
    assert "make book" in result.stderr and "book/generated/" in result.stderr
    assert "installing" not in result.stdout + result.stderr  # fails before installing TeX Live
    assert not (proj / "_build").exists()


@needs_make
def test_make_book_neither_publishes_nor_builds_a_pdf(tmp_path):
    result = make(project(tmp_path), "-n", "book")
    assert result.returncode == 0, result.stderr
    assert "unifieddelta book" in result.stdout
    assert "ghp-import" not in result.stdout and "pdflatex" not in result.stdout


# --- the GitHub Pages workflow -------------------------------------------------------------------------------


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps(wf: dict) -> list[tuple[str, dict]]:
    return [(name, step) for name, job in wf["jobs"].items() for step in job.get("steps", [])]


def test_workflow_builds_the_book_with_the_readmes_command_and_uploads_the_html():
    wf = workflow()
    command = readme_book_command()
    runs = [
        (job, i)
        for i, (job, step) in enumerate(steps(wf))
        if command in [ln.strip() for ln in step.get("run", "").splitlines()]
    ]
    uploads = [
        (job, i, step)
        for i, (job, step) in enumerate(steps(wf))
        if step.get("uses", "").startswith("actions/upload-pages-artifact@")
    ]
    assert len(runs) == 1, f"no step runs {command!r}"
    assert len(uploads) == 1 and uploads[0][2]["with"]["path"] == "_build/html"
    assert runs[0][0] == uploads[0][0] and runs[0][1] < uploads[0][1]  # same job, the build first
    assert wf["jobs"][runs[0][0]]["runs-on"].startswith("ubuntu")


def test_workflow_deploys_to_pages_with_the_permissions_it_needs():
    wf = workflow()
    deploys = [job for job, step in steps(wf) if step.get("uses", "").startswith("actions/deploy-pages@")]
    assert len(deploys) == 1
    builder = next(job for job, step in steps(wf) if step.get("uses", "").startswith("actions/upload-pages-artifact@"))
    needs = wf["jobs"][deploys[0]].get("needs", [])
    assert builder in ([needs] if isinstance(needs, str) else needs)
    perms = wf.get("permissions", {}) | wf["jobs"][deploys[0]].get("permissions", {})
    assert perms.get("pages") == "write" and perms.get("id-token") == "write"


def test_workflow_caches_the_projects_cache_folder(tmp_path, monkeypatch):
    from unifieddelta.cache import cache_dir

    wf = workflow()
    caches = [(job, step) for job, step in steps(wf) if step.get("uses", "").startswith("actions/cache@")]
    assert len(caches) == 1
    job, step = caches[0]
    env = wf.get("env", {}) | wf["jobs"][job].get("env", {})
    monkeypatch.setenv("HOME", str(tmp_path))
    if "UNIFIEDDELTA_CACHE" in env:
        monkeypatch.setenv("UNIFIEDDELTA_CACHE", env["UNIFIEDDELTA_CACHE"].replace("~", str(tmp_path), 1))
    else:
        monkeypatch.delenv("UNIFIEDDELTA_CACHE", raising=False)
    paths = [Path(p).expanduser() for p in step["with"]["path"].split()]
    assert cache_dir() in paths


def test_readme_says_how_to_publish_and_make_a_pdf():
    section = readme_section("Publishing and a PDF")
    for name in ("make publish", "make pdf", ".github/workflows/pages.yml", "make book"):
        assert name in section
    assert "not part of `make book`" in section
    text = README.read_text()
    assert text.index("## Publishing and a PDF") < text.index("## Citing")


def test_the_pdf_gets_each_table_as_its_formatted_text():
    """A Styler's PDF form: its caption, then its cells as the page formats them, in aligned columns."""
    import pandas as pd

    from unifieddelta import page

    styler = (
        pd.DataFrame({"a": [1.23456, 22.5], "b": ["x", "yy"]}, index=["r1", "r2"])
        .style.format({"a": "{:+.2f}"})
        .set_caption("A caption")
    )
    lines = page.styler_text(styler).splitlines()
    assert lines[:2] == ["A caption", ""]
    body = lines[2:]
    assert any("+1.23" in ln for ln in body) and any("+22.50" in ln for ln in body)
    assert not any("1.23456" in ln for ln in body)  # the page's format, not the raw number
    starts = {ln.index(v) for ln, v in zip(body[1:], ("+1.23", "+22.50"))}
    assert len(starts) == 1  # one column, one offset
    assert {ln.index(v) for ln, v in zip(body[1:], ("x", "yy"))} == {body[0].index("b")}
