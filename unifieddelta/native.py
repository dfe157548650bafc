"""Fused elementwise kernels in C: the edits' hot loops in one pass over memory, on all of torch's threads.

Why C: each eager torch operation is a full pass over the tensor, and DARE's mask takes ~20 integer operations
per entry (edits.py's counter-based stream), so eagerly it costs ~25 passes; torch.compile fuses them but costs
~5 s of imports and tracing in every process (measured here), more than the whole edit of a 1 GB checkpoint.
These loops are compiled once per machine with the system's C compiler (``cc``, cached under the project's cache
directory, ~1 s) and called through ctypes, which releases the GIL, so the tensor is split across threads.

Every kernel here has an eager torch twin in ``edits.py`` (the reference, used when no compiler is found,
for fp16, for non-CPU tensors, and with ``UNIFIEDDELTA_NATIVE=0``); they give the same bits, which the tests check.
Floating point is IEEE without contraction (``-ffp-contract=off``): each operation rounds once, as torch's do.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .cache import cache_dir

# Storage dtypes the kernels read and write (code, C type of one entry); the compute dtype is float or double.
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float64: "f64"}

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

/* storage <-> compute conversions: bf16 as torch's vectorized loops do it (round to nearest even, NaN -> 0xFFFF;
   torch's scalar tail loops write NaN as 0x7FC0: NaN payloads are not part of the contract) */
static inline float ld_f32(const void *p, int64_t i) { return ((const float *)p)[i]; }
static inline double ld_f64(const void *p, int64_t i) { return ((const double *)p)[i]; }
static inline float ld_bf16(const void *p, int64_t i) {
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16; float f; memcpy(&f, &u, 4); return f;
}
#define st_f32(p, i, v) (((float *)(p))[i] = (float)(v))
#define st_f64(p, i, v) (((double *)(p))[i] = (double)(v))
static inline uint16_t to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    return f != f ? (uint16_t)0xFFFF : (uint16_t)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}
#define st_bf16(p, i, v) (((uint16_t *)(p))[i] = to_bf16((float)(v)))

/* DARE's stream: lowbias32 twice, keyed; u = (H >> 8) / 2^24 (see edits.py) */
static inline uint32_t mix(uint32_t x) {
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16; return x;
}
/* entry i of a piece: counter lo = lo0 + i < 2^31 (the caller cuts pieces where i div 2^31 changes), k1h = k1 + hi */
static inline uint32_t bits24(uint32_t lo, uint32_t k0, uint32_t k1h) { return mix(mix(lo ^ k0) ^ k1h) >> 8; }

/* out = F(x) for x a delta: dropped (bits < thr) -> +0 (Z = 1) or x*k (Z = 0), kept -> x*keep, in type W.
   Branch-free bodies (selects), one function per variant, so that the compiler vectorizes every loop. */
#define DARE(S, W, Z)                                                                                       \
void dare##Z##_##S##_##W(const void *restrict x, void *restrict out, int64_t n, uint32_t lo0, uint32_t k0, \
                         uint32_t k1h, uint32_t thr, double keep, double k) {                             \
    const W kp = (W)keep, kk = (W)k;                                                                       \
    for (int64_t i = 0; i < n; i++) {                                                                      \
        W v = (W)ld_##S(x, i);                                                                             \
        W dropped = Z ? (W)0 : v * kk, kept = v * kp;                                                      \
        st_##S(out, i, bits24(lo0 + (uint32_t)i, k0, k1h) < thr ? dropped : kept);                         \
    }                                                                                                      \
}
DARE(f32, float, 0) DARE(bf16, float, 0) DARE(f64, double, 0)
DARE(f32, float, 1) DARE(bf16, float, 1) DARE(f64, double, 1)

/* the streaming editor's whole step for one block: pre, post (storage S) -> post + (F(delta) - delta),
   delta = post - pre in compute type W, rounded once to S; F as dare (mode 0 with k, 1 with zeros) or
   F(d) = d * keep (mode 2: extrapolate). Returns the number of non-finite deltas (the caller raises). */
#define EDIT(S, W, MODE)                                                                                    \
int64_t edit##MODE##_##S##_##W(const void *restrict pre, const void *restrict post, void *restrict out,    \
                               int64_t n, uint32_t lo0, uint32_t k0, uint32_t k1h, uint32_t thr,           \
                               double keep, double k) {                                                    \
    const W kp = (W)keep, kk = (W)k;                                                                       \
    int64_t bad = 0;                                                                                       \
    for (int64_t i = 0; i < n; i++) {                                                                      \
        W b = (W)ld_##S(post, i);                                                                          \
        W d = b - (W)ld_##S(pre, i);                                                                       \
        bad += (d - d) != 0; /* NaN or Inf: d - d is NaN */                                                \
        W kept = d * kp, dropped = MODE == 1 ? (W)0 : d * kk;                                              \
        W e = (MODE == 2 || bits24(lo0 + (uint32_t)i, k0, k1h) >= thr) ? kept : dropped;                  \
        st_##S(out, i, (W)((e - d) + b));                                                                  \
    }                                                                                                      \
    return bad;                                                                                            \
}
#define EDITS(MODE) EDIT(f32, float, MODE) EDIT(bf16, float, MODE) EDIT(f32, double, MODE) \
                    EDIT(bf16, double, MODE) EDIT(f64, double, MODE)
EDITS(0) EDITS(1) EDITS(2)

/* bitdelta: sum |x| in double, eight accumulators in a fixed pattern (the same sum whatever the threads) */
#define ABSSUM(S)                                                                                           \
double abssum_##S(const void *restrict x, int64_t n) {                                                             \
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                              \
    int64_t i = 0;                                                                                         \
    for (; i + 8 <= n; i += 8)                                                                             \
        for (int j = 0; j < 8; j++) acc[j] += fabs((double)ld_##S(x, i + j));                             \
    for (; i < n; i++) acc[0] += fabs((double)ld_##S(x, i));                                              \
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));              \
}
ABSSUM(f32) ABSSUM(bf16) ABSSUM(f64)

/* bitdelta: out = sign(x) * m in W (sign(NaN) = NaN, sign(0) = 0, as torch.sign) */
#define SIGNSCALE(S, W)                                                                                     \
void signscale_##S##_##W(const void *restrict x, void *restrict out, int64_t n, double mean) {                              \
    const W m = (W)mean;                                                                                   \
    for (int64_t i = 0; i < n; i++) {                                                                      \
        W v = (W)ld_##S(x, i);                                                                             \
        W s = v > 0 ? (W)1 : (v < 0 ? (W)-1 : v); /* 0 stays 0 (sign kept, times m: +-0), NaN NaN */     \
        st_##S(out, i, s * m);                                                                             \
    }                                                                                                      \
}
SIGNSCALE(f32, float) SIGNSCALE(bf16, float) SIGNSCALE(f64, double)

/* magnitude trim: out = x where |x| > below (compared in W), 0 elsewhere; a selection, no rounding */
#define KEEPABOVE(S, W)                                                                                     \
void keepabove_##S##_##W(const void *restrict x, void *restrict out, int64_t n, double below) {                             \
    const W t = (W)below;                                                                                  \
    for (int64_t i = 0; i < n; i++) {                                                                      \
        W v = (W)ld_##S(x, i);                                                                             \
        st_##S(out, i, (v > t || v < -t) ? v : (W)0);                                                      \
    }                                                                                                      \
}
KEEPABOVE(f32, float) KEEPABOVE(bf16, float) KEEPABOVE(f64, double)

/* magnitude trim's selection: counts of |x| >= hi, lo <= |x| < hi and NaN (one read); then the bracket's |x| */
#define BRACKET(S, W)                                                                                       \
void count_##S##_##W(const void *restrict x, int64_t n, double lo, double hi, int64_t *restrict counts) {  \
    const W l = (W)lo, h = (W)hi;                                                                          \
    int64_t above = 0, in = 0, nan = 0;                                                                    \
    for (int64_t i0 = 0; i0 < n; i0 += 1 << 20) { /* 32-bit counters vectorize; 2^20 entries cannot overflow */\
        int32_t ab = 0, inn = 0, na = 0;                                                                   \
        const int64_t end = n < i0 + (1 << 20) ? n : i0 + (1 << 20);                                      \
        for (int64_t i = i0; i < end; i++) {                                                               \
            W a = fabs((W)ld_##S(x, i));                                                                   \
            ab += a >= h; inn += (a >= l) & (a < h); na += a != a;                                         \
        }                                                                                                  \
        above += ab; in += inn; nan += na;                                                                 \
    }                                                                                                      \
    counts[0] = above; counts[1] = in; counts[2] = nan;                                                    \
}                                                                                                          \
void gather_##S##_##W(const void *restrict x, int64_t n, double lo, double hi, W *restrict buf) {         \
    const W l = (W)lo, h = (W)hi;                                                                          \
    int64_t j = 0;                                                                                         \
    for (int64_t i0 = 0; i0 < n; i0 += 16) { /* a vectorized test per 16 entries; few blocks hold any */    \
        const int64_t end = n < i0 + 16 ? n : i0 + 16;                                                    \
        int any = 0;                                                                                       \
        for (int64_t i = i0; i < end; i++) {                                                               \
            W a = fabs((W)ld_##S(x, i));                                                                   \
            any |= (a >= l) & (a < h);                                                                     \
        }                                                                                                  \
        if (any)                                                                                           \
            for (int64_t i = i0; i < end; i++) {                                                           \
                W a = fabs((W)ld_##S(x, i));                                                               \
                if (a >= l && a < h) buf[j++] = a;                                                         \
            }                                                                                              \
    }                                                                                                      \
}
BRACKET(f32, float) BRACKET(bf16, float) BRACKET(f64, double)

/* magnitude trim's ties: the indices of the last k entries with |x| == t, scanning back 16 entries at a time */
#define LASTTIES(S, W)                                                                                      \
int64_t lastties_##S##_##W(const void *restrict x, int64_t n, double t, int64_t k, int64_t *restrict idx) { \
    const W v = (W)t;                                                                                      \
    int64_t found = 0;                                                                                     \
    for (int64_t e = n; e > 0 && found < k; e -= 16) {                                                     \
        const int64_t s = e < 16 ? 0 : e - 16;                                                            \
        int any = 0;                                                                                       \
        for (int64_t i = s; i < e; i++) any |= fabs((W)ld_##S(x, i)) == v;                                 \
        if (any)                                                                                           \
            for (int64_t i = e - 1; i >= s && found < k; i--)                                              \
                if (fabs((W)ld_##S(x, i)) == v) idx[found++] = i;                                          \
    }                                                                                                      \
    return found;                                                                                          \
}
LASTTIES(f32, float) LASTTIES(bf16, float) LASTTIES(f64, double)

/* multi-bit bitdelta: |x| as an order-preserving 32-bit key (float's bits; |x| >= 0), a radix selection in two
   16-bit passes finds the block boundaries exactly, then each entry's block and the blocks' sums */
static inline uint32_t key32(float a) { uint32_t u; memcpy(&u, &a, 4); return u; }
#define HIST(S)                                                                                             \
void hihist_##S(const void *restrict x, int64_t n, int64_t *restrict hist) {                               \
    for (int64_t i = 0; i < n; i++) hist[key32(fabsf(ld_##S(x, i))) >> 16]++;                              \
}                                                                                                          \
void lohist_##S(const void *restrict x, int64_t n, const int16_t *restrict slot, int64_t *restrict hist) {  \
    for (int64_t i = 0; i < n; i++) {                                                                      \
        uint32_t k = key32(fabsf(ld_##S(x, i)));                                                           \
        int16_t s = slot[k >> 16];                                                                         \
        if (s >= 0) hist[(int64_t)s * 65536 + (k & 0xFFFFu)]++;                                            \
    }                                                                                                      \
}                                                                                                          \
/* block = #{boundaries < |x|}: one lookup in lut (by the high 16 bits of the key) for entries whose high bits hold  \
   no boundary, else a branch-free search over v padded with +inf to p - 1 entries (p a power of two). An entry  \
   equal to a boundary is a tie (0xFFFF; its index, from the chunk's start, in ties[] while cap lasts), placed by \
   the caller. Four interleaved sets of sums and counts (4 * p each) keep neighbours from waiting on each other. */\
int64_t blocks_##S(const void *restrict x, int64_t n, const uint16_t *restrict lut, const float *restrict v,   \
                   int64_t p, uint16_t *restrict block, double *restrict sums, int64_t *restrict counts,       \
                   int64_t *restrict ties, int64_t cap) {                                                  \
    int64_t nties = 0;                                                                                     \
    for (int64_t i = 0; i < n; i++) {                                                                      \
        float a = fabsf(ld_##S(x, i));                                                                     \
        int64_t lo = lut[key32(a) >> 16];                                                                  \
        if (lo == 0xFFFE) {                                                                                \
            lo = 0;                                                                                        \
            for (int64_t half = p >> 1; half > 0; half >>= 1) lo += v[lo + half - 1] < a ? half : 0;       \
            if (v[lo] == a) { block[i] = 0xFFFF; if (nties < cap) ties[nties] = i; nties++; continue; }    \
        }                                                                                                  \
        block[i] = (uint16_t)lo; sums[(i & 3) * p + lo] += a; counts[(i & 3) * p + lo]++;                  \
    }                                                                                                      \
    return nties;                                                                                          \
}                                                                                                          \
void fill_##S(const void *restrict x, const uint16_t *restrict block, const float *restrict m, int64_t n,  \
              void *restrict out) {                                                                        \
    for (int64_t i = 0; i < n; i++) {                                                                      \
        float v = ld_##S(x, i);                                                                            \
        float s = v > 0 ? 1.0f : (v < 0 ? -1.0f : v);                                                      \
        st_##S(out, i, s * m[block[i]]);                                                                   \
    }                                                                                                      \
}
HIST(f32) HIST(bf16)
"""

#: Tensors smaller than this run single-threaded (thread start-up would cost more than it saves).
_PARALLEL_MIN = 1 << 16
_lib: ctypes.CDLL | None = None
_failed: list[str] = []
_pool: tuple[ThreadPoolExecutor, int] | None = None  # (pool, pid of the process that made it)


def _flags() -> list[str]:
    # no FMA contraction (torch rounds each operation); no FP traps assumed, so selects vectorize (same values)
    return [
        "-O3",
        "-march=native",
        "-ffp-contract=off",
        "-fno-math-errno",
        "-fno-trapping-math",
        "-fPIC",
        "-shared",
        "-std=c11",
    ]


def _build() -> ctypes.CDLL:
    """Compile the kernels once per source, flags and CPU (``-march=native``), atomically, into the cache."""
    cpu = ""
    if Path("/proc/cpuinfo").exists():
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([_SOURCE, " ".join(_flags()), compiler, platform.machine(), cpu]).encode())
    target = cache_dir("kernels") / f"unifieddelta-{key.hexdigest()[:16]}.so"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, so = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
            src.write_text(_SOURCE)
            subprocess.run(
                [compiler, *_flags(), str(src), "-o", str(so), "-lm"], check=True, capture_output=True, text=True
            )
            os.replace(so, target)  # another process may have won the race: same bytes
    return ctypes.CDLL(str(target))


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no compiler, or ``UNIFIEDDELTA_NATIVE=0``): callers use torch instead."""
    global _lib
    if os.environ.get("UNIFIEDDELTA_NATIVE", "1") == "0" or _failed:
        return None
    if _lib is None:
        try:
            _lib = _build()
        except Exception as e:  # no cc, a read-only cache, an exotic platform: torch does the same math, slower
            detail = (
                e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
            )
            _failed.append(f"{type(e).__name__}: {detail}")
            warnings.warn(
                f"unifieddelta: the C kernels could not be built ({_failed[0]}); edits run on torch "
                "(same results, several times slower). UNIFIEDDELTA_NATIVE=0 skips the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        _declare(_lib)
    return _lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, u32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_double
    for s in ("f32", "bf16", "f64"):
        for w in ("float", "double"):
            specs = [(f"dare{z}_{s}_{w}", [p, p, i64, u32, u32, u32, u32, f64, f64], None) for z in (0, 1)]
            specs += [(f"edit{m}_{s}_{w}", [p, p, p, i64, u32, u32, u32, u32, f64, f64], i64) for m in (0, 1, 2)]
            specs += [
                (f"signscale_{s}_{w}", [p, p, i64, f64], None),
                (f"keepabove_{s}_{w}", [p, p, i64, f64], None),
                (f"count_{s}_{w}", [p, i64, f64, f64, p], None),
                (f"gather_{s}_{w}", [p, i64, f64, f64, p], None),
                (f"lastties_{s}_{w}", [p, i64, f64, i64, p], i64),
            ]
            for name, args, res in specs:
                if hasattr(lib, name):  # getattr caches the function object; lib[name] would not
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = args, res
        fn = getattr(lib, f"abssum_{s}")
        fn.argtypes, fn.restype = [p, i64], f64
        if s != "f64":
            for name, args, res in (
                (f"hihist_{s}", [p, i64, p], None),
                (f"lohist_{s}", [p, i64, p, p], None),
                (f"blocks_{s}", [p, i64, p, p, i64, p, p, p, p, i64], i64),
                (f"fill_{s}", [p, p, p, i64, p], None),
            ):
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, res


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: CPU, contiguous, one of float32/bfloat16/float64, and built."""
    return (
        all(t.device.type == "cpu" and t.is_contiguous() and t.dtype in _DTYPES for t in tensors)
        and library() is not None
    )


def _code(dtype: torch.dtype) -> str:
    return _DTYPES[dtype]


def _ctype(dtype: torch.dtype) -> str:
    """The C type a storage dtype computes in."""
    return "double" if dtype == torch.float64 else "float"


def _chunks(n: int, min_size: int = _PARALLEL_MIN) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges covering 0..n, one per thread, cut at multiples of 64 entries."""
    threads = max(1, torch.get_num_threads()) if n >= min_size else 1
    step = -(-n // threads)
    step = -(-step // 64) * 64
    return [(a, min(n, a + step)) for a in range(0, n, step)] if n else [(0, 0)]


def _parallel(call, n: int, min_size: int = _PARALLEL_MIN) -> list:
    """``call(start, end)`` over the chunks of n entries, on threads (ctypes releases the GIL during the call)."""
    global _pool
    chunks = _chunks(n, min_size)
    if len(chunks) == 1:
        return [call(*chunks[0])]
    if _pool is None or _pool[1] != os.getpid() or _pool[0]._max_workers < len(chunks):  # a forked child has
        if _pool is not None and _pool[1] == os.getpid():  # no threads: it makes its own pool
            _pool[0].shutdown(wait=False)
        _pool = (ThreadPoolExecutor(max_workers=len(chunks), thread_name_prefix="unifieddelta"), os.getpid())
    return list(_pool[0].map(lambda c: call(*c), chunks))


def _stream_parallel(call, n: int, offset: int, key: tuple[int, int]) -> list:
    """``call(start, end, lo0, k0, k1h)`` over n entries whose stream counters start at ``offset``: chunks for the
    threads, cut again where the counter crosses a multiple of 2^31 (the stream's high word, edits.py)."""

    def piece(a: int, b: int) -> list:
        out, i = [], a
        while i < b:
            lo, hi = (offset + i) & 0x7FFFFFFF, (offset + i) >> 31
            j = min(b, i + (1 << 31) - lo)
            out.append(call(i, j, lo, key[0], (key[1] + hi) & 0xFFFFFFFF))
            i = j
        return out

    return [v for part in _parallel(piece, n) for v in part]


def _ptr(t: torch.Tensor, start: int) -> int:
    return t.data_ptr() + start * t.element_size()


def dare(x: torch.Tensor, offset: int, key: tuple[int, int], thr: int, keep: float, k: float) -> torch.Tensor:
    """edits.dare's entry-wise rescale of a contiguous delta (any shape), from DARE's stream."""
    lib, out = library(), torch.empty_like(x)
    fn = getattr(lib, f"dare{int(k == 0.0)}_{_code(x.dtype)}_{_ctype(x.dtype)}")
    _stream_parallel(
        lambda a, b, lo, k0, k1h: fn(_ptr(x, a), _ptr(out, a), b - a, lo, k0, k1h, thr, keep, k), x.numel(), offset, key
    )
    return out


def edit(
    pre: torch.Tensor,
    post: torch.Tensor,
    compute: torch.dtype,
    *,
    offset: int = 0,
    key=(0, 0),
    thr: int = 0,
    keep: float = 1.0,
    k: float = 0.0,
    scale_only: bool = False,
) -> tuple[torch.Tensor, int]:
    """post + (F(Δ) − Δ), Δ = post − pre in ``compute``, rounded once to post's dtype, and the number of
    non-finite deltas. F is DARE's rescale (or Δ·keep with ``scale_only``)."""
    lib, out = library(), torch.empty_like(post)
    mode = 2 if scale_only else int(k == 0.0)
    fn = getattr(lib, f"edit{mode}_{_code(post.dtype)}_{_ctype(compute)}")
    bad = _stream_parallel(
        lambda a, b, lo, k0, k1h: fn(_ptr(pre, a), _ptr(post, a), _ptr(out, a), b - a, lo, k0, k1h, thr, keep, k),
        post.numel(),
        offset,
        key,
    )
    return out, sum(bad)


def abs_sum(x: torch.Tensor) -> float:
    """Σ|x| in double; partial sums over fixed blocks of 2^16 entries added in order (thread-count independent)."""
    fn = getattr(library(), f"abssum_{_code(x.dtype)}")
    block, n = 1 << 16, x.numel()
    blocks = -(-n // block)
    parts = _parallel(
        lambda a, b: [fn(_ptr(x, j * block), min(n, (j + 1) * block) - j * block) for j in range(a, b)],
        blocks,
        min_size=2,
    )
    return float(sum(v for chunk in parts for v in chunk))


def sign_scale(x: torch.Tensor, mean: float) -> torch.Tensor:
    """sign(x)·mean in x's compute type, rounded to x's dtype."""
    lib, out = library(), torch.empty_like(x)
    fn = getattr(lib, f"signscale_{_code(x.dtype)}_{_ctype(x.dtype)}")
    _parallel(lambda a, b: fn(_ptr(x, a), _ptr(out, a), b - a, mean), x.numel())
    return out


def keep_above(x: torch.Tensor, below: float) -> torch.Tensor:
    """x where |x| > below (below rounded to x's compute type), 0 elsewhere."""
    lib, out = library(), torch.empty_like(x)
    fn = getattr(lib, f"keepabove_{_code(x.dtype)}_{_ctype(x.dtype)}")
    _parallel(lambda a, b: fn(_ptr(x, a), _ptr(out, a), b - a, below), x.numel())
    return out


def bracket(x: torch.Tensor, lo: float, hi: float) -> tuple[int, torch.Tensor | None]:
    """(#|x| >= hi, the |x| with lo <= |x| < hi in x's compute dtype), or (0, None) if x has a NaN."""
    w = _ctype(x.dtype)
    count, gather = (
        getattr(library(), f"count_{_code(x.dtype)}_{w}"),
        getattr(library(), f"gather_{_code(x.dtype)}_{w}"),
    )
    chunks = _chunks(x.numel())
    counts = torch.zeros(len(chunks), 3, dtype=torch.int64)
    _parallel(lambda a, b: count(_ptr(x, a), b - a, lo, hi, counts[chunks.index((a, b))].data_ptr()), x.numel())
    if counts[:, 2].sum():
        return 0, None
    starts = [0, *counts[:, 1].cumsum(0).tolist()]
    buf = torch.empty(starts[-1], dtype=torch.float64 if w == "double" else torch.float32)
    _parallel(lambda a, b: gather(_ptr(x, a), b - a, lo, hi, _ptr(buf, starts[chunks.index((a, b))])), x.numel())
    return int(counts[:, 0].sum()), buf


def last_ties(x: torch.Tensor, value: float, k: int) -> torch.Tensor:
    """The indices of the last k entries of x (in index order) with |x| == value (compared in x's compute dtype)."""
    idx = torch.empty(k, dtype=torch.int64)
    found = getattr(library(), f"lastties_{_code(x.dtype)}_{_ctype(x.dtype)}")(
        x.data_ptr(), x.numel(), value, k, idx.data_ptr()
    )
    return idx[:found]


def block_means(x: torch.Tensor, bits: int, scale: float) -> torch.Tensor | None:
    """Multi-bit BitDelta of a float32 or bfloat16 tensor: sorted by |x| (stably) into 2^bits equal-count blocks,
    each entry at sign(x)·scale·(its block's mean |x|), as edits.bitdelta's sort does it, without the sort. The
    block boundaries (2^bits − 1 order statistics) come from a radix selection on the bits of |x|, two 16-bit
    histogram passes; a third pass gives each entry its block and sums the blocks (in double); entries equal to a
    boundary value are placed in index order (the stable sort's order); a fourth pass writes the output. None when
    x holds Inf or NaN. At most 15 bits (block numbers fit an int16 beside the tie marker)."""

    n = x.numel()
    flat = x.reshape(-1)
    nblocks = min(1 << bits, n)
    starts = [-(-j * n // nblocks) for j in range(nblocks + 1)]  # block j: sorted positions starts[j] .. starts[j+1]-1
    ranks = starts[1:-1]  # the boundaries: the entries at these sorted positions
    found = _boundaries(flat, ranks)
    if found is None:  # Inf or NaN: the caller's sort handles them
        return None
    v, below, hbin = found
    block, sums, counts, tied = _assign_blocks(flat, v, hbin, nblocks)
    if len(tied):  # equal to a boundary value: the r-th such entry (index order) sits at sorted position below + r
        _place_ties(flat, tied, block, sums, counts, v, below, ranks)
    means = ((sums / counts).to(torch.float32) * torch.tensor(scale, dtype=torch.float32)).contiguous()
    out = torch.empty_like(flat)
    fill = getattr(library(), f"fill_{_code(x.dtype)}")
    _parallel(lambda a, b: fill(_ptr(flat, a), _ptr(block, a), means.data_ptr(), b - a, _ptr(out, a)), n)
    return out.reshape(x.shape)


def _boundaries(flat: torch.Tensor, ranks: list[int]):
    """The |x| values at the sorted positions ``ranks`` (float32 tensor), the count of entries below each, and the
    high-16-bit bin of each: a radix selection in two histogram passes. None when x holds Inf or NaN."""
    import numpy as np

    lib, code, n, chunks = library(), _code(flat.dtype), flat.numel(), _chunks(flat.numel())
    hist = torch.zeros(len(chunks), 65536, dtype=torch.int64)
    _parallel(
        lambda a, b: getattr(lib, f"hihist_{code}")(_ptr(flat, a), b - a, hist[chunks.index((a, b))].data_ptr()), n
    )
    high = hist.sum(0).numpy()
    if high[0x7F80:].any():
        return None
    below_high = np.concatenate([[0], np.cumsum(high)])
    hbin = np.searchsorted(below_high, ranks, side="right") - 1  # the high-16 bin of each boundary rank
    targets = sorted(set(hbin.tolist()))
    slot = torch.full((65536,), -1, dtype=torch.int16)
    slot[targets] = torch.arange(len(targets), dtype=torch.int16)
    low = torch.zeros(len(chunks), len(targets) * 65536, dtype=torch.int64)
    _parallel(
        lambda a, b: getattr(lib, f"lohist_{code}")(
            _ptr(flat, a), b - a, slot.data_ptr(), low[chunks.index((a, b))].data_ptr()
        ),
        n,
    )
    low = low.sum(0).numpy().reshape(len(targets), 65536)
    keys, below = [], []
    for r, h in zip(ranks, hbin):
        cum = below_high[h] + np.concatenate([[0], np.cumsum(low[targets.index(h)])])
        lo16 = int(np.searchsorted(cum, r, side="right") - 1)
        keys.append((int(h) << 16) | lo16)
        below.append(int(cum[lo16]))  # entries with |x| below the boundary value
    return torch.tensor(np.array(keys, dtype=np.uint32).view(np.float32)), below, hbin


def _assign_blocks(flat: torch.Tensor, v: torch.Tensor, hbin, nblocks: int):
    """Each entry's block (int16; -1 where |x| equals a boundary value), each block's sum of |x| (double) and count
    over the entries placed, and the indices of the entries left at -1: one pass with a lookup on the high 16 bits,
    searched where a boundary lies."""
    import numpy as np

    n, chunks = flat.numel(), _chunks(flat.numel())
    size = 1 << max(1, len(v)).bit_length()  # a power of two > len(v): the search's table, +inf padded
    table = torch.full((size,), float("inf"), dtype=torch.float32)
    table[: len(v)] = v
    # blocks by the high 16 bits of |x|: a bin that holds no boundary lies within one block
    lut = np.searchsorted(np.array(hbin), np.arange(65536), side="left").astype(np.uint16)
    lut[np.unique(hbin)] = 0xFFFE  # a boundary inside: searched exactly
    lut = torch.from_numpy(lut.view(np.int16))
    block = torch.empty(n, dtype=torch.int16)
    sums = torch.zeros(len(chunks), 4, size, dtype=torch.float64)
    counts = torch.zeros(len(chunks), 4, size, dtype=torch.int64)
    cap = 4 * len(v) + 1024
    tie_index = torch.empty(len(chunks), cap, dtype=torch.int64)
    fn = getattr(library(), f"blocks_{_code(flat.dtype)}")

    def assign(a, b):
        i = chunks.index((a, b))
        return fn(
            _ptr(flat, a),
            b - a,
            lut.data_ptr(),
            table.data_ptr(),
            size,
            _ptr(block, a),
            sums[i].data_ptr(),
            counts[i].data_ptr(),
            tie_index[i].data_ptr(),
            cap,
        )

    found = _parallel(assign, n)
    if max(found) <= cap:
        tied = torch.cat([tie_index[i, :k] + a for i, ((a, _), k) in enumerate(zip(chunks, found))])
    else:  # many ties (a low-precision delta): find them all
        tied = (block == -1).nonzero().squeeze(1)
    return block, sums.sum((0, 1))[:nblocks], counts.sum((0, 1))[:nblocks], tied


def _place_ties(flat, tied, block, sums, counts, v, below, ranks) -> None:
    """The entries ``tied`` (equal to a boundary value, in index order) take the sorted positions a stable sort
    gives them: their blocks are set and their |x| added to the blocks' sums and counts."""
    mag = flat[tied].to(torch.float32).abs()
    first_below = {}
    for value, b in zip(v.tolist(), below):
        first_below.setdefault(value, b)
    position = torch.empty(len(tied), dtype=torch.int64)
    for value, b in first_below.items():
        where = (mag == value).nonzero().squeeze(1)
        position[where] = b + torch.arange(len(where))
    which = torch.searchsorted(torch.tensor(ranks), position, right=True)
    block[tied] = which.to(torch.int16)
    sums.index_add_(0, which, mag.to(torch.float64))
    counts.index_add_(0, which, torch.ones_like(which))


if __name__ == "__main__":  # python -m unifieddelta.native: build the kernels now and say where they are
    lib = library()
    print(lib._name if lib is not None else f"not built: {_failed[0] if _failed else 'UNIFIEDDELTA_NATIVE=0'}")
