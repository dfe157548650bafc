"""The approximation term, the exact loss change and the second-order term of an edit.

An edit moves the post-trained weights W to W + D (D = F(ΔW) − ΔW). Exactly,

    ΔL = L(W + D) − L(W) = ∫₀¹ ⟨∇L(W + tD), D⟩ dt,

and the paper approximates the integral by a left Riemann sum with C = 5 points: the *approximation term*.
Here the integrand f(t) = ⟨∇L(W + tD), D⟩ is evaluated at the nodes of a quadrature rule, either by a
backward pass (``mode="grad"``, which also splits f into one inner product per tensor) or by a forward-mode
directional derivative (``mode="jvp"``, no gradient buffers). Sums run in float64 across tensors and batches.

The model is never mutated: every evaluation goes through ``torch.func.functional_call`` with fresh tensors in
place of all its parameters and buffers (W + tD, or copies), and every module's train/eval flag is put back, so
the model stays bit for bit what it was, whatever ``loss_fn`` does (writes a parameter, updates BatchNorm's
statistics, switches modes) or raises. The cost is one copy of the model's weights per node, which W + tD needs
anyway for every edited tensor.

Data parallel: if ``torch.distributed`` is initialised with more than one process, each process evaluates
its share of the loss (the losses in :mod:`unifieddelta.losses` take every world-size-th batch) and only the
per-tensor scalars are summed across processes, so every process returns the same numbers as one process would.
A hand-written ``loss_fn`` must then return this process's share of the loss itself.
"""

from __future__ import annotations

import contextlib
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


# ---------------------------------------------------------------------------------------------- the scaffold


def _fresh(
    dirs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], model: nn.Module, t: float
) -> dict[str, torch.Tensor]:
    """W + t·D for every parameter as new tensors (none shares storage with the model), and copies of every buffer:
    whatever ``loss_fn`` writes (a parameter, BatchNorm's running statistics) never reaches the model."""
    out = {n: b.detach().clone() for n, b in model.named_buffers()}
    for n, p in model.named_parameters():
        if n in dirs:
            d = dirs[n][1]
            out[n] = p.detach().clone() if t == 0 else p.detach() + t * d
        else:
            out[n] = p.detach().clone()
    return out


@contextlib.contextmanager
def _flags_kept(model: nn.Module) -> Iterator[None]:
    """Every module's train/eval flag as it was, whatever ``loss_fn`` switches."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _sweep(
    model: nn.Module, loss_fn: LossFn, dirs, nodes: Sequence[float], width: int, per_part, desc: str, what: str
) -> torch.Tensor:
    """The loop the three quantities share. For each node t and each of this process's loss parts, ``per_part(part,
    tensors, t) -> (loss, values)`` runs on fresh tensors at W + t·D (see :func:`_fresh`); losses and the ``width``
    values are summed in float64 and checked finite (at once in one process; under torch.distributed only after
    the sum over processes, so that every process raises alike). Returns ``(len(nodes), width + 1)`` sums over
    all processes, the loss in the last column. ``what`` names the values in errors."""
    parts = _parts(loss_fn)
    local = not _distributed()
    sums = torch.zeros(len(nodes), width + 1, dtype=torch.float64)
    with _progress(len(nodes) * len(parts), desc) as bar, _flags_kept(model):
        for k, t in enumerate(nodes):
            tensors = _fresh(dirs, model, t)
            for part in parts:
                loss, values = per_part(part, tensors, t)
                sums[k, -1] += float(loss.detach().double())
                sums[k, :width] += torch.as_tensor(values, dtype=torch.float64).reshape(-1)[:width]
                if local:
                    _check_finite(sums[k, -1], t)
                    _check_finite(sums[k, :width].sum(), t, what)
                bar.update()
    sums = _all_reduce(sums)
    for k, t in enumerate(nodes):
        _check_finite(sums[k, -1], t)
        _check_finite(sums[k, :width].sum(), t, what)
    return sums


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
    per_part = _gradient_dots if mode == "grad" else _directional_derivative
    with contextlib.ExitStack() as stack:
        if mode == "jvp":
            stack.enter_context(_eager_attention(model))
            stack.enter_context(torch.no_grad())  # forward-mode AD needs no autograd graph
        sums = _sweep(
            model,
            loss_fn,
            dirs,
            nodes,
            max(len(names), 1) if mode == "grad" else 1,
            lambda part, x, t: per_part(model, part, dirs, x, t),
            f"approximation term ({rule}, {mode})",
            "the directional derivative ⟨∇L, D⟩",
        )
    vals, losses = sums[:, :-1], sums[:, -1]
    per_tensor = (torch.tensor(weights, dtype=torch.float64)[:, None] * vals).sum(0)
    n = len(nodes) * len(_parts(loss_fn))
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


def _gradient_dots(model, part, dirs, x, t) -> tuple[torch.Tensor, list[float]]:
    """The loss at W + tD and ⟨∇_name L, D_name⟩ for each directed tensor, by one backward pass."""
    leaves = {n: x[n].requires_grad_(True) for n in dirs}  # fresh leaves: no .grad buffers on the model
    loss = _call(model, part, x, t)
    grads = [None] * len(leaves)  # a loss that does not depend on the parameters: zero gradient
    if leaves and loss.requires_grad:
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss, [_dot(g, d) for g, (_, d) in zip(grads, dirs.values())] or [0.0]


def _directional_derivative(model, part, dirs, x, t) -> tuple[torch.Tensor, list[float]]:
    """The loss at W + tD and d/dt L(W + tD) = ⟨∇L, D⟩ by one forward-mode pass."""
    if not dirs:
        return _call(model, part, x, t), [0.0]
    primals = {n: x[n] for n in dirs}  # the other tensors stay constants of the function
    tangents = {n: d for n, (_, d) in dirs.items()}
    try:
        loss, df = jvp(lambda y: _call(model, part, {**x, **y}, t), (primals,), (tangents,))
    except NotImplementedError as e:  # e.g. a fused attention kernel outside Hugging Face's switch
        raise NotImplementedError(
            f"{e}\nmode='jvp' needs forward-mode derivatives of every op the "
            "model runs; use mode='grad' or a plain-PyTorch attention"
        ) from e
    except RuntimeError as e:
        if "mutate a captured Tensor" not in str(e):
            raise
        raise InvalidParameterError(
            "mode='jvp' cannot run a loss that writes into the model's tensors (a BatchNorm "
            "in train mode updates its statistics): use mode='grad', or eval mode"
        ) from e
    return loss, [float(df.double())]


def loss_change(model: nn.Module, direction: Mapping[str, torch.Tensor], loss_fn: LossFn) -> float:
    """The exact L(W + D) − L(W) (two forward passes per batch, the losses summed in float64)."""
    dirs = _directions(model, direction)
    with torch.no_grad():
        sums = _sweep(
            model,
            loss_fn,
            dirs,
            [0.0, 1.0],
            0,
            lambda part, x, t: (_call(model, part, x, t), []),
            "exact loss change",
            "the loss",
        )
    return float(sums[1, -1] - sums[0, -1])


def second_order_term(model: nn.Module, direction: Mapping[str, torch.Tensor], loss_fn: LossFn) -> float:
    """½·Dᵀ H D at W, by a Hessian-vector product (double backward; one forward, two backward passes per batch)."""
    dirs = _directions(model, direction)

    def per_part(part, x, t):
        leaves = {n: x[n].requires_grad_(True) for n in dirs}
        loss = _call(model, part, x, t)
        value = 0.0
        if leaves and loss.requires_grad:
            grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
            gd = sum((g * d).sum() for g, (_, d) in zip(grads, dirs.values()) if g is not None)
            if isinstance(gd, torch.Tensor) and gd.requires_grad:
                hd = torch.autograd.grad(gd, list(leaves.values()), allow_unused=True)
                value = 0.5 * sum(_dot(h, d) for h, (_, d) in zip(hd, dirs.values()))
        return loss, [value]

    with _eager_attention(model):  # the fused attention kernels have no double backward
        sums = _sweep(model, loss_fn, dirs, [0.0], 1, per_part, "second-order term", "½·DᵀHD")
    return float(sums[0, 0])
