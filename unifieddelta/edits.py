"""Editing operations on one delta tensor: ``ΔW`` in, the edited delta ``F(ΔW)`` out.

Each function is pure: it never modifies its input, returns a tensor of the input's shape and dtype, and
computes in float32 or better (float64 stays float64; bf16 and fp16 are promoted) so that half-precision
checkpoints are not edited in half precision. Random edits take a ``torch.Generator``; the caller derives it
from (seed, tensor name) so results do not depend on order, sharding or threads (see ``deltas.tensor_generator``).
DARE's masks come from a counter-based stream keyed by that generator (:func:`uniform_bits`), so a tensor edited
in row blocks gives the same bits as edited whole, and the mask costs a few integer operations per entry, fused
with the rescale into one pass over memory: large CPU tensors run the C twins (``native.py``) of the ``_*_kernel``
functions here, which give the same bits.
The methods never know where tensors come from: loading and writing checkpoints lives in ``deltas.py``.

The paper's unified view in one line: the edited model is ``W_post + D`` with ``D = F(ΔW) − ΔW``; DARE,
its sign-flipping extension and the "biased" variants of Table 1 are all :func:`masked_rescale` with a
different mask. The biased ones call it; DARE and drop-only compute ``masked_rescale(Δ, dare_mask(...), p, k)``
in one fused pass (the mask is never materialised), which gives the same bits (``tests/test_edits.py``).

Where each formula lives: DARE and its k-family (paper Eqs. 2-3, §4.2) :func:`dare`; drop-only :func:`drop_only`;
Table 1 :func:`sign_biased`, :func:`product_biased`; BitDelta and its multi-bit and random-magnitude extensions
(Eqs. 7-8, §5.3) :func:`bitdelta`; Twin-Merging's SVD (Eq. 10) :func:`low_rank`; TIES' trim (Eq. 10)
:func:`magnitude_trim`; EXPO and interpolation (Eqs. 13-14) :func:`extrapolate`; a random perturbation of a given
size, no method of the paper but the test of what the term predicts, :func:`gaussian`. The registry at the end
(:data:`EDITS`) says what the checkpoint driver needs to know about each.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import native
from .errors import InvalidParameterError, MismatchError

#: Tensors with at least this many entries run the C kernels (``native.py``); smaller ones run torch (same bits).
NATIVE_MIN_NUMEL = 1 << 16

__all__ = [
    "masked_rescale",
    "uniform_bits",
    "dare_mask",
    "stream_key",
    "stream_threshold",
    "rescale_factor",
    "dare",
    "drop_only",
    "bitdelta",
    "low_rank",
    "resolve_rank",
    "magnitude_trim",
    "extrapolate",
    "sign_biased",
    "product_biased",
    "EditSpec",
    "EDITS",
    "spec",
    "get_method",
    "method_params",
    "check_settings",
    "with_defaults",
]


# --- helpers -------------------------------------------------------------------------------------------------


def _check_float(delta: torch.Tensor) -> None:
    """An ``InvalidParameterError`` unless delta is a floating-point tensor (no copy made)."""
    if not isinstance(delta, torch.Tensor) or not delta.is_floating_point():
        raise InvalidParameterError(
            f"delta must be a floating-point tensor, got {getattr(delta, 'dtype', type(delta).__name__)}"
        )


def _work(delta: torch.Tensor) -> torch.Tensor:
    """The delta in its compute dtype: float32 or better (float64 input stays float64)."""
    _check_float(delta)
    return delta.to(torch.promote_types(delta.dtype, torch.float32))


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameterError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _in_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    value = _finite(name, value)
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise InvalidParameterError(f"{name} must be in {interval}, got {value!r}")
    return value


def _draw(sampler: Callable[..., torch.Tensor], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """float32 ``sampler`` numbers (torch.rand, torch.randn) of like's shape on like's device, drawn on the
    generator's device: a seed means the same numbers (and masks) whatever the delta's device or dtype."""
    device = generator.device if generator is not None else like.device
    return sampler(like.shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


# --- the random stream of DARE's masks ----------------------------------------------------------------------
#
# Entry i (row-major index in the whole tensor) gets the 24-bit uniform  u_i = (H(i) >> 8) / 2^24  with
#     H(i) = mix(mix(lo ^ k0) ^ (k1 + hi)),   lo = i mod 2^31,  hi = i div 2^31,   all arithmetic mod 2^32,
# mix = Chris Wellons' "lowbias32" integer hash, and (k0, k1) two 32-bit words drawn once from the generator
# (:func:`stream_key`). A counter-based stream: any block of a tensor can be drawn on its own (``offset``), in
# any order, on any number of threads or devices, with the same result, at the cost of ~20 integer operations
# per entry (a Mersenne-Twister ``torch.rand`` is sequential: 20x the time of a copy on 2 cores).

_U32 = 0xFFFFFFFF


def _i32(value: int) -> int:
    """A 32-bit word as the signed int32 torch stores it."""
    value &= _U32
    return value - (1 << 32) if value >= 1 << 31 else value


_MIX_A, _MIX_B = _i32(0x7FEB352D), _i32(0x846CA68B)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 tensors holding 32-bit words (``& mask`` after ``>>``: a logical shift)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MIX_A  # wraps mod 2^32
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MIX_B
    return x ^ ((x >> 16) & 0xFFFF)


def stream_key(generator: torch.Generator | None) -> tuple[int, int]:
    """The two 32-bit words (k0, k1) keying a tensor's stream: one draw from the generator (global RNG if None)."""
    device = generator.device if generator is not None else "cpu"
    k0, k1 = torch.randint(0, 1 << 32, (2,), generator=generator, device=device, dtype=torch.int64).tolist()
    return k0, k1


def _pieces(offset: int, n: int):
    """Split the counters offset .. offset+n−1 where i div 2^31 changes: (start within the block, length, lo, hi)."""
    start = 0
    while start < n:
        i = offset + start
        lo, hi = i & 0x7FFFFFFF, i >> 31
        length = min(n - start, (1 << 31) - lo)
        yield start, length, lo, hi
        start += length


def _bits_kernel(like: torch.Tensor, lo: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    i = torch.arange(like.numel(), dtype=torch.int32, device=like.device) + lo
    return (_mix(_mix(i ^ k0) ^ k1) >> 8) & 0xFFFFFF


def uniform_bits(n: int, key: tuple[int, int], offset: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """The stream's 24-bit integers ``floor(u_i·2^24)`` for entries offset .. offset+n−1, as int32."""
    out = torch.empty(n, dtype=torch.int32, device=device)
    for start, length, lo, hi in _pieces(offset, n):
        args = _scalars(device, torch.int32, lo, _i32(key[0]), _i32(key[1] + hi))
        out[start : start + length] = _bits_kernel(out[start : start + length], *args)  # the reference, in torch
    return out


def _scalars(device, dtype, *values) -> list[torch.Tensor]:
    """0-d tensors on the device: the kernels' scalar settings, rounded to the dtype they compute in."""
    return [torch.tensor(v, dtype=dtype, device=device) for v in values]


def dare_mask(
    shape: tuple[int, ...],
    p: float,
    generator: torch.Generator | None = None,
    offset: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """DARE's drop mask M = [u < p] (True: dropped) for a tensor of this shape, from the generator's stream."""
    n = math.prod(shape)
    return (uniform_bits(n, stream_key(generator), offset, device) < stream_threshold(p)).reshape(shape)


def stream_threshold(p: float) -> int:
    """M = [u < p]  ⇔  floor(u·2^24) < ceil(p·2^24) (p·2^24 is exact in binary floating point)."""
    return math.ceil(p * (1 << 24))


def rescale_factor(p: float, k: float = 0.0) -> float:
    """DARE's factor of the kept entries, (1 − k·p)/(1 − p): exactly 1.0 when p = 0 (the identity edit)."""
    return (1.0 - k * p) / (1.0 - p)


def _dare_kernel(delta, lo, k0, k1, thr, keep, k, zero_dropped: bool):
    """One pass: hash → drop mask → rescale. Dropped entries become k·Δ (+0.0 when k = 0), kept ones keep·Δ."""
    drop = _bits_kernel(delta, lo, k0, k1) < thr
    work = delta.reshape(-1).to(keep.dtype)
    kept = work * keep
    out = torch.where(drop, 0.0, kept) if zero_dropped else torch.where(drop, work * k, kept)
    return out.to(delta.dtype)


def _native(*tensors: torch.Tensor) -> bool:
    return tensors[0].numel() >= NATIVE_MIN_NUMEL and native.supports(*tensors)


def _stream_rescale(delta: torch.Tensor, p: float, keep: float, k: float, generator, offset: int) -> torch.Tensor:
    """F(Δ) entry-wise from the stream: k·Δ where u < p, keep·Δ elsewhere (computed in the promoted dtype)."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidParameterError(f"offset must be an integer >= 0, got {offset!r}")
    key = stream_key(generator)
    if _native(delta):
        return native.dare(delta, offset, key, stream_threshold(p), keep, k)
    work_dtype = torch.promote_types(delta.dtype, torch.float32)
    flat = delta.reshape(-1)
    out = torch.empty_like(flat)
    for start, length, lo, hi in _pieces(offset, flat.numel()):
        ints = _scalars(delta.device, torch.int32, lo, _i32(key[0]), _i32(key[1] + hi), stream_threshold(p))
        floats = _scalars(delta.device, work_dtype, keep, k)
        out[start : start + length] = _dare_kernel(flat[start : start + length], *ints, *floats, k == 0.0)
    return out.reshape(delta.shape)


# --- the unified operation -----------------------------------------------------------------------------------


def masked_rescale(delta: torch.Tensor, mask: torch.Tensor, p: float, k: float = 0.0) -> torch.Tensor:
    """F(Δ) = k·Δ where mask, (1−k·p)/(1−p)·Δ elsewhere: E[F(Δ)] = Δ when mask ~ Bernoulli(p).

    The common core of DARE (random mask), sign-biased and product-biased reweighting (deterministic masks).
    ``p`` must be in [0, 1); when the mask covers every entry, the factor of the (absent) others is irrelevant.
    """
    p = _in_range("p", p, 0.0, 1.0, lo_open=False, hi_open=True)
    k = _finite("k", k)
    if mask.shape != delta.shape:
        raise MismatchError(f"mask shape {tuple(mask.shape)} does not match delta shape {tuple(delta.shape)}")
    work = _work(delta)
    keep_scale = rescale_factor(p, k)  # exactly 1.0 when p = 0: the identity edit is bit for bit
    mask = mask.to(device=work.device, dtype=torch.bool)
    out = work * keep_scale  # a new tensor: the input is never written
    if k == 0.0:  # DARE: dropped entries are zero, no second product needed
        out.masked_fill_(mask, 0.0)
    else:  # overwrite the masked entries in place: one full-size temporary fewer than where(m, k·Δ, s·Δ)
        torch.where(mask, work * k, out, out=out)
    return out.to(delta.dtype)


# --- the paper's methods -------------------------------------------------------------------------------------


def dare(
    delta: torch.Tensor, p: float, k: float = 0.0, *, generator: torch.Generator | None = None, offset: int = 0
) -> torch.Tensor:
    """F(Δ) = k·Δ where M=1, (1−k·p)/(1−p)·Δ where M=0, M ~ Bernoulli(p): k=0 is DARE, k<0 flips signs.

    That is ``masked_rescale(Δ, dare_mask(Δ.shape, p, generator, offset), p, k)``, computed in one pass: M_i =
    [u_i < p] with u the generator's counter-based stream (see :func:`uniform_bits`). ``offset`` is the index of
    the delta's first entry in a larger tensor edited in blocks (each block with a generator in the same state),
    so the blocks put together equal the tensor edited whole.
    """
    p = _in_range("p", p, 0.0, 1.0, lo_open=False, hi_open=True)
    k = _finite("k", k)
    _check_float(delta)
    return _stream_rescale(delta, p, rescale_factor(p, k), k, generator, offset)


def drop_only(
    delta: torch.Tensor, p: float, *, generator: torch.Generator | None = None, offset: int = 0
) -> torch.Tensor:
    """F(Δ) = (1−M)·Δ, M ~ Bernoulli(p) from the same stream as :func:`dare`, no rescale (the paper's Fig. 3
    baseline); p in [0, 1]."""
    p = _in_range("p", p, 0.0, 1.0, lo_open=False, hi_open=False)
    _check_float(delta)
    return _stream_rescale(delta, p, 1.0, 0.0, generator, offset)


def _check_bitdelta(bits, scale, magnitudes) -> float:
    """BitDelta's settings checked; the scale as a finite float."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 0:
        raise InvalidParameterError(f"bits must be an integer >= 0, got {bits!r}")
    scale = _finite("scale", scale)
    if scale < 0:
        raise InvalidParameterError(f"scale must be >= 0, got {scale!r}")
    if magnitudes not in ("mean", "normal", "uniform"):
        raise InvalidParameterError(f"magnitudes must be 'mean', 'normal' or 'uniform', got {magnitudes!r}")
    if magnitudes != "mean" and bits != 0:
        raise InvalidParameterError(f"magnitudes={magnitudes!r} draws one distribution per tensor: use bits=0")
    return scale


def _random_magnitudes(work: torch.Tensor, mean, magnitudes: str, generator) -> torch.Tensor:
    """sign(Δ)·m·factor, the factor folded-normal or uniform and divided by its own mean over the moved entries."""
    noise = _draw(torch.randn if magnitudes == "normal" else torch.rand, work, generator).to(work.dtype)
    factor = (1.0 + noise).abs_() if magnitudes == "normal" else noise  # >= 0: signs are Δ's
    moved = work != 0
    if moved.any():
        factor /= factor[moved].mean()  # the mean magnitude over the entries that moved is exactly m
    return work.sign().mul_(mean) * factor


def bitdelta(
    delta: torch.Tensor,
    bits: int = 0,
    *,
    scale: float = 1.0,
    magnitudes: str = "mean",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """F(Δ) = scale·mean(|Δ|)·sign(Δ); bits=b: 2^b magnitude-sorted equal-count blocks, each at its mean |Δ|.

    ``magnitudes="normal"``: magnitudes m·|1 + z|/mean|1 + z|, z ~ N(0, 1), a *folded* normal (a magnitude is ≥ 0:
    it never flips a sign; an unfolded m·(1 + z) would flip about 16% of them); ``"uniform"``: m·u/mean(u),
    u ~ U[0, 1). Both are divided by the draw's own mean (over the entries that moved), so their mean magnitude is
    m = scale·mean(|Δ|) exactly, as in the single-magnitude BitDelta, and keep Δ's signs (the paper leaves the
    spread unstated: the relative spread is about 0.69 for the folded normal, 0.58 for the uniform). sign(0) = 0:
    an entry the post-training left unchanged stays unchanged.
    """
    scale = _check_bitdelta(bits, scale, magnitudes)
    if bits == 0 and magnitudes == "mean":  # the paper's BitDelta: one magnitude per tensor, no sort, no copy
        _check_float(delta)
        if delta.numel() == 0:
            return delta.clone()
        # mean |Δ| accumulated in float64 (one read, no |Δ| temporary), then sign·mean in one pass
        if _native(delta):
            return native.sign_scale(delta, scale * (native.abs_sum(delta) / delta.numel()))
        mean = scale * (_abs_sum_kernel(delta).item() / delta.numel())
        return _sign_scale_kernel(delta, torch.tensor(mean, dtype=torch.promote_types(delta.dtype, torch.float32)))
    if (
        bits
        and magnitudes == "mean"
        and bits <= 15
        and delta.dtype in (torch.float32, torch.bfloat16)
        and _native(delta)
    ):
        fast = native.block_means(delta, bits, scale)  # no sort: a radix selection of the block boundaries
        if fast is not None:
            return fast
    work = _work(delta)
    if work.numel() == 0:
        return delta.clone()
    mean = scale * (torch.linalg.vector_norm(work, ord=1) / work.numel())
    if magnitudes != "mean":
        return _random_magnitudes(work, mean, magnitudes, generator).to(delta.dtype)
    sign, mag = work.sign(), torch.abs(work, out=torch.empty_like(work))  # work.abs() allocates ~10x slower
    n = mag.numel()
    blocks = min(2**bits, n)
    values, order = torch.sort(mag.reshape(-1), stable=True)  # stable: ties go to blocks in index order
    # Sorted position i goes to block floor(i·B/n): block j holds positions ceil(j·n/B) .. ceil((j+1)·n/B) − 1,
    # B blocks whose sizes differ by at most one.
    starts = [-(-j * n // blocks) for j in range(blocks + 1)]
    counts = torch.tensor([b - a for a, b in zip(starts, starts[1:])], device=work.device)
    means = (torch.segment_reduce(values.double(), "sum", lengths=counts) / counts).to(values.dtype)  # sums in double
    out = torch.empty_like(values).scatter_(0, order, means.repeat_interleave(counts, output_size=n).mul_(scale))
    return (sign * out.reshape(work.shape)).to(delta.dtype)


def _abs_sum_kernel(delta: torch.Tensor) -> torch.Tensor:
    """Σ|Δ| in float64: the summation order (torch's or the C kernel's) moves it by ~1e-16 relative, far below
    the float32 rounding of the mean."""
    return delta.abs().to(torch.float64).sum()


def _sign_scale_kernel(delta: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """sign(Δ)·mean in mean's dtype (float32 or better), rounded once to Δ's dtype."""
    return (torch.sign(delta.to(mean.dtype)) * mean).to(delta.dtype)


def low_rank(delta: torch.Tensor, rank: int | float, svd: str = "exact") -> torch.Tensor:
    """F(Δ) = U_r·diag(S_r)·V_rᵀ, the best rank-r approximation (truncated SVD) of a 2-D Δ.

    ``rank``: an int in [0, min(m, n)], or a float in (0, 1] = that fraction of min(m, n), floored but at least
    one (Twin-Merging's ``int(density·len(S))``). Tensors with more than two dimensions are treated as
    (shape[0], rest) matrices; 0-D and 1-D deltas (biases, norms) are returned unchanged.
    ``svd="randomized"`` approximates the truncated SVD (:func:`_randomized_svd`): much faster for a small rank
    of a large matrix, not the best approximation (its error is reported by ``benchmarks/run.py``).
    """
    if svd not in ("exact", "randomized"):
        raise InvalidParameterError(f"svd must be 'exact' or 'randomized', got {svd!r}")
    r = resolve_rank(rank, tuple(delta.shape))
    work = _work(delta)
    if r is None:
        return work.to(delta.dtype) if work is not delta else delta.clone()  # a copy, never the input itself
    matrix = work.reshape(work.shape[0], -1)
    if svd == "randomized":
        us, vh = _randomized_svd(matrix, r)
        approx = us @ vh
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        approx = (u[:, :r] * s[:r]) @ vh[:r]
    return approx.reshape(work.shape).to(delta.dtype)


def _randomized_svd(matrix: torch.Tensor, r: int, oversample: int = 10, power_iters: int = 2):
    """(U_r·diag(S_r), V_rᵀ) of a randomized range finder with power iterations (Halko, Martinsson, Tropp 2011).

    The sketch is drawn from a fixed seed, so the result is deterministic (never the global RNG).
    """
    m, n = matrix.shape
    width = min(r + oversample, m, n)
    omega = torch.randn(n, width, generator=torch.Generator().manual_seed(0), dtype=matrix.dtype).to(matrix.device)
    q = torch.linalg.qr(matrix @ omega).Q
    for _ in range(power_iters):  # each pass sharpens the spectrum: σ_i^(2q+1)
        q = torch.linalg.qr(matrix.mT @ q).Q
        q = torch.linalg.qr(matrix @ q).Q
    u, s, vh = torch.linalg.svd(q.mT @ matrix, full_matrices=False)
    return (q @ u[:, :r]) * s[:r], vh[:r]


def resolve_rank(rank: int | float, shape: tuple[int, ...]) -> int | None:
    """The integer rank ``low_rank`` keeps for a delta of this shape (None: 0-D/1-D, returned unchanged)."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise InvalidParameterError(f"rank must be an int or a float in (0, 1], got {rank!r}")
    if isinstance(rank, float):
        _in_range("rank (as a fraction)", rank, 0.0, 1.0, lo_open=True, hi_open=False)
    elif rank < 0:
        raise InvalidParameterError(f"rank must be >= 0, got {rank!r}")
    if len(shape) < 2:
        return None
    full = min(shape[0], math.prod(shape[1:]))
    r = min(max(1, int(rank * full)), full) if isinstance(rank, float) else rank
    if r > full:
        raise InvalidParameterError(f"rank {r} exceeds min(m, n) = {full} for a delta of shape {tuple(shape)}")
    return r


def magnitude_trim(delta: torch.Tensor, keep: float) -> torch.Tensor:
    """F(Δ) = M⊙Δ, M = 1 on the round(keep·n) entries of largest |Δ| in this tensor (TIES' trim), 0 elsewhere.

    Entries tied at the threshold are kept in index order. The threshold is found by selection, not sorting
    (:func:`_kth_largest_magnitude`).
    """
    keep = _in_range("keep", keep, 0.0, 1.0, lo_open=True, hi_open=False)
    _check_float(delta)
    flat = delta.reshape(-1)
    n = flat.numel()
    count = math.floor(keep * n + 0.5)
    if count >= n:
        return delta.clone()
    if count == 0:
        return torch.zeros_like(delta)
    work_dtype = torch.promote_types(delta.dtype, torch.float32)
    threshold, at_least = _kth_largest_magnitude(flat, count)
    # |Δ| >= t is |Δ| > the float just below t: one fused pass keeps exactly those entries (selection, no rounding).
    below = torch.nextafter(threshold, threshold.new_tensor(-math.inf)).to(work_dtype)
    out = native.keep_above(flat, below.item()) if _native(flat) else _keep_above_kernel(flat, below)
    excess = at_least - count
    if excess > 0:  # ties at the threshold: drop the last ones in index order
        if _native(flat):
            out[native.last_ties(flat, threshold.item(), excess)] = 0.0
        else:
            ties = (flat.to(work_dtype).abs() == threshold).nonzero().squeeze(1)
            out[ties[ties.numel() - excess :]] = 0.0
    return out.reshape(delta.shape)


def _keep_above_kernel(delta: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
    """Δ where |Δ| > below (compared in below's dtype), 0 elsewhere."""
    return torch.where(delta.to(below.dtype).abs() > below, delta, 0.0)


def _kth_largest_magnitude(flat: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """The count-th largest |entry| of a 1-D tensor (in its compute dtype), exactly, and how many entries have
    |entry| >= it. Large CPU tensors: :func:`_kth_largest_by_bracket`.

    On the CPU numpy's introselect (``ndarray.partition``, in place on |Δ|) finds it in a few passes over
    memory, where ``torch.kthvalue`` and ``torch.topk`` take about ten times as long; elsewhere ``torch.kthvalue``.
    """
    n = flat.numel()
    if n >= NATIVE_MIN_NUMEL and native.supports(flat):
        found = _kth_largest_by_bracket(flat, count)
        if found is not None:
            return found
    if flat.device.type == "cpu":
        mag = np.abs(flat.detach().to(torch.promote_types(flat.dtype, torch.float32)).numpy())
        mag.partition(n - count)  # mag[n - count] in its sorted place; <= before it, >= after it
        value = mag[n - count]
        return torch.as_tensor(value), count + int(np.count_nonzero(mag[: n - count] == value))
    mag = flat.to(torch.promote_types(flat.dtype, torch.float32)).abs()
    value = torch.kthvalue(mag, n - count + 1).values
    return value, int(torch.count_nonzero(mag >= value))


def _kth_largest_by_bracket(flat: torch.Tensor, count: int) -> tuple[torch.Tensor, int] | None:
    """Floyd–Rivest selection: a strided sample brackets the threshold, one counting pass checks the bracket, and
    only the entries inside it (~1% of the tensor) are partitioned. None if the sample missed (or a NaN)."""
    n = flat.numel()
    work_dtype = torch.promote_types(flat.dtype, torch.float32)
    stride = max(1, n // (1 << 16))
    sample = np.sort(np.abs(flat[::stride].to(work_dtype).numpy()))[::-1]  # descending
    m, j = sample.size, count * sample.size / n  # the threshold's expected rank in the sample
    margin = 4.0 * math.sqrt(j * (1 - count / n)) + 16
    hi = math.inf if j - margin < 0 else float(sample[int(j - margin)])
    lo = 0.0 if j + margin >= m else float(sample[int(j + margin)])
    above, inside = native.bracket(flat, lo, hi)
    if inside is None or not above < count <= above + inside.numel():
        return None
    values = inside.numpy()
    r = values.size - (count - above)  # the threshold's index in the bracket sorted ascending
    values.partition(r)
    value = values[r]
    return torch.as_tensor(value), above + int(np.count_nonzero(values >= value))


def extrapolate(delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """F(Δ) = (1+α)·Δ: EXPO for α > 0, interpolation toward pre for α < 0 (α = −1 gives pre)."""
    alpha = _finite("alpha", alpha)
    if delta.dtype in (torch.float16, torch.bfloat16):
        # torch multiplies half-precision tensors in float32 and rounds once: exactly the promoted computation,
        # without a float32 copy of the tensor (checked in tests/test_edits_fast.py)
        return delta * (1.0 + alpha)
    return _work(delta) * (1.0 + alpha)


def gaussian(delta: torch.Tensor, sigma: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """F(Δ) = Δ + σ·rms(Δ)·Z, Z ~ N(0, 1) per entry: D is Gaussian noise with E‖D‖² = σ²‖Δ‖², a random edit whose
    size is set relative to the delta and whose direction carries no information (the book's perturbation test of
    the term). A tensor the post-training left unchanged (rms 0) stays unchanged; σ = 0 gives Δ bit for bit."""
    sigma = _finite("sigma", sigma)
    if sigma < 0:
        raise InvalidParameterError(f"sigma must be >= 0, got {sigma!r}")
    _check_float(delta)
    work = _work(delta)
    if sigma == 0 or work.numel() == 0:
        return delta.clone()
    rms = torch.linalg.vector_norm(work.double()) / math.sqrt(work.numel())
    noise = _draw(torch.randn, work, generator).to(work.dtype)
    return (work + noise.mul_(float(sigma * rms))).to(delta.dtype)


def sign_biased(delta: torch.Tensor, k: float) -> torch.Tensor:
    """F(Δ) = k·Δ where Δ < 0, (1−k·p)/(1−p)·Δ elsewhere, p = fraction of negative entries (Table 1, middle)."""
    mask = delta < 0
    return masked_rescale(delta, mask, _measured_p(mask), k)


def product_biased(delta: torch.Tensor, grad: torch.Tensor, k: float) -> torch.Tensor:
    """F(Δ) = k·Δ where Δ·∇L < 0, (1−k·p)/(1−p)·Δ elsewhere, p = fraction of negative products (Table 1, right)."""
    if not isinstance(grad, torch.Tensor) or grad.shape != delta.shape:
        raise MismatchError(
            f"grad shape {tuple(getattr(grad, 'shape', ()))} does not match delta shape {tuple(delta.shape)}"
        )
    product = _work(delta) * grad.to(device=delta.device, dtype=torch.promote_types(grad.dtype, torch.float32))
    mask = product < 0
    return masked_rescale(delta, mask, _measured_p(mask), k)


def _measured_p(mask: torch.Tensor) -> float:
    """The fraction of entries in the mask; 0 when it is all of them (the others' factor then multiplies nothing)."""
    p = mask.sum().item() / max(mask.numel(), 1)
    return p if p < 1.0 else 0.0


# --- registry ------------------------------------------------------------------------------------------------
#
# Each edit declares what the checkpoint driver (``deltas.py``) needs to know about it, so that adding an edit
# touches this file only: whether its settings draw random numbers, whether it needs the loss gradient, whether
# it is entry-wise (streamable in row blocks), the settings of its one-pass C step, a check against a tensor's
# shape, and a version that changes when its output does (stored experiment results are keyed by it).


def _seeded(params: dict) -> bool:
    return True


def _bitdelta_seeded(params: dict) -> bool:
    return params.get("magnitudes", "mean") != "mean"


def _dare_fused(p: float, k: float = 0.0) -> dict:
    return {"thr": stream_threshold(p), "keep": rescale_factor(p, k), "k": k}


def _drop_only_fused(p: float) -> dict:
    return {"thr": stream_threshold(p), "keep": 1.0, "k": 0.0}


def _extrapolate_fused(alpha: float) -> dict:
    return {"keep": 1.0 + alpha, "scale_only": True}


def _low_rank_fits(params: dict, shape: tuple[int, ...] | None) -> None:
    resolve_rank(params["rank"], (1,) if shape is None else shape)


@dataclass(frozen=True)
class EditSpec:
    """An edit and what the driver needs to know about it."""

    fn: Callable[..., torch.Tensor]
    #: settings -> whether the output depends on the seed (then the driver passes a per-tensor generator)
    seeded: Callable[[dict], bool] = lambda params: False
    #: takes the loss gradient at W_post, tensor by tensor (``grad=``)
    needs_grad: bool = False
    #: output entry i depends on Δ_i alone (and, if seeded, on i's place in the counter-based stream):
    #: large tensors are edited in row blocks (``offset=`` the block's first entry)
    entrywise: bool = False
    #: settings -> keyword arguments of ``native.edit``, the one-pass C step pre, post -> W_post + D
    #: (the stream's key and offset added by the driver for seeded edits); None: no fused step
    fused: Callable[..., dict] | None = None
    #: (settings, shape or None) -> raises InvalidParameterError when the settings do not fit such a tensor
    #: (None: the settings alone); default: run the edit on a 2x2 stand-in
    fits: Callable[[dict, tuple[int, ...] | None], None] | None = None
    #: bumped when the edit's output for the same settings and seed changes
    version: int = 1

    @property
    def name(self) -> str:
        return self.fn.__name__


EDITS: dict[str, EditSpec] = {
    spec.name: spec
    for spec in [
        EditSpec(dare, seeded=_seeded, entrywise=True, fused=_dare_fused),
        EditSpec(drop_only, seeded=_seeded, entrywise=True, fused=_drop_only_fused),
        EditSpec(bitdelta, seeded=_bitdelta_seeded, version=2),  # 2: random magnitudes folded, never a sign flip
        EditSpec(low_rank, fits=_low_rank_fits),
        EditSpec(magnitude_trim),
        EditSpec(extrapolate, entrywise=True, fused=_extrapolate_fused),
        EditSpec(gaussian, seeded=_seeded),  # not entry-wise: its scale is the whole tensor's rms
        EditSpec(sign_biased),
        EditSpec(product_biased, needs_grad=True),
    ]
}


def spec(name: str) -> EditSpec:
    """The declaration of the edit called ``name``; an ``InvalidParameterError`` listing the known names otherwise."""
    if name not in EDITS:
        raise InvalidParameterError(f"unknown method {name!r}; known methods: {', '.join(sorted(EDITS))}")
    return EDITS[name]


def get_method(name: str) -> Callable[..., torch.Tensor]:
    """The edit function called ``name``."""
    return spec(name).fn


def method_params(method: str) -> dict[str, inspect.Parameter]:
    """The method's settings (everything but the delta, the gradient, the generator and the offset), by name."""
    skip = {"delta", "grad", "generator", "offset"}
    return {n: p for n, p in inspect.signature(get_method(method)).parameters.items() if n not in skip}


def check_settings(method: str, params: dict, shape: tuple[int, ...] | None = None) -> None:
    """Raise ``InvalidParameterError`` (naming the method) for an unknown, missing or out-of-range setting, or, with
    ``shape``, for settings that do not fit a tensor of that shape (a rank above min(m, n))."""
    s = spec(method)
    known = method_params(method)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InvalidParameterError(
            f"{method}: unknown parameter(s) {', '.join(unknown)}; it takes {', '.join(known) or 'none'}"
        )
    missing = [n for n, p in known.items() if p.default is inspect.Parameter.empty and n not in params]
    if missing:
        raise InvalidParameterError(f"{method}: missing parameter(s) {', '.join(missing)}")
    try:
        if s.fits is not None:
            s.fits(params, shape)
        elif shape is None:  # range checks on a tiny stand-in (never the global RNG)
            probe = torch.zeros(2, 2, dtype=torch.float64)
            extra = {"generator": torch.Generator()} if s.seeded(params) else {}
            s.fn(probe, *([probe] if s.needs_grad else []), **params, **extra)
    except InvalidParameterError as e:
        raise InvalidParameterError(f"{method}: {e}") from None


def with_defaults(method: str, params: dict) -> dict:
    """The settings with every default filled in: ``dare(p=0.5)`` and ``dare(p=0.5, k=0.0)`` are one edit."""
    full = {n: p.default for n, p in method_params(method).items() if p.default is not inspect.Parameter.empty}
    return {**full, **params}
