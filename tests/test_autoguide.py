"""AmortizedGuide against independent references: a linear-Gaussian model written as a plain Pyro model (its exact
log p(x) from the MultivariateNormal marginal, its posterior in closed form), hand-computed changes of variables,
and our VAE's own guide."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

import pyro_vae.autoguide as autoguide
from pyro_vae import VAE, adamw
from pyro_vae.autoguide import AmortizedGuide
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.guides import family_names
from pyro_vae.importance import log_weights, particle_traces

L_A, L_B, D, SIGMA = 2, 1, 4, 0.5  # two local sites: z_a (2,) and a scalar z_b; x in R^4


def _weights():
    g = torch.Generator().manual_seed(1)
    return torch.randn(D, L_A + L_B, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)


W, BIAS = _weights()


def lg_model(x, num_data=None, index=None):
    """z = [z_a | z_b] ~ N(0, I_3), x ~ N(W z + b, σ² I): two local sites, one of them scalar."""
    B = x.shape[0]
    with pyro.plate("data", num_data or B, subsample=torch.arange(B) if index is None else index):
        z_a = pyro.sample("z_a", dist.Normal(torch.zeros(L_A), 1.0).to_event(1))
        z_b = pyro.sample("z_b", dist.Normal(0.0, 1.0))
        z = torch.cat([z_a, z_b.unsqueeze(-1)], -1)
        pyro.sample("x", dist.Normal(z @ W.T + BIAS, SIGMA).to_event(1), obs=x)


def exact_log_px(x):
    """log p(x) = log N(x; b, W Wᵀ + σ² I), per data point."""
    cov = W @ W.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
    return dist.MultivariateNormal(BIAS, covariance_matrix=cov).log_prob(x)


def posterior():
    """Precision Λ = I + WᵀW/σ², covariance Λ⁻¹ and the affine map x ↦ mean: (Λ, Σ, M, m0) with mean = x Mᵀ + m0."""
    precision = torch.eye(L_A + L_B, dtype=torch.float64) + W.T @ W / SIGMA**2
    cov = torch.linalg.inv(precision)
    M = cov @ W.T / SIGMA**2
    return precision, cov, M, -M @ BIAS


def _inv_softplus(y):
    return torch.log(torch.expm1(y))


def exact_encoder(family, diagonal: bool) -> nn.Linear:
    """The affine encoder whose raw output is the exact posterior (full_rank) or the best diagonal q* (mvn_diag),
    inverted by hand from the families' documented layouts."""
    precision, cov, M, m0 = posterior()
    L = L_A + L_B
    if diagonal:  # raw = [loc | softplus⁻¹(scale − eps)], scale_i = 1/√Λ_ii
        const = _inv_softplus(precision.diagonal().rsqrt() - family.eps)
    else:  # raw = [loc | softplus⁻¹(s − eps) | A], scale_tril = diag(s)(I + c·A), c = 1/√L
        chol = torch.linalg.cholesky(cov)
        s = chol.diagonal()
        rows, cols = torch.tril_indices(L, L, offset=-1)
        a = chol[rows, cols] / (family.off_diagonal_scale * s[rows])
        const = torch.cat([_inv_softplus(s - family.eps), a])
    linear = nn.Linear(D, L + const.numel()).double()
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[:L] = M
        linear.bias.copy_(torch.cat([m0, const]))
    return linear


def data(n=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, L_A + L_B, generator=g, dtype=torch.float64)
    return z @ W.T + BIAS + SIGMA * torch.randn(n, D, generator=g, dtype=torch.float64)


def guide_with_exact_encoder(family: str) -> AmortizedGuide:
    guide = AmortizedGuide(lg_model, family=family, hidden_dims=(4,))
    guide.setup(data())
    guide.encoder = exact_encoder(guide.family, diagonal=family == "mvn_diag")
    return guide


def per_point_elbo(guide, x, particles):
    """ELBO_i estimated from K particles, with its standard error: mean and std/√K of log w_ki per data point."""
    model_trace, guide_trace = particle_traces(lg_model, guide, particles, (x,))
    log_w = log_weights(model_trace, guide_trace, particles).log_weight  # (K, B)
    return log_w.mean(0), log_w.std(0) / math.sqrt(particles)


def test_full_rank_reaches_exact_log_px(float64):
    # With the exact posterior, log w = log p(x, z) − log q(z | x) = log p(x) for every z: the estimator has zero
    # variance, so the SE-derived tolerance 4·SE collapses and only float64 rounding (1e-10 for sums of ~10 terms
    # of order 10) remains. A missing Jacobian, a wrong joint layout or a cross-site correlation lost between z_a
    # and z_b would show as a gap of order 0.1 or more.
    x = data()
    elbo, se = per_point_elbo(guide_with_exact_encoder("full_rank"), x, particles=200)
    tolerance = 4 * se + 1e-10
    assert torch.all((elbo - exact_log_px(x)).abs() <= tolerance), (elbo - exact_log_px(x), se)


def test_diagonal_gap_is_kl_of_best_mean_field(float64):
    # For a Gaussian posterior with precision Λ, the best q under KL(q ‖ p) with diagonal covariance has the
    # posterior mean and variances 1/Λ_ii, and KL(q* ‖ p) = ½ (Σ_i log Λ_ii − log det Λ) (the trace term is L and
    # the means agree). The estimate averages K = 4000 independent log w per point; by the CLT it is normal with
    # standard error std(log w)/√K, so |ELBO_i − (log p(x_i) − KL)| ≤ 4·SE fails with probability 6e-5 per point.
    x = data()
    precision, *_ = posterior()
    kl = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    elbo, se = per_point_elbo(guide_with_exact_encoder("mvn_diag"), x, particles=4000)
    gap = exact_log_px(x) - elbo
    assert kl > 0.05  # the posterior is correlated, so the mean-field gap is visible
    assert torch.all((gap - kl).abs() <= 4 * se), (gap, kl, se)


@pytest.mark.parametrize("family", family_names())
def test_every_family_trains_through_svi_and_stays_below_exact(family, float64):
    # Each family: three SVI steps move every encoder and family parameter, and the ELBO estimate per data point
    # stays below log p(x) within 4 standard errors (500 particles; the bound holds for any q).
    x = data()
    guide = AmortizedGuide(lg_model, family=family, hidden_dims=(8,))
    guide.setup(x)
    before = {name: p.detach().clone() for name, p in guide.named_parameters()}
    svi = SVI(lg_model, guide, adamw(1e-2), Trace_ELBO())
    for _ in range(3):
        assert math.isfinite(svi.step(x))
    unchanged = [name for name, p in guide.named_parameters() if torch.equal(p, before[name]) and p.requires_grad]
    assert not unchanged
    assert len(pyro.get_param_store()) == 0
    elbo, se = per_point_elbo(guide, x, particles=500)
    assert torch.all(elbo <= exact_log_px(x) + 4 * se)


def test_subsampling_scales_by_the_full_size(float64):
    # With the exact posterior every log w equals log p(x_i), so the minibatch ELBO of B points out of N is exactly
    # (N/B) Σ_i log p(x_i). A guide whose plate ignored full_size would scale log q by 1 against the model's N/B.
    x, num_data = data(), 60
    guide = guide_with_exact_encoder("full_rank")
    loss = Trace_ELBO().loss(lg_model, guide, x, num_data=num_data)
    expected = -(num_data / x.shape[0]) * exact_log_px(x).sum()
    assert loss == pytest.approx(expected.item(), abs=1e-8)


def test_a_guide_without_the_full_size_is_caught(float64, monkeypatch):
    # The mutation the test above guards against: the guide's plate sized by the minibatch, so log q is scaled by 1
    # against the model's N/B. Its ELBO per data point is then (1 − B/N) log p(x, z) + (B/N) log p(x), nats away
    # from log p(x) (above it wherever log p(z | x) > 0).
    x, num_data = data(), 60
    guide = guide_with_exact_encoder("full_rank")
    probe = autoguide._plate_call
    monkeypatch.setattr(
        autoguide,
        "_plate_call",
        lambda *a: probe(*a)._replace(size=x.shape[0], subsample=None, subsample_size=x.shape[0]),
    )
    elbo = -Trace_ELBO().loss(lg_model, guide, x, num_data=num_data) * x.shape[0] / num_data
    assert abs(elbo - exact_log_px(x).sum().item()) > 1.0


def constrained_model(x):
    with pyro.plate("data", x.shape[0]):
        s = pyro.sample("s", dist.LogNormal(torch.zeros(2), 1.0).to_event(1))  # positive, (2,)
        p = pyro.sample("p", dist.Beta(2.0, 3.0))  # unit interval
        w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))  # simplex, 2 free numbers
        loc = s.sum(-1) + p + w[..., 0]
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x[:, 0])


def test_constrained_sites_respect_supports_and_include_jacobians(float64):
    x = torch.randn(5, 1, dtype=torch.float64)
    guide = AmortizedGuide(constrained_model, family="full_rank", hidden_dims=(8,))
    trace = pyro.poutine.trace(guide).get_trace(x)
    s, p, w = (trace.nodes[name]["value"] for name in ("s", "p", "w"))
    assert s.shape == (5, 2) and p.shape == (5,) and w.shape == (5, 3)
    assert torch.all(s > 0) and torch.all((p > 0) & (p < 1)) and torch.all(w > 0)
    assert torch.allclose(w.sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-12, rtol=0)
    trace.compute_log_prob()
    log_q = sum(trace.nodes[name]["log_prob"] for name in ("s", "p", "w"))  # (B,)

    # Hand-computed change of variables: u = [log s | logit p | u_w], with the simplex's Jacobian taken by autograd
    # over its first K − 1 coordinates (the coordinates Dirichlet's density is written in).
    stick = torch.distributions.biject_to(dist.constraints.simplex)  # stick-breaking: R^2 -> 3-simplex
    u_w = stick.inv(w)  # (B, 2)
    u = torch.cat([s.log(), torch.logit(p).unsqueeze(-1), u_w], -1)  # (B, 5)
    log_det_w = torch.stack(
        [torch.linalg.slogdet(torch.autograd.functional.jacobian(lambda v: stick(v)[:2], ui))[1] for ui in u_w]
    )
    log_det = s.log().sum(-1) + (p.log() + torch.log1p(-p)) + log_det_w  # log |det ∂z/∂u|
    expected = guide.encode(x).log_prob(u) - log_det
    assert torch.allclose(log_q, expected, atol=1e-10, rtol=0)


def global_local_model(x):
    m = pyro.sample("m", dist.Normal(0.0, 1.0))  # global
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(m, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def test_global_and_local_sites(float64):
    # Jointly Gaussian: x_i ~ N(m, 1 + 0.25) given m ~ N(0, 1), so log p(x) = log N(x; 0, 1.25 I + 1 1ᵀ).
    x = torch.tensor([2.0, 2.5, 1.5, 3.0], dtype=torch.float64)
    guide = AmortizedGuide(global_local_model, encoder_input=0, family="mvn_diag", hidden_dims=(8,))
    trace = pyro.poutine.trace(guide).get_trace(x)
    assert trace.nodes["m"]["value"].shape == () and trace.nodes["z"]["value"].shape == (4,)
    assert isinstance(guide.global_guide, AutoNormal)
    assert any(name.startswith("global_guide.") for name in guide.state_dict())
    loc_before = guide.global_guide.locs.m_unconstrained.detach().clone()
    svi = SVI(global_local_model, guide, adamw(5e-2), Trace_ELBO())
    for _ in range(30):
        svi.step(x)
    assert len(pyro.get_param_store()) == 0
    assert guide.global_guide.locs.m_unconstrained.item() > loc_before.item() + 0.5  # m's posterior mean is ≈ 1.8
    cov = 1.25 * torch.eye(4, dtype=torch.float64) + torch.ones(4, 4, dtype=torch.float64)
    exact = dist.MultivariateNormal(torch.zeros(4, dtype=torch.float64), cov).log_prob(x).item()
    # K = 2000 vectorised particles give independent single-particle ELBO estimates log w_k (every site summed per
    # particle); their mean is normal by the CLT with standard error std/√K, so 4 SE bounds the Monte Carlo error.
    K = 2000
    model_trace, guide_trace = particle_traces(global_local_model, guide, K, (x,))

    def per_particle(trace):
        sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
        return sum(site["log_prob"].reshape(K, -1).sum(-1) for site in sites)  # (K,)

    log_w = per_particle(model_trace) - per_particle(guide_trace)
    assert log_w.mean() <= exact + 4 * log_w.std() / math.sqrt(K)


def test_a_new_guide_trains_afresh_and_state_dict_round_trips(float64):
    x = data()
    first = AmortizedGuide(lg_model, family="full_rank", hidden_dims=(8,))
    SVI(lg_model, first, adamw(1e-1), Trace_ELBO()).step(x)
    second = AmortizedGuide(lg_model, family="full_rank", hidden_dims=(8,))
    second.setup(x)
    assert not torch.equal(first.encoder.head.weight, second.encoder.head.weight)
    second.load_state_dict(first.state_dict())
    assert torch.equal(first.encode(x).mean, second.encode(x).mean)


@pytest.mark.parametrize("family", family_names())
def test_same_elbo_as_the_vae_guide(family):
    # Same encoder weights, same noise: AmortizedGuide(vae.model) is VAE.guide sample for sample.
    torch.manual_seed(3)
    vae = VAE(6, latent_dim=2, hidden_dims=(8,), guide=family)
    x = torch.rand(5, 6).round()
    guide = AmortizedGuide(vae.model, family=family, hidden_dims=(8,))
    guide.setup(x, num_data=50)
    guide.encoder.load_state_dict(vae.encoder.state_dict())
    guide.family.load_state_dict(vae.family.state_dict())
    losses = []
    for program in (vae.guide, guide):
        pyro.set_rng_seed(7)
        losses.append(Trace_ELBO(num_particles=3).loss(vae.model, program, x, num_data=50))
    assert losses[0] == losses[1]


# ---------------------------------------------------------------------------------------------------------------
# Refusals: one line each, before anything is built


def _nothing_built(guide):
    assert guide.layout is None and not list(guide.parameters()) and len(pyro.get_param_store()) == 0


def test_refuses_discrete_local_sites():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    guide = AmortizedGuide(model)
    with pytest.raises(ConfigError, match=r"\['c'\] are discrete.*config_enumerate.*M2"):
        guide(torch.zeros(3))
    _nothing_built(guide)


def test_refuses_a_plate_without_latent_sites(float64):
    guide = AmortizedGuide(lg_model, plate="batch")
    with pytest.raises(ConfigError, match="no latent sample site under plate 'batch'.*plates with latent sites: "):
        guide(data())
    _nothing_built(guide)


def test_refuses_an_encoder_input_of_another_batch(float64):
    guide = AmortizedGuide(lg_model, encoder_input=lambda args, kwargs: args[0][:2])
    with pytest.raises(DataError, match=r"shape \(2, 4\), but plate 'data' holds 6 data points"):
        guide(data())
    assert guide.layout is None and not list(guide.parameters())


def test_refuses_global_sites_without_a_global_guide():
    guide = AmortizedGuide(global_local_model, global_guide=None)
    with pytest.raises(ConfigError, match=r"global latent site\(s\) \['m'\].*global_guide=None"):
        guide(torch.zeros(3))
    _nothing_built(guide)


def test_refuses_local_sites_whose_shape_changes():
    def model(x, k):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(k), 1.0).to_event(1))

    guide = AmortizedGuide(model, hidden_dims=(4,))
    guide(torch.zeros(3, 2), 2)
    with pytest.raises(ConfigError, match=r"changed between calls: \{'z': \(2,\)\}.*\{'z': \(3,\)\}"):
        guide(torch.zeros(3, 2), 3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"encoder_input": "x"},
            r"^encoder_input \(a model argument's index, or else a callable\) must be an integer >= 0",
        ),
        ({"encoder_input": True}, r"^encoder_input \(a model argument's index, or else a callable\) .*, got True$"),
        ({"family": "ful_rank"}, "unknown guide family 'ful_rank'.*did you mean 'full_rank'"),
        ({"hidden_dims": ()}, r"^hidden_dims must be a non-empty list of integers, got \(\)$"),
        ({"global_guide": "AutoNormal"}, "global_guide must be an AutoGuide class"),
        ({"plate": ""}, "plate= the name of its data plate"),
    ],
)
def test_refuses_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        AmortizedGuide(lg_model, **options)
