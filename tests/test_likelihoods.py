"""The likelihood registry: shapes, log-densities against scipy in float64, the data-admission rule, bits/dim, and
training of each new likelihood through the Python API."""

import json
import math

import mpmath
import numpy as np
import pytest
import scipy.stats
import torch

from pyro_vae.cli.flags import LIKELIHOOD_CHOICES
from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.config.data_kinds import DATA_KINDS, LIKELIHOOD_SUPPORT, admits
from pyro_vae.data import Dataset, check_likelihood_data, data_kind, load_dataset
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.evaluation import EvalResult, bits_rule, evaluate
from pyro_vae.likelihoods import (
    DiscretizedLogistic,
    GaussianLikelihood,
    likelihood_class,
    likelihood_names,
    make_likelihood,
)
from pyro_vae.likelihoods.beta import MIN_CONCENTRATION
from pyro_vae.likelihoods.gaussian import MIN_SCALE
from pyro_vae.model import VAE
from pyro_vae.protocol import BITS_RULES, bits_per_dim
from pyro_vae.run_dir import load_run
from pyro_vae.stats import MeanSE
from pyro_vae.train import fit

SPECS = [
    "bernoulli",
    "continuous_bernoulli",
    "gaussian",
    "gaussian:0.05",
    "gaussian:learned",
    "gaussian:shared",
    "gaussian:optimal",
    "beta",
    "beta:0.01",
    "discretized_logistic",
]
D = 6


def _softplus(v):
    return np.logaddexp(0.0, v)


def _grid_data(shape, seed):
    """Values k/255 in float64, with the edge levels 0 and 255 present."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 256, size=shape)
    k.flat[0], k.flat[1] = 0, 255
    return torch.from_numpy(k / 255.0)


def _data_for(spec, shape, seed):
    if spec == "bernoulli":
        return (_grid_data(shape, seed) > 0.5).double()
    return _grid_data(shape, seed)


# ------------------------------------------------------------------------------------------------- the registry


def test_registry_names_support_and_cli_choices_agree():
    names = likelihood_names()
    assert sorted(LIKELIHOOD_CHOICES) == names == sorted(LIKELIHOOD_SUPPORT)
    for name in names:
        cls = likelihood_class(name)
        assert cls.support == LIKELIHOOD_SUPPORT[name], name  # the config check's mirror is the class attribute
        assert cls.requires_binary == (cls.support == "binary"), name
    assert [n for n in names if likelihood_class(n).discrete] == ["bernoulli", "discretized_logistic"]


@pytest.mark.parametrize("spec", SPECS)
def test_shapes_spec_round_trip_and_mean(spec, float64):
    likelihood = make_likelihood(spec)
    assert make_likelihood(likelihood.spec).spec == likelihood.spec
    assert likelihood.spec == spec
    assert likelihood.output_dim(D) == likelihood.params_per_dim * D
    raw = torch.randn(4, likelihood.output_dim(D), generator=torch.Generator().manual_seed(0))
    p = likelihood(raw)
    assert p.batch_shape == (4,) and p.event_shape == (D,)
    x = _data_for(spec, (4, D), 1)
    assert p.log_prob(x).shape == (4,)
    expanded = p.expand((3, 4))  # as a plate of particles broadcasts it
    assert expanded.batch_shape == (3, 4) and expanded.log_prob(x).shape == (3, 4)
    torch.testing.assert_close(expanded.log_prob(x)[1], p.log_prob(x), rtol=0, atol=0)
    particles = likelihood(raw.expand(2, 4, -1))  # vectorised particles: raw (P, B, params_per_dim · D)
    assert particles.batch_shape == (2, 4) and particles.log_prob(x).shape == (2, 4)
    mean = likelihood.mean(raw)
    assert mean.shape == (4, D)
    if spec not in ("gaussian", "gaussian:0.05", "gaussian:learned", "gaussian:shared", "gaussian:optimal"):
        assert bool(((mean >= 0) & (mean <= 1)).all())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gaussian:-1", "σ must be a positive finite number, got -1.0"),
        (
            "gaussian:learnd",
            "unknown option of likelihood 'gaussian' 'learnd'; choose one of: learned, optimal, shared "
            "(did you mean 'learned'?); or give a fixed σ > 0, e.g. 'gaussian:0.1'",
        ),
        ("beta:0.5", "the clamp ε must be a number in (0.0, 0.5), got 0.5"),
        ("beta:x", "the option is the clamp ε in (0, 0.5)"),
        ("bernoulli:2", "likelihood 'bernoulli' takes no ':option'"),
        ("discretized_logistic:8", "takes no ':option'"),
        ("gausian", "did you mean 'gaussian'?"),
    ],
)
def test_bad_specs_are_one_line(spec, message):
    with pytest.raises(ConfigError) as info:
        make_likelihood(spec)
    text = str(info.value)
    assert message in text and "\n" not in text


# ------------------------------------------------------------------------------------ log-densities against scipy


def test_gaussian_fixed_and_learned_against_scipy(float64):
    rng = np.random.default_rng(0)
    loc, x = rng.normal(size=(3, D)), rng.uniform(size=(3, D))
    fixed = make_likelihood("gaussian:0.05")
    got = fixed(torch.from_numpy(loc)).log_prob(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), scipy.stats.norm.logpdf(x, loc, 0.05).sum(-1), rtol=1e-12)
    learned = make_likelihood("gaussian:learned")
    learned.output_dim(D)  # creates the (D,) scales
    learned.double()
    with torch.no_grad():
        learned.log_scale.copy_(torch.from_numpy(rng.normal(-2.0, 0.5, size=D)))
    sigma = np.exp(learned.log_scale.detach().numpy()) + MIN_SCALE  # σ = σ_min + exp(log_scale), one per pixel
    got = learned(torch.from_numpy(loc)).log_prob(torch.from_numpy(x)).detach()
    np.testing.assert_allclose(got.numpy(), scipy.stats.norm.logpdf(x, loc, sigma).sum(-1), rtol=1e-12)
    assert learned.log_scale.shape == (D,)


def test_gaussian_optimal_is_the_gaussian_at_the_fitted_scale(float64):
    rng = np.random.default_rng(1)
    loc, x = rng.normal(size=(3, D)), rng.normal(size=(3, D))
    x[2] = loc[2] + 1e-5  # a near-perfect reconstruction: σ* is floored at σ_min
    sigma = np.maximum(np.sqrt(((x - loc) ** 2).mean(-1, keepdims=True)), MIN_SCALE)
    p = make_likelihood("gaussian:optimal")(torch.from_numpy(loc))
    got = p.log_prob(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), scipy.stats.norm.logpdf(x, loc, sigma).sum(-1), rtol=1e-12)
    # σ* maximises the Gaussian log-density over a shared σ: any other σ scores lower.
    for factor in (0.9, 1.1):
        assert (got.numpy()[:2] > scipy.stats.norm.logpdf(x, loc, sigma * factor).sum(-1)[:2]).all()
    with pytest.raises(NotImplementedError, match="no draws"):
        p.sample()


@pytest.mark.parametrize("eps", [1e-3, 0.01])
def test_beta_against_scipy_with_the_clamp(float64, eps):
    rng = np.random.default_rng(2)
    raw = rng.normal(size=(3, 2 * D))
    x = _grid_data((3, D), 3).numpy()  # includes 0 and 1, which the clamp moves to ε and 1 − ε
    alpha = _softplus(raw[:, :D]) + MIN_CONCENTRATION  # param-major: the first D raw values are α
    beta = _softplus(raw[:, D:]) + MIN_CONCENTRATION
    expected = scipy.stats.beta.logpdf(np.clip(x, eps, 1 - eps), alpha, beta).sum(-1)
    likelihood = make_likelihood(f"beta:{eps}")
    assert likelihood.clamp == eps
    got = likelihood(torch.from_numpy(raw)).log_prob(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(likelihood.mean(torch.from_numpy(raw)).numpy(), alpha / (alpha + beta), rtol=1e-12)


def _scipy_bins(mu, s):
    """P(k) for k = 0..255 from scipy's logistic CDF, edges open: F(a_0), F(a_k) − F(b_k), 1 − F(b_255). Bins above μ
    difference the survival function instead, so that neither side loses digits to 1 − F."""
    k = np.arange(256)
    upper = (k / 255 + 0.5 / 255 - mu) / s
    lower = (k / 255 - 0.5 / 255 - mu) / s
    upper[-1], lower[0] = np.inf, -np.inf
    logistic = scipy.stats.logistic
    left = logistic.cdf(upper) - logistic.cdf(lower)
    right = logistic.sf(lower) - logistic.sf(upper)
    return np.where(lower > 0, right, left)


@pytest.mark.parametrize(("mu", "s"), [(0.5, 0.1), (0.2, 0.02), (0.0, 0.3), (1.0, 0.01), (-0.4, 0.05), (0.7, 2.0)])
def test_discretized_logistic_against_scipy_and_sums_to_one(float64, mu, s):
    grid = torch.arange(256, dtype=torch.float64) / 255
    p = DiscretizedLogistic(torch.tensor(mu, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
    log_p = p.log_prob(grid)  # every bin, edges included
    reference = _scipy_bins(mu, s)
    mass = reference > 1e-300  # scipy's own differences underflow beyond; the next test covers that tail
    np.testing.assert_allclose(log_p.numpy()[mass], np.log(reference[mass]), rtol=1e-9)
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(p.mean) == pytest.approx(float((grid.numpy() * reference).sum()), abs=1e-12)


def test_discretized_logistic_tails_are_exact_where_the_cdf_difference_underflows(float64):
    """Far from μ both CDF values round to 1 (or 0) in float64; the log-space factorisation stays exact. The
    reference is mpmath at 50 digits."""
    mpmath.mp.dps = 50
    mu, s = 0.0, 1e-3
    for k in (128, 200, 255):
        # σ(a) − σ(b) = (e^{−b} − e^{−a}) / ((1 + e^{−a})(1 + e^{−b})) and 1 − σ(b) = 1 / (1 + e^{b}): no cancellation
        # of numbers near 1, and mpmath's exponent range holds e^{−786}.
        a = (mpmath.mpf(k) / 255 + mpmath.mpf(1) / 510 - mu) / s
        b = (mpmath.mpf(k) / 255 - mpmath.mpf(1) / 510 - mu) / s
        if k == 255:
            exact = -mpmath.log(1 + mpmath.exp(b))
        else:
            numerator = mpmath.exp(-b) - mpmath.exp(-a)
            exact = mpmath.log(numerator) - mpmath.log((1 + mpmath.exp(-a)) * (1 + mpmath.exp(-b)))
            naive = scipy.stats.logistic.cdf(float(a)) - scipy.stats.logistic.cdf(float(b))
            assert naive == 0.0  # the float64 CDF difference has underflowed here
        got = DiscretizedLogistic(torch.tensor(mu), torch.tensor(s)).log_prob(torch.tensor(k / 255))
        assert float(got) == pytest.approx(float(exact), rel=1e-10)
    # In float32 the gradient stays finite in the far tail, edges included.
    loc = torch.tensor([0.0, 0.0, 1.0], requires_grad=True)
    scale = torch.tensor([1e-4, 1e-4, 1e-4], requires_grad=True)
    x = torch.tensor([200 / 255, 1.0, 0.0])
    log_p = DiscretizedLogistic(loc, scale).log_prob(x)
    log_p.sum().backward()
    assert torch.isfinite(log_p).all() and torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all()


def test_discretized_logistic_draws_agree_with_its_probabilities():
    torch.manual_seed(0)
    p = DiscretizedLogistic(torch.tensor(0.5), torch.tensor(0.01))
    n = 20000
    draws = p.sample((n,))
    assert bool(p.support.check(draws).all())
    k = (draws * 255).round().long()
    probs = p.log_prob(torch.arange(256) / 255).exp()
    # Each bin count is Binomial(n, P(k)): its frequency has SE sqrt(P(1 − P) / n); 5 SE over the 6 heaviest bins
    # fails by chance with probability < 6 · 6e-7.
    for level in probs.topk(6).indices:
        freq = float((k == level).double().mean())
        se = math.sqrt(float(probs[level]) * (1 - float(probs[level])) / n)
        assert abs(freq - float(probs[level])) < 5 * se


def test_discretized_logistic_refuses_values_off_the_grid_under_validation():
    p = make_likelihood("discretized_logistic")(torch.zeros(1, 2 * D))
    with pytest.raises(ValueError, match="support"):
        p.log_prob(torch.full((1, D), 0.5))  # 127.5 / 255: between two levels


def test_learned_scales_bind_to_one_dimension():
    likelihood = GaussianLikelihood(mode="learned", input_dim=D)
    assert likelihood.log_scale.shape == (D,)
    with pytest.raises(ConfigError, match="has 6 scales but the data have 7 dimensions"):
        likelihood.output_dim(D + 1)


# ------------------------------------------------------------------------------------------------------ admission


def test_data_kinds():
    assert data_kind(torch.tensor([0.0, 1.0, 1.0])) == "binary"
    assert data_kind(torch.from_numpy(np.arange(256, dtype=np.uint8).astype(np.float32) / np.float32(255))) == "8bit"
    assert data_kind(torch.tensor([0.0, 0.5])) == "unit"
    table = [[admits(support, kind) for kind in DATA_KINDS] for support in DATA_KINDS]
    assert table == [[True, False, False], [True, True, False], [True, True, True]]


def _dataset(x):
    return Dataset("npz:x.npz", x, None, x[:2], None, None, binary=data_kind(x) == "binary")


# (likelihood, data kind) → admitted, or the words of the one-line refusal.
ADMISSION = {
    ("bernoulli", "binary"): None,
    ("bernoulli", "8bit"): "the bernoulli likelihood needs binary data but npz:x.npz has grey levels",
    ("bernoulli", "unit"): "the bernoulli likelihood needs binary data but npz:x.npz has values off the 8-bit grid",
    ("discretized_logistic", "binary"): None,
    ("discretized_logistic", "8bit"): None,
    ("discretized_logistic", "unit"): "the discretized_logistic likelihood needs 8-bit data (values k/255, k = 0..255) "
    "but npz:x.npz has values off the 8-bit grid k/255 and binarize is 'none'; use --likelihood gaussian, beta or "
    "continuous_bernoulli, or save the images as uint8 0..255",
}
for _spec in ("continuous_bernoulli", "gaussian:learned", "gaussian:optimal", "beta"):
    for _kind in DATA_KINDS:
        ADMISSION[(_spec, _kind)] = None


@pytest.mark.parametrize(("spec", "kind"), list(ADMISSION), ids=lambda v: str(v))
def test_admission_table(spec, kind):
    x = {"binary": (_grid_data((8, D), 0) > 0.5), "8bit": _grid_data((8, D), 0), "unit": torch.rand(8, D) * 0.99}[kind]
    data = _dataset(x.float())
    words = ADMISSION[(spec, kind)]
    if words is None:
        check_likelihood_data(data, "none", make_likelihood(spec))
    else:
        with pytest.raises(DataError) as info:
            check_likelihood_data(data, "none", make_likelihood(spec))
        assert words in str(info.value) and "\n" not in str(info.value)
    check_likelihood_data(data, "dynamic", make_likelihood(spec))  # binarised data: every likelihood admits them


def test_the_config_check_follows_the_same_rule():
    with pytest.raises(ConfigError, match="the bernoulli likelihood needs binary data but embedded has grey levels"):
        RunConfig(data=DataConfig(binarize="none"))
    for spec in ("discretized_logistic", "gaussian:learned", "beta:0.01"):
        RunConfig(data=DataConfig(binarize="none"), model=ModelConfig(likelihood=spec))
        RunConfig(data=DataConfig(binarize="dynamic"), model=ModelConfig(likelihood=spec))


def test_cli_refuses_off_grid_data_for_the_discretized_logistic_in_one_line(tmp_path, capsys):
    from pyro_vae import cli

    path = tmp_path / "x.npz"
    np.savez(path, x=np.random.default_rng(0).uniform(0.1, 0.9, size=(20, 4, 4)).astype(np.float32))
    argv = ["train", "--data", path, "--binarize", "none", "--likelihood", "discretized_logistic"]
    code = cli.main([str(a) for a in [*argv, "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "4"]])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "discretized_logistic likelihood needs 8-bit data" in lines[0] and "x.npz" in lines[0]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------ bits/dim


def test_bits_per_dim_formulas_by_hand():
    log_px, dim = MeanSE(-2000.0, 3.0), 784
    discrete = bits_per_dim(log_px, dim, "discrete")
    assert discrete.mean == pytest.approx(2000.0 / (784 * math.log(2)), rel=1e-15)
    assert discrete.se == pytest.approx(3.0 / (784 * math.log(2)), rel=1e-15)
    dequantized = bits_per_dim(log_px, dim, "dequantized")
    # (−log p + D log 256) / (D log 2) = 2000 / (784 · 0.693147...) + 8 = 3.680... + 8
    assert dequantized.mean == pytest.approx((2000.0 + 784 * math.log(256)) / (784 * math.log(2)), rel=1e-15)
    assert dequantized.mean == pytest.approx(discrete.mean + 8.0, rel=1e-15) and dequantized.se == discrete.se
    assert bits_per_dim(log_px, dim, "off_grid") is None and bits_per_dim(log_px, dim, "unnormalized") is None
    with pytest.raises(ConfigError, match="unknown bits/dim rule 'bits'"):
        bits_per_dim(log_px, dim, "bits")


def test_bits_rule_per_likelihood_and_data():
    grid, real, binary = _grid_data((4, D), 0).float(), torch.rand(4, D) * 0.99, torch.ones(4, D)
    assert bits_rule(make_likelihood("bernoulli"), binary) == "discrete"
    assert bits_rule(make_likelihood("discretized_logistic"), grid) == "discrete"
    for spec in ("gaussian", "gaussian:learned", "beta", "continuous_bernoulli"):
        assert bits_rule(make_likelihood(spec), grid) == "dequantized"
        assert bits_rule(make_likelihood(spec), real) == "off_grid"
        assert bits_rule(make_likelihood(spec), binary) == "off_grid"
    assert bits_rule(make_likelihood("gaussian:optimal"), grid) == "unnormalized"


def _tiny_vae(spec, dim=D):
    torch.manual_seed(0)
    return VAE(dim, latent_dim=2, hidden_dims=(8,), likelihood=spec)


def test_evaluate_reports_the_dequantised_bits_and_says_so(float64):
    vae = _tiny_vae("beta").double()
    x = _grid_data((10, D), 5)
    result = evaluate(vae, x, (1, 4))
    assert result.bits_rule == "dequantized" and result.protocol.clamp == 1e-3
    assert result.protocol.likelihood == "beta"
    for bound in result.bounds:
        hand = (-bound.log_px.mean + D * math.log(256)) / (D * math.log(2))
        assert bound.bits_per_dim.mean == pytest.approx(hand, rel=1e-12)
    table = result.table()
    assert "dequantisation offset log 256 per dimension included" in table and "clamped to [0.001" in table
    assert EvalResult.from_json(json.loads(json.dumps(result.to_json()))) == result
    # Records written before the clamp and the bits rule existed still load, with the defaults.
    old = result.to_json()
    del old["clamp"], old["bits_rule"]
    loaded = EvalResult.from_json(old)
    assert loaded.protocol.clamp is None and loaded.bits_rule == "discrete"


def test_evaluate_reports_nats_only_for_a_density_on_real_valued_data(float64):
    result = evaluate(_tiny_vae("gaussian:learned").double(), torch.rand(10, D, dtype=torch.float64), (1, 4))
    assert result.bits_rule == "off_grid" and all(b.bits_per_dim is None for b in result.bounds)
    assert BITS_RULES["off_grid"] in result.table() and "n/a" in result.table()
    assert EvalResult.from_json(json.loads(json.dumps(result.to_json()))) == result


def test_evaluate_bits_of_the_discretized_logistic_are_discrete(float64):
    result = evaluate(_tiny_vae("discretized_logistic").double(), _grid_data((10, D), 6), (1, 4))
    assert result.bits_rule == "discrete"
    bound = result.bound(4)
    assert bound.bits_per_dim.mean == pytest.approx(-bound.log_px.mean / (D * math.log(2)), rel=1e-12)


# ------------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def grey():
    return load_dataset(DataConfig(n_train=128, n_test=32))


def _real_valued(data):
    """Uniformly dequantised images, (k + u) / 256: real-valued in [0, 1), off the 8-bit grid."""
    g = torch.Generator().manual_seed(0)
    x_train = (data.x_train * 255 + torch.rand(data.x_train.shape, generator=g)) / 256
    x_test = (data.x_test * 255 + torch.rand(data.x_test.shape, generator=g)) / 256
    return Dataset("dequantized", x_train, None, x_test, None, data.image_shape, binary=False)


def _fit(spec, data, tmp_path=None, steps=40):
    cfg = RunConfig(
        data=DataConfig(binarize="none"),
        model=ModelConfig(latent_dim=2, hidden_dims=(32, 16), likelihood=spec),
        train=TrainConfig(epochs=100, max_steps=steps, batch_size=32, lr=3e-3, progress=False),
    )
    torch.manual_seed(0)
    vae = VAE.from_config(cfg.model, data.input_dim)
    return vae, fit(vae, data, cfg, out_dir=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["gaussian:learned", "beta", "gaussian:optimal", "discretized_logistic"])
def test_each_new_likelihood_trains(grey, spec):
    discrete = spec == "discretized_logistic"
    # The discretised logistic starts with s ≈ softplus(0) = 0.69 on data of step 1/255, and needs more steps to
    # narrow it than the others need.
    _, result = _fit(spec, grey if discrete else _real_valued(grey), steps=80 if discrete else 40)
    losses = np.asarray(result.losses)
    assert np.isfinite(losses).all()
    # The first and last 8 steps' mean losses: training must lower the loss by far more than the step-to-step noise
    # (five standard errors of the difference of the two means).
    first, last = losses[:8], losses[-8:]
    se = math.sqrt(first.var(ddof=1) / 8 + last.var(ddof=1) / 8)
    assert last.mean() < first.mean() - 5 * se, (first.mean(), last.mean(), se)


@pytest.mark.slow
def test_learned_scales_train_and_survive_a_checkpoint_round_trip(grey, tmp_path):
    vae, _ = _fit("gaussian:learned", _real_valued(grey), tmp_path, steps=20)
    trained = vae.likelihood.log_scale.detach()
    assert trained.shape == (grey.input_dim,)
    assert not torch.equal(trained, torch.full_like(trained, trained[0]))  # each pixel's σ moved on its own
    run = load_run(tmp_path)
    assert run.vae.likelihood.spec == "gaussian:learned"
    torch.testing.assert_close(run.vae.likelihood.log_scale, trained, rtol=0, atol=0)
