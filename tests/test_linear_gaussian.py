"""LinearGaussianVAE: closed forms against scipy, and the ELBO against them, in float64."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from reference_linear_gaussian import (
    diagonal_q,
    gaussian_kl,
    log_marginal,
    make_model,
    posterior,
    set_encoder_to_posterior,
)

from pyro_vae.importance import log_weights, particle_traces
from pyro_vae.linear_gaussian import LinearGaussianVAE
from pyro_vae.objectives import make_objective
from pyro_vae.optim import adamw


def test_marginal_and_posterior_match_scipy(float64):
    vae = make_model(D=5, L=3, seed=1)
    x = vae.sample_data(7, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(vae.log_marginal(x).detach().numpy(), log_marginal(vae, x), rtol=1e-12)
    mean, cov = posterior(vae, x)
    q = vae.posterior(x)
    np.testing.assert_allclose(q.loc.detach().numpy(), mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(q.covariance_matrix[0].detach().numpy(), cov, rtol=1e-10, atol=1e-12)


def test_sample_data_has_the_marginal_moments(float64):
    vae = make_model(D=3, L=2, seed=2)
    n = 20000
    x = vae.sample_data(n, generator=torch.Generator().manual_seed(1)).numpy()
    w, b, sigma = vae.weight.detach().numpy(), vae.bias.detach().numpy(), float(vae.noise_scale.detach())
    cov = w @ w.T + sigma**2 * np.eye(3)
    # The sample mean of each coordinate has standard error sqrt(C_dd / n): 4 of them.
    np.testing.assert_array_less(np.abs(x.mean(0) - b), 4 * np.sqrt(np.diag(cov) / n))


def test_exact_posterior_guide_gives_log_px_with_zero_variance(float64):
    """With q = p(z | x), every importance weight is p(x): the ELBO equals log p(x) for every sample."""
    vae = make_model(D=4, L=2, seed=3)
    x = vae.sample_data(6, generator=torch.Generator().manual_seed(2))
    exact = torch.from_numpy(log_marginal(vae, x))
    model_trace, guide_trace = particle_traces(vae.model, vae.exact_guide, 50, (x,))
    log_w = log_weights(model_trace, guide_trace, 50).log_weight  # (50, 6)
    torch.testing.assert_close(log_w, exact.expand(50, 6), rtol=0, atol=1e-10)
    # And through Pyro's own Trace_ELBO: the loss is -Σ log p(x_i), whatever the noise.
    for seed in range(3):
        pyro.set_rng_seed(seed)
        assert Trace_ELBO().loss(vae.model, vae.exact_guide, x) == pytest.approx(-exact.sum().item(), abs=1e-9)


@pytest.mark.parametrize("guide", ["mvn_diag", "diag_normal"])
def test_diagonal_guide_gap_is_the_kl_to_the_posterior(float64, guide):
    """ELBO(x) = log p(x) - KL(q(z|x) ‖ p(z|x)), with the KL in closed form."""
    vae = make_model(D=4, L=3, seed=4, guide=guide)
    x = vae.sample_data(20, generator=torch.Generator().manual_seed(3))
    q_mean, q_cov = diagonal_q(vae, x)
    p_mean, p_cov = posterior(vae, x)
    closed = log_marginal(vae, x) - gaussian_kl(q_mean, q_cov, p_mean, p_cov)  # (20,)
    samples = 4000
    with torch.no_grad():
        log_w = log_weights(*particle_traces(vae.model, vae.guide, samples, (x,)), samples).log_weight.numpy()
    # Every log w[s, i] - ELBO_i has mean 0 and the draws are independent, so the mean of all S·B residuals has
    # standard error std / sqrt(S·B); allow 4 of them. Each image alone: 5 standard errors of its own S draws.
    residual = log_w - closed
    se = residual.std(ddof=1) / math.sqrt(residual.size)
    assert abs(residual.mean()) < 4 * se
    per_image_se = residual.std(0, ddof=1) / math.sqrt(samples)
    np.testing.assert_array_less(np.abs(residual.mean(0)), 5 * per_image_se)


def test_encoder_set_to_the_posterior_is_exact_for_orthogonal_columns(float64):
    vae = make_model(D=5, L=2, seed=5, orthogonal=True)
    set_encoder_to_posterior(vae)
    x = vae.sample_data(4, generator=torch.Generator().manual_seed(4))
    log_w = log_weights(*particle_traces(vae.model, vae.guide, 10, (x,)), 10).log_weight
    torch.testing.assert_close(log_w, torch.from_numpy(log_marginal(vae, x)).expand(10, 4), rtol=0, atol=1e-10)


@pytest.mark.parametrize("objective", ["trace", "iwae:4:dreg"])
def test_svi_learns_the_maximum_likelihood_solution(objective):
    """Trained by SVI, the model's exact log-likelihood reaches probabilistic PCA's maximum (Tipping and Bishop)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    D, L, n = 4, 1, 400
    x = torch.from_numpy(rng.normal(size=(n, L)) @ rng.normal(size=(L, D)) * 2 + rng.normal(size=(n, D)) * 0.5)
    x = x.float()
    # The closed-form maximum: sample covariance eigen-decomposition, σ² = mean of the discarded eigenvalues.
    centred = x.double().numpy() - x.double().numpy().mean(0)
    eig = np.sort(np.linalg.eigvalsh(centred.T @ centred / n))[::-1]
    sigma2 = eig[L:].mean()
    best = -0.5 * n * (D * math.log(2 * math.pi) + np.log(eig[:L]).sum() + (D - L) * math.log(sigma2) + D)
    vae = LinearGaussianVAE(D, L)
    svi = SVI(vae.model, vae.guide, adamw(0.05), make_objective(objective))
    for _ in range(400):
        svi.step(x)
    achieved = vae.log_marginal(x).sum().item()
    assert achieved <= best + 1e-3 * abs(best)  # the maximum is an upper bound
    assert achieved > best - 0.01 * n  # within 0.01 nats per data point of it after 400 steps
