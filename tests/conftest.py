"""Test-wide settings: offline hubs, a private cache folder, small thread counts."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


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
