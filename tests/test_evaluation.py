"""The evaluator: IS log-likelihoods, the ELBO's parts, active units and protocols, against closed forms."""

import json
import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from reference_linear_gaussian import (
    diagonal_q,
    gaussian_kl,
    log_marginal,
    make_model,
    numpy_params,
    posterior,
    set_diagonal_encoder,
    set_encoder_to_posterior,
)

from pyro_vae import cli
from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.evaluation import (
    DataProtocol,
    EvalResult,
    ProtocolMismatchError,
    active_directions,
    active_units,
    evaluate,
    evaluate_elbo,
    side_by_side,
)
from pyro_vae.guides import GuideFamily
from pyro_vae.linear_gaussian import LinearGaussianVAE
from pyro_vae.model import VAE
from pyro_vae.train import fit


def _data(vae, n, seed):
    return vae.sample_data(n, generator=torch.Generator().manual_seed(seed))


def _expected_reconstruction(vae, x):
    """E_q[log N(x; W z + b, σ² I)] = -D/2 log(2πσ²) - (‖x - W μ - b‖² + tr(W Σ_q Wᵀ)) / (2σ²), per row."""
    w, b, sigma = numpy_params(vae)
    mean, cov = diagonal_q(vae, x)
    resid = np.asarray(x) - mean @ w.T - b
    trace = np.einsum("dl,blm,dm->b", w, cov, w)
    return -0.5 * len(b) * math.log(2 * math.pi * sigma**2) - ((resid**2).sum(-1) + trace) / (2 * sigma**2)


def test_exact_guide_gives_log_px_at_every_k_and_every_chunking(float64):
    """q = p(z | x) (orthogonal columns): every weight is p(x), so every bound (k = 1 is the Monte Carlo ELBO) is
    log p(x) with zero noise, whatever the chunking of particles and images."""
    vae = make_model(D=5, L=2, seed=0, orthogonal=True)
    set_encoder_to_posterior(vae)
    x = _data(vae, 30, 0)
    exact = log_marginal(vae, x)
    results = [evaluate(vae, x, (1, 3, 10), chunk_size=c) for c in (7, 64, 10_000)]
    for result in results:
        for bound in result.bounds:
            assert bound.log_px.mean == pytest.approx(exact.mean(), abs=1e-9)
            assert bound.log_px.se == pytest.approx(exact.std(ddof=1) / math.sqrt(30), rel=1e-8)
        assert result.nll.mean == pytest.approx(-exact.mean(), abs=1e-9)
    assert [b.groups for b in results[0].bounds] == [10, 3, 1]


# Monte Carlo agreement with a closed form. The images are fixed, so the exact per-image values are fixed too and the
# only randomness is the evaluation noise. Repeating the evaluation over R independent seeds on the same images gives
# R independent errors d_r = estimate_r − exact; their mean over r has standard error SE = sd(d) / √R. Under
# agreement mean(d) / SE follows Student's t with R − 1 = 19 degrees of freedom, and P(|t_19| > 4) ≈ 8e-4, so
# |mean(d)| < 4 SE fails by chance less than once in a thousand. (The old tolerance was the standard error *across
# images*, which measures how much log p(x) varies between images; on fixed images that spread is not an error at
# all, so it was far too loose ever to fail.)
SEEDS = 20
Z = 4.0


def _agrees(estimates, exact):
    """``|mean(d)| < Z · SE`` over seeds, and the tolerance Z · SE itself (see the comment above)."""
    d = np.asarray(estimates) - exact
    tolerance = Z * d.std(ddof=1) / math.sqrt(len(d))
    return abs(d.mean()) < tolerance, tolerance


def test_elbo_parts_match_closed_forms(float64):
    vae = make_model(D=4, L=3, seed=1)
    x = _data(vae, 50, 1)
    q_mean, q_cov = diagonal_q(vae, x)
    kl = gaussian_kl(q_mean, q_cov, np.zeros(3), np.eye(3))
    p_mean, p_cov = posterior(vae, x)
    closed_elbo = (log_marginal(vae, x) - gaussian_kl(q_mean, q_cov, p_mean, p_cov)).mean()
    closed_reconstruction = _expected_reconstruction(vae, x).mean()
    results = [evaluate(vae, x, (1, 200), seed=seed) for seed in range(SEEDS)]
    for result in results:
        assert result.kl_method == "analytic"
        assert result.kl.mean == pytest.approx(kl.mean(), rel=1e-10)
    across_images = results[0].reconstruction.se
    for name, estimates, exact in (
        ("reconstruction", [r.reconstruction.mean for r in results], closed_reconstruction),
        ("analytic-KL ELBO", [r.elbo.mean for r in results], closed_elbo),
        ("k=1 bound (Monte Carlo ELBO)", [r.bound(1).log_px.mean for r in results], closed_elbo),
    ):
        agrees, tolerance = _agrees(estimates, exact)
        assert agrees, f"{name}: mean over seeds {np.mean(estimates)} vs closed form {exact} (tolerance {tolerance})"
        assert tolerance < across_images / 5  # the Monte Carlo tolerance is far tighter than the spread over images
    # A Gaussian density on real-valued (not 8-bit) data has no bits/dim; tests/test_likelihoods.py checks the rules.
    assert results[0].bits_rule == "off_grid" and all(b.bits_per_dim is None for b in results[0].bounds)


def test_iw_bounds_are_non_decreasing_in_k_and_the_nll_is_unbiased(float64):
    """With k dividing the next k, each group of 10k particles is ten groups of k, so by Jensen every image's
    estimate can only grow with k. At K = 1000 the estimate agrees with the exact linear-Gaussian log p(x) (scipy, in
    float64) to within its Monte Carlo error over independent seeds (see the comment above ``SEEDS``); its bias,
    about Var(w / p(x)) / 2K with this bounded-weight proposal, is far below that error."""
    vae = make_model(D=4, L=2, seed=2)
    x = _data(vae, 30, 2)
    mean, cov = posterior(vae, x.numpy())
    w, b, sigma = numpy_params(vae)
    gain = cov @ w.T / sigma**2
    # Posterior means with inflated marginal scales: a good but inexact proposal with bounded weights.
    set_diagonal_encoder(vae, gain, -gain @ b, 1.3 * np.sqrt(np.diag(cov)))
    exact = log_marginal(vae, x).mean()
    nll = []
    for seed in range(SEEDS):
        result = evaluate(vae, x, (1, 10, 100, 1000), seed=seed)
        means = [bound.log_px.mean for bound in result.bounds]
        assert means == sorted(means) and means[0] < means[-1] - 0.01
        nll.append(result.nll.mean)
    agrees, tolerance = _agrees(-np.array(nll), exact)
    assert agrees, f"IS log p(x) {-np.mean(nll)} vs exact {exact} (tolerance {tolerance})"
    assert tolerance < result.nll.se / 5  # the Monte Carlo tolerance is far tighter than the spread over images


def test_memory_is_bounded_by_the_chunk_size(float64):
    vae = make_model(D=4, L=2, seed=3)
    x = _data(vae, 20, 3)
    rows = []
    hook = vae.decoder.register_forward_hook(lambda module, args, out: rows.append(args[0][..., 0].numel()))
    try:
        for ks, chunk in (((1, 100), 64), ((1, 10), 64), ((5,), 3)):
            rows.clear()
            evaluate(vae, x, ks, chunk_size=chunk)
            assert max(rows) <= chunk and sum(rows) == 20 * (max(ks) + 1)  # + 1: the unexpanded pass per image
    finally:
        hook.remove()


def test_evaluation_has_its_own_rng_stream(float64):
    vae = make_model(D=4, L=2, seed=4)
    x = _data(vae, 10, 4)
    state = torch.get_rng_state()
    first = evaluate(vae, x, (1, 10), seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert evaluate(vae, x, (1, 10), seed=3) == first
    assert evaluate(vae, x, (1, 10), seed=4).bound(10) != first.bound(10)
    assert vae.training  # restored after evaluation


def test_active_units_and_kl_per_dimension(float64):
    """Dimension 1 is switched off (W column 0, encoder mean 0): inactive, zero KL; dimension 0 is active."""
    vae = make_model(D=4, L=2, seed=5, zero_columns=(1,))
    rng = np.random.default_rng(5)
    loc_weight = rng.normal(size=(2, 4))
    loc_weight[1] = 0.0
    set_diagonal_encoder(vae, loc_weight, np.zeros(2), np.array([0.5, 1.0]))
    x = _data(vae, 40, 5)
    result = evaluate(vae, x, (1, 5))
    means, cov = diagonal_q(vae, x)
    np.testing.assert_allclose(result.latent_activity, means.var(0, ddof=1), rtol=1e-10, atol=1e-14)
    assert result.active_units == 1 and result.latent_activity[1] == 0.0
    assert result.active_directions == 1  # the means vary along coordinate 0 only
    # KL(N(μ, s²) ‖ N(0, 1)) per dimension = (s² + μ² - 1 - log s²) / 2, averaged over images.
    var = np.stack([np.diag(c) for c in cov])
    per_dim = (0.5 * (var + means**2 - 1 - np.log(var))).mean(0)
    np.testing.assert_allclose(result.kl_per_dim, per_dim, rtol=1e-10, atol=1e-14)
    assert result.kl_per_dim[1] == pytest.approx(0.0, abs=1e-12)
    assert sum(result.kl_per_dim) == pytest.approx(result.kl.mean, rel=1e-10)  # a diagonal q: the KLs add up


def _random_rotation(L, seed):
    # Haar-distributed orthogonal matrix: QR of a Gaussian matrix, with R's diagonal signs folded into Q.
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(L, L)))
    return q * np.sign(np.diag(r))


def test_active_directions_are_the_eigenvalues_above_the_threshold_and_rotation_invariant():
    """Three directions of variance >= 0.05 and 13 of about 1e-4, in a random basis: the eigenvalue count (checked
    against numpy's covariance eigenvalues) stays 3 under any rotation, while the per-coordinate count does not."""
    rng = np.random.default_rng(0)
    L, N = 16, 400
    spread = np.array([1.0, 0.3, math.sqrt(0.05)] + [1e-2] * 13)  # standard deviations: variances 1, 0.09, 0.05, 1e-4
    means = rng.normal(size=(N, L)) * spread @ _random_rotation(L, 1).T
    eigenvalues = np.linalg.eigvalsh(np.cov(means, rowvar=False))
    # The sample eigenvalues sit far from 0.01: the three large ones near 1, 0.09 and 0.05, the rest near 1e-4
    # (relative sampling error of a variance ~ sqrt(2/N) = 7 %), so the count is not a coin toss at the threshold.
    assert (eigenvalues > 0.02).sum() == 3 and (eigenvalues < 0.002).sum() == 13
    for seed in range(3):
        rotated = torch.from_numpy(means @ _random_rotation(L, 10 + seed).T)
        assert active_directions(rotated) == 3
    # One direction of variance 1 spread evenly over 16 coordinates (a Hadamard-like rotation): each coordinate
    # gets variance 1/16 > 0.01, so 16 active units, and still 1 active direction.
    direction = np.ones(L) / math.sqrt(L)
    one_direction = torch.from_numpy(np.outer(rng.normal(size=N), direction))
    variances = one_direction.var(0)
    assert torch.all(variances > 0.01)
    assert active_units(one_direction) == L and active_directions(one_direction) == 1


def test_active_directions_equal_active_units_for_axis_aligned_means():
    """Means whose centred columns are exactly orthogonal have a diagonal covariance: both counts read its
    diagonal, so they agree, on both sides of the threshold."""
    rng = np.random.default_rng(2)
    N, variances = 50, np.array([2.0, 0.5, 0.02, 0.005, 1e-4, 0.0])
    gaussian = rng.normal(size=(N, len(variances)))
    # Q's columns are combinations of the centred columns, so they are centred too, and orthonormal.
    q, _ = np.linalg.qr(gaussian - gaussian.mean(0))
    means = q * np.sqrt(variances * (N - 1))
    cov = np.cov(means, rowvar=False)
    np.testing.assert_allclose(cov, np.diag(variances), atol=1e-12)
    means = torch.from_numpy(means)
    assert active_units(means) == active_directions(means) == 3
    assert active_units(means[:1]) == active_directions(means[:1]) == 0  # one point has no spread


def test_active_counts_refuse_means_of_the_wrong_shape():
    with pytest.raises(DataError, match=r"^posterior means must have shape \(N, L\), got \(5,\)$"):
        active_directions(torch.zeros(5))


def test_tables_name_the_split_and_give_bits_per_dim_only_where_the_rule_defines_them(float64):
    vae = make_model(D=4, L=2, seed=7)
    x = _data(vae, 12, 7)
    continuous = evaluate(vae, x, (1, 4), protocol=DataProtocol("synthetic", "train", "none", None))
    rows = {metric: bits for metric, _, bits in continuous.rows()}
    assert "train ELBO" in rows and "test ELBO" not in rows
    # a density on real-valued data: no bits/dim anywhere, and the table says why
    assert continuous.bits_rule == "off_grid" and rows["train ELBO"] == rows["log p(x), k=4"] == "n/a"
    assert "not reported: a continuous density on data that are not 8-bit" in continuous.table()
    # The same numbers under the discrete rule: bits/dim = -log p(x) / (D ln 2).
    binary = continuous._replace(bits_rule="discrete", protocol=continuous.protocol._replace(split="test"))
    rows = {metric: bits for metric, _, bits in binary.rows()}
    elbo = continuous.elbo
    assert rows["test ELBO"] == f"{-elbo.mean / (4 * math.log(2)):.4f} ± {elbo.se / (4 * math.log(2)):.4f}"


def test_records_without_active_directions_read_back(float64):
    vae = make_model(D=4, L=2, seed=7)
    result = evaluate(vae, _data(vae, 12, 7), (1, 4), protocol=DataProtocol("synthetic", "test", "none", None))
    record = result.to_json()
    assert record["active_directions"] == result.active_directions
    del record["active_directions"]  # as eval.json files written before the field existed
    old = EvalResult.from_json(record)
    assert old.active_directions is None and old == result._replace(active_directions=None)
    assert ("active directions", "n/a", "") in old.rows()


class _ShiftedNormal(GuideFamily):
    """A diagonal Gaussian written as an affine transform of N(loc, scale), for which no KL is registered."""

    name = "shifted_normal"

    @property
    def num_params(self):
        return 2 * self.latent_dim

    def forward(self, raw, context=None):
        loc, raw_scale = raw.split(self.latent_dim, dim=-1)
        base = dist.Normal(loc, torch.nn.functional.softplus(raw_scale) + 1e-5).to_event(1)
        return dist.TransformedDistribution(base, [dist.transforms.AffineTransform(0.5, 1.0, event_dim=1)])


def test_families_without_an_analytic_kl_use_monte_carlo(float64):
    torch.manual_seed(0)
    vae = LinearGaussianVAE(4, 2, guide=_ShiftedNormal(2)).double()
    x = _data(vae, 10, 6)
    result = evaluate(vae, x, (1, 8))
    assert result.kl_method == "monte_carlo" and result.kl_per_dim is None
    # With the Monte Carlo KL from the same draws, the ELBO is the k = 1 bound exactly.
    assert result.elbo.mean == pytest.approx(result.bound(1).log_px.mean, rel=1e-12)


def test_protocols_side_by_side_and_json(float64):
    vae = make_model(D=4, L=2, seed=7)
    x = _data(vae, 12, 7)
    protocol = DataProtocol("synthetic", "test", "none", None)
    a = evaluate(vae, x, (1, 4), protocol=protocol)
    b = evaluate(vae, x, (1, 4), protocol=protocol, seed=1)
    table = side_by_side({"first": a, "second": b})
    assert "first" in table and "second" in table and "log p(x), k=4" in table and "synthetic test split" in table
    assert EvalResult.from_json(json.loads(json.dumps(a.to_json()))) == a
    for other in (
        evaluate(vae, x, (1, 5), protocol=protocol),
        evaluate(vae, x[:6], (1, 4), protocol=protocol),
        evaluate(vae, x, (1, 4), protocol=protocol._replace(binarize="dynamic", binarize_seed=0)),
    ):
        with pytest.raises(ProtocolMismatchError, match="refusing to compare"):
            side_by_side({"a": a, "b": other})
    with pytest.raises(ProtocolMismatchError, match="ks: \\(1, 4\\) vs \\(1, 5\\)"):
        side_by_side({"a": a, "b": evaluate(vae, x, (1, 5), protocol=protocol)})
    assert "active units" in a.table() and "binarize=none" in a.table()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"ks": ()}, ConfigError, "non-empty sequence of positive integers"),
        ({"ks": (1, 0)}, ConfigError, "^every entry of ks must be a positive integer, got 0$"),
        ({"ks": (1, 2.0)}, ConfigError, "^every entry of ks must be a positive integer, got 2.0$"),
        ({"ks": 5}, ConfigError, "must be a sequence"),
        (
            {"chunk_size": 0},
            ConfigError,
            r"^chunk_size \(particles × images per pass\) must be a positive integer, got 0$",
        ),
    ],
)
def test_bad_arguments(float64, kwargs, error, message):
    vae = make_model(D=4, L=2, seed=8)
    with pytest.raises(error, match=message):
        evaluate(vae, _data(vae, 3, 8), **kwargs)


def test_empty_data_is_refused(float64):
    vae = make_model(D=4, L=2, seed=8)
    with pytest.raises(DataError, match="N >= 1"):
        evaluate(vae, torch.zeros(0, 4))


def test_evaluate_elbo_keeps_working():
    torch.manual_seed(0)
    vae = VAE(20, latent_dim=2, hidden_dims=(16, 8))
    x = torch.bernoulli(torch.full((30, 20), 0.3))
    result = evaluate_elbo(vae, x, batch_size=7)
    assert result.num_images == 30 and math.isfinite(result.elbo.mean)
    assert result.elbo.mean == pytest.approx(result.reconstruction.mean - result.kl.mean)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    config = RunConfig(
        data=DataConfig(n_train=128, n_test=40),
        model=ModelConfig(latent_dim=2, hidden_dims=(16, 8)),
        train=TrainConfig(epochs=1, batch_size=64, progress=False, objective="iwae:3:dreg", kl_schedule="linear:4"),
    )
    data = load_dataset(config.data)
    torch.manual_seed(0)
    fit(VAE.from_config(config.model, data.input_dim), data, config, out_dir=out)
    return out


def test_cli_evaluate_prints_the_table_and_writes_json(tiny_run, capsys):
    code = cli.main(
        ["evaluate", str(tiny_run), "--k", "1,10", "--n", "20", "--gaps", "--gap-images", "5", "--gap-steps", "3"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "log p(x), k=10" in out and "NLL" in out and "amortisation gap" in out
    record = json.loads((tiny_run / "eval.json").read_text())
    assert record["num_images"] == 20 and record["ks"] == [1, 10] and record["binarize_seed"] == 0
    assert record["dataset"] == "embedded-fashion-mnist" and record["likelihood"] == "bernoulli"
    assert [b["k"] for b in record["log_likelihood"]] == [1, 10] and record["gaps"]["num_images"] == 5
    assert EvalResult.from_json(record).protocol.num_images == 20


def test_cli_evaluate_refuses_too_many_images(tiny_run, capsys):
    assert cli.main(["evaluate", str(tiny_run), "--n", "41"]) == 2
    assert "n=41 exceeds the run's 40 test images" in capsys.readouterr().err
