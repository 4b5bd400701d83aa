r"""Inference gaps (Cremer, Li and Duvenaud, 2018): how much of the ELBO's shortfall comes from the variational
family and how much from amortisation.

For every test image the guide family's raw parameters are first taken from the encoder (the amortised q) and then
refined by a few steps of stochastic gradient ascent on that image's own ELBO, starting from the encoder's output
(semi-amortised inference, Kim et al. 2018). With

.. math::

    \log p(x) \;\ge\; \mathcal{L}[q^*_x] \;\ge\; \mathcal{L}[q_\phi(\cdot \mid x)],

where :math:`q^*_x` is the refined member of the family and :math:`q_\phi` the amortised one, the two gaps are

.. math::

    \text{approximation gap} = \log p(x) - \mathcal{L}[q^*_x] \approx \min_{q \in \mathcal{Q}}
    \mathrm{KL}(q \,\|\, p(z \mid x)), \qquad
    \text{amortisation gap} = \mathcal{L}[q^*_x] - \mathcal{L}[q_\phi(\cdot \mid x)].

:math:`\log p(x)` is estimated by the importance-weighted bound with k particles (large k) drawn from the refined
q, the ELBOs by Monte Carlo with ``elbo_samples`` draws. The IW estimate is a stochastic lower bound: when the refined
q is narrower than the posterior in some direction (as KL(q ‖ p)-optimal families tend to be), the importance weights
can have infinite variance, the estimate then approaches log p(x) slowly in k, and the approximation gap is
under-estimated (on the linear-Gaussian model this happens once :math:`2\Lambda - \operatorname{diag}(\Lambda)` is not
positive definite). Only the per-image raw parameters move during refinement:
the encoder, the decoder and any global parameters of the family stay fixed. On the linear-Gaussian model
(:mod:`pyro_vae.linear_gaussian`) both gaps have closed forms, which the tests check.

Reference: Inference Suboptimality in Variational Autoencoders, Chris Cremer, Xuechen Li, David Duvenaud (ICML 2018).
"""

from __future__ import annotations

from typing import NamedTuple

import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.util import is_validation_enabled

from pyro_vae.config import check_float, check_int
from pyro_vae.errors import DataError
from pyro_vae.importance import MAX_PLATE_NESTING, MeanSE, log_mean_exp, log_weights, mean_se, own_rng, particle_traces
from pyro_vae.model import VAE

__all__ = ["GapImages", "GapResult", "inference_gaps"]


class GapImages(NamedTuple):
    """Per-image values behind a :class:`GapResult`, float64 on the CPU.

    :ivar log_px: ``(N,)`` IW estimates of log p(x).
    :ivar amortised_elbo: ``(N,)`` ELBO of the encoder's q.
    :ivar refined_elbo: ``(N,)`` ELBO of the refined q.
    :ivar refined_raw: ``(N, num_params)`` the refined raw parameters of the family.
    """

    log_px: torch.Tensor
    amortised_elbo: torch.Tensor
    refined_elbo: torch.Tensor
    refined_raw: torch.Tensor


class GapResult(NamedTuple):
    """Inference gaps of one model (one guide family) on a set of images; nats per image, mean ± standard error.

    :ivar family: the guide family's name.
    :ivar log_px: IW estimate of log p(x) with ``k`` particles from the refined q.
    :ivar amortised_elbo: ELBO of the encoder's q.
    :ivar refined_elbo: ELBO of q after ``steps`` refinement steps.
    :ivar approximation_gap: log p(x) − refined ELBO.
    :ivar amortisation_gap: refined ELBO − amortised ELBO.
    :ivar k: particles of the IW estimate.
    :ivar steps: refinement steps.
    :ivar num_images: images evaluated.
    :ivar per_image: the per-image values (:class:`GapImages`).
    """

    family: str
    log_px: MeanSE
    amortised_elbo: MeanSE
    refined_elbo: MeanSE
    approximation_gap: MeanSE
    amortisation_gap: MeanSE
    k: int
    steps: int
    num_images: int
    per_image: GapImages

    def rows(self) -> list[tuple[str, str]]:
        return [
            (f"log p(x), k={self.k}", str(self.log_px)),
            (f"refined ELBO ({self.steps} steps)", str(self.refined_elbo)),
            ("amortised ELBO", str(self.amortised_elbo)),
            ("approximation gap", str(self.approximation_gap)),
            ("amortisation gap", str(self.amortisation_gap)),
        ]

    def table(self) -> str:
        lines = [f"{'inference gaps (' + self.family + ')':<32}{'nats/image':>20}"]
        lines += [f"{metric:<32}{value:>20}" for metric, value in self.rows()]
        lines.append(f"({self.num_images} images)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        out = {"family": self.family, "k": self.k, "steps": self.steps, "num_images": self.num_images}
        for name in ("log_px", "amortised_elbo", "refined_elbo", "approximation_gap", "amortisation_gap"):
            value = getattr(self, name)
            out[name], out[name + "_se"] = value.mean, value.se
        return out


def _local_guide(vae: VAE, raw: torch.Tensor):
    """A guide whose q(z | x_i) is ``family(raw_i)``: per-image parameters instead of the encoder."""

    def guide(x: torch.Tensor, num_data: int | None = None, index: torch.Tensor | None = None) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", vae.family(raw))

    return guide


def _refine(vae, x, raw0, *, steps: int, lr: float, particles: int, validate: bool) -> torch.Tensor:
    """``steps`` Adam steps on each image's ELBO w.r.t. its own raw parameters, from ``raw0``; lr decays linearly
    to 0 so that the last steps settle instead of jittering at the Monte Carlo noise floor."""
    raw = raw0.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([raw], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 - t / steps)
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=MAX_PLATE_NESTING)
    guide = _local_guide(vae, raw)
    with torch.enable_grad():
        for step in range(steps):
            # The loss is a sum over images and each image's raw row enters only its own term, so one Adam over the
            # batch (element-wise) is the same as one optimiser per image.
            with pyro.validation_enabled(validate and step == 0):
                loss = elbo.differentiable_loss(vae.model, guide, x)
            (grad,) = torch.autograd.grad(loss, [raw])
            raw.grad = grad
            optimizer.step()
            schedule.step()
    return raw.detach()


def _log_weights(vae, x, raw, num_particles: int, chunk_size: int) -> torch.Tensor:
    """``(K, B)`` log importance weights with q = family(raw), in passes of at most ``chunk_size`` rows."""
    guide = _local_guide(vae, raw)
    per_pass = max(1, chunk_size // x.shape[0])
    out = []
    for first in range(0, num_particles, per_pass):
        count = min(per_pass, num_particles - first)
        out.append(log_weights(*particle_traces(vae.model, guide, count, (x,)), count).log_weight)
    return torch.cat(out)


def _check_arguments(x: torch.Tensor, *, lr, chunk_size, **counts) -> None:
    for name, value in counts.items():
        check_int(name, value, low=1)
    check_int("chunk_size (particles × images per pass)", chunk_size, low=1)
    check_float("lr", lr, low=0, open_low=True)
    if x.dim() != 2 or x.shape[0] == 0:
        raise DataError(f"inference_gaps needs images of shape (N, D) with N >= 1, got {tuple(x.shape)}")


def _chunk_gaps(vae, xb: torch.Tensor, *, k: int, elbo_samples: int, chunk_size: int, **refine) -> GapImages:
    """The per-image columns of :class:`GapImages` for the images ``xb`` (B, D), float64 on the CPU; ``refine``
    holds :func:`_refine`'s options."""
    raw0 = vae.encoder(xb)  # (B, num_params): what the amortised guide feeds its family
    refined = _refine(vae, xb, raw0, **refine)
    with pyro.validation_enabled(False):
        amortised = _log_weights(vae, xb, raw0, elbo_samples, chunk_size).mean(0)
        refined_elbo = _log_weights(vae, xb, refined, elbo_samples, chunk_size).mean(0)
        log_px = log_mean_exp(_log_weights(vae, xb, refined, k, chunk_size), 0)
    return GapImages(*(value.double().cpu() for value in (log_px, amortised, refined_elbo, refined)))


@torch.no_grad()
def inference_gaps(
    vae: VAE,
    x: torch.Tensor,
    *,
    k: int = 1000,
    steps: int = 100,
    lr: float = 1e-2,
    particles: int = 8,
    elbo_samples: int = 100,
    chunk_size: int = 1 << 12,
    seed: int = 0,
) -> GapResult:
    """Measure the approximation and amortisation gaps of ``vae`` on the images ``x``.

    :param vae: a trained :class:`~pyro_vae.model.VAE` (or :class:`~pyro_vae.linear_gaussian.LinearGaussianVAE`).
    :param x: ``(N, D)`` images on the model's device, binarised as the likelihood needs.
    :param int k: particles of the IW estimate of log p(x) (default 1000).
    :param int steps: refinement steps per image (default 100).
    :param float lr: Adam's initial learning rate on the raw parameters (default 0.01), decayed linearly to 0.
    :param int particles: samples of z per image per refinement step (default 8).
    :param int elbo_samples: samples per image of each reported ELBO (default 100).
    :param int chunk_size: particles × images per forward pass (default 4096); bounds the memory.
    :param int seed: seed of all the noise.
    :returns: a :class:`GapResult`.
    """
    _check_arguments(x, k=k, steps=steps, lr=lr, particles=particles, elbo_samples=elbo_samples, chunk_size=chunk_size)
    images_per_chunk = max(1, chunk_size // particles)
    validate = is_validation_enabled()
    chunks: list[GapImages] = []
    was_training = vae.training
    vae.eval()
    try:
        with own_rng(x, seed):
            for chunk, start in enumerate(range(0, x.shape[0], images_per_chunk)):
                xb = x[start : start + images_per_chunk]  # (B, D)
                refine = {"steps": steps, "lr": lr, "particles": particles, "validate": validate and chunk == 0}
                chunks.append(_chunk_gaps(vae, xb, k=k, elbo_samples=elbo_samples, chunk_size=chunk_size, **refine))
    finally:
        vae.train(was_training)
    images = GapImages(*(torch.cat(column) for column in zip(*chunks, strict=True)))
    return GapResult(
        family=vae.family.name,
        log_px=mean_se(images.log_px),
        amortised_elbo=mean_se(images.amortised_elbo),
        refined_elbo=mean_se(images.refined_elbo),
        approximation_gap=mean_se(images.log_px - images.refined_elbo),
        amortisation_gap=mean_se(images.refined_elbo - images.amortised_elbo),
        k=k,
        steps=steps,
        num_images=x.shape[0],
        per_image=images,
    )
