"""Measure the zoo's targets (issue 5) and print them as one table per pair.

    python benchmarks/zoo_targets.py [--widths] [--names NAME ...] [--dare-sweep [P ...]] [--dare-seeds N]
                                     [--set FIELD=VALUE ...] [--json PATH]

Builds (or loads from the cache) each pair and reports: build seconds and cache-hit seconds; for LM pairs the
median per-matrix ‖ΔW‖/‖W_pre‖, the lm-eval scores of pre, post and post with DARE (p=0.5, or each p of
``--dare-sweep``, default 0.3 0.5 0.7 0.9) and where DARE breaks (the smallest p at which some task drops more
than 2 points below post); for ``tiny-lm-dpo`` (pre = SFT, post = DPO) the held-out preference metrics; the time
of one lm-eval pass; for ViT pairs the accuracy of the linear probe (pre) and of the fine-tune (post).

DARE goes through the module's own path (``deltas.apply_edit(pre, post, "dare", seed=s, p=p)``, every tensor),
so its masks are whatever ``edits.dare`` draws for that seed. DARE is a random edit and a test set has 100 items
per task, so one mask moves a score by a few items either way: ``--dare-seeds N`` evaluates seeds 0..N-1 and
reports their mean (the expected effect of the edit; the JSON keeps every seed). ``--set sft_lr=5e-5`` measures
the named pairs under a changed recipe (every pair whose recipe has that field; built on first use). ``--json``
writes every number printed.
"""

from __future__ import annotations

import argparse
import json
import time

import pandas as pd

from unifieddelta import zoo
from unifieddelta.deltas import delta_stats
from unifieddelta.evaluate import evaluate_lm
from unifieddelta.settings import parse_settings

#: A task "breaks" under an edit when it loses more than this (accuracy/exact match, in [0, 1]) against post.
BREAK = 0.02


def rel_change(pre, post) -> float:
    """Median over the 2-D tensors of ‖W_post − W_pre‖ / ‖W_pre‖."""
    return float(delta_stats(pre, post, preset="matrices")["rel_change"].median())


def dare_model(pre, post, p: float, seed: int = 0):
    from unifieddelta.deltas import apply_edit

    return apply_edit(pre, post, "dare", seed=seed, p=p)


def breaks_at(table: pd.DataFrame, ps: list[float]) -> float | None:
    """The smallest p whose DARE column loses more than ``BREAK`` on some task against post (None: none)."""
    for p in sorted(ps):
        if ((table["post"] - table[f"DARE p={p}"]) > BREAK + 1e-9).any():
            return p
    return None


def measure_lm(name: str, pre, post, ps: list[float], seeds: int = 1) -> dict:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(post)
    rel = rel_change(pre, post)
    print(f"median per-matrix |dW|/|W_pre| = {rel:.4f}")
    table, times, per_seed = {}, {}, {}
    models = [
        ("pre", lambda: LlamaForCausalLM.from_pretrained(pre)),
        ("post", lambda: LlamaForCausalLM.from_pretrained(post)),
    ]
    models += [(f"DARE p={p} seed={s}", lambda p=p, s=s: dare_model(pre, post, p, s)) for p in ps for s in range(seeds)]
    for label, make in models:
        model = make()
        start = time.perf_counter()
        table[label] = evaluate_lm(model, tok).set_index("task")["value"]
        times[label] = time.perf_counter() - start
    for p in ps:  # one column per p: the mean over the seeds
        cols = [table.pop(f"DARE p={p} seed={s}") for s in range(seeds)]
        per_seed[f"DARE p={p}"] = [c.to_dict() for c in cols]
        table[f"DARE p={p}"] = sum(cols) / seeds
    table = pd.DataFrame(table)
    labels = ("SFT", "DPO") if name == "tiny-lm-dpo" else ("pre", "post")
    print(table.rename(columns=dict(zip(("pre", "post"), labels))).round(3).to_string())
    diff = (table["post"] - table["pre"]).round(3)
    print(f"{labels[1]} - {labels[0]} (points): " + ", ".join(f"{t} {100 * v:+.0f}" for t, v in diff.items()))
    out = {
        "rel_change": rel,
        "scores": table.to_dict(),
        "eval_seconds": times,
        "dare_seeds": seeds,
        "dare_per_seed": per_seed,
    }
    if ps:
        if seeds > 1:
            worst = {p: pd.DataFrame(per_seed[f"DARE p={p}"]).min() - table["post"] for p in ps}
            print(
                f"DARE columns: mean over seeds 0..{seeds - 1}; worst single seed, points below post: "
                + "; ".join(
                    f"p={p} " + ", ".join(f"{t} {100 * d:+.0f}" for t, d in w.items()) for p, w in worst.items()
                )
            )
        at = breaks_at(table, ps)
        where = at if at is not None else f"> {max(ps)}"
        print(f"DARE breaks (some task > {100 * BREAK:.0f} points below post) at p = {where}")
        out["dare_breaks_at"] = at
    print("lm-eval pass seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    return out


def with_overrides(recipe, overrides: list[str]):
    """``recipe`` with each ``FIELD=VALUE`` it has replaced (fields of the other kind of recipe are skipped)."""
    changes = parse_settings(overrides)
    for field in changes:
        if not any(hasattr(r, field) for r in (zoo.LMRecipe(), zoo.ViTRecipe())):
            raise SystemExit(f"--set: no recipe has a field {field!r}")
    return zoo.with_overrides(recipe, {k: v for k, v in changes.items() if hasattr(recipe, k)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", action="store_true", help="also the LM width family")
    ap.add_argument("--names", nargs="*", help="only these pairs")
    ap.add_argument(
        "--dare-sweep",
        nargs="*",
        type=float,
        metavar="P",
        help="evaluate DARE at each p (default 0.3 0.5 0.7 0.9) instead of p=0.5 alone",
    )
    ap.add_argument(
        "--dare-seeds",
        type=int,
        default=1,
        metavar="N",
        help="average DARE over seeds 0..N-1 (default 1: seed 0 alone)",
    )
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="change a recipe field, e.g. sft_lr=5e-5 (default: the zoo's recipes)",
    )
    ap.add_argument("--json", help="write the measurements to this file")
    args = ap.parse_args()
    ps = [0.5] if args.dare_sweep is None else (args.dare_sweep or [0.3, 0.5, 0.7, 0.9])
    names = args.names or (zoo.names() if args.widths else zoo.default_names())
    results = {}
    for name in names:
        recipe = with_overrides(zoo.recipe_for(name), args.set)
        start = time.perf_counter()
        pre, post = zoo.load_pair(name, recipe=recipe, progress=False)
        built = time.perf_counter() - start
        start = time.perf_counter()
        zoo.load_pair(name, recipe=recipe)
        hit = time.perf_counter() - start
        d = zoo.describe(name, recipe=recipe)
        print(
            f"\n== {name}{' (' + ' '.join(args.set) + ')' if args.set else ''}: first call {built:.1f} s, "
            f"second call {hit:.2f} s; metrics {d['metrics']}"
        )
        results[name] = {
            "first_call_seconds": built,
            "cache_hit_seconds": hit,
            "metrics": d["metrics"],
            "overrides": args.set,
        }
        if not name.startswith("tiny-vit/"):
            results[name].update(measure_lm(name, pre, post, [] if name == "tiny-lm-dpo" else ps, args.dare_seeds))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
