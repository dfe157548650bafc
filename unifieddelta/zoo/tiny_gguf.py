"""A two-layer Gemma-3 GGUF of about 22k parameters, written here: what smoke runs and tests convert and train.

It has Gemma-3's layout (tensor names, norms stored as 1 + w as llama.cpp writes them, a sentencepiece-style
vocabulary of single characters) and Q8_0-quantized matrices, so conversion, de-quantization and the training stages
run the code paths the real 253 MB file runs, in seconds. The file is the same bytes for a seed on every machine.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch

from ..cache import cache_dir

WIDTH, HEAD_DIM, FFN, LAYERS = 32, 16, 64, 2
VERSION = 1  # of the file's contents: bump when the writer changes


def _tokens() -> tuple[list[str], list[int]]:
    """Gemma's four special tokens, then the word boundary and every printable ASCII character."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    chars = ["\u2581"] + [c for c in string.printable if c not in " \t\r\x0b\x0c"]
    return specials + chars, [3, 3, 3, 2] + [1] * len(chars)


def _tensors(vocab: int, rng: torch.Generator) -> dict[str, torch.Tensor]:
    """Gemma-3 weights under their GGUF names, numpy's (out, in) order; norms stored as 1 + w, as llama.cpp does."""
    w = lambda *shape: torch.randn(*shape, generator=rng) * 0.2
    norm = lambda n: 1 + 0.1 * torch.randn(n, generator=rng)
    out = {"token_embd.weight": w(vocab, WIDTH), "output_norm.weight": norm(WIDTH)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        out |= {
            b + "attn_q.weight": w(2 * HEAD_DIM, WIDTH),
            b + "attn_k.weight": w(HEAD_DIM, WIDTH),
            b + "attn_v.weight": w(HEAD_DIM, WIDTH),
            b + "attn_output.weight": w(WIDTH, 2 * HEAD_DIM),
            b + "ffn_gate.weight": w(FFN, WIDTH),
            b + "ffn_up.weight": w(FFN, WIDTH),
            b + "ffn_down.weight": w(WIDTH, FFN),
        }
        for name, n in [("attn_norm", WIDTH), ("attn_q_norm", HEAD_DIM), ("attn_k_norm", HEAD_DIM)]:
            out[f"{b}{name}.weight"] = norm(n)
        for name in ("post_attention_norm", "ffn_norm", "post_ffw_norm"):
            out[f"{b}{name}.weight"] = norm(WIDTH)
    return out


def write_tiny_gguf(path: str | os.PathLike, seed: int = 0) -> Path:
    """A loadable two-layer Gemma-3 GGUF at ``path``: Q8_0 matrices, float32 norms, its own vocabulary."""
    import gguf
    import numpy as np

    tokens, types = _tokens()
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny gemma3")
    for add, value in [
        (writer.add_context_length, 128), (writer.add_embedding_length, WIDTH), (writer.add_block_count, LAYERS),
        (writer.add_feed_forward_length, FFN), (writer.add_head_count, 2), (writer.add_head_count_kv, 1),
        (writer.add_key_length, HEAD_DIM), (writer.add_value_length, HEAD_DIM), (writer.add_sliding_window, 64),
        (writer.add_layer_norm_rms_eps, 1e-6), (writer.add_rope_freq_base, 10000.0),
        (writer.add_tokenizer_model, "llama"), (writer.add_tokenizer_pre, "default"), (writer.add_token_list, tokens),
        (writer.add_token_scores, [0.0] * len(tokens)), (writer.add_token_types, types),
        (writer.add_bos_token_id, 2), (writer.add_eos_token_id, 1), (writer.add_unk_token_id, 3),
        (writer.add_pad_token_id, 0), (writer.add_add_bos_token, True), (writer.add_add_eos_token, False),
    ]:  # fmt: skip
        add(value)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, t in _tensors(len(tokens), torch.Generator().manual_seed(seed)).items():
        a = t.numpy().astype(np.float32)
        if a.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(a, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def cached_tiny_gguf(seed: int = 0) -> Path:
    """The tiny file in the project's cache (``zoo/tiny-gemma3-v<VERSION>-<seed>.gguf``), written on first use."""
    path = cache_dir("zoo") / f"tiny-gemma3-v{VERSION}-{seed}.gguf"
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write_tiny_gguf(tmp, seed)
        os.replace(tmp, path)  # whole or not at all
    return path
