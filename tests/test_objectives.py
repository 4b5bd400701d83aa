"""Objectives: the registry, and the plate-aware IWAE against independent references on the linear-Gaussian model."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from reference_linear_gaussian import make_model, set_encoder_to_posterior
from scipy import special, stats
from torch.distributions import kl_divergence

from pyro_vae import cli
from pyro_vae.errors import ConfigError
from pyro_vae.model import VAE
from pyro_vae.objectives import IWAE_ELBO, make_objective, objective_names
from pyro_vae.optim import adamw


# ----------------------------------------------------------------------------------------------------------------
# The registry
def test_registry_names_and_cli_choices():
    assert objective_names() == ["iwae", "meanfield", "trace"]
    assert sorted(cli.OBJECTIVE_CHOICES) == objective_names()


@pytest.mark.parametrize(
    ("spec", "num_particles", "cls", "k", "estimator"),
    [
        ("trace", 1, Trace_ELBO, 1, None),
        ("trace", 3, Trace_ELBO, 3, None),
        ("trace:4", 1, Trace_ELBO, 4, None),
        ("meanfield:2", 2, TraceMeanField_ELBO, 2, None),
        ("iwae", 1, IWAE_ELBO, 1, "reparam"),
        ("iwae:5", 1, IWAE_ELBO, 5, "reparam"),
        ("iwae:5:stl", 1, IWAE_ELBO, 5, "stl"),
        ("iwae:50:dreg", 50, IWAE_ELBO, 50, "dreg"),
    ],
)
def test_make_objective_specs(spec, num_particles, cls, k, estimator):
    objective = make_objective(spec, num_particles)
    assert type(objective) is cls and objective.num_particles == k
    assert objective.vectorize_particles == (k > 1 or cls is IWAE_ELBO)
    if estimator is not None:
        assert objective.estimator == estimator


@pytest.mark.parametrize(
    ("spec", "num_particles", "message"),
    [
        ("nope", 1, "unknown objective 'nope'; choose one of: iwae, meanfield, trace"),
        ("iwea:5", 1, "did you mean 'iwae'"),
        ("iwae:0", 1, "k must be a positive number of particles"),
        ("iwae:x", 1, "is not an integer"),
        ("iwae:5:dreg:1", 1, "not of the form name[:k[:estimator]]"),
        ("iwae:5:drge", 1, "did you mean 'dreg'"),
        ("trace:4:dreg", 1, "takes no gradient estimator"),
        ("iwae:5", 3, "asks for 5 particles but num_particles is 3"),
        ("trace", 0, "num_particles must be a positive integer"),
    ],
)
def test_make_objective_refuses_bad_specs(spec, num_particles, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        make_objective(spec, num_particles)


# ----------------------------------------------------------------------------------------------------------------
# The value: an independent IW bound with the same noise
def _numpy_log_weights(vae, x, eps):
    """log w (K, B) from scipy densities, for z = loc + scale * eps with the guide's loc and scale."""
    q = vae.encode(x)
    loc, scale = q.mean.detach().numpy(), q.stddev.detach().numpy()  # (B, L)
    z = loc + scale * eps  # (K, B, L)
    w, b = vae.weight.detach().numpy(), vae.bias.detach().numpy()
    sigma = float(vae.noise_scale.detach())
    log_lik = stats.norm(z @ w.T + b, sigma).logpdf(x.numpy()).sum(-1)
    log_prior = stats.norm(0, 1).logpdf(z).sum(-1)
    log_q = stats.norm(loc, scale).logpdf(z).sum(-1)
    return log_lik + log_prior - log_q


@pytest.mark.parametrize("estimator", IWAE_ELBO.estimators)
@pytest.mark.parametrize("k", [1, 7])
def test_value_equals_an_independent_iw_bound_per_data_point(float64, estimator, k):
    vae = make_model(D=4, L=2, seed=0)
    x = vae.sample_data(5, generator=torch.Generator().manual_seed(0))
    num_data = 60  # a minibatch of 5 out of 60: the bound of each data point is scaled by 60 / 5
    objective = IWAE_ELBO(k, estimator)
    torch.manual_seed(1)
    loss = objective.loss(vae.model, vae.guide, x, num_data)
    torch.manual_seed(1)
    eps = torch.randn(k, 5, 2).numpy()  # the guide's rsample draws these from the same stream
    log_w = _numpy_log_weights(vae, x, eps)
    expected = -(num_data / 5) * (special.logsumexp(log_w, axis=0) - math.log(k)).sum()
    assert loss == pytest.approx(expected, rel=1e-12)
    torch.manual_seed(1)
    assert objective.loss_and_grads(vae.model, vae.guide, x, num_data) == pytest.approx(expected, rel=1e-12)


def test_iwae_with_one_particle_is_trace_elbo(float64):
    vae = make_model(D=4, L=2, seed=1)
    x = vae.sample_data(6, generator=torch.Generator().manual_seed(1))
    pyro.set_rng_seed(2)
    expected = Trace_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(2)
    assert make_objective("iwae:1").loss(vae.model, vae.guide, x) == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("num_data", [3, 60])
def test_minibatch_scale_stays_outside_the_log_sum_exp(float64, num_data):
    """Pyro #3104: RenyiELBO(alpha=0) sums the sites' plate-scaled log-densities before its log-sum-exp, so with a
    subsampled plate (N/B != 1) it bounds LSE_k((N/B) log w), not (N/B) LSE_k(log w); without subsampling the two
    agree (Pyro 1.9.2, vectorised particles)."""
    vae = make_model(D=4, L=2, seed=2)
    x = vae.sample_data(3, generator=torch.Generator().manual_seed(2))
    k, scale = 6, num_data / 3
    torch.manual_seed(3)
    ours = IWAE_ELBO(k).loss(vae.model, vae.guide, x, num_data)
    torch.manual_seed(3)
    renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1).loss(
        vae.model, vae.guide, x, num_data
    )
    torch.manual_seed(3)
    log_w = _numpy_log_weights(vae, x, torch.randn(k, 3, 2).numpy())
    assert ours == pytest.approx(-scale * (special.logsumexp(log_w, axis=0) - math.log(k)).sum(), rel=1e-12)
    assert renyi == pytest.approx(-(special.logsumexp(scale * log_w, axis=0) - math.log(k)).sum(), rel=1e-12)
    assert (ours == pytest.approx(renyi, rel=1e-12)) == (num_data == 3)


# ----------------------------------------------------------------------------------------------------------------
# Gradients
def _named_grads(vae):
    return {name: p.grad.detach().clone() for name, p in vae.named_parameters() if p.grad is not None}


def _gradient(vae, objective, x, seed):
    vae.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    objective.loss_and_grads(vae.model, vae.guide, x)
    grads = _named_grads(vae)
    vae.zero_grad(set_to_none=True)
    return grads


def _flat(grads, names):
    return torch.cat([grads[n].reshape(-1) for n in names])


ENCODER = ["encoder.head.weight", "encoder.head.bias"]
DECODER = ["decoder.weight", "decoder.bias", "likelihood.log_scale"]


def _batch_means(vae, objective, x, replicates, batches, seed):
    """Gradient estimates of one data point: ``batches`` independent means of ``replicates`` single estimates each.

    Replicating x in the data plate draws independent particles per copy, and the loss sums the copies, so the
    gradient divided by the number of copies is the mean of that many independent single-estimator gradients.
    """
    xs = x.expand(replicates, -1)
    rows = []
    for b in range(batches):
        grads = _gradient(vae, objective, xs, seed + b)
        rows.append(_flat(grads, ENCODER + DECODER) / replicates)
    return torch.stack(rows)  # (batches, P)


def _exact_elbo_gradient(vae, x):
    """∇ of -ELBO(x) = -(log p(x) - KL(q(z|x) ‖ p(z|x))), in closed form: the K = 1 reference."""
    vae.zero_grad(set_to_none=True)
    elbo = vae.log_marginal(x) - kl_divergence(vae.encode(x), vae.posterior(x))
    (-elbo.sum()).backward()
    grads = _named_grads(vae)
    vae.zero_grad(set_to_none=True)
    return _flat(grads, ENCODER + DECODER)


def _assert_within_se(estimate, reference, se, what):
    # Each coordinate's mean is within 4 standard errors of the reference (the batch-means SE, combined in
    # quadrature with the reference's own SE where it has one). With ~25 coordinates per call the chance of a false
    # alarm is ~25 * 6e-5, and the seeds are fixed.
    z = ((estimate - reference) / se).abs()
    assert (z < 4).all(), f"{what}: |z| = {z.tolist()}"


@pytest.mark.parametrize("estimator", IWAE_ELBO.estimators)
def test_one_particle_gradients_are_unbiased_for_the_exact_elbo_gradient(float64, estimator):
    vae = make_model(D=3, L=2, seed=3)
    x = vae.sample_data(1, generator=torch.Generator().manual_seed(3))
    batches = _batch_means(vae, IWAE_ELBO(1, estimator), x, replicates=1000, batches=16, seed=10)
    mean, se = batches.mean(0), batches.std(0, unbiased=True) / math.sqrt(len(batches))
    _assert_within_se(mean, _exact_elbo_gradient(vae, x), se, estimator)


def test_dreg_gradient_agrees_with_a_high_particle_reference(float64):
    """For K > 1 the reparam and DReG gradients are both unbiased for ∇L_K; the reference is the reparam estimator
    averaged over 8 times as many independent estimates."""
    vae = make_model(D=3, L=2, seed=4)
    x = vae.sample_data(1, generator=torch.Generator().manual_seed(4))
    k = 5
    reference = _batch_means(vae, IWAE_ELBO(k, "reparam"), x, replicates=4000, batches=16, seed=100)
    dreg = _batch_means(vae, IWAE_ELBO(k, "dreg"), x, replicates=2000, batches=4, seed=200)
    ref_mean, ref_se = reference.mean(0), reference.std(0, unbiased=True) / math.sqrt(len(reference))
    dreg_se = dreg.std(0, unbiased=True) / math.sqrt(len(dreg))
    _assert_within_se(dreg.mean(0), ref_mean, torch.sqrt(ref_se**2 + dreg_se**2), "dreg vs reparam reference")
    # The same comparison separates a biased estimator: STL's encoder gradient is biased for K > 1 (Tucker et al.
    # 2018, §4), here by tens of standard errors, so the test above has the power to see a wrong weighting.
    stl = _batch_means(vae, IWAE_ELBO(k, "stl"), x, replicates=2000, batches=4, seed=300)
    stl_se = torch.sqrt(ref_se**2 + (stl.std(0, unbiased=True) / math.sqrt(len(stl))) ** 2)
    assert ((stl.mean(0) - ref_mean) / stl_se).abs().max() > 10


def test_decoder_gets_the_standard_iwae_gradient_under_every_estimator(float64):
    """With the same noise, stl and dreg give the decoder exactly reparam's gradient Σ w~ ∇θ log p(x, z)."""
    vae = make_model(D=4, L=2, seed=5)
    x = vae.sample_data(8, generator=torch.Generator().manual_seed(5))
    grads = {e: _gradient(vae, IWAE_ELBO(6, e), x, seed=7) for e in IWAE_ELBO.estimators}
    for estimator in ("stl", "dreg"):
        for name in DECODER:
            torch.testing.assert_close(grads[estimator][name], grads["reparam"][name], rtol=1e-12, atol=1e-12)
    # At K = 1 the DReG weights are 1, so DReG is STL.
    one = {e: _gradient(vae, IWAE_ELBO(1, e), x, seed=7) for e in ("stl", "dreg")}
    for name in ENCODER + DECODER:
        torch.testing.assert_close(one["dreg"][name], one["stl"][name], rtol=1e-12, atol=1e-12)


def test_reparam_gradient_is_the_gradient_of_the_bound_with_the_same_noise(float64):
    vae = make_model(D=4, L=2, seed=6)
    x = vae.sample_data(5, generator=torch.Generator().manual_seed(6))
    k = 4
    grads = _gradient(vae, IWAE_ELBO(k), x, seed=8)
    # An independent torch implementation: explicit Gaussian densities, the same standard normal draws.
    torch.manual_seed(8)
    eps = torch.randn(k, 5, 2)
    q = vae.encode(x)
    z = q.mean + q.stddev * eps  # (K, B, L)
    sigma = vae.noise_scale
    log_lik = (-0.5 * ((x - vae.decoder(z)) / sigma) ** 2 - sigma.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_q = (-0.5 * eps**2 - q.stddev.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    bound = (torch.logsumexp(log_lik + log_prior - log_q, 0) - math.log(k)).sum()
    vae.zero_grad(set_to_none=True)
    (-bound).backward()
    expected = _named_grads(vae)
    for name in ENCODER + DECODER:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-10, atol=1e-12)


def test_stl_and_dreg_encoder_gradients_vanish_at_the_exact_posterior(float64):
    """Roeder et al.: with q = p(z | x), log w is constant in z, so the path gradient is exactly 0 for every draw;
    the reparam estimator keeps the zero-mean score term."""
    vae = make_model(D=5, L=2, seed=7, orthogonal=True)
    set_encoder_to_posterior(vae)
    x = vae.sample_data(4, generator=torch.Generator().manual_seed(7))
    for estimator, vanishes in (("stl", True), ("dreg", True), ("reparam", False)):
        grads = _gradient(vae, IWAE_ELBO(5, estimator), x, seed=9)
        norm = _flat(grads, ENCODER).abs().max().item()
        assert (norm < 1e-9) == vanishes, (estimator, norm)


# ----------------------------------------------------------------------------------------------------------------
# Through SVI, and what is refused
@pytest.mark.parametrize("spec", ["iwae:3", "iwae:3:stl", "iwae:3:dreg"])
def test_iwae_trains_the_vae_through_svi(spec):
    torch.manual_seed(0)
    vae = VAE(20, latent_dim=2, hidden_dims=(16, 8))
    x = torch.bernoulli(torch.full((32, 20), 0.3))
    svi = SVI(vae.model, vae.guide, adamw(1e-2), make_objective(spec))
    before = [p.detach().clone() for p in vae.parameters()]
    losses = [svi.step(x, 320) for _ in range(30)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert all(not torch.equal(b, p) for b, p in zip(before, vae.parameters(), strict=True))


def test_dreg_refuses_parameters_shared_by_model_and_guide():
    def model(x):
        loc = pyro.param("loc", torch.zeros(()))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(()))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0))

    with pytest.raises(ValueError, match="appear in both"):
        IWAE_ELBO(3, "dreg").loss_and_grads(model, guide, torch.zeros(4))
    with pytest.raises(NotImplementedError, match="no single differentiable loss"):
        IWAE_ELBO(3, "dreg").differentiable_loss(model, guide, torch.zeros(4))
    assert torch.isfinite(IWAE_ELBO(3, "stl").differentiable_loss(model, guide, torch.zeros(4)))


def test_iwae_refuses_latent_sites_without_rsample():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(0.3))

    with pytest.raises(NotImplementedError, match="reparameterised latent sites"):
        IWAE_ELBO(3).loss(model, guide, torch.zeros(4))
