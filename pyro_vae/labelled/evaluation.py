r"""Held-out evaluation of the models with labels, with y summed out exactly where it is latent.

For each image :math:`x_i` (and, for the CVAE, its label :math:`y_i`) K codes are drawn from q(z | x, y) and weighed by
:math:`\log w = \log p(x \mid z, y) + \log p(z) - \log q(z \mid x, y)`:

* **CVAE**: the bounds estimate the *conditional* :math:`\log p(x_i \mid y_i)`, and the protocol says so
  (:attr:`~pyro_vae.protocol.Protocol.target`), so that a table never sets them beside a VAE's log p(x);
* **M2**: every class c gets its own K draws from q(z | x, c), and
  :math:`\log \hat p(x) = \log \sum_c \frac{1}{C} \frac{1}{k} \sum_{j} w_{jc}`: the sum over y is exact, the
  integral over z importance-sampled, so :math:`\mathbb{E}[\hat p(x)] = p(x)` and the log is a lower bound as for the
  VAE. The test ELBO is the unlabelled bound :math:`\mathcal{U}(x) = \sum_c q(c \mid x)\,
  \mathbb{E}_{q(z \mid x, c)}[\log w + \log p(c)] + \mathcal{H}[q(y \mid x)]`
  (labels unseen), and the **accuracy** of q(y | x) is the share of images whose most probable class is their label.

As in :func:`pyro_vae.evaluation.evaluate`, smaller k reuse the largest k's draws in disjoint groups, every number is
a mean over images ± its standard error, work runs in chunks of at most ``chunk_size`` particles × images (× classes)
and on its own seeded RNG stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from pyro_vae.evaluation import (
    ELBOResult,
    active_directions,
    active_units,
    bits_rule,
    check_evaluate_args,
    latent_activity,
)
from pyro_vae.importance import own_rng
from pyro_vae.labelled.models import SSVAE, _Labelled
from pyro_vae.model import posterior_mean
from pyro_vae.networks import eval_mode
from pyro_vae.protocol import DataProtocol, EvalResult, IWBound, Protocol, bits_per_dim
from pyro_vae.stats import MeanSE, mean_se

__all__ = ["LabelledELBO", "accuracy", "evaluate_labelled", "evaluate_labelled_elbo"]

DEFAULT_CHUNK_SIZE = 4096


class _Terms(NamedTuple):
    """One chunk's draws: log weights and log-likelihoods ``(K, C', B)`` (C' = C for M2, 1 for the CVAE), the
    guide's class probabilities ``(C, B)`` (M2) and the posterior means ``(B, L)``."""

    log_w: torch.Tensor
    log_lik: torch.Tensor
    class_probs: torch.Tensor | None
    means: torch.Tensor


def _draws(model: _Labelled, x: torch.Tensor, y: torch.Tensor, num_particles: int, per_pass: int):
    """``(log_w, log_lik)`` of ``num_particles`` draws of z ~ q(z | x, y), ``(K, *y_batch)``, in passes of
    ``per_pass`` particles."""
    q = model.encode(x, y)
    prior = model.prior(x.shape[0], x)
    log_ws, log_liks = [], []
    for start in range(0, num_particles, per_pass):
        z = q.sample((min(per_pass, num_particles - start),))
        log_lik = model.decode(z, y).log_prob(x)
        log_ws.append(log_lik + prior.log_prob(z) - q.log_prob(z))
        log_liks.append(log_lik)
    return torch.cat(log_ws), torch.cat(log_liks), q


def _chunk_terms(model: _Labelled, x: torch.Tensor, y: torch.Tensor | None, num_particles: int, chunk: int) -> _Terms:
    if isinstance(model, SSVAE):
        classes = torch.arange(model.num_classes, device=x.device).unsqueeze(-1)  # (C, 1): every class, every image
        per_pass = max(1, chunk // (model.num_classes * x.shape[0]))
        log_w, log_lik, q = _draws(model, x, classes, num_particles, per_pass)
        log_w = log_w - math.log(model.num_classes)  # log p(y = c), uniform
        probs = model.classify(x).probs.T  # (C, B)
        means = posterior_mean(q)[probs.argmax(0), torch.arange(x.shape[0], device=x.device)]  # at the likely class
        return _Terms(log_w, log_lik, probs, means)
    per_pass = max(1, chunk // x.shape[0])
    log_w, log_lik, q = _draws(model, x, y, num_particles, per_pass)
    return _Terms(log_w.unsqueeze(1), log_lik.unsqueeze(1), None, posterior_mean(q))


def _bound(log_w: torch.Tensor, k: int) -> torch.Tensor:
    """Per image, the k-particle bound averaged over the ⌊K/k⌋ disjoint groups, y summed out: ``(B,)``."""
    groups = log_w.shape[0] // k
    grouped = log_w[: groups * k].reshape(groups, k, *log_w.shape[1:])
    per_class = torch.logsumexp(grouped, dim=1) - math.log(k)  # (G, C', B)
    return torch.logsumexp(per_class, dim=1).mean(0)


def _elbo_parts(terms: _Terms) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image ``(ELBO, reconstruction)``; for M2 the unlabelled bound U(x) and Σ_c q(c|x) E[log p(x | z, c)]."""
    if terms.class_probs is None:
        return terms.log_w[:, 0].mean(0), terms.log_lik[:, 0].mean(0)
    probs = terms.class_probs
    entropy = -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(0)
    elbo = (probs * terms.log_w.mean(0)).sum(0) + entropy
    return elbo, (probs * terms.log_lik.mean(0)).sum(0)


def _check_labels(model: _Labelled, x: torch.Tensor, y: torch.Tensor | None) -> None:
    if y is None and not isinstance(model, SSVAE):
        model.check_labels(None, x.shape[0])  # the CVAE scores log p(x | y): one line saying the labels are needed
    if y is not None:
        model.check_labels(y, x.shape[0])


class LabelledELBO(NamedTuple):
    """The per-epoch numbers of a model with labels: the ELBO (as :func:`pyro_vae.evaluation.evaluate_elbo` gives
    it) and, for M2, the accuracy of q(y | x) (``None`` for the CVAE or without labels)."""

    elbo: ELBOResult
    accuracy: MeanSE | None


@torch.no_grad()
def evaluate_labelled_elbo(
    model: _Labelled, x: torch.Tensor, y: torch.Tensor | None, *, batch_size: int = 1000, seed: int = 0
) -> LabelledELBO:
    """The single-sample test ELBO (the CVAE's of log p(x | y), M2's unlabelled bound) and M2's accuracy."""
    _check_labels(model, x, y)
    elbos, recs, hits = [], [], []
    with eval_mode(model), own_rng(x, seed):
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size]
            yb = None if y is None else y[start : start + batch_size]
            terms = _chunk_terms(model, xb, yb, 1, DEFAULT_CHUNK_SIZE)
            elbo, rec = _elbo_parts(terms)
            elbos.append(elbo.double().cpu())
            recs.append(rec.double().cpu())
            if terms.class_probs is not None and yb is not None:
                hits.append((terms.class_probs.argmax(0) == yb).double().cpu())
    elbo, rec = torch.cat(elbos), torch.cat(recs)
    result = ELBOResult(mean_se(elbo), mean_se(rec), mean_se(rec - elbo), x.shape[0])
    return LabelledELBO(result, mean_se(torch.cat(hits)) if hits else None)


@torch.no_grad()
def accuracy(model: SSVAE, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000) -> MeanSE:
    """The share of images whose most probable class under q(y | x) is their label, ± its standard error."""
    model.check_labels(y, x.shape[0])
    with eval_mode(model):
        hits = [
            (model.classify(x[s : s + batch_size]).probs.argmax(-1) == y[s : s + batch_size]).double().cpu()
            for s in range(0, x.shape[0], batch_size)
        ]
    return mean_se(torch.cat(hits))


@torch.no_grad()
def evaluate_labelled(
    model: _Labelled,
    x: torch.Tensor,
    y: torch.Tensor | None,
    ks: Sequence[int] = (1, 100, 1000),
    *,
    protocol: DataProtocol | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Evaluate a CVAE or M2 on images ``x`` with labels ``y`` (see the module docstring).

    :param model: a :class:`~pyro_vae.labelled.CVAE` or :class:`~pyro_vae.labelled.SSVAE`.
    :param x: ``(N, D)`` images, binarised as the likelihood needs.
    :param y: ``(N,)`` labels: required by the CVAE; M2 uses them for the accuracy only (``None``: no accuracy).
    :param ks: particle counts of the importance-weighted bounds (per class for M2).
    :param protocol: how ``x`` was made; recorded in the result.
    :param int chunk_size: particles × images (× classes) per forward pass.
    :param int seed: seed of the evaluation noise.
    :param progress: called with the number of images of each chunk when it is done.
    :returns: an :class:`~pyro_vae.protocol.EvalResult` (with ``accuracy`` for M2 given labels).
    """
    ks = check_evaluate_args(ks, chunk_size, x)
    _check_labels(model, x, y)
    num_particles = ks[-1]
    classes = model.num_classes if isinstance(model, SSVAE) else 1
    images = max(1, chunk_size // (num_particles * classes))
    parts: dict[str, list[torch.Tensor]] = {}
    with eval_mode(model), own_rng(x, seed):
        for start in range(0, x.shape[0], images):
            xb, yb = x[start : start + images], None if y is None else y[start : start + images]
            terms = _chunk_terms(model, xb, yb, num_particles, chunk_size)
            elbo, rec = _elbo_parts(terms)
            values = {"elbo": elbo, "rec": rec, "mean": terms.means, **{f"iw{k}": _bound(terms.log_w, k) for k in ks}}
            if terms.class_probs is not None and yb is not None:
                values["hit"] = (terms.class_probs.argmax(0) == yb).double()
            for name, value in values.items():
                parts.setdefault(name, []).append(value.double().cpu())
            if progress is not None:
                progress(xb.shape[0])
    get = {name: torch.cat(chunks) for name, chunks in parts.items()}
    return _result(model, x, ks, get, protocol, seed)


def _result(model, x, ks, get, protocol, seed) -> EvalResult:
    n_images, input_dim = x.shape
    rule = bits_rule(model.likelihood, x)
    bounds = []
    for k in ks:
        log_px = mean_se(get[f"iw{k}"])
        bounds.append(IWBound(k, log_px, bits_per_dim(log_px, input_dim, rule), ks[-1] // k))
    target = "log p(x)" if isinstance(model, SSVAE) else "log p(x | y)"
    likelihood = model.likelihood
    means = get["mean"]
    return EvalResult(
        protocol=Protocol(*(protocol or DataProtocol()), likelihood.spec, ks, n_images, likelihood.clamp, target),
        elbo=mean_se(get["elbo"]),
        reconstruction=mean_se(get["rec"]),
        kl=mean_se(get["rec"] - get["elbo"]),
        kl_method="monte_carlo",
        bounds=tuple(bounds),
        active_units=active_units(means),
        latent_activity=tuple(latent_activity(means).tolist()),
        kl_per_dim=None,
        input_dim=input_dim,
        seed=seed,
        bits_rule=rule,
        active_directions=active_directions(means),
        accuracy=mean_se(get["hit"]) if "hit" in get else None,
    )
