"""Reading and writing Hugging Face checkpoints, tensor by tensor: the only module that knows about files.

A side of a pair (pre or post) is a local folder, a hub id, or an ``nn.Module``; :func:`open_checkpoint` indexes it
from the file headers alone (names, shapes, dtypes), and :class:`Checkpoint` hands out one tensor (or one block of
rows) at a time. Safetensors are read with plain file reads, not memory maps, so the file's pages never count as
this process's memory; ``pytorch_model*.bin`` shards are memory-mapped. :func:`write_like` writes a checkpoint in
another's layout (its shards, its index, its config and tokenizer files) from tensors produced one at a time, so
memory stays at a few tensors whatever the checkpoint's size. What to do with the tensors lives in ``deltas.py``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .errors import CheckpointError, MismatchError

__all__ = ["Checkpoint", "open_checkpoint", "resolve_folder", "load_model", "write_safetensors", "write_like"]

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}
#: Every dtype a safetensors header names (floating or not), for reading and writing raw bytes.
_ST_STORED = {
    **{k: v for k, v in _ST_DTYPES.items() if v is not None},
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
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

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype the tensor is stored in (floating or not), from the header or the memory-mapped .bin."""
        if name in self.spans:
            return self.spans[name][2]
        return self.dtypes.get(name) or self.get(name).dtype

    def close(self) -> None:
        """Drop the open file handles (safetensors readers, memory maps); reading again reopens them."""
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors, metadata) -> int:
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
                    raise MismatchError(
                        f"tensor {name!r}: produced {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}"
                    )
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
                written += t.nbytes
            if written != math.prod(shape) * dtype.itemsize:
                raise MismatchError(f"tensor {name!r}: produced {written} bytes, expected shape {shape} of {dtype}")
    return offset


def resolve_folder(source: str | Path) -> Path:
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
    folder = resolve_folder(source)
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


def load_model(folder: Path) -> nn.Module:
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


def _is_weights(fname: str) -> bool:
    return fname.endswith(_WEIGHT_SUFFIXES) or fname.endswith(".index.json")


def write_like(like: Checkpoint, folder: Path, produce: Callable[[list[str]], Iterable]) -> None:
    """Write into ``folder`` a checkpoint in ``like``'s layout: each of its weights files as a safetensors file of
    the same tensors, from ``produce(names)`` (which yields them in order, each a tensor or an iterator of row
    blocks), its index with the new total size if it had one, and every other file (config, tokenizer) copied."""
    for f in sorted(like.folder.iterdir()):
        if f.is_file() and not f.name.startswith(".") and not _is_weights(f.name):
            shutil.copy2(f, folder / f.name)
    shards: dict[Path, list[str]] = {}
    for name, path in like.files.items():
        shards.setdefault(path, []).append(name)
    weight_map, nbytes = {}, 0
    for path, names in shards.items():
        fname = path.name if path.suffix == ".safetensors" else path.with_suffix(".safetensors").name
        fname = fname.replace("pytorch_model", "model")
        specs = [(n, like.stored_dtype(n), like.shapes[n]) for n in names]
        nbytes += write_safetensors(folder / fname, specs, produce(names), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    if like.index:
        index = {"metadata": {"total_size": nbytes}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
