"""Closed-form references for the linear-Gaussian model, written with numpy and scipy only.

The product computes the posterior in precision form (Λ = I + WᵀW/σ²); these references use the covariance form of
Gaussian conditioning on the joint of (z, x), and scipy's multivariate normal, so that the two are independent.
"""

import numpy as np
import pyro
import torch
from scipy import stats

from pyro_vae.linear_gaussian import LinearGaussianVAE


def make_model(D=4, L=2, *, seed=0, orthogonal=False, noise=0.7, guide="mvn_diag", zero_columns=()):
    """A float64 LinearGaussianVAE with a random W (orthogonal columns when asked) and a random linear encoder."""
    pyro.set_rng_seed(seed)
    vae = LinearGaussianVAE(D, L, guide=guide, noise_scale=noise).double()
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(D, L))
    if orthogonal:
        q, _ = np.linalg.qr(w)
        w = q * rng.uniform(0.5, 2.0, size=L)  # orthogonal, unequal column norms
    for column in zero_columns:
        w[:, column] = 0.0
    with torch.no_grad():
        vae.decoder.weight.copy_(torch.from_numpy(w))
        vae.decoder.bias.copy_(torch.from_numpy(rng.normal(size=D)))
    return vae


def numpy_params(vae):
    w = vae.weight.detach().numpy()
    b = vae.bias.detach().numpy()
    sigma = float(vae.noise_scale.detach())
    return w, b, sigma


def log_marginal(vae, x):
    """log p(x) per row, ``(B,)``, from scipy."""
    w, b, sigma = numpy_params(vae)
    cov = w @ w.T + sigma**2 * np.eye(len(b))
    return stats.multivariate_normal(mean=b, cov=cov).logpdf(np.asarray(x))


def posterior(vae, x):
    """Mean ``(B, L)`` and covariance ``(L, L)`` of p(z | x) by conditioning the joint Gaussian of (z, x)."""
    w, b, sigma = numpy_params(vae)
    cov_x = w @ w.T + sigma**2 * np.eye(len(b))  # Cov(x)
    gain = np.linalg.solve(cov_x, w).T  # Cov(z, x) Cov(x)^-1 = Wᵀ C⁻¹, (L, D)
    mean = (np.asarray(x) - b) @ gain.T
    cov = np.eye(w.shape[1]) - gain @ w
    return mean, cov


def gaussian_kl(m0, s0, m1, s1):
    """KL(N(m0, s0) ‖ N(m1, s1)) for rows of means ``(B, L)`` and covariances ``(B, L, L)`` or ``(L, L)``."""
    m0, m1 = np.atleast_2d(m0), np.atleast_2d(m1)
    m1 = np.broadcast_to(m1, m0.shape)
    s0 = np.broadcast_to(s0, (m0.shape[0], *np.shape(s0)[-2:]))
    s1 = np.broadcast_to(s1, (m0.shape[0], *np.shape(s1)[-2:]))
    out = []
    for a, sa, c, sc in zip(m0, s0, m1, s1, strict=True):
        inv = np.linalg.inv(sc)
        d = c - a
        out.append(
            0.5 * (np.trace(inv @ sa) + d @ inv @ d - len(a) + np.linalg.slogdet(sc)[1] - np.linalg.slogdet(sa)[1])
        )
    return np.array(out)


def diagonal_q(vae, x):
    """Mean ``(B, L)`` and diagonal covariances ``(B, L, L)`` of the diagonal guide's q(z | x)."""
    q = vae.encode(torch.as_tensor(x))
    loc = q.mean.detach().numpy()
    var = q.variance.detach().numpy()
    return loc, np.stack([np.diag(v) for v in var])


def optimal_diagonal(vae, x):
    """The diagonal Gaussian closest to p(z | x) in KL(q ‖ p): the posterior mean and variances 1 / Λ_dd.

    :returns: ``(mean (B, L), covariance (L, L), min KL)``; the minimum is 0.5 (Σ_d log Λ_dd − log det Λ), the same
        for every x.
    """
    mean, cov = posterior(vae, x)
    precision = np.linalg.inv(cov)
    diag = np.diag(1.0 / np.diag(precision))
    min_kl = 0.5 * (np.log(np.diag(precision)).sum() - np.linalg.slogdet(precision)[1])
    return mean, diag, min_kl


def softplus_inverse(y):
    return np.log(np.expm1(y))


def set_diagonal_encoder(vae, loc_weight, loc_bias, scale):
    """Make the diagonal family's q(z | x) = N(loc_weight x + loc_bias, diag(scale²)) with a constant scale.

    The diagonal families read ``loc = raw[:L]`` and ``scale = softplus(raw[L:]) + eps``.
    """
    L, D = vae.latent_dim, vae.input_dim
    eps = vae.family.eps
    weight = np.zeros((2 * L, D))
    bias = np.zeros(2 * L)
    weight[:L] = loc_weight
    bias[:L] = loc_bias
    bias[L:] = softplus_inverse(np.asarray(scale) - eps)
    with torch.no_grad():
        vae.encoder.head.weight.copy_(torch.from_numpy(weight))
        vae.encoder.head.bias.copy_(torch.from_numpy(bias))


def set_encoder_to_posterior(vae, *, variance="optimal"):
    """Point the diagonal encoder at the exact posterior mean, with the KL-optimal diagonal variances 1/Λ_dd
    (``"optimal"``) or the posterior's marginal variances (``"marginal"``). For a W with orthogonal columns both
    equal the exact posterior."""
    w, b, sigma = numpy_params(vae)
    _, cov = posterior(vae, np.zeros((1, len(b))))
    gain = cov @ w.T / sigma**2  # posterior mean = gain (x - b)
    var = 1.0 / np.diag(np.linalg.inv(cov)) if variance == "optimal" else np.diag(cov)
    set_diagonal_encoder(vae, gain, -gain @ b, np.sqrt(var))
