"""Pairing checkpoints, delta statistics, directions and edited checkpoints (``unifieddelta.deltas``) on tiny saved
Llama checkpoints: W_pre + F(ΔW) tensor by tensor, bit-for-bit identities, determinism across sharding and order."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import checkpoint_llama, load_tensors, post_of, save
from safetensors.torch import load_file, save_file

from unifieddelta import deltas, edits
from unifieddelta.errors import InvalidParameterError, MismatchError, NonFiniteError


def reference_edit(pre, post, method, seed=0, **params):
    """W_post + (F(ΔW) − ΔW) per tensor, computed here from whole state dicts (float64, rounded once)."""
    a, b = load_tensors(pre), load_tensors(post)
    fn = edits.get_method(method)
    out = {}
    for name in b:
        d = b[name].double() - a[name].double()
        extra = {"generator": deltas.tensor_generator(seed, name)} if edits.spec(method).seeded(params) else {}
        out[name] = (b[name].double() + (fn(d, **params, **extra) - d)).to(b[name].dtype)
    return out


def no_leftovers(parent):
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


# --- pairing ------------------------------------------------------------------------------------------------


def test_iter_deltas_yields_every_delta_in_float64(pair):
    pre, post, _ = pair
    a, b = load_tensors(pre), load_tensors(post)
    seen = dict(deltas.iter_deltas(pre, post))
    assert seen.keys() == b.keys()
    assert all(d.dtype == torch.float64 and torch.equal(d, b[n].double() - a[n].double()) for n, d in seen.items())


def test_iter_deltas_on_modules_uses_parameter_names():
    pre = checkpoint_llama()
    post = post_of(pre)
    names = [n for n, _ in deltas.iter_deltas(pre, post)]
    assert names == [n for n, _ in post.named_parameters()]


@pytest.mark.parametrize(
    "kwargs,check",
    [
        ({"preset": "matrices"}, lambda n, s: len(s) == 2),
        ({"preset": "linear"}, lambda n, s: n.endswith("proj.weight")),
        ({"include": r"\.mlp\."}, lambda n, s: ".mlp." in n),
        ({"exclude": ["norm", "embed"]}, lambda n, s: "norm" not in n and "embed" not in n),
        ({"include": "layers.1", "preset": "linear"}, lambda n, s: "layers.1." in n and "proj" in n),
    ],
)
def test_selection_by_preset_and_regex(pair, kwargs, check):
    pre, post, _ = pair
    all_shapes = {n: tuple(d.shape) for n, d in deltas.iter_deltas(pre, post)}
    chosen = [n for n, _ in deltas.iter_deltas(pre, post, **kwargs)]
    assert chosen and set(chosen) == {n for n, s in all_shapes.items() if check(n, s)}


def test_unknown_preset_and_bad_regex_raise(pair):
    pre, post, _ = pair
    with pytest.raises(InvalidParameterError, match="unknown preset"):
        list(deltas.iter_deltas(pre, post, preset="everything"))
    with pytest.raises(InvalidParameterError, match="include"):
        list(deltas.iter_deltas(pre, post, include="(unclosed"))


def test_delta_stats_against_numpy(pair):
    pre, post, _ = pair
    a, b = load_tensors(pre), load_tensors(post)
    table = deltas.delta_stats(pre, post)
    assert list(table.columns) == ["name", "shape", "numel", "norm", "mean_abs", "rel_change", "frac_zero", "max_abs"]
    assert list(table["name"]) == list(b)
    for row in table.itertuples():
        d = b[row.name].double().numpy() - a[row.name].double().numpy()
        assert row.shape == d.shape and row.numel == d.size
        np.testing.assert_allclose(
            [row.norm, row.mean_abs, row.rel_change, row.frac_zero, row.max_abs],
            [
                np.sqrt((d**2).sum()),
                np.abs(d).mean(),
                np.sqrt((d**2).sum()) / np.sqrt((a[row.name].double().numpy() ** 2).sum()),
                (d == 0).mean(),
                np.abs(d).max(),
            ],
            rtol=1e-12,
        )


def test_delta_stats_counts_exact_zeros(tmp_path):
    pre = checkpoint_llama()
    post = post_of(pre)
    with torch.no_grad():
        post.get_parameter("model.norm.weight").copy_(pre.get_parameter("model.norm.weight"))
    table = deltas.delta_stats(pre, post).set_index("name")
    assert table.loc["model.norm.weight", "frac_zero"] == 1.0 and table.loc["model.norm.weight", "norm"] == 0.0


# --- edited checkpoints -------------------------------------------------------------------------------------

CASES = [
    ("dare", {"p": 0.5, "k": 0.3}),
    ("drop_only", {"p": 0.4}),
    ("bitdelta", {"bits": 1, "scale": 1.5}),
    ("bitdelta", {"magnitudes": "uniform"}),
    ("low_rank", {"rank": 2}),
    ("magnitude_trim", {"keep": 0.3}),
    ("extrapolate", {"alpha": 0.5}),
    ("sign_biased", {"k": 0.7}),
]


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{'-'.join(map(str, p.values()))}" for m, p in CASES])
def test_written_checkpoint_is_pre_plus_edited_delta(pair, tmp_path, method, params):
    pre, post, _ = pair
    out = deltas.apply_edit(pre, post, method, seed=7, out=tmp_path / "out", **params)
    got, ref = load_tensors(out), reference_edit(pre, post, method, seed=7, **params)
    assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)
    # The same thing written the paper's way: W_pre + F(ΔW).
    a, b = load_tensors(pre), load_tensors(post)
    fn = edits.get_method(method)
    for name in ref:
        g = {"generator": deltas.tensor_generator(7, name)} if edits.spec(method).seeded(params) else {}
        paper_way = a[name].double() + fn(b[name].double() - a[name].double(), **params, **g)
        torch.testing.assert_close(got[name].double(), paper_way, rtol=1e-6, atol=1e-7)
    for fname in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / fname).read_bytes() == (post / fname).read_bytes()
    record = json.loads((out / "unifieddelta_edit.json").read_text())
    assert record["method"] == method and record["params"] == params and record["seed"] == 7
    assert no_leftovers(tmp_path)


@pytest.mark.parametrize("method,params", [("extrapolate", {"alpha": 0.0}), ("dare", {"p": 0.0, "k": 0.5})])
@pytest.mark.parametrize("which", ["float32", "bf16"])
def test_identity_edits_give_post_bit_for_bit(pair, pair_bf16, tmp_path, method, params, which):
    pre, post = pair[:2] if which == "float32" else pair_bf16
    out = deltas.apply_edit(pre, post, method, out=tmp_path / "out", **params)
    got, want = load_tensors(out), load_tensors(post)
    assert got.keys() == want.keys()
    assert all(got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]) for n in want)
    model = deltas.apply_edit(pre, post, method, **params)
    assert all(torch.equal(model.get_parameter(n).detach(), want[n]) for n in want)
    # D = 0 exactly, so a float32 computation (half the memory) is exact too.
    model = deltas.apply_edit(pre, post, method, compute_dtype=torch.float32, **params)
    assert all(torch.equal(model.get_parameter(n).detach(), want[n]) for n in want)


def test_same_seed_same_checkpoint_whatever_the_sharding_order_or_threads(pair, tmp_path):
    pre, post, sharded = pair
    a = load_tensors(deltas.apply_edit(pre, post, "dare", p=0.7, seed=3, out=tmp_path / "single"))
    b = load_tensors(deltas.apply_edit(pre, sharded, "dare", p=0.7, seed=3, out=tmp_path / "sharded"))
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) == len(list(sharded.glob("*.safetensors")))
    # Order: editing one tensor alone draws what it drew among all the others.
    name = "model.layers.1.mlp.up_proj.weight"
    alone = load_tensors(deltas.apply_edit(pre, post, "dare", p=0.7, seed=3, include=name, out=tmp_path / "alone"))
    assert torch.equal(alone[name], a[name])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = load_tensors(deltas.apply_edit(pre, post, "dare", p=0.7, seed=3, out=tmp_path / "one-thread"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a[n], c[n]) for n in a)
    d = load_tensors(deltas.apply_edit(pre, post, "dare", p=0.7, seed=4, out=tmp_path / "other-seed"))
    assert not torch.equal(a[name], d[name])


def test_tensor_generator_depends_on_seed_and_name_only():
    draw = lambda s, n: torch.rand(5, generator=deltas.tensor_generator(s, n))
    assert torch.equal(draw(1, "a.weight"), draw(1, "a.weight"))
    assert not torch.equal(draw(1, "a.weight"), draw(1, "b.weight"))
    assert not torch.equal(draw(1, "a.weight"), draw(2, "a.weight"))
    with pytest.raises(InvalidParameterError):
        deltas.tensor_generator(1.5, "a")


def test_in_memory_edit_matches_the_written_one(pair, tmp_path):
    pre, post, _ = pair
    written = load_tensors(deltas.apply_edit(pre, post, "dare", p=0.6, k=-0.5, seed=2, out=tmp_path / "o"))
    from_folder = deltas.apply_edit(pre, post, "dare", p=0.6, k=-0.5, seed=2)
    pre_m, post_m = checkpoint_llama(), post_of(checkpoint_llama())
    before = {n: p.detach().clone() for n, p in post_m.named_parameters()}
    from_modules = deltas.apply_edit(pre_m, post_m, "dare", p=0.6, k=-0.5, seed=2)
    assert all(torch.equal(from_folder.get_parameter(n).detach(), written[n]) for n in written)
    assert all(torch.equal(from_modules.get_parameter(n).detach(), written[n]) for n in written)
    assert all(torch.equal(p, before[n]) for n, p in post_m.named_parameters())  # a copy was edited
    same = deltas.apply_edit(pre_m, post_m, "dare", p=0.6, k=-0.5, seed=2, inplace=True)
    assert same is post_m and torch.equal(post_m.get_parameter("lm_head.weight").detach(), written["lm_head.weight"])


def test_direction_is_the_edit_minus_post(pair, tmp_path):
    pre, post, _ = pair
    written = load_tensors(deltas.apply_edit(pre, post, "low_rank", rank=0.5, out=tmp_path / "o"))
    b = load_tensors(post)
    direction = deltas.direction(pre, post, "low_rank", rank=0.5, include=r"layers\.0\.")
    model = checkpoint_llama()
    assert direction and set(direction) <= dict(model.named_parameters()).keys()
    assert all(".layers.0." in n for n in direction)
    for name, d in direction.items():
        assert d.dtype == b[name].dtype and d.shape == b[name].shape
        torch.testing.assert_close(b[name] + d, written[name], rtol=1e-6, atol=1e-7)


def test_direction_of_product_biased_takes_gradients_by_name(pair):
    pre, post, _ = pair
    a, b = load_tensors(pre), load_tensors(post)
    grad = {n: torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) for i, (n, t) in enumerate(b.items())}
    direction = deltas.direction(pre, post, "product_biased", k=0.5, grad=grad)
    for name in b:
        d = b[name].double() - a[name].double()
        ref = (edits.product_biased(d, grad[name], 0.5) - d).float()
        torch.testing.assert_close(direction[name], ref)
    with pytest.raises(InvalidParameterError, match="grad"):
        deltas.direction(pre, post, "product_biased", k=0.5)


def test_unknown_and_missing_settings_raise(pair):
    pre, post, _ = pair
    with pytest.raises(InvalidParameterError, match="unknown parameter"):
        deltas.direction(pre, post, "dare", p=0.5, q=1)
    with pytest.raises(InvalidParameterError, match="missing parameter"):
        deltas.direction(pre, post, "magnitude_trim")


# --- real-checkpoint quirks ---------------------------------------------------------------------------------


def _copy_with(src, dst, change):
    """A copy of checkpoint ``src`` whose tensors went through ``change(dict)``."""
    shutil.copytree(src, dst)
    tensors = load_tensors(dst)
    change(tensors)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_tensor_only_one_side_has_is_kept_from_post_with_a_warning(pair, tmp_path):
    pre, post, _ = pair
    extra = torch.arange(8, dtype=torch.float32)
    post2 = _copy_with(post, tmp_path / "post2", lambda t: t.update({"model.rotary.extra_buffer": extra}))
    with pytest.warns(UserWarning, match="kept from post.*extra_buffer"):
        out = deltas.apply_edit(pre, post2, "extrapolate", alpha=0.5, out=tmp_path / "o")
    got = load_tensors(out)
    assert torch.equal(got["model.rotary.extra_buffer"], extra)
    with pytest.warns(UserWarning, match="ignored, post lacks them"):
        names = [n for n, _ in deltas.iter_deltas(post2, post)]
    assert "model.rotary.extra_buffer" not in names


def test_grown_embedding_edits_shared_rows_and_keeps_new_ones(pair, tmp_path):
    pre, post, _ = pair
    new_rows = torch.randn(6, 16, generator=torch.Generator().manual_seed(5))

    def grow(t):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            t[name] = torch.cat([t[name], new_rows])

    grown = _copy_with(post, tmp_path / "grown", grow)
    with pytest.warns(UserWarning, match="grew"):
        got = load_tensors(deltas.apply_edit(pre, grown, "dare", p=0.5, seed=1, out=tmp_path / "o"))
    ref = load_tensors(deltas.apply_edit(pre, post, "dare", p=0.5, seed=1, out=tmp_path / "ref"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape == (70, 16)
        assert torch.equal(got[name][:64], ref[name]) and torch.equal(got[name][64:], new_rows)
    with pytest.warns(UserWarning, match="grew"):
        direction = deltas.direction(pre, grown, "dare", p=0.5, seed=1, include="embed")
    assert direction["model.embed_tokens.weight"].shape == (70, 16)
    assert not direction["model.embed_tokens.weight"][64:].any()


def test_other_shape_mismatch_names_the_tensor_and_both_shapes(pair, tmp_path):
    pre, post, _ = pair
    name = "model.layers.0.self_attn.q_proj.weight"
    bad = _copy_with(post, tmp_path / "bad", lambda t: t.update({name: t[name][:, :8].contiguous()}))
    with pytest.raises(MismatchError, match=r"q_proj.*\(16, 16\).*\(16, 8\)"):
        deltas.delta_stats(pre, bad)


def test_non_finite_delta_raises_naming_the_tensor_and_writes_nothing(pair, tmp_path):
    pre, post, _ = pair
    name = "model.layers.1.mlp.down_proj.weight"

    def poison(t):
        t[name][0, 0] = float("nan")
        t[name][1, 1] = float("inf")

    bad = _copy_with(post, tmp_path / "nan", poison)
    with pytest.raises(NonFiniteError, match=r"down_proj.*2 NaN/Inf"):
        deltas.apply_edit(pre, bad, "dare", p=0.5, out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_pytorch_bin_checkpoints_are_read_and_written_as_safetensors(pair, tmp_path):
    pre, post, _ = pair
    binpost = tmp_path / "binpost"
    shutil.copytree(post, binpost)
    (binpost / "model.safetensors").unlink()
    torch.save(load_file(post / "model.safetensors"), binpost / "pytorch_model.bin")
    assert deltas.delta_stats(pre, binpost).equals(deltas.delta_stats(pre, post))
    got = load_tensors(deltas.apply_edit(pre, binpost, "dare", p=0.5, out=tmp_path / "o"))
    ref = load_tensors(deltas.apply_edit(pre, post, "dare", p=0.5, out=tmp_path / "ref"))
    assert (tmp_path / "o" / "model.safetensors").exists()
    assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)


def test_save_helper_roundtrip(tmp_path):
    folder = save(checkpoint_llama(layers=1), tmp_path / "m")
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer_config.json").exists()


def test_hub_ids_resolve_through_the_hub_cache_and_fail_clearly(pair, monkeypatch):
    import huggingface_hub

    from unifieddelta.errors import CheckpointError

    pre, post, _ = pair
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append(repo) or str(post))
    names = [n for n, _ in deltas.iter_deltas(pre, "someone/tiny-post")]
    assert asked == ["someone/tiny-post"] and names == list(load_tensors(post))
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo, **kw: (_ for _ in ()).throw(OSError("offline"))
    )
    with pytest.raises(CheckpointError, match="not a reachable hub id"):
        deltas.delta_stats(pre, "someone/absent")


def test_module_post_written_with_save_pretrained(pair, tmp_path):
    pre, post, _ = pair
    post_m = post_of(checkpoint_llama())
    out = deltas.apply_edit(pre, post_m, "magnitude_trim", keep=0.5, out=tmp_path / "o")
    ref = deltas.apply_edit(pre, post_m, "magnitude_trim", keep=0.5)
    got = load_tensors(out)
    assert (out / "config.json").exists() and (out / "unifieddelta_edit.json").exists()
    assert all(torch.equal(got[n], p.detach()) for n, p in ref.named_parameters())


def test_sharded_checkpoint_missing_a_listed_shard_is_refused(pair, tmp_path):
    from unifieddelta.errors import CheckpointError

    pre, _, sharded = pair
    broken = shutil.copytree(sharded, tmp_path / "broken")
    victim = sorted(broken.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim.name} listed in model.safetensors.index.json is missing"):
        deltas.delta_stats(pre, broken)


def test_every_path_closes_the_checkpoints_it_opens(pair, monkeypatch):
    from unifieddelta import checkpoints

    opened, closed = [], []
    real_open, real_close = checkpoints.open_checkpoint, checkpoints.Checkpoint.close

    def spy_open(source):
        ck = real_open(source)
        opened.append(ck)
        return ck

    def spy_close(self):
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(deltas, "open_checkpoint", spy_open)
    monkeypatch.setattr(checkpoints.Checkpoint, "close", spy_close)
    pre, post, _ = pair
    for call in (
        lambda: deltas.direction(pre, post, "dare", p=0.5),
        lambda: deltas.delta_stats(pre, post),
        lambda: list(deltas.iter_deltas(pre, post)),
        lambda: deltas.apply_edit(pre, post, "bitdelta"),
    ):
        opened.clear(), closed.clear()
        call()
        assert len(opened) == 2 and all(any(c is o for c in closed) for o in opened)
        assert all(not ck._handles for ck in opened)


def test_a_folder_pairs_with_a_module_whose_names_transformers_converted(tmp_path):
    """transformers 5 renames ViT's tensors on load (encoder.layer.N.attention.attention.query -> layers.N.attention
    .q_proj): a saved folder and a loaded module still pair tensor by tensor, every parameter edited."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    pre = ViTForImageClassification(config)
    pre.save_pretrained(tmp_path / "pre")
    post = post_of(pre)
    from unifieddelta.checkpoints import open_checkpoint

    assert set(open_checkpoint(tmp_path / "pre").shapes) != set(dict(post.named_parameters()))  # the renaming
    d = deltas.direction(tmp_path / "pre", post, "extrapolate", alpha=0.5)
    assert set(d) == set(dict(post.named_parameters()))
    for (n, p), q in zip(post.named_parameters(), pre.parameters()):
        torch.testing.assert_close(d[n], 0.5 * (p - q).detach(), rtol=1e-5, atol=1e-7)
    edited = deltas.apply_edit(tmp_path / "pre", post, "extrapolate", alpha=-1.0)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(edited.parameters(), pre.parameters()))


def test_sharded_output_loads_with_from_pretrained_and_its_index_is_right(pair, tmp_path):
    from transformers import LlamaForCausalLM

    pre, post, sharded = pair
    whole = deltas.apply_edit(pre, post, "dare", p=0.6, seed=2, out=tmp_path / "whole")
    split = deltas.apply_edit(pre, sharded, "dare", p=0.6, seed=2, out=tmp_path / "split")
    a, b = LlamaForCausalLM.from_pretrained(whole), LlamaForCausalLM.from_pretrained(split)  # through the index
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    index = json.loads((split / "model.safetensors.index.json").read_text())
    source = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == source["weight_map"]  # every tensor in the shard it came from
    files = {f: load_file(split / f) for f in set(index["weight_map"].values())}
    assert all(name in files[f] for name, f in index["weight_map"].items())
    assert sorted(n for t in files.values() for n in t) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.nbytes for f in files.values() for t in f.values())


def test_a_failure_while_overwriting_keeps_the_old_output(pair, tmp_path, monkeypatch):
    from unifieddelta import checkpoints

    pre, post, _ = pair
    out = deltas.apply_edit(pre, post, "dare", p=0.3, out=tmp_path / "out")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    real = checkpoints.write_safetensors
    calls = []

    def failing(path, specs, tensors, metadata):
        calls.append(path)
        if len(calls) == 1:
            it = iter(tensors)
            next(it)  # one tensor made, then the disk fills up
            raise OSError("No space left on device")
        return real(path, specs, tensors, metadata)

    monkeypatch.setattr(checkpoints, "write_safetensors", failing)
    with pytest.raises(OSError, match="No space"):
        deltas.apply_edit(pre, post, "dare", p=0.9, out=out, overwrite=True)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert no_leftovers(tmp_path)
    monkeypatch.undo()
    deltas.apply_edit(pre, post, "dare", p=0.9, out=out, overwrite=True)  # and overwriting does overwrite
    assert {f.name: f.read_bytes() for f in out.iterdir()} != before


def test_a_failed_in_place_edit_leaves_the_model_untouched(pair, monkeypatch):
    pre, post, _ = pair
    model = checkpoint_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    real = edits.EDITS["dare"].fn
    seen = []

    def flaky(delta, p, k=0.0, *, generator=None, offset=0):
        seen.append(1)
        if len(seen) == 5:
            raise RuntimeError("out of memory")
        return real(delta, p, k, generator=generator, offset=offset)

    monkeypatch.setitem(edits.EDITS, "dare", edits.EditSpec(flaky, seeded=lambda p: True, entrywise=True))
    with pytest.raises(RuntimeError, match="out of memory"):
        deltas.apply_edit(pre, model, "dare", p=0.5, inplace=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_pre_and_post_in_different_dtypes_work_and_write_posts_dtype(pair, pair_bf16, tmp_path):
    pre32, _, _ = pair
    _, post16 = pair_bf16
    out = deltas.apply_edit(pre32, post16, "extrapolate", alpha=0.5, out=tmp_path / "mixed")
    got, a, b = load_tensors(out), load_tensors(pre32), load_tensors(post16)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    for n, t in got.items():
        want = (b[n].double() + 0.5 * (b[n].double() - a[n].double())).to(torch.bfloat16)
        assert torch.equal(t, want), n


def test_nan_reaching_direction_or_the_in_memory_edit_names_the_tensor(pair):
    pre, post, _ = pair
    model = post_of(checkpoint_llama())
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteError, match="layers.1.self_attn.k_proj"):
        deltas.direction(pre, model, "dare", p=0.5)
    with pytest.raises(NonFiniteError, match="layers.1.self_attn.k_proj"):
        deltas.apply_edit(pre, model, "dare", p=0.5, inplace=True)
    assert all(torch.equal(p, before[n]) or (p.isnan() == before[n].isnan()).all() for n, p in model.named_parameters())
