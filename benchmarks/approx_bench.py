"""Approximation term: time and peak memory of ``grad`` vs ``jvp``, and how close each rule gets to the exact change.

On a tiny Llama pair, for DARE p=0.5, BitDelta, low-rank 0.1, magnitude trim 0.1 and extrapolation 0.5:
- seconds and peak memory of ``approximation_term(points=5, rule="left")`` in ``grad`` and ``jvp`` mode (one run
  each, the fastest of ``--repeat`` interleaved runs; CPU memory is the peak growth of the resident set over
  the call, sampled every millisecond with glibc returning freed blocks at once; CUDA memory is
  ``torch.cuda.max_memory_allocated`` over the call);
- |term − ΔL| / |ΔL| for the paper's left rule with C = 5 and Gauss–Legendre with 2 and 3 points.

The pair: a zoo language pair (``--pair``, default ``tiny-lm``; ``unifieddelta.zoo.load_pair``, trained on first
use), with 8 held-out questions per task and their answers as data.

    python benchmarks/approx_bench.py [--pair tiny-lm|tiny-lm/128|...] [--device cpu|cuda] [--dtype float64|float32]
"""

from __future__ import annotations

import argparse
import time

import torch

from unifieddelta import approx, deltas, losses
from unifieddelta.profiling import measure

EDITS = [
    ("dare", {"p": 0.5}),
    ("bitdelta", {}),
    ("low_rank", {"rank": 0.1}),
    ("magnitude_trim", {"keep": 0.1}),
    ("extrapolate", {"alpha": 0.5}),
]


def zoo_pair(name: str = "tiny-lm", per_task: int = 8):
    """(pre, post, pairs) of a zoo LM pair (pre-trained -> SFT), with held-out task questions as data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unifieddelta import zoo
    from unifieddelta.tasks import generate

    pre_dir, post_dir = zoo.load_pair(name, progress=True)
    tok = AutoTokenizer.from_pretrained(post_dir)
    docs = [d for task in generate.TASKS for d in generate.test_docs(task)[:per_task]]
    texts = [(generate.prompt(d["question"]), " " + d["answer"]) for d in docs]
    pairs = [(tok(q)["input_ids"], tok(a)["input_ids"] + [tok.eos_token_id]) for q, a in texts]  # as the zoo's SFT
    pre, post = AutoModelForCausalLM.from_pretrained(pre_dir), AutoModelForCausalLM.from_pretrained(post_dir)
    return pre.eval(), post.eval(), pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", default="tiny-lm", help="a zoo language pair (pre-trained -> SFT)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="timings: the fastest of this many interleaved runs")
    args = ap.parse_args()
    import pandas as pd

    t0 = time.perf_counter()
    pre, post, pairs = zoo_pair(args.pair)
    dtype = getattr(torch, args.dtype)
    pre, post = pre.to(args.device, dtype), post.to(args.device, dtype)
    loss = losses.causal_lm_nll(pairs, batch_size=args.batch_size)
    n_params = sum(p.numel() for p in post.parameters())
    print(
        f"pair: {args.pair} ({n_params / 1e6:.2f}M parameters, {post.config.num_hidden_layers} layers, "
        f"hidden {post.config.hidden_size}), {len(pairs)} (prompt, answer) pairs in {len(loss.batches)} batches, "
        f"{args.dtype} on {args.device}, attention {post.config._attn_implementation} (jvp: eager); "
        f"built in {time.perf_counter() - t0:.0f} s"
    )
    with torch.no_grad():
        print(f"loss at W_pre {float(loss(pre)):.4f}, at W_post {float(loss(post)):.4f}")
    # load forward-AD's decompositions (a one-time TorchScript cost of seconds) before timing anything
    some = next(iter(post.named_parameters()))
    approx.approximation_term(post, {some[0]: torch.zeros_like(some[1])}, loss, points=1, mode="jvp")

    directions = {method: deltas.direction(pre, post, method, seed=0, **params) for method, params in EDITS}
    term = lambda d, mode: lambda: approx.approximation_term(post, d, loss, points=5, rule="left", mode=mode)
    rows = []
    for method, params in EDITS:  # time first: the memory probe below slows allocation down
        d = directions[method]
        t_grad = t_jvp = float("inf")
        for _ in range(args.repeat):  # interleaved, the fastest of each: the machine may be shared
            grad, t, _ = measure(term(d, "grad"), args.device, memory=False)
            t_grad = min(t, t_grad)
            fwd, t, _ = measure(term(d, "jvp"), args.device, memory=False)
            t_jvp = min(t, t_jvp)
        exact = approx.loss_change(post, d, loss)
        g2 = approx.approximation_term(post, d, loss, points=2, rule="gauss", mode="jvp").term
        g3 = approx.approximation_term(post, d, loss, points=3, rule="gauss", mode="jvp").term
        rel = lambda x: abs(x - exact) / abs(exact)
        label = method + "(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"
        rows.append(
            {
                "edit": label,
                "loss change": exact,
                "left-5 term": grad.term,
                "grad s": t_grad,
                "jvp s": t_jvp,
                "time grad/jvp": t_grad / t_jvp,
                "|jvp−grad|/|grad|": abs(fwd.term - grad.term) / abs(grad.term),
                "err left-5": rel(grad.term),
                "err gauss-2": rel(g2),
                "err gauss-3": rel(g3),
            }
        )
    for row, (method, _) in zip(rows, EDITS):
        m_grad, m_jvp = (measure(term(directions[method], mode), args.device)[2] for mode in ("grad", "jvp"))
        row.update({"grad MiB": m_grad / 2**20, "jvp MiB": m_jvp / 2**20, "mem grad/jvp": m_grad / max(m_jvp, 1)})
    table = pd.DataFrame(rows).set_index("edit")
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.3g}".format):
        print(table.to_string())


if __name__ == "__main__":
    main()
