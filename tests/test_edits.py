"""Each edit of ``unifieddelta.edits`` against an independent reference: float64 element loops, analytic cases,
statistics over seeds, peft's merge utilities; plus property tests over shapes and dtypes."""

import math

import numpy as np
import pytest
import torch
from helpers import gen, rand
from hypothesis import given, settings
from hypothesis import strategies as st

from unifieddelta import edits
from unifieddelta.errors import InvalidParameterError, MismatchError

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _peft():
    """peft's merge utilities (the cross-checks skip without peft, and fail instead under UNIFIEDDELTA_STRICT)."""
    import os

    if os.environ.get("UNIFIEDDELTA_STRICT"):
        import peft.utils.merge_utils as merge_utils

        return merge_utils
    return pytest.importorskip("peft.utils.merge_utils")


def flat(t):
    return t.reshape(-1).tolist()


# --- references: plain Python loops over elements, in float64 -----------------------------------------------


M32 = 0xFFFFFFFF


def ref_uniforms(n, generator, offset=0):
    """DARE's documented stream, entry by entry in Python integers: u_i = (H(i) >> 8) / 2^24 with
    H(i) = lowbias32(lowbias32(i mod 2^31 ^ k0) ^ (k1 + i div 2^31)), (k0, k1) one randint draw of the generator."""
    k0, k1 = torch.randint(0, 2**32, (2,), generator=generator).tolist()

    def lowbias32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & M32
        x ^= x >> 15
        x = (x * 0x846CA68B) & M32
        return x ^ (x >> 16)

    return [
        (lowbias32(lowbias32((i % 2**31) ^ k0) ^ ((k1 + i // 2**31) & M32)) >> 8) / 2**24
        for i in range(offset, offset + n)
    ]


def ref_mask(shape, p, generator, offset=0):
    return torch.tensor([u < p for u in ref_uniforms(math.prod(shape), generator, offset)]).reshape(shape)


def ref_masked_rescale(delta, mask, p, k):
    out = [(k * d if m else (1 - k * p) / (1 - p) * d) for d, m in zip(flat(delta), flat(mask))]
    return torch.tensor(out, dtype=torch.float64).reshape(delta.shape)


def ref_bitdelta(delta, bits, scale=1.0):
    values = flat(delta)
    n = len(values)
    order = sorted(range(n), key=lambda i: (abs(values[i]), i))
    blocks = min(2**bits, n)
    members = [[] for _ in range(blocks)]
    for rank, i in enumerate(order):
        members[rank * blocks // n].append(i)
    out = [0.0] * n
    for idx in members:
        if idx:
            mean = sum(abs(values[i]) for i in idx) / len(idx)
            for i in idx:
                out[i] = scale * mean * (values[i] > 0) - scale * mean * (values[i] < 0)
    return torch.tensor(out, dtype=torch.float64).reshape(delta.shape)


# --- DARE and its family ------------------------------------------------------------------------------------


@pytest.mark.parametrize("p,k", [(0.3, 0.0), (0.7, 0.5), (0.5, -1.0), (0.9, 0.8)])
def test_dare_matches_loop_given_the_same_draws(p, k):
    delta = rand(7, 5, seed=1)
    mask = ref_mask(delta.shape, p, gen(4))  # the stream dare draws from the same generator
    got = edits.dare(delta, p, k, generator=gen(4))
    torch.testing.assert_close(got, ref_masked_rescale(delta, mask, p, k), rtol=1e-15, atol=0)


@pytest.mark.parametrize("p,k", [(0.5, 0.0), (0.9, 0.0), (0.3, -1.0), (0.6, 0.5)])
def test_dare_keeps_the_expected_delta(p, k):
    delta = rand(40, seed=2)
    seeds = 3000
    draws = torch.stack([edits.dare(delta, p, k, generator=gen(s)) for s in range(seeds)])
    # Per entry: F = k·Δ w.p. p, (1−kp)/(1−p)·Δ otherwise; var = Δ²(1−k)²p/(1−p).
    std = delta.abs() * abs(1 - k) * math.sqrt(p / (1 - p)) / math.sqrt(seeds)
    assert ((draws.mean(0) - delta).abs() <= 5 * std + 1e-12).all()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_drop_rate_is_p(p):
    delta = rand(400, 500, seed=3).abs() + 0.1  # no zeros, so dropped entries are exactly the zeros
    frac = (edits.dare(delta, p, generator=gen(5)) == 0).double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / delta.numel())


def test_dare_negative_k_flips_the_dropped_signs():
    delta = rand(1000, seed=6)
    got = edits.dare(delta, 0.4, -1.0, generator=gen(7))
    mask = ref_mask(delta.shape, 0.4, gen(7))
    assert torch.equal(got[mask], -delta[mask])
    assert (torch.sign(got[~mask]) == torch.sign(delta[~mask])).all()


def test_drop_only_matches_loop_and_does_not_rescale():
    delta = rand(9, 4, seed=8)
    mask = ref_mask(delta.shape, 0.6, gen(1))
    ref = torch.tensor([0.0 if m else d for d, m in zip(flat(delta), flat(mask))], dtype=torch.float64)
    assert torch.equal(edits.drop_only(delta, 0.6, generator=gen(1)), ref.reshape(delta.shape))
    assert torch.equal(edits.drop_only(delta, 1.0, generator=gen(1)), torch.zeros_like(delta))


def test_stream_matches_reference_across_the_2_31_boundary_and_in_blocks():
    start = 2**31 - 300  # the counter's low word wraps inside this stretch
    got = edits.uniform_bits(600, edits.stream_key(gen(3)), offset=start)
    assert got.tolist() == [int(u * 2**24) for u in ref_uniforms(600, gen(3), offset=start)]
    delta = rand(50, 40, seed=4)
    whole = edits.dare(delta, 0.6, 0.5, generator=gen(9))
    blocks = [edits.dare(delta[r : r + 7], 0.6, 0.5, generator=gen(9), offset=r * 40) for r in range(0, 50, 7)]
    assert torch.equal(torch.cat(blocks), whole)
    big = rand(4, seed=5)
    torch.testing.assert_close(
        edits.dare(big, 0.5, generator=gen(2), offset=start),
        ref_masked_rescale(big, ref_mask(big.shape, 0.5, gen(2), start), 0.5, 0.0),
        rtol=1e-15,
        atol=0,
    )


def test_stream_is_uniform_and_independent_across_keys_and_neighbours():
    n = 1 << 18
    a = edits.uniform_bits(n, edits.stream_key(gen(1))).double() / 2**24
    b = edits.uniform_bits(n, edits.stream_key(gen(2))).double() / 2**24
    counts = torch.histc(a, bins=64, min=0, max=1)
    chi2 = (((counts - n / 64) ** 2) / (n / 64)).sum().item()
    assert chi2 < 63 + 5 * math.sqrt(2 * 63)  # chi-square with 63 degrees of freedom, 5 sigma
    for x, y in [(a, b), (a[:-1], a[1:]), (a[:-1024], a[1024:])]:  # other key; next entry; next row of 1024
        r = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(x.numel())


def test_dare_with_peft_mask_matches_peft_random_pruning():
    peft_merge = _peft()
    delta = rand(30, 20, seed=9).abs() + 0.01
    p = 0.7
    torch.manual_seed(11)
    pruned = peft_merge.random_pruning(delta, density=1 - p, rescale=True)
    dropped = pruned == 0  # peft's Bernoulli mask (delta has no zeros)
    torch.testing.assert_close(edits.masked_rescale(delta, dropped, p, 0.0), pruned, rtol=1e-14, atol=0)


@pytest.mark.parametrize("k", [0.5, 0.9, 1.5, -1.0])
def test_sign_biased_matches_loop(k):
    delta = rand(6, 8, seed=10)
    neg = delta < 0
    p = neg.double().mean().item()
    torch.testing.assert_close(edits.sign_biased(delta, k), ref_masked_rescale(delta, neg, p, k), rtol=1e-15, atol=0)


@pytest.mark.parametrize("k", [0.5, 1.3])
def test_product_biased_matches_loop(k):
    delta, grad = rand(5, 7, seed=11), rand(5, 7, seed=12)
    neg = (delta * grad) < 0
    p = neg.double().mean().item()
    got = edits.product_biased(delta, grad, k)
    torch.testing.assert_close(got, ref_masked_rescale(delta, neg, p, k), rtol=1e-15, atol=0)


def test_biased_edits_with_every_entry_negative_are_finite():
    delta = -rand(10, seed=13).abs() - 0.1
    torch.testing.assert_close(edits.sign_biased(delta, 0.5), 0.5 * delta)
    torch.testing.assert_close(edits.product_biased(delta, torch.ones_like(delta), 0.5), 0.5 * delta)


def test_product_biased_needs_a_gradient_of_the_same_shape():
    with pytest.raises(MismatchError):
        edits.product_biased(rand(3, 4), rand(4, 3), 0.5)


# --- BitDelta -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,scale", [(0, 1.0), (0, 2.5), (1, 1.0), (2, 0.5), (3, 1.0)])
def test_bitdelta_matches_loop(bits, scale):
    delta = rand(11, 7, seed=14)
    delta[0, :3] = 0.0  # zeros keep sign 0
    torch.testing.assert_close(
        edits.bitdelta(delta, bits, scale=scale), ref_bitdelta(delta, bits, scale), rtol=1e-13, atol=1e-15
    )


def test_bitdelta_one_bit_is_mean_magnitude_times_sign():
    delta = torch.tensor([[0.5, -1.0], [2.0, -0.5]], dtype=torch.float64)
    assert torch.equal(edits.bitdelta(delta), torch.tensor([[1.0, -1.0], [1.0, -1.0]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitdelta_reproduces_delta_when_each_block_has_one_entry(dtype):
    delta = rand(4, 8, seed=15, dtype=dtype)  # 32 entries, 2^5 blocks
    assert torch.equal(edits.bitdelta(delta, 5), delta)
    assert torch.equal(edits.bitdelta(delta, 9), delta)


def test_bitdelta_equal_count_blocks():
    delta = torch.arange(1, 13, dtype=torch.float64)  # 12 entries into 4 blocks of 3
    expected = torch.tensor([2.0] * 3 + [5.0] * 3 + [8.0] * 3 + [11.0] * 3, dtype=torch.float64)
    assert torch.equal(edits.bitdelta(delta, 2), expected)


@pytest.mark.parametrize("magnitudes", ["normal", "uniform"])
def test_bitdelta_random_magnitudes_keep_the_mean(magnitudes):
    delta = rand(300, 300, seed=16)
    delta[0, :7] = 0.0  # entries post-training left alone stay alone
    scale = 1.5
    got = edits.bitdelta(delta, scale=scale, magnitudes=magnitudes, generator=gen(3))
    target = scale * delta.abs().mean()
    signed = got * torch.sign(delta)  # the magnitude drawn for each entry, with the delta's sign removed
    moved = delta != 0
    assert (signed[moved] >= 0).all()  # a magnitude: no sign is ever flipped
    assert (got[~moved] == 0).all()
    assert float(signed[moved].mean()) == pytest.approx(float(target), rel=1e-12)  # the mean, exactly
    # the spread is that of the distribution drawn (folded normal |1 + z|, or uniform), relative to its mean
    expected = {"normal": 0.6853, "uniform": 0.5774}[magnitudes]
    assert float(signed[moved].std() / signed[moved].mean()) == pytest.approx(expected, abs=0.01)
    assert torch.equal(got, edits.bitdelta(delta, scale=scale, magnitudes=magnitudes, generator=gen(3)))
    assert not torch.equal(got, edits.bitdelta(delta, scale=scale, magnitudes=magnitudes, generator=gen(4)))


# --- low rank -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,r", [((12, 9), 3), ((5, 20), 2), ((16, 16), 1)])
def test_low_rank_is_exact_on_a_rank_r_matrix(shape, r):
    m, n = shape
    delta = rand(m, r, seed=17) @ rand(r, n, seed=18)
    torch.testing.assert_close(edits.low_rank(delta, r), delta, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 3, 0.5])
def test_low_rank_equals_the_truncated_svd(rank):
    delta = rand(10, 6, seed=19)
    r = rank if isinstance(rank, int) else 3
    u, s, vt = np.linalg.svd(delta.numpy())
    ref = sum(s[i] * np.outer(u[:, i], vt[i]) for i in range(r))
    got = edits.low_rank(delta, rank)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)
    # Eckart–Young: the error is the norm of the dropped singular values.
    assert abs(np.linalg.norm(got.numpy() - delta.numpy()) - np.sqrt((s[r:] ** 2).sum())) < 1e-10


def test_low_rank_leaves_vectors_unchanged_and_treats_kernels_as_matrices():
    vec = rand(7, seed=20)
    out = edits.low_rank(vec, 1)
    assert torch.equal(out, vec) and out is not vec
    kernel = rand(4, 3, 2, 2, seed=21)
    ref = edits.low_rank(kernel.reshape(4, 12), 2).reshape(4, 3, 2, 2)
    torch.testing.assert_close(edits.low_rank(kernel, 2), ref)


def test_low_rank_fraction_floors_but_keeps_one():
    assert edits.resolve_rank(0.1, (16, 32)) == 1
    assert edits.resolve_rank(0.5, (16, 32)) == 8
    assert edits.resolve_rank(1.0, (16, 32)) == 16
    assert edits.resolve_rank(3, (16,)) is None


# --- magnitude trim and extrapolation -----------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.1, 0.25, 0.5, 0.9, 1.0])
def test_magnitude_trim_keeps_exactly_the_top_fraction(keep):
    delta = rand(8, 10, seed=22)  # continuous values: no ties
    got = edits.magnitude_trim(delta, keep)
    values = flat(delta)
    count = math.floor(keep * len(values) + 0.5)
    top = set(sorted(range(len(values)), key=lambda i: -abs(values[i]))[:count])
    ref = torch.tensor([v if i in top else 0.0 for i, v in enumerate(values)], dtype=torch.float64)
    assert torch.equal(got, ref.reshape(delta.shape))


@pytest.mark.parametrize("keep", [0.1, 0.2, 0.5, 0.8])
def test_magnitude_trim_matches_peft_magnitude_pruning(keep):
    peft_merge = _peft()
    delta = rand(20, 10, seed=23, dtype=torch.float32)  # keep·200 is an integer: peft's int() = our round()
    assert torch.equal(edits.magnitude_trim(delta, keep), peft_merge.magnitude_based_pruning(delta, keep))


@pytest.mark.parametrize("alpha", [-1.0, -0.3, 0.0, 0.5])
def test_extrapolate_matches_loop(alpha):
    delta = rand(4, 6, seed=24)
    ref = torch.tensor([(1 + alpha) * d for d in flat(delta)], dtype=torch.float64).reshape(delta.shape)
    assert torch.equal(edits.extrapolate(delta, alpha), ref)


# --- the Gaussian perturbation ------------------------------------------------------------------------------


def test_gaussian_noise_has_the_asked_size_and_no_direction():
    delta = rand(400, 500, seed=31, dtype=torch.float64)
    d = edits.gaussian(delta, 0.25, generator=gen(3)) - delta
    rms = delta.pow(2).mean().sqrt()
    z = (d / (0.25 * rms)).flatten()
    # 200k standard normal draws: mean within 5 standard errors of 0, variance within 1%, no correlation with delta
    assert abs(z.mean().item()) < 5 / len(z) ** 0.5
    assert abs(z.var().item() - 1.0) < 0.01
    assert abs(torch.corrcoef(torch.stack([z, delta.flatten()]))[0, 1].item()) < 5 / len(z) ** 0.5
    assert abs(torch.linalg.norm(d).item() / torch.linalg.norm(delta).item() - 0.25) < 0.0025


def test_gaussian_is_seeded_exact_at_zero_and_checks_sigma():
    delta = rand(30, 20, seed=32)
    assert torch.equal(edits.gaussian(delta, 0.5, generator=gen(1)), edits.gaussian(delta, 0.5, generator=gen(1)))
    assert not torch.equal(edits.gaussian(delta, 0.5, generator=gen(1)), edits.gaussian(delta, 0.5, generator=gen(2)))
    assert torch.equal(edits.gaussian(delta, 0.0, generator=gen(1)), delta)
    assert torch.equal(edits.gaussian(torch.zeros(4, 4), 1.0, generator=gen(1)), torch.zeros(4, 4))
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(InvalidParameterError, match="sigma"):
            edits.gaussian(delta, bad, generator=gen(1))


# --- dtypes, purity, registry -------------------------------------------------------------------------------

ALL_EDITS = {
    "dare": lambda d, g: edits.dare(d, 0.5, 0.3, generator=g),
    "drop_only": lambda d, g: edits.drop_only(d, 0.5, generator=g),
    "bitdelta": lambda d, g: edits.bitdelta(d, 2, scale=1.2),
    "bitdelta_normal": lambda d, g: edits.bitdelta(d, magnitudes="normal", generator=g),
    "low_rank": lambda d, g: edits.low_rank(d, 0.5),
    "magnitude_trim": lambda d, g: edits.magnitude_trim(d, 0.3),
    "extrapolate": lambda d, g: edits.extrapolate(d, 0.4),
    "gaussian": lambda d, g: edits.gaussian(d, 0.3, generator=g),
    "sign_biased": lambda d, g: edits.sign_biased(d, 0.7),
    "product_biased": lambda d, g: edits.product_biased(d, torch.ones_like(d), 0.7),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["dare", "bitdelta", "low_rank", "extrapolate", "sign_biased", "gaussian"])
def test_half_precision_is_computed_in_float32(name, dtype):
    delta = rand(6, 5, seed=25, dtype=dtype)
    got = ALL_EDITS[name](delta, gen(1))
    ref = ALL_EDITS[name](delta.float(), gen(1)).to(dtype)  # compute in float32, round once
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), name=st.sampled_from(sorted(ALL_EDITS)), seed=st.integers(0, 2**16))
def test_property_shape_dtype_purity(shape, dtype, name, seed):
    delta = rand(*shape, seed=seed, dtype=dtype)
    before = delta.clone()
    out = ALL_EDITS[name](delta, gen(seed))
    assert out.shape == delta.shape and out.dtype == delta.dtype
    assert torch.equal(delta, before)  # never modifies its input
    assert out.data_ptr() != delta.data_ptr()
    assert torch.isfinite(out.float()).all()


@settings(max_examples=40, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_property_identity_edits_are_bit_for_bit(shape, dtype, seed):
    delta = rand(*shape, seed=seed, dtype=dtype)
    assert torch.equal(edits.dare(delta, 0.0, 0.7, generator=gen(seed)), delta)
    assert torch.equal(edits.extrapolate(delta, 0.0), delta)
    assert torch.equal(edits.magnitude_trim(delta, 1.0), delta)
    assert torch.equal(edits.bitdelta(delta, 10), delta)  # at most 216 entries: one per block
    assert torch.equal(edits.drop_only(delta, 0.0, generator=gen(seed)), delta)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 8), n=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_property_low_rank_full_rank_and_monotone_error(m, n, seed):
    delta = rand(m, n, seed=seed)
    torch.testing.assert_close(edits.low_rank(delta, min(m, n)), delta, rtol=1e-10, atol=1e-12)
    errors = [torch.linalg.norm(edits.low_rank(delta, r) - delta).item() for r in range(min(m, n) + 1)]
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:]))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), keep=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_property_magnitude_trim_count_and_threshold(n, keep, seed):
    delta = rand(n, seed=seed)
    got = edits.magnitude_trim(delta, keep)
    kept = got != 0
    assert kept.sum().item() == math.floor(keep * n + 0.5)
    if kept.any() and (~kept).any():
        assert delta[kept].abs().min() >= delta[~kept].abs().max()


def test_registry_declares_what_the_driver_needs():
    assert set(edits.EDITS) == {
        "dare",
        "drop_only",
        "bitdelta",
        "low_rank",
        "magnitude_trim",
        "extrapolate",
        "sign_biased",
        "product_biased",
        "gaussian",
    }
    assert all(edits.EDITS[name].fn.__name__ == name for name in edits.EDITS)
    seeded = {
        m
        for m, s in edits.EDITS.items()
        if s.seeded(edits.with_defaults(m, {"p": 0.5, "keep": 0.5, "rank": 1, "alpha": 0.1, "k": 0.5, "sigma": 0.1}))
    }
    assert seeded == {"dare", "drop_only", "gaussian"}  # BitDelta draws only for random magnitudes
    assert edits.spec("bitdelta").seeded({"magnitudes": "uniform"})
    assert {m for m, s in edits.EDITS.items() if s.entrywise} == {"dare", "drop_only", "extrapolate"}
    assert {m for m, s in edits.EDITS.items() if s.needs_grad} == {"product_biased"}
    assert edits.get_method("product_biased") is edits.product_biased
    assert set(edits.method_params("dare")) == {"p", "k"}
    assert edits.with_defaults("dare", {"p": 0.5}) == {"p": 0.5, "k": 0.0}
    with pytest.raises(InvalidParameterError, match="unknown method 'tiesx'"):
        edits.get_method("tiesx")


@pytest.mark.parametrize(
    "method,params,match",
    [
        ("dare", {"q": 0.5}, "unknown parameter"),
        ("dare", {}, "missing parameter"),
        ("dare", {"p": 1.0}, r"p must"),
        ("low_rank", {"rank": -1}, "rank"),
        ("bitdelta", {"bits": 2, "magnitudes": "normal"}, "bits=0"),
    ],
)
def test_check_settings_names_the_method_and_the_setting(method, params, match):
    with pytest.raises(InvalidParameterError, match=match) as info:
        edits.check_settings(method, params)
    assert str(info.value).startswith(method)


def test_low_rank_fits_checks_the_rank_against_the_shape():
    edits.check_settings("low_rank", {"rank": 8}, (8, 16))
    with pytest.raises(InvalidParameterError, match="exceeds"):
        edits.check_settings("low_rank", {"rank": 9}, (8, 16))


@pytest.mark.parametrize("entrywise", [m for m, s in edits.EDITS.items() if s.fused is not None])
def test_every_fused_edit_is_entrywise(entrywise):
    assert edits.EDITS[entrywise].entrywise  # the fused step runs on row blocks too


@pytest.mark.parametrize("p,k", [(0.3, 0.0), (0.7, -1.0), (0.5, 0.8)])
def test_dare_is_masked_rescale_with_the_stream_mask(p, k):
    delta = rand(70, 50, seed=4)
    mask = edits.dare_mask(delta.shape, p, gen(6))
    assert torch.equal(edits.dare(delta, p, k, generator=gen(6)), edits.masked_rescale(delta, mask, p, k))
    big = rand(300, 250, seed=5)  # the C kernel (>= 65,536 entries)
    assert torch.equal(
        edits.dare(big, p, k, generator=gen(7)), edits.masked_rescale(big, edits.dare_mask(big.shape, p, gen(7)), p, k)
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda d: edits.dare(d, 1.0),
        lambda d: edits.dare(d, -0.1),
        lambda d: edits.dare(d, float("nan")),
        lambda d: edits.dare(d, 0.5, k=float("inf")),
        lambda d: edits.drop_only(d, 1.5),
        lambda d: edits.magnitude_trim(d, 0.0),
        lambda d: edits.magnitude_trim(d, 1.01),
        lambda d: edits.low_rank(d, 5),
        lambda d: edits.low_rank(d, 0.0),
        lambda d: edits.low_rank(d, -1),
        lambda d: edits.bitdelta(d, -1),
        lambda d: edits.bitdelta(d, 1.5),
        lambda d: edits.bitdelta(d, scale=-1.0),
        lambda d: edits.bitdelta(d, magnitudes="cauchy"),
        lambda d: edits.bitdelta(d, 2, magnitudes="normal"),
        lambda d: edits.extrapolate(d, float("nan")),
        lambda d: edits.extrapolate(d.long(), 0.5),
        lambda d: edits.dare(d.long(), 0.5),
        lambda d: edits.dare(d, 0.5, offset=-1),
        lambda d: edits.drop_only(d, 0.5, offset=2.0),
    ],
    ids=[
        "p=1",
        "p<0",
        "p=nan",
        "k=inf",
        "drop p>1",
        "keep=0",
        "keep>1",
        "rank>min",
        "rank=0.0",
        "rank<0",
        "bits<0",
        "bits float",
        "scale<0",
        "magnitudes",
        "bits+random",
        "alpha nan",
        "integer delta",
        "integer dare",
        "offset<0",
        "offset float",
    ],
)
def test_parameters_out_of_range_raise(call):
    with pytest.raises(InvalidParameterError):
        call(rand(4, 3))


@pytest.mark.parametrize(
    "method,params",
    [
        ("dare", {"p": 0.5}),
        ("drop_only", {"p": 0.5}),
        ("bitdelta", {}),
        ("magnitude_trim", {"keep": 0.5}),
        ("extrapolate", {"alpha": 0.5}),
    ],
)
def test_a_0d_delta_is_edited_like_a_one_entry_tensor(method, params):
    scalar = torch.tensor(0.3, dtype=torch.float64)
    extra = {"generator": gen(3)} if edits.spec(method).seeded(params) else {}
    got = edits.get_method(method)(scalar, **params, **extra)
    one = edits.get_method(method)(scalar.reshape(1), **params, **({"generator": gen(3)} if extra else {}))
    assert got.shape == () and got.dtype == scalar.dtype and torch.equal(got.reshape(1), one)


def test_random_masks_do_not_depend_on_the_delta_dtype():
    delta = rand(50, 40, seed=26).abs() + 0.1
    masks = [edits.dare(delta.to(dt), 0.37, generator=gen(8)) == 0 for dt in DTYPES]
    assert all(torch.equal(m, masks[0]) for m in masks)
