"""Test-wide settings: offline hubs, a private cache folder, small thread counts."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Point the project's cache at a temporary folder so tests never touch (or depend on) the user's cache."""
    old = os.environ.get("UNIFIEDDELTA_CACHE")
    os.environ["UNIFIEDDELTA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("UNIFIEDDELTA_CACHE", None)
    else:
        os.environ["UNIFIEDDELTA_CACHE"] = old


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """Saved tiny Llama checkpoints (pre, post, post in many small shards), float32; tests never write into them."""
    from helpers import save_pair

    root = tmp_path_factory.mktemp("pair")
    pre, post = save_pair(root)
    sharded = save_pair(root / "sharded", sharded=True)[1]
    return pre, post, sharded


@pytest.fixture(scope="session")
def pair_bf16(tmp_path_factory):
    """The same pair saved in bfloat16: (pre, post)."""
    from helpers import save_pair

    return save_pair(tmp_path_factory.mktemp("bf16"), dtype=torch.bfloat16)
