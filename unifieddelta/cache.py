"""Where the project keeps what it computes (models, data, executed notebooks), and atomic writes into it.

The cache lives under ``$UNIFIEDDELTA_CACHE`` if set, else ``~/.cache/unifieddelta``; never in the repository.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def cache_dir(*parts: str) -> Path:
    """The project's cache directory (or a sub-folder of it), created if missing."""
    root = Path(os.environ.get("UNIFIEDDELTA_CACHE") or Path.home() / ".cache" / "unifieddelta")
    path = root.joinpath(*parts).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(*items: object, length: int = 16) -> str:
    """A short hex digest of JSON-serialisable items (dict keys sorted), for cache keys."""
    h = hashlib.sha256()
    for item in items:
        data = item if isinstance(item, bytes) else json.dumps(item, sort_keys=True, default=str).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:length]


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it to ``target`` only if the block succeeds.

    A crash or an exception leaves ``target`` as it was (absent, or the old version) and removes the
    temporary folder, so readers never see a half-written result.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} exists")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temporary file and a rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
