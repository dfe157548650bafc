"""The book itself: every notebook of the smoke profile executed through papermill (the pipeline), parameter and
setup cells hidden, the whole book built by ``jupyter-book build -W``, and the pages checked in a real browser.

``make check-book`` runs the browser test on the book ``make book`` built (``_build/html``)."""

import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from browser import chromium, inspect
from helpers import needs

from unifieddelta import pipeline

REPO = Path(__file__).resolve().parents[1]
CHAPTERS = [
    "delta",
    "identity",
    "dare",
    "kfamily",
    "randomness",
    "dare_works",
    "bitdelta",
    "structure",
    "expo",
    "minilm",
    "classification",
    "predicts",
    "reproduction",
    "gemma",
    "own_models",
    "setup",
    "data",
]
BROWSER = needs(
    chromium() is not None,
    "no Chromium on this machine (apt-get install chromium)",
    strict="UNIFIEDDELTA_REQUIRE_BROWSER",
)


@pytest.fixture(scope="module")
def smoke_book(tmp_path_factory):
    """A copy of the book's sources, every notebook executed with the smoke profile, and the HTML built."""
    root = tmp_path_factory.mktemp("book")
    for name in ("_config.yml", "_toc.yml", "references.bib"):
        shutil.copy(REPO / name, root / name)
    for folder in ("notebooks", "book", "_static"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("generated", ".ipynb_checkpoints"))
    runs = pipeline.notebook_runs(pipeline.load_profile("smoke"), root)
    assert [r.name for r in runs] == CHAPTERS
    for run in runs:
        assert pipeline.execute(run, cwd=root) is True  # a raising cell fails this test (NotebookError)
    index = pipeline.build_html(root)
    return root, index


def _source(name: str):
    return nbformat.read(pipeline.as_ipynb(REPO / "notebooks" / f"{name}.md"), as_version=4)


def test_every_notebook_declares_the_conventions():
    """Every chapter is a MyST Markdown notebook with the common parameters, no outputs, one hidden parameters cell,
    a hidden setup cell of at most six lines that binds the chapter's plan, and every parameter its plan needs."""
    import inspect

    import papermill

    from unifieddelta import chapters

    common = {"pair", "pre", "post", "tasks", "limit", "seeds", "device", "dtype", "smoke"}
    assert not list((REPO / "notebooks").glob("*.ipynb")), "notebook sources are kept as MyST Markdown (.md)"
    for name in CHAPTERS:
        declared = set(papermill.inspect_notebook(str(pipeline.as_ipynb(REPO / "notebooks" / f"{name}.md"))))
        assert common <= declared, (name, common - declared)
        nb = _source(name)
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}: committed outputs"
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and "remove-cell" in params[0].metadata["tags"], name
        code = [c for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])]
        install, setup = code[0], code[1]  # the install cell (for Colab and Binder), then the page's setup
        assert "%pip install" in install.source and "remove-cell" in install.metadata["tags"], name
        assert {"hide-cell", "hide-input"} & set(setup.metadata.get("tags", [])), f"{name}: setup cell not folded"
        lines = [line for line in setup.source.splitlines() if line.strip()]
        assert len(lines) <= 6, f"{name}: setup cell of {len(lines)} lines"
        if name in chapters.PLANS:
            assert f'chapters.bind("{name}", globals())' in setup.source, name
            needed = set(inspect.signature(chapters.PLANS[name]).parameters) - {"s"}
            assert needed <= declared, (name, needed - declared)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "\ndef " not in "\n" + code, f"{name}: a function defined in the notebook (it belongs in the package)"
        assert "._" not in code.replace("__", ""), f"{name}: a private name of the package reached from the notebook"


def test_binding_a_chapter_names_what_is_missing():
    from unifieddelta import chapters
    from unifieddelta.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="ps, methods"):
        chapters.bind("dare", {"pair": "tiny-lm", "seeds": [0]})


def test_smoke_notebooks_execute_and_hide_their_parameters(smoke_book):
    from unifieddelta import chapters

    root, _ = smoke_book
    for name in CHAPTERS:
        nb = nbformat.read(root / "book" / "generated" / f"{name}.ipynb", as_version=4)
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and "remove-cell" in injected[0].metadata["tags"] and "smoke = True" in injected[0].source
        errors = [
            o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
        ]
        assert not errors
        html = (root / "_build" / "html" / "book" / "generated" / f"{name}.html").read_text()
        assert "papermill injects" not in html and "smoke = True" not in html  # neither parameters cell shows
        if name in chapters.PLANS:  # the setup cell is there, folded: one click away
            assert "chapters.bind(" in re.sub(r"<[^>]+>", "", html) and 'class="cell tag_hide-cell' in html
        assert "Traceback" not in html and "About this page" in html  # the provenance box


def test_every_glued_number_is_defined(smoke_book):
    """A {glue:text} role whose name no cell glued is a build warning (-W fails); check the names directly too."""
    root, _ = smoke_book
    for name in CHAPTERS:
        nb = nbformat.read(root / "book" / "generated" / f"{name}.ipynb", as_version=4)
        glued = {
            o["metadata"]["scrapbook"]["name"]
            for c in nb.cells
            if c.cell_type == "code"
            for o in c.get("outputs", [])
            if "scrapbook" in o.get("metadata", {})
        }
        used = {
            m for c in nb.cells if c.cell_type == "markdown" for m in re.findall(r"\{glue:text\}`([^`:]+)", c.source)
        }
        assert used <= glued, (name, used - glued)


@BROWSER
def test_smoke_book_in_a_browser(smoke_book):
    root, _ = smoke_book
    _check_pages(root / "_build" / "html")


def _check_pages(html: Path) -> None:
    """The index and two chapters as a browser shows them: math rendered, images loaded, no traceback; on the
    chapters, the provenance box names a commit, the folded code opens, every CSV link resolves (a figure's header
    made of documented columns), and the launch links point at the source notebook."""
    from unifieddelta.records import COLUMN_DOCS

    pages = ["index.html", "book/generated/identity.html", "book/generated/dare.html"]
    seen = inspect(html, pages)
    for page, result in seen.items():
        assert "error" not in result, (page, result)
        assert result["math"] > 0, f"{page}: no rendered math (mjx-container)"
        assert not result["broken"], f"{page}: images that did not load: {result['broken']}"
        assert not result["traceback"], f"{page}: a traceback or error text on the page"
    for page in pages[1:]:
        result, name = seen[page], Path(page).stem
        assert result["images"] > 0, f"{page}: no figures"
        assert result["provenance"], f"{page}: no provenance box with a commit"
        assert result["folded"] > 0 and result["opens"], f"{page}: folded code missing or does not open"
        assert result["csv"] and all(link["status"] == 200 for link in result["csv"]), (page, result["csv"])
        for link in result["csv"]:
            header = [c for c in link["header"].split(",") if c]
            assert header, link
            if "/fig-" in link["href"]:  # a figure's rows come from the store's tidy tables: documented columns
                assert set(header) <= set(COLUMN_DOCS) | {"selection", "kept", "column", "variant", "what", "gap"}, link
        assert any(f"notebooks%2F{name}.md" in h for h in result["launch"]), result["launch"]
        assert any(h.endswith(f"/notebooks/{name}.ipynb") for h in result["launch"]), result["launch"]


@BROWSER
def test_the_browser_check_sees_broken_pages(tmp_path):
    (tmp_path / "bad.html").write_text(
        "<html><body><p>Traceback (most recent call last):</p><img src='missing.png'></body></html>"
    )
    result = inspect(tmp_path, ["bad.html"])["bad.html"]
    assert result["broken"] == ["missing.png"] and result["traceback"] and result["math"] == 0


BUILT = Path(os.environ.get("UNIFIEDDELTA_BOOK_HTML", REPO / "_build" / "html"))


@BROWSER
@needs(
    (BUILT / "index.html").is_file(), f"no built book at {BUILT} (run make book)", strict="UNIFIEDDELTA_REQUIRE_BROWSER"
)
def test_built_book_in_a_browser():
    """``make check-book``: the book ``make book`` built."""
    _check_pages(BUILT)


def test_every_chapter_runs_on_a_pair_of_another_architecture(tmp_path):
    """Every chapter pointed at two local GPT-2 checkpoints (another architecture than the zoo's Llama), only
    ``pre``, ``post`` and ``smoke`` set, as a reader re-executes the book on their own pair: no page raises. The DARE
    chapter scored the pair on the project's tasks with the pair's own tokenizer."""
    from helpers import gpt2_pair

    from unifieddelta import chapters, experiments
    from unifieddelta.tasks import task_names

    root = tmp_path / "book"
    root.mkdir()
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    pre, post = gpt2_pair(tmp_path)
    profile = tmp_path / "mine.yaml"
    profile.write_text(f'extends: smoke\ndefaults: {{smoke: true, pre: "{pre}", post: "{post}"}}\n')
    runs = pipeline.notebook_runs(pipeline.load_profile(profile), root)
    assert [r.name for r in runs] == CHAPTERS
    for run in runs:
        assert pipeline.execute(run, cwd=root) is True  # a raising cell fails here, naming the notebook and the cell
    dare = chapters.bind("dare", next(r for r in runs if r.name == "dare").resolved)
    assert dare.stored() == (len(dare.trials), len(dare.trials))  # the notebook measured them all
    table = experiments.table(dare.trials)
    assert set(experiments.scores(table).task) == set(task_names())
    assert {t.pair.kind for t in dare.trials} == {"lm"} and "pre -> post" in set(table.pair)


def test_the_paper_profiles_path_on_local_checkpoints(tmp_path):
    """The paper profile's EXPO, reproduction and prediction pages, on two GPT-2 checkpoints standing in for the
    hub's (an SFT -> DPO pair with preference data, a pre -> post pair with prompt/answer loss data and a second loss
    data set): a profile that extends ``paper``, executed through the pipeline with smoke grids on the CPU."""
    import json

    from helpers import gpt2_pair

    root = tmp_path / "book"
    root.mkdir()
    for name in ("_config.yml", "_toc.yml", "references.bib"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    pre, post = gpt2_pair(tmp_path)
    qa, other, prefs = tmp_path / "qa.jsonl", tmp_path / "other.jsonl", tmp_path / "prefs.jsonl"
    qa.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(4)))
    other.write_text(
        "".join(json.dumps({"instruction": f"Repeat {i}.", "input": "", "output": str(i)}) + "\n" for i in range(4))
    )
    prefs.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i)}) + "\n"
            for i in range(4)
        )
    )
    profile = tmp_path / "mine.yaml"
    profile.write_text(f"""extends: paper
defaults: {{device: cpu, dtype: float32, smoke: true, pre: "{pre}", post: "{post}", loss_data: "{qa}",
           tasks: [ud_add], fewshot: {{}}, limit: 2}}
notebooks:
  - name: expo
    parameters: {{dpo_pre: "{pre}", dpo_post: "{post}", dpo_loss_data: "{prefs}", dpo_beta: 0.1, dpo_examples: 4}}
  - name: reproduction
    reads: all
  - name: predicts
    reads: all
    parameters: {{loss_tasks: ["{other}"]}}
""")
    runs = pipeline.notebook_runs(pipeline.load_profile(profile), root)
    for run in runs:
        assert pipeline.execute(run, cwd=root) is True
    from unifieddelta import chapters, experiments

    expo = chapters.plan("expo", **runs[0].resolved)
    assert [p.kind for p in expo.pairs] == ["dpo", "lm"] and expo.stored() == (len(expo.trials), len(expo.trials))
    predicts = chapters.plan("predicts", **runs[2].resolved)
    assert predicts.stored() == (len(predicts.trials), len(predicts.trials))
    assert any(p.loss_data == str(other) for p in predicts.pairs)
    table = experiments.table(predicts.trials)
    assert set(experiments.scores(table[table.pair.str.contains("dpo") | (table.method == "extrapolate")]).task) >= {
        "ud_add",
        "preference",
    }
