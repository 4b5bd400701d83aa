"""SingleOptimizer: one torch optimiser behind Pyro's PyroOptim interface."""

import copy
import math

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_vae.errors import ConfigError, NonFiniteLossError
from pyro_vae.model import VAE
from pyro_vae.optim import SingleOptimizer

D, L = 10, 2


def make(seed=0):
    torch.manual_seed(seed)
    return VAE(D, latent_dim=L, hidden_dims=(8, 4))


def data(n=16):
    return torch.bernoulli(torch.full((n, D), 0.4), generator=torch.Generator().manual_seed(1))


def run(vae, optim, steps, seed=0):
    pyro.set_rng_seed(seed)
    svi = SVI(vae.model, vae.guide, optim, Trace_ELBO())
    return [svi.step(data()) for _ in range(steps)]


def test_single_optimiser_matches_pyro_per_tensor_optimisers():
    """Same AdamW maths, one optimiser instead of one per tensor: same parameters after 5 steps."""
    a, b = make(), make()
    args = {"lr": 1e-2, "weight_decay": 0.01}
    losses_a = run(a, SingleOptimizer(torch.optim.AdamW, args, fused=False), 5)
    losses_b = run(b, pyro.optim.AdamW(args), 5)
    assert losses_a == pytest.approx(losses_b, rel=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_fused_matches_unfused():
    a, b = make(), make()
    run(a, SingleOptimizer(torch.optim.AdamW, {"lr": 1e-2}, fused=True), 5)
    run(b, SingleOptimizer(torch.optim.AdamW, {"lr": 1e-2}, fused=False), 5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_one_optimizer_over_all_parameters_in_module_order_by_name():
    vae = make()
    optim = SingleOptimizer(torch.optim.AdamW, {"lr": 1e-3})
    run(vae, optim, 1)
    assert sum(len(g["params"]) for g in optim.optimizer.param_groups) == len(list(vae.parameters()))
    assert optim.param_names == sorted(optim.param_names)


def test_grad_norm_is_recorded_and_clipping_applies():
    vae = make()
    optim = SingleOptimizer(torch.optim.SGD, {"lr": 1.0}, clip_norm=1e-3)
    before = [p.detach().clone() for p in vae.parameters()]
    run(vae, optim, 1)
    # SGD with lr 1 moves the parameters by exactly the clipped gradient, whose total norm is clip_norm.
    moved = torch.linalg.vector_norm(
        torch.cat([(p - b).flatten() for p, b in zip(vae.parameters(), before, strict=True)])
    )
    assert optim.grad_norm > 1e-3
    assert moved.item() == pytest.approx(1e-3, rel=1e-4)


def test_non_finite_gradient_takes_no_step_and_names_the_parameter():
    vae = make()
    optim = SingleOptimizer(torch.optim.AdamW, {"lr": 1e-2})
    run(vae, optim, 2)
    params = [p.detach().clone() for p in vae.parameters()]
    state = copy.deepcopy(optim.state_dict())
    handle = vae.decoder.net[0].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"decoder\.net\.0\.weight.*no step was taken"):
        run(vae, optim, 1)
    handle.remove()
    for p, q in zip(vae.parameters(), params, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    after = optim.state_dict()
    assert after["steps"] == state["steps"] == 2
    for k, v in state["optimizer"]["state"].items():
        torch.testing.assert_close(after["optimizer"]["state"][k]["exp_avg"], v["exp_avg"], rtol=0, atol=0)


def test_state_dict_round_trip_continues_bit_exactly():
    straight = make()
    run(straight, SingleOptimizer(torch.optim.AdamW, {"lr": 1e-2}), 5)

    first = make()
    optim = SingleOptimizer(torch.optim.AdamW, {"lr": 1e-2})
    run(first, optim, 3)
    saved_model, saved_optim = copy.deepcopy(first.state_dict()), copy.deepcopy(optim.state_dict())
    rng = torch.get_rng_state()

    resumed = make(seed=99)
    resumed.load_state_dict(saved_model)
    optim2 = SingleOptimizer(torch.optim.AdamW, {"lr": 1e-2})
    optim2.load_state_dict(saved_optim)
    torch.set_rng_state(rng)
    svi = SVI(resumed.model, resumed.guide, optim2, Trace_ELBO())
    for _ in range(2):
        svi.step(data())
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_refuses_pickle_based_persistence():
    optim = SingleOptimizer()
    with pytest.raises(NotImplementedError, match="atomically"):
        optim.save("x.pt")
    with pytest.raises(NotImplementedError, match="weights_only=True"):
        optim.load("x.pt")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_norm": -1.0}, "clip_norm must be a positive finite number or None, got -1.0"),
        ({"clip_norm": float("nan")}, "clip_norm must be a positive finite number or None, got nan"),
        ({"max_skips": True}, "max_skips must be an integer >= 0 or None, got True"),
        ({"max_skips": -1}, "max_skips must be an integer >= 0 or None, got -1"),
    ],
)
def test_bad_clip_norm_and_max_skips(kwargs, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        SingleOptimizer(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Defect 10: finite gradients whose float32 norm overflows are not "non-finite".

HUGE = float(torch.tensor(2.2e25))  # the largest |g| of the run, as float32 holds it


def huge_gradients(vae, value=HUGE):
    """Every gradient set to ``value``: finite, but the sum of squares (~5e50 per element) overflows float32."""
    return [p.register_hook(lambda g, v=value: torch.full_like(g, v)) for p in vae.parameters()]


def test_huge_finite_gradients_are_stepped_on_with_their_true_norm():
    vae = make()
    handles = huge_gradients(vae)
    optim = SingleOptimizer(torch.optim.AdamW, {"lr": 1e-2}, on_nonfinite="skip")
    run(vae, optim, 16)
    for h in handles:
        h.remove()
    assert optim.skipped == 0 and optim.steps == 16
    n = sum(p.numel() for p in vae.parameters())
    # The premise: torch's float32 total norm of these gradients is infinite.
    assert torch.nn.utils.get_total_norm([torch.full_like(p, HUGE) for p in vae.parameters()]).isinf()
    # Reference in float64 by hand: sqrt(n * HUGE²) = sqrt(n) * HUGE; the guard scales by HUGE, so only the
    # float64 sum of n ones and one square root round: relative error below a few ulps of float64.
    assert optim.grad_norm == pytest.approx(math.sqrt(n) * HUGE, rel=1e-14)
    assert all(bool(torch.isfinite(p).all()) for p in vae.parameters())


def test_clipping_uses_the_true_norm_of_huge_gradients():
    """SGD with lr 1 moves the parameters by the clipped gradient, whose norm must be clip_norm, not 0 (a clip by
    an infinite norm would zero every gradient)."""
    vae = make()
    huge_gradients(vae)
    optim = SingleOptimizer(torch.optim.SGD, {"lr": 1.0}, clip_norm=1e-3)
    before = [p.detach().clone() for p in vae.parameters()]
    run(vae, optim, 1)
    moved = torch.linalg.vector_norm(
        torch.cat([(p - b).flatten() for p, b in zip(vae.parameters(), before, strict=True)])
    )
    assert moved.item() == pytest.approx(1e-3, rel=1e-4)  # as in the unclipped-norm test above: float32 rounding


def test_float64_gradients_beyond_the_float64_square_range_are_finite_too(float64):
    vae = make()
    huge_gradients(vae, 1e200)  # squares overflow float64 itself
    optim = SingleOptimizer(torch.optim.AdamW, {"lr": 1e-2})
    run(vae, optim, 1)
    n = sum(p.numel() for p in vae.parameters())
    assert optim.steps == 1 and optim.grad_norm == pytest.approx(math.sqrt(n) * 1e200, rel=1e-14)


def test_a_refused_gradient_always_names_its_parameter_among_huge_finite_ones():
    vae = make()
    huge_gradients(vae)
    vae.decoder.net[0].bias.register_hook(lambda g: torch.full_like(g, float("inf")))
    optim = SingleOptimizer(torch.optim.AdamW, {"lr": 1e-2})
    with pytest.raises(NonFiniteLossError) as info:
        run(vae, optim, 1)
    assert info.value.step.names == ("decoder.net.0.bias",)
    assert "non-finite gradient at optimiser step 1 in decoder.net.0.bias;" in str(info.value)


def test_a_normal_gradient_norm_is_torchs_float32_norm_bit_for_bit():
    """The fast path is untouched: a finite float32 norm is exactly torch's get_total_norm of the gradients, taken
    in the optimiser's (name) order."""
    vae = make()
    seen = {}
    for p in vae.parameters():
        p.register_hook(lambda g, p=p: seen.__setitem__(p, g.clone()))
    optim = SingleOptimizer(torch.optim.AdamW, {"lr": 1e-2})
    run(vae, optim, 1)
    expected = torch.nn.utils.get_total_norm([seen[p] for p in optim.params], foreach=True)
    assert optim.grad_norm == float(expected)
