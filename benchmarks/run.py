"""Speed and memory of the edits and of the streaming checkpoint editor, against the hardware floor and peers.

    python benchmarks/run.py [--quick] [--json PATH]      (``make bench`` runs the full one)

edits: each edit of ``unifieddelta.edits`` on one delta tensor (8192² fp32, and bf16; 4096² fp32 with
``--quick``), the median of repeats, beside ``Tensor.copy_`` of the same tensor timed in the same process (the
memory-bandwidth floor) and the peers that do the same operation: peft's merge utilities, mergekit's sparsify
functions, the naive torch expression. Speeds are reported as copy_s / s: 1.0 runs at copy speed.

streaming: ``unifieddelta edit --method dare --set p=0.9`` over a synthetic sharded Llama-layout bf16 safetensors
pair generated under /tmp (≥ 4 GB the pair; 1 GB with ``--quick``) and deleted afterwards: its peak resident
memory (the child's ru_maxrss) against 2 × the largest tensor + 1 GiB, its time against reading both
checkpoints and writing one of the same size. The full run also times mergekit's DARE on the same pair.

Peers are optional: a missing one is reported as "not installed". Ratios are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

# Before torch loads, as `unifieddelta edit` does: large tensors on transparent huge pages. Without it each fresh
# tensor pays a page fault per 4 KiB (5-6x the time of a copy of it, measured here), for ours and the peers alike.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

from unifieddelta import edits  # noqa: E402

THREADS = 2
GiB = 1 << 30
TARGETS = {
    "dare": 0.25,
    "bitdelta": 0.3,
    "bitdelta_4bit": 0.05,
    "magnitude_trim": 0.1,
    "extrapolate": 0.5,
}  # fraction of copy speed, fp32
P, KEEP, RANK, ALPHA = 0.9, 0.1, 64, 0.5  # DARE drop rate, trim's kept fraction, low rank, EXPO's alpha
SKIPPED = "not timed with --quick"  # the naive 4-bit BitDelta's full sort: 5 s of the minute --quick has


def _sync() -> None:
    """Wait for queued device work (CUDA runs asynchronously); nothing on the CPU."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, copy=None, max_repeats: int = 5, budget_s: float = 3.0) -> tuple[float, float | None]:
    """Median seconds of ``fn()`` after one warm-up, and of ``copy()`` timed alternately with it, so that both
    see the same load on a shared machine. Slow functions get fewer repeats; the slowest only their first run."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    first = time.perf_counter() - start
    times, copies = ([first], []) if 2 * first > budget_s else ([], [])
    for _ in range(min(max_repeats, int(budget_s / max(first, 1e-9))) if not times else 0):
        if copy is not None:
            start = time.perf_counter()
            copy()
            _sync()
            copies.append(time.perf_counter() - start)
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    if copy is not None and not copies:
        start = time.perf_counter()
        copy()
        _sync()
        copies.append(time.perf_counter() - start)
    return statistics.median(times), statistics.median(copies) if copies else None


# --- peers ---------------------------------------------------------------------------------------------------


def _peft():
    try:
        from peft.utils import merge_utils

        return merge_utils
    except ImportError:
        return None


def _mergekit():
    try:
        from mergekit import sparsify

        return sparsify
    except ImportError:
        return None


def naive_bitdelta_bits(d: torch.Tensor, bits: int) -> torch.Tensor:
    """Equal-count magnitude blocks by a full sort (numel divisible by 2^bits), each at its mean magnitude."""
    mag = d.abs().reshape(-1)
    values, order = torch.sort(mag)
    means = values.reshape(2**bits, -1).mean(1)
    out = torch.empty_like(mag)
    out[order] = means.repeat_interleave(mag.numel() >> bits)
    return d.sign() * out.reshape(d.shape)


def naive_low_rank(d: torch.Tensor, r: int) -> torch.Tensor:
    u, s, v = torch.svd_lowrank(d.float(), q=r + 10, niter=2)
    return ((u[:, :r] * s[:r]) @ v[:, :r].T).to(d.dtype)


def cases(d: torch.Tensor, g: torch.Generator, quick: bool = False):
    """name -> (ours, {peer: fn or None if not installed}) for the delta ``d``."""
    peft, mk = _peft(), _mergekit()
    l1 = mk.RescaleNorm.l1 if mk else None
    gone = "no such operation"
    peft_ = (lambda fn: fn) if peft else (lambda fn: "not installed")
    mk_ = (lambda fn: fn) if mk else (lambda fn: "not installed")
    return {
        "dare": (
            lambda: edits.dare(d, P, generator=g),
            {
                "peft": peft_(lambda: peft.random_pruning(d, 1 - P, rescale=True)),
                "mergekit": mk_(lambda: mk.bernoulli(d, 1 - P, rescale_norm=l1)),
                "naive": lambda: torch.where(torch.rand(d.shape, generator=g, device=d.device) < P, 0.0, d / (1 - P)),
            },
        ),
        "drop_only": (
            lambda: edits.drop_only(d, P, generator=g),
            {
                "peft": peft_(lambda: peft.random_pruning(d, 1 - P, rescale=False)),
                "mergekit": mk_(lambda: mk.bernoulli(d, 1 - P, rescale_norm=None)),
                "naive": lambda: d * (torch.rand(d.shape, generator=g, device=d.device) >= P),
            },
        ),
        "bitdelta": (
            lambda: edits.bitdelta(d),
            {"peft": gone, "mergekit": gone, "naive": lambda: d.sign() * d.abs().mean()},
        ),
        "bitdelta_4bit": (
            lambda: edits.bitdelta(d, 4),
            {"peft": gone, "mergekit": gone, "naive": SKIPPED if quick else lambda: naive_bitdelta_bits(d, 4)},
        ),
        "magnitude_trim": (
            lambda: edits.magnitude_trim(d, KEEP),
            {
                "peft": peft_(lambda: peft.magnitude_based_pruning(d, KEEP)),
                "mergekit": mk_(lambda: mk.magnitude(d, KEEP)),
                "naive": lambda: (
                    d
                    * torch.zeros(d.numel(), dtype=torch.bool, device=d.device)
                    .index_fill_(0, torch.topk(d.abs().reshape(-1), int(KEEP * d.numel())).indices, True)
                    .reshape(d.shape)
                ),
            },
        ),
        "low_rank": (
            lambda: edits.low_rank(d, RANK, svd="randomized"),
            {"peft": gone, "mergekit": gone, "naive": lambda: naive_low_rank(d, RANK)},
        ),
        "extrapolate": (
            lambda: edits.extrapolate(d, ALPHA),
            {"peft": gone, "mergekit": gone, "naive": lambda: d * (1 + ALPHA)},
        ),
    }


def bench_edits(n: int, dtypes: list[torch.dtype], device: str = "cpu", quick: bool = False) -> dict:
    results = {}
    for dtype in dtypes:
        d = (torch.randn(n, n, generator=torch.Generator().manual_seed(0)) * 1e-3).to(device=device, dtype=dtype)
        dst = torch.empty_like(d)
        g = torch.Generator(device=device).manual_seed(1)
        todo = cases(d, g, quick)
        # Warm-up: a process's first large allocations stall on huge-page compaction (the first DARE calls ran
        # 5x slower than the steady state here), which is start-up, not the edit: run the fast edits first.
        for _ in range(3):
            for name in ("dare", "drop_only", "bitdelta", "magnitude_trim", "extrapolate"):
                todo[name][0]()
                dst.copy_(d)
        for name, (ours, peers) in todo.items():
            if dtype != dtypes[0] and name in ("bitdelta_4bit", "low_rank"):
                continue  # sort- and matmul-bound: the second dtype tells nothing new, and costs a minute
            key = name if dtype == torch.float32 else f"{name} ({str(dtype).removeprefix('torch.')})"
            copy = lambda: dst.copy_(d)
            ours_s, copy_s = timed(ours, copy)
            row = {"dtype": str(dtype).removeprefix("torch."), "shape": [n, n], "ours_s": ours_s, "copy_s": copy_s}
            # each peer against its own interleaved copy, reported as a fraction of copy speed
            peer_times = {p: fn if isinstance(fn, str) else timed(fn, copy) for p, fn in peers.items()}
            row["peers"] = {p: t if isinstance(t, str) else t[0] for p, t in peer_times.items()}
            row["peers_copy_s"] = {p: t[1] for p, t in peer_times.items() if not isinstance(t, str)}
            results[key] = row
            print(f"  {key}: {row['ours_s']:.4f} s (copy {copy_s:.4f} s)", file=sys.stderr, flush=True)
    return results


def bench_model(device: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Each edit over every tensor of a synthetic ~1B-parameter Llama-layout model on ``device``, against copying
    every tensor (device to device); random edits draw from ``tensor_generator(seed, name)`` as the editor does."""
    from unifieddelta.deltas import tensor_generator

    shapes = llama_shapes(2048, 5632, 16, 32000)
    model = {n: (torch.randn(s, device=device) * 1e-3).to(dtype) for n, s in shapes.items()}
    dst = {n: torch.empty_like(t) for n, t in model.items()}
    calls = {
        "dare": lambda n, t: edits.dare(t, P, generator=tensor_generator(0, n, device)),
        "drop_only": lambda n, t: edits.drop_only(t, P, generator=tensor_generator(0, n, device)),
        "bitdelta": lambda n, t: edits.bitdelta(t),
        "bitdelta_4bit": lambda n, t: edits.bitdelta(t, 4),
        "magnitude_trim": lambda n, t: edits.magnitude_trim(t, KEEP),
        "low_rank": lambda n, t: edits.low_rank(t, RANK, svd="randomized"),
        "extrapolate": lambda n, t: edits.extrapolate(t, ALPHA),
    }
    copy = lambda: [dst[n].copy_(t) for n, t in model.items()]
    out = {"parameters": sum(t.numel() for t in model.values()), "dtype": str(dtype).removeprefix("torch.")}
    for name, call in calls.items():
        ours_s, copy_s = timed(lambda: [call(n, t) for n, t in model.items()], copy, max_repeats=3, budget_s=10.0)
        out[name] = {"ours_s": ours_s, "copy_s": copy_s}
        print(f"  model {name}: {ours_s:.3f} s (copy {copy_s:.3f} s)", file=sys.stderr, flush=True)
    return out


def low_rank_error(n: int) -> dict:
    """Frobenius error of the randomized low rank over the optimum (exact SVD) on an n×n delta with a decaying
    spectrum, at the benchmark's rank: 1.0 is optimal."""
    g = torch.Generator().manual_seed(2)
    u = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    d = (u * (0.98 ** torch.arange(n))) @ v.T
    exact_s = time.perf_counter()
    best = torch.linalg.norm(edits.low_rank(d, RANK) - d).item()
    exact_s = time.perf_counter() - exact_s
    fast_s = time.perf_counter()
    fast = torch.linalg.norm(edits.low_rank(d, RANK, svd="randomized") - d).item()
    fast_s = time.perf_counter() - fast_s
    return {
        "shape": [n, n],
        "rank": RANK,
        "error_over_optimal": fast / best,
        "exact_s": exact_s,
        "randomized_s": fast_s,
    }


# --- streaming -----------------------------------------------------------------------------------------------


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{m}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def make_pair(root: Path, shapes: dict, shard_bytes: int) -> tuple[Path, Path]:
    """pre and post (pre + small noise) as sharded bf16 safetensors with an index and a Llama config."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    (_, hidden), layers = shapes["model.embed_tokens.weight"], sum(n.endswith("q_proj.weight") for n in shapes)
    inter, vocab = shapes["model.layers.0.mlp.up_proj.weight"][0], shapes["lm_head.weight"][0]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        vocab_size=vocab,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 128),
        torch_dtype="bfloat16",
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        if current and size + math.prod(shape) * 2 > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += math.prod(shape) * 2
    shards.append(current)
    folders = []
    for side in ("pre", "post"):
        folder = root / side
        folder.mkdir()
        config.save_pretrained(folder)
        weight_map = {}
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for j, name in enumerate(names):
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                t = torch.randn(shapes[name], generator=g) * 0.02
                if side == "post":  # the same pre tensor plus a small delta
                    t.add_(torch.randn(shapes[name], generator=torch.Generator().manual_seed(j + 7 * i)), alpha=1e-3)
                tensors[name] = t.to(torch.bfloat16)
            save_file(tensors, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in names})
        total = sum(math.prod(s) * 2 for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        folders.append(folder)
    return folders[0], folders[1]


# A small parent for the measured command: a child's ru_maxrss starts at its parent's resident size at fork
# (the benchmark's own gigabytes), so the command is forked from this tiny process instead.
_WRAP = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_measured(argv: list[str], env=None, timeout: float | None = None) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code; -9 when killed at ``timeout``) of a command."""
    with tempfile.TemporaryDirectory() as tmp:
        report, log = Path(tmp) / "rusage", Path(tmp) / "stderr"
        start = time.perf_counter()
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WRAP, str(report), *argv],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the wrapper and the command it forked
                proc.wait()
                return time.perf_counter() - start, 0, -9
        wall = time.perf_counter() - start
        maxrss_kib, rc = map(int, report.read_text().split())
        if rc:
            print(f"  {Path(argv[0]).name} failed: {log.read_text(errors='replace').strip()[-500:]}", file=sys.stderr)
    return wall, maxrss_kib * 1024, rc


def read_write_s(pre: Path, post: Path, out: Path) -> float:
    """Seconds to read every shard of both checkpoints and write one checkpoint of post's size."""
    out.mkdir()
    buf = bytearray(1 << 26)
    start = time.perf_counter()
    for a, b in zip(sorted(pre.glob("*.safetensors")), sorted(post.glob("*.safetensors"))):
        with open(a, "rb") as fa, open(b, "rb") as fb, open(out / b.name, "wb") as fo:
            while fa.readinto(buf):
                pass
            while n := fb.readinto(buf):
                fo.write(memoryview(buf)[:n])
    return time.perf_counter() - start


def bench_streaming(quick: bool, with_mergekit: bool) -> dict:
    # ~0.5 GB per checkpoint with --quick, ~2.2 GB per checkpoint otherwise (bf16).
    shapes = llama_shapes(1024, 2816, 16, 32000) if quick else llama_shapes(2048, 5632, 18, 32000)
    ckpt_bytes = sum(math.prod(s) * 2 for s in shapes.values())
    largest = max(math.prod(s) * 2 for s in shapes.values())
    free = shutil.disk_usage("/tmp").free
    if free < 4 * ckpt_bytes + GiB:
        return {"skipped": f"/tmp has {free / GiB:.1f} GiB free, needs {(4 * ckpt_bytes + GiB) / GiB:.1f}"}
    root = Path(tempfile.mkdtemp(prefix="unifieddelta-bench-", dir="/tmp"))
    try:
        print(f"  generating a {2 * ckpt_bytes / 1e9:.1f} GB pair in {root}", file=sys.stderr, flush=True)
        pre, post = make_pair(root, shapes, shard_bytes=(256 << 20) if quick else (1 << 30))

        def read_write() -> float:
            os.sync()  # each timed run starts with no dirty pages: write-back of earlier runs is not charged to it
            seconds = read_write_s(pre, post, root / "rw")
            shutil.rmtree(root / "rw")
            return seconds

        rws = [read_write()]
        exe = [sys.executable, "-m", "unifieddelta.cli"]  # what the `unifieddelta` entry point runs
        startup_s = run_measured(
            [sys.executable, "-c", "import unifieddelta.cli, unifieddelta.deltas, torch, safetensors, tqdm"]
        )[0]
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
        result = {
            "checkpoint_bytes": ckpt_bytes,
            "pair_bytes": 2 * ckpt_bytes,
            "largest_tensor_bytes": largest,
            "rss_bound_bytes": 2 * largest + GiB,
            "startup_s": startup_s,
        }
        # The disk's write-back makes single runs vary ~2x here: each run starts synced, the edit and the
        # read+write baseline alternate, and medians are reported (3 runs each in the full benchmark).
        for dtype in ("float32",) if quick else ("float32", "float64"):
            argv = [
                *exe,
                "edit",
                "--pre",
                str(pre),
                "--post",
                str(post),
                "--method",
                "dare",
                "--set",
                "p=0.9",
                "--seed",
                "0",
                "--out",
                str(root / f"out-{dtype}"),
                "--compute-dtype",
                dtype,
            ]
            runs = []
            for _ in range(1 if quick else 3):
                os.sync()
                runs.append(run_measured(argv, env))
                shutil.rmtree(root / f"out-{dtype}", ignore_errors=True)
                rws.append(read_write())
            wall = statistics.median(r[0] for r in runs)
            rss, rc = max(r[1] for r in runs), max(abs(r[2]) for r in runs)
            key = "" if dtype == "float32" else "_float64"
            result.update(
                {
                    f"ours_s{key}": wall if rc == 0 else None,
                    f"peak_rss_bytes{key}": rss,
                    f"ours_runs_s{key}": [r[0] for r in runs],
                }
            )
            print(
                f"  unifieddelta edit ({dtype}): {wall:.1f} s, peak RSS {rss / GiB:.2f} GiB",
                file=sys.stderr,
                flush=True,
            )
        result["read_write_s"], result["read_write_runs_s"] = statistics.median(rws), rws
        if with_mergekit:
            result["mergekit"] = bench_mergekit(pre, post, root, env)
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench_mergekit(pre: Path, post: Path, root: Path, env) -> dict | str:
    exe = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent)) or shutil.which("mergekit-yaml")
    if exe is None:
        return "not installed"
    config = root / "dare.yml"
    config.write_text(
        f"merge_method: dare_linear\nbase_model: {pre}\ndtype: bfloat16\n"
        f"models:\n  - model: {post}\n    parameters: {{weight: 1.0, density: {1 - P}}}\n"
        "parameters: {normalize: false}\n"
    )
    os.sync()
    wall, rss, rc = run_measured(
        [
            exe,
            str(config),
            str(root / "mk-out"),
            "--lazy-unpickle",
            "--quiet",
            "--random-seed",
            "0",
            "-j",
            str(THREADS),
        ],
        env,
        timeout=240,
    )
    shutil.rmtree(root / "mk-out", ignore_errors=True)
    note = "dare_linear; mergekit rescales the kept entries to keep the L1 norm, not by 1/(1-p)"
    if rc == -9:
        return f"killed after {wall:.0f} s (the run's time budget)"
    return {"s": wall, "peak_rss_bytes": rss, "note": note} if rc == 0 else f"failed (exit {rc})"


# --- report --------------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = [
        "edits: speed as a fraction of Tensor.copy_ on the same tensor (copy_s / s; 1.0 = memory-bandwidth floor)",
        f"{'edit':26s} {'ours s':>9s} {'copy s':>9s} {'ours':>7s} {'target':>7s} {'met':>4s} "
        f"{'peft':>7s} {'mergekit':>9s} {'naive':>7s}",
    ]
    for name, row in results["edits"].items():
        speed = row["copy_s"] / row["ours_s"]
        target = TARGETS.get(name)
        peers = [
            f"{row['peers_copy_s'][p] / v:.3f}"
            if isinstance(v, float)
            else ("-" if v == "no such operation" else "n/t" if v == SKIPPED else "n/i")
            for p, v in row["peers"].items()
        ]
        met = "" if target is None else ("yes" if speed >= target else "NO")
        lines.append(
            f"{name:26s} {row['ours_s']:9.4f} {row['copy_s']:9.4f} {speed:7.3f} "
            f"{'' if target is None else target:>7} {met:>4s} {peers[0]:>7s} {peers[1]:>9s} {peers[2]:>7s}"
        )
    lines.append("  (- : the peer has no such operation; n/i : not installed; n/t : not timed with --quick)")
    model = results.get("model_1b")
    if model:
        lines.append(f"synthetic model, {model['parameters'] / 1e9:.2f}B {model['dtype']} parameters, every tensor:")
        lines += [
            f"  {k:22s} {v['ours_s']:8.3f} s  copy {v['copy_s']:8.3f} s  speed {v['copy_s'] / v['ours_s']:.3f}"
            for k, v in model.items()
            if isinstance(v, dict)
        ]
    lr = results.get("low_rank_error")
    if lr:
        lines.append(
            f"low_rank svd='randomized' rank {lr['rank']} on {lr['shape'][0]}²: error {lr['error_over_optimal']:.4f}"
            f" × optimal; {lr['randomized_s']:.2f} s vs exact SVD {lr['exact_s']:.2f} s"
        )
    s = results.get("streaming", {})
    if "skipped" in s:
        lines.append(f"streaming: skipped ({s['skipped']})")
    elif s:
        lines.append(
            f"streaming: DARE p=0.9 over a {s['pair_bytes'] / 1e9:.2f} GB bf16 pair "
            f"(checkpoint {s['checkpoint_bytes'] / 1e9:.2f} GB, "
            f"largest tensor {s['largest_tensor_bytes'] / 1e6:.0f} MB)"
        )
        lines.append(
            f"  read both + write one: {s['read_write_s']:.2f} s (median of {len(s['read_write_runs_s'])}); "
            f"python+torch start-up {s['startup_s']:.2f} s"
        )
        for key, label in (("", "float32"), ("_float64", "float64")):
            if f"ours_s{key}" not in s:
                continue
            t, rss = s[f"ours_s{key}"], s[f"peak_rss_bytes{key}"]
            if t is None:
                lines.append(f"  unifieddelta edit --compute-dtype {label}: failed")
                continue
            lines.append(
                f"  unifieddelta edit --compute-dtype {label}: {t:.2f} s = {t / s['read_write_s']:.2f} × read+write"
                f" (target ≤ 2; {(t - s['startup_s']) / s['read_write_s']:.2f} × without the start-up);"
                f" peak RSS {rss / GiB:.2f} GiB vs bound {s['rss_bound_bytes'] / GiB:.2f} GiB"
                f" ({'met' if rss <= s['rss_bound_bytes'] else 'NOT met'})"
            )
        mk = s.get("mergekit")
        if isinstance(mk, dict):
            lines.append(
                f"  mergekit {mk['note']}: {mk['s']:.2f} s = {mk['s'] / s['read_write_s']:.2f} × read+write,"
                f" peak RSS {mk['peak_rss_bytes'] / GiB:.2f} GiB"
            )
        elif mk:
            lines.append(f"  mergekit: {mk}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4096² fp32 only, a 1 GB pair, no mergekit merge")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--no-streaming", action="store_true", help="skip the checkpoint streaming benchmark")
    parser.add_argument(
        "--device", default="cpu", help="cuda: bf16 edits on 8192² and a synthetic 1B model, no streaming"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    n = 4096 if args.quick else 8192
    results = {"threads": THREADS, "quick": args.quick, "torch": torch.__version__, "device": args.device}
    if args.device != "cpu":
        results["device_name"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
        results["edits"] = bench_edits(n, [torch.bfloat16], args.device)
        results["model_1b"] = bench_model(args.device)
    else:
        results["edits"] = bench_edits(
            n, [torch.float32] if args.quick else [torch.float32, torch.bfloat16], quick=args.quick
        )
        results["low_rank_error"] = low_rank_error(512 if args.quick else 1024)
        if not args.no_streaming:
            results["streaming"] = bench_streaming(args.quick, with_mergekit=not args.quick)
    results["total_s"] = time.perf_counter() - start
    print(table(results))
    print(f"total {results['total_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
