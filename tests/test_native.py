"""The C kernels (``unifieddelta.native``) give the bits of their torch twins: per edit, per dtype, on special
values, across thread counts, for the streaming editor's fused step; and a missing compiler falls back to torch."""

import math

import pytest
import torch
from helpers import gen, load_tensors, needs
from safetensors.torch import save_file

from unifieddelta import deltas, edits, native
from unifieddelta.errors import NonFiniteError

pytestmark = needs(native.library() is not None, "no C compiler: the torch path is the only one")

N = edits.NATIVE_MIN_NUMEL + 77  # above the native size, not a multiple of any vector width


def values(dtype, n=N, seed=0):
    """Normal values over 40 decades, with ±0, NaN, ±Inf and subnormals at the front."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-30, 10, (n,), generator=g)
    v[:8] = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-310, -1e-42, 3e38], dtype=torch.float64)
    return v.to(dtype)


def torch_path(fn, monkeypatch):
    monkeypatch.setenv("UNIFIEDDELTA_NATIVE", "0")
    out = fn()
    monkeypatch.delenv("UNIFIEDDELTA_NATIVE")
    return out


def same_bits(a, b):
    """Bit for bit, ±0 told apart; NaN equals NaN whatever its payload (torch itself writes bf16 NaNs two ways)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return False
    a, b = a[~a.isnan()], b[~b.isnan()]
    return torch.equal(a.view(ints[a.element_size()]), b.view(ints[b.element_size()]))


CASES = {  # bf16 × 10 (DARE p=0.9) lands halfway between two bf16 values 1 time in 16: ties are covered
    "dare": lambda x: edits.dare(x, 0.9, generator=gen(1)),
    "dare k<0": lambda x: edits.dare(x, 0.3, -0.5, generator=gen(2)),
    "dare offset 2^31": lambda x: edits.dare(x, 0.5, 0.25, generator=gen(3), offset=2**31 - 1000),
    "drop_only": lambda x: edits.drop_only(x, 0.4, generator=gen(4)),
    "bitdelta": lambda x: edits.bitdelta(x[8:], scale=0.5),  # finite: a NaN makes the mean NaN
    "bitdelta special": lambda x: edits.bitdelta(x),
    "magnitude_trim": lambda x: edits.magnitude_trim(x[8:], 0.3),
    "magnitude_trim ties": lambda x: edits.magnitude_trim(torch.remainder(torch.arange(N), 7).to(x.dtype) - 3, 0.45),
    "magnitude_trim keep≈1": lambda x: edits.magnitude_trim(x[8:], 0.999),
    "magnitude_trim NaN": lambda x: edits.magnitude_trim(x, 0.3),  # the bracket declines: numpy selects
    "magnitude_trim periodic": lambda x: edits.magnitude_trim(x[8:].reshape(-1)[: 1 << 16].repeat(2), 0.01),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_give_the_torch_bits(case, dtype, monkeypatch):
    x = values(dtype)
    got, ref = CASES[case](x), torch_path(lambda: CASES[case](x), monkeypatch)
    if case == "bitdelta" and dtype == torch.float64:  # the float64 mean: summation orders differ in the last bit
        torch.testing.assert_close(got, ref, rtol=1e-14, atol=0)
    else:
        assert same_bits(got, ref), case


def test_kernels_do_not_depend_on_the_thread_count():
    x = values(torch.float32, n=1 << 18)
    threads = torch.get_num_threads()
    try:
        runs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            runs.append((edits.dare(x, 0.6, generator=gen(5)), native.abs_sum(x[8:]), edits.bitdelta(x[8:])))
    finally:
        torch.set_num_threads(threads)
    assert all(same_bits(r[0], runs[0][0]) and r[1] == runs[0][1] and same_bits(r[2], runs[0][2]) for r in runs)


def _pair(root, dtype):
    g = torch.Generator().manual_seed(0)
    shapes = {"big.weight": (300, 256), "odd.weight": (257, 257), "small.weight": (8, 8)}
    pre = {n: (torch.randn(s, generator=g) * 0.02).to(dtype) for n, s in shapes.items()}
    post = {n: (t.float() + 1e-3 * torch.randn(t.shape, generator=g)).to(dtype) for n, t in pre.items()}
    for side, tensors in (("pre", pre), ("post", post)):
        (root / side).mkdir()
        save_file(tensors, str(root / side / "model.safetensors"))
    return root / "pre", root / "post"


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("compute", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "method,params",
    [("dare", {"p": 0.7, "k": -0.5}), ("dare", {"p": 0.9}), ("drop_only", {"p": 0.4}), ("extrapolate", {"alpha": 0.3})],
)
def test_fused_streaming_step_gives_the_generic_bits(tmp_path, monkeypatch, stored, compute, method, params):
    pre, post = _pair(tmp_path, stored)
    monkeypatch.setattr(deltas, "BLOCK_BYTES", 100_000)  # row blocks with offsets, for the big tensors
    kw = dict(seed=3, compute_dtype=compute, **params)
    fused = load_tensors(deltas.apply_edit(pre, post, method, out=tmp_path / "fused", **kw))
    generic = load_tensors(
        torch_path(lambda: deltas.apply_edit(pre, post, method, out=tmp_path / "gen", **kw), monkeypatch)
    )  # noqa: E501
    assert fused.keys() == generic.keys()
    assert all(same_bits(fused[n], generic[n]) for n in fused)
    monkeypatch.setattr(deltas, "BLOCK_BYTES", 64 << 20)  # whole tensors: the same bits again
    whole = load_tensors(deltas.apply_edit(pre, post, method, out=tmp_path / "whole", **kw))
    assert all(same_bits(whole[n], generic[n]) for n in fused)


def test_fused_step_names_the_tensor_and_rows_of_a_nan(tmp_path, monkeypatch):
    pre, post = _pair(tmp_path, torch.float32)
    tensors = load_tensors(post)
    tensors["big.weight"][250, 3] = math.nan
    save_file(tensors, str(post / "model.safetensors"))
    monkeypatch.setattr(deltas, "BLOCK_BYTES", 100_000)
    messages = []
    for native_on in ("1", "0"):
        monkeypatch.setenv("UNIFIEDDELTA_NATIVE", native_on)
        with pytest.raises(NonFiniteError) as err:
            deltas.apply_edit(pre, post, "dare", p=0.5, compute_dtype=torch.float32, out=tmp_path / f"o{native_on}")
        messages.append(str(err.value))
        assert not (tmp_path / f"o{native_on}").exists()
    assert messages[0] == messages[1] and "'big.weight'" in messages[0] and "1 NaN/Inf" in messages[0]


def test_a_missing_compiler_warns_once_and_torch_does_the_same_math(monkeypatch, tmp_path):
    x = values(torch.float32)
    ref = edits.dare(x, 0.5, generator=gen(6))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("UNIFIEDDELTA_CACHE", str(tmp_path / "cache"))  # no kernels built here yet
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", [])
    with pytest.warns(RuntimeWarning, match="could not be built"):
        got = edits.dare(x, 0.5, generator=gen(6))
    assert same_bits(got, ref)
    assert native.library() is None  # no second attempt, no second warning


def test_a_forked_child_makes_its_own_thread_pool(monkeypatch):
    x = values(torch.float32)
    ref = edits.dare(x, 0.5, generator=gen(7))  # the thread pool exists now
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: no pool")
    parent_pool = native._pool[0]
    # a child of os.fork inherits the pool object but none of its threads: the pid tells it apart
    monkeypatch.setattr(native, "_pool", (parent_pool, -1))
    assert same_bits(edits.dare(x, 0.5, generator=gen(7)), ref)
    assert native._pool[0] is not parent_pool


def _blocks_reference(x, bits, scale):
    """Multi-bit BitDelta in float64 by a stable sort: block j holds sorted positions ceil(j·n/B) ..
    ceil((j+1)·n/B) − 1."""
    flat = x.reshape(-1).double()
    n = flat.numel()
    nblocks = min(2**bits, n)
    values, order = torch.sort(flat.abs(), stable=True)
    starts = [-(-j * n // nblocks) for j in range(nblocks + 1)]
    out = torch.empty(n, dtype=torch.float64)
    for j in range(nblocks):
        out[order[starts[j] : starts[j + 1]]] = values[starts[j] : starts[j + 1]].mean() * scale
    return (torch.sign(flat) * out).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [1, 3, 5, 9])
def test_block_means_match_a_stable_sort(dtype, bits):
    g = torch.Generator().manual_seed(bits)
    x = (0.01 * torch.randn(600, 301, generator=g)).to(dtype)
    x[0, :40] = 0.0  # zeros stay zero
    x[1, : 500 if bits < 9 else 50] = x[1, 0]  # a run of ties across block boundaries, placed in index order
    got = native.block_means(x, bits, 1.25)
    want = _blocks_reference(x, bits, 1.25)
    tol = {torch.float32: 3e-7, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=0)
    assert got.dtype == dtype and (got[0, :40] == 0).all()


def test_block_means_do_not_depend_on_threads_and_match_the_torch_path(monkeypatch):
    x = 0.01 * torch.randn(700, 600, generator=torch.Generator().manual_seed(3))
    runs = []
    for threads in (1, 2, 3):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runs.append(edits.bitdelta(x, 4, scale=0.9))
        finally:
            torch.set_num_threads(old)
    assert all(torch.equal(r, runs[0]) for r in runs)
    slow = torch_path(lambda: edits.bitdelta(x, 4, scale=0.9), monkeypatch)
    torch.testing.assert_close(runs[0], slow, rtol=2e-7, atol=0)
    y = x.clone()
    y[5, 5] = float("nan")
    assert native.block_means(y, 4, 1.0) is None  # non-finite: the sort path decides
