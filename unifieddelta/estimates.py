"""What a profile would cost on the paper's hub models, before anything is fetched: estimates, labelled as such.

Parameter counts come from the models' cards, the loss data's size from the datasets' cards, and the throughput is
an assumption (``ASSUMED_FLOPS``), not a measurement: the dry run and the page on running the book on your own
models print these numbers as estimates.
"""

from __future__ import annotations

import math
from pathlib import Path

#: Parameter counts of the paper's hub models (from their model cards), for estimates before anything is fetched.
KNOWN_PARAMETERS = {
    "meta-llama/Meta-Llama-3-8B": 8.03e9,
    "meta-llama/Meta-Llama-3-8B-Instruct": 8.03e9,
    "mistralai/Mistral-7B-v0.3": 7.25e9,
    "mistralai/Mistral-7B-Instruct-v0.3": 7.25e9,
    "Qwen/Qwen2-7B": 7.62e9,
    "Qwen/Qwen2-7B-Instruct": 7.62e9,
    "alignment-handbook/zephyr-7b-sft-full": 7.24e9,
    "alignment-handbook/zephyr-7b-dpo-full": 7.24e9,
}
#: Loss data whose size the estimate knows: (examples, tokens per example, roughly; a preference triple counts its
#: chosen and its rejected sequence).
KNOWN_LOSS_DATA = {
    "hf:openai/gsm8k:main:test": (1319, 250),
    "hf:tatsu-lab/alpaca:train[:1319]": (1319, 200),
    "hf:HuggingFaceH4/ultrafeedback_binarized:test_prefs": (2000, 900),
}
#: An assumption, not a measurement: a current data-centre GPU sustains about 160 TFLOP/s in bfloat16 on a
#: transformer's forward and backward passes (400 peak at 40% utilisation).
ASSUMED_FLOPS = 160e12
#: The memory of one GPU the estimate places models on (an 80 GB H100 or A100): above it, ``device="auto"``
#: spreads each model over several (activations not counted).
GPU_BYTES = 80e9


def term_seconds(parameters: float, examples: int, tokens: int, points: int, flops: float = ASSUMED_FLOPS) -> float:
    """Estimated seconds of one approximation term: ``points`` forward and backward passes (≈ 6 FLOPs per parameter
    and token) over ``examples`` loss examples of ``tokens`` tokens."""
    return points * 6.0 * parameters * examples * tokens / flops


def gpu_memory_bytes(parameters: float, bytes_per_value: int = 2) -> float:
    """Estimated GPU memory of a trial's term, without activations: five values per parameter, the pre-trained
    and the post-trained weights (pre is the DPO loss's reference too), their copy at W_post + t·D, the gradient
    and D."""
    return 5.0 * bytes_per_value * parameters


def trial_term_seconds(t) -> float | None:
    """Estimated GPU seconds of one trial's term on a hub model of known size and loss data of known size (a
    trial's ``loss_examples`` caps the examples); None otherwise."""
    size, data = KNOWN_PARAMETERS.get(t.pair.post), KNOWN_LOSS_DATA.get(t.pair.loss_data)
    if size is None or data is None or "term" not in t.measure:
        return None
    return term_seconds(size, min(t.loss_examples or data[0], data[0]), data[1], t.points)


def estimate(chapter) -> dict | None:
    """A chapter's cost on the paper's hub models, not measured: parameters (model cards), GPU memory of the term
    (without activations) and the GPUs it needs, term trials and their GPU seconds (None where the loss data's size
    is unknown). None for a chapter on the zoo's pairs or local folders; {"parameters": None} for a hub model of
    unknown size."""
    hub = [p for p in chapter.pairs if not p.zoo and not Path(p.post).expanduser().is_dir()]
    if not hub:
        return None
    sizes = [KNOWN_PARAMETERS.get(p.post) for p in hub]
    if None in sizes:
        return {"parameters": None}
    size = max(sizes)
    terms = [t for t in chapter.trials if "term" in t.measure and t.pair in hub]
    seconds = [trial_term_seconds(t) for t in terms]
    memory = gpu_memory_bytes(size)
    data = sorted({t.pair.loss_data for t in terms if t.pair.loss_data in KNOWN_LOSS_DATA})
    return {
        "parameters": size,
        "memory": memory,
        "gpus": max(1, math.ceil(memory / GPU_BYTES)),
        "term_trials": len(terms),
        "term_seconds": None if None in seconds else sum(seconds),
        "data": {d: KNOWN_LOSS_DATA[d] for d in data},
    }


def estimate_line(e: dict) -> str:
    if e["parameters"] is None:
        return "  estimate: unknown model size (not one of the paper's models); no estimate"
    line = (
        f"  estimate (not measured: parameters from the model cards, an assumed {ASSUMED_FLOPS / 1e12:.0f} TFLOP/s): "
        f"{e['parameters'] / 1e9:.1f}B parameters, GPU memory ≈ {e['memory'] / 2**30:.0f} GiB in bfloat16 for the "
        "term plus activations"
    )
    if e["gpus"] > 1:
        line += (
            f" (more than one {GPU_BYTES / 1e9:.0f} GB GPU: about {e['gpus']} with device='auto', or one larger GPU)"
        )
    if e["term_seconds"] is not None and e["term_trials"]:
        data = "; ".join(
            f"{d.removeprefix('hf:')}: up to {n:,} examples of ~{k} tokens" for d, (n, k) in e["data"].items()
        )
        line += (
            f"; the term ≈ {e['term_seconds'] / e['term_trials']:.0f} s per trial on average ({data}), "
            f"{e['term_trials']} term trial(s) ≈ {e['term_seconds'] / 3600:.1f} GPU-hours; scores: not estimated"
        )
    return line
