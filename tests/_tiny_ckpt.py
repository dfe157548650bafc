"""Tiny saved LlamaForCausalLM pre/post checkpoints for the delta-editing tests (never a hub id)."""

import json
from pathlib import Path

import torch


def tiny_llama(seed: int = 0, vocab: int = 64, hidden: int = 16, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def post_of(pre, scale: float = 0.01, seed: int = 1):
    """A "post-trained" copy: pre plus a small random delta on every parameter."""
    import copy

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
    pre = tiny_llama()
    post = post_of(pre)
    kwargs = {"max_shard_size": "4KB"} if sharded else {}
    return save(pre, root / "pre", dtype), save(post, root / "post", dtype, **kwargs)


def load_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out
