"""Small deterministic models and data shared by the approximation-term tests (and their torchrun worker)."""

import torch
from torch import nn


def tiny_llama(seed: int = 0, attn: str = "sdpa", layers: int = 1):
    """A float64 LlamaForCausalLM small enough for exact checks in well under a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, attn_implementation=attn)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).double().eval()


def token_pairs(n: int = 6, seed: int = 1):
    """(prompt ids, answer ids) pairs of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lp, la = 3 + i % 3, 2 + i % 4
        out.append((torch.randint(3, 64, (lp,), generator=g).tolist(), torch.randint(3, 64, (la,), generator=g).tolist()))
    return out


def random_direction(model: nn.Module, scale: float = 0.02, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for n, p in model.named_parameters()}


def snapshot(model: nn.Module):
    """Parameter objects and their exact bytes, to check that a call left the model bit for bit as it was."""
    return {n: (p, p.detach().cpu().numpy().tobytes()) for n, p in model.named_parameters()}


def unchanged(model: nn.Module, snap) -> bool:
    now = dict(model.named_parameters())
    return now.keys() == snap.keys() and all(
        now[n] is p and now[n].detach().cpu().numpy().tobytes() == b and p.grad is None for n, (p, b) in snap.items()
    )
