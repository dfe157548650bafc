"""Training Gemma-3-270m here: a full SFT on the project's six tasks, then DPO from the SFT model (``gemma.build``).

An own loop rather than a ``Trainer``: with a 262k-token vocabulary the output layer is most of the cost, and the
loss needs it only at the answer tokens (a few per example), so the loop projects just those positions
(``losses.answer_logprobs``). DPO's reference log-probabilities are those of the starting (SFT) weights, computed
once before training, so no second model is held in memory. Before a stage loads its model, ``check_memory`` raises
if the machine lacks the memory the stage needs.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UnifiedDeltaError
from ..losses import IGNORE, answer_logprobs, encode_pair, pad_rows
from ..tasks import generate

GB = 1e9


# ---------------------------------------------------------------------------------------------- memory


def available_memory_gb() -> float:
    """Memory the system can give a new allocation now (MemAvailable), in GB."""
    import psutil

    return psutil.virtual_memory().available / GB


def memory_need_gb(recipe, stage: str, parameters: int) -> float:
    """Peak memory a stage needs: weights, gradients and AdamW's two moments in float32 (16 bytes a parameter),
    the activations of a batch (measured: about 2 GB for Gemma-3-270m's 16 examples) and 1.5 GB for the rest."""
    rows = recipe.sft_batch if stage == "sft" else 2 * recipe.dpo_batch
    return 16 * parameters / GB + 0.125 * rows * recipe.max_tokens / 96 + 1.5


def check_memory(need_gb: float, what: str) -> None:
    """Raise before ``what`` starts if less than ``need_gb`` GB are available (rather than swap or be killed)."""
    have = available_memory_gb()
    if have < need_gb:
        raise UnifiedDeltaError(
            f"{what} needs about {need_gb:.1f} GB of memory but {have:.1f} GB are available; "
            "free memory or lower the batch size"
        )


# ---------------------------------------------------------------------------------------------- training


def _rows(tokenizer, pairs, max_tokens: int, *, eos: bool = False) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of (prompt, answer) pairs: the prompt with the tokenizer's BOS, the answer without
    special tokens (and closed by EOS if ``eos``), labels only on the answer."""
    out = []
    for prompt, answer in pairs:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
        out.append(encode_pair(prompt, ids, tokenizer, max_tokens))
    return out


def _batch(rows, tokenizer) -> dict[str, torch.Tensor]:
    return pad_rows(list(rows), tokenizer.pad_token_id or 0)


def _schedule(n: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """Indices of each step's batch: seeded shuffles of ``range(n)``, one epoch after another."""
    rng, order = random.Random(f"gemma-order:{seed}"), []
    while len(order) < batch * steps:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order += epoch
    return [order[i * batch : (i + 1) * batch] for i in range(steps)]


@torch.no_grad()
def sequence_logprobs(model, rows, tokenizer, *, batch_size: int = 32, bf16: bool = False) -> torch.Tensor:
    """Summed answer log-probabilities of ``rows`` (from ``_rows``) under ``model``, in eval mode, as float64."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(rows), batch_size):
            with _autocast(model, bf16):
                out.append(answer_logprobs(model, _batch(rows[i : i + batch_size], tokenizer)).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def heldout_nll(model, tokenizer, pairs, *, max_tokens: int = 96) -> float:
    """Mean negative log-likelihood per answer token of (prompt, answer) pairs (float32, no EOS), as
    ``losses.causal_lm_nll`` defines it."""
    rows = _rows(tokenizer, pairs, max_tokens)
    tokens = sum(sum(label != IGNORE for label in labels[1:]) for _, labels in rows)
    return float(-sequence_logprobs(model, rows, tokenizer).sum() / tokens)


def heldout_pairs(recipe, per_task: int | None = None) -> list[tuple[str, str]]:
    """(prompt, " answer") of the first ``per_task`` (default: the recipe's ``sft_heldout_per_task``) test items of each
    task: never trained on."""
    per_task = recipe.sft_heldout_per_task if per_task is None else per_task
    return [
        (generate.prompt(it["question"]), " " + it["answer"])
        for task in generate.TASKS
        for it in generate.split(task, n_test=recipe.n_test, seed=recipe.seed)[1][:per_task]
    ]


def _autocast(model, bf16: bool):
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)


def train(model, steps: int, lr: float, warmup: int, step_loss: Callable[[int], torch.Tensor], **options) -> dict:
    """AdamW on every parameter of ``model`` (no weight decay, cosine schedule after ``warmup`` steps, gradients
    clipped at norm 1), ``step_loss(step)`` giving each step's loss; options ``bf16``, ``progress``, ``desc``.
    Returns the per-step losses and seconds."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all tensors, about 4x faster than the default loop on CPU for Gemma's 268M weights
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    schedule = get_cosine_schedule_with_warmup(opt, warmup, steps)
    model.train()
    losses, seconds = [], []
    for step in tqdm(range(steps), desc=options.get("desc"), disable=not options.get("progress")):
        start = time.perf_counter()
        with _autocast(model, options.get("bf16", False)):
            loss = step_loss(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seconds.append(time.perf_counter() - start)
    model.eval()
    return {"train_losses": losses, "step_seconds": seconds}


def _parameters(folder: Path) -> int:
    """Parameter count of a float32 safetensors checkpoint, from its file sizes (without loading it)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) // 4


def _load(parent: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32), AutoTokenizer.from_pretrained(parent)


def _summary(history: dict) -> dict:
    losses, seconds = history["train_losses"], sorted(history["step_seconds"])
    k = max(1, len(losses) // 10)
    return {
        **history,
        "train_loss_first": sum(losses[:k]) / k,
        "train_loss_last": sum(losses[-k:]) / k,
        "step_seconds_median": seconds[len(seconds) // 2],
        "train_seconds": sum(seconds),
        "peak_rss_gb": peak_rss_gb(),
    }


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (VmHWM; Linux), in GB: NaN where the system does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return float("nan")


def sft(recipe, parent: Path, out: Path, progress: bool) -> dict:
    """Full fine-tune on ``Question: … Answer: …`` of the tasks' training items; loss on the answer and EOS only."""
    check_memory(memory_need_gb(recipe, "sft", _parameters(parent)), "Gemma SFT")
    torch.manual_seed(recipe.seed)
    model, tokenizer = _load(parent)
    examples = generate.sft_examples(recipe.sft_examples, seed=recipe.seed, n_test=recipe.n_test)
    rows = _rows(tokenizer, [(e["prompt"], e["completion"]) for e in examples], recipe.max_tokens, eos=True)
    order = _schedule(len(rows), recipe.sft_batch, recipe.sft_steps, recipe.seed)
    held_out = heldout_pairs(recipe)
    nll_before = heldout_nll(model, tokenizer, held_out, max_tokens=recipe.max_tokens)

    def step_loss(step: int) -> torch.Tensor:
        batch = _batch([rows[i] for i in order[step]], tokenizer)
        return -answer_logprobs(model, batch).sum() / (batch["labels"][:, 1:] != IGNORE).sum()

    history = train(
        model, recipe.sft_steps, recipe.sft_lr, recipe.sft_warmup, step_loss,
        bf16=recipe.bf16, progress=progress, desc="Gemma SFT",
    )  # fmt: skip
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        **_summary(history),
        "heldout_nll_pre": nll_before,
        "heldout_nll_post": heldout_nll(model, tokenizer, held_out, max_tokens=recipe.max_tokens),
        "heldout_pairs": len(held_out),
        "answer_tokens_seen": sum(sum(lab != IGNORE for lab in rows[i][1][1:]) for o in order for i in o),
    }


def _dpo_rows(tokenizer, pairs: list[dict], max_tokens: int) -> list:
    """Chosen rows of ``pairs`` followed by their rejected rows."""
    chosen = _rows(tokenizer, [(p["prompt"], p["chosen"]) for p in pairs], max_tokens)
    return chosen + _rows(tokenizer, [(p["prompt"], p["rejected"]) for p in pairs], max_tokens)


def dpo_objective(logp: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """Per pair −log σ(β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]); ``logp`` and ``ref`` hold
    the chosen rows, then the rejected ones (as ``losses.dpo_loss``)."""
    margin = logp - ref.to(logp)
    n = len(margin) // 2
    return -F.logsigmoid(beta * (margin[:n] - margin[n:]))


def _heldout_preference(recipe, model, tokenizer, rows, ref: torch.Tensor) -> dict:
    logp = sequence_logprobs(model, rows, tokenizer)
    n = len(rows) // 2
    return {
        "heldout_dpo_loss": float(dpo_objective(logp, ref, recipe.dpo_beta).mean()),
        "heldout_pref_acc": float((logp[:n] > logp[n:]).double().mean()),
        "heldout_pref_acc_sft": float((ref[:n] > ref[n:]).double().mean()),
    }


def dpo(recipe, parent: Path, out: Path, progress: bool) -> dict:
    """DPO from the SFT model on (right answer, the item's plausible wrong answer); the reference is the SFT model,
    whose log-probabilities are computed once, before the first update."""
    check_memory(memory_need_gb(recipe, "dpo", _parameters(parent)), "Gemma DPO")
    torch.manual_seed(recipe.seed)
    model, tokenizer = _load(parent)
    pairs = generate.preference_pairs(recipe.dpo_pairs, seed=recipe.seed, n_test=recipe.n_test)
    order = _schedule(len(pairs), recipe.dpo_batch, recipe.dpo_steps, recipe.seed)
    used = sorted({i for o in order for i in o})  # reference log-probs only for the pairs a step draws
    slot = {i: k for k, i in enumerate(used)}
    rows = _dpo_rows(tokenizer, [pairs[i] for i in used], recipe.max_tokens)
    ref = sequence_logprobs(model, rows, tokenizer, bf16=recipe.bf16)  # same precision as the training steps
    test = generate.preference_pairs(
        recipe.dpo_heldout_pairs, seed=recipe.seed, n_test=recipe.n_test, split_name="test"
    )
    test_rows = _dpo_rows(tokenizer, test, recipe.max_tokens)
    test_ref = sequence_logprobs(model, test_rows, tokenizer)

    def step_loss(step: int) -> torch.Tensor:
        k = [slot[i] for i in order[step]]
        idx = k + [j + len(used) for j in k]
        logp = answer_logprobs(model, _batch([rows[j] for j in idx], tokenizer))
        return dpo_objective(logp, ref[idx], recipe.dpo_beta).mean()

    history = train(
        model, recipe.dpo_steps, recipe.dpo_lr, recipe.dpo_warmup, step_loss,
        bf16=recipe.bf16, progress=progress, desc="Gemma DPO",
    )  # fmt: skip
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {**_summary(history), **_heldout_preference(recipe, model, tokenizer, test_rows, test_ref)}
