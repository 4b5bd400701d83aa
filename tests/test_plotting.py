"""Figures: each test reads back what a figure drew (image arrays, scatter offsets, legend texts, decoded codes) and
checks it against what it should show, computed another way."""

import math
from types import SimpleNamespace

import matplotlib.colors
import numpy as np
import pyro.distributions as dist
import pytest
import torch

from pyro_vae import VAE
from pyro_vae.data import binarize_eval
from pyro_vae.data.classes import FASHION_MNIST_CLASSES
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.plotting import (
    comparison_figure,
    image_grid,
    image_layout,
    interpolation,
    latent_posteriors,
    latent_scatter,
    latent_traversal,
    most_active_dims,
    reconstruction_grid,
    sample_grid,
)

L = 8
SHAPE = (6, 7)  # a legacy grey (H, W): D = 42
D = math.prod(SHAPE)


def cells(ax, h: int, w: int, n: int) -> np.ndarray:
    """The ``n`` pictures of one row drawn by ``image_rows`` / ``image_grid`` (one white pixel between them)."""
    canvas = np.asarray(ax.images[0].get_array())
    return np.stack([canvas[:h, c * (w + 1) : c * (w + 1) + w] for c in range(n)])


def controlled_vae(weights: dict[int, float]) -> VAE:
    """A tiny VAE whose posterior mean is ``loc_d = weights[d] * (x[:, 0] - 0.5)`` for the dimensions in ``weights``
    and 0 for the others: only those dimensions are active, with variance ``weights[d]**2 * Var(x[:, 0])``."""
    vae = VAE(D, latent_dim=L, hidden_dims=(8,))
    scale = torch.zeros(L)
    for d, w in weights.items():
        scale[d] = w

    def encode(x):
        loc = (x[:, :1] - 0.5) * scale  # (B, L)
        return dist.Normal(loc, 0.1 * torch.ones_like(loc)).to_event(1)

    vae.encode = encode
    return vae


def test_image_layout_reads_channel_first_and_legacy_shapes():
    assert image_layout((28, 28), 784) == (1, 28, 28)
    assert image_layout((3, 32, 32), 3072) == (3, 32, 32)
    assert image_layout(None, 784) == (1, 28, 28)
    assert image_layout(None, 10) == (1, 1, 10)
    for bad in ((32, 32, 3), (2, 4, 4), (5, 5)):
        with pytest.raises(DataError, match="image_shape"):
            image_layout(bad, math.prod(bad) if bad != (5, 5) else 24)


def test_colour_images_are_drawn_as_rgb_in_channel_first_order():
    c, h, w = 3, 4, 5
    x = torch.rand(2, c * h * w)
    canvas = np.asarray(image_grid(x, (c, h, w), ncols=2).axes[0].images[0].get_array())
    assert canvas.shape == (h, 2 * w + 1, 3)
    for i in range(2):
        expected = x[i].reshape(c, h, w).permute(1, 2, 0).numpy()  # channel-first rows → (H, W, C)
        np.testing.assert_array_equal(canvas[:, i * (w + 1) : i * (w + 1) + w], expected)
    grey = image_grid(torch.rand(2, h * w), (h, w)).axes[0].images[0]
    assert grey.get_array().ndim == 2 and grey.get_cmap().name == "gray"


def test_latent_plot_uses_the_two_most_active_dimensions():
    vae = controlled_vae({3: 1.0, 7: 2.0})
    x = torch.rand(50, D)
    ranked = most_active_dims(vae, x)
    assert ranked.dims[:2] == (7, 3)
    # activity is the unbiased variance over images of the posterior mean: here weights² · Var(x[:, 0])
    var = torch.var(x[:, 0], unbiased=True)
    torch.testing.assert_close(ranked.activity[[7, 3]], torch.stack([4 * var, var]))
    assert ranked.activity[[0, 1, 2, 4, 5, 6]].abs().max() == 0
    ax = latent_scatter(vae, x).axes[0]
    assert ax.get_xlabel().startswith("z[7] (most active")
    assert ax.get_ylabel().startswith("z[3] (2nd most active")
    expected = ((x[:, :1] - 0.5) * torch.tensor([2.0, 1.0])).numpy()  # (x0 - 1/2)·w for dims 7 and 3
    np.testing.assert_allclose(ax.collections[0].get_offsets(), expected, rtol=1e-6)


def test_latent_plot_legend_names_the_classes_present_in_their_colours():
    vae = controlled_vae({0: 1.0, 1: 1.0})
    x = torch.rand(6, D)
    labels = torch.tensor([7, 0, 9, 7, 0, 9])
    ax = latent_scatter(vae, x, labels, class_names=FASHION_MNIST_CLASSES).axes[0]
    (legend,) = ax.figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["T-shirt/top", "Sneaker", "Ankle boot"]
    point_colours = ax.collections[0].get_facecolors()
    for handle, k in zip(legend.legend_handles, (0, 7, 9), strict=True):
        first = int(np.flatnonzero(labels.numpy() == k)[0])
        np.testing.assert_allclose(matplotlib.colors.to_rgb(handle.get_color()), point_colours[first][:3])
    (unnamed,) = latent_scatter(vae, x, labels).legends
    assert [t.get_text() for t in unnamed.get_texts()] == ["0", "7", "9"]


def test_reconstruction_rows_show_original_binarised_input_and_reconstruction():
    torch.manual_seed(0)
    vae = VAE(D, latent_dim=2, hidden_dims=(8,))
    x = torch.rand(5, D)
    seen = binarize_eval(x, "dynamic", seed=3)
    fig = reconstruction_grid(vae, x, SHAPE, n=4, model_input=seen)
    assert [ax.get_ylabel() for ax in fig.axes] == ["original", "model input (binarised)", "reconstruction (mean)"]
    rows = [cells(ax, *SHAPE, 4) for ax in fig.axes]
    np.testing.assert_array_equal(rows[0], x[:4].reshape(4, *SHAPE).numpy())
    np.testing.assert_array_equal(rows[1], seen[:4].reshape(4, *SHAPE).numpy())
    assert set(np.unique(rows[1])) <= {0.0, 1.0}
    np.testing.assert_array_equal(rows[2], vae.reconstruct(seen[:4]).reshape(4, *SHAPE).numpy())
    two = reconstruction_grid(vae, x, SHAPE, n=4)
    assert [ax.get_ylabel() for ax in two.axes] == ["original", "reconstruction (mean)"]


def test_sample_titles_say_means_or_draws_and_draws_come_from_the_likelihood():
    torch.manual_seed(0)
    vae = VAE(D, latent_dim=2, hidden_dims=(8,))
    state = torch.get_rng_state()
    means = sample_grid(vae, SHAPE, n=4, seed=5)
    assert means.axes[0].get_title() == "decoder means E[x|z], z ~ p(z)"
    expected = vae.sample(4, generator=torch.Generator().manual_seed(5)).reshape(4, *SHAPE).numpy()
    np.testing.assert_array_equal(cells(means.axes[0], *SHAPE, 2), expected[:2])  # ncols = ceil(sqrt(4)) = 2
    draws = sample_grid(vae, SHAPE, n=4, seed=5, draws=True)
    assert draws.axes[0].get_title() == "draws x ~ p(x|z), z ~ p(z)"
    drawn = cells(draws.axes[0], *SHAPE, 2)
    assert set(np.unique(drawn)) == {0.0, 1.0}  # Bernoulli draws
    again = cells(sample_grid(vae, SHAPE, n=4, seed=5, draws=True).axes[0], *SHAPE, 2)
    np.testing.assert_array_equal(drawn, again)
    assert torch.equal(torch.get_rng_state(), state)  # the figures draw from their own seeded streams


def test_traversal_row_k_varies_only_dimension_k_over_the_prior_span():
    vae = controlled_vae({3: 1.0, 7: 2.0, 5: 0.5})
    decoded = []
    decode = vae.decode
    vae.decode = lambda z: decoded.append(z.clone()) or decode(z)
    x = torch.rand(40, D)
    fig = latent_traversal(vae, x, span=2.0, steps=5, image_shape=SHAPE)
    assert [ax.get_ylabel() for ax in fig.axes] == ["z[7]", "z[3]", "z[5]", *[f"z[{d}]" for d in (0, 1, 2, 4, 6)]]
    rows = [z for z in decoded if z.shape == (5, L)]
    assert len(rows) == L
    centre = (x[0, :1] - 0.5) * torch.tensor([0, 0, 0, 1.0, 0, 0.5, 0, 2.0])  # the posterior mean of x[0]
    for ax, z, d in zip(fig.axes, rows, (7, 3, 5, 0, 1, 2, 4, 6), strict=True):
        others = [j for j in range(L) if j != d]
        torch.testing.assert_close(z[:, others], centre[others].expand(5, -1), rtol=0, atol=0)
        torch.testing.assert_close(z[:, d], torch.linspace(-2.0, 2.0, 5))  # standard prior: μ = 0, σ = 1
        np.testing.assert_array_equal(cells(ax, *SHAPE, 5), decode(z).mean.detach().reshape(5, *SHAPE).numpy())
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == ["-2σ", "-1σ", "+0σ", "+1σ", "+2σ"]
    decoded.clear()
    latent_traversal(vae, x[0], dims=[5], steps=3)
    assert len([z for z in decoded if z.shape == (3, L)]) == 1
    with pytest.raises(ConfigError, match="at least 2"):
        latent_traversal(vae, x[0])


def test_interpolation_ends_at_the_decoded_posterior_means():
    torch.manual_seed(0)
    vae = VAE(D, latent_dim=3, hidden_dims=(8,))
    x = torch.rand(2, D).bernoulli()
    for spherical in (False, True):
        fig = interpolation(vae, x[0], x[1], steps=4, image_shape=SHAPE, spherical=spherical)
        row = cells(fig.axes[1], *SHAPE, 4)
        means = vae.encode(x).mean  # (2, L)
        for end, image in ((0, row[0]), (1, row[-1])):
            np.testing.assert_allclose(image, vae.decode(means[end]).mean.detach().reshape(SHAPE).numpy(), atol=1e-6)
        inputs = cells(fig.axes[0], *SHAPE, 4)
        np.testing.assert_array_equal(inputs[[0, -1]], x.reshape(2, *SHAPE).numpy())


def test_spherical_path_follows_the_great_circle():
    from pyro_vae.plotting.generative import _path

    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    t = torch.tensor([0.0, 1 / 3, 0.5, 1.0])
    angle = t * math.pi / 2  # a quarter turn between orthogonal a and b of equal norm 2
    torch.testing.assert_close(_path(a, b, t, spherical=True), 2 * torch.stack([angle.cos(), angle.sin()], 1))
    torch.testing.assert_close(_path(a, b, t, spherical=False), torch.outer(1 - t, a) + torch.outer(t, b))


def test_kde_is_scipy_gaussian_kde_up_to_a_constant():
    from scipy.stats import gaussian_kde

    from pyro_vae.plotting.latent import _kde

    rng = np.random.default_rng(0)
    samples = rng.normal(size=(200, 2)) @ np.array([[1.0, 0.6], [0.0, 0.5]])
    points = rng.normal(size=(30, 2))
    ratio = _kde(samples, points) / gaussian_kde(samples.T)(points.T)
    # _kde adds a jitter of 1e-9·tr(Σ) to the kernel covariance Σ (for degenerate clouds). It changes each exponent
    # m/2 (m: Mahalanobis distance²) by about (m/2)·1e-9·tr(Σ)/λ_min(Σ); here tr/λ_min ≈ 9 and m stays below ~200,
    # a relative change below 1e-6, so rtol=1e-5 holds while any other kernel or bandwidth is off by far more.
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)


def test_flow_posteriors_are_drawn_as_regions_with_a_legend():
    from matplotlib.contour import ContourSet

    torch.manual_seed(0)
    flow = VAE(D, latent_dim=3, hidden_dims=(8,), guide="iaf")
    x = torch.rand(3, D).bernoulli()
    ax = latent_posteriors(flow, x, torch.tensor([0, 1, 2]), n_samples=60, class_names=FASHION_MNIST_CLASSES).axes[0]
    assert len([c for c in ax.collections if isinstance(c, ContourSet)]) == 3  # one region per posterior
    names, markers = ax.figure.legends
    assert [t.get_text() for t in names.get_texts()] == ["T-shirt/top", "Trouser", "Pullover"]
    texts = [t.get_text() for t in markers.get_texts()]
    assert texts == ["posterior mean E[z|x]", "86% region (KDE of 60 draws)"]  # 1 - exp(-2) = 0.865


def test_comparison_figure_has_a_legend_entry_for_the_seed_dots():
    runs = [SimpleNamespace(guide=g, test_elbo=SimpleNamespace(mean=-100.0 - s)) for g in ("a", "b") for s in (0, 1)]
    rows = [
        SimpleNamespace(
            guide=g,
            test_elbo=SimpleNamespace(mean=-100.5, se=0.5),
            seconds_per_epoch=1.0,
            time_ratio=1.0,
            peak_memory_mib=None,
            nll=None,
        )
        for g in ("a", "b")
    ]
    fig = comparison_figure(SimpleNamespace(rows=rows, runs=runs, nll_k=None))
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert sorted(texts) == ["test ELBO, each seed", "test ELBO, mean ± SE"]  # one entry for all the seed dots
