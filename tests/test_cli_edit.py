"""The ``edit`` and ``stats`` sub-commands: a round trip on two tiny saved Llama checkpoints, and one test per bad
input (the library raises the project's exception; the CLI exits 2 with one line; no output is left behind)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from helpers import load_tensors

from unifieddelta import deltas
from unifieddelta.cli import main
from unifieddelta.errors import CheckpointError, InvalidParameterError, MismatchError, NonFiniteError, OutputExistsError


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_stats_prints_a_row_per_tensor_and_writes_csv(pair, tmp_path, capsys):
    pre, post, _ = pair
    rc, out, err = run(capsys, "stats", "--pre", pre, "--post", post, "--csv", tmp_path / "s.csv")
    assert rc == 0 and not [s for s in re.split(r"[\r\n]", err) if s.strip() and not PROGRESS.match(s)]
    table = deltas.delta_stats(pre, post)
    lines = out.strip().splitlines()
    assert lines[0].split() == list(table.columns) and len(lines) == 1 + len(table)
    assert all(name in out for name in table["name"])
    csv = pd.read_csv(tmp_path / "s.csv")
    assert list(csv["name"]) == list(table["name"])
    pd.testing.assert_frame_equal(csv.drop(columns="shape"), table.drop(columns="shape"), check_exact=False, rtol=1e-12)


def test_edit_round_trip_loads_and_matches_the_library(pair, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    pre, post, _ = pair
    out = tmp_path / "dare"
    rc, stdout, err = run(
        capsys,
        "edit",
        "--pre",
        pre,
        "--post",
        post,
        "--method",
        "dare",
        "--set",
        "p=0.9",
        "--set",
        "k=0",
        "--seed",
        "0",
        "--out",
        out,
    )
    assert rc == 0 and stdout.strip() == f"edited checkpoint: {out}"
    model = LlamaForCausalLM.from_pretrained(out)
    ref = deltas.apply_edit(pre, post, "dare", p=0.9, k=0, seed=0)
    assert all(torch.equal(p, ref.get_parameter(n)) for n, p in model.named_parameters())
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert (out / "tokenizer_config.json").exists() and (out / "generation_config.json").exists()


def test_edit_settings_are_typed_and_selection_applies(pair, tmp_path, capsys):
    pre, post, _ = pair
    out = tmp_path / "bd"
    rc, _, _ = run(
        capsys,
        "edit",
        "--pre",
        pre,
        "--post",
        post,
        "--method",
        "bitdelta",
        "--set",
        "bits=2",
        "--set",
        "scale=1.5",
        "--include",
        "mlp",
        "--exclude",
        "layers.1",
        "--out",
        out,
    )
    assert rc == 0
    got, b = load_tensors(out), load_tensors(post)
    changed = {n for n in b if not torch.equal(got[n], b[n])}
    assert changed == {n for n in b if "mlp" in n and "layers.1" not in n}
    ref = load_tensors(
        deltas.apply_edit(
            pre, post, "bitdelta", bits=2, scale=1.5, include="mlp", exclude="layers.1", out=tmp_path / "ref"
        )
    )
    assert all(torch.equal(got[n], ref[n]) for n in ref)


# --- bad input: one test per case ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad(pair, tmp_path_factory):
    """Broken inputs built once: (folder name -> path)."""
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    pre, post, sharded = pair
    root = tmp_path_factory.mktemp("bad")
    (root / "not-a-checkpoint").mkdir()
    (root / "not-a-checkpoint" / "README.txt").write_text("hello\n")
    shutil.copytree(pre, root / "corrupt")
    (root / "corrupt" / "model.safetensors").write_bytes(os.urandom(3000))
    shutil.copytree(pre, root / "truncated")
    data = (pre / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        root / "gpt2"
    )
    shutil.copytree(post, root / "nan")
    tensors = load_tensors(post)
    tensors["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(tensors, str(root / "nan" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(post, root / "shrunk")  # a post vocabulary smaller than pre's
    tensors = load_tensors(post)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = tensors[name][:-4].clone()
    save_file(tensors, str(root / "shrunk" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(post, root / "bad-config")
    (root / "bad-config" / "config.json").write_text('{"model_type": "llama",')
    shutil.copytree(sharded, root / "bad-index")
    (root / "bad-index" / "model.safetensors.index.json").write_text("{weight_map: nope")
    shutil.copytree(sharded, root / "index-lies")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"]["model.ghost.weight"] = index["weight_map"][first]
    (root / "index-lies" / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copytree(post, root / "corrupt-post")
    data = bytearray((post / "model.safetensors").read_bytes())
    data[10:40] = os.urandom(30)  # the header garbled, the size unchanged
    (root / "corrupt-post" / "model.safetensors").write_bytes(bytes(data))
    return root


# name: (pre, post, method, settings, extra argv, exception, text the message must contain)
BAD = {
    "missing path": ("{tmp}/no-such-folder", "{post}", "dare", ["p=0.5"], [], CheckpointError, "no such file"),
    "not a checkpoint": (
        "{bad}/not-a-checkpoint",
        "{post}",
        "dare",
        ["p=0.5"],
        [],
        CheckpointError,
        "not a checkpoint",
    ),
    "corrupt safetensors": ("{bad}/corrupt", "{post}", "dare", ["p=0.5"], [], CheckpointError, "corrupt"),
    "truncated safetensors": ("{bad}/truncated", "{post}", "dare", ["p=0.5"], [], CheckpointError, "truncated"),
    "architectures differ": ("{bad}/gpt2", "{post}", "dare", ["p=0.5"], [], MismatchError, "'gpt2'"),
    "nan in delta": ("{pre}", "{bad}/nan", "dare", ["p=0.5"], [], NonFiniteError, "up_proj"),
    "unknown method": ("{pre}", "{post}", "tiesx", [], [], InvalidParameterError, "unknown method 'tiesx'"),
    "p out of range": ("{pre}", "{post}", "dare", ["p=1.0"], [], InvalidParameterError, "p must be in [0, 1)"),
    "keep out of range": (
        "{pre}",
        "{post}",
        "magnitude_trim",
        ["keep=0"],
        [],
        InvalidParameterError,
        "keep must be in (0, 1]",
    ),
    "rank above min(m, n)": (
        "{pre}",
        "{post}",
        "low_rank",
        ["rank=9"],
        [],
        InvalidParameterError,
        "exceeds min(m, n) = 8",
    ),
    "bits negative": (
        "{pre}",
        "{post}",
        "bitdelta",
        ["bits=-1"],
        [],
        InvalidParameterError,
        "bits must be an integer >= 0",
    ),
    "out exists": ("{pre}", "{post}", "dare", ["p=0.5"], ["exists"], OutputExistsError, "exists"),
    "vocabulary shrank": (
        "{pre}",
        "{bad}/shrunk",
        "dare",
        ["p=0.5"],
        [],
        MismatchError,
        "shape (64, 16) in pre but (60, 16) in post",
    ),
    "corrupt config.json": ("{pre}", "{bad}/bad-config", "dare", ["p=0.5"], [], CheckpointError, "unreadable config"),
    "unreadable index": ("{pre}", "{bad}/bad-index", "dare", ["p=0.5"], [], CheckpointError, "unreadable index"),
    "index names a missing tensor": (
        "{pre}",
        "{bad}/index-lies",
        "dare",
        ["p=0.5"],
        [],
        CheckpointError,
        "'model.ghost.weight' listed in the index is not in the file",
    ),
    "corrupt post": ("{pre}", "{bad}/corrupt-post", "dare", ["p=0.5"], [], CheckpointError, "corrupt"),
}


PROGRESS = re.compile(r"^\w+: +\d+%\|")  # a tqdm line: "dare:  24%|██▍  | 5/21 ..."


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, pair, bad, tmp_path, capsys):
    pre_t, post_t, method, settings, extra, error, text = BAD[case]
    fmt = {"tmp": tmp_path, "bad": bad, "pre": pair[0], "post": pair[1]}
    pre, post = pre_t.format(**fmt), post_t.format(**fmt)
    out = tmp_path / "out"
    if "exists" in extra:
        out.mkdir()
        (out / "keep.txt").write_text("mine\n")
    params = dict(s.split("=") for s in settings)
    params = {k: (float(v) if "." in v else int(v)) for k, v in params.items()}
    with pytest.raises(error, match=re.escape(text)):
        deltas.apply_edit(pre, post, method, out=out, **params)
    argv = ["edit", "--pre", pre, "--post", post, "--method", method, "--out", out]
    for s in settings:
        argv += ["--set", s]
    rc, stdout, err = run(capsys, *argv)
    assert rc == 2 and stdout == ""
    lines = [s for s in re.split(r"[\r\n]", err) if s.strip() and not PROGRESS.match(s)]  # the bar clears itself
    assert len(lines) == 1 and lines[0].startswith("unifieddelta edit: error: ") and text in lines[0]
    if "exists" in extra:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_console_prints_one_line_and_exits_non_zero(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "unifieddelta.cli", "stats", "--pre", str(tmp_path / "nope"), "--post", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"unifieddelta stats: error: {tmp_path / 'nope'}: no such file or folder"
