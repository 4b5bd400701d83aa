"""Held-out evaluation from Pyro traces: the ELBO per data point, split into reconstruction and KL.

For each image the guide is traced, the model is replayed on the guide's z, and the unscaled site log-densities
give ``log p(x | z)``, ``log p(z)`` and ``log q(z | x)``::

    elbo_i = log p(x_i | z_i) + log p(z_i) - log q(z_i | x_i),   z_i ~ q(z | x_i)
    reconstruction_i = log p(x_i | z_i),   kl_i = log q(z_i | x_i) - log p(z_i)     (single-sample estimates)

Reported numbers are means over data points with their standard errors (sample standard deviation / √n).
Evaluation runs under ``torch.no_grad()`` on its own seeded RNG stream, so it is reproducible and never perturbs the
training noise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from pyro import poutine

from pyro_vae.model import VAE


class MeanSE(NamedTuple):
    """A mean over data points and its standard error."""

    mean: float
    se: float

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.se:.2f}"


class ELBOResult(NamedTuple):
    """Per-image ELBO on a data set (nats per image), with its parts."""

    elbo: MeanSE
    reconstruction: MeanSE
    kl: MeanSE
    num_images: int


def _mean_se(values: torch.Tensor) -> MeanSE:
    values = values.double()
    n = values.numel()
    se = values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return MeanSE(values.mean().item(), se)


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
    """The ELBO of every image in ``x`` (already binarised as the likelihood needs), in chunks of ``batch_size``.

    :param vae: the trained model.
    :param x: data ``(N, D)`` on the model's device.
    :param int batch_size: images per chunk (bounds memory).
    :param int seed: seed of the guide's noise for this evaluation.
    """
    if x.shape[0] == 0:
        raise ValueError("cannot evaluate on an empty data set")
    was_training = vae.training
    vae.eval()
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    recs, kls = [], []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, x.shape[0], batch_size):
            rec, kl = elbo_terms(vae, x[start : start + batch_size])
            recs.append(rec)
            kls.append(kl)
    vae.train(was_training)
    rec, kl = torch.cat(recs), torch.cat(kls)
    return ELBOResult(_mean_se(rec - kl), _mean_se(rec), _mean_se(kl), x.shape[0])
