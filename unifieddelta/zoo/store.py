"""Cache entries of the zoo: folders built atomically, with a manifest of checksums to detect corruption.

An entry is complete when its ``zoo.json`` lists every file with its size and SHA-256 and the files match. A
missing, truncated or edited file makes the entry invalid; ``build_entry`` then rebuilds it (with a warning)
instead of handing a broken checkpoint to the caller.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Callable

from ..cache import atomic_dir, cache_dir

MANIFEST = "zoo.json"


def entry_path(kind: str, key: str) -> Path:
    """Where the entry of ``kind`` with cache ``key`` lives."""
    return cache_dir("zoo") / f"{kind}-{key}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def read_manifest(path: Path) -> dict | None:
    """The entry's manifest if the entry is complete and intact, else None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for rel, meta in files.items():
        p = path / rel
        if not p.is_file() or p.stat().st_size != meta["size"] or _sha256(p) != meta["sha256"]:
            return None
    return manifest


def build_entry(kind: str, key: str, builder: Callable[[Path], dict], *, info: dict | None = None) -> Path:
    """Return the intact entry for ``(kind, key)``, building it with ``builder(tmp_dir) -> metrics`` if needed.

    The builder writes into a temporary folder that is renamed into place only when it returns, so a crash
    never leaves a half entry. ``info`` (the recipe, say) is stored in the manifest beside the metrics.
    """
    path = entry_path(kind, key)
    if read_manifest(path) is not None:
        return path
    if path.exists():
        warnings.warn(f"zoo entry {path} is incomplete or corrupted; rebuilding it", RuntimeWarning, stacklevel=3)
    start = time.perf_counter()
    with atomic_dir(path, overwrite=True) as tmp:
        metrics = builder(tmp) or {}
        manifest = {
            "kind": kind,
            "key": key,
            "info": info or {},
            "metrics": metrics,
            "build_seconds": round(time.perf_counter() - start, 2),
            "files": _files(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
    return path
