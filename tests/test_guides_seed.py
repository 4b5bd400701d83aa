"""The seed family ``mvn_diag`` and its diagonal twin ``diag_normal``, against independent references."""

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from pyro_vae.errors import ConfigError
from pyro_vae.guides import family_names, make_family

L = 5
DIAGONAL = ["mvn_diag", "diag_normal"]


def test_split_semantics():
    """First half is the mean; second half goes through softplus + eps to the scale (the diagonal of scale_tril)."""
    family = make_family("mvn_diag", L, eps=1e-3)
    raw = torch.randn(4, 2 * L)
    loc, scale = family.split(raw)
    torch.testing.assert_close(loc, raw[:, :L], rtol=0, atol=0)
    torch.testing.assert_close(scale, F.softplus(raw[:, L:]) + 1e-3, rtol=0, atol=0)
    q = family(raw)
    assert q.batch_shape == (4,) and q.event_shape == (L,)
    torch.testing.assert_close(q.scale_tril, torch.diag_embed(scale), rtol=0, atol=0)
    assert q.has_rsample


def test_num_params():
    assert make_family("mvn_diag", 7).num_params == 14
    assert make_family("diag_normal", 7).num_params == 14


@pytest.mark.parametrize("name", DIAGONAL)
def test_log_prob_matches_scipy(name, float64):
    family = make_family(name, L)
    raw = torch.randn(6, 2 * L) * 2
    q = family(raw)
    z = q.sample()
    loc, scale = family.split(raw)
    for i in range(raw.shape[0]):
        ref = scipy.stats.multivariate_normal(loc[i].numpy(), np.diag(scale[i].numpy() ** 2)).logpdf(z[i].numpy())
        assert q.log_prob(z)[i].item() == pytest.approx(ref, rel=1e-10, abs=1e-8)


@pytest.mark.parametrize("name", DIAGONAL)
def test_rsample_gradient_matches_finite_differences(name, float64):
    """d/d raw of sum(w * z) with the noise held fixed, against central differences (noise is replayed by seed)."""
    family = make_family(name, L)
    raw = torch.randn(3, 2 * L, requires_grad=True)
    weights = torch.randn(3, L)

    def objective(r):
        torch.manual_seed(123)
        return (weights * family(r).rsample()).sum()

    (grad,) = torch.autograd.grad(objective(raw), raw)
    h = 1e-6
    numeric = torch.zeros_like(raw)
    with torch.no_grad():
        for idx in np.ndindex(*raw.shape):
            plus, minus = raw.detach().clone(), raw.detach().clone()
            plus[idx] += h
            minus[idx] -= h
            numeric[idx] = (objective(plus) - objective(minus)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)
    assert (grad[:, :L] != 0).all() and (grad[:, L:] != 0).all()


@pytest.mark.parametrize("name", DIAGONAL)
def test_kl_to_standard_normal_closed_form(name, float64):
    """KL(N(m, diag s^2) || N(0, I)) = 1/2 sum(s^2 + m^2 - 1 - 2 log s), against torch's kl_divergence."""
    family = make_family(name, L)
    raw = torch.randn(4, 2 * L)
    q = family(raw)
    loc, scale = family.split(raw)
    closed = 0.5 * (scale**2 + loc**2 - 1 - 2 * scale.log()).sum(-1)
    prior = torch.distributions.MultivariateNormal(torch.zeros(L), torch.eye(L))
    base_q = torch.distributions.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))
    torch.testing.assert_close(torch.distributions.kl_divergence(base_q, prior), closed, rtol=1e-10, atol=1e-10)
    # and a Monte Carlo check that q.log_prob is the density behind that KL: mean of log q - log p over 20000
    # draws; its standard error is std/sqrt(n), and 5 standard errors bound the difference.
    z = q.sample((20000,))
    diff = q.log_prob(z) - prior.log_prob(z)
    se = diff.std(0) / 20000**0.5
    assert ((diff.mean(0) - closed).abs() < 5 * se).all()


@pytest.mark.parametrize("name", DIAGONAL)
@pytest.mark.parametrize("value", [200.0, -200.0, 50.0, -50.0])
def test_extreme_raw_outputs_stay_valid(name, value):
    family = make_family(name, L)
    raw = torch.full((2, 2 * L), value)
    q = family(raw)
    z = q.rsample()
    assert torch.isfinite(q.log_prob(z)).all()
    assert (family.split(raw).scale > 0).all()


def test_eps_matters_where_softplus_underflows():
    assert F.softplus(torch.tensor(-200.0)).item() == 0.0
    with pytest.raises(ConfigError, match=r"^eps \(the softplus floor .*\) must be a positive finite number, got 0.0$"):
        make_family("mvn_diag", L, eps=0.0)


def test_unknown_family_lists_choices_and_hint():
    with pytest.raises(
        ConfigError, match=r"unknown guide family 'mvn_dag'; choose one of: .*mvn_diag.*did you mean 'mvn_diag'"
    ):
        make_family("mvn_dag", L)


def test_bad_options_and_specs():
    with pytest.raises(ConfigError, match="bad options"):
        make_family("mvn_diag", L, rank=3)
    with pytest.raises(ConfigError, match="takes no ':K' option"):
        make_family("mvn_diag:3", L)
    with pytest.raises(ConfigError, match="latent_dim must be a positive integer"):
        make_family("mvn_diag", 0)


def test_registry_names():
    assert {"mvn_diag", "diag_normal"} <= set(family_names())
