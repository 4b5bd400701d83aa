r"""Held-out evaluation from Pyro traces: the ELBO and its parts, importance-sampled log-likelihoods with standard
errors, active units and KL per dimension, all tagged with the protocol that produced them.

:func:`evaluate` draws :math:`K = \max(ks)` particles :math:`z_{ki} \sim q(z \mid x_i)` per image in a vectorised
particle plate (see :mod:`pyro_vae.importance`), replays the model on them and forms the log importance weights
:math:`\log w_{ki} = \log p(x_i \mid z_{ki}) + \log p(z_{ki}) - \log q(z_{ki} \mid x_i)`. From them:

* the **importance-weighted bound** at every k in ``ks`` (Burda et al. 2016),
  :math:`\hat{\mathcal{L}}_k(x_i) = \frac{1}{G} \sum_{g=1}^{G} \log \frac{1}{k} \sum_{k' \in \text{group } g}
  w_{k'i}`, averaged over the :math:`G = \lfloor K / k \rfloor` disjoint groups of k particles, so that smaller k
  reuse the same draws at no extra cost (k = 1 gives the K-sample Monte Carlo ELBO). It is a stochastic lower
  bound, :math:`\mathbb{E}[\hat{\mathcal{L}}_k] \le \log p(x_i)`, non-decreasing in k; :math:`-\hat{\mathcal{L}}_K`
  is the reported NLL. Bits per dimension follow :func:`bits_rule`: :math:`-\hat{\mathcal{L}}_k / (D \ln 2)` for a
  discrete likelihood, :math:`(-\hat{\mathcal{L}}_k + D \ln 256) / (D \ln 2)` for a density on 8-bit data (the
  dequantisation offset, :func:`pyro_vae.protocol.bits_per_dim`), none for a density on other data;
* the **test ELBO** = reconstruction − KL, with reconstruction :math:`\frac{1}{K}\sum_k \log p(x_i \mid z_{ki})`
  and the KL analytic where the guide and prior have one (Gaussian families: ``kl_method="analytic"``), else its
  K-sample Monte Carlo estimate;
* **active units** (Burda et al. 2016): dimension d is active when
  :math:`A_d = \operatorname{Cov}_x(\mathbb{E}_{q(z \mid x)}[z_d]) > 0.01`. The count depends on the basis of the
  latent space: a rotation of z leaves the model's likelihood unchanged but mixes the per-coordinate variances, so
  one used direction spread over 16 coordinates counts as 16 units. The **active directions**, the eigenvalues of
  the covariance matrix :math:`\operatorname{Cov}_x(\mathbb{E}_q[z])` above the same threshold, do not depend on the
  basis and equal the active units when the covariance is diagonal (see :func:`active_directions`);
* **KL per latent dimension**, :math:`\frac{1}{N}\sum_i \mathrm{KL}(q(z_d \mid x_i) \,\|\, p(z_d))` between the
  Normal marginals (``None`` for families without Normal marginals, such as flows). For a guide with correlated
  dimensions the per-dimension values do not sum to the joint KL.

Every number is a mean over images ± its standard error (sample standard deviation / √n), so the error bar covers
the finite test set and the Monte Carlo noise together. Work proceeds under ``torch.no_grad()`` in chunks of at most
``chunk_size`` particles × images per forward pass, so memory is bounded by the chunk size, not by K × N. Evaluation
draws from its own seeded RNG stream (:func:`torch.random.fork_rng`), so it is reproducible and never perturbs the
training noise.

A :class:`Protocol` (data set, split, binarisation and its seed, likelihood, ks, number of images) travels with
every :class:`EvalResult`; :func:`side_by_side` refuses to put results with different protocols in one table.

:func:`evaluate_elbo` is the cheap single-sample ELBO that training logs after each epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from torch.distributions import kl_divergence

from pyro_vae.config import check_int
from pyro_vae.data import data_kind
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.importance import log_mean_exp, log_weights, own_rng, particle_traces
from pyro_vae.model import VAE, posterior_mean
from pyro_vae.networks import eval_mode
from pyro_vae.protocol import (
    DataProtocol,
    EvalResult,
    IWBound,
    Protocol,
    ProtocolMismatchError,
    bits_per_dim,
    check_same_protocol,
    side_by_side,
)
from pyro_vae.stats import MeanSE, mean_se

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ACTIVE_UNIT_THRESHOLD",
    "DataProtocol",
    "ELBOResult",
    "EvalResult",
    "IWBound",
    "MeanSE",
    "Protocol",
    "ProtocolMismatchError",
    "bits_rule",
    "active_directions",
    "active_units",
    "check_same_protocol",
    "elbo_terms",
    "evaluate",
    "evaluate_elbo",
    "latent_activity",
    "side_by_side",
]

#: Particles × images per forward pass. With the seed decoder (widths up to 784) a pass of 4096 rows peaks at about
#: 80 MiB above the resting process (benchmarks/eval_speed.py); on a CPU, passes of 16 384 and 65 536 rows ran 15 %
#: and 22 % slower (K = 1000, 64 images), as they no longer fit the caches.
DEFAULT_CHUNK_SIZE = 1 << 12
#: Burda et al.'s threshold on Cov_x(E_q[z_d]) for an active unit.
ACTIVE_UNIT_THRESHOLD = 0.01


def latent_activity(means: torch.Tensor) -> torch.Tensor:
    r"""Activity of each latent dimension, :math:`A_d = \operatorname{Var}_x(\mathbb{E}_q[z_d])`, the unbiased
    variance over images of the posterior means (Burda et al. 2016); a unit is active when :math:`A_d >`
    :data:`ACTIVE_UNIT_THRESHOLD`.

    :param means: posterior means ``(N, L)``.
    :returns: ``(L,)``; zeros for a single image, whose variance is undefined.
    """
    if means.shape[0] < 2:
        return means.new_zeros(means.shape[-1])
    return means.var(0, unbiased=True)


def _check_means(means: torch.Tensor) -> None:
    if means.dim() != 2:
        raise DataError(f"posterior means must have shape (N, L), got {tuple(means.shape)}")


def active_units(means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    r"""Burda et al.'s (2016) active units: the coordinates d with
    :math:`\operatorname{Var}_x(\mathbb{E}_q[z_d]) >` ``threshold``, from the posterior means of N data points.

    The count depends on the basis of the latent space; :func:`active_directions` is its rotation-invariant form.

    :param means: ``(N, L)`` posterior means :math:`\mathbb{E}_{q(z \mid x_i)}[z]`.
    :param float threshold: default 0.01.
    :returns: a count in ``0..L`` (0 when N < 2: one point has no spread).
    """
    _check_means(means)
    return int((latent_activity(means) > threshold).sum())


def active_directions(means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    r"""The basis-free count of active latent dimensions: the eigenvalues of the ``(L, L)`` covariance
    :math:`C = \operatorname{Cov}_x(\mathbb{E}_q[z])` of the posterior means that exceed ``threshold``.

    A rotation :math:`z \mapsto R z` of the latent space (which a model with an N(0, I) prior cannot tell apart)
    maps :math:`C` to :math:`R C R^\top`, which has the same eigenvalues, so this count does not change, while the
    per-coordinate variances of :func:`active_units` (the diagonal of :math:`C`) do: variance 1 along one direction
    that is spread evenly over 16 coordinates gives each coordinate 1/16, 16 active units and 1 active direction.
    When :math:`C` is diagonal the two counts agree.

    :param means: ``(N, L)`` posterior means.
    :param float threshold: default 0.01, Burda et al.'s threshold for a unit.
    :returns: a count in ``0..L`` (0 when N < 2).
    """
    _check_means(means)
    if means.shape[0] < 2:
        return 0
    centred = means.double() - means.double().mean(0)
    covariance = centred.T @ centred / (means.shape[0] - 1)  # (L, L), unbiased like active_units
    return int((torch.linalg.eigvalsh(covariance) > threshold).sum())


class ELBOResult(NamedTuple):
    """Per-image ELBO on a data set (nats per image), with its parts."""

    elbo: MeanSE
    reconstruction: MeanSE
    kl: MeanSE
    num_images: int


def elbo_terms(vae: VAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-sample ``(log p(x | z), log q(z | x) - log p(z))`` per image, each ``(B,)``, from Pyro traces."""
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    z_q = guide_trace.nodes["z"]
    z_p = model_trace.nodes["z"]
    x_site = model_trace.nodes["x"]
    reconstruction = x_site["fn"].log_prob(x_site["value"])  # (B,)
    kl = z_q["fn"].log_prob(z_q["value"]) - z_p["fn"].log_prob(z_p["value"])  # (B,)
    return reconstruction, kl


@torch.no_grad()
def evaluate_elbo(vae: VAE, x: torch.Tensor, *, batch_size: int = 1000, seed: int = 0) -> ELBOResult:
    """The single-sample ELBO of every image in ``x`` (already binarised as the likelihood needs), in chunks.

    :param vae: the trained model.
    :param x: data ``(N, D)`` on the model's device.
    :param int batch_size: images per chunk (bounds memory).
    :param int seed: seed of the guide's noise for this evaluation.
    """
    if x.shape[0] == 0:
        raise ValueError("cannot evaluate on an empty data set")
    recs, kls = [], []
    with eval_mode(vae), own_rng(x, seed):
        for start in range(0, x.shape[0], batch_size):
            rec, kl = elbo_terms(vae, x[start : start + batch_size])
            recs.append(rec)
            kls.append(kl)
    rec, kl = torch.cat(recs), torch.cat(kls)
    return ELBOResult(mean_se(rec - kl), mean_se(rec), mean_se(kl), x.shape[0])


# ------------------------------------------------------------------------------------------------------------------
# The evaluator
def _as_mvn(d) -> dist.MultivariateNormal | None:
    # Pyro registers no KL between a MultivariateNormal guide and an Independent(Normal) prior; both are Gaussians,
    # and torch's MultivariateNormal pair has one.
    if isinstance(d, dist.MultivariateNormal):
        return d
    if isinstance(d, dist.Independent) and d.reinterpreted_batch_ndims == 1 and isinstance(d.base_dist, dist.Normal):
        return dist.MultivariateNormal(d.base_dist.loc, scale_tril=torch.diag_embed(d.base_dist.scale))
    return None


def _normal_marginals(d) -> dist.Normal | None:
    if isinstance(d, dist.Independent) and d.reinterpreted_batch_ndims == 1 and isinstance(d.base_dist, dist.Normal):
        return d.base_dist
    if isinstance(d, dist.MultivariateNormal):
        return dist.Normal(d.loc, d.variance.sqrt())
    return None


def _analytic_kl(q, p) -> torch.Tensor | None:
    q_mvn, p_mvn = _as_mvn(q), _as_mvn(p)
    if q_mvn is not None and p_mvn is not None:
        return kl_divergence(q_mvn, p_mvn)
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


def _check_ks(ks) -> tuple[int, ...]:
    try:
        values = tuple(ks)
    except TypeError:
        raise ConfigError(f"ks must be a sequence of positive integers such as (1, 100, 1000), got {ks!r}") from None
    if not values:
        raise ConfigError(f"ks must be a non-empty sequence of positive integers such as (1, 100, 1000), got {ks!r}")
    for k in values:
        check_int("every entry of ks", k, low=1)
    return tuple(sorted(set(values)))


class _Accumulator:
    """Per-image values of one chunk after another, kept in float64 on the CPU."""

    def __init__(self):
        self.values: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        self.values.setdefault(name, []).append(value.detach().double().cpu())

    def drop(self, name: str) -> None:
        self.values.pop(name, None)

    def has(self, name: str) -> bool:
        return name in self.values

    def get(self, name: str) -> torch.Tensor:
        return torch.cat(self.values[name])


def _add_single_particle_terms(acc: _Accumulator, vae, xb: torch.Tensor, latent_site: str, first: bool) -> None:
    """From one unexpanded particle: the posterior means, the analytic KL and the KL of the Normal marginals.

    Every image gets the same KL method: once a chunk has no analytic KL (or no Normal marginals), the values
    collected so far are dropped and the Monte Carlo estimate is used from then on.
    """
    model_trace, guide_trace = particle_traces(vae.model, vae.guide, 1, (xb,))
    q = guide_trace.nodes[latent_site]["fn"]
    p = model_trace.nodes[latent_site]["fn"]
    acc.add("mean", posterior_mean(q))
    kl = _analytic_kl(q, p) if first or acc.has("kl_analytic") else None
    if kl is not None:
        acc.add("kl_analytic", kl)
    else:
        acc.drop("kl_analytic")
    q_marg, p_marg = _normal_marginals(q), _normal_marginals(p)
    if q_marg is not None and p_marg is not None and (first or acc.has("kl_dims")):
        acc.add("kl_dims", kl_divergence(q_marg, p_marg))  # (B, L)
    else:
        acc.drop("kl_dims")


def _add_particle_terms(acc: _Accumulator, vae, xb: torch.Tensor, ks, particles_per_pass: int) -> None:
    """K = max(ks) particles per image in passes of at most ``particles_per_pass``: the K-sample reconstruction and
    Monte Carlo KL, and the importance-weighted bound at every k from disjoint groups of the same draws."""
    num_particles = ks[-1]
    log_w, log_lik, kl_mc = [], 0.0, 0.0
    for first in range(0, num_particles, particles_per_pass):
        count = min(particles_per_pass, num_particles - first)
        terms = log_weights(*particle_traces(vae.model, vae.guide, count, (xb,)), count)
        log_w.append(terms.log_weight)  # (count, B)
        log_lik = log_lik + terms.log_likelihood.sum(0)
        kl_mc = kl_mc + (terms.log_guide - terms.log_prior).sum(0)
    log_w = torch.cat(log_w)  # (K, B)
    acc.add("reconstruction", log_lik / num_particles)
    acc.add("kl_mc", kl_mc / num_particles)
    for k in ks:
        groups = num_particles // k
        grouped = log_w[: groups * k].reshape(groups, k, -1)  # (G, k, B)
        acc.add(f"iw{k}", log_mean_exp(grouped, 1).mean(0))


def _evaluate_chunks(
    vae, x, ks, images_per_chunk: int, particles_per_pass: int, latent_site: str, progress=None
) -> _Accumulator:
    """Run the model and guide over ``x`` chunk by chunk and collect the per-image values :func:`evaluate` needs;
    ``progress(images)`` is called after each chunk."""
    acc = _Accumulator()
    validate = is_validation_enabled()
    for chunk, start in enumerate(range(0, x.shape[0], images_per_chunk)):
        # Pyro's checks run on the first chunk (they catch wrong supports); later chunks skip their cost.
        with pyro.validation_enabled(validate and chunk == 0):
            xb = x[start : start + images_per_chunk]  # (B, D)
            _add_single_particle_terms(acc, vae, xb, latent_site, chunk == 0)
            _add_particle_terms(acc, vae, xb, ks, particles_per_pass)
        if progress is not None:
            progress(xb.shape[0])
    return acc


def bits_rule(likelihood, x: torch.Tensor) -> str:
    """How bits per dimension are reported for ``likelihood`` on the evaluated images ``x`` (a key of
    :data:`pyro_vae.protocol.BITS_RULES`, formulas in :func:`pyro_vae.protocol.bits_per_dim`): ``"discrete"`` for a
    probability mass function, ``"dequantized"`` for a density on 8-bit data (the offset log 256 per dimension
    included), ``"off_grid"`` for a density on any other data (binary ones too: no bits/dim), ``"unnormalized"``
    for a likelihood that fits itself to each image.

    :param likelihood: a :class:`~pyro_vae.likelihoods.Likelihood` (``discrete`` and ``normalized`` are read).
    :param x: the evaluated images ``(N, D)``, binarised as the model saw them.
    """
    if not likelihood.normalized:
        return "unnormalized"
    if likelihood.discrete:
        return "discrete"
    return "dequantized" if data_kind(x) == "8bit" else "off_grid"


def check_evaluate_args(ks, chunk_size, x: torch.Tensor) -> tuple[int, ...]:
    ks = _check_ks(ks)
    check_int("chunk_size (particles × images per pass)", chunk_size, low=1)
    if x.dim() != 2 or x.shape[0] == 0:
        raise DataError(f"evaluate needs images of shape (N, D) with N >= 1, got {tuple(x.shape)}")
    return ks


@torch.no_grad()
def evaluate(
    vae: VAE,
    x: torch.Tensor,
    ks: Sequence[int] = (1, 100, 1000),
    *,
    protocol: DataProtocol | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    seed: int = 0,
    latent_site: str = "z",
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Evaluate a trained model on the images ``x`` (see the module docstring for every quantity).

    :param vae: a :class:`~pyro_vae.model.VAE` (or any model with ``model``, ``guide`` and ``likelihood.name``).
    :param x: ``(N, D)`` images on the model's device, binarised as the likelihood needs.
    :param ks: particle counts of the importance-weighted bounds, default ``(1, 100, 1000)``; the largest is drawn
        once per image and the smaller ones reuse its draws in disjoint groups.
    :param protocol: how ``x`` was made (data set, split, binarisation and its seed); recorded in the result.
        :meth:`DataProtocol.from_config` builds it for a split binarised by :func:`pyro_vae.data.binarize_eval`.
    :param int chunk_size: particles × images per forward pass (default 4096); bounds the memory.
    :param int seed: seed of the evaluation noise.
    :param str latent_site: the latent sample site for active units and KL per dimension.
    :param progress: called with the number of images of each chunk when it is done (e.g.
        :meth:`pyro_vae.progress.Progress.update`); default ``None``.
    :returns: an :class:`EvalResult`.
    """
    ks = check_evaluate_args(ks, chunk_size, x)
    num_particles, (n_images, input_dim) = ks[-1], x.shape
    with eval_mode(vae), own_rng(x, seed):
        acc = _evaluate_chunks(
            vae, x, ks, max(1, chunk_size // num_particles), min(num_particles, chunk_size), latent_site, progress
        )
    kl_analytic = acc.has("kl_analytic")
    reconstruction = acc.get("reconstruction")
    kl = acc.get("kl_analytic") if kl_analytic else acc.get("kl_mc")
    means = acc.get("mean")  # (N, L)
    activity = latent_activity(means)
    rule = bits_rule(vae.likelihood, x)
    bounds = []
    for k in ks:
        log_px = mean_se(acc.get(f"iw{k}"))
        bounds.append(IWBound(k, log_px, bits_per_dim(log_px, input_dim, rule), num_particles // k))
    likelihood = vae.likelihood
    return EvalResult(
        protocol=Protocol(*(protocol or DataProtocol()), likelihood.spec, ks, n_images, likelihood.clamp),
        elbo=mean_se(reconstruction - kl),
        reconstruction=mean_se(reconstruction),
        kl=mean_se(kl),
        kl_method="analytic" if kl_analytic else "monte_carlo",
        bounds=tuple(bounds),
        active_units=active_units(means),
        latent_activity=tuple(activity.tolist()),
        kl_per_dim=tuple(acc.get("kl_dims").mean(0).tolist()) if acc.has("kl_dims") else None,
        input_dim=input_dim,
        seed=seed,
        bits_rule=rule,
        active_directions=active_directions(means),
    )
