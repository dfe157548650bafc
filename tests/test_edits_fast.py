"""The fast paths of ``unifieddelta.edits`` on tensors large enough to take them: selection instead of sorting
(magnitude trim), the randomized SVD option of low_rank. References are sorts and exact SVDs."""

import math

import pytest
import torch
from helpers import rand

from unifieddelta import edits
from unifieddelta.errors import InvalidParameterError


def ref_trim(delta, keep):
    """Keep the round(keep·n) largest |Δ|, ties in index order: a stable sort by descending magnitude."""
    flat = delta.reshape(-1)
    count = math.floor(keep * flat.numel() + 0.5)
    order = torch.sort(-flat.abs(), stable=True).indices[:count]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(delta.shape)


@pytest.mark.parametrize("keep", [1e-5, 0.1, 0.5, 0.9, 0.99999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_magnitude_trim_by_selection_matches_a_sort(keep, dtype):
    delta = rand(700, 500, seed=1, dtype=dtype)  # 350k entries: the sampled bracket is used
    assert torch.equal(edits.magnitude_trim(delta, keep), ref_trim(delta, keep))


@pytest.mark.parametrize("keep", [0.1, 0.37, 0.8])
def test_magnitude_trim_ties_are_kept_in_index_order(keep):
    delta = torch.round(rand(400, 400, seed=2) * 4) / 4  # few distinct values: many ties at the threshold
    got = edits.magnitude_trim(delta, keep)
    assert torch.equal(got, ref_trim(delta, keep))


def test_kth_largest_magnitude_is_exact_with_ties_and_structure():
    values = torch.cat([torch.zeros(300_000), torch.arange(1, 1001, dtype=torch.float32)])
    values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(3))]
    values[::2] *= -1
    ordered = torch.sort(values.abs(), descending=True).values
    for count in [1, 999, 1000, 1001, 150_000, values.numel()]:
        value, at_least = edits._kth_largest_magnitude(values, count)
        assert value == ordered[count - 1] and at_least == int((values.abs() >= value).sum())
    assert values.abs().max() == 1000  # the input is untouched


def test_randomized_low_rank_is_exact_on_a_rank_r_matrix_and_deterministic():
    delta = rand(300, 8, seed=4) @ rand(8, 200, seed=5)
    got = edits.low_rank(delta, 8, svd="randomized")
    torch.testing.assert_close(got, delta, rtol=1e-9, atol=1e-10)
    assert torch.equal(got, edits.low_rank(delta, 8, svd="randomized"))


def test_randomized_low_rank_error_is_close_to_the_optimum():
    u = torch.linalg.qr(rand(400, 400, seed=6)).Q
    v = torch.linalg.qr(rand(300, 300, seed=7)).Q
    s = 0.9 ** torch.arange(300, dtype=torch.float64)  # a decaying spectrum, like a fine-tuning delta's
    delta = (u[:, :300] * s) @ v.T
    best = torch.linalg.norm(edits.low_rank(delta, 20) - delta)
    fast = torch.linalg.norm(edits.low_rank(delta, 20, svd="randomized") - delta)
    assert best <= fast <= 1.01 * best


def test_low_rank_svd_option_is_checked():
    with pytest.raises(InvalidParameterError, match="svd must be"):
        edits.low_rank(rand(4, 3), 1, svd="fast")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.5, -0.3, 1e-3, 7.25, -1.0, 1 / 3])
def test_half_precision_extrapolation_equals_the_float32_computation(dtype, alpha):
    g = torch.Generator().manual_seed(8)
    values = torch.cat(
        [
            torch.randn(200_000, generator=g) * 10.0 ** torch.randint(-9, 5, (200_000,), generator=g),
            torch.tensor([0.0, -0.0, 6e-8, 65504.0, 3e38]),
        ]
    ).to(dtype)
    values = values[torch.isfinite(values)]  # deltas are finite (the editor refuses others)
    assert torch.equal(edits.extrapolate(values, alpha), (values.float() * (1.0 + alpha)).to(dtype))
