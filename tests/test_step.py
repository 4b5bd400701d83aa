"""TrainStep: the step fit, the benchmarks and a user's loop share, equal bit for bit to the loop it replaces."""

import copy
import math

import pyro
import pytest
import torch

from pyro_vae.config import TrainConfig
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.model import VAE
from pyro_vae.objectives import make_objective
from pyro_vae.optim import GuardedSVI, adamw
from pyro_vae.schedules import kl_scaled, make_schedule
from pyro_vae.step import TrainStep

D, L, N, B = 12, 2, 64, 16


def make(seed=0):
    torch.manual_seed(seed)
    return VAE(D, latent_dim=L, hidden_dims=(8, 4))


def minibatches(steps):
    """``steps`` (x, index) pairs drawn from N fixed binary images, as an epoch loop would hand them over."""
    g = torch.Generator().manual_seed(1)
    data = torch.bernoulli(torch.full((N, D), 0.4), generator=g)
    out = []
    for _ in range(steps):
        index = torch.randperm(N, generator=g)[:B]
        out.append((data[index], index))
    return out


def old_loop(vae, tc, batches):
    """Today's fit, written out: adamw, make_schedule + kl_scaled, GuardedSVI, validation on for the first step,
    ``svi.step(x, N, index) / N``, then the schedule's step."""
    optimizer = adamw(
        tc.lr, tc.weight_decay, clip_norm=tc.clip_norm, on_nonfinite=tc.on_nonfinite, max_skips=tc.max_skips
    )
    model, guide = vae.model, vae.guide
    kl_schedule = make_schedule(tc.kl_schedule)
    if kl_schedule is not None:
        model, guide = kl_scaled(model, guide, kl_schedule)
    svi = GuardedSVI(model, guide, optimizer, make_objective(tc.objective, tc.num_particles))
    losses, validate = [], True
    for x, index in batches:
        with pyro.validation_enabled(validate):
            losses.append(svi.step(x, N, index) / N)
        validate = False
        if kl_schedule is not None:
            kl_schedule.step()
    return losses


CONFIGS = [
    TrainConfig(lr=1e-2),
    TrainConfig(lr=1e-2, weight_decay=0.1, clip_norm=0.5, kl_schedule="linear:10", objective="iwae:3"),
]


@pytest.mark.parametrize("tc", CONFIGS, ids=["default", "clip-schedule-iwae"])
def test_losses_and_parameters_equal_the_old_loop_bit_for_bit(tc):
    batches = minibatches(20)
    old, new = make(), make()
    pyro.set_rng_seed(0)
    expected = old_loop(old, tc, batches)
    pyro.set_rng_seed(0)
    step = TrainStep(new, tc, num_data=N)
    losses = [step.step(x, index) for x, index in batches]
    assert losses == expected  # Python floats: == is bit equality
    for a, b in zip(old.parameters(), new.parameters(), strict=True):
        assert torch.equal(a, b)
    assert step.steps == 20 and step.skipped == 0 and math.isfinite(step.grad_norm)
    # linear:S after 20 steps: min(1, 20 / S) (the default warm-up is linear:1000)
    weight = None if tc.kl_schedule is None else min(1.0, 20 / float(tc.kl_schedule.split(":")[1]))
    assert step.kl_weight == weight


def test_without_num_data_the_loss_is_per_image_of_the_minibatch():
    """num_data=None: the plate's size is B, so the step's estimate is the minibatch's sum, divided by B."""
    ((x, _),) = minibatches(1)
    a, b = make(), make()
    pyro.set_rng_seed(0)
    loss = TrainStep(a, TrainConfig(lr=1e-2, kl_schedule=None)).step(x)
    pyro.set_rng_seed(0)
    svi = GuardedSVI(b.model, b.guide, adamw(1e-2), make_objective("trace", 1))
    assert loss == svi.step(x) / B


def test_validation_is_on_for_the_first_call_only():
    """Grey pixels are outside the Bernoulli's support: the validated first call refuses them (a genuine error,
    re-raised as Pyro's ValueError, not taken for a non-finite value); a later call, validation off although the
    test session turns it on globally, does not look."""
    ((x, index),) = minibatches(1)
    grey = torch.full_like(x, 0.5)
    with pytest.raises(ValueError, match="support"):
        TrainStep(make(), TrainConfig(), num_data=N).step(grey, index)
    step = TrainStep(make(), TrainConfig(), num_data=N)
    step.step(x, index)
    assert math.isfinite(step.step(grey, index))


def test_state_dict_round_trip_continues_bit_exactly():
    tc = TrainConfig(lr=1e-2, kl_schedule="linear:8")
    batches = minibatches(10)
    pyro.set_rng_seed(0)
    straight = TrainStep(make(), tc, num_data=N)
    expected = [straight.step(x, i) for x, i in batches]

    pyro.set_rng_seed(0)
    first = TrainStep(make(), tc, num_data=N)
    losses = [first.step(x, i) for x, i in batches[:6]]
    saved = copy.deepcopy((first.vae.state_dict(), first.state_dict(), torch.get_rng_state()))
    assert set(saved[1]) == {"optimizer", "schedules"} and set(saved[1]["schedules"]) == {"kl"}

    vae = make(seed=99)
    vae.load_state_dict(saved[0])
    resumed = TrainStep(vae, tc, num_data=N)
    resumed.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    assert resumed.steps == 6 and resumed.kl_weight == 6 / 8
    losses += [resumed.step(x, i) for x, i in batches[6:]]
    assert losses == expected
    for a, b in zip(straight.vae.parameters(), vae.parameters(), strict=True):
        assert torch.equal(a, b)


def test_hyperparameters_from_config_apply_this_configs_lr_and_weight_decay():
    ((x, index),) = minibatches(1)
    first = TrainStep(make(), TrainConfig(lr=1e-2, weight_decay=0.1), num_data=N)
    first.step(x, index)
    state = first.state_dict()
    for force, expected in ((False, (1e-2, 0.1)), (True, (3e-4, 0.0))):
        other = TrainStep(make(), TrainConfig(lr=3e-4), num_data=N)
        other.load_state_dict(state, hyperparameters_from_config=force)
        other.step(x, index)  # the optimiser is built, and the pending state applied, at the first step
        groups = other.optimizer.optimizer.param_groups
        assert {(g["lr"], g["weight_decay"]) for g in groups} == {expected}
    assert state["optimizer"]["optimizer"]["param_groups"][0]["lr"] == 1e-2  # the caller's state is not modified


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda vae: TrainStep(vae, {"lr": 1e-3}), ["needs a pyro_vae.TrainConfig, got dict"]),
        (
            lambda vae: TrainStep(vae, TrainConfig(), num_data=0),
            ["num_data (the training set's size) must be a positive integer", "got 0"],
        ),
        (
            lambda vae: TrainStep(vae, TrainConfig(), num_data=True),
            ["num_data (the training set's size) must be a positive integer"],
        ),
    ],
)
def test_bad_construction_is_one_line(build, words):
    with pytest.raises(ConfigError) as info:
        build(make())
    assert "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("x", "index", "words"),
    [
        (torch.zeros(B, D + 1), None, [f"images of shape (B, {D})", f"got ({B}, {D + 1})"]),
        (torch.zeros(D), None, [f"got ({D},)"]),
        (torch.zeros(N + 1, D), None, [f"a minibatch of {N + 1} images cannot come from num_data={N}"]),
        (torch.zeros(B, D), torch.arange(B + 1), [f"index must be a tensor of shape ({B},)", f"got ({B + 1},)"]),
    ],
)
def test_a_bad_first_minibatch_is_refused_before_any_work(x, index, words):
    vae = make()
    before = [p.detach().clone() for p in vae.parameters()]
    step = TrainStep(vae, TrainConfig(), num_data=N)
    with pytest.raises(DataError) as info:
        step.step(x, index)
    assert "\n" not in str(info.value) and all(word in str(info.value) for word in words), str(info.value)
    assert step.steps == 0 and step.optimizer.optimizer is None
    assert all(torch.equal(p, q) for p, q in zip(vae.parameters(), before, strict=True))
