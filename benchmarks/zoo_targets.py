"""Measure the zoo's targets (issue 5) and print them as one table per target.

    python benchmarks/zoo_targets.py [--widths] [--names NAME ...]

Builds (or loads from the cache) each pair and reports: build seconds and cache-hit seconds; for LM pairs the
median per-matrix ‖ΔW‖/‖W_pre‖, the lm-eval scores of pre, post and post with DARE p=0.5 (and of the DPO model),
the held-out preference metrics of DPO, and the time of one lm-eval pass; for ViT pairs the accuracy of the
linear probe (pre) and of the fine-tune (post).
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib

import pandas as pd
import torch
from safetensors.torch import load_file

from unifieddelta import zoo
from unifieddelta.evaluate import evaluate_lm


def rel_change(pre, post) -> float:
    a, b = load_file(str(pre / "model.safetensors")), load_file(str(post / "model.safetensors"))
    return statistics.median(((b[k] - a[k]).norm() / a[k].norm()).item() for k in a if a[k].ndim == 2)


def dare_model(pre, post, p: float = 0.5, seed: int = 0):
    from transformers import LlamaForCausalLM

    from unifieddelta.edits import dare

    model = LlamaForCausalLM.from_pretrained(post)
    w_pre = load_file(str(pre / "model.safetensors"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            param.copy_(w_pre[name] + dare(param - w_pre[name], p, generator=g))
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", action="store_true")
    ap.add_argument("--names", nargs="*")
    args = ap.parse_args()
    names = args.names or (zoo.names() if args.widths else zoo.default_names())
    for name in names:
        start = time.perf_counter()
        pre, post = zoo.load_pair(name, progress=False)
        built = time.perf_counter() - start
        start = time.perf_counter()
        zoo.load_pair(name)
        hit = time.perf_counter() - start
        d = zoo.describe(name)
        print(f"\n== {name}: first call {built:.1f} s, second call {hit:.2f} s; metrics {d['metrics']}")
        if name.startswith("tiny-vit/"):
            continue
        from transformers import AutoTokenizer, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(post)
        print(f"median per-matrix |dW|/|W_pre| = {rel_change(pre, post):.4f}")
        table, times = {}, {}
        for label, model in [("pre", LlamaForCausalLM.from_pretrained(pre)),
                             ("post", LlamaForCausalLM.from_pretrained(post)),
                             ("post+DARE p=0.5", dare_model(pre, post))]:
            start = time.perf_counter()
            table[label] = evaluate_lm(model, tok).set_index("task")["value"]
            times[label] = time.perf_counter() - start
        print(pd.DataFrame(table).round(3).to_string())
        print("lm-eval pass seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
