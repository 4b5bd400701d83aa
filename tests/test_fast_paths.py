"""Speed-motivated code paths give the results of the general code they replace."""

import math

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_vae.guides.gaussian import DiagonalMultivariateNormal, MVNDiag
from pyro_vae.likelihoods import BernoulliImage, make_likelihood
from pyro_vae.model import VAE
from pyro_vae.optim import adamw
from pyro_vae.priors import StandardNormal, StandardPrior


class GeneralMVNDiag(MVNDiag):
    """The seed family built literally: MultivariateNormal(loc, scale_tril=diag_embed(scale))."""

    def forward(self, raw):
        loc, scale = self.split(raw)
        return dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))


class GeneralStandardPrior(StandardPrior):
    """The prior built literally: Normal(0, 1).expand([B, L]).to_event(1)."""

    def forward(self, batch_size, like):
        return dist.Normal(like.new_zeros(()), like.new_ones(())).expand([batch_size, self.latent_dim]).to_event(1)


def pair(dtype=torch.float64, batch=(4,), latent=5):
    loc = torch.randn(*batch, latent, dtype=dtype)
    scale = torch.rand(*batch, latent, dtype=dtype) + 0.1
    return DiagonalMultivariateNormal(loc, scale), dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))


def test_is_a_multivariate_normal_with_the_same_matrices():
    fast, general = pair()
    assert isinstance(fast, dist.MultivariateNormal)
    assert fast.batch_shape == general.batch_shape and fast.event_shape == general.event_shape
    for name in ("scale_tril", "covariance_matrix", "precision_matrix", "variance", "mean"):
        torch.testing.assert_close(getattr(fast, name), getattr(general, name), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rsample_log_prob_entropy_kl_equal_the_general_class(dtype):
    fast, general = pair(dtype)
    torch.manual_seed(3)
    z_fast = fast.rsample((7,))
    torch.manual_seed(3)
    z_general = general.rsample((7,))
    torch.testing.assert_close(z_fast, z_general, rtol=0, atol=0)  # same noise stream, exact zeros off-diagonal
    tol = {"rtol": 1e-6, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(fast.log_prob(z_fast), general.log_prob(z_general), **tol)
    torch.testing.assert_close(fast.entropy(), general.entropy(), **tol)
    other = dist.MultivariateNormal(torch.zeros(5, dtype=dtype), torch.eye(5, dtype=dtype))
    torch.testing.assert_close(
        torch.distributions.kl_divergence(fast, other), torch.distributions.kl_divergence(general, other), **tol
    )


def test_expand_and_gradients_match():
    loc = torch.randn(3, 4, requires_grad=True)
    scale = (torch.rand(3, 4) + 0.5).requires_grad_()
    fast = DiagonalMultivariateNormal(loc, scale).expand([2, 3])
    general = dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale)).expand([2, 3])
    assert fast.batch_shape == (2, 3) and isinstance(fast, DiagonalMultivariateNormal)
    torch.manual_seed(0)
    grads_fast = torch.autograd.grad(fast.log_prob(fast.rsample()).sum(), (loc, scale))
    torch.manual_seed(0)
    grads_general = torch.autograd.grad(general.log_prob(general.rsample()).sum(), (loc, scale))
    for a, b in zip(grads_fast, grads_general, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_validation_still_rejects_bad_scales():
    with pytest.raises(ValueError, match="scale_tril"):
        DiagonalMultivariateNormal(torch.zeros(2, 3), torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]), True)


def test_default_step_has_the_losses_of_pyro_out_of_the_box():
    """pyro_vae's step (fast MVN and prior, one fused AdamW, validation off) against Pyro out of the box (general
    MVN and Normal prior, pyro.optim.AdamW per tensor, validation on), same weights, data and noise: the same
    losses up to rounding."""
    torch.manual_seed(0)
    fast = VAE(20, latent_dim=3, hidden_dims=(16, 8))
    general = VAE(20, latent_dim=3, hidden_dims=(16, 8), guide=GeneralMVNDiag(3), prior=GeneralStandardPrior(3))
    general.load_state_dict(fast.state_dict())
    x = torch.bernoulli(torch.full((32, 20), 0.3), generator=torch.Generator().manual_seed(1))
    runs = []
    for vae, optim, validate in (
        (fast, adamw(1e-2), False),
        (general, pyro.optim.AdamW({"lr": 1e-2, "weight_decay": 0.0}), True),
    ):
        pyro.set_rng_seed(0)
        svi = SVI(vae.model, vae.guide, optim, Trace_ELBO())
        with pyro.validation_enabled(validate):
            runs.append([svi.step(x, 100) for _ in range(10)])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
    for a, b in zip(fast.parameters(), general.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 4), (3, 6, 4), (4,), (1, 4)])
def test_standard_normal_prior_is_normal_0_1_bit_for_bit(dtype, shape):
    like = torch.zeros((), dtype=dtype)
    fast = StandardNormal(like).expand([6, 4])
    general = dist.Normal(like.new_zeros(()), like.new_ones(())).expand([6, 4])
    assert isinstance(fast, dist.Normal) and type(fast) is StandardNormal and fast.loc.dtype == dtype
    z = (torch.randn(shape, dtype=dtype) * 5).requires_grad_()
    lp_fast, lp_general = fast.log_prob(z), general.log_prob(z)
    assert lp_fast.shape == lp_general.shape == torch.broadcast_shapes(shape, (6, 4))
    assert torch.equal(lp_fast, lp_general)
    (g_fast,) = torch.autograd.grad(lp_fast.sum(), z)
    (g_general,) = torch.autograd.grad(lp_general.sum(), z)
    if z.shape[-2:] == (6, 4):  # the training path: a value per batch element, the same graph up to fewer nodes
        assert torch.equal(g_fast, g_general)
    else:  # broadcast values: the backward sums the copies in another order
        torch.testing.assert_close(g_fast, g_general, rtol=4 * torch.finfo(dtype).eps, atol=0)


def test_standard_normal_prior_keeps_the_normal_api():
    prior = StandardNormal(torch.zeros(())).expand([5, 3]).to_event(1)
    q = dist.Normal(torch.randn(5, 3), torch.rand(5, 3) + 0.5).to_event(1)
    expected = dist.Normal(0.0, 1.0).expand([5, 3]).to_event(1)
    torch.testing.assert_close(
        torch.distributions.kl_divergence(q, prior), torch.distributions.kl_divergence(q, expected), rtol=0, atol=0
    )
    assert prior.rsample((2,)).shape == (2, 5, 3)
    with pytest.raises(ValueError, match="support"):
        StandardNormal(torch.zeros(()), validate_args=True).log_prob(torch.tensor(float("nan")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("logits_shape", "x_shape"), [((16, 30), (16, 30)), ((5, 16, 30), (16, 30)), ((16, 30), (3, 16, 30))]
)
def test_bernoulli_image_is_bernoulli_to_event_bit_for_bit(dtype, logits_shape, x_shape):
    logits = (torch.randn(logits_shape, dtype=dtype) * 4).requires_grad_()
    x = torch.bernoulli(torch.full(x_shape, 0.3, dtype=dtype))
    fast = BernoulliImage(dist.Bernoulli(logits=logits), 1)
    general = dist.Bernoulli(logits=logits).to_event(1)
    assert isinstance(fast, dist.Independent) and fast.event_shape == general.event_shape == (30,)
    lp_fast, lp_general = fast.log_prob(x), general.log_prob(x)
    assert lp_fast.shape == lp_general.shape and torch.equal(lp_fast, lp_general)
    (g_fast,) = torch.autograd.grad(lp_fast.sum(), logits)
    (g_general,) = torch.autograd.grad(lp_general.sum(), logits)
    assert torch.equal(g_fast, g_general)


def test_bernoulli_image_validates_and_expands():
    fast = BernoulliImage(dist.Bernoulli(logits=torch.zeros(4, 3), validate_args=True), 1)
    with pytest.raises(ValueError, match="support"):
        fast.log_prob(torch.full((4, 3), 0.5))
    expanded = fast.expand([2, 4])
    assert type(expanded) is BernoulliImage and expanded.batch_shape == (2, 4)
    torch.testing.assert_close(expanded.log_prob(torch.ones(3)), torch.full((2, 4), -3 * math.log(2.0)))
    assert make_likelihood("bernoulli")(torch.zeros(2, 3)).__class__ is BernoulliImage


def test_broadcast_scale_matches_the_general_class():
    loc, scale = torch.randn(3, 4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    fast = DiagonalMultivariateNormal(loc, scale)
    general = dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))
    assert fast.batch_shape == general.batch_shape == (3,)
    z = torch.randn(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(fast.log_prob(z), general.log_prob(z), rtol=1e-12, atol=1e-12)


def test_the_cached_prior_validates_only_while_validation_is_on():
    """The prior is cached, and a distribution keeps the validation setting it was built under: a prior built during
    the validated first step must not go on validating (a NaN z would then raise instead of giving a NaN loss)."""
    vae = VAE(20, latent_dim=3, hidden_dims=(16, 8))
    x = torch.zeros(4, 20)
    with pyro.validation_enabled(True):
        checked = vae.prior(x.shape[0], x)
        assert vae.prior(x.shape[0], x) is checked  # cached
    with pyro.validation_enabled(False):
        unchecked = vae.prior(x.shape[0], x)
        assert unchecked is not checked and vae.prior(x.shape[0], x) is unchecked
        assert torch.isnan(unchecked.log_prob(torch.full((4, 3), float("nan")))).all()
    with pytest.raises(ValueError, match="support"):
        checked.log_prob(torch.full((4, 3), float("nan")))
