"""Pairs of checkpoints -> deltas; an edit applied tensor by tensor; the edited model ``W_post + D``.

How a pair is streamed into an edited checkpoint (``apply_edit(pre, post, method, out=...)``):

1. ``checkpoints.open_checkpoint`` indexes each side from its file headers (names, shapes, dtypes);
2. :func:`pair_tensors` pairs them tensor by tensor (edit, edit the shared rows of a grown embedding, or keep from post)
   and raises on a mismatch before anything is read or written;
3. ``checkpoints.write_like`` rewrites post's weights files one by one into a temporary folder, asking
   :func:`_edited_tensor` (or :func:`_edited_rows`, row block by row block, for large entry-wise edits) for each
   tensor in turn: ``W_post + D`` with ``D = F(ΔW) − ΔW``, computed in float64 (or ``compute_dtype``) and rounded
   once to post's dtype; entry-wise edits with a C kernel do it in one pass (:meth:`_Edit.fused`);
4. the folder is renamed to ``out`` only when complete (``cache.atomic_dir``).

So memory stays at a few tensors (or blocks), whatever the checkpoint's size, and an identity edit (D = 0
exactly) gives back post bit for bit whatever its dtype. What an edit needs from this driver (a generator, the
gradient, row blocks, a fused step, a shape check) it declares in ``edits.EDITS``; the methods never know where
tensors come from.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from . import edits, native
from .cache import atomic_dir
from .checkpoints import Checkpoint, load_model, open_checkpoint, resolve_folder, write_like
from .errors import InvalidParameterError, MismatchError, NonFiniteError, OutputExistsError

__all__ = [
    "PRESETS",
    "tensor_role",
    "pair_tensors",
    "layer_of",
    "tensor_generator",
    "iter_deltas",
    "delta_stats",
    "direction",
    "apply_edit",
]

# --- choosing tensors ----------------------------------------------------------------------------------------

_EMBEDDING = re.compile(r"(embed|wte|wpe|word_embeddings|lm_head|shared\.weight)")
_NORM_OR_HEAD = re.compile(r"(norm|ln_|layernorm|lm_head|classifier|score\.|head\.)", re.IGNORECASE)

_ROLES = [  # (role, pattern), the first match wins: Llama, GPT-2, BERT and ViT names
    ("norm", re.compile(r"(norm|ln_|layernorm)", re.IGNORECASE)),
    ("embedding", re.compile(r"(embed|wte|wpe|word_embeddings|position|cls_token|patch)")),
    ("head", re.compile(r"(lm_head|classifier|score\.|pooler)")),
    ("attention", re.compile(r"(attn|attention)")),
    ("MLP", re.compile(r"(mlp|intermediate|output\.dense|ffn|fc|c_proj)")),
]


def tensor_role(name: str) -> str:
    """What a tensor is, from its name: attention, MLP, norm, embedding, head, or other."""
    return next((role for role, pattern in _ROLES if pattern.search(name)), "other")


def layer_of(name: str) -> str:
    """``layer 3`` for a tensor of an encoder's or decoder's block N = 3, else the first part of its name."""
    found = re.search(r"\.(?:layer|layers|h)\.(\d+)\.", name)
    return f"layer {found.group(1)}" if found else name.split(".")[0]


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


# --- pairing the two sides ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tensor of post and what happens to it: ``edit``, ``grown`` (edit the shared rows), or ``keep``."""

    name: str
    action: str
    rows: int | None = None  # for ``grown``: the rows pre has


def _pairable(pre, post):
    """``pre`` opened so that it pairs with ``post`` by name: when post is a Hugging Face module whose (converted)
    parameter names a folder's files mostly lack — transformers renames some on load (ViT's encoder.layer.N.* ->
    layers.N.*) — the folder is loaded as post's class."""
    pre_ck = open_checkpoint(pre)
    if isinstance(post, nn.Module) and hasattr(type(post), "from_pretrained") and pre_ck.folder is not None:
        names = {n for n, _ in post.named_parameters()}
        if len(names & set(pre_ck.shapes)) < len(names) / 2:
            pre_ck.close()
            dtype = next(iter(post.parameters())).dtype
            return open_checkpoint(type(post).from_pretrained(pre_ck.folder, dtype=dtype).eval())
    return pre_ck


def pair_tensors(pre: Checkpoint, post: Checkpoint, *, include=None, exclude=None, preset: str = "all") -> list[Entry]:
    """Pair the two sides tensor by tensor, from headers only, raising before any tensor is read or written.

    Tensors only post has are kept from post (with a warning); floating-point tensors only pre has are ignored (with
    a warning), integer buffers only pre has silently; embedding matrices that grew (added tokens)
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
    # an integer buffer only pre stores (BERT's embeddings.position_ids, which newer transformers stop saving) is
    # no weight and no delta: ignored without a word; a floating-point tensor post lacks is worth a warning
    pre_only = sorted(n for n in set(pre.shapes) - set(post.shapes) if pre.dtypes.get(n) is not None)
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


def _tensors(pre: Checkpoint, post: Checkpoint, e: Entry) -> tuple[torch.Tensor, torch.Tensor]:
    """The entry's tensors, post cut to pre's rows for a grown embedding."""
    a, b = pre.get(e.name), post.get(e.name)
    return (a, b[: e.rows]) if e.action == "grown" else (a, b)


def _delta(name: str, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float64, rows=None) -> torch.Tensor:
    """post − pre in ``dtype``; a ``NonFiniteError`` naming the tensor (and ``rows``, a block) if any entry is NaN or
    Inf."""
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


def _bar(total: int, desc: str, progress: bool):
    """A progress bar over tensors that clears itself when closed (also on an error, so it never hides it)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False, disable=not progress)


# --- reading deltas ------------------------------------------------------------------------------------------


def iter_deltas(
    pre, post, *, include=None, exclude=None, preset: str = "all", dtype: torch.dtype = torch.float64
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, ΔW)`` for each selected tensor, one at a time, in post's order (ΔW in ``dtype``).

    Grown embeddings are yielded on their shared rows; tensors only one side has are skipped (with a warning);
    a delta with NaN or Inf entries raises a ``NonFiniteError`` naming the tensor.
    """
    with _pairable(pre, post) as pre_ck, open_checkpoint(post) as post_ck:
        for e in pair_tensors(pre_ck, post_ck, include=include, exclude=exclude, preset=preset):
            if e.action != "keep":
                yield e.name, _delta(e.name, *_tensors(pre_ck, post_ck, e), dtype)


def delta_stats(pre, post, *, include=None, exclude=None, preset: str = "all", progress: bool = False):
    """A tidy table, one row per selected tensor: name, shape, numel, norm, mean_abs, rel_change, frac_zero, max_abs.

    ``norm`` is ‖Δ‖ (Frobenius), ``rel_change`` is ‖Δ‖/‖W_pre‖, ``frac_zero`` the fraction of exact zeros of Δ.
    """
    import pandas as pd

    rows = []
    with _pairable(pre, post) as pre_ck, open_checkpoint(post) as post_ck:
        todo = [
            e
            for e in pair_tensors(pre_ck, post_ck, include=include, exclude=exclude, preset=preset)
            if e.action != "keep"
        ]
        with _bar(len(todo), "stats", progress) as bar:
            for e in todo:
                rows.append(_stats_row(e.name, *_tensors(pre_ck, post_ck, e)))
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


# --- one edit, checked once ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Edit:
    """An edit whose settings have been checked: ``apply`` runs it on one delta tensor (or row block of one)."""

    method: str
    spec: edits.EditSpec
    params: dict
    grad: dict | None

    @property
    def seeded(self) -> bool:
        return self.spec.seeded(self.params)

    def apply(self, name: str, delta: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
        """F(delta) for the tensor ``name``; ``offset``: the index of a row block's first entry in the tensor."""
        kwargs = dict(self.params)
        if self.seeded:
            kwargs["generator"] = tensor_generator(seed, name)
            if offset:  # a row block of a random entry-wise edit: its stretch of the tensor's stream
                kwargs["offset"] = offset
        args = [delta]
        if self.spec.needs_grad:
            if name not in self.grad:
                raise MismatchError(f"{self.method}: no gradient for tensor {name!r}")
            g = self.grad[name]
            args.append(g[: delta.shape[0]] if g.shape != delta.shape and g.ndim else g)
        try:
            return self.spec.fn(*args, **kwargs)
        except (InvalidParameterError, MismatchError) as e:
            raise type(e)(f"tensor {name!r}: {e}") from None

    def fused(
        self,
        name: str,
        a: torch.Tensor,
        b: torch.Tensor,
        seed: int,
        compute_dtype: torch.dtype,
        offset: int = 0,
        rows=None,
    ) -> torch.Tensor | None:
        """W_post + D of a tensor or row block in one C pass (the twin of ``_delta`` → ``apply`` → ``_add``, same
        bits), or None where it does not apply: no fused step, fp16, a compute dtype below float32, a small tensor."""
        if (
            self.spec.fused is None
            or compute_dtype not in (torch.float32, torch.float64)
            or a.dtype != b.dtype
            or a.shape != b.shape
            or b.numel() < edits.NATIVE_MIN_NUMEL
            or not native.supports(a, b)
        ):
            return None
        kwargs = self.spec.fused(**self.params)
        if self.seeded:
            kwargs.update(offset=offset, key=edits.stream_key(tensor_generator(seed, name)))
        out, bad = native.edit(a, b, compute_dtype, **kwargs)
        if bad:
            _not_finite(name, bad, rows)
        return out


def _prepare(method: str, params: dict[str, Any], grad) -> _Edit:
    """Check the method and its settings once, before anything is read or written."""
    spec = edits.spec(method)
    edits.check_settings(method, params)
    if spec.needs_grad and not isinstance(grad, dict):
        raise InvalidParameterError(f"{method} needs grad=: a dict of gradients keyed by tensor name")
    return _Edit(method, spec, dict(params), grad)


def _check_fits(edit: _Edit, post: Checkpoint, entries: list[Entry]) -> None:
    """Settings that depend on a tensor's shape (a rank), checked on every tensor before any is edited."""
    if edit.spec.fits is None:
        return
    for e in entries:
        if e.action != "keep":
            shape = post.shapes[e.name]
            try:
                edit.spec.fits(edit.params, (e.rows, *shape[1:]) if e.action == "grown" else shape)
            except InvalidParameterError as err:
                raise InvalidParameterError(f"tensor {e.name!r}: {err}") from None


# --- W_post + D, tensor by tensor ----------------------------------------------------------------------------


def _post_and_direction(
    edit: _Edit, e: Entry, pre: Checkpoint, post: Checkpoint, seed: int, compute_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(post's tensor, D = F(ΔW) − ΔW in ``compute_dtype``); for a grown embedding D covers the shared rows only."""
    b_full = post.get(e.name)
    b = b_full[: e.rows] if e.action == "grown" else b_full
    delta = _delta(e.name, pre.get(e.name), b, compute_dtype)  # pre freed at once
    edited = edit.apply(e.name, delta, seed)
    return b_full, (edited.clone() if edited is delta else edited).sub_(delta)  # in place: one copy less


def _add(b_full: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """W_post + D, rounded once to post's dtype; rows beyond D's (new tokens of a grown embedding) kept from post.

    ``d`` is consumed (added to in place) to spare one full-precision copy of the tensor.
    """
    if d.shape == b_full.shape:
        return d.add_(b_full).to(b_full.dtype)  # post promoted on the fly (exactly), no converted copy
    out = b_full.clone()
    out[: d.shape[0]] = d.add_(b_full[: d.shape[0]]).to(b_full.dtype)
    return out


def _edited_tensor(
    edit: _Edit, e: Entry, pre: Checkpoint, post: Checkpoint, seed: int, compute_dtype: torch.dtype
) -> torch.Tensor:
    """W_post + D of one whole tensor, in post's dtype: fused in one pass where the edit has a C step."""
    if e.action != "grown":
        fused = edit.fused(e.name, pre.get(e.name), post.get(e.name), seed, compute_dtype)
        if fused is not None:
            return fused
    return _add(*_post_and_direction(edit, e, pre, post, seed, compute_dtype))


#: Entry-wise edits of tensors larger than this (in the compute dtype) are written in row blocks of about this size.
BLOCK_BYTES = 64 << 20


def _in_rows(edit: _Edit, post: Checkpoint, name: str, compute_dtype: torch.dtype) -> bool:
    shape = post.shapes[name]
    return edit.spec.entrywise and len(shape) >= 1 and math.prod(shape) * compute_dtype.itemsize > BLOCK_BYTES


def _edited_rows(
    edit: _Edit, e: Entry, pre: Checkpoint, post: Checkpoint, seed: int, compute_dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """W_post + D of one tensor in row blocks, for entry-wise edits: each block draws its stretch of the tensor's
    counter-based random stream (``offset``), so the blocks put together are exactly the tensor edited whole, in a
    fraction of the memory (a few blocks instead of a few copies of the tensor)."""
    shape = post.shapes[e.name]
    edit_rows = e.rows if e.action == "grown" else shape[0]
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
            fused = edit.fused(e.name, a, b, seed, compute_dtype, r0 * row, rows=(r0, r0 + cut))
            if fused is not None:
                yield fused
                continue
        delta = _delta(e.name, a, b[:cut], compute_dtype, rows=(r0, r0 + cut))
        edited = edit.apply(e.name, delta, seed, r0 * row)
        yield _add(b, (edited.clone() if edited is delta else edited).sub_(delta))


# --- the public editing functions ----------------------------------------------------------------------------


def direction(
    pre,
    post,
    method: str,
    *,
    seed: int = 0,
    include=None,
    exclude=None,
    preset: str = "all",
    grad=None,
    compute_dtype: torch.dtype = torch.float64,
    progress: bool = False,
    **params,
) -> dict[str, torch.Tensor]:
    """D = F(ΔW) − ΔW per selected tensor, keyed by post's parameter names, in post's dtype: the edited model is
    W_post + D.

    Rows of a grown embedding that pre lacks get D = 0. ``grad`` (a dict by name) is for ``product_biased``.
    """
    edit = _prepare(method, params, grad)
    out = {}
    with _pairable(pre, post) as pre_ck, open_checkpoint(post) as post_ck:
        entries = pair_tensors(pre_ck, post_ck, include=include, exclude=exclude, preset=preset)
        _check_fits(edit, post_ck, entries)
        todo = [e for e in entries if e.action != "keep"]
        with _bar(len(todo), f"{method} D", progress) as bar:
            for e in todo:
                b_full, d = _post_and_direction(edit, e, pre_ck, post_ck, seed, compute_dtype)
                if d.shape != b_full.shape:  # a grown embedding: the new rows do not move
                    d = torch.cat([d, d.new_zeros((b_full.shape[0] - d.shape[0], *d.shape[1:]))])
                out[e.name] = d.to(b_full.dtype)
                bar.update()
    return out


def apply_edit(
    pre,
    post,
    method: str,
    *,
    seed: int = 0,
    include=None,
    exclude=None,
    preset: str = "all",
    out=None,
    overwrite: bool = False,
    inplace: bool = False,
    grad=None,
    compute_dtype: torch.dtype = torch.float64,
    progress: bool = False,
    **params,
):
    """W_pre + F(ΔW): an edited in-memory model (``out=None``), or a checkpoint written to ``out`` (its path).

    In memory: post is a module (edited on a copy unless ``inplace``) or a folder loaded whole. On disk: post's
    shards are rewritten one at a time, every other file of post (config, tokenizer, generation config) copied,
    all into a temporary folder renamed to ``out`` at the end, so a failure leaves no half checkpoint.
    """
    if out is not None and Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{out} exists (overwrite it with --overwrite, or overwrite=True)")
    edit = _prepare(method, params, grad)
    select = dict(include=include, exclude=exclude, preset=preset)
    if out is not None and not isinstance(post, nn.Module):
        _edit_on_disk(edit, pre, post, seed, select, out, overwrite, compute_dtype, progress)
        return Path(out)
    if isinstance(post, nn.Module):
        model = post if inplace else copy.deepcopy(post)
    else:
        model = load_model(resolve_folder(post))
    _edit_in_memory(edit, pre, model, seed, select, compute_dtype, progress)
    if out is None:
        return model
    if not hasattr(model, "save_pretrained"):
        raise InvalidParameterError("out= with an nn.Module post needs a Hugging Face model (save_pretrained)")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        _write_provenance(tmp, pre, post, method, seed, params, **select)
    return Path(out)


def _edit_in_memory(edit: _Edit, pre, model: nn.Module, seed: int, select: dict, compute_dtype, progress) -> None:
    """Edit the module's parameters; every new tensor is computed before any parameter changes, so an error leaves
    the model untouched."""
    with _pairable(pre, model) as pre_ck, open_checkpoint(model) as post_ck:
        entries = pair_tensors(pre_ck, post_ck, **select)
        _check_fits(edit, post_ck, entries)
        todo = [e for e in entries if e.action != "keep"]
        new = {}
        with _bar(len(todo), edit.method, progress) as bar:
            for e in todo:
                new[e.name] = _edited_tensor(edit, e, pre_ck, post_ck, seed, compute_dtype)
                bar.update()
    with torch.no_grad():
        for name, t in new.items():
            model.get_parameter(name).copy_(t)


def _edit_on_disk(
    edit: _Edit, pre, post, seed: int, select: dict, out, overwrite: bool, compute_dtype, progress: bool
) -> None:
    """Write the edited checkpoint in post's layout into a temporary folder, renamed to ``out`` when complete."""
    with open_checkpoint(pre) as pre_ck, open_checkpoint(post) as post_ck:
        entries = {e.name: e for e in pair_tensors(pre_ck, post_ck, **select)}
        _check_fits(edit, post_ck, list(entries.values()))

        def produce(names: list[str]) -> Iterable:  # one tensor at a time, written as soon as it is made
            for name in names:
                e = entries[name]
                if e.action == "keep":
                    yield post_ck.get(name)
                    continue
                if _in_rows(edit, post_ck, name, compute_dtype):
                    yield _edited_rows(edit, e, pre_ck, post_ck, seed, compute_dtype)
                else:
                    yield _edited_tensor(edit, e, pre_ck, post_ck, seed, compute_dtype)
                bar.update()

        total = sum(e.action != "keep" for e in entries.values())
        with _bar(total, edit.method, progress) as bar, atomic_dir(out, overwrite=overwrite) as tmp:
            write_like(post_ck, tmp, produce)
            _write_provenance(tmp, pre, post, edit.method, seed, edit.params, **select)


def _write_provenance(folder: Path, pre, post, method, seed, params, include, exclude, preset) -> None:
    """What made this checkpoint, beside it: the pair, the method, its settings, the seed."""
    name = lambda s: type(s).__name__ if isinstance(s, nn.Module) else str(s)
    record = {
        "pre": name(pre),
        "post": name(post),
        "method": method,
        "params": params,
        "seed": seed,
        "include": include,
        "exclude": exclude,
        "preset": preset,
        "formula": "W_pre + F(W_post - W_pre)",
    }
    (Path(folder) / "unifieddelta_edit.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
