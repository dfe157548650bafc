"""The approximation term against closed forms (quadratic, cubic, quartic losses) and on a tiny float64 Llama."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import f64_llama, random_direction, snapshot, token_pairs, unchanged
from torch import nn

from unifieddelta import approx, losses
from unifieddelta.errors import InvalidParameterError, MismatchError, NonFiniteError

# ---------------------------------------------------------------------------------------------- polynomial losses


class Poly(nn.Module):
    """Two parameter tensors w = (a, b) and L(w) = ½ wᵀAw + cᵀw + Σ k_i w_i³ + Σ q_i w_i⁴ (k, q zero unless asked)."""

    def __init__(self, cubic: bool = False, quartic: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(3, 2, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
        m = torch.randn(10, 10, generator=g, dtype=torch.float64)
        self.A = m @ m.T + torch.eye(10, dtype=torch.float64)
        self.c = torch.randn(10, generator=g, dtype=torch.float64)
        self.k = torch.randn(10, generator=g, dtype=torch.float64) if cubic else torch.zeros(10, dtype=torch.float64)
        self.q = torch.rand(10, generator=g, dtype=torch.float64) if quartic else torch.zeros(10, dtype=torch.float64)

    def w(self):
        return torch.cat([self.a.reshape(-1), self.b])

    def forward(self):
        w = self.w()
        return 0.5 * w @ self.A @ w + self.c @ w + (self.k * w**3).sum() + (self.q * w**4).sum()


def loss_of(model):
    return model()


def poly_direction(scale=0.7):
    g = torch.Generator().manual_seed(5)
    return {
        "a": scale * torch.randn(3, 2, generator=g, dtype=torch.float64),
        "b": scale * torch.randn(4, generator=g, dtype=torch.float64),
    }


def flat(d):
    return torch.cat([d["a"].reshape(-1), d["b"]])


def exact_change(model, d):
    with torch.no_grad():
        w, dw = model.w(), flat(d)
        f = lambda x: 0.5 * x @ model.A @ x + model.c @ x + (model.k * x**3).sum() + (model.q * x**4).sum()
        return float(f(w + dw) - f(w))


@pytest.mark.parametrize("C", [1, 2, 5, 8])
def test_quadratic_left_rule_closed_form(C):
    model, d = Poly(), poly_direction()
    w, dw = model.w().detach(), flat(d)
    g0, h = float((model.A @ w + model.c) @ dw), float(dw @ model.A @ dw)
    res = approx.approximation_term(model, d, loss_of, points=C, rule="left")
    assert res.term == pytest.approx(g0 + h * (C - 1) / (2 * C), rel=1e-12)
    right = approx.approximation_term(model, d, loss_of, points=C, rule="right")
    assert right.term == pytest.approx(g0 + h * (C + 1) / (2 * C), rel=1e-12)
    assert res.values[0] == pytest.approx(g0, rel=1e-12)  # t = 0 is W itself


@pytest.mark.parametrize(
    "rule,C", [("midpoint", 1), ("midpoint", 4), ("trapezoid", 2), ("trapezoid", 5), ("gauss", 1), ("gauss", 3)]
)
@pytest.mark.parametrize("mode", ["grad", "jvp"])
def test_quadratic_exact_rules(rule, C, mode):
    model, d = Poly(), poly_direction()
    exact = exact_change(model, d)
    assert approx.loss_change(model, d, loss_of) == pytest.approx(exact, rel=1e-12)
    assert approx.approximation_term(model, d, loss_of, points=C, rule=rule, mode=mode).term == pytest.approx(
        exact, rel=1e-12
    )


def test_cubic_gauss2_exact_left_not():
    model, d = Poly(cubic=True), poly_direction()
    exact = exact_change(model, d)
    assert approx.approximation_term(model, d, loss_of, points=2, rule="gauss").term == pytest.approx(exact, rel=1e-12)
    left = approx.approximation_term(model, d, loss_of, points=5, rule="left").term
    assert abs(left - exact) > 1e-3 * abs(exact)


def test_quartic_gauss2_exact_midpoint_not():
    """The integrand of a quartic loss is cubic in t: 2-point Gauss–Legendre is still exact, 2-point midpoint is not."""
    model, d = Poly(cubic=True, quartic=True), poly_direction()
    exact = exact_change(model, d)
    assert approx.approximation_term(model, d, loss_of, points=2, rule="gauss").term == pytest.approx(exact, rel=1e-12)
    assert abs(approx.approximation_term(model, d, loss_of, points=2, rule="midpoint").term - exact) > 1e-3 * abs(exact)


@pytest.mark.parametrize("cubic", [False, True])
def test_second_order_term(cubic):
    model, d = Poly(cubic=cubic), poly_direction()
    w, dw = model.w().detach(), flat(d)
    H = model.A + torch.diag(6 * model.k * w)
    assert approx.second_order_term(model, d, loss_of) == pytest.approx(0.5 * float(dw @ H @ dw), rel=1e-12)


def test_per_tensor_split_and_absent_names():
    model, d = Poly(), poly_direction()
    res = approx.approximation_term(model, d, loss_of, points=3)
    assert list(res.per_tensor) == ["a", "b"]
    assert sum(res.per_tensor.values()) == pytest.approx(res.term, rel=1e-14)
    assert sum(w * v for w, v in zip(res.weights, res.values)) == pytest.approx(res.term, rel=1e-14)
    only_a = approx.approximation_term(model, {"a": d["a"]}, loss_of, points=3)  # absent "b" means zero
    full = approx.approximation_term(model, {"a": d["a"], "b": torch.zeros(4, dtype=torch.float64)}, loss_of, points=3)
    assert only_a.term == pytest.approx(full.term, rel=1e-14)
    assert list(only_a.per_tensor) == ["a"]
    assert res.forward_passes == 3 and res.backward_passes == 3
    for mode in approx.MODES:  # an empty direction is D = 0
        zero = approx.approximation_term(model, {}, loss_of, points=2, mode=mode)
        assert zero.term == 0 and zero.values == [0, 0] and zero.losses == [float(model().detach())] * 2
    assert approx.loss_change(model, {}, loss_of) == 0 and approx.second_order_term(model, {}, loss_of) == 0


def test_quadrature_nodes():
    nodes, weights = approx.quadrature(5, "left")  # the paper's C = 5
    assert nodes == pytest.approx([0, 0.2, 0.4, 0.6, 0.8]) and weights == pytest.approx([0.2] * 5)
    nodes, weights = approx.quadrature(3, "trapezoid")
    assert nodes == pytest.approx([0, 0.5, 1]) and weights == pytest.approx([0.25, 0.5, 0.25])
    for rule in approx.RULES:
        nodes, weights = approx.quadrature(4, rule)
        assert math.fsum(weights) == pytest.approx(1, rel=1e-14) and all(0 <= t <= 1 for t in nodes)


# ---------------------------------------------------------------------------------------------- tiny Llama


@pytest.fixture(scope="module")
def llama():
    model = f64_llama()
    return model, random_direction(model, 0.01), losses.causal_lm_nll(token_pairs(6), batch_size=4)


def test_jvp_matches_grad_on_llama(llama):
    model, d, loss = llama
    snap = snapshot(model)
    grad = approx.approximation_term(model, d, loss, points=3, mode="grad")
    fwd = approx.approximation_term(model, d, loss, points=3, mode="jvp")
    assert fwd.per_tensor == {} and fwd.backward_passes == 0 and grad.forward_passes == 3 * 2  # 2 batches
    # grad runs SDPA attention, jvp eager attention; RMSNorm computes in float32: agreement ~1e-8, not 1e-15
    assert fwd.term == pytest.approx(grad.term, rel=1e-6)
    assert fwd.values == pytest.approx(grad.values, rel=1e-6)
    assert sum(grad.per_tensor.values()) == pytest.approx(grad.term, rel=1e-12)
    assert unchanged(model, snap) and model.config._attn_implementation == "sdpa"


def test_gauss_converges_to_loss_change(llama):
    model, d, loss = llama
    exact = approx.loss_change(model, d, loss)
    errors = [
        abs(approx.approximation_term(model, d, loss, points=C, rule="gauss", mode="jvp").term - exact)
        for C in (1, 2, 4)
    ]
    assert errors[2] < errors[0] and errors[2] < 1e-4 * abs(exact)
    left = approx.approximation_term(model, d, loss, points=5, rule="left", mode="jvp").term
    assert abs(left - exact) > errors[2]  # the paper's rule is first order in 1/C


def test_second_order_term_on_llama(llama):
    """½DᵀHD = ½ f'(0) with f(t) = ⟨∇L(W + tD), D⟩; check it against a central difference of f.

    (Not against ΔL − f(0): D here moves the weights by half their size, where third-order terms dominate,
    and for small D the float32 RMSNorm rounding swamps the loss difference.)
    """
    model, d, loss = llama
    h = 0.01  # truncation error O((h|D|)²): 0.2 % here; smaller h meets the float32 rounding
    # the 2-point trapezoid rule on ±hD evaluates at W ± hD: values[1] = ⟨∇L(W ± hD), ±hD⟩ = ±h·f(±h)
    plus = approx.approximation_term(
        model, {n: h * v for n, v in d.items()}, loss, points=2, rule="trapezoid", mode="jvp"
    )
    minus = approx.approximation_term(
        model, {n: -h * v for n, v in d.items()}, loss, points=2, rule="trapezoid", mode="jvp"
    )
    central = (plus.values[1] + minus.values[1]) / h / (2 * h)  # (f(h) − f(−h)) / 2h
    assert approx.second_order_term(model, d, loss) == pytest.approx(central / 2, rel=1e-2)


def test_losses_node_by_node(llama):
    model, d, loss = llama
    res = approx.approximation_term(model, d, loss, points=2, rule="left")
    with torch.no_grad():
        assert res.losses[0] == pytest.approx(float(loss(model)), rel=1e-14)


# ---------------------------------------------------------------------------------------------- bad input


def _raises_restored(model, exc, match, fn):
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        fn()
    assert unchanged(model, snap)


def test_bad_names_shapes_and_directions():
    model, d = Poly(), poly_direction()
    for f in (approx.loss_change, approx.second_order_term, approx.approximation_term):
        _raises_restored(model, MismatchError, "'nope'", lambda: f(model, {**d, "nope": torch.zeros(1)}, loss_of))
        _raises_restored(
            model,
            MismatchError,
            r"direction\['a'\] has shape \(2, 3\)",
            lambda: f(model, {"a": torch.zeros(2, 3)}, loss_of),
        )
        _raises_restored(model, NonFiniteError, "'b'", lambda: f(model, {"b": torch.full((4,), math.nan)}, loss_of))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"points": 0}, "points"),
        ({"points": 2.5}, "points"),
        ({"points": True}, "points"),
        ({"rule": "simpson"}, "unknown rule"),
        ({"mode": "fd"}, "unknown mode"),
        ({"rule": "trapezoid", "points": 1}, "trapezoid"),
    ],
)
def test_bad_points_rule_mode(kwargs, match):
    model, d = Poly(), poly_direction()
    _raises_restored(
        model, InvalidParameterError, match, lambda: approx.approximation_term(model, d, loss_of, **kwargs)
    )


@pytest.mark.parametrize("mode", ["grad", "jvp"])
def test_non_scalar_and_non_finite_losses(mode):
    model, d = Poly(), poly_direction()
    vector = lambda m: m.w() * 2
    _raises_restored(
        model, InvalidParameterError, "scalar", lambda: approx.approximation_term(model, d, vector, mode=mode)
    )
    _raises_restored(model, InvalidParameterError, "scalar", lambda: approx.loss_change(model, d, lambda m: 1.0))
    a0 = float(model.a[0, 0])
    # finite at t = 0, NaN once a[0, 0] has moved more than half-way along D: the first bad left node is t = 0.6
    nan_past_half = lambda m: m() + torch.where((m.a[0, 0] - a0) / d["a"][0, 0] > 0.5, math.nan, 0.0)
    _raises_restored(
        model, NonFiniteError, "t=0.6", lambda: approx.approximation_term(model, d, nan_past_half, mode=mode)
    )
    _raises_restored(model, NonFiniteError, "t=1", lambda: approx.loss_change(model, d, nan_past_half))


@pytest.mark.parametrize("mode", ["grad", "jvp"])
def test_loss_raising_midway_restores_llama(llama, mode):
    model, d, loss = llama
    calls = []

    def flaky(m):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("data loader died")
        return loss(m)

    _raises_restored(
        model, RuntimeError, "data loader died", lambda: approx.approximation_term(model, d, flaky, mode=mode)
    )
    assert model.config._attn_implementation == "sdpa"
    calls.clear()
    _raises_restored(
        model,
        RuntimeError,
        "data loader died",
        lambda: approx.second_order_term(model, d, lambda m: (flaky(m), flaky(m), flaky(m))[0]),
    )
    assert model.config._attn_implementation == "sdpa"


def test_jvp_without_forward_derivative_says_so():
    """A model calling a fused attention kernel itself (no Hugging Face switch to eager): a clear error, model
    intact."""

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(
                torch.randn(1, 1, 4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            )

        def forward(self, w=None):
            w = self.w if w is None else w
            return F.scaled_dot_product_attention(w, w, w).sum()

    model = Fused()
    d = {"w": torch.linspace(-1, 1, 32, dtype=torch.float64).reshape(1, 1, 4, 8)}
    h = 1e-5
    with torch.no_grad():  # ⟨∇L(W), D⟩ by a central difference, independently of autograd
        slope = float(model(model.w + h * d["w"]) - model(model.w - h * d["w"])) / (2 * h)
    grad = approx.approximation_term(model, d, loss_of, points=1, mode="grad").term
    assert grad == pytest.approx(slope, rel=1e-7) and abs(slope) > 1e-3
    _raises_restored(
        model, NotImplementedError, "mode='grad'", lambda: approx.approximation_term(model, d, loss_of, mode="jvp")
    )


# ---------------------------------------------------------------------------------------------- the model is left alone


class BatchNormNet(nn.Module):
    """A BatchNorm in train mode updates its running statistics on every forward pass."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 4).double()
        self.bn = nn.BatchNorm1d(4).double()
        self.x = torch.randn(16, 5, dtype=torch.float64)

    def forward(self):
        return self.bn(self.lin(self.x)).pow(2).mean()


def _state(model):
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _same_state(model, before, training):
    now = _state(model)
    return (
        now.keys() == before.keys()
        and all(torch.equal(now[n], before[n]) for n in now)
        and all(m.training == training[i] for i, m in enumerate(model.modules()))
    )


QUANTITIES = {
    "term-grad": lambda m, d, f: approx.approximation_term(m, d, f, points=3),
    "term-jvp": lambda m, d, f: approx.approximation_term(m, d, f, points=3, mode="jvp"),
    "loss_change": approx.loss_change,
    "second_order": approx.second_order_term,
}


@pytest.mark.parametrize("quantity", list(QUANTITIES))
def test_batchnorm_statistics_and_train_flags_are_restored(quantity):
    model = BatchNormNet().train()
    d = {"lin.weight": 0.1 * torch.ones(4, 5, dtype=torch.float64)}
    before, training = _state(model), [m.training for m in model.modules()]

    def switching(m):  # a loss that also flips the mode of a submodule
        m.lin.eval()
        return m()

    if quantity == "term-jvp":  # torch.func cannot run in-place buffer updates: one clear error instead
        with pytest.raises(InvalidParameterError, match="mode='grad'"):
            QUANTITIES[quantity](model, d, switching)
    else:
        QUANTITIES[quantity](model, d, switching)
    assert _same_state(model, before, training)  # running_mean, running_var, num_batches_tracked untouched


@pytest.mark.parametrize("quantity", list(QUANTITIES))
def test_a_loss_writing_into_parameters_does_not_reach_the_model(quantity):
    model = Poly()
    d = {"a": poly_direction()["a"]}  # b is not directed: it is written too, and must not change either
    before, training = _state(model), [m.training for m in model.modules()]

    def vandal(m):
        with torch.no_grad():
            m.a.data.mul_(3.0)
            m.b.data.add_(1.0)
        return m()

    if quantity == "term-jvp":
        with pytest.raises(InvalidParameterError, match="writes into the model"):
            QUANTITIES[quantity](model, d, vandal)
    else:
        QUANTITIES[quantity](model, d, vandal)
    assert _same_state(model, before, training)


@pytest.mark.parametrize("quantity", list(QUANTITIES))
def test_a_loss_raising_at_any_node_leaves_the_model_as_it_was(quantity):
    """Raise at the first, a middle and the last evaluation (t = 0 included), after writing into the model."""
    n_calls = {"term-grad": 3, "term-jvp": 3, "loss_change": 2, "second_order": 1}[quantity]
    for fail_at in sorted({1, (n_calls + 1) // 2, n_calls}):
        model = BatchNormNet().train()
        d = {"lin.weight": 0.1 * torch.ones(4, 5, dtype=torch.float64)}
        before, training = _state(model), [m.training for m in model.modules()]
        calls = []

        def failing(m):
            calls.append(1)
            out = m()  # updates the running statistics of whatever tensors it was given
            if quantity != "term-jvp":  # jvp refuses writes (above)
                with torch.no_grad():
                    m.lin.bias.data.fill_(7.0)
            m.eval()
            if len(calls) == fail_at:
                raise RuntimeError(f"failed at call {fail_at}")
            return out

        if quantity == "term-jvp":
            model.eval()  # a BatchNorm in train mode is refused in jvp mode (above)
            before, training = _state(model), [m.training for m in model.modules()]
        with pytest.raises(RuntimeError, match=f"failed at call {fail_at}"):
            QUANTITIES[quantity](model, d, failing)
        assert _same_state(model, before, training), (quantity, fail_at)
