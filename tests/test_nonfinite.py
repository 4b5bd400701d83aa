"""The non-finite guard: a NaN or an infinity in the loss or in a gradient means no step, an unchanged state, and a
message that names the step, the place in the data, the site or parameter, and the last good checkpoint.

Faults are injected through public hooks: torch forward hooks on the networks (a NaN logit, a guide scale of 1e20)
and tensor hooks on a parameter's gradient, installed from a ``fit`` callback at a chosen step. Pyro itself warns
"Encountered NaN" for a NaN loss; those warnings are expected here and filtered.
"""

import copy
import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.errors import NonFiniteLossError
from pyro_vae.model import VAE
from pyro_vae.optim import GuardedSVI, adamw, nonfinite_sites
from pyro_vae.step import TrainStep
from pyro_vae.train import Callback, fit

pytestmark = pytest.mark.filterwarnings("ignore:Encountered NaN")


D, L = 10, 2


def make():
    torch.manual_seed(0)
    return VAE(D, latent_dim=L, hidden_dims=(8, 4))


def batch():
    return torch.bernoulli(torch.full((16, D), 0.4), generator=torch.Generator().manual_seed(1))


def nan_logit(module, inputs, output):
    output = output.clone()
    output[0, 0] = float("nan")  # one NaN among the decoder's outputs: the likelihood of one pixel
    return output


def huge_scale(module, inputs, output):
    output = output.clone()
    output[..., L:] = 1e20  # raw scale → softplus → a guide scale of 1e20: z ~ 1e20, log p(z) = -inf in float32
    return output


def nonfinite_grad(value):
    return lambda grad: torch.full_like(grad, value)


def inject(vae, fault):
    """Install one fault; returns the handle that removes it and the words the error must contain."""
    if fault == "nan loss":
        return vae.decoder.register_forward_hook(nan_logit), ["non-finite loss (nan)", "first at model site 'x'"]
    if fault == "inf loss":
        words = ["non-finite loss (inf)", "first at model site 'z' (log_prob -inf)"]
        return vae.encoder.register_forward_hook(huge_scale), words
    value = float(fault.split()[0])
    handle = vae.decoder.net[0].weight.register_hook(nonfinite_grad(value))
    return handle, ["non-finite gradient", "in decoder.net.0.weight"]


FAULTS = ["nan loss", "inf loss", "nan gradient", "inf gradient"]


def state_of(vae, optim):
    return [p.detach().clone() for p in vae.parameters()], copy.deepcopy(optim.state_dict())


def assert_unchanged(vae, optim, before):
    params, state = before
    for p, q in zip(vae.parameters(), params, strict=True):
        assert torch.equal(p, q)
    after = optim.state_dict()
    assert after["steps"] == state["steps"]
    for key, fields in state["optimizer"]["state"].items():
        for name, value in fields.items():
            assert torch.equal(after["optimizer"]["state"][key][name], value), (key, name)


@pytest.mark.parametrize("fault", FAULTS)
def test_the_optimiser_takes_no_step_and_names_the_site(fault):
    vae = make()
    optim = adamw(1e-2)
    svi = GuardedSVI(vae.model, vae.guide, optim, Trace_ELBO())
    x = batch()
    for _ in range(2):
        svi.step(x)
    before = state_of(vae, optim)
    handle, words = inject(vae, fault)
    with pyro.validation_enabled(False), pytest.raises(NonFiniteLossError) as info:
        svi.step(x)
    handle.remove()
    message = str(info.value)
    for word in [*words, "at optimiser step 3", "no step was taken and the parameters are unchanged"]:
        assert word in message, message
    assert info.value.step.kind == fault.split()[1]
    assert_unchanged(vae, optim, before)
    assert all(p.grad is None for p in vae.parameters())
    svi.step(x)  # and training goes on once the fault is gone
    assert optim.steps == 3


def test_the_replay_draws_the_noise_of_the_step():
    """A fault that only one noise draw triggers is still found: nonfinite_sites replays the step with the RNG state
    from before it, on a forked stream that leaves the caller's generator where it was."""
    vae = make()
    x = batch()
    state = torch.get_rng_state()
    with torch.no_grad(), pyro.validation_enabled(False):
        z0 = pyro.poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"][0, 0].item()

    def nan_for_that_draw(module, inputs, output):
        return output * float("nan") if inputs[0][0, 0].item() == z0 else output

    vae.decoder.register_forward_hook(nan_for_that_draw)
    torch.randn(3)  # the generator has moved on, as it has after a step
    after = torch.get_rng_state()
    assert nonfinite_sites(vae.model, vae.guide, x, rng_state=state)[0] == "model site 'x' (log_prob nan)"
    assert nonfinite_sites(vae.model, vae.guide, x) == []  # other noise: the fault does not show
    assert torch.equal(torch.get_rng_state(), after)


SMALL = ModelConfig(latent_dim=2, hidden_dims=(32, 16))


@pytest.fixture(scope="module")
def data():
    return load_dataset(DataConfig(n_train=256, n_test=64))


def config(**train):
    defaults = {"epochs": 3, "batch_size": 64, "progress": False, "threads": 1}
    return RunConfig(model=SMALL, train=TrainConfig(**{**defaults, **train}))


class FaultAfter(Callback):
    """After step ``step``, snapshot the state and install ``fault`` for the next ``count`` steps."""

    def __init__(self, step, fault, count=10**9):
        self.step, self.fault, self.count = step, fault, count
        self.handle = None

    def on_step_end(self, state):
        if state.step == self.step:
            self.optimizer = state.optimizer
            self.before = state_of(state.vae, state.optimizer)
            self.handle, self.words = inject(state.vae, self.fault)
        elif self.handle is not None and state.step == self.step + self.count:
            self.handle.remove()


@pytest.mark.parametrize("fault", FAULTS)
def test_fit_stops_with_the_step_the_images_the_site_and_the_last_checkpoint(data, tmp_path, fault):
    pyro.set_rng_seed(0)
    vae = VAE.from_config(SMALL, data.input_dim)
    callback = FaultAfter(5, fault)
    with pytest.raises(NonFiniteLossError) as info:
        fit(vae, data, config(), out_dir=tmp_path, callbacks=[callback])
    message = str(info.value)
    assert "\n" not in message
    assert "(step 6: epoch 1, batch 1 of 4, images " in message and ", … (64 images))" in message
    assert f"last good checkpoint: {tmp_path / 'last.pt'}" in message
    assert "pass --on-nonfinite skip" in message
    for word in callback.words:
        assert word in message, message
    assert_unchanged(vae, callback.optimizer, callback.before)
    assert load_checkpoint(tmp_path / "last.pt")["progress"]["step"] == 4  # the end of epoch 0, untouched


def test_skip_mode_skips_at_most_max_skips_batches(data, tmp_path):
    pyro.set_rng_seed(0)
    vae = VAE.from_config(SMALL, data.input_dim)
    result = fit(
        vae,
        data,
        config(on_nonfinite="skip", max_skips=2),
        out_dir=tmp_path / "a",
        callbacks=[FaultAfter(5, "nan loss", count=2)],
    )
    assert result.optimizer.skipped == 2 and result.optimizer.steps == 10 and result.steps == 12
    assert [math.isnan(v) for v in result.losses] == [False] * 5 + [True] * 2 + [False] * 5
    assert all(math.isfinite(r.train_elbo) for r in result.epochs)
    assert all(bool(torch.isfinite(p).all()) for p in vae.parameters())
    assert load_checkpoint(tmp_path / "a" / "last.pt")["optimizer"]["skipped"] == 2

    pyro.set_rng_seed(0)
    vae = VAE.from_config(SMALL, data.input_dim)
    with pytest.raises(NonFiniteLossError, match="1 batches were skipped already, the most max_skips=1 allows"):
        fit(
            vae,
            data,
            config(on_nonfinite="skip", max_skips=1),
            out_dir=tmp_path / "b",
            callbacks=[FaultAfter(5, "nan loss", count=2)],
        )


# ---------------------------------------------------------------------------------------------------------------
# The guard covers the whole step (defect 2): a NaN latent after the validated first step, a NaN parameter during it.


def nan_latent(module, inputs, output):
    return output * float("nan")  # the encoder's whole output: loc and scale, hence the guide's z, are NaN


def step_config(**train):
    return TrainConfig(**{"lr": 1e-2, **train})


def test_a_nan_latent_after_the_first_step_is_refused_in_one_line():
    """The prior cached during the validated first step used to keep validating, so a NaN z at a later step raised
    Pyro's multi-line ValueError at site 'z' instead of reaching the guard."""
    vae = make()
    step = TrainStep(vae, step_config(), num_data=64)
    x = batch()
    step.step(x)
    step.step(x)
    before = state_of(vae, step.optimizer)
    vae.encoder.register_forward_hook(nan_latent)
    with pytest.raises(NonFiniteLossError) as info:
        step.step(x)
    message = str(info.value)
    assert "\n" not in message
    assert "non-finite loss (nan) at optimiser step 3, first at guide site 'z' (value)" in message
    assert info.value.step.names[0] == "guide site 'z' (value)"
    assert (info.value.on_nonfinite, info.value.skipped, info.value.max_skips) == ("raise", 0, 10)
    assert_unchanged(vae, step.optimizer, before)


def test_skip_skips_a_nan_latent_and_training_continues():
    vae = make()
    step = TrainStep(vae, step_config(on_nonfinite="skip"), num_data=64)
    x = batch()
    step.step(x)
    handle = vae.encoder.register_forward_hook(nan_latent)
    losses = [step.step(x) for _ in range(2)]
    handle.remove()
    losses += [step.step(x) for _ in range(2)]
    assert [math.isnan(v) for v in losses] == [True, True, False, False]
    assert step.skipped == 2 and step.optimizer.steps == 3 and step.steps == 5


def test_the_issues_lr_1e30_run_is_refused_or_skipped_never_a_traceback():
    """``pyro-vae train --lr 1e30 --on-nonfinite skip``: after one step of size 1e30 every forward pass overflows.
    With raise the second step stops with the guard's error; with skip every later batch is skipped until
    max_skips, and then the guard's error says so."""
    x = batch()
    step = TrainStep(make(), step_config(lr=1e30), num_data=64)
    step.step(x)
    with pytest.raises(NonFiniteLossError, match="at optimiser step 2"):
        step.step(x)

    step = TrainStep(make(), step_config(lr=1e30, on_nonfinite="skip", max_skips=3), num_data=64)
    step.step(x)
    assert all(math.isnan(step.step(x)) for _ in range(3))
    with pytest.raises(NonFiniteLossError, match="3 batches were skipped already, the most max_skips=3 allows") as info:
        step.step(x)
    assert (info.value.on_nonfinite, info.value.skipped, info.value.max_skips) == ("skip", 3, 3)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_nan_parameter_in_the_validated_first_step_is_the_guards_error(policy):
    """During the first step Pyro's validation raises a ValueError for the NaN loc before there is a loss; the
    guard replays the step, finds the NaN parameter, and refuses the step like any other non-finite one."""
    vae = make()
    x = batch()
    step = TrainStep(vae, step_config(on_nonfinite=policy), num_data=64)
    saved = vae.encoder.head.weight.detach().clone()
    with torch.no_grad():
        vae.encoder.head.weight[0, 0] = float("nan")
    if policy == "raise":
        with pytest.raises(NonFiniteLossError) as info:
            step.step(x)
        message = str(info.value)
        assert "\n" not in message
        assert "non-finite value at optimiser step 1 (Pyro's validation refused it)" in message
        assert "first at guide param 'encoder.head.weight' (then guide site 'z' (value)" in message
        assert info.value.step.kind == "value"
        return
    assert math.isnan(step.step(x)) and step.skipped == 1 and step.optimizer.steps == 0
    assert all(p.grad is None for p in vae.parameters())
    with torch.no_grad():
        vae.encoder.head.weight.copy_(saved)
    assert math.isfinite(step.step(x)) and step.optimizer.steps == 1
    # every parameter joined the optimiser, in name order, although the refused step traced only the guide's
    assert step.optimizer.param_names == sorted(n for n, _ in vae.named_parameters())
