"""Figures of the generative side: prior samples, latent traversals and interpolations.

They use the VAE's public API only (``encode``, ``decode``, ``sample``, ``model``, ``latent_dim``). Codes come from the
model's own prior: :meth:`VAE.sample` for mean images, and the model's ``"z"`` site (a trace of ``vae.model`` with the
observation removed by ``poutine.uncondition``) for draws and for the prior's location and scale, so a learned prior
is drawn as it is, not as N(0, I).

The models with labels (:mod:`pyro_vae.labelled`) decode p(x | z, y): their samples are balanced over the classes or
all of one ``label``, :func:`class_grid` draws one row per class, and traversals and interpolations decode at the
image's class (:mod:`pyro_vae.plotting.conditioning`). Their p(z) is the prior module itself (no y in it), so their
codes and moments are drawn from it directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from matplotlib.figure import Figure
from pyro import poutine

from pyro_vae.config import check_float, check_int
from pyro_vae.errors import ConfigError
from pyro_vae.importance import own_rng
from pyro_vae.model import VAE, posterior_mean
from pyro_vae.plotting.conditioning import decode, encode, encoder_labels, image_labels, reads_labels
from pyro_vae.plotting.images import image_grid, image_rows
from pyro_vae.plotting.latent import most_active_dims

__all__ = [
    "MAX_CLASS_ROWS",
    "PRIOR_MOMENT_SAMPLES",
    "LabelledDraws",
    "class_grid",
    "interpolation",
    "labelled_samples",
    "latent_traversal",
    "sample_grid",
]

#: The most classes :func:`class_grid` draws a row for (a figure of more rows is unreadable): pass ``classes``.
MAX_CLASS_ROWS = 50

#: Draws that estimate a prior's mean and standard deviation when it has none in closed form (a mixture, a flow):
#: the standard error of the mean is σ/64, a 1.6 % shift of the traversal's span.
PRIOR_MOMENT_SAMPLES = 4096
#: Traversal rows drawn when ``dims`` is not given.
DEFAULT_TRAVERSAL_DIMS = 8


def _device(vae: VAE) -> torch.device:
    return next(vae.parameters()).device


def _generative_trace(vae: VAE, n: int, seed: int) -> poutine.Trace:
    """A trace of the model for ``n`` data points with ``x`` sampled, not observed: ``z ~ p(z)``, ``x ~ p(x | z)``,
    drawn from a stream seeded with ``seed`` (:func:`~pyro_vae.importance.own_rng`: the caller's stream is left as it
    was).
    """
    device = _device(vae)
    dim = vae.decode(torch.zeros(1, vae.latent_dim, device=device)).event_shape[-1]
    placeholder = torch.zeros(n, dim, device=device)  # sets the plate size; uncondition drops it as an observation
    with torch.no_grad(), own_rng(placeholder, seed):
        return poutine.trace(poutine.uncondition(vae.model)).get_trace(placeholder)


def _prior_moments(vae: VAE) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior's mean and standard deviation per latent dimension, ``(L,)`` each: in closed form where the
    distribution has them, from :data:`PRIOR_MOMENT_SAMPLES` draws otherwise."""
    if reads_labels(vae):
        prior = vae.prior(1, torch.zeros(1, vae.input_dim, device=_device(vae)))  # p(z): y does not enter it
    else:
        prior = _generative_trace(vae, 1, seed=0).nodes["z"]["fn"]  # batch_shape (1,), event_shape (L,)
    try:
        return prior.mean[0], prior.stddev[0]
    except NotImplementedError:
        with torch.no_grad(), own_rng(torch.zeros(0, device=_device(vae)), seed=0):
            draws = prior.sample((PRIOR_MOMENT_SAMPLES,))[:, 0]  # (S, L)
        return draws.mean(0), draws.std(0)


class LabelledDraws(NamedTuple):
    """What :func:`labelled_samples` drew: codes ``z`` ``(n, L)``, classes ``y`` ``(n,)``, images ``x`` ``(n, D)``."""

    z: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor


@torch.no_grad()
def labelled_samples(vae: VAE, n: int, seed: int = 0, draws: bool = False, label: int | None = None) -> LabelledDraws:
    """``n`` samples of a model with labels: codes z ~ p(z) from a generator seeded with ``seed``, classes ``label``
    (default balanced, image i of class i mod C), and the decoder means E[x | z, y] (exactly
    ``vae.sample(n, generator, label=label)``) or, with ``draws``, one draw x ~ p(x | z, y) each, from their own
    seeded stream (:func:`~pyro_vae.importance.own_rng`: the caller's stream is left as it was)."""
    ref = next(vae.decoder.parameters())
    z = vae.prior.sample_codes(n, ref, torch.Generator(device=ref.device).manual_seed(seed))  # (n, L)
    y = vae.sample_labels(n, label, ref)  # (n,): also refuses a label out of range
    if draws:
        with own_rng(z, seed):
            x = vae.decode(z, y).sample()
    else:
        x = vae.sample(n, generator=torch.Generator(device=ref.device).manual_seed(seed), label=label)  # same z
    return LabelledDraws(z, y, x)


def _label_title(vae: VAE, label: int | None, class_names: Sequence[str] | None) -> str:
    if label is None:
        return f", y balanced over the {vae.num_classes} classes"
    return f", y = {class_names[label] if class_names else label}"


@torch.no_grad()
def sample_grid(
    vae: VAE,
    image_shape: Sequence[int] | None = None,
    n: int = 64,
    seed: int = 0,
    draws: bool = False,
    label: int | None = None,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """``n`` images from the model's prior, with a title that says which kind.

    :param vae: the model.
    :param image_shape: see :func:`~pyro_vae.plotting.image_layout`.
    :param int n: number of images (default 64).
    :param int seed: seed of the prior draws.
    :param bool draws: ``False`` (default): the decoder means E[x | z] for z ~ p(z) (:meth:`VAE.sample`), smooth
        images; ``True``: draws x ~ p(x | z), which for a Bernoulli likelihood are binary and speckled.
    :param label: a model with labels: every image of class ``label``; default ``None``: balanced over the classes
        (image i of class i mod C). The VAE refuses it.
    :param class_names: the name of each class, for the title.
    """
    check_int("n", n, low=1)
    if reads_labels(vae):
        images = labelled_samples(vae, n, seed, draws, label).x
        title = ("draws x ~ p(x|z,y)" if draws else "decoder means E[x|z,y]") + ", z ~ p(z)"
        title += _label_title(vae, label, class_names)
    elif label is not None:
        raise ConfigError(f"label={label} chooses the class of a model with labels (cvae, m2); the VAE has none")
    elif draws:
        images = _generative_trace(vae, n, seed).nodes["x"]["value"]
        title = "draws x ~ p(x|z), z ~ p(z)"
    else:
        generator = torch.Generator(device=_device(vae)).manual_seed(seed)
        images = vae.sample(n, generator=generator)
        title = "decoder means E[x|z], z ~ p(z)"
    return image_grid(images, image_shape, ncols=int(math.ceil(math.sqrt(n))), title=title)


@torch.no_grad()
def class_grid(
    vae: VAE,
    n_per_class: int = 8,
    class_names: Sequence[str] | None = None,
    image_shape: Sequence[int] | None = None,
    seed: int = 0,
    classes: Sequence[int] | None = None,
) -> Figure:
    """One row per class of a model with labels: ``n_per_class`` decoder means E[x | z, y = k] for codes z ~ p(z).
    Every row decodes the same codes, so a column shows one z under each class (style held, class varied).

    :param vae: a :class:`~pyro_vae.labelled.CVAE` or :class:`~pyro_vae.labelled.SSVAE`.
    :param int n_per_class: images per row (default 8).
    :param class_names: the name of each class (``Dataset.class_names``), written left of its row; default the
        class numbers.
    :param image_shape: see :func:`~pyro_vae.plotting.image_layout`.
    :param int seed: seed of the codes (drawn from their own generator).
    :param classes: the classes to draw, one row each (default all, at most :data:`MAX_CLASS_ROWS`).
    :raises ConfigError: one line for the VAE (it has no classes), a class out of range, or too many rows.
    """
    if not reads_labels(vae):
        raise ConfigError("the class grid draws one row per class of a model with labels (--model cvae or m2)")
    check_int("n_per_class", n_per_class, low=1)
    count = vae.num_classes
    rows = list(range(count)) if classes is None else list(classes)
    rows = [check_int("every class", k, low=0, high=count - 1, why=f"the model has {count} classes") for k in rows]
    if not rows or len(rows) > MAX_CLASS_ROWS:
        raise ConfigError(
            f"the class grid draws 1 to {MAX_CLASS_ROWS} rows, one per class, and was asked for {len(rows)}; pass "
            "classes=[...] to choose them"
        )
    if class_names is not None and len(class_names) != count:
        raise ConfigError(f"class_names has {len(class_names)} names but the model has {count} classes")
    device = _device(vae)
    # a fresh generator per row: every row decodes the same codes (vae.sample draws z before y)
    images = [vae.sample(n_per_class, torch.Generator(device=device).manual_seed(seed), label=k) for k in rows]
    names = [class_names[k] if class_names is not None else f"y = {k}" for k in rows]
    return image_rows(images, names, image_shape, title="decoder means E[x | z, y]: one row per class, z ~ p(z) shared")


def _one_image(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() == 1:
        return x[None]
    if x.dim() != 2 or x.shape[0] < 1:
        raise ConfigError(f"{what} must be one image (D,) or images (B, D), got shape {tuple(x.shape)}")
    return x[:1]


@torch.no_grad()
def latent_traversal(
    vae: VAE,
    x: torch.Tensor,
    dims: Sequence[int] | None = None,
    span: float = 3.0,
    steps: int = 9,
    image_shape: Sequence[int] | None = None,
    labels: torch.Tensor | None = None,
) -> Figure:
    r"""Decode codes that vary one latent dimension at a time: row ``k`` sets :math:`z_{d_k}` to
    :math:`\mu_{d_k} + t\,\sigma_{d_k}` for ``steps`` values of :math:`t` evenly spaced in ``[-span, span]``, where
    :math:`\mu, \sigma` are the prior's mean and standard deviation (for the standard prior, :math:`z_d` itself runs
    over ``[-span, span]``), and keeps every other dimension at the posterior mean of ``x[0]``. Images are the
    decoder means E[x | z].

    :param vae: the model.
    :param x: the image to traverse, ``(D,)``, or images ``(B, D)``: ``x[0]`` is traversed and all ``B`` rank the
        dimensions by activity when ``dims`` is not given (as the model sees them: binarised where it was).
    :param dims: the dimensions to vary, one row each; default the 8 most active over ``x``
        (:func:`~pyro_vae.plotting.most_active_dims`; at most ``latent_dim``).
    :param float span: the range in prior standard deviations (default 3).
    :param int steps: images per row (default 9).
    :param image_shape: see :func:`~pyro_vae.plotting.image_layout`.
    :param labels: the labels of ``x``, ``(B,)`` (``(1,)`` for one image): a CVAE encodes and decodes at them (it
        needs them); M2 at its classifier's class of ``x[0]``; the VAE ignores them.
    """
    check_float("span", span, low=0.0, open_low=True)
    check_int("steps", steps, low=2)
    if dims is None:
        if x.dim() != 2 or x.shape[0] < 2:
            raise ConfigError(
                "latent_traversal ranks dimensions by activity over the images x, and needs at least 2 of them; "
                "pass more images or dims=[...]"
            )
        dims = most_active_dims(vae, x, labels).dims[:DEFAULT_TRAVERSAL_DIMS]
    dims = [check_int("dims[i]", d, low=0, high=vae.latent_dim - 1) for d in dims]
    if not dims:
        raise ConfigError("latent_traversal needs at least one dimension in dims")
    first = _one_image(x, "x").to(_device(vae))
    y = image_labels(vae, first, None if labels is None else labels.reshape(-1)[:1], "latent_traversal")  # (1,)
    centre = posterior_mean(encode(vae, first, y))[0]  # (L,)
    loc, scale = _prior_moments(vae)
    t = torch.linspace(-span, span, steps, device=centre.device, dtype=centre.dtype)  # (steps,)
    rows = []
    for d in dims:
        z = centre.expand(steps, -1).clone()  # (steps, L)
        z[:, d] = loc[d] + t * scale[d]
        rows.append(decode(vae, z, None if y is None else y.expand(steps)).mean)  # (steps, D)
    at = "" if y is None else f", y = {int(y[0])}"
    return image_rows(
        rows,
        [f"z[{d}]" for d in dims],
        image_shape,
        title=f"latent traversal: each row varies one z[d] over ±{span:g} prior SD\n(the others stay at E[z|x]{at})",
        column_labels=[f"{v:+.2g}σ" for v in t.tolist()],
    )


def _path(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, spherical: bool) -> torch.Tensor:
    """Codes ``(steps, L)`` from ``a`` to ``b`` at fractions ``t`` ``(steps,)``: linear, or along the great circle
    (slerp, Shoemake 1985), which is linear where ``a`` and ``b`` are parallel."""
    t = t[:, None]
    if spherical:
        cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=torch.finfo(a.dtype).tiny)
        omega = torch.arccos(cos.clamp(-1.0, 1.0))
        if omega > 1e-4:  # below, sin(tΩ)/sin(Ω) → t to within Ω² = 1e-8: the linear path
            return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    return (1 - t) * a + t * b


@torch.no_grad()
def interpolation(
    vae: VAE,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    steps: int = 10,
    image_shape: Sequence[int] | None = None,
    spherical: bool = False,
    label: int | None = None,
) -> Figure:
    r"""Decode the path between two images' posterior means :math:`m_a, m_b`: the top row shows ``x_a`` and ``x_b``
    at its ends, the bottom row the decoder means E[x | z(t)] for ``steps`` values of t evenly spaced in [0, 1].

    The path is linear, :math:`z(t) = (1 - t)\,m_a + t\,m_b`, by default. ``spherical=True`` follows the great
    circle instead (slerp: :math:`z(t) = [\sin((1-t)\Omega)\,m_a + \sin(t\Omega)\,m_b] / \sin\Omega`, with
    :math:`\Omega` the angle between them), which keeps the norm of z in the shell where a standard normal prior puts
    its mass rather than cutting through the low-norm centre.

    :param vae: the model.
    :param x_a: the start image ``(D,)`` or ``(1, D)``.
    :param x_b: the end image ``(D,)`` or ``(1, D)``.
    :param int steps: decoded images on the path, both ends included (default 10).
    :param image_shape: see :func:`~pyro_vae.plotting.image_layout`.
    :param bool spherical: slerp instead of the straight line.
    :param label: a model with labels: the class both images are encoded and the path decoded at, so the path
        varies z within one class (a CVAE needs it; M2 defaults to its classifier's class of ``x_a``).
    """
    check_int("steps", steps, low=2)
    device = _device(vae)
    pair = torch.cat([_one_image(x_a, "x_a"), _one_image(x_b, "x_b")]).to(device)  # (2, D)
    y = _path_label(vae, pair, label)  # (1,) or None
    means = posterior_mean(encode(vae, pair, None if y is None else y.expand(2)))  # (2, L)
    t = torch.linspace(0.0, 1.0, steps, device=device, dtype=means.dtype)
    path = _path(means[0], means[1], t, spherical)
    decoded = decode(vae, path, None if y is None else y.expand(steps)).mean  # (steps, D)
    ends = torch.ones_like(decoded)  # white between the two inputs
    ends[0], ends[-1] = pair[0], pair[1]
    kind = "spherical (slerp)" if spherical else "linear"
    return image_rows(
        [ends, decoded],
        ["inputs a, b", "E[x|z(t)]"],
        image_shape,
        title=f"{kind} interpolation between\nthe posterior means of a and b"
        + ("" if y is None else f", y = {int(y)}"),
        column_labels=[f"t={v:.2g}" for v in t.tolist()],
    )


def _path_label(vae: VAE, pair: torch.Tensor, label: int | None) -> torch.Tensor | None:
    """The class ``(1,)`` an interpolation runs at: ``None`` for the VAE (which refuses a label)."""
    if not reads_labels(vae):
        if label is not None:
            raise ConfigError(f"label={label} chooses the class of a model with labels (cvae, m2); the VAE has none")
        return None
    if label is None:
        encoder_labels(vae, None, "interpolation without label=")  # the CVAE: one line
        return vae.default_labels(pair[:1])
    check_int("label", label, low=0, high=vae.num_classes - 1, why=f"the model has {vae.num_classes} classes")
    return torch.full((1,), label, dtype=torch.long, device=pair.device)
