"""The book pipeline: papermill execution with injected parameters, caching, and its errors."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

import unifieddelta
from unifieddelta import estimates, pipeline
from unifieddelta.cli import main
from unifieddelta.errors import NotebookError, ProfileError, UnifiedDeltaError

REPO = Path(__file__).resolve().parents[1]


def _notebook(path: Path, params: str, body: str, title: str | None = None) -> None:
    cell = new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=([new_markdown_cell(f"# {title}")] if title else []) + [cell, new_code_cell(body)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def book(tmp_path):
    """A minimal book root with a parameterised notebook, a raising one, and a profile for each."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "_config.yml").write_text("title: t\nexecute:\n  execute_notebooks: 'off'\n")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    (tmp_path / "intro.md").write_text("# Intro\n")
    _notebook(
        tmp_path / "notebooks" / "square.ipynb",
        "x = 1\nlabel = 'a'",
        "import pathlib\nresult = x * x\n"
        "with open('runs.log', 'a') as f:\n    f.write(f'{label} {result}\\n')\nprint('square', result)",
    )
    _notebook(tmp_path / "notebooks" / "broken.ipynb", "x = 1", "y = x + 1\nraise RuntimeError('boom in cell')")

    def profile(name, notebooks, defaults=None):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "defaults": defaults or {}, "notebooks": notebooks}))
        return str(path)

    return SimpleNamespace(root=tmp_path, profile=profile)


def test_package_imports():
    assert unifieddelta.__version__
    assert set(pipeline.shipped_profiles()) >= {"tiny", "paper"}


def test_executes_with_parameters_then_hits_cache(book):
    prof = pipeline.load_profile(
        book.profile("p", [{"name": "square", "parameters": {"x": 7}}], defaults={"label": "b", "unused": 3})
    )
    (run,) = pipeline.notebook_runs(prof, book.root)
    assert run.parameters == {"x": 7, "label": "b"}  # defaults only where the notebook declares them

    assert pipeline.execute(run, cwd=book.root) is True
    out = nbformat.read(run.output, as_version=4)
    text = "".join(o.get("text", "") for c in out.cells if c.cell_type == "code" for o in c.outputs)
    assert "square 49" in text
    assert (book.root / "runs.log").read_text() == "b 49\n"

    assert pipeline.execute(run, cwd=book.root) is False  # cache hit: not executed again
    assert (book.root / "runs.log").read_text() == "b 49\n"
    run.output.unlink()
    assert pipeline.execute(run, cwd=book.root) is False and run.output.is_file()  # restored from the cache

    (changed,) = pipeline.notebook_runs(
        pipeline.load_profile(book.profile("q", [{"name": "square", "parameters": {"x": 8}}])), book.root
    )
    assert pipeline.execute(changed, cwd=book.root) is True  # a new parameter value is a new cache entry
    assert (book.root / "runs.log").read_text().splitlines()[-1] == "a 64"


def test_raising_cell_fails_the_book_and_names_the_notebook(book, capsys):
    html = book.root / "_build" / "html"
    html.mkdir(parents=True)
    (html / "index.html").write_text("the good book")
    code = main(["book", "--profile", book.profile("bad", [{"name": "broken"}]), "--root", str(book.root)])
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert code != 0 and len(errors) == 1  # one line, after papermill's progress bar
    assert all(word in errors[0] for word in ("broken", "RuntimeError", "boom in cell", "cell 1"))
    assert (html / "index.html").read_text() == "the good book"  # the good book is untouched
    assert not list((Path(pipeline.cache_dir("notebooks"))).glob("broken-*"))  # nothing cached


def test_raising_cell_raises_notebook_error(book):
    (run,) = pipeline.notebook_runs(pipeline.load_profile(book.profile("bad", [{"name": "broken"}])), book.root)
    with pytest.raises(NotebookError, match="notebook broken"):
        pipeline.execute(run, cwd=book.root)
    assert not run.output.exists()


@pytest.mark.parametrize(
    "args, message",
    [(["--profile", "nope"], "unknown profile 'nope'"), (["--only", "missing"], "missing not in profile")],
)
def test_bad_book_arguments(book, capsys, args, message):
    prof = book.profile("p", [{"name": "square"}])
    argv = ["book", "--root", str(book.root), *(args if args[0] == "--profile" else ["--profile", prof, *args])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (book.root / "_build").exists()


def test_undeclared_parameter_is_an_error(book, capsys):
    prof = book.profile("p", [{"name": "square", "parameters": {"z": 1}}])
    assert main(["book", "--profile", prof, "--root", str(book.root)]) == 2
    err = capsys.readouterr().err
    assert "does not declare parameter(s) z" in err and "declares: x, label" in err


def test_notebook_missing_from_disk_is_an_error(book):
    with pytest.raises(ProfileError, match="'ghost' not found"):
        pipeline.notebook_runs(pipeline.load_profile(book.profile("p", [{"name": "ghost"}])), book.root)


def test_shipped_profiles_match_their_notebooks():
    """Every parameter a shipped profile sets is declared by the repository's notebook."""
    for name in pipeline.shipped_profiles():
        runs = pipeline.notebook_runs(pipeline.load_profile(name), REPO)
        assert runs, name


def test_paper_profile_names_installed_lm_eval_tasks():
    from unifieddelta.tasks import builtin_tasks

    defaults = pipeline.load_profile("paper")["defaults"]
    tasks, fewshot = defaults["tasks"], defaults["fewshot"]
    assert {"gsm8k", "arc_challenge", "hellaswag", "mmlu", "winogrande", "ifeval", "humaneval"} <= set(tasks)
    assert set(fewshot) == set(tasks) and fewshot["gsm8k"] == 5 and fewshot["arc_challenge"] == 25
    assert set(tasks) <= builtin_tasks(), sorted(set(tasks) - builtin_tasks())


def test_cli_help_lists_book():
    out = subprocess.run([sys.executable, "-m", "unifieddelta.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "book" in out.stdout


# ---------------------------------------------------------------------------------------------- whole builds


@pytest.fixture
def two_pages(tmp_path):
    """A two-notebook book that really builds: each notebook appends its name to runs.log when it executes."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "_config.yml").write_text(
        "title: t\nonly_build_toc_files: true\nexclude_patterns: [notebooks]\nexecute:\n  execute_notebooks: 'off'\n"
    )
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nchapters:\n  - file: book/generated/one\n  - file: book/generated/two\n"
    )
    (tmp_path / "intro.md").write_text("# Intro\n\nA page.\n")
    for name in ("one", "two"):
        _notebook(
            tmp_path / "notebooks" / f"{name}.ipynb",
            "x = 1",
            f"with open('runs.log', 'a') as f:\n    f.write('{name}\\n')\nprint('{name}', x)",
            title=name,
        )
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"name": "p", "notebooks": [{"name": "one"}, {"name": "two"}]}))

    def runs():
        log = tmp_path / "runs.log"
        return log.read_text().split() if log.exists() else []

    return SimpleNamespace(root=tmp_path, profile=str(profile), runs=runs)


def test_builds_execute_only_what_changed(two_pages, monkeypatch):
    book = two_pages
    index = pipeline.build_book(book.profile, root=book.root)
    assert index.is_file() and "two" in (book.root / "_build" / "html" / "book" / "generated" / "two.html").read_text()
    assert book.runs() == ["one", "two"]
    pipeline.build_book(book.profile, root=book.root)
    assert book.runs() == ["one", "two"]  # nothing changed: nothing executed
    _notebook(
        book.root / "notebooks" / "two.ipynb",
        "x = 1",
        "with open('runs.log', 'a') as f:\n    f.write('two\\n')\nprint('two, changed', x)",
        title="two",
    )
    pipeline.build_book(book.profile, root=book.root)
    assert book.runs() == ["one", "two", "two"]  # the changed source alone
    assert "two, changed" in (book.root / "_build" / "html" / "book" / "generated" / "two.html").read_text()
    monkeypatch.setattr(pipeline, "_package_digest", lambda: "another version of the package")
    pipeline.build_book(book.profile, root=book.root)
    assert book.runs() == ["one", "two", "two", "one", "two"]  # a changed package re-executes every notebook
    pipeline.build_book(book.profile, root=book.root, force=True, only=["one"])
    assert book.runs()[-1] == "one" and len(book.runs()) == 6  # --force, --only one


def test_only_before_anything_ran_is_an_error(two_pages):
    with pytest.raises(ProfileError, match="has not been executed yet"):
        pipeline.build_book(two_pages.profile, root=two_pages.root, only=["one"])
    assert not (two_pages.root / "_build").exists() and two_pages.runs() == []


def test_a_failing_build_keeps_the_old_book_and_the_old_executed_notebooks(two_pages):
    book = two_pages
    pipeline.build_book(book.profile, root=book.root)
    html = book.root / "_build" / "html"
    pages = {p: p.read_bytes() for p in html.rglob("*.html")}
    executed = (book.root / "book" / "generated" / "one.ipynb").read_bytes()
    _notebook(book.root / "notebooks" / "one.ipynb", "x = 1", "print('one, new')", title="one")  # re-executes ...
    (book.root / "intro.md").write_text("# Intro\n\nA broken reference: {ref}`no-such-label`.\n")  # ... -W fails
    with pytest.raises(UnifiedDeltaError, match="jupyter-book build failed"):
        pipeline.build_book(book.profile, root=book.root)
    assert {p: p.read_bytes() for p in html.rglob("*.html")} == pages
    assert (book.root / "book" / "generated" / "one.ipynb").read_bytes() == executed


@pytest.mark.parametrize("profile", pipeline.shipped_profiles())
def test_dry_run_works_offline_for_every_shipped_profile(profile, capsys):
    assert main(["book", "--profile", profile, "--dry-run", "--root", str(REPO)]) == 0
    out = capsys.readouterr().out
    for name in ("delta", "identity", "dare", "classification"):
        assert f"\n{name}  (notebooks/{name}.md)" in out
    assert "parameters: " in out and "trials: " in out and "total: " in out
    if profile.startswith("paper"):
        assert f"to fetch from the hub: {pipeline.load_profile(profile)['defaults']['pre']}" in out
        assert "to fetch from the hub: alignment-handbook/zephyr-7b-sft-full" in out  # EXPO's pair
        size = estimates.KNOWN_PARAMETERS[pipeline.load_profile(profile)["defaults"]["post"]]
        assert "estimate (not measured" in out and f"{size / 1e9:.1f}B parameters" in out and "GPU-hours" in out
    else:
        assert "tiny-lm" in out
    assert not (REPO / "book" / "generated" / "never-written").exists()


def test_dry_run_counts_what_the_store_holds(tmp_path, capsys):
    from unifieddelta import chapters, experiments

    runs = {r.name: r for r in pipeline.notebook_runs(pipeline.load_profile("smoke"), REPO)}
    plan = chapters.plan("dare", **runs["dare"].resolved)
    experiments.run(plan.trials[:2], store=tmp_path, progress=False)
    text = pipeline.dry_run("smoke", root=REPO, store=tmp_path)
    dare = text[text.index("\ndare  (") : text.index("\nclassification  (")]
    assert f"trials: {len(plan.trials)} (2 in the store, {len(plan.trials) - 2} to compute)" in dare


def test_the_dry_run_estimates_follow_their_formulas():
    """Against the arithmetic done by hand: 5 passes x 6 FLOPs x 8e9 parameters x 1,000 examples x 250 tokens at
    1.6e14 FLOP/s is 375 s; five bfloat16 values per parameter of an 8e9 model are 80e9 bytes."""
    assert estimates.term_seconds(8e9, 1000, 250, 5, flops=1.6e14) == pytest.approx(375.0)
    assert estimates.gpu_memory_bytes(8e9) == pytest.approx(80e9)
    assert estimates.term_seconds(8e9, 1000, 250, 10) == pytest.approx(2 * estimates.term_seconds(8e9, 1000, 250, 5))
