"""The book pipeline: papermill execution with injected parameters, caching, and its errors."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_notebook

import unifieddelta
from unifieddelta import pipeline
from unifieddelta.cli import main
from unifieddelta.errors import NotebookError, ProfileError

REPO = Path(__file__).resolve().parents[1]


def _notebook(path: Path, params: str, body: str) -> None:
    cell = new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[cell, new_code_cell(body)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def book(tmp_path):
    """A minimal book root with a parameterised notebook, a raising one, and a profile for each."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "_config.yml").write_text("title: t\nexecute:\n  execute_notebooks: 'off'\n")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    (tmp_path / "intro.md").write_text("# Intro\n")
    _notebook(tmp_path / "notebooks" / "square.ipynb", "x = 1\nlabel = 'a'",
              "import pathlib\nresult = x * x\n"
              "with open('runs.log', 'a') as f:\n    f.write(f'{label} {result}\\n')\nprint('square', result)")
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
    prof = pipeline.load_profile(book.profile("p", [{"name": "square", "parameters": {"x": 7}}],
                                              defaults={"label": "b", "unused": 3}))
    (run,) = pipeline.plan(prof, book.root)
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

    (changed,) = pipeline.plan(pipeline.load_profile(book.profile("q", [{"name": "square", "parameters": {"x": 8}}])), book.root)
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
    (run,) = pipeline.plan(pipeline.load_profile(book.profile("bad", [{"name": "broken"}])), book.root)
    with pytest.raises(NotebookError, match="notebook broken"):
        pipeline.execute(run, cwd=book.root)
    assert not run.output.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--profile", "nope"], "unknown profile 'nope'"),
        (["--only", "missing"], "missing not in profile"),
    ],
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
        pipeline.plan(pipeline.load_profile(book.profile("p", [{"name": "ghost"}])), book.root)


def test_shipped_profiles_match_their_notebooks():
    """Every parameter a shipped profile sets is declared by the repository's notebook."""
    for name in pipeline.shipped_profiles():
        runs = pipeline.plan(pipeline.load_profile(name), REPO)
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
