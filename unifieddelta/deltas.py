"""Pairs of checkpoints -> named deltas; edits applied tensor by tensor; edited checkpoints written shard by shard.

A side (pre or post) is a local Hugging Face folder, a hub id, or an ``nn.Module``. Folders are read lazily:
safetensors tensor by tensor with plain file reads (so the file's pages never count as this process's memory),
neither model is ever whole in memory; ``pytorch_model*.bin`` shards are memory-mapped. Edited checkpoints are
written tensor by tensor, and entry-wise edits of large tensors in row blocks, so memory stays at a few tensors
(or blocks) whatever the checkpoint's size. The edit methods (``edits.py``) never know where tensors come from.

Arithmetic is in float64 and rounded once: the edited tensor is ``W_post + D`` with ``D = F(ΔW) − ΔW``, so an
identity edit (D = 0 exactly) gives back post bit for bit whatever its dtype.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import re
import shutil
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from . import edits, native
from .cache import atomic_dir
from .errors import (
    CheckpointError,
    InvalidParameterError,
    MismatchError,
    NonFiniteError,
    OutputExistsError,
)

__all__ = [
    "PRESETS",
    "Checkpoint",
    "plan",
    "tensor_generator",
    "open_checkpoint",
    "iter_deltas",
    "delta_stats",
    "direction",
    "apply_edit",
]

# --- choosing tensors ----------------------------------------------------------------------------------------

_EMBEDDING = re.compile(r"(embed|wte|wpe|word_embeddings|lm_head|shared\.weight)")
_NORM_OR_HEAD = re.compile(r"(norm|ln_|layernorm|lm_head|classifier|score\.|head\.)", re.IGNORECASE)

#: Presets: which floating-point tensors (name, shape) an edit touches, after ``include``/``exclude``.
PRESETS: dict[str, Callable[[str, tuple[int, ...]], bool]] = {
    # every floating-point tensor both checkpoints have (MergeLM's DARE on LLMs)
    "all": lambda name, shape: True,
    # only 2-D weight matrices, embeddings and heads included (Twin-Merging's SVD skips 1-D tensors)
    "matrices": lambda name, shape: len(shape) == 2,
    # no embeddings, norms or heads: the linear layers inside the blocks (BitDelta's scope)
    "linear": lambda name, shape: len(shape) == 2 and not _EMBEDDING.search(name) and not _NORM_OR_HEAD.search(name),
}


def _patterns(value: str | Iterable[str] | None, what: str) -> list[re.Pattern]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    try:
        return [re.compile(v) for v in items]
    except re.error as e:
        raise InvalidParameterError(f"{what}: invalid regular expression ({e})") from None


def _selector(include, exclude, preset: str) -> Callable[[str, tuple[int, ...]], bool]:
    """name, shape -> selected: matches some ``include`` (if any), no ``exclude``, and the preset."""
    if preset not in PRESETS:
        raise InvalidParameterError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    inc, exc, keep = _patterns(include, "include"), _patterns(exclude, "exclude"), PRESETS[preset]
    return lambda name, shape: (
        (not inc or any(p.search(name) for p in inc)) and not any(p.search(name) for p in exc) and keep(name, shape)
    )


# --- randomness ----------------------------------------------------------------------------------------------


def tensor_generator(seed: int, name: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded by (seed, tensor name) alone: the same draw whatever the order, sharding or threads."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidParameterError(f"seed must be an integer, got {seed!r}")
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little"))
    return generator


# --- reading checkpoints -------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}  # fmt: skip
#: Every dtype a safetensors header names (floating or not), for reading and writing raw bytes.
_ST_STORED = {
    **{k: v for k, v in _ST_DTYPES.items() if v is not None}, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16,
    "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip
_ST_NAMES = {v: k for k, v in _ST_STORED.items()}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclass
class Checkpoint:
    """One side of a pair: tensor names with shape and dtype known up front, tensors loaded one at a time."""

    label: str  # the folder, or the module's class: for messages
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype | None]  # None: not floating point
    files: dict[str, Path] = field(default_factory=dict)  # name -> weights file (folders)
    folder: Path | None = None
    index: bool = False  # the folder has a ``*.index.json`` weight map
    module: nn.Module | None = None
    config: dict[str, Any] = field(default_factory=dict)
    spans: dict[str, tuple[int, int, torch.dtype]] = field(default_factory=dict)  # safetensors: byte range, dtype
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    def get(self, name: str) -> torch.Tensor:
        """The tensor called ``name``, as stored (a fresh CPU tensor for folders, the live one for modules)."""
        if self.module is not None:
            return self.module.get_parameter(name).detach()
        if name in self.spans:
            return self._read(name, 0, self.shapes[name][0] if self.shapes[name] else None)
        handle = self._open(self.files[name])
        try:
            return handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]
        except Exception as e:  # e.g. a file that changed since its header was read
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r} ({e})") from None

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of the tensor ``name`` (first dimension), reading only those from a safetensors file."""
        if name in self.spans and self.shapes[name]:
            return self._read(name, r0, r1)
        return self.get(name)[r0:r1]

    def _read(self, name: str, r0: int, r1: int | None) -> torch.Tensor:
        """A safetensors tensor (rows r0:r1; r1=None: a 0-D one) read with plain file reads, not through a memory
        map: pages of the file stay in the OS cache instead of counting in this process's resident memory."""
        start, end, dtype = self.spans[name]
        shape = self.shapes[name]
        if r1 is not None:
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            start, end, shape = start + r0 * row_bytes, start + r1 * row_bytes, (r1 - r0, *shape[1:])
        raw = torch.empty(end - start, dtype=torch.uint8)
        try:
            with open(self.files[name], "rb") as f:
                f.seek(start)
                got = f.readinto(memoryview(raw.numpy()))
        except OSError as e:
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r} ({e})") from None
        if got != raw.numel():  # e.g. a file that changed since its header was read
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r} (truncated file)")
        return raw.view(dtype).reshape(shape)

    def _open(self, path: Path):
        if path not in self._handles:
            self._handles[path] = _open_weights(path)
        return self._handles[path]

    def close(self) -> None:
        self._handles.clear()


def _open_weights(path: Path):
    """A lazy handle on one weights file: a safetensors reader, or a memory-mapped torch state dict."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            return safe_open(str(path), framework="pt", device="cpu")  # checks the header covers the file
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or truncated weights file ({type(e).__name__}: {e})") from None


def _safetensors_spans(path: Path, names: list[str]) -> dict[str, tuple[int, int, torch.dtype]]:
    """name -> (first byte, end byte, dtype) in the file, from its header (already checked by safe_open)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    base = 8 + size
    spans = {}
    for name in names:
        info = header[name]
        if info["dtype"] in _ST_STORED:
            start, end = info["data_offsets"]
            spans[name] = (base + start, base + end, _ST_STORED[info["dtype"]])
    return spans  # tensors of other dtypes are read through safe_open


def _write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors, metadata) -> int:
    """Write a safetensors file tensor by tensor: the header first (from ``specs``: name, dtype, shape), then
    each tensor of the iterable ``tensors`` as it comes, so only one tensor is ever in memory. An item may also
    be an iterator of row blocks whose concatenation is the tensor. Returns the bytes of tensor data written."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, dtype, shape), item in zip(specs, tensors, strict=True):
            written = 0
            for t in [item] if isinstance(item, torch.Tensor) else item:
                if t.dtype != dtype or tuple(t.shape[1:]) != tuple(shape[1:]):
                    raise MismatchError(f"tensor {name!r}: produced {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
                written += t.nbytes
            if written != math.prod(shape) * dtype.itemsize:
                raise MismatchError(f"tensor {name!r}: produced {written} bytes, expected shape {shape} of {dtype}")
    return offset


def _resolve_folder(source: str | Path) -> Path:
    """A local folder for a path or a hub id; ``CheckpointError`` naming what is missing otherwise."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a checkpoint folder (it is a file)")
        return path
    text = str(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "~")):
        try:
            from huggingface_hub import snapshot_download

            patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]
            return Path(snapshot_download(text, allow_patterns=patterns))
        except Exception as e:
            raise CheckpointError(
                f"{text}: no such local path, and not a reachable hub id ({type(e).__name__})"
            ) from None
    raise CheckpointError(f"{text}: no such file or folder")


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The folder's weights files, and the index's name -> file map when there is one."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except Exception as e:
                raise CheckpointError(f"{index_path}: unreadable index ({type(e).__name__}: {e})") from None
            files = {name: folder / fname for name, fname in weight_map.items()}
            for missing in sorted({p for p in files.values() if not p.exists()}):
                raise CheckpointError(f"{folder}: shard {missing.name} listed in {index_name} is missing")
            return sorted(set(files.values())), files
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return safetensors, None
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return bins, None
    raise CheckpointError(f"{folder} is not a checkpoint folder: no *.safetensors or pytorch_model*.bin weights")


def open_checkpoint(source: str | Path | nn.Module | Checkpoint) -> Checkpoint:
    """Index one side: names, shapes and dtypes from the file headers (nothing but headers is read).

    A folder gives the tensors its weights files hold; a module gives its ``named_parameters()`` (tied weights
    once, buffers left out), the names ``approx`` and ``direction`` key by.
    """
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, nn.Module):
        params = dict(source.named_parameters())
        config = source.config.to_dict() if hasattr(getattr(source, "config", None), "to_dict") else {}
        return Checkpoint(
            label=f"a {type(source).__name__}",
            shapes={n: tuple(p.shape) for n, p in params.items()},
            dtypes={n: p.dtype if p.is_floating_point() else None for n, p in params.items()},
            module=source,
            config=config,
        )
    folder = _resolve_folder(source)
    paths, index = _weight_files(folder)
    ck = Checkpoint(label=str(folder), shapes={}, dtypes={}, folder=folder, index=index is not None)
    config_path = folder / "config.json"
    if config_path.exists():
        try:
            ck.config = json.loads(config_path.read_text())
        except Exception as e:
            raise CheckpointError(f"{config_path}: unreadable config ({type(e).__name__}: {e})") from None
    for path in paths:
        handle = ck._open(path)
        names = list(handle.keys())
        if path.suffix == ".safetensors":
            ck.spans.update(_safetensors_spans(path, names))
        for name in names:
            if index is not None and index.get(name) != path:
                continue
            if hasattr(handle, "get_slice"):
                sl = handle.get_slice(name)
                shape, dtype = tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype())
            else:
                t = handle[name]
                shape, dtype = tuple(t.shape), t.dtype if t.is_floating_point() else None
            ck.shapes[name], ck.dtypes[name], ck.files[name] = shape, dtype, path
    if index is not None:
        for name in sorted(set(index) - set(ck.files)):
            raise CheckpointError(f"{index[name]}: tensor {name!r} listed in the index is not in the file")
    return ck


# --- pairing -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tensor of post and what happens to it: ``edit``, ``grown`` (edit the shared rows), or ``keep``."""

    name: str
    kind: str
    rows: int | None = None  # for ``grown``: the rows pre has


def plan(pre: Checkpoint, post: Checkpoint, *, include=None, exclude=None, preset: str = "all") -> list[Entry]:
    """Pair the two sides tensor by tensor, from headers only, raising before any tensor is read or written.

    Tensors only one side has are kept from post (with a warning); embedding matrices that grew (added tokens)
    are edited on the shared rows (with a warning); any other shape mismatch is a ``MismatchError``.
    """
    selected = _selector(include, exclude, preset)
    a, b = pre.config.get("model_type"), post.config.get("model_type")
    if a and b and a != b:
        raise MismatchError(f"architectures do not match: pre {pre.label} is {a!r}, post {post.label} is {b!r}")
    if not set(pre.shapes) & set(post.shapes):
        raise MismatchError(f"pre {pre.label} and post {post.label} have no tensor name in common")
    entries, post_only, grown = [], [], []
    for name, shape in post.shapes.items():
        if name not in pre.shapes:
            post_only.append(name)
            entries.append(Entry(name, "keep"))
            continue
        floating = pre.dtypes[name] is not None and post.dtypes[name] is not None
        if not floating or not selected(name, shape):
            entries.append(Entry(name, "keep"))
            continue
        old = pre.shapes[name]
        if old == shape:
            entries.append(Entry(name, "edit"))
        elif _EMBEDDING.search(name) and len(old) == len(shape) and old[1:] == shape[1:] and old[0] < shape[0]:
            grown.append(f"{name} {old[0]}->{shape[0]}")
            entries.append(Entry(name, "grown", rows=old[0]))
        else:
            raise MismatchError(f"tensor {name!r}: shape {old} in pre but {shape} in post")
    pre_only = sorted(set(pre.shapes) - set(post.shapes))
    if post_only:
        warnings.warn(f"kept from post, pre lacks them: {', '.join(post_only)}", UserWarning, stacklevel=3)
    if pre_only:
        warnings.warn(f"ignored, post lacks them: {', '.join(pre_only)}", UserWarning, stacklevel=3)
    if grown:
        warnings.warn(
            f"embedding rows grew (added tokens): editing the shared rows, new rows kept from post: {', '.join(grown)}",
            UserWarning,
            stacklevel=3,
        )
    return entries


def _pair(pre, post, include, exclude, preset) -> tuple[Checkpoint, Checkpoint, list[Entry]]:
    pre_ck, post_ck = open_checkpoint(pre), open_checkpoint(post)
    return pre_ck, post_ck, plan(pre_ck, post_ck, include=include, exclude=exclude, preset=preset)


def _load_pair(pre: Checkpoint, post: Checkpoint, e: Entry) -> tuple[torch.Tensor, torch.Tensor]:
    """The entry's tensors, post cut to pre's rows for a grown embedding."""
    a, b = pre.get(e.name), post.get(e.name)
    return (a, b[: e.rows]) if e.kind == "grown" else (a, b)


def _delta(name: str, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float64, rows=None) -> torch.Tensor:
    """post − pre in ``dtype``; a ``NonFiniteError`` naming the tensor (and ``rows``, a block) if any entry is NaN or Inf."""
    d = b.to(dtype, copy=True).sub_(a.to(b.device))  # in place: no converted copy of pre, no third tensor
    if not d.numel():
        return d
    lo, hi = torch.aminmax(d)  # one pass, no mask: NaN and ±Inf show in the extremes
    if not (math.isfinite(lo) and math.isfinite(hi)):
        _not_finite(name, d.numel() - int(torch.isfinite(d).sum()), rows)
    return d


def _not_finite(name: str, bad: int, rows=None):
    where = f" rows {rows[0]}:{rows[1]}" if rows else ""
    raise NonFiniteError(f"tensor {name!r}: the delta has {bad} NaN/Inf entries{where} (pre or post is not finite)")


#: Entry-wise edits the C kernel does whole (``native.edit``): pre, post → W_post + (F(ΔW) − ΔW) in one pass.
NATIVE_METHODS = ("dare", "drop_only", "extrapolate")


def _native_step(run, name: str, a: torch.Tensor, b: torch.Tensor, seed: int, compute_dtype: torch.dtype,
                 offset: int = 0, rows=None) -> torch.Tensor | None:  # fmt: skip
    """W_post + D of a tensor or row block in one pass (the C twin of ``_delta`` → edit → ``_new_tensor``, same
    bits), or None where it does not apply: another method, fp16, a compute dtype below float32, a small tensor."""
    if (run.method not in NATIVE_METHODS or compute_dtype not in (torch.float32, torch.float64) or a.dtype != b.dtype
            or a.shape != b.shape or b.numel() < edits.NATIVE_MIN_NUMEL or not native.supports(a, b)):
        return None
    params = run.params
    if run.method == "extrapolate":
        out, bad = native.edit(a, b, compute_dtype, keep=1.0 + params["alpha"], scale_only=True)
    else:
        p, k = params["p"], params.get("k", 0.0)
        key = edits.stream_key(tensor_generator(seed, name))
        keep = edits.rescale_factor(p, k) if run.method == "dare" else 1.0
        out, bad = native.edit(a, b, compute_dtype, offset=offset, key=key, thr=edits.stream_threshold(p), keep=keep,
                               k=k)  # fmt: skip
    if bad:
        _not_finite(name, bad, rows)
    return out


def _bar(total: int, desc: str, progress: bool):
    """A progress bar over tensors that clears itself when closed (also on an error, so it never hides it)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False, disable=not progress)


def iter_deltas(pre, post, *, include=None, exclude=None, preset: str = "all") -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Yield ``(name, pre_tensor, post_tensor)`` for each selected tensor, one at a time, in post's order.

    Grown embeddings are yielded on their shared rows; tensors only one side has are skipped (with a warning).
    """
    pre_ck, post_ck, entries = _pair(pre, post, include, exclude, preset)
    for e in entries:
        if e.kind != "keep":
            yield (e.name, *_load_pair(pre_ck, post_ck, e))


def delta_stats(pre, post, *, include=None, exclude=None, preset: str = "all", progress: bool = False):
    """A tidy table, one row per selected tensor: name, shape, numel, norm, mean_abs, rel_change, frac_zero, max_abs.

    ``norm`` is ‖Δ‖ (Frobenius), ``rel_change`` is ‖Δ‖/‖W_pre‖, ``frac_zero`` the fraction of exact zeros of Δ.
    """
    import pandas as pd

    pre_ck, post_ck, entries = _pair(pre, post, include, exclude, preset)
    todo = [e for e in entries if e.kind != "keep"]
    rows = []
    with _bar(len(todo), "stats", progress) as bar:
        for e in todo:
            rows.append(_stats_row(e.name, *_load_pair(pre_ck, post_ck, e)))
            bar.update()
    columns = ["name", "shape", "numel", "norm", "mean_abs", "rel_change", "frac_zero", "max_abs"]
    return pd.DataFrame(rows, columns=columns)


def _stats_row(name: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    d = _delta(name, a, b)
    norm, pre_norm = float(torch.linalg.vector_norm(d)), float(torch.linalg.vector_norm(a.to(torch.float64)))
    n = d.numel()
    return {
        "name": name,
        "shape": tuple(d.shape),
        "numel": n,
        "norm": norm,
        "mean_abs": float(d.abs().mean()) if n else 0.0,
        "rel_change": norm / pre_norm if pre_norm else (0.0 if norm == 0 else float("inf")),
        "frac_zero": float((d == 0).sum()) / n if n else 0.0,
        "max_abs": float(d.abs().max()) if n else 0.0,
    }


# --- editing -------------------------------------------------------------------------------------------------


def _prepare(method: str, params: dict[str, Any], grad) -> Callable[[str, torch.Tensor, int], torch.Tensor]:
    """Check the method and its settings once; return ``(name, delta, seed) -> F(delta)``."""
    fn = edits.get_method(method)
    known = edits.method_params(method)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InvalidParameterError(
            f"{method}: unknown parameter(s) {', '.join(unknown)}; it takes {', '.join(known) or 'none'}"
        )
    missing = [n for n, p in known.items() if p.default is inspect.Parameter.empty and n not in params]
    if missing:
        raise InvalidParameterError(f"{method}: missing parameter(s) {', '.join(missing)}")
    if edits.needs_grad(method) and not isinstance(grad, dict):
        raise InvalidParameterError(f"{method} needs grad=: a dict of gradients keyed by tensor name")
    # Range checks now, on a tiny stand-in, so bad settings fail before anything is read or written.
    random = edits.needs_generator(method)
    probe = torch.zeros(2, 2, dtype=torch.float64)
    probe_params = dict(params, rank=1) if method == "low_rank" else dict(params)
    if random:
        probe_params["generator"] = torch.Generator()  # never the global RNG
    try:
        if method == "low_rank":
            edits.resolve_rank(params["rank"], (1,))
        fn(probe, *([probe] if edits.needs_grad(method) else []), **probe_params)
    except InvalidParameterError as e:
        raise InvalidParameterError(f"{method}: {e}") from None

    def run(name: str, delta: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
        kwargs = dict(params)
        if random:
            kwargs["generator"] = tensor_generator(seed, name)
        if offset and random:  # a row block of a random entry-wise edit: its first entry's index in the tensor
            kwargs["offset"] = offset
        args = [delta]
        if edits.needs_grad(method):
            if name not in grad:
                raise MismatchError(f"{method}: no gradient for tensor {name!r}")
            g = grad[name]
            args.append(g[: delta.shape[0]] if g.shape != delta.shape and g.ndim else g)
        try:
            return fn(*args, **kwargs)
        except (InvalidParameterError, MismatchError) as e:
            raise type(e)(f"tensor {name!r}: {e}") from None

    run.method, run.params = method, params
    return run


def _check_ranks(method: str, params: dict[str, Any], post: Checkpoint, entries: list[Entry]) -> None:
    if method == "low_rank":
        for e in entries:
            if e.kind != "keep":
                shape = post.shapes[e.name]
                shape = (e.rows, *shape[1:]) if e.kind == "grown" else shape
                try:
                    edits.resolve_rank(params["rank"], shape)
                except InvalidParameterError as err:
                    raise InvalidParameterError(f"tensor {e.name!r}: {err}") from None


def _edited(run, e: Entry, pre: Checkpoint, post: Checkpoint, seed: int, compute_dtype: torch.dtype):
    """(post tensor, D) for one entry: D = F(ΔW) − ΔW in ``compute_dtype``, on the shared rows for grown ones."""
    b_full = post.get(e.name)
    b = b_full[: e.rows] if e.kind == "grown" else b_full
    delta = _delta(e.name, pre.get(e.name), b, compute_dtype)  # pre freed at once
    edited = run(e.name, delta, seed)
    return b_full, (edited.clone() if edited is delta else edited).sub_(delta)  # in place: one copy less


def _edited_post(run, e: Entry, pre: Checkpoint, post: Checkpoint, seed: int, compute_dtype: torch.dtype):
    """W_post + D of one entry, in post's dtype: fused in one pass where the C kernel applies."""
    if e.kind != "grown":
        fused = _native_step(run, e.name, pre.get(e.name), post.get(e.name), seed, compute_dtype)
        if fused is not None:
            return fused
    return _new_tensor(*_edited(run, e, pre, post, seed, compute_dtype))


#: Entry-wise edits of tensors larger than this (in the compute dtype) are written in row blocks of about this size.
BLOCK_BYTES = 64 << 20


def _edited_blocks(run, e: Entry, pre: Checkpoint, post: Checkpoint, seed: int, compute_dtype: torch.dtype):
    """W_post + D of one entry in row blocks, for entry-wise edits (``edits.ELEMENTWISE``): each block draws its
    stretch of the tensor's counter-based random stream (``offset``), so the blocks put together are exactly the
    tensor edited whole, in a fraction of the memory (a few blocks instead of a few copies of the tensor)."""
    shape = post.shapes[e.name]
    edit_rows = e.rows if e.kind == "grown" else shape[0]
    row = math.prod(shape[1:])
    step = max(1, BLOCK_BYTES // max(1, row * compute_dtype.itemsize))
    for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        b = post.rows(e.name, r0, r1)
        if r0 >= edit_rows:  # new rows of a grown embedding: kept from post
            yield b
            continue
        cut = min(r1, edit_rows) - r0
        a = pre.rows(e.name, r0, r0 + cut)
        if cut == b.shape[0]:
            fused = _native_step(run, e.name, a, b, seed, compute_dtype, r0 * row, rows=(r0, r0 + cut))
            if fused is not None:
                yield fused
                continue
        delta = _delta(e.name, a, b[:cut], compute_dtype, rows=(r0, r0 + cut))
        edited = run(e.name, delta, seed, r0 * row)
        yield _new_tensor(b, (edited.clone() if edited is delta else edited).sub_(delta))


def _blockwise(method: str, post: Checkpoint, name: str, compute_dtype: torch.dtype) -> bool:
    shape = post.shapes[name]
    return method in edits.ELEMENTWISE and len(shape) >= 1 and math.prod(shape) * compute_dtype.itemsize > BLOCK_BYTES


def _new_tensor(b_full: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """W_post + D, rounded once to post's dtype; rows beyond D's (new tokens of a grown embedding) kept from post.

    ``d`` is consumed (added to in place) to spare one full-precision copy of the tensor.
    """
    if d.shape == b_full.shape:
        return d.add_(b_full).to(b_full.dtype)  # post promoted on the fly (exactly), no converted copy
    out = b_full.clone()
    out[: d.shape[0]] = d.add_(b_full[: d.shape[0]]).to(b_full.dtype)
    return out


def direction(
    pre, post, method: str, *, seed: int = 0, include=None, exclude=None, preset: str = "all", grad=None,
    compute_dtype: torch.dtype = torch.float64, progress: bool = False, **params,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """D = F(ΔW) − ΔW per selected tensor, keyed by post's parameter names, in post's dtype: the edited model is W_post + D.

    Rows of a grown embedding that pre lacks get D = 0. ``grad`` (a dict by name) is for ``product_biased``.
    """
    run = _prepare(method, params, grad)
    pre_ck, post_ck, entries = _pair(pre, post, include, exclude, preset)
    _check_ranks(method, params, post_ck, entries)
    todo = [e for e in entries if e.kind != "keep"]
    out = {}
    with _bar(len(todo), f"{method} D", progress) as bar:
        for e in todo:
            b_full, d = _edited(run, e, pre_ck, post_ck, seed, compute_dtype)
            if d.shape != b_full.shape:  # a grown embedding: the new rows do not move
                d = torch.cat([d, d.new_zeros((b_full.shape[0] - d.shape[0], *d.shape[1:]))])
            out[e.name] = d.to(b_full.dtype)
            bar.update()
    return out


def _load_model(folder: Path) -> nn.Module:
    """The folder's Hugging Face model, in its stored dtype (the class named in config.json)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or transformers.AutoModel
    try:
        return cls.from_pretrained(folder, dtype="auto")
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot load the model ({type(e).__name__}: {e})") from None


def apply_edit(
    pre, post, method: str, *, seed: int = 0, include=None, exclude=None, preset: str = "all", out=None,
    overwrite: bool = False, inplace: bool = False, grad=None, compute_dtype: torch.dtype = torch.float64,
    progress: bool = False, **params,
):  # fmt: skip
    """W_pre + F(ΔW): an edited in-memory model (``out=None``), or a checkpoint written to ``out`` (its path).

    In memory: post is a module (edited on a copy unless ``inplace``) or a folder loaded whole. On disk: post's
    shards are rewritten one at a time, every other file of post (config, tokenizer, generation config) copied,
    all into a temporary folder renamed to ``out`` at the end, so a failure leaves no half checkpoint.
    """
    if out is not None and Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{out} exists (overwrite it with --overwrite, or overwrite=True)")
    run = _prepare(method, params, grad)
    if out is None or isinstance(post, nn.Module):
        if isinstance(post, nn.Module):
            model = post if inplace else copy.deepcopy(post)
        else:
            model = _load_model(_resolve_folder(post))
        pre_ck, post_ck, entries = _pair(pre, model, include, exclude, preset)
        _check_ranks(method, params, post_ck, entries)
        todo = [e for e in entries if e.kind != "keep"]
        new = {}  # computed before any parameter changes, so an error leaves the model untouched
        with _bar(len(todo), method, progress) as bar:
            for e in todo:
                new[e.name] = _edited_post(run, e, pre_ck, post_ck, seed, compute_dtype)
                bar.update()
        with torch.no_grad():
            for name, t in new.items():
                model.get_parameter(name).copy_(t)
        if out is None:
            return model
        if not hasattr(model, "save_pretrained"):
            raise InvalidParameterError("out= with an nn.Module post needs a Hugging Face model (save_pretrained)")
        with atomic_dir(out, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
            _write_provenance(tmp, pre, post, method, seed, params, include, exclude, preset)
        return Path(out)

    pre_ck, post_ck, entries = _pair(pre, post, include, exclude, preset)
    _check_ranks(method, params, post_ck, entries)
    by_name = {e.name: e for e in entries}
    shards: dict[Path, list[str]] = {}
    for name, path in post_ck.files.items():
        shards.setdefault(path, []).append(name)
    total = sum(e.kind != "keep" for e in entries)

    def produce(names):  # one tensor at a time, written as soon as it is made
        for name in names:
            e = by_name[name]
            if e.kind == "keep":
                yield post_ck.get(name)
            elif _blockwise(method, post_ck, name, compute_dtype):
                yield _edited_blocks(run, e, pre_ck, post_ck, seed, compute_dtype)
                bar.update()
            else:
                yield _edited_post(run, e, pre_ck, post_ck, seed, compute_dtype)
                bar.update()

    with _bar(total, method, progress) as bar, atomic_dir(out, overwrite=overwrite) as tmp:
        for f in sorted(post_ck.folder.iterdir()):
            if f.is_file() and not f.name.startswith(".") and not _is_weights(f.name):
                shutil.copy2(f, tmp / f.name)
        weight_map, nbytes = {}, 0
        for path, names in shards.items():
            fname = path.name if path.suffix == ".safetensors" else path.with_suffix(".safetensors").name
            fname = fname.replace("pytorch_model", "model")
            specs = [(n, _stored_dtype(post_ck, n), post_ck.shapes[n]) for n in names]
            nbytes += _write_safetensors(tmp / fname, specs, produce(names), metadata={"format": "pt"})
            weight_map.update({n: fname for n in names})
        if post_ck.index:
            index = {"metadata": {"total_size": nbytes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _write_provenance(tmp, pre, post, method, seed, params, include, exclude, preset)
    post_ck.close()
    pre_ck.close()
    return Path(out)


def _stored_dtype(ck: Checkpoint, name: str) -> torch.dtype:
    """The dtype a folder stores the tensor in (floating or not), from the header or the memory-mapped .bin."""
    if name in ck.spans:
        return ck.spans[name][2]
    return ck.dtypes.get(name) or ck.get(name).dtype


def _is_weights(fname: str) -> bool:
    return fname.endswith(_WEIGHT_SUFFIXES) or fname.endswith(".index.json")


def _write_provenance(folder: Path, pre, post, method, seed, params, include, exclude, preset) -> None:
    """What made this checkpoint, beside it: the pair, the method, its settings, the seed."""
    name = lambda s: type(s).__name__ if isinstance(s, nn.Module) else str(s)  # noqa: E731
    record = {
        "pre": name(pre), "post": name(post), "method": method, "params": params, "seed": seed,
        "include": include, "exclude": exclude, "preset": preset, "formula": "W_pre + F(W_post - W_pre)",
    }  # fmt: skip
    (folder / "unifieddelta_edit.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
