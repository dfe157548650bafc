"""The streaming checkpoint editor: safetensors written tensor by tensor and read without a memory map, and the
``--compute-dtype`` flag of ``unifieddelta edit``."""

import json
import struct

import pytest
import torch
from helpers import load_tensors
from safetensors.torch import load_file, save_file

from unifieddelta import checkpoints, deltas
from unifieddelta.cli import main
from unifieddelta.errors import MismatchError, NonFiniteError


def test_streamed_safetensors_load_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(5, 3, generator=g),
        "h": torch.randn(7, generator=g).to(torch.bfloat16),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
    }
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    written = checkpoints.write_safetensors(tmp_path / "a.safetensors", specs, iter(tensors.values()), {"format": "pt"})
    assert written == sum(t.nbytes for t in tensors.values())
    back = load_file(tmp_path / "a.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[n], t) for n, t in tensors.items())
    (size,) = struct.unpack("<Q", (tmp_path / "a.safetensors").read_bytes()[:8])
    assert size % 8 == 0 and json.loads((tmp_path / "a.safetensors").read_bytes()[8 : 8 + size])["__metadata__"]


def test_streamed_writer_refuses_a_tensor_unlike_its_header(tmp_path):
    with pytest.raises(MismatchError, match="'w'"):
        checkpoints.write_safetensors(tmp_path / "b.safetensors", [("w", torch.float32, (2,))], [torch.zeros(3)], {})


def test_reader_gives_what_safetensors_stored(tmp_path):
    tensors = {"a": torch.randn(4, 4), "b": torch.arange(5, dtype=torch.int32), "c": torch.randn(3).half()}
    (tmp_path / "m").mkdir()
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    ck = checkpoints.open_checkpoint(tmp_path / "m")
    assert set(ck.spans) == set(tensors)
    assert all(torch.equal(ck.get(n), t) and ck.get(n).dtype == t.dtype for n, t in tensors.items())


def test_cli_compute_dtype_float32_matches_the_library(pair, tmp_path, capsys):
    pre, post, _ = pair
    argv = ["edit", "--pre", pre, "--post", post, "--method", "dare", "--set", "p=0.7", "--seed", "1"]
    assert main([str(a) for a in [*argv, "--compute-dtype", "float32", "--out", tmp_path / "f32"]]) == 0
    got = load_tensors(tmp_path / "f32")
    ref = deltas.apply_edit(pre, post, "dare", p=0.7, seed=1, compute_dtype=torch.float32)
    assert all(torch.equal(t, ref.get_parameter(n)) for n, t in got.items())
    assert main([str(a) for a in [*argv, "--out", tmp_path / "f64"]]) == 0  # float64 stays the default
    ref64 = load_tensors(deltas.apply_edit(pre, post, "dare", p=0.7, seed=1, out=tmp_path / "lib64"))
    f64 = load_tensors(tmp_path / "f64")
    assert all(torch.equal(f64[n], ref64[n]) for n in ref64)
    capsys.readouterr()


@pytest.mark.parametrize(
    "method,params", [("dare", {"p": 0.7, "k": -0.5}), ("drop_only", {"p": 0.4}), ("extrapolate", {"alpha": 0.3})]
)
@pytest.mark.parametrize("compute_dtype", [torch.float64, torch.float32])
def test_row_blocks_give_exactly_the_tensor_edited_whole(pair, tmp_path, monkeypatch, method, params, compute_dtype):
    pre, post, _ = pair
    whole = load_tensors(
        deltas.apply_edit(pre, post, method, seed=5, out=tmp_path / "whole", compute_dtype=compute_dtype, **params)
    )
    monkeypatch.setattr(deltas, "BLOCK_BYTES", 200)  # a few rows per block, blocks cutting through the tensors
    edit = deltas._prepare(method, params, None)
    assert deltas._in_rows(edit, checkpoints.open_checkpoint(post), "model.embed_tokens.weight", compute_dtype)
    blocks = load_tensors(
        deltas.apply_edit(pre, post, method, seed=5, out=tmp_path / "blocks", compute_dtype=compute_dtype, **params)
    )
    assert whole.keys() == blocks.keys() and all(torch.equal(whole[n], blocks[n]) for n in whole)


def test_row_blocks_of_a_grown_embedding_keep_the_new_rows(pair, tmp_path, monkeypatch):
    pre, post, _ = pair
    grown = tmp_path / "grown"
    grown.mkdir()
    tensors = load_tensors(post)
    name = "model.embed_tokens.weight"
    tensors[name] = torch.cat(
        [tensors[name], torch.randn(6, tensors[name].shape[1], generator=torch.Generator().manual_seed(5))]
    )
    save_file(tensors, str(grown / "model.safetensors"), metadata={"format": "pt"})
    for f in post.iterdir():
        if f.suffix == ".json":
            (grown / f.name).write_bytes(f.read_bytes())
    with pytest.warns(UserWarning, match="grew"):
        whole = load_tensors(deltas.apply_edit(pre, grown, "dare", p=0.5, seed=2, out=tmp_path / "w"))
    monkeypatch.setattr(deltas, "BLOCK_BYTES", 300)
    with pytest.warns(UserWarning, match="grew"):
        blocks = load_tensors(deltas.apply_edit(pre, grown, "dare", p=0.5, seed=2, out=tmp_path / "b"))
    assert all(torch.equal(whole[n], blocks[n]) for n in whole)
    assert torch.equal(blocks[name][-6:], tensors[name][-6:])


def test_a_non_finite_block_names_the_tensor_and_rows(pair, tmp_path, monkeypatch):
    pre, post, _ = pair
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_tensors(post)
    tensors["model.embed_tokens.weight"][5, 1] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_bytes((post / "config.json").read_bytes())
    monkeypatch.setattr(deltas, "BLOCK_BYTES", 200)
    with pytest.raises(NonFiniteError, match=r"embed_tokens.*1 NaN/Inf entries rows \d+:\d+"):
        deltas.apply_edit(pre, bad, "dare", p=0.5, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
