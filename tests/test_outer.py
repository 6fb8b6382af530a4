"""Delta math and outer optimizers: exact numbers worked out by hand (dyadic values, so fp32
is exact), agreement with torch.optim, and all-or-nothing refusals."""

from __future__ import annotations

import json

import pytest
import torch

from aggregator.outer import (
    OuterConfig,
    OuterConfigError,
    OuterOptimizer,
    outer_adam_step,
    outer_fedavg_step,
    outer_nesterov_step,
)
from model.delta import DeltaError, apply_delta, check_finite, pseudo_gradient, weighted_mean


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_exact(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == torch.float32
        assert torch.equal(actual[name], expected[name]), (name, actual[name], expected[name])


def run_rounds(config: OuterConfig, theta: dict, deltas: list[dict]) -> list[dict]:
    opt = OuterOptimizer(config, theta)
    history = []
    for delta in deltas:
        theta = opt.step(theta, delta)
        history.append(theta)
    return history


# ---- delta math ----------------------------------------------------------------------------------
def test_pseudo_gradient_is_global_minus_local_and_apply_undoes_it() -> None:
    global_ = {"w": t(1.0, 2.0, -0.5), "b": t(0.25)}
    local = {"w": t(0.5, 2.5, -0.5), "b": t(1.0)}
    delta = pseudo_gradient(global_, local)
    # Δ = global − local: the node moved w[0] down by 0.5, so Δ is +0.5 there.
    assert_exact(delta, {"w": t(0.5, -0.5, 0.0), "b": t(-0.75)})
    assert_exact(apply_delta(global_, delta), local)  # θ − 1·Δ is the local model
    assert_exact(apply_delta(global_, delta, scale=0.5), {"w": t(0.75, 2.25, -0.5), "b": t(0.625)})


def test_pseudo_gradient_is_fp32_even_from_bf16() -> None:
    delta = pseudo_gradient({"w": t(1.0).bfloat16()}, {"w": t(0.5).bfloat16()})
    assert delta["w"].dtype == torch.float32 and delta["w"].item() == 0.5


@pytest.mark.parametrize(
    "local",
    [
        {"w": t(1.0, 2.0)},  # missing b
        {"w": t(1.0, 2.0), "b": t(0.0), "extra": t(0.0)},
        {"w": t(1.0, 2.0, 3.0), "b": t(0.0)},  # wrong shape
        {"w": torch.tensor([1, 2]), "b": t(0.0)},  # integer tensor
    ],
)
def test_pseudo_gradient_refuses_mismatched_layouts(local: dict) -> None:
    with pytest.raises(DeltaError):
        pseudo_gradient({"w": t(1.0, 2.0), "b": t(0.0)}, local)


def test_weighted_mean_uses_token_weights() -> None:
    deltas = [{"w": t(1.0, 0.0)}, {"w": t(0.0, 1.0)}, {"w": t(1.0, 1.0)}]
    # tokens 100, 300, 400 → Σw = 800: (100·[1,0] + 300·[0,1] + 400·[1,1]) / 800
    #                              = [500, 700] / 800 = [0.625, 0.875]
    mean = weighted_mean(deltas, [100, 300, 400])
    assert_exact(mean, {"w": t(0.625, 0.875)})
    assert_exact(weighted_mean(deltas[:1], [7.0]), {"w": t(1.0, 0.0)})
    assert deltas[0]["w"].tolist() == [1.0, 0.0]  # inputs untouched


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("weights", [[1, 0], [1, -1], [1, NAN], [1, INF], [1], [True, 1]])
def test_weighted_mean_refuses_bad_weights(weights: list[float]) -> None:
    with pytest.raises(DeltaError, match="weight"):
        weighted_mean([{"w": t(1.0)}, {"w": t(2.0)}], weights)


def test_weighted_mean_refuses_no_deltas_and_mismatches() -> None:
    with pytest.raises(DeltaError):
        weighted_mean([], [])
    with pytest.raises(DeltaError, match="delta 1"):
        weighted_mean([{"w": t(1.0)}, {"w": t(1.0, 2.0)}], [1.0, 1.0])


def test_check_finite_names_the_tensor() -> None:
    check_finite({"a": t(1.0)}, "mean delta")
    with pytest.raises(DeltaError, match=r"mean delta: b has NaN or Inf"):
        check_finite({"a": t(1.0), "b": t(0.0, float("inf"))}, "mean delta")


# ---- exact rounds, worked by hand ----------------------------------------------------------------
THETA0 = {"w": t(1.0, -2.0), "b": t(0.5)}
DELTAS = [
    {"w": t(0.5, 0.25), "b": t(1.0)},
    {"w": t(-0.25, 1.0), "b": t(0.5)},
    {"w": t(1.0, -0.5), "b": t(0.0)},
]


def test_fedavg_three_rounds_exact() -> None:
    # θ ← θ − lr·Δ̄, lr 1 (default):
    # r1: w [1, −2] − [0.5, 0.25] = [0.5, −2.25]       b 0.5 − 1 = −0.5
    # r2: w [0.5, −2.25] − [−0.25, 1] = [0.75, −3.25]   b −0.5 − 0.5 = −1
    # r3: w [0.75, −3.25] − [1, −0.5] = [−0.25, −2.75]  b −1 − 0 = −1
    history = run_rounds(OuterConfig("fedavg"), THETA0, DELTAS)
    assert_exact(history[0], {"w": t(0.5, -2.25), "b": t(-0.5)})
    assert_exact(history[1], {"w": t(0.75, -3.25), "b": t(-1.0)})
    assert_exact(history[2], {"w": t(-0.25, -2.75), "b": t(-1.0)})
    # lr 0.5, one round: w [1 − 0.25, −2 − 0.125] = [0.75, −2.125], b 0.5 − 0.5 = 0
    assert_exact(outer_fedavg_step(THETA0, DELTAS[0], 0.5), {"w": t(0.75, -2.125), "b": t(0.0)})


def test_nesterov_three_rounds_exact() -> None:
    # lr 0.5, μ 0.5; b ← μ·b + Δ (b₀ = 0); θ ← θ − lr·(Δ + μ·b)
    # r1: b = [0.5, 0.25] | 1               step = Δ + b/2 = [0.75, 0.375] | 1.5
    #     θ = [1 − 0.375, −2 − 0.1875] = [0.625, −2.1875] | 0.5 − 0.75 = −0.25
    # r2: b = [0.25, 0.125] + [−0.25, 1] = [0, 1.125] | 0.5 + 0.5 = 1
    #     step = [−0.25, 1] + [0, 0.5625] = [−0.25, 1.5625] | 0.5 + 0.5 = 1
    #     θ = [0.625 + 0.125, −2.1875 − 0.78125] = [0.75, −2.96875] | −0.25 − 0.5 = −0.75
    # r3: b = [0, 0.5625] + [1, −0.5] = [1, 0.0625] | 0.5 + 0 = 0.5
    #     step = [1, −0.5] + [0.5, 0.03125] = [1.5, −0.46875] | 0 + 0.25 = 0.25
    #     θ = [0.75 − 0.75, −2.96875 + 0.234375] = [0, −2.734375] | −0.75 − 0.125 = −0.875
    config = OuterConfig("nesterov", lr=0.5, momentum=0.5)
    history = run_rounds(config, THETA0, DELTAS)
    assert_exact(history[0], {"w": t(0.625, -2.1875), "b": t(-0.25)})
    assert_exact(history[1], {"w": t(0.75, -2.96875), "b": t(-0.75)})
    assert_exact(history[2], {"w": t(0.0, -2.734375), "b": t(-0.875)})

    # The pure function gives the same numbers and returns the buffer b.
    zeros = {n: torch.zeros_like(v) for n, v in THETA0.items()}
    theta, buf = outer_nesterov_step(THETA0, DELTAS[0], zeros, 0.5, 0.5)
    theta, buf = outer_nesterov_step(theta, DELTAS[1], buf, 0.5, 0.5)
    assert_exact(theta, history[1])
    assert_exact(buf, {"w": t(0.0, 1.125), "b": t(1.0)})
    assert zeros["w"].tolist() == [0.0, 0.0]  # pure: the input buffer is untouched


def test_adam_three_rounds_exact() -> None:
    # lr 0.5, β1 = β2 = 0.5, ε 0.25. Element 0 sees Δ = 1.75, 1.75, −1.75; element 1 the
    # negation (mirror image); element 2 sees 0 (ε keeps 0/0 away).
    # t1: m = 0.875          m̂ = 0.875/0.5 = 1.75    v = 1.53125   v̂ = 3.0625, √ = 1.75
    #     update = 1.75/(1.75 + 0.25) = 0.875;  θ = 1 − 0.5·0.875 = 0.5625
    # t2: m = 0.4375 + 0.875 = 1.3125    m̂ = 1.3125/0.75 = 1.75
    #     v = 0.765625 + 1.53125 = 2.296875   v̂ = 2.296875/0.75 = 3.0625, √ = 1.75
    #     update = 0.875;  θ = 0.5625 − 0.4375 = 0.125
    # t3: m = 0.65625 − 0.875 = −0.21875   m̂ = −0.21875/0.875 = −0.25
    #     v = 1.1484375 + 1.53125 = 2.6796875   v̂ = 2.6796875/0.875 = 3.0625, √ = 1.75
    #     update = −0.25/2 = −0.125;  θ = 0.125 + 0.0625 = 0.1875
    theta0 = {"p": t(1.0, -1.0, 0.5)}
    deltas = [{"p": t(1.75, -1.75, 0.0)}, {"p": t(1.75, -1.75, 0.0)}, {"p": t(-1.75, 1.75, 0.0)}]
    config = OuterConfig("adam", lr=0.5, beta1=0.5, beta2=0.5, eps=0.25)
    history = run_rounds(config, theta0, deltas)
    assert_exact(history[0], {"p": t(0.5625, -0.5625, 0.5)})
    assert_exact(history[1], {"p": t(0.125, -0.125, 0.5)})
    assert_exact(history[2], {"p": t(0.1875, -0.1875, 0.5)})

    # The pure function, with the moments it returns, gives the same numbers.
    zeros = {"p": torch.zeros(3)}
    theta, m, v = outer_adam_step(theta0, deltas[0], zeros, zeros, 1, 0.5, 0.5, 0.5, 0.25)
    theta, m, v = outer_adam_step(theta, deltas[1], m, v, 2, 0.5, 0.5, 0.5, 0.25)
    assert_exact(theta, history[1])
    assert_exact(m, {"p": t(1.3125, -1.3125, 0.0)})
    assert_exact(v, {"p": t(2.296875, 2.296875, 0.0)})
    assert zeros["p"].tolist() == [0.0, 0.0, 0.0]


def test_default_hyper_parameters() -> None:
    assert OuterConfig().name == "fedavg" and OuterConfig().effective_lr == 1.0
    assert [OuterConfig(n).effective_lr for n in ("fedavg", "nesterov", "adam")] == [1.0, 0.7, 1e-3]
    assert OuterConfig("adam", lr=0.01).effective_lr == 0.01
    # Nesterov defaults, one round from θ = 0 with Δ = 1: b = 1, θ = −0.7·(1 + 0.9) = −1.33
    theta = run_rounds(OuterConfig("nesterov"), {"p": t(0.0)}, [{"p": t(1.0)}])[0]
    assert theta["p"].item() == pytest.approx(-1.33, rel=1e-6)


def test_fedavg_lr1_is_the_weighted_mean_of_local_models() -> None:
    g = torch.Generator().manual_seed(0)
    theta = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    locals_ = [
        {n: v + torch.randn(v.shape, generator=g) for n, v in theta.items()} for _ in range(3)
    ]
    tokens = [1000.0, 3000.0, 250.0]
    mean_delta = weighted_mean([pseudo_gradient(theta, loc) for loc in locals_], tokens)
    new = OuterOptimizer(OuterConfig("fedavg"), theta).step(theta, mean_delta)
    for name in theta:
        expected = sum(w * loc[name] for w, loc in zip(tokens, locals_, strict=True)) / sum(tokens)
        torch.testing.assert_close(new[name], expected, rtol=1e-6, atol=1e-6)


# ---- agreement with torch.optim over random rounds -----------------------------------------------
@pytest.mark.parametrize(
    ("config", "make_torch"),
    [
        (
            OuterConfig("nesterov"),
            lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True),
        ),
        (
            OuterConfig("nesterov", lr=0.3, momentum=0.5),
            lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.5, nesterov=True),
        ),
        (
            OuterConfig("adam"),
            lambda ps: torch.optim.Adam(ps, lr=1e-3, betas=(0.9, 0.99), eps=1e-8),
        ),
        (
            OuterConfig("adam", lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6),
            lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.95), eps=1e-6),
        ),
    ],
)
def test_matches_torch_optim_fed_the_mean_delta_as_gradient(config, make_torch) -> None:
    g = torch.Generator().manual_seed(1)
    theta = {"w": torch.randn(8, 5, generator=g), "b": torch.randn(5, generator=g)}
    reference = {n: v.clone().requires_grad_() for n, v in theta.items()}
    torch_opt = make_torch(list(reference.values()))
    opt = OuterOptimizer(config, theta)
    for _ in range(6):
        delta = {n: torch.randn(v.shape, generator=g) for n, v in theta.items()}
        theta = opt.step(theta, delta)
        for name, p in reference.items():
            p.grad = delta[name].clone()
        torch_opt.step()
        for name, p in reference.items():
            torch.testing.assert_close(theta[name], p.detach(), rtol=1e-6, atol=1e-6)


# ---- state: save, restore, refuse ----------------------------------------------------------------
def snapshot(opt: OuterOptimizer) -> tuple[dict, dict]:
    return {n: v.clone() for n, v in opt.state_tensors().items()}, opt.state_meta()


def assert_state_equal(opt: OuterOptimizer, saved: tuple[dict, dict]) -> None:
    tensors, meta = saved
    assert opt.state_meta() == meta
    assert_exact(opt.state_tensors(), tensors)


@pytest.mark.parametrize("name", ["fedavg", "nesterov", "adam"])
def test_state_round_trip_gives_identical_steps(name: str) -> None:
    g = torch.Generator().manual_seed(2)
    theta = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)}
    deltas = [{n: torch.randn(v.shape, generator=g) for n, v in theta.items()} for _ in range(4)]
    a = OuterOptimizer(OuterConfig(name), theta)
    for d in deltas[:2]:
        theta = a.step(theta, d)
    tensors, meta = a.state_tensors(), a.state_meta()
    kinds = {"fedavg": [], "nesterov": ["momentum"], "adam": ["exp_avg", "exp_avg_sq"]}[name]
    assert set(tensors) == {f"{k}.{n}" for k in kinds for n in ("w", "b")}
    assert meta["step"] == 2 and meta["name"] == name
    meta = json.loads(json.dumps(meta))  # as it travels in a checkpoint header

    b = OuterOptimizer(OuterConfig(name), theta)
    b.load_state(tensors, meta)
    theta_a = theta_b = theta
    for d in deltas[2:]:
        theta_a, theta_b = a.step(theta_a, d), b.step(theta_b, d)
        assert_exact(theta_b, theta_a)
    assert_state_equal(b, snapshot(a))
    pairs = zip(a.state_tensors().values(), b.state_tensors().values(), strict=True)
    assert all(x is not y for x, y in pairs)  # b holds copies, not a's tensors


@pytest.mark.parametrize(
    "bad",
    [
        {"w": t(1.0, float("nan")), "b": t(0.0)},
        {"w": t(1.0, float("-inf")), "b": t(0.0)},
        {"w": t(1.0, 2.0, 3.0), "b": t(0.0)},  # wrong shape
        {"w": t(1.0, 2.0)},  # missing tensor
        {"w": t(1.0, 2.0), "b": t(0.0), "c": t(0.0)},  # unexpected tensor
    ],
)
@pytest.mark.parametrize("name", ["fedavg", "nesterov", "adam"])
def test_bad_delta_is_refused_and_leaves_state_unchanged(name: str, bad: dict) -> None:
    theta0 = {"w": t(1.0, 2.0), "b": t(0.5)}
    good = {"w": t(0.5, -0.25), "b": t(1.0)}
    opt, twin = OuterOptimizer(OuterConfig(name), theta0), OuterOptimizer(OuterConfig(name), theta0)
    theta, theta_twin = opt.step(theta0, good), twin.step(theta0, good)
    before = snapshot(opt)
    with pytest.raises(DeltaError):
        opt.step(theta, bad)
    assert_state_equal(opt, before)
    # The next good step is exactly the one an optimizer that never saw the bad delta takes.
    assert_exact(opt.step(theta, good), twin.step(theta_twin, good))


def test_mismatched_params_are_refused() -> None:
    opt = OuterOptimizer(OuterConfig("adam"), {"w": (torch.Size([2]), torch.float32)})
    before = snapshot(opt)
    with pytest.raises(DeltaError, match="global model"):
        opt.step({"w": t(1.0, 2.0, 3.0)}, {"w": t(1.0, 2.0)})
    assert_state_equal(opt, before)
    with pytest.raises(DeltaError):
        OuterOptimizer(OuterConfig("nesterov"), {"step": torch.tensor([1, 2])})  # not floating


def test_inputs_are_never_modified() -> None:
    theta, delta = {"w": t(1.0, 2.0)}, {"w": t(0.5, 0.5)}
    opt = OuterOptimizer(OuterConfig("adam"), theta)
    new = opt.step(theta, delta)
    assert theta["w"].tolist() == [1.0, 2.0] and delta["w"].tolist() == [0.5, 0.5]
    assert new["w"] is not theta["w"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "sgd"},
        {"name": "FedAvg"},
        {"lr": 0.0},
        {"lr": -1.0},
        {"lr": float("nan")},
        {"lr": float("inf")},
        {"momentum": 1.0},
        {"momentum": -0.1},
        {"momentum": float("nan")},
        {"beta1": 1.0},
        {"beta2": 1.5},
        {"eps": 0.0},
        {"eps": float("inf")},
    ],
)
def test_bad_config_is_refused(kwargs: dict) -> None:
    with pytest.raises(OuterConfigError, match=r"\[outer\]"):
        OuterConfig(**kwargs)


def test_load_state_refuses_mismatches_and_leaves_state_unchanged() -> None:
    theta = {"w": t(1.0, 2.0)}
    opt = OuterOptimizer(OuterConfig("nesterov"), theta)
    opt.step(theta, {"w": t(0.5, 0.5)})
    tensors, meta = snapshot(opt)
    before = snapshot(opt)
    cases = [
        (tensors, meta | {"name": "adam"}),
        (tensors, meta | {"lr": 0.5}),
        (tensors, meta | {"momentum": 0.5}),
        (tensors, meta | {"extra": 1}),
        (tensors, meta | {"step": -1}),
        (tensors, meta | {"step": 1.5}),
        (tensors, {k: v for k, v in meta.items() if k != "momentum"}),
        ({}, meta),
        ({"momentum.w": t(1.0)}, meta),
        ({"momentum.w": t(1.0, 2.0), "momentum.x": t(1.0)}, meta),
        ({"momentum.w": t(1.0, float("nan"))}, meta),
        ({"momentum.w": t(1.0, 2.0).double()}, meta),
    ]
    for bad_tensors, bad_meta in cases:
        with pytest.raises(OuterConfigError):
            opt.load_state(bad_tensors, bad_meta)
        assert_state_equal(opt, before)


@pytest.mark.parametrize("name", ["fedavg", "nesterov", "adam"])
def test_step_into_the_mean_delta_buffer_equals_a_fresh_step(name: str) -> None:
    # The aggregator writes the new model over the mean's buffer to save a model-sized copy.
    g = torch.Generator().manual_seed(3)
    params = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(7, generator=g)}
    deltas = [
        {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(3)
    ]
    fresh, reused = (
        OuterOptimizer(OuterConfig(name=name), params),
        OuterOptimizer(OuterConfig(name=name), params),
    )
    p_fresh, p_reused = params, params
    for d in deltas:
        p_fresh = fresh.step(p_fresh, d)
        buffer = {k: v.clone() for k, v in d.items()}
        p_reused = reused.step(p_reused, buffer, out=buffer)
        assert all(p_reused[k].data_ptr() == buffer[k].data_ptr() for k in buffer)
        for k in params:
            assert torch.equal(p_fresh[k], p_reused[k])
