"""What several test files share: seeded tensors, small Llamas (from the package's one builder, ``zoo.lm.llama``),
saved pre/post checkpoints, token data, directions, and snapshots of a model's parameters."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from unifieddelta.zoo.lm import llama


def rand(*shape, seed=0, dtype=torch.float64):
    """Standard normal numbers from a seed, drawn in float64 and then cast (the same values for every dtype)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- small Llamas ----------------------------------------------------------------------------------------------


def checkpoint_llama(seed: int = 0, vocab: int = 64, hidden: int = 16, layers: int = 2):
    """A float32 Llama with grouped-query attention and untied embeddings, for the checkpoint-editing tests."""
    return llama(
        width=hidden,
        layers=layers,
        heads=2,
        kv_heads=1,
        vocab_size=vocab,
        intermediate=2 * hidden,
        max_positions=64,
        seed=seed,
    ).eval()


def f64_llama(seed: int = 0, attn: str = "sdpa", layers: int = 1):
    """A float64 Llama with tied embeddings, small enough for exact checks of the approximation term in well
    under a second."""
    return (
        llama(
            width=16,
            layers=layers,
            heads=2,
            vocab_size=64,
            intermediate=32,
            max_positions=64,
            tie=True,
            attn=attn,
            seed=seed,
        )
        .double()
        .eval()
    )


# --- saved checkpoints -----------------------------------------------------------------------------------------


def post_of(pre, scale: float = 0.01, seed: int = 1):
    """A "post-trained" copy: pre plus a small random delta on every parameter."""
    post = copy.deepcopy(pre)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in post.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return post


def save(model, folder: Path, dtype=None, **kwargs) -> Path:
    """save_pretrained (in ``dtype`` if given) plus a stand-in tokenizer file, to check that edits copy it."""
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **kwargs)
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}) + "\n")
    return Path(folder)


def save_pair(root: Path, dtype=None, sharded: bool = False):
    """(pre folder, post folder) under ``root``; post split into many small shards if ``sharded``."""
    pre = checkpoint_llama()
    post = post_of(pre)
    kwargs = {"max_shard_size": "4KB"} if sharded else {}
    return save(pre, root / "pre", dtype), save(post, root / "post", dtype, **kwargs)


def load_tensors(folder: Path) -> dict:
    """Every tensor of a folder's safetensors files, by name (shards merged by globbing, ignoring the index)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --- data, directions, snapshots -------------------------------------------------------------------------------


def token_pairs(n: int = 6, seed: int = 1):
    """(prompt ids, answer ids) pairs of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lp, la = 3 + i % 3, 2 + i % 4
        out.append(
            (torch.randint(3, 64, (lp,), generator=g).tolist(), torch.randint(3, 64, (la,), generator=g).tolist())
        )
    return out


def random_direction(model: nn.Module, scale: float = 0.02, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return {
        n: scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        for n, p in model.named_parameters()
    }


def snapshot(model: nn.Module):
    """Parameter objects and their exact bytes, to check that a call left the model bit for bit as it was."""
    return {n: (p, p.detach().cpu().numpy().tobytes()) for n, p in model.named_parameters()}


def unchanged(model: nn.Module, snap) -> bool:
    now = dict(model.named_parameters())
    return now.keys() == snap.keys() and all(
        now[n] is p and now[n].detach().cpu().numpy().tobytes() == b and p.grad is None for n, (p, b) in snap.items()
    )


def gpt2_pair(root: Path):
    """(pre, post) GPT-2 checkpoints with their own BPE tokenizer: another architecture than the zoo's Llama."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from unifieddelta.tasks import generate
    from unifieddelta.zoo.lm import train_tokenizer

    tok = train_tokenizer(generate.pretraining_texts(200), 300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=128,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    for name, scale in (("pre", 0.0), ("post", 0.01)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
        model.save_pretrained(Path(root) / name)
        tok.save_pretrained(Path(root) / name)
    return Path(root) / "pre", Path(root) / "post"


# --- skipping -----------------------------------------------------------------------------------------------


def needs(available: bool, what: str, *, strict: str = "UNIFIEDDELTA_STRICT"):
    """A mark that skips a test when ``what`` is missing here, with the reason, unless the environment variable
    ``strict`` is set: then the test runs and fails. ``.ci/run`` sets UNIFIEDDELTA_STRICT, so the C kernels and the
    peft cross-checks can never silently skip in CI; ``make check-book`` sets UNIFIEDDELTA_REQUIRE_BROWSER."""
    if available or os.environ.get(strict):
        return pytest.mark.skipif(False, reason=what)  # run (and fail on the missing tool, if it is missing)
    return pytest.mark.skip(reason=f"{what} (set {strict}=1 to fail instead of skipping)")
