"""SingleOptimizer: one torch optimiser behind Pyro's PyroOptim interface."""

import copy

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_vae.errors import NonFiniteLossError
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


def test_bad_clip_norm():
    with pytest.raises(ValueError, match="clip_norm"):
        SingleOptimizer(clip_norm=-1.0)
