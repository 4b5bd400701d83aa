"""The guide-family contract, one suite parametrised over every registered family.

References are independent of the code under test: scipy's multivariate normal with the covariance that the family's
documented parametrisation implies (rebuilt here from the raw numbers), the closed-form Gaussian KL, the
change-of-variables formula with a finite-difference Jacobian, and Monte Carlo identities whose tolerances are derived
from their standard errors. Seed-family specifics live in ``test_guides_seed.py``.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import VAE, cli
from pyro_vae.errors import ConfigError
from pyro_vae.guides import FlowFamily, family_names, make_family
from pyro_vae.guides.sylvester import DIAGONAL_BOUND
from pyro_vae.optim import adamw

L = 3  # small enough for finite differences and dense references, large enough for off-diagonal structure
B = 4
FAMILIES = family_names()


def is_flow(name):
    return isinstance(make_family(name, L), FlowFamily)


GAUSSIANS = [n for n in FAMILIES if not is_flow(n)]
FLOWS = [n for n in FAMILIES if is_flow(n)]


def raw_for(family, batch=B, scale=1.0):
    return scale * torch.randn(batch, family.num_params)


def implied_gaussian(family, raw):
    """(mean (B, L), covariance (B, L, L)) that the documented parametrisation of a Gaussian family gives, rebuilt
    from the raw numbers without the family's own code (only the softplus + eps of the scale is shared)."""
    n = family.latent_dim
    loc = raw[:, :n]
    scale = F.softplus(raw[:, n : 2 * n]) + family.eps
    extra = raw[:, 2 * n :]
    if family.name in ("mvn_diag", "diag_normal"):
        return loc, torch.diag_embed(scale**2)
    if family.name == "full_rank":
        tril = torch.diag_embed(scale)
        k = 0
        for i in range(n):
            for j in range(i):
                tril[:, i, j] = family.off_diagonal_scale * scale[:, i] * extra[:, k]
                k += 1
        return loc, tril @ tril.mT
    if family.name == "low_rank":
        w = scale[:, :, None] * extra.reshape(-1, n, family.rank)
        return loc, w @ w.mT + torch.diag_embed(scale**2)
    raise AssertionError(f"no reference parametrisation for the Gaussian family {family.name}; add one here")


def test_families_are_split_into_gaussians_and_flows():
    assert {"mvn_diag", "diag_normal", "full_rank", "low_rank"} <= set(GAUSSIANS)
    assert {"iaf", "planar", "radial", "householder", "spline", "naf", "sylvester"} <= set(FLOWS)


# ----------------------------------------------------------------------------------------------------------------
# Shapes and gradients
@pytest.mark.parametrize("name", FAMILIES)
def test_shapes_inside_plates(name):
    family = make_family(name, L)
    q = family(raw_for(family))
    assert q.batch_shape == (B,) and q.event_shape == (L,) and q.has_rsample
    with pyro.plate("data", B):
        z = pyro.sample("z", q)
    assert z.shape == (B, L)
    # vectorised particles: an outer plate expands the distribution to (P, B)
    trace = pyro.poutine.trace(lambda: _particles(q, 5)).get_trace()
    site = trace.nodes["z"]
    assert site["value"].shape == (5, B, L)
    assert site["fn"].log_prob(site["value"]).shape == (5, B)


def _particles(q, p):
    with pyro.plate("particles", p, dim=-2), pyro.plate("data", B, dim=-1):
        return pyro.sample("z", q)


@pytest.mark.parametrize("name", FAMILIES)
def test_rsample_gradient_reaches_every_raw_element(name, float64):
    """Every raw number influences z or log q. (In float64, because float32 tanh saturates to exactly ±1 beyond
    |a| ≈ 9, where its derivative rounds to 0: Sylvester steps with large pre-activations would then show exact
    zeros that say nothing about the graph.)"""
    family = make_family(name, L)
    raw = raw_for(family).requires_grad_()
    q = family(raw)
    z = q.rsample((8,))  # (8, B, L)
    weights = torch.randn(L)
    (grad,) = torch.autograd.grad((z * weights).sum() + q.log_prob(z).sum(), raw)
    assert torch.isfinite(grad).all()
    assert (grad != 0).all(), f"raw elements {torch.nonzero(grad == 0).tolist()} get no gradient"


# ----------------------------------------------------------------------------------------------------------------
# Densities against independent references (float64)
@pytest.mark.parametrize("name", GAUSSIANS)
def test_gaussian_log_prob_matches_scipy(name, float64):
    family = make_family(name, L)
    raw = raw_for(family, scale=1.5)
    q = family(raw)
    z = q.sample()
    loc, cov = implied_gaussian(family, raw)
    for i in range(B):
        ref = scipy.stats.multivariate_normal(loc[i].numpy(), cov[i].numpy()).logpdf(z[i].numpy())
        assert q.log_prob(z)[i].item() == pytest.approx(ref, rel=1e-8, abs=1e-8)


@pytest.mark.parametrize("name", FLOWS)
def test_flow_log_prob_is_change_of_variables_with_finite_difference_jacobian(name, float64):
    """log q(z) = log q_0(z_0) - log |det ∂z/∂z_0| at the recorded pre-image z_0 of each sample z."""
    family = make_family(name, L)
    q = family(raw_for(family))
    torch.manual_seed(1)
    z = q.rsample()  # (B, L)
    log_q = q.log_prob(z)
    torch.manual_seed(1)
    z0 = q.base_dist.rsample()  # the same noise: the pre-image of z

    def forward(u):
        for transform in q.transforms:
            u = transform(u)
        return u

    torch.testing.assert_close(forward(z0.clone()), z, rtol=1e-12, atol=1e-12)
    h = 1e-5  # central differences: truncation O(h²) ≈ 1e-10, rounding O(1e-16 / h) ≈ 1e-11
    jacobian = torch.stack(
        [(forward(z0 + h * e) - forward(z0 - h * e)) / (2 * h) for e in torch.eye(L)], dim=-1
    )  # (B, L, L): column j is ∂z/∂z0_j
    expected = q.base_dist.log_prob(z0) - torch.linalg.slogdet(jacobian).logabsdet
    torch.testing.assert_close(log_q, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_sampling_agrees_with_log_prob(name):
    """E_{z~q}[r(z) / q(z)] = ∫ r = 1 for any normalised density r, if and only if the samples come from the density
    that log_prob computes (on r's support).

    r = N(m, C / 4) with m, C the moments of an independent batch of draws, so r sits on the bulk of q and has
    lighter tails: w = r/q is then square-integrable and by the central limit theorem the mean of n draws of w is
    normal around 1 with standard error se = sd(w) / √n. We require |mean - 1| < 5 se (a false alarm has
    probability 6e-7). With n = 20000 and L = 3, sd(w) ≈ 1.6 (for a Gaussian q, E[w²] = (4 / √7)^L), so se ≈ 0.011
    and a density wrong by a constant factor e^c is caught for |c| ≳ 0.06.

    The CLT needs a finite variance of w, which fails where q has thin regions inside r's bulk: strongly warped
    flows (Sylvester steps from raw numbers of scale 1 give weights up to 1e6). Raw numbers of scale 0.5 keep q
    clearly non-Gaussian but not pathological, and the effective sample size (Σw)² / Σw² is checked to be at least
    5 % of n (a Gaussian q gives (√7 / 4)^L ≈ 29 %), so a heavy-tailed w fails loudly instead of passing on an
    unreliable standard error.
    """
    family = make_family(name, L)
    q = family(raw_for(family, batch=2, scale=0.5))
    n = 20000
    with torch.no_grad():
        pilot = q.sample((4000,))  # (4000, 2, L)
        m = pilot.mean(0)
        centred = pilot - m
        cov = torch.einsum("sbi,sbj->bij", centred, centred) / 3999  # (2, L, L)
        r = dist.MultivariateNormal(m, covariance_matrix=cov / 4 + 1e-9 * torch.eye(L))
        z = q.sample((n,))
        w = (r.log_prob(z) - q.log_prob(z)).exp()  # (n, 2)
    mean, se = w.mean(0), w.std(0) / math.sqrt(n)
    assert torch.isfinite(w).all()
    ess = w.sum(0) ** 2 / (w**2).sum(0)
    assert (ess > 0.05 * n).all(), f"effective sample size {ess.tolist()} of {n}: r/q is too heavy-tailed for a CLT"
    assert ((mean - 1).abs() < 5 * se).all(), f"E[r/q] = {mean.tolist()} ± {se.tolist()}, expected 1"


@pytest.mark.parametrize("name", GAUSSIANS)
def test_kl_to_standard_normal_closed_form(name, float64):
    """KL(N(μ, Σ) ‖ N(0, I)) = ½ (tr Σ + μᵀμ - L - log det Σ), with μ and Σ from the reference parametrisation."""
    family = make_family(name, L)
    raw = raw_for(family)
    q = family(raw)
    loc, cov = implied_gaussian(family, raw)
    closed = 0.5 * (cov.diagonal(dim1=-2, dim2=-1).sum(-1) + (loc**2).sum(-1) - L - torch.linalg.slogdet(cov)[1])
    prior = dist.Normal(torch.zeros(L), 1.0).to_event(1)
    mvn_prior = dist.MultivariateNormal(torch.zeros(L), torch.eye(L))
    try:
        exact = torch.distributions.kl_divergence(q, mvn_prior)
    except NotImplementedError:
        exact = torch.distributions.kl_divergence(q, prior)
    torch.testing.assert_close(exact, closed, rtol=1e-8, atol=1e-8)
    # The density behind it: the mean of log q - log p over n draws has standard error sd / √n; 5 se bound it.
    n = 20000
    z = q.sample((n,))
    diff = q.log_prob(z) - prior.log_prob(z)
    assert ((diff.mean(0) - closed).abs() < 5 * diff.std(0) / math.sqrt(n)).all()


# ----------------------------------------------------------------------------------------------------------------
# Numerical extremes
@pytest.mark.parametrize("value", [200.0, -200.0, 50.0, -50.0])
@pytest.mark.parametrize("name", FAMILIES)
def test_extreme_raw_outputs_give_a_valid_distribution(name, value):
    """Encoder outputs far outside the usual range (saturated softplus, tanh, QR of a rank-one matrix, huge
    hyper-network inputs) still give a distribution that passes Pyro's validation, finite reparameterised samples
    and a finite log-density of them, in float32."""
    family = make_family(name, L)
    q = family(torch.full((B, family.num_params), value))
    z = q.rsample((3,))
    assert torch.isfinite(z).all()
    assert bool(q.support.check(z).all())
    assert torch.isfinite(q.log_prob(z)).all()


# ----------------------------------------------------------------------------------------------------------------
# Family-specific layouts (each documented in the family's docstring)
def test_full_rank_layout():
    family = make_family("full_rank", L, eps=1e-3)
    assert family.num_params == L + L * (L + 1) // 2 and family.off_diagonal_scale == pytest.approx(1 / math.sqrt(L))
    family = make_family("full_rank", L, eps=1e-3, off_diagonal_scale=0.5)
    raw = torch.randn(2, family.num_params)
    loc, tril = family.split(raw)
    assert torch.equal(loc, raw[:, :L])
    scale = F.softplus(raw[:, L : 2 * L]) + 1e-3
    torch.testing.assert_close(tril.diagonal(dim1=-2, dim2=-1), scale)
    torch.testing.assert_close(tril[:, 1, 0], 0.5 * scale[:, 1] * raw[:, 2 * L])  # entries in units of the row's scale
    torch.testing.assert_close(tril[:, 2, 1], 0.5 * scale[:, 2] * raw[:, 2 * L + 2])
    assert torch.equal(tril.triu(1), torch.zeros_like(tril))
    assert torch.equal(family(raw).scale_tril, tril)
    with pytest.raises(ConfigError, match="off_diagonal_scale must be a positive finite number"):
        make_family("full_rank", L, off_diagonal_scale=0.0)


def test_correlated_gaussians_with_zero_extras_are_mvn_diag(float64):
    seed = make_family("mvn_diag", L)
    raw = torch.randn(B, 2 * L)
    z = seed(raw).sample()
    for name in ("full_rank", "low_rank"):
        family = make_family(name, L)
        padded = torch.cat([raw, torch.zeros(B, family.num_params - 2 * L)], dim=-1)
        torch.testing.assert_close(family(padded).log_prob(z), seed(raw).log_prob(z), rtol=1e-12, atol=1e-12)


def test_low_rank_rank_default_and_bounds():
    assert make_family("low_rank", 16).rank == 4
    assert make_family("low_rank", 2).rank == 1
    assert make_family("low_rank:3", 16).num_params == 16 * 5
    with pytest.raises(ConfigError, match=r"^low_rank's rank must be at most 3 \(latent_dim; for a full covariance"):
        make_family("low_rank:4", 3)
    with pytest.raises(ConfigError, match="^low_rank's rank must be a positive integer, got 0$"):
        make_family("low_rank", 3, rank=0)


def test_flow_layout_base_and_options():
    family = make_family("iaf:3", L)
    assert family.num_flows == 3 and len(family.transforms) == 3
    assert family.num_params == 2 * L + family.context_dim and family.context_dim == 16
    on_full_rank = make_family("planar", L, base="full_rank", context_dim=5, hidden_dims=[7])
    assert on_full_rank.num_params == make_family("full_rank", L).num_params + 5
    params = on_full_rank.split(torch.randn(2, on_full_rank.num_params))
    assert params.context.shape == (2, 5) and params.base.scale_tril.shape == (2, L, L)
    with pytest.raises(ConfigError, match="base must be a Gaussian family"):
        make_family("iaf", L, base="planar")
    with pytest.raises(ConfigError, match=r"^num_flows \(the K of iaf:K\) must be a positive integer, got 0$"):
        make_family("iaf", L, num_flows=0)
    with pytest.raises(ConfigError, match="^every hidden width must be a positive integer, got True$"):
        make_family("iaf", L, hidden_dims=[8, True])


@pytest.mark.parametrize("name", ["sylvester", "sylvester_householder", "sylvester_triangular"])
def test_sylvester_parameters_are_constrained(name):
    family = make_family(f"{name}:2", L)
    params = family.split(torch.randn(B, family.num_params) * 3)
    if params.q is not None:
        eye = torch.eye(params.q.shape[-1])
        torch.testing.assert_close(params.q.mT @ params.q, eye.expand_as(params.r), rtol=0, atol=1e-5)
    for r in (params.r, params.r_tilde):
        assert torch.equal(r.tril(-1), torch.zeros_like(r))
    product = params.r.diagonal(dim1=-2, dim2=-1) * params.r_tilde.diagonal(dim1=-2, dim2=-1)
    assert (product > -(DIAGONAL_BOUND**2) - 1e-7).all()  # invertibility: R_mm R̃_mm > -1


def test_unknown_family_gets_choices_and_a_close_match():
    with pytest.raises(
        ConfigError, match=r"unknown guide family 'iaff'; choose one of: .*full_rank.*did you mean 'iaf'"
    ):
        make_family("iaff:2", L)


def test_cli_guide_choices_equal_the_registry():
    assert sorted(cli.GUIDE_CHOICES) == family_names()


def test_cli_rejects_an_unknown_guide_with_a_hint(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--guide", "low_rnk:4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "choose one of" in err and "did you mean 'low_rank'" in err


# ----------------------------------------------------------------------------------------------------------------
# Inside the VAE: global flow parameters are trained, saved and restored
@pytest.mark.parametrize("name", [n for n in FLOWS if any(True for _ in make_family(n, L).parameters())])
def test_flow_networks_are_optimised_and_in_the_state_dict(name):
    vae = VAE(12, latent_dim=L, hidden_dims=(8,), guide=name)
    x = torch.rand(6, 12).bernoulli()
    before = {k: v.detach().clone() for k, v in vae.family.named_parameters()}
    assert before, f"{name} has no global parameters"
    optimizer = adamw(lr=1e-2)
    svi = SVI(vae.model, vae.guide, optimizer, Trace_ELBO())
    for _ in range(2):
        svi.step(x)
    assert {f"family.{k}" for k in before} <= set(optimizer.param_names)
    for key, value in vae.family.named_parameters():
        assert not torch.equal(value, before[key]), f"family.{key} was not updated"
    state = vae.state_dict()
    assert all(f"family.{k}" in state for k in before)
    clone = VAE(12, latent_dim=L, hidden_dims=(8,), guide=name)  # fresh networks and autoregressive orderings
    clone.load_state_dict(state)
    draws = []
    for model in (vae, clone):
        torch.manual_seed(3)
        q = model.encode(x)
        z = q.rsample()
        draws.append((z, q.log_prob(z)))
    torch.testing.assert_close(draws[1], draws[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_trains_through_the_cli(name, tmp_path, capsys):
    """``pyro-vae train --guide NAME`` (in-process, to keep the suite fast; test_cli runs the real subprocess)."""
    spec = f"{name}:2" if make_family(name, L).spec_option is not None else name
    code = cli.main(
        [
            "train",
            "--guide",
            spec,
            "--hidden-dims",
            "32,16",
            "--latent-dim",
            str(L),
            "--n-train",
            "200",
            "--n-test",
            "50",
            "--batch-size",
            "50",
            "--epochs",
            "1",
            "--max-steps",
            "3",
            "--particles",
            "2",
            "--no-figures",
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "test ELBO" in out and "after 3 steps" in out
    assert np.isfinite(float(out.split("test ELBO ")[1].split(" ")[0]))
