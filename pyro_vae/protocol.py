"""The records of an evaluation and the protocol that makes two of them comparable.

A :class:`DataProtocol` says how the evaluated images were made (data set, split, binarisation and its seed); a
:class:`Protocol` adds what the evaluator chose (likelihood, ks, number of images). Every :class:`EvalResult` carries
its :class:`Protocol`, and :func:`side_by_side` refuses to put results with different protocols in one table.
:func:`pyro_vae.evaluation.evaluate` makes these records; this module holds them and their tables, so that they
can be read back (:meth:`EvalResult.from_json`) and compared without the evaluator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from pyro_vae.config import DataConfig
from pyro_vae.data.batches import binarization_seed
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.stats import MeanSE

__all__ = [
    "DataProtocol",
    "EvalResult",
    "IWBound",
    "Protocol",
    "ProtocolMismatchError",
    "check_same_protocol",
    "side_by_side",
]


class DataProtocol(NamedTuple):
    """How the evaluated images were made: what :func:`~pyro_vae.evaluation.evaluate` cannot see in the tensor.

    :ivar dataset: e.g. ``"fashion-mnist"``.
    :ivar split: ``"test"``, ``"train"``, ...
    :ivar binarize: the binarisation protocol (:data:`pyro_vae.config.BINARIZATIONS`).
    :ivar binarize_seed: the seed of the binarisation draw (``None`` where there is none).
    """

    dataset: str = "unspecified"
    split: str = "test"
    binarize: str = "unspecified"
    binarize_seed: int | None = None

    @classmethod
    def from_config(cls, data: DataConfig, seed: int, *, dataset: str, split: str = "test") -> DataProtocol:
        """The protocol of a split binarised by :func:`pyro_vae.data.binarize_eval` under ``data`` and run seed
        ``seed``; the seed is recorded only where the binarisation draws (:func:`pyro_vae.data.batches.
        binarization_seed`).

        :param data: the run's data section (its ``binarize`` is read).
        :param int seed: the run seed.
        :param str dataset: the data set's name (``Dataset.name``).
        :param str split: ``"test"`` by default.
        """
        return cls(dataset, split, data.binarize, binarization_seed(data.binarize, seed))


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
    :ivar active_directions: eigenvalues of :math:`\operatorname{Cov}_x(\mathbb{E}_q[z])` above the threshold, the
        rotation-invariant count of active dimensions (:func:`pyro_vae.evaluation.active_directions`); ``None`` in
        records written before it existed.
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
    active_directions: int | None = None

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
            "active_directions": self.active_directions,
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
                active_directions=record.get("active_directions"),  # absent from records written before it
            )
        except (KeyError, TypeError) as err:
            raise DataError(f"not an evaluation record written by EvalResult.to_json: missing or bad {err}") from None

    @property
    def discrete(self) -> bool:
        """Whether log p(x) is a log probability mass (binarised images), so that bits per dimension are a code
        length. Without binarisation (``binarize="none"``: grey or real-valued data) it is a log density, which
        depends on the units of x and can exceed 0, and the tables leave bits/dim out."""
        return self.protocol.binarize != "none"

    def rows(self) -> list[tuple[str, str, str]]:
        """``(metric, nats per image, bits per dimension)`` rows of :meth:`table`; the ELBO row names the split,
        and the bits column is empty for data that are not :attr:`discrete`."""
        scale = 1.0 / (self.input_dim * math.log(2))
        elbo_bpd = MeanSE(-self.elbo.mean * scale, self.elbo.se * scale)

        def bpd(value: MeanSE) -> str:
            return _fmt_bpd(value) if self.discrete else ""

        rows = [
            (f"{self.protocol.split} ELBO", str(self.elbo), bpd(elbo_bpd)),
            ("  reconstruction", str(self.reconstruction), ""),
            (f"  KL ({self.kl_method.replace('_', ' ')})", str(self.kl), ""),
        ]
        rows += [(f"log p(x), k={b.k}", str(b.log_px), bpd(b.bits_per_dim)) for b in self.bounds]
        rows.append(("NLL", str(self.nll), ""))
        latent_dim = len(self.latent_activity)
        rows.append(("active units", f"{self.active_units} of {latent_dim}", ""))
        directions = "n/a" if self.active_directions is None else f"{self.active_directions} of {latent_dim}"
        rows.append(("active directions", directions, ""))
        return rows

    def table(self) -> str:
        """A printable table of every number, with the protocol underneath."""
        lines = [f"{'metric':<20}{'nats/image':>20}{'bits/dim' if self.discrete else '':>20}"]
        lines += [f"{m:<20}{a:>20}{b:>20}" for m, a, b in self.rows()]
        lines.append(f"({self.protocol.describe()}; eval seed {self.seed})")
        if not self.discrete:
            lines.append("(no bits/dim: the data are not binarised, so log p(x) is a density, not a code length)")
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
