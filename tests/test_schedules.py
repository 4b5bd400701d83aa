"""KL schedules: exact equalities with Pyro's ELBOs, the KL path's gradient, free bits, state and the registry."""

import json

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from reference_linear_gaussian import make_model, set_diagonal_encoder

from pyro_vae import cli
from pyro_vae.cli.flags import config_from_args
from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.errors import ConfigError
from pyro_vae.guides import GuideFamily
from pyro_vae.linear_gaussian import LinearGaussianVAE
from pyro_vae.model import VAE
from pyro_vae.objectives import make_objective
from pyro_vae.schedules import Constant, Cyclical, FreeBits, LinearWarmup, kl_scaled, make_schedule, schedule_names
from pyro_vae.train import fit


def _loss_and_grads(model, guide, vae, x, objective="trace", seed=0):
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(seed)
    loss = make_objective(objective).loss_and_grads(model, guide, x)
    grads = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    vae.zero_grad(set_to_none=True)
    return loss, grads


def test_registry_and_cli_choices():
    assert schedule_names() == ["constant", "cyclical", "free_bits", "linear"]
    assert sorted(cli.KL_SCHEDULE_CHOICES) == schedule_names()
    assert make_schedule(None) is None


@pytest.mark.parametrize("objective", ["trace", "meanfield", "trace:3", "iwae:4"])
def test_beta_one_is_exactly_the_unscheduled_objective(objective):
    """β ≡ 1 changes nothing: with the same seed the loss and every gradient are bit-identical to the plain
    objective's (for ``trace``, Pyro's own Trace_ELBO)."""
    torch.manual_seed(0)
    vae = VAE(20, latent_dim=3, hidden_dims=(16, 8))
    x = torch.bernoulli(torch.full((10, 20), 0.4))
    plain = _loss_and_grads(vae.model, vae.guide, vae, x, objective)
    for schedule in (Constant(1.0), LinearWarmup(5), Cyclical(8, 0.5)):
        schedule.steps = {Constant: 0, LinearWarmup: 5, Cyclical: 7}[type(schedule)]  # β = 1 at these steps
        assert schedule.value == 1.0
        loss, grads = _loss_and_grads(*kl_scaled(vae.model, vae.guide, schedule), vae, x, objective)
        assert loss == plain[0]
        for name, grad in grads.items():
            assert torch.equal(grad, plain[1][name]), name


def test_the_loss_is_affine_in_beta():
    """-(reconstruction - β KL) with the same draws: loss(β) = (1 - β) loss(0) + β loss(1)."""
    torch.manual_seed(1)
    vae = VAE(20, latent_dim=3, hidden_dims=(16, 8))
    x = torch.bernoulli(torch.full((10, 20), 0.4))
    losses = {b: _loss_and_grads(*kl_scaled(vae.model, vae.guide, Constant(b)), vae, x)[0] for b in (0.0, 0.3, 1.0)}
    assert losses[0.3] == pytest.approx(0.7 * losses[0.0] + 0.3 * losses[1.0], rel=1e-6)


def test_beta_zero_gives_zero_gradient_along_the_kl_path(float64):
    """With W = 0 the decoder ignores z, so the encoder's only gradient comes through KL(q ‖ p): β = 0 removes it."""
    vae = make_model(D=4, L=2, seed=0, zero_columns=(0, 1))
    x = vae.sample_data(8, generator=torch.Generator().manual_seed(0))
    for objective in ("trace", "iwae:3:dreg"):
        _, zero = _loss_and_grads(*kl_scaled(vae.model, vae.guide, Constant(0.0)), vae, x, objective)
        _, one = _loss_and_grads(*kl_scaled(vae.model, vae.guide, Constant(1.0)), vae, x, objective)
        for name in ("encoder.head.weight", "encoder.head.bias"):
            assert torch.count_nonzero(zero[name]) == 0, (objective, name)
            assert one[name].abs().max() > 1e-3, (objective, name)
        assert zero["likelihood.log_scale"].abs() > 0  # the reconstruction term still trains the decoder


def test_free_bits_stops_penalising_a_dimension_below_its_budget(float64):
    """Dimension 1 is unused by the decoder and has KL ≈ 0.14 nats; dimension 0 has KL = 2. With a budget of 0.5
    nats the KL of dimension 1 is free: its encoder outputs get exactly zero gradient; dimension 0 keeps its KL."""
    vae = make_model(D=4, L=2, seed=1, zero_columns=(1,))
    set_diagonal_encoder(vae, np.zeros((2, 4)), np.array([2.0, 0.0]), np.array([1.0, 0.65]))
    x = vae.sample_data(8, generator=torch.Generator().manual_seed(1))
    L = 2
    rows = {0: [0, L], 1: [1, L + 1]}  # the head's rows producing (loc_d, raw_scale_d)
    free = FreeBits(0.5)
    _, grads = _loss_and_grads(*kl_scaled(vae.model, vae.guide, free), vae, x)
    assert free.weights.tolist() == [1.0, 0.0] and free.value == 0.5
    head = grads["encoder.head.bias"]
    assert torch.count_nonzero(head[rows[1]]) == 0 and head[rows[0]].abs().min() > 1e-3
    # Below every budget nothing is penalised: the same gradient as β = 0, up to rounding.
    _, none_free = _loss_and_grads(*kl_scaled(vae.model, vae.guide, FreeBits(0.0)), vae, x)
    _, beta_one = _loss_and_grads(vae.model, vae.guide, vae, x)
    torch.testing.assert_close(none_free["encoder.head.bias"], beta_one["encoder.head.bias"], rtol=1e-10, atol=1e-12)
    _, all_free = _loss_and_grads(*kl_scaled(vae.model, vae.guide, FreeBits(100.0)), vae, x)
    _, beta_zero = _loss_and_grads(*kl_scaled(vae.model, vae.guide, Constant(0.0)), vae, x)
    torch.testing.assert_close(all_free["encoder.head.bias"], beta_zero["encoder.head.bias"], rtol=1e-10, atol=1e-12)


class _Correlated(GuideFamily):
    """A guide with a full covariance, which has no per-dimension KL."""

    name = "correlated"

    @property
    def num_params(self):
        return self.latent_dim

    def forward(self, raw, context=None):
        tril = torch.eye(self.latent_dim, dtype=raw.dtype) + torch.tril(torch.ones_like(raw[0, 0]).expand(2, 2), -1)
        return dist.MultivariateNormal(raw, scale_tril=tril.expand(raw.shape[0], -1, -1))


def test_free_bits_refuses_a_guide_that_does_not_factorise(float64):
    vae = LinearGaussianVAE(4, 2, guide=_Correlated(2)).double()
    x = vae.sample_data(3)
    with pytest.raises(ConfigError, match="factorises over dimensions"):
        make_objective("trace").loss(*kl_scaled(vae.model, vae.guide, FreeBits(0.1)), x)


def test_schedule_values():
    linear = LinearWarmup(10, start=0.2)
    cyclical = Cyclical(8, ratio=0.5)
    values = []
    for _ in range(20):
        values.append((linear.value, cyclical.value))
        linear.step()
        cyclical.step()
    assert [v[0] for v in values[:12]] == pytest.approx([0.2 + 0.08 * min(t, 10) for t in range(12)])
    # Fu et al.: rise over the first half of each 8-step cycle, then hold at 1.
    assert [v[1] for v in values[:10]] == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1, 1, 1, 0, 0.25])


@pytest.mark.parametrize("spec", ["constant:0.5", "linear:4", "cyclical:8"])
def test_weight_input_scales_by_the_tensor_whatever_beta_is(spec):
    """Inside ``weight_input`` the latent site's scale is the given tensor times the plate's scale (what a traced
    graph records as a product with its input), even where β is 1 and the eager step skips the product; outside,
    the eager rule holds again. The observed site is untouched either way."""
    schedule = make_schedule(spec)
    schedule.steps = 4  # β = 0.5, 1, 1: both sides of the eager step's β == 1 shortcut
    vae = VAE(6, latent_dim=2, hidden_dims=(4,))
    x = torch.bernoulli(torch.full((3, 6), 0.5))
    model, guide = kl_scaled(vae.model, vae.guide, schedule)
    weight = torch.tensor(0.125)
    with schedule.weight_input(weight):
        inside = [pyro.poutine.trace(p).get_trace(x, 12) for p in (guide, model)]
    outside = [pyro.poutine.trace(p).get_trace(x, 12) for p in (guide, model)]
    for trace in inside:
        assert torch.is_tensor(trace.nodes["z"]["scale"]) and trace.nodes["z"]["scale"].item() == 0.125 * 4
    for trace in outside:
        assert trace.nodes["z"]["scale"] == schedule.value * 4  # N/B = 12/3 and the number β
    assert inside[1].nodes["x"]["scale"] == outside[1].nodes["x"]["scale"] == 4
    assert schedule.scalar_weight


def test_free_bits_has_no_scalar_weight():
    """Free bits weights each dimension from the minibatch's KL, so a compiled step cannot take it as one input."""
    schedule = make_schedule("free_bits:0.5")
    assert not schedule.scalar_weight
    with pytest.raises(ValueError, match="the free_bits KL schedule has no scalar weight"):
        with schedule.weight_input(torch.tensor(1.0)):
            pass


def test_state_dict_round_trip_and_mismatch():
    schedule = make_schedule("cyclical:100:0.25")
    for _ in range(37):
        schedule.step()
    state = json.loads(json.dumps(schedule.state_dict()))  # plain data, as a checkpoint stores it
    fresh = make_schedule("cyclical:100:0.25")
    fresh.load_state_dict(state)
    assert fresh.steps == 37 and fresh.value == schedule.value
    with pytest.raises(ConfigError, match="resume with the schedule the run was started with"):
        make_schedule("cyclical:100:0.5").load_state_dict(state)
    with pytest.raises(ConfigError, match="'linear'"):
        make_schedule("cyclical:100:0.25").load_state_dict({**state, "name": "linear"})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("linaer:10", "did you mean 'linear'"),
        ("linear", "has 0 number\\(s\\); write linear:warmup_steps\\[:start\\]"),
        ("constant:1:2", "write constant:weight"),
        ("linear:0", "^the linear KL schedule's warm-up length must be a positive finite number, got 0.0$"),
        ("linear:10:2", r"^the linear KL schedule's start must be a number in \[0.0, 1.0\], got 2.0$"),
        ("cyclical:10:0", r"^the cyclical KL schedule's ratio must be a number in \(0.0, 1.0\], got 0.0$"),
        ("constant:-1", "every number must be finite and >= 0"),
        ("free_bits:x", "is not a number"),
        ("", "non-empty string"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        make_schedule(spec)


def test_config_validates_the_grammar():
    assert TrainConfig(kl_schedule="linear:100").kl_schedule == "linear:100"
    with pytest.raises(ConfigError, match="is not a number"):
        TrainConfig(kl_schedule="linear:abc")


def test_fit_applies_steps_logs_and_checkpoints_the_schedule(tmp_path):
    config = RunConfig(
        data=DataConfig(n_train=128, n_test=32),
        model=ModelConfig(latent_dim=2, hidden_dims=(16, 8)),
        train=TrainConfig(epochs=2, batch_size=64, progress=False, kl_schedule="linear:8"),
    )
    data = load_dataset(config.data)
    torch.manual_seed(0)
    result = fit(VAE.from_config(config.model, data.input_dim), data, config, out_dir=tmp_path)
    assert [e.kl_weight for e in result.epochs] == [0.25, 0.5]  # 2 and 4 steps of an 8-step warm-up
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["kl_weight"] for m in metrics] == [0.25, 0.5]
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    assert payload["schedules"]["kl"] == {"name": "linear", "options": {"warmup_steps": 8.0, "start": 0.0}, "steps": 4}


def test_cli_flags_reach_the_config(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--objective", "iwae:5:dreg", "--kl-schedule", "cyclical:100:0.5"])
    config = cli.config_from_args(args)
    assert config.train.objective == "iwae:5:dreg" and config.train.kl_schedule == "cyclical:100:0.5"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["train", "--kl-schedule", "linaer:100"])
    assert exit_info.value.code == 2 and "did you mean 'linear'" in capsys.readouterr().err


def test_default_warm_up_ends_at_weight_one_within_the_quickstart():
    """The default KL schedule is a warm-up that reaches weight 1 before the quickstart's last step, so the default
    run ends on the plain ELBO: 20 epochs of ceil(10 000 / 128) = 79 steps on the embedded data are 1 580 steps."""
    train, data = TrainConfig(), load_dataset(DataConfig(n_test=1))
    steps = train.epochs * -(-data.x_train.shape[0] // train.batch_size)  # ceil division
    assert steps == 1580
    schedule = make_schedule(train.kl_schedule)
    assert isinstance(schedule, LinearWarmup)
    betas = []  # the weight each step trains with
    for _ in range(steps):
        betas.append(schedule.beta())
        schedule.step()
    assert betas[0] == 0.0 and betas.index(1.0) == 1000 and betas[-1] == 1.0


def test_none_spells_the_plain_elbo_in_configs_and_flags():
    assert TrainConfig(kl_schedule="none").kl_schedule is None
    assert RunConfig.from_dict({"train": {"kl_schedule": "none"}}).train.kl_schedule is None
    args = cli.build_parser().parse_args(["train", "--kl-schedule", "none"])
    assert config_from_args(args).train.kl_schedule is None  # a given flag, not the default
    assert config_from_args(cli.build_parser().parse_args(["train"])).train.kl_schedule == "linear:1000"


def test_a_warm_up_longer_than_the_run_is_one_log_line(caplog):
    """A run shorter than its warm-up ends on a down-weighted KL term; TrainStep says so once, naming the fixes, and
    says nothing when the warm-up ends in time or for schedules whose weight below 1 is intended."""
    import logging

    from pyro_vae.config import TrainConfig
    from pyro_vae.model import VAE
    from pyro_vae.step import TrainStep

    vae = VAE(12, latent_dim=2, hidden_dims=(8,))
    with caplog.at_level(logging.INFO, logger="pyro_vae.step"):
        TrainStep(vae, TrainConfig(kl_schedule="linear:1000"), num_data=64, total_steps=500)
    (record,) = caplog.records
    assert record.getMessage() == (
        "the KL warm-up linear:1000 reaches weight 1 after 1000 steps but this run takes 500, so it ends on a "
        "down-weighted KL term; raise --epochs, or pass a shorter --kl-schedule linear:N (N <= 500) or "
        "--kl-schedule none"
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pyro_vae.step"):
        TrainStep(vae, TrainConfig(kl_schedule="linear:1000"), num_data=64, total_steps=1000)
        TrainStep(vae, TrainConfig(kl_schedule="constant:0.5"), num_data=64, total_steps=10)
        TrainStep(vae, TrainConfig(kl_schedule="cyclical:100"), num_data=64, total_steps=10)
        TrainStep(vae, TrainConfig(kl_schedule="linear:1000"), num_data=64)  # length unknown: nothing to say
    assert caplog.records == []
