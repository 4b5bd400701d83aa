r"""Per-data-point importance weights from Pyro traces, shared by the IWAE objective, the evaluator and the gaps.

For K particles :math:`z_{1..K} \sim q(z \mid x_i)` drawn in a vectorised particle plate (as
:class:`pyro.infer.Trace_ELBO` does with ``vectorize_particles=True``) and every data point i of the data plate,
the log importance weight is

.. math::

    \log w_{ki} = \log p(x_i \mid z_{ki}) + \log p(z_{ki}) - \log q(z_{ki} \mid x_i),
    \qquad \mathcal{L}_K(x_i) = \log \frac{1}{K} \sum_k w_{ki} \le \log p(x_i).

Each site's log-density is read from the traces that :func:`pyro.infer.enum.get_importance_trace` builds and is
laid out as ``(K, B)``: particles first, data points second. The data plate's minibatch scale N/B is taken *out* of
every term, because it multiplies the per-data-point bound and does not belong inside the log-sum-exp. (Pyro's
``RenyiELBO(alpha=0)`` sums its sites' *scaled* log-densities before the log-sum-exp, so with a subsampled data plate
its log-sum-exp runs over N/B times the log-weights, which is not a scaled IW bound; see Pyro #3104.) Any other scale
on a site (for instance a KL weight β from :mod:`pyro_vae.schedules`) stays on that site's term.

:class:`MeanSE` and :func:`mean_se` are re-exported from :mod:`pyro_vae.stats`, where they live.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.enum import get_importance_trace

from pyro_vae.stats import MeanSE, mean_se

__all__ = [
    "MAX_PLATE_NESTING",
    "PARTICLE_PLATE",
    "LogWeights",
    "MeanSE",
    "log_mean_exp",
    "log_weights",
    "mean_se",
    "particle_traces",
]

#: The model nests one plate ("data"); vectorised particles add one more dimension to its left.
MAX_PLATE_NESTING = 1
#: Name of the vectorised particle plate; the same name :class:`pyro.infer.ELBO` gives its own.
PARTICLE_PLATE = "num_particles_vectorized"


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log(mean(exp(log_w), dim))``, computed stably as ``logsumexp - log K``."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


class LogWeights(NamedTuple):
    r"""The terms of the log importance weights, each ``(K, B)``: particles × data points.

    :ivar log_likelihood: sum of the observed sites' log-densities, :math:`\log p(x_i \mid z_{ki})`.
    :ivar log_prior: sum of the model's latent sites' log-densities, :math:`\log p(z_{ki})`.
    :ivar log_guide: sum of the guide's latent sites' log-densities, :math:`\log q(z_{ki} \mid x_i)`.
    :ivar scale: the data plate's minibatch scale N/B (1 for a full batch).
    """

    log_likelihood: torch.Tensor
    log_prior: torch.Tensor
    log_guide: torch.Tensor
    scale: float

    @property
    def log_weight(self) -> torch.Tensor:
        r""":math:`\log w_{ki}`, ``(K, B)``."""
        return self.log_likelihood + self.log_prior - self.log_guide


def particle_traces(model, guide, num_particles: int, args=(), kwargs=None, *, max_plate_nesting=MAX_PLATE_NESTING):
    """Trace ``guide`` with ``num_particles`` vectorised particles and replay ``model`` against it.

    This is what :meth:`pyro.infer.ELBO._get_vectorized_trace` does: both programs run inside
    ``pyro.plate("num_particles_vectorized", K, dim=-(max_plate_nesting + 1))`` (no plate when K is 1), then
    :func:`~pyro.infer.enum.get_importance_trace` records the traces with their log-densities.

    :param model: a Pyro model with ``max_plate_nesting`` nested plates.
    :param guide: its guide.
    :param int num_particles: K.
    :param args: positional arguments of both programs.
    :param kwargs: keyword arguments of both programs.
    :returns: ``(model_trace, guide_trace)``.
    """
    if num_particles > 1:
        plate = pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1))
        model, guide = plate(model), plate(guide)
        max_plate_nesting += 1
    return get_importance_trace("flat", max_plate_nesting, model, guide, tuple(args), dict(kwargs or {}))


def _plate_scale(site) -> float:
    # The product of the plates' N/B factors, multiplied in the order Pyro's messengers apply them (innermost first),
    # so that a site with no other scale gets a relative scale of exactly 1.0.
    scale = 1.0
    for frame in reversed(site["cond_indep_stack"]):
        if frame.full_size is not None:
            scale = scale * frame.full_size / frame.size
    return scale


def _data_frame(site):
    frames = [f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE]
    if len(frames) != 1 or frames[0].dim != -1:
        raise ValueError(
            f"site {site['name']!r} lies in plates {[f.name for f in frames]}, but the per-data-point importance "
            "weight needs every sample site inside exactly one data plate at dim -1 (pyro.plate('data', ...))"
        )
    return frames[0]


def _per_datum(site, log_prob: torch.Tensor, num_particles: int) -> tuple[torch.Tensor, float]:
    """A site's log-density as ``(K, B)``, with the plates' N/B taken out and any other scale and mask kept."""
    frame = _data_frame(site)
    plate_scale = _plate_scale(site)
    log_prob = scale_and_mask(log_prob, site["scale"] / plate_scale, site["mask"])
    if log_prob.dim() > 2:
        raise ValueError(f"site {site['name']!r} has batch shape {tuple(log_prob.shape)}; expected (K, B) or (B,)")
    while log_prob.dim() < 2:
        log_prob = log_prob.unsqueeze(0)
    return log_prob.expand(num_particles, frame.size), frame.full_size / frame.size


def log_weights(model_trace, guide_trace, num_particles: int, *, guide_log_prob=None) -> LogWeights:
    """Split the traces' log-densities into per-particle, per-data-point terms.

    :param model_trace: the model's trace (log-densities computed, as :func:`particle_traces` returns it).
    :param guide_trace: the guide's trace.
    :param int num_particles: K.
    :param guide_log_prob: optional ``site -> tensor`` giving the unscaled log-density to use for a guide site
        instead of the trace's (the STL and DReG estimators pass one with the distribution's parameters detached).
    :returns: a :class:`LogWeights` of ``(K, B)`` tensors.
    """
    log_likelihood = log_prior = log_guide = 0.0
    scale = None
    for site in model_trace.nodes.values():
        if site["type"] != "sample":
            continue
        term, scale = _per_datum(site, site["unscaled_log_prob"], num_particles)
        if site["is_observed"]:
            log_likelihood = log_likelihood + term
        else:
            log_prior = log_prior + term
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if name not in model_trace.nodes:
            raise ValueError(f"guide site {name!r} has no counterpart in the model; auxiliary sites are not supported")
        value = site["unscaled_log_prob"] if guide_log_prob is None else guide_log_prob(site)
        term, _ = _per_datum(site, value, num_particles)
        log_guide = log_guide + term
    if scale is None or not torch.is_tensor(log_likelihood):
        raise ValueError("the model has no observed site inside the data plate, so there is no log p(x) to bound")
    zeros = torch.zeros_like(log_likelihood)
    return LogWeights(log_likelihood, log_prior + zeros, log_guide + zeros, scale)


@contextmanager
def own_rng(x: torch.Tensor, seed: int):
    """Run the block on a fresh torch RNG stream seeded by ``seed`` (on ``x``'s device); the caller's stream is
    restored afterwards, so evaluation never perturbs the training noise."""
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
