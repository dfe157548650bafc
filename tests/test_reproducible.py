"""The same seed gives the same checkpoint, bit for bit: pinned SHA-256 of edited files, at several thread counts,
whole and sharded. The hashes were computed before the deltas/checkpoints split (issue 11) and must not move: a
change of the random stream, of the rounding, or of the file layout fails here."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from unifieddelta import deltas

PINNED = {
    "dare": {
        "whole": {"model.safetensors": "c8e68ecb02a17397df17e11f991fa61ecb3995a29e070c369652365e2963f130"},
        "sharded": {
            "model-00001-of-00002.safetensors": "abdb955a3a431ec6c5af2a0374ef545d9d8c1cefd56d5cec456f49f7a42b7764",
            "model-00002-of-00002.safetensors": "ca7439b86f8701f6037b74e3dbcae00075626372531839068d85282d84d029c6",
        },
    },
    "bitdelta": {
        "whole": {"model.safetensors": "92fc1d865c289e16f3b5ab0fb78adfdd18daac89122c27667454a2373d1e482a"},
        "sharded": {
            "model-00001-of-00002.safetensors": "7577509ee9e04837adf15b087df9cd3f552ca9849bd7939dd59bc211ca5afbc8",
            "model-00002-of-00002.safetensors": "2efd49185b10bf55c216d2733ad49d71d7a6168131a91f6273a9335e79311aa1",
        },
    },
    "magnitude_trim": {
        "whole": {"model.safetensors": "d7b7eb9d4603da67c5b073e6c9a8398bcf52fd47f7c56b3c50abaf58e2bc7140"},
        "sharded": {
            "model-00001-of-00002.safetensors": "d8ef25c1ac249f9f98dd86319de61b3623bc541c305f68bc81ee91a402e39646",
            "model-00002-of-00002.safetensors": "c278f7ba04560fce493c1c0b7b78b0b9a054d0bad607e696c83e189b06eac255",
        },
    },
}
INDEX_SHA = "a2c0aa5678e203f3fe558110945d1193c2c22da001282e323205e1ce7e9ac59b"
PARAMS = {"dare": {"p": 0.9}, "bitdelta": {"bits": 2}, "magnitude_trim": {"keep": 0.1}}


@pytest.fixture(scope="module")
def pinned_pair(tmp_path_factory):
    """A pre/post pair from torch's seeded CPU normal stream alone (no model code), one tensor of 327,680 entries
    (the C kernels' sizes), and post also as two shards with an index."""
    root = tmp_path_factory.mktemp("pinned")
    g = torch.Generator().manual_seed(2024)
    shapes = {
        "model.embed_tokens.weight": (640, 512),
        "model.layers.0.mlp.up_proj.weight": (600, 512),
        "model.layers.0.input_layernorm.weight": (512,),
    }
    pre = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    post = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in pre.items()}
    config = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    for name, tensors in (("pre", pre), ("post", post)):
        (root / name).mkdir()
        save_file(tensors, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        (root / name / "config.json").write_text(config)
    sharded = root / "post-sharded"
    sharded.mkdir()
    names = list(post)
    shard = {
        names[0]: "model-00001-of-00002.safetensors",
        names[1]: "model-00002-of-00002.safetensors",
        names[2]: "model-00002-of-00002.safetensors",
    }
    for f in sorted(set(shard.values())):
        save_file({n: post[n] for n in names if shard[n] == f}, str(sharded / f), metadata={"format": "pt"})
    total = sum(t.nbytes for t in post.values())
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": shard})
    )
    (sharded / "config.json").write_text(config)
    return root / "pre", {"whole": root / "post", "sharded": sharded}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", ["whole", "sharded"])
@pytest.mark.parametrize("method", list(PINNED))
def test_edited_checkpoint_bytes_are_pinned(pinned_pair, tmp_path, method, layout, threads):
    pre, posts = pinned_pair
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = deltas.apply_edit(pre, posts[layout], method, seed=0, out=tmp_path / "out", **PARAMS[method])
    finally:
        torch.set_num_threads(old)
    got = {f.name: _sha(f) for f in sorted(out.glob("*.safetensors"))}
    assert got == PINNED[method][layout]
    if layout == "sharded":
        assert _sha(out / "model.safetensors.index.json") == INDEX_SHA
