"""Where a page's numbers came from: the record the pipeline writes into an executed page, its box and launch line,
the repository every link and install cell is built from, and the files a page carries (its figures' CSVs)."""

import base64
import json
import subprocess

import nbformat
import pandas as pd
import pytest

from unifieddelta import page, pipeline, provenance


def _git(folder, *args):
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True)


def test_commit_and_dirty_flag_of_a_repository(tmp_path):
    assert provenance.commit(tmp_path) == ("unknown", False)  # not a repository
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "x")
    sha, dirty = provenance.commit(tmp_path)
    assert len(sha) >= 7 and not dirty
    (tmp_path / "new.txt").write_text("changed")
    assert provenance.commit(tmp_path) == (sha, True)


def test_the_repository_comes_from_citation_cff(tmp_path):
    assert provenance.repository(tmp_path) == provenance.DEFAULT_REPOSITORY
    (tmp_path / "CITATION.cff").write_text('cff-version: 1.2.0\nrepository-code: "https://github.com/me/fork/"\n')
    repo = provenance.repository(tmp_path)
    assert repo == "https://github.com/me/fork"
    links = provenance.launch_links(repo, "dare")
    assert links["source"] == "https://github.com/me/fork/blob/main/notebooks/dare.md"
    assert links["Binder"].endswith("gh/me/fork/main?labpath=notebooks%2Fdare.md")
    assert links["Colab"] == "https://colab.research.google.com/github/me/fork/blob/gh-pages/notebooks/dare.ipynb"


def test_the_shipped_notebooks_install_cell_follows_the_repository(tmp_path):
    """Each source notebook installs the package only where it is missing, and its install line is rewritten from
    CITATION.cff when the notebook is converted: a fork changes one line."""
    from pathlib import Path

    repo_root = Path(__file__).resolve().parents[1]
    text = (repo_root / "notebooks" / "dare.md").read_text()
    assert 'if importlib.util.find_spec("unifieddelta") is None:' in text
    rewritten = pipeline.with_repository(text, "https://github.com/me/fork")
    assert '%pip install --quiet "unifieddelta @ git+https://github.com/me/fork"' in rewritten
    assert rewritten.count("git+") == 1


def test_a_record_and_its_box_and_launch_line(tmp_path):
    rec = provenance.record("dare", "tiny", {"p": [0.1], "chapter_params": {"a": {}, "b": {}}}, tmp_path, 12.3, (5, 8))
    assert (rec["trials"], rec["from_store"], rec["computed"]) == (8, 5, 3)
    assert rec["commit"] == "unknown" and "CPU cores" in rec["hardware"] or "GPU" in rec["hardware"]
    text = provenance.box(rec)
    assert "from commit `unknown`" in text and "unifieddelta book --only dare`" in text
    assert '"chapter_params": [\n  "a",\n  "b"\n ]' in text  # a summary page names the chapters it read
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Title"), nbformat.v4.new_code_cell("1")])
    path = tmp_path / "dare.ipynb"
    nbformat.write(nb, str(path))
    provenance.annotate(path, rec)
    back = nbformat.read(str(path), as_version=4)
    assert back.metadata["unifieddelta"]["page"] == "dare" and provenance.read(path)["seconds"] == 12.3
    assert "mybinder.org" in back.cells[1].source and "About this page" in back.cells[-1].source
    assert provenance.read(tmp_path / "missing.ipynb") is None


def _carrying(files: dict[str, bytes]) -> bytes:
    outputs = []
    for name, content in files.items():
        data = {page.DATA_MIME: {"file": name, "base64": base64.b64encode(content).decode()}}
        outputs.append(
            nbformat.v4.new_output(
                "display_data", data={**data, **({"text/markdown": "link"} if name.startswith("tab") else {})}
            )
        )
    cell = nbformat.v4.new_code_cell("x", outputs=outputs)
    return nbformat.writes(nbformat.v4.new_notebook(cells=[cell])).encode()


def test_a_page_carries_its_files_and_the_pipeline_places_them(tmp_path):
    files = {"fig-x.csv": b"a,b\n1,2\n", "tab-x.csv": b"c\n3\n", "store.parquet": bytes(range(256))}
    executed = _carrying(files)
    shown, data = page.split_data(executed)
    assert data == files
    nb = nbformat.reads(shown.decode(), as_version=4)
    outputs = nb.cells[0].outputs
    assert len(outputs) == 1 and outputs[0].data == {"text/markdown": "link"}  # a data-only output is dropped
    out = tmp_path / "book" / "generated" / "x.ipynb"
    pipeline.place(executed, out)
    assert out.read_bytes() == shown and (out.parent / "data" / "store.parquet").read_bytes() == bytes(range(256))
    assert (out.parent / "data" / "fig-x.csv").read_text() == "a,b\n1,2\n"


def test_a_figures_csv_leaves_out_a_numbering_index():
    from unittest import mock

    frame = pd.DataFrame({"p": [0.1, 0.5], "value": [1.0, 2.0]}, index=[7, 9])
    with mock.patch("IPython.display.display") as shown:
        page._attach(frame, "fig-x", link=False)
    payload = shown.call_args[0][0][page.DATA_MIME]
    assert base64.b64decode(payload["base64"]).decode().splitlines()[0] == "p,value"
    named = frame.rename_axis("k")
    with mock.patch("IPython.display.display") as shown:
        page._attach(named, "tab-x", link=True)
    bundle = shown.call_args[0][0]
    assert base64.b64decode(bundle[page.DATA_MIME]["base64"]).decode().startswith("k,p,value")
    assert bundle["text/markdown"] == "{download}`The data behind this table (CSV) <data/tab-x.csv>`"


def test_glued_values_and_their_comparison(tmp_path):
    def executed(values):
        outputs = [
            nbformat.v4.new_output("display_data", data={"application/papermill.record/text/plain": repr(v)},
                                   metadata={"scrapbook": {"name": k, "mime_prefix": "application/papermill.record/"}})
            for k, v in values.items()
        ]  # fmt: skip
        return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("glue", outputs=outputs)])

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    nbformat.write(executed({"x": 1, "s": "same"}), str(tmp_path / "a" / "p.ipynb"))
    nbformat.write(executed({"x": 2, "s": "same", "new": 3}), str(tmp_path / "b" / "p.ipynb"))
    assert page.glued_values(tmp_path / "a" / "p.ipynb") == {"x": "1", "s": "'same'"}
    assert page.glue_diff(tmp_path / "a", tmp_path / "b") == ["p.new: None -> '3'", "p.x: '1' -> '2'"]
    assert page.glue_diff(tmp_path / "a", tmp_path / "a") == []


def test_a_misspelled_profile_parameter_names_the_closest_one(tmp_path):
    from pathlib import Path

    from unifieddelta.errors import ProfileError

    profile = tmp_path / "mine.yaml"
    profile.write_text(json.dumps({"extends": "smoke", "notebooks": [{"name": "dare", "parameters": {"seed": [0]}}]}))
    with pytest.raises(ProfileError, match=r"seed \(did you mean seeds\?\)"):
        pipeline.notebook_runs(pipeline.load_profile(profile), Path(__file__).resolve().parents[1])


def test_the_setup_pages_tables(tmp_path):
    from unifieddelta import inventory
    from unifieddelta.tasks import generate

    tasks = inventory.task_table(2)
    assert len(tasks) == 2 * len(generate.TASKS) and set(tasks["test questions"]) == {generate.N_TEST}
    params = {"dare": {"seeds": [0, 1, 2]}, "kfamily": {"seeds": [0], "vision_seeds": [0, 1]}, "own_models": {}}
    seeds = inventory.seed_table(params).set_index("chapter")
    assert seeds.loc["dare", "seeds"] == "0, 1, 2" and seeds.loc["kfamily", "other"] == "vision_seeds: 0, 1"
    assert "own_models" not in seeds.index
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# x")])
    nbformat.write(nb, str(tmp_path / "dare.ipynb"))
    provenance.annotate(tmp_path / "dare.ipynb", provenance.record("dare", "tiny", {}, tmp_path, 61.0, (2, 10)))
    compute = inventory.compute_table({"dare": {}, "kfamily": {}}, tmp_path)
    assert compute.to_dict("records")[0] | {"executed": "", "hardware": ""} == {
        "page": "dare", "seconds": 61.0, "trials": 10, "from the store": 2, "computed": 8, "executed": "",
        "hardware": "", "commit": "unknown"}  # fmt: skip
