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
  is the reported NLL. Bits per dimension are :math:`-\hat{\mathcal{L}}_k / (D \ln 2)`;
* the **test ELBO** = reconstruction − KL, with reconstruction :math:`\frac{1}{K}\sum_k \log p(x_i \mid z_{ki})`
  and the KL analytic where the guide and prior have one (Gaussian families: ``kl_method="analytic"``), else its
  K-sample Monte Carlo estimate;
* **active units** (Burda et al. 2016): dimension d is active when
  :math:`A_d = \operatorname{Cov}_x(\mathbb{E}_{q(z \mid x)}[z_d]) > 0.01`;
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
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from torch.distributions import kl_divergence

from pyro_vae.errors import ConfigError, DataError
from pyro_vae.importance import MeanSE, log_mean_exp, log_weights, mean_se, own_rng, particle_traces
from pyro_vae.model import VAE, posterior_mean

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DataProtocol",
    "ELBOResult",
    "EvalResult",
    "IWBound",
    "MeanSE",
    "Protocol",
    "ProtocolMismatchError",
    "check_same_protocol",
    "elbo_terms",
    "evaluate",
    "evaluate_elbo",
    "side_by_side",
]

#: Particles × images per forward pass. With the seed decoder (widths up to 784) a pass of 4096 rows peaks at about
#: 80 MiB above the resting process (benchmarks/eval_speed.py); on a CPU, passes of 16 384 and 65 536 rows ran 15 %
#: and 22 % slower (K = 1000, 64 images), as they no longer fit the caches.
DEFAULT_CHUNK_SIZE = 1 << 12
#: Burda et al.'s threshold on Cov_x(E_q[z_d]) for an active unit.
ACTIVE_UNIT_THRESHOLD = 0.01


class ELBOResult(NamedTuple):
    """Per-image ELBO on a data set (nats per image), with its parts."""

    elbo: MeanSE
    reconstruction: MeanSE
    kl: MeanSE
    num_images: int


def _mean_se(values: torch.Tensor) -> MeanSE:
    return mean_se(values)


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
    was_training = vae.training
    vae.eval()
    recs, kls = [], []
    try:
        with own_rng(x, seed):
            for start in range(0, x.shape[0], batch_size):
                rec, kl = elbo_terms(vae, x[start : start + batch_size])
                recs.append(rec)
                kls.append(kl)
    finally:
        vae.train(was_training)
    rec, kl = torch.cat(recs), torch.cat(kls)
    return ELBOResult(_mean_se(rec - kl), _mean_se(rec), _mean_se(kl), x.shape[0])


# ------------------------------------------------------------------------------------------------------------------
# Protocols
class DataProtocol(NamedTuple):
    """How the evaluated images were made: what :func:`evaluate` cannot see in the tensor itself.

    :ivar dataset: e.g. ``"fashion-mnist"``.
    :ivar split: ``"test"``, ``"train"``, ...
    :ivar binarize: the binarisation protocol (:data:`pyro_vae.config.BINARIZATIONS`).
    :ivar binarize_seed: the seed of the binarisation draw (``None`` where there is none).
    """

    dataset: str = "unspecified"
    split: str = "test"
    binarize: str = "unspecified"
    binarize_seed: int | None = None


class Protocol(NamedTuple):
    """Everything that must agree for two evaluation numbers to be comparable."""

    dataset: str
    split: str
    binarize: str
    binarize_seed: int | None
    likelihood: str
    ks: tuple[int, ...]
    num_images: int

    def mismatches(self, other: Protocol) -> list[str]:
        """``["field: mine vs other", ...]`` for every field that differs."""
        return [f"{f}: {a!r} vs {b!r}" for f, a, b in zip(self._fields, self, other, strict=True) if a != b]

    def describe(self) -> str:
        seed = "" if self.binarize_seed is None else f" (seed {self.binarize_seed})"
        return (
            f"{self.dataset} {self.split} split, {self.num_images} images, binarize={self.binarize}{seed}, "
            f"likelihood={self.likelihood}, k={','.join(map(str, self.ks))}"
        )


class ProtocolMismatchError(ConfigError):
    """Two evaluation results were made under different protocols and cannot be compared."""


# ------------------------------------------------------------------------------------------------------------------
# Results
class IWBound(NamedTuple):
    r"""The importance-weighted estimate of log p(x) with k particles.

    :ivar k: particles per estimate.
    :ivar log_px: mean over images of :math:`\hat{\mathcal{L}}_k(x_i)`, nats per image, ± standard error.
    :ivar bits_per_dim: :math:`-\hat{\mathcal{L}}_k / (D \ln 2)` ± standard error.
    :ivar groups: disjoint groups of k particles averaged per image.
    """

    k: int
    log_px: MeanSE
    bits_per_dim: MeanSE
    groups: int


class EvalResult(NamedTuple):
    r"""What :func:`evaluate` measured, with the protocol that makes it comparable.

    :ivar protocol: the :class:`Protocol`.
    :ivar elbo: test ELBO = reconstruction − KL, nats per image.
    :ivar reconstruction: :math:`\mathbb{E}_q[\log p(x \mid z)]`, K-sample average per image.
    :ivar kl: KL(q(z | x) ‖ p(z)), analytic or K-sample Monte Carlo (see ``kl_method``).
    :ivar kl_method: ``"analytic"`` or ``"monte_carlo"``.
    :ivar bounds: one :class:`IWBound` per k, ascending.
    :ivar active_units: number of dimensions with :math:`\operatorname{Cov}_x(\mathbb{E}_q[z_d]) >` the threshold.
    :ivar latent_activity: :math:`\operatorname{Cov}_x(\mathbb{E}_q[z_d])` per dimension.
    :ivar kl_per_dim: mean KL between the Normal marginals of q and p per dimension, or ``None``.
    :ivar input_dim: D.
    :ivar seed: seed of the evaluation noise.
    """

    protocol: Protocol
    elbo: MeanSE
    reconstruction: MeanSE
    kl: MeanSE
    kl_method: str
    bounds: tuple[IWBound, ...]
    active_units: int
    latent_activity: tuple[float, ...]
    kl_per_dim: tuple[float, ...] | None
    input_dim: int
    seed: int

    @property
    def num_images(self) -> int:
        return self.protocol.num_images

    def bound(self, k: int | None = None) -> IWBound:
        """The bound with k particles (default: the largest k)."""
        if k is None:
            return self.bounds[-1]
        for bound in self.bounds:
            if bound.k == k:
                return bound
        raise ConfigError(f"k={k} was not evaluated; this result has k in {[b.k for b in self.bounds]}")

    @property
    def nll(self) -> MeanSE:
        """Negative log-likelihood −log p(x) at the largest k, nats per image ± standard error."""
        log_px = self.bounds[-1].log_px
        return MeanSE(-log_px.mean, log_px.se)

    def to_json(self) -> dict:
        """A JSON-ready dict; the protocol's fields sit at the top level next to the numbers."""
        return {
            **self.protocol._asdict(),
            "ks": list(self.protocol.ks),
            "elbo": self.elbo.mean,
            "elbo_se": self.elbo.se,
            "reconstruction": self.reconstruction.mean,
            "reconstruction_se": self.reconstruction.se,
            "kl": self.kl.mean,
            "kl_se": self.kl.se,
            "kl_method": self.kl_method,
            "log_likelihood": [
                {
                    "k": b.k,
                    "log_px": b.log_px.mean,
                    "log_px_se": b.log_px.se,
                    "bits_per_dim": b.bits_per_dim.mean,
                    "bits_per_dim_se": b.bits_per_dim.se,
                    "groups": b.groups,
                }
                for b in self.bounds
            ],
            "nll": self.nll.mean,
            "nll_se": self.nll.se,
            "active_units": self.active_units,
            "latent_activity": list(self.latent_activity),
            "kl_per_dim": None if self.kl_per_dim is None else list(self.kl_per_dim),
            "input_dim": self.input_dim,
            "eval_seed": self.seed,
        }

    @classmethod
    def from_json(cls, record: dict) -> EvalResult:
        """Inverse of :meth:`to_json` (for comparing saved ``eval.json`` files)."""
        try:
            protocol = Protocol(**{f: record[f] for f in Protocol._fields if f != "ks"}, ks=tuple(record["ks"]))
            bounds = tuple(
                IWBound(
                    b["k"],
                    MeanSE(b["log_px"], b["log_px_se"]),
                    MeanSE(b["bits_per_dim"], b["bits_per_dim_se"]),
                    b["groups"],
                )
                for b in record["log_likelihood"]
            )
            kl_per_dim = record["kl_per_dim"]
            return cls(
                protocol=protocol,
                elbo=MeanSE(record["elbo"], record["elbo_se"]),
                reconstruction=MeanSE(record["reconstruction"], record["reconstruction_se"]),
                kl=MeanSE(record["kl"], record["kl_se"]),
                kl_method=record["kl_method"],
                bounds=bounds,
                active_units=record["active_units"],
                latent_activity=tuple(record["latent_activity"]),
                kl_per_dim=None if kl_per_dim is None else tuple(kl_per_dim),
                input_dim=record["input_dim"],
                seed=record["eval_seed"],
            )
        except (KeyError, TypeError) as err:
            raise DataError(f"not an evaluation record written by EvalResult.to_json: missing or bad {err}") from None

    def rows(self) -> list[tuple[str, str, str]]:
        """``(metric, nats per image, bits per dimension)`` rows of :meth:`table`."""
        scale = 1.0 / (self.input_dim * math.log(2))
        elbo_bpd = MeanSE(-self.elbo.mean * scale, self.elbo.se * scale)
        rows = [
            ("test ELBO", str(self.elbo), _fmt_bpd(elbo_bpd)),
            ("  reconstruction", str(self.reconstruction), ""),
            (f"  KL ({self.kl_method.replace('_', ' ')})", str(self.kl), ""),
        ]
        rows += [(f"log p(x), k={b.k}", str(b.log_px), _fmt_bpd(b.bits_per_dim)) for b in self.bounds]
        rows.append(("NLL", str(self.nll), ""))
        latent_dim = len(self.latent_activity)
        rows.append(("active units", f"{self.active_units} of {latent_dim}", ""))
        return rows

    def table(self) -> str:
        """A printable table of every number, with the protocol underneath."""
        lines = [f"{'metric':<20}{'nats/image':>20}{'bits/dim':>20}"]
        lines += [f"{m:<20}{a:>20}{b:>20}" for m, a, b in self.rows()]
        lines.append(f"({self.protocol.describe()}; eval seed {self.seed})")
        return "\n".join(lines)


def _fmt_bpd(value: MeanSE) -> str:
    return f"{value.mean:.4f} ± {value.se:.4f}"


def check_same_protocol(results: Sequence[EvalResult]) -> Protocol:
    """The protocol every result shares.

    :raises ProtocolMismatchError: listing the fields that differ, if any do.
    """
    if not results:
        raise ConfigError("no evaluation results were given to compare; pass at least one")
    first = results[0].protocol
    for result in results[1:]:
        differences = first.mismatches(result.protocol)
        if differences:
            raise ProtocolMismatchError(
                "refusing to compare evaluations made under different protocols ("
                + "; ".join(differences)
                + "); evaluate every model on the same data, binarisation, likelihood, ks and number of images"
            )
    return first


def side_by_side(results: Mapping[str, EvalResult]) -> str:
    """A table with one column per named result, after checking that they share one protocol.

    :param results: ``{name: EvalResult}``, e.g. ``{"mvn_diag": a, "diag_normal": b}``.
    :raises ProtocolMismatchError: if the protocols differ.
    """
    names = list(results)
    protocol = check_same_protocol([results[n] for n in names])
    per_result = [results[n].rows() for n in names]
    width = max(20, *(len(n) + 2 for n in names))
    lines = [f"{'metric (nats/image)':<20}" + "".join(f"{n:>{width}}" for n in names)]
    for i, (metric, _, _) in enumerate(per_result[0]):
        lines.append(f"{metric:<20}" + "".join(f"{rows[i][1]:>{width}}" for rows in per_result))
    lines.append(f"({protocol.describe()})")
    return "\n".join(lines)


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
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in values):
        raise ConfigError(f"ks must be a non-empty sequence of positive integers such as (1, 100, 1000), got {ks!r}")
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


def _evaluate_chunks(vae, x, ks, images_per_chunk: int, particles_per_pass: int, latent_site: str) -> _Accumulator:
    """Run the model and guide over ``x`` chunk by chunk and collect the per-image values :func:`evaluate` needs."""
    acc = _Accumulator()
    num_particles = ks[-1]
    validate = is_validation_enabled()
    for chunk, start in enumerate(range(0, x.shape[0], images_per_chunk)):
        # Pyro's checks run on the first chunk (they catch wrong supports); later chunks skip their cost.
        with pyro.validation_enabled(validate and chunk == 0):
            xb = x[start : start + images_per_chunk]  # (B, D)
            # One particle, unexpanded: q(z | x) and p(z) for the analytic KL, the posterior means, the marginals.
            model_trace, guide_trace = particle_traces(vae.model, vae.guide, 1, (xb,))
            q = guide_trace.nodes[latent_site]["fn"]
            p = model_trace.nodes[latent_site]["fn"]
            acc.add("mean", posterior_mean(q))
            kl = _analytic_kl(q, p) if chunk == 0 or acc.has("kl_analytic") else None
            if kl is not None:
                acc.add("kl_analytic", kl)
            else:
                acc.drop("kl_analytic")  # all images get the same method: Monte Carlo from here on
            q_marg, p_marg = _normal_marginals(q), _normal_marginals(p)
            if q_marg is not None and p_marg is not None and (chunk == 0 or acc.has("kl_dims")):
                acc.add("kl_dims", kl_divergence(q_marg, p_marg))  # (B, L)
            else:
                acc.drop("kl_dims")
            # K particles in passes of at most chunk_size particles × images.
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
    return acc


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
) -> EvalResult:
    """Evaluate a trained model on the images ``x`` (see the module docstring for every quantity).

    :param vae: a :class:`~pyro_vae.model.VAE` (or any model with ``model``, ``guide`` and ``likelihood.name``).
    :param x: ``(N, D)`` images on the model's device, binarised as the likelihood needs.
    :param ks: particle counts of the importance-weighted bounds, default ``(1, 100, 1000)``; the largest is drawn
        once per image and the smaller ones reuse its draws in disjoint groups.
    :param protocol: how ``x`` was made (data set, split, binarisation and its seed); recorded in the result.
    :param int chunk_size: particles × images per forward pass (default 4096); bounds the memory.
    :param int seed: seed of the evaluation noise.
    :param str latent_site: the latent sample site for active units and KL per dimension.
    :returns: an :class:`EvalResult`.
    """
    ks = _check_ks(ks)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ConfigError(f"chunk_size must be a positive integer (particles × images per pass), got {chunk_size!r}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise DataError(f"evaluate needs images of shape (N, D) with N >= 1, got {tuple(x.shape)}")
    protocol = protocol or DataProtocol()
    num_particles = ks[-1]
    images_per_chunk = max(1, chunk_size // num_particles)
    particles_per_pass = min(num_particles, chunk_size)
    n_images = x.shape[0]

    was_training = vae.training
    vae.eval()
    try:
        with own_rng(x, seed):
            acc = _evaluate_chunks(vae, x, ks, images_per_chunk, particles_per_pass, latent_site)
    finally:
        vae.train(was_training)

    reconstruction = acc.get("reconstruction")
    kl_analytic = acc.has("kl_analytic")
    kl = acc.get("kl_analytic") if kl_analytic else acc.get("kl_mc")
    means = acc.get("mean")  # (N, L)
    activity = means.var(0, unbiased=True) if n_images > 1 else torch.zeros(means.shape[-1], dtype=means.dtype)
    bits = 1.0 / (x.shape[1] * math.log(2))
    bounds = []
    for k in ks:
        log_px = acc.get(f"iw{k}")
        bounds.append(IWBound(k, mean_se(log_px), mean_se(-log_px * bits), num_particles // k))
    return EvalResult(
        protocol=Protocol(*protocol, vae.likelihood.name, ks, n_images),
        elbo=mean_se(reconstruction - kl),
        reconstruction=mean_se(reconstruction),
        kl=mean_se(kl),
        kl_method="analytic" if kl_analytic else "monte_carlo",
        bounds=tuple(bounds),
        active_units=int((activity > ACTIVE_UNIT_THRESHOLD).sum()),
        latent_activity=tuple(activity.tolist()),
        kl_per_dim=tuple(acc.get("kl_dims").mean(0).tolist()) if acc.has("kl_dims") else None,
        input_dim=x.shape[1],
        seed=seed,
    )
