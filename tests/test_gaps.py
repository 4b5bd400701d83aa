"""Inference gaps against their closed forms on the linear-Gaussian model.

For a diagonal Gaussian family and the exact posterior N(μ(x), Λ⁻¹), the best member of the family has the posterior
mean and variances 1/Λ_dd, so

    approximation gap = min_q KL(q ‖ p(z|x)) = ½ (Σ_d log Λ_dd − log det Λ)        (the same for every x)
    amortisation gap  = KL(q_φ(·|x) ‖ p(z|x)) − that minimum.
"""

import math

import numpy as np
import pytest
import torch
from reference_linear_gaussian import (
    diagonal_q,
    gaussian_kl,
    log_marginal,
    make_model,
    optimal_diagonal,
    posterior,
    set_diagonal_encoder,
    set_encoder_to_posterior,
)

from pyro_vae.errors import ConfigError, DataError
from pyro_vae.gaps import inference_gaps
from pyro_vae.model import VAE


def _refined_kl(vae, result, x):
    """KL(q_refined(·|x_i) ‖ p(z|x_i)) per image, in closed form from the refined raw parameters."""
    q = vae.family(result.per_image.refined_raw)
    mean, var = q.mean.numpy(), q.variance.numpy()
    p_mean, p_cov = posterior(vae, x)
    return gaussian_kl(mean, np.stack([np.diag(v) for v in var]), p_mean, p_cov)


def _assert_noise(residual, what):
    # Per-image residuals that are pure Monte Carlo noise (zero mean, independent across images): their mean lies
    # within 4 standard errors std / √n of 0.
    residual = np.asarray(residual)
    se = residual.std(ddof=1) / math.sqrt(len(residual))
    assert abs(residual.mean()) < 4 * se, f"{what}: mean {residual.mean()} vs se {se}"


def test_gaps_match_their_closed_forms(float64):
    vae = make_model(D=6, L=3, seed=0, orthogonal=True)
    with torch.no_grad():  # nearly orthogonal columns: a mildly correlated posterior
        vae.decoder.weight.add_(torch.from_numpy(0.2 * np.random.default_rng(100).normal(size=(6, 3))))
    x = vae.sample_data(100, generator=torch.Generator().manual_seed(0))
    opt_mean, opt_cov, min_kl = optimal_diagonal(vae, x.numpy())
    _, cov = posterior(vae, np.zeros((1, 6)))
    # log p(x) is estimated with the refined q, i.e. about the KL-optimal diagonal q, which is narrower than the
    # posterior. Its weights have finite variance only if 2Λ - diag(Λ) is positive definite; then the IW estimate's
    # bias is about -χ²(p ‖ q) / (2k) (delta method), with χ² + 1 = ∫ p² / q in closed form for Gaussians.
    precision, q_cov = np.linalg.inv(cov), opt_cov
    assert np.linalg.eigvalsh(2 * precision - np.diag(np.diag(precision))).min() > 0
    chi2 = (
        np.sqrt(np.linalg.det(q_cov))
        / (np.linalg.det(cov) * np.sqrt(np.linalg.det(2 * precision - np.linalg.inv(q_cov))))
        - 1
    )
    assert chi2 / 2000 < 1e-3
    # An encoder that is off: posterior means shrunk by half, scales too wide; the amortisation gap is then large.
    w, b = vae.weight.detach().numpy(), vae.bias.detach().numpy()
    gain = cov @ w.T / float(vae.noise_scale.detach()) ** 2
    set_diagonal_encoder(vae, 0.5 * gain, -0.5 * gain @ b, 1.5 * np.sqrt(np.diag(opt_cov)))
    result = inference_gaps(vae, x, k=1000, steps=150, lr=0.05, particles=16, elbo_samples=200)
    images = result.per_image
    exact = log_marginal(vae, x)
    q_mean, q_cov = diagonal_q(vae, x)
    p_mean, p_cov = posterior(vae, x)
    kl_amortised = gaussian_kl(q_mean, q_cov, p_mean, p_cov)
    kl_refined = _refined_kl(vae, result, x)
    # Each estimate against the closed form of what it estimates.
    _assert_noise(images.log_px.numpy() - exact, "IW log p(x), k=1000")
    _assert_noise(images.amortised_elbo.numpy() - (exact - kl_amortised), "amortised ELBO")
    _assert_noise(images.refined_elbo.numpy() - (exact - kl_refined), "refined ELBO")
    # The refinement reaches the family's optimum: 150 steps leave less than 0.01 nats per image (a stated
    # optimisation tolerance; the excess is computed exactly, in closed form).
    excess = kl_refined - min_kl
    assert excess.min() > -1e-9 and excess.mean() < 0.01
    # Hence the gaps: within 4 standard errors plus that tolerance of their closed forms.
    assert abs(result.approximation_gap.mean - min_kl) < 4 * result.approximation_gap.se + 0.01
    target = (kl_amortised - min_kl).mean()
    assert abs(result.amortisation_gap.mean - target) < 4 * result.amortisation_gap.se + 0.01
    assert target > 1.0 and min_kl > 0.05  # both gaps are material here, so the checks above have something to see


def test_no_gaps_when_the_family_holds_the_posterior_and_the_encoder_finds_it(float64):
    vae = make_model(D=5, L=2, seed=1, orthogonal=True)
    set_encoder_to_posterior(vae)
    x = vae.sample_data(30, generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    state = torch.get_rng_state()
    result = inference_gaps(vae, x, k=50, steps=20, lr=1e-3, particles=4, elbo_samples=20)
    # Every importance weight is p(x) for the amortised q: its ELBO and the IW estimate are exact.
    np.testing.assert_allclose(result.per_image.amortised_elbo.numpy(), log_marginal(vae, x), atol=1e-9)
    assert result.approximation_gap.mean == pytest.approx(0.0, abs=1e-3)
    assert result.amortisation_gap.mean == pytest.approx(0.0, abs=1e-3)
    # Refinement touched only its own copies: the model's parameters and the caller's RNG stream are as they were.
    for name, p in vae.named_parameters():
        assert torch.equal(p, before[name]), name
    assert torch.equal(torch.get_rng_state(), state)


def test_gaps_on_the_seed_vae():
    torch.manual_seed(0)
    vae = VAE(20, latent_dim=2, hidden_dims=(16, 8))
    x = torch.bernoulli(torch.full((12, 20), 0.3))
    result = inference_gaps(vae, x, k=20, steps=30, lr=0.05, particles=4, elbo_samples=20, chunk_size=16)
    assert result.family == "mvn_diag" and result.num_images == 12
    assert result.refined_elbo.mean > result.amortised_elbo.mean  # an untrained encoder leaves a lot to refine
    record = result.to_json()
    assert record["amortisation_gap"] == pytest.approx(result.amortisation_gap.mean)
    assert "approximation gap" in result.table()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "^k must be a positive integer, got 0$"),
        ({"steps": 1.5}, "^steps must be a positive integer, got 1.5$"),
        ({"lr": -1.0}, "^lr must be a positive finite number, got -1.0$"),
        ({"chunk_size": True}, r"^chunk_size \(particles × images per pass\) must be a positive integer, got True$"),
    ],
)
def test_bad_arguments(kwargs, message):
    vae = VAE(20, latent_dim=2, hidden_dims=(16, 8))
    with pytest.raises(ConfigError, match=message):
        inference_gaps(vae, torch.zeros(2, 20), **kwargs)
    with pytest.raises(DataError, match="N >= 1"):
        inference_gaps(vae, torch.zeros(0, 20))
