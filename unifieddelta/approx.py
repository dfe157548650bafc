"""The approximation term, the exact loss change and the second-order term of an edit.

An edit moves the post-trained weights W to W + D (D = F(ΔW) − ΔW). Exactly,

    ΔL = L(W + D) − L(W) = ∫₀¹ ⟨∇L(W + tD), D⟩ dt,

and the paper approximates the integral by a left Riemann sum with C = 5 points: the *approximation term*.
Here the integrand f(t) = ⟨∇L(W + tD), D⟩ is evaluated at the nodes of a quadrature rule, either by a
backward pass (``mode="grad"``, which also splits f into one inner product per tensor) or by a forward-mode
directional derivative (``mode="jvp"``, no gradient buffers). Sums run in float64 across tensors and batches.

The model is never mutated: every evaluation goes through ``torch.func.functional_call`` with substituted
tensors, so its parameters stay bit for bit what they were, whatever ``loss_fn`` does or raises.

Data parallel: if ``torch.distributed`` is initialised with more than one process, each process evaluates
its share of the loss (the losses in :mod:`unifieddelta.losses` take every world-size-th batch) and only the
per-tensor scalars are summed across processes, so every process returns the same numbers as one process would.
A hand-written ``loss_fn`` must then return this process's share of the loss itself.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jvp
from tqdm.auto import tqdm

from .errors import InvalidParameterError, MismatchError, NonFiniteError

RULES = ("left", "right", "midpoint", "trapezoid", "gauss")
MODES = ("grad", "jvp")

LossFn = Callable[[nn.Module], torch.Tensor]


@dataclass
class ApproxResult:
    """What :func:`approximation_term` computed: the term, its split per tensor, and the integrand at each node."""

    term: float  # Σ_k w_k f(t_k)
    per_tensor: dict[str, float]  # name -> Σ_k w_k ⟨∇_name L(W + t_k D), D_name⟩ (empty in jvp mode)
    nodes: list[float]  # t_k in [0, 1]
    weights: list[float]  # w_k, summing to 1
    values: list[float]  # f(t_k) = ⟨∇L(W + t_k D), D⟩
    losses: list[float]  # L(W + t_k D), a by-product of the same passes
    rule: str
    mode: str
    forward_passes: int = 0  # over all batches on this process (a jvp pass counts as one forward)
    backward_passes: int = 0


# ---------------------------------------------------------------------------------------------- quadrature


def quadrature(points: int, rule: str = "left") -> tuple[list[float], list[float]]:
    """Nodes and weights on [0, 1] of a rule with ``points`` evaluations of the integrand.

    ``left`` is the paper's t = c/C, c = 0..C−1 (t = 0 is the post-trained model itself); ``right`` uses
    c = 1..C; ``midpoint`` (c + ½)/C; ``trapezoid`` C equally spaced nodes including both ends (C ≥ 2);
    ``gauss`` Gauss–Legendre, exact for integrands of degree ≤ 2C − 1.
    """
    if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 1:
        raise InvalidParameterError(f"points must be an integer >= 1, got {points!r}")
    if rule not in RULES:
        raise InvalidParameterError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")
    c = np.arange(points, dtype=np.float64)
    if rule == "left":
        nodes, weights = c / points, np.full(points, 1 / points)
    elif rule == "right":
        nodes, weights = (c + 1) / points, np.full(points, 1 / points)
    elif rule == "midpoint":
        nodes, weights = (c + 0.5) / points, np.full(points, 1 / points)
    elif rule == "trapezoid":
        if points < 2:
            raise InvalidParameterError("the trapezoid rule needs points >= 2 (both ends of [0, 1])")
        nodes, weights = c / (points - 1), np.full(points, 1 / (points - 1))
        weights[[0, -1]] /= 2
    else:  # gauss: map Gauss–Legendre from [-1, 1] to [0, 1]
        x, w = np.polynomial.legendre.leggauss(int(points))
        nodes, weights = (x + 1) / 2, w / 2
    return nodes.tolist(), weights.tolist()


# ---------------------------------------------------------------------------------------------- helpers


def _directions(model: nn.Module, direction: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
    """name -> (parameter, D cast to the parameter's dtype and device), after checking names, shapes and finiteness."""
    params = dict(model.named_parameters())
    unknown = [n for n in direction if n not in params]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise MismatchError(f"direction names {len(unknown)} tensor(s) the model does not have: {shown}")
    out = {}
    for name, d in direction.items():
        p = params[name]
        if not isinstance(d, torch.Tensor):
            raise InvalidParameterError(f"direction[{name!r}] is a {type(d).__name__}, expected a tensor")
        if tuple(d.shape) != tuple(p.shape):
            raise MismatchError(f"direction[{name!r}] has shape {tuple(d.shape)}, the parameter has {tuple(p.shape)}")
        if not torch.isfinite(d).all():
            raise NonFiniteError(f"direction[{name!r}] contains NaN or Inf")
        out[name] = (p, d.detach().to(device=p.device, dtype=p.dtype))
    return out


class _LossOf(nn.Module):
    """``loss_fn(model)`` as a module, so ``functional_call`` can run it on substituted parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self) -> torch.Tensor:
        return self.loss_fn(self.model)


def _call(model: nn.Module, loss_fn: LossFn, tensors: Mapping[str, torch.Tensor], t: float) -> torch.Tensor:
    """loss_fn(model) with the named parameters replaced by ``tensors``; the module itself is left untouched."""
    loss = functional_call(_LossOf(model, loss_fn), {f"model.{n}": x for n, x in tensors.items()}, ())
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise InvalidParameterError(f"loss_fn must return a scalar tensor, got {shape} (at t={t:.4g})")
    return loss.reshape(())


def _parts(loss_fn: LossFn) -> list[LossFn]:
    """The loss as pieces that sum to it: one per batch of this process for the losses of `losses.py`, else itself."""
    parts = getattr(loss_fn, "parts", None)
    return list(parts()) if callable(parts) else [loss_fn]


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor of scalars over processes (a no-op in one process)."""
    if not _distributed():
        return x
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    y = x.to(device)
    torch.distributed.all_reduce(y)
    return y.to(x.device)


def _check_finite(loss: torch.Tensor | float, t: float, what: str = "the loss") -> None:
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} is {value} at t={t:.4g} (W + t·D)")


def _progress(total: int, desc: str) -> tqdm:
    quiet = _distributed() and torch.distributed.get_rank() != 0
    return tqdm(total=total, desc=desc, leave=False, disable=True if quiet else None)


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch Hugging Face models to the plain-PyTorch ("eager") attention for the block, then switch back.

    The fused SDPA kernels have no forward-mode derivative and no double backward (torch 2.13 on CPU:
    ``_scaled_dot_product_flash_attention_for_cpu``); eager attention is ordinary ops, which have both.
    """
    configs = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs[id(config)] = (config, config._attn_implementation)
    try:
        for config, _ in configs.values():
            config._attn_implementation = "eager"
        yield
    finally:
        for config, old in configs.values():
            config._attn_implementation = old


def _dot(a: torch.Tensor | None, b: torch.Tensor) -> float:
    """⟨a, b⟩ in float64 (None, an unused parameter's gradient, counts as zero)."""
    return 0.0 if a is None else float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()))


# ---------------------------------------------------------------------------------------------- the three quantities


def approximation_term(
    model: nn.Module,
    direction: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    *,
    points: int = 5,
    rule: str = "left",
    mode: str = "grad",
) -> ApproxResult:
    """Σ_k w_k ⟨∇L(W + t_k D), D⟩ over the nodes of ``rule``: the paper's term for rule="left", points=5.

    ``direction`` maps parameter names to D (absent names are zero). In ``grad`` mode each node costs a forward
    and a backward pass per batch and yields the split per tensor; ``jvp`` costs one forward-mode pass per batch
    (about the memory of inference) and leaves ``per_tensor`` empty.
    """
    nodes, weights = quadrature(points, rule)
    if mode not in MODES:
        raise InvalidParameterError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    dirs = _directions(model, direction)
    names = list(dirs)
    parts = _parts(loss_fn)
    local = not _distributed()  # in one process, fail at the first bad node; else only after the reduction
    vals = torch.zeros(len(nodes), max(len(names), 1), dtype=torch.float64)  # f(t_k) split per tensor
    losses = torch.zeros(len(nodes), dtype=torch.float64)
    bar = _progress(len(nodes) * len(parts), f"approximation term ({rule}, {mode})")
    with bar, contextlib.ExitStack() as stack:
        if mode == "jvp":
            stack.enter_context(_eager_attention(model))
            stack.enter_context(torch.no_grad())  # forward-mode AD needs no autograd graph
        for k, t in enumerate(nodes):
            at = {n: p.detach() if t == 0 else p.detach() + t * d for n, (p, d) in dirs.items()}
            for part in parts:
                if not dirs:  # D = 0: the integrand vanishes, only the loss is left to evaluate
                    with torch.no_grad():
                        loss = _call(model, part, {}, t)
                    if local:
                        _check_finite(loss, t)
                elif mode == "grad":
                    x = {n: w.detach().requires_grad_(True) for n, w in at.items()}  # fresh leaves: no .grad buffers
                    loss = _call(model, part, x, t)
                    if local:
                        _check_finite(loss, t)
                    grads = [None] * len(x)  # a loss that does not depend on the parameters: zero gradient
                    if loss.requires_grad:
                        grads = torch.autograd.grad(loss, list(x.values()), allow_unused=True)
                    for i, (g, (_, d)) in enumerate(zip(grads, dirs.values())):
                        vals[k, i] += _dot(g, d)
                else:
                    tangents = {n: d for n, (_, d) in dirs.items()}
                    try:
                        loss, df = jvp(lambda x: _call(model, part, x, t), (at,), (tangents,))
                    except NotImplementedError as e:  # e.g. a fused attention kernel outside Hugging Face's switch
                        raise NotImplementedError(f"{e}\nmode='jvp' needs forward-mode derivatives of every op the "
                                                  "model runs; use mode='grad' or a plain-PyTorch attention") from e
                    if local:
                        _check_finite(loss, t)
                    vals[k, 0] += float(df.double())
                losses[k] += float(loss.detach().double())
                if local:
                    _check_finite(vals[k].sum(), t, "the directional derivative ⟨∇L, D⟩")
                bar.update()
    reduced = _all_reduce(torch.cat([vals.reshape(-1), losses]))
    vals, losses = reduced[: vals.numel()].reshape(vals.shape), reduced[vals.numel() :]
    for k, t in enumerate(nodes):
        _check_finite(losses[k], t)
        _check_finite(vals[k].sum(), t, "the directional derivative ⟨∇L, D⟩")
    w = torch.tensor(weights, dtype=torch.float64)
    per_tensor = (w[:, None] * vals).sum(0)
    n = len(nodes) * len(parts)
    return ApproxResult(
        term=float(per_tensor.sum()),
        per_tensor={name: float(v) for name, v in zip(names, per_tensor)} if mode == "grad" else {},
        nodes=nodes,
        weights=weights,
        values=vals.sum(1).tolist(),
        losses=losses.tolist(),
        rule=rule,
        mode=mode,
        forward_passes=n,
        backward_passes=n if mode == "grad" else 0,
    )


def loss_change(model: nn.Module, direction: Mapping[str, torch.Tensor], loss_fn: LossFn) -> float:
    """The exact L(W + D) − L(W) (two forward passes per batch, differences summed in float64)."""
    dirs = _directions(model, direction)
    local = not _distributed()
    total = torch.zeros(3, dtype=torch.float64)  # [ΔL, L(W), L(W + D)]
    with torch.no_grad():
        for part in _parts(loss_fn):
            before = float(_call(model, part, {}, 0.0).double())
            after = float(_call(model, part, {n: p + d for n, (p, d) in dirs.items()}, 1.0).double())
            if local:
                _check_finite(before, 0.0)
                _check_finite(after, 1.0)
            total += torch.tensor([after - before, before, after], dtype=torch.float64)
    total = _all_reduce(total)
    _check_finite(total[1], 0.0)
    _check_finite(total[2], 1.0)
    return float(total[0])


def second_order_term(model: nn.Module, direction: Mapping[str, torch.Tensor], loss_fn: LossFn) -> float:
    """½·Dᵀ H D at W, by a Hessian-vector product (double backward; one forward, two backward passes per batch)."""
    dirs = _directions(model, direction)
    local = not _distributed()
    total = torch.zeros(2, dtype=torch.float64)  # [½ DᵀHD, L(W)]
    with _eager_attention(model):  # the fused attention kernels have no double backward
        for part in _parts(loss_fn):
            x = {n: p.detach().requires_grad_(True) for n, (p, _) in dirs.items()}
            loss = _call(model, part, x, 0.0)
            if local:
                _check_finite(loss, 0.0)
            value = 0.0
            if x and loss.requires_grad:
                grads = torch.autograd.grad(loss, list(x.values()), create_graph=True, allow_unused=True)
                gd = sum((g * d).sum() for g, (_, d) in zip(grads, dirs.values()) if g is not None)
                if isinstance(gd, torch.Tensor) and gd.requires_grad:
                    hd = torch.autograd.grad(gd, list(x.values()), allow_unused=True)
                    value = 0.5 * sum(_dot(h, d) for h, (_, d) in zip(hd, dirs.values()))
            total += torch.tensor([value, float(loss.detach().double())], dtype=torch.float64)
    total = _all_reduce(total)
    _check_finite(total[1], 0.0)
    _check_finite(total[0], 0.0, "½·DᵀHD")
    return float(total[0])


# ---------------------------------------------------------------------------------------------- Figure 3


def _edit_spec(edit) -> tuple[str, dict]:
    """An edit given as "bitdelta", ("dare", {"p": 0.5}) or {"method": "dare", "p": 0.5} -> (method, params)."""
    if isinstance(edit, str):
        return edit, {}
    if isinstance(edit, Mapping):
        params = dict(edit)
        if "method" not in params:
            raise InvalidParameterError(f"an edit given as a dict needs a 'method' key: {edit!r}")
        return params.pop("method"), params
    if isinstance(edit, Sequence) and len(edit) == 2 and isinstance(edit[0], str) and isinstance(edit[1], Mapping):
        return edit[0], dict(edit[1])
    raise InvalidParameterError(
        f"cannot read edit {edit!r}: expected 'method', ('method', {{params}}) or {{'method': ..., params}}")


def term_table(
    pre,
    post: nn.Module,
    edits: Sequence,
    loss_fn: LossFn,
    *,
    seed: int = 0,
    points: int = 5,
    rule: str = "left",
    mode: str = "grad",
    second_order: bool = True,
    include=None,
    exclude=None,
    preset: str = "all",
):
    """The paper's Figure 3 as a tidy table: one row per edit and tensor (one per edit in jvp mode).

    Columns: edit, method, params, tensor, tensor_term (that tensor's share), term, loss_change (exact),
    second_order (½DᵀHD, NaN if not asked), the cost per batch-pass on this process (term_forward,
    term_backward; the exact change costs 2 forwards per batch, ½DᵀHD one forward and two backwards) and the
    seconds each quantity took. ``pre`` is anything ``deltas.direction`` reads; ``post`` the model at W_post.
    """
    import time

    import pandas as pd

    from . import deltas

    rows = []
    for edit in tqdm(edits, desc="edits", leave=False, disable=None):
        method, params = _edit_spec(edit)
        label = method + "(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"
        d = deltas.direction(pre, post, method, seed=seed, include=include, exclude=exclude, preset=preset, **params)
        t0 = time.perf_counter()
        res = approximation_term(post, d, loss_fn, points=points, rule=rule, mode=mode)
        t1 = time.perf_counter()
        change = loss_change(post, d, loss_fn)
        t2 = time.perf_counter()
        so = second_order_term(post, d, loss_fn) if second_order else math.nan
        t3 = time.perf_counter()
        common = dict(edit=label, method=method, params=json.dumps(params, sort_keys=True, default=str),
                      term=res.term, loss_change=change, second_order=so,
                      term_forward=res.forward_passes, term_backward=res.backward_passes,
                      term_seconds=t1 - t0, loss_change_seconds=t2 - t1, second_order_seconds=t3 - t2)  # fmt: skip
        split = res.per_tensor or {None: math.nan}
        rows += [dict(common, tensor=name, tensor_term=value) for name, value in split.items()]
    columns = ["edit", "method", "params", "tensor", "tensor_term", "term", "loss_change", "second_order",
               "term_forward", "term_backward",
               "term_seconds", "loss_change_seconds", "second_order_seconds"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)
