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
    "BITS_RULES",
    "DataProtocol",
    "EvalResult",
    "IWBound",
    "Protocol",
    "ProtocolMismatchError",
    "bits_per_dim",
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
    """Everything that must agree for two evaluation numbers to be comparable: the :class:`DataProtocol`'s fields,
    the likelihood's spec (e.g. ``gaussian:learned``), the ks, the number of images, and the likelihood's clamp."""

    dataset: str
    split: str
    binarize: str
    binarize_seed: int | None
    likelihood: str
    ks: tuple[int, ...]
    num_images: int
    #: The likelihood's clamp ε (``beta``: observations scored at ``clamp(x, ε, 1 − ε)``), ``None`` for the others
    #: and for records written before the field existed.
    clamp: float | None = None
    #: What the bounds estimate: ``"log p(x)"``, or ``"log p(x | y)"`` for a conditional model given the labels (a
    #: CVAE's numbers are not comparable with a VAE's).
    target: str = "log p(x)"

    def mismatches(self, other: Protocol) -> list[str]:
        """``["field: mine vs other", ...]`` for every field that differs."""
        return [f"{f}: {a!r} vs {b!r}" for f, a, b in zip(self._fields, self, other, strict=True) if a != b]

    def describe(self) -> str:
        seed = "" if self.binarize_seed is None else f" (seed {self.binarize_seed})"
        return (
            f"{self.dataset} {self.split} split, {self.num_images} images, binarize={self.binarize}{seed}, "
            f"likelihood={self.likelihood}"
            + ("" if self.clamp is None else f" (clamped to [{self.clamp:g}, 1 − {self.clamp:g}])")
            + f", k={','.join(map(str, self.ks))}"
            + ("" if self.target == "log p(x)" else f", bounds on {self.target}")
        )


class ProtocolMismatchError(ConfigError):
    """Two evaluation results were made under different protocols and cannot be compared."""


# ------------------------------------------------------------------------------------------------------------------
# Results
class IWBound(NamedTuple):
    r"""The importance-weighted estimate of log p(x) with k particles.

    :ivar k: particles per estimate.
    :ivar log_px: mean over images of :math:`\hat{\mathcal{L}}_k(x_i)`, nats per image, ± standard error.
    :ivar bits_per_dim: :math:`\hat{\mathcal{L}}_k` in bits per dimension ± standard error (:func:`bits_per_dim`),
        ``None`` where bits/dim are not defined.
    :ivar groups: disjoint groups of k particles averaged per image.
    """

    k: int
    log_px: MeanSE
    bits_per_dim: MeanSE | None
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
    :ivar bits_rule: how nats became bits per dimension, a key of :data:`BITS_RULES` (``"discrete"`` in records
        written before the field existed).
    :ivar active_directions: eigenvalues of :math:`\operatorname{Cov}_x(\mathbb{E}_q[z])` above the threshold, the
        rotation-invariant count of active dimensions (:func:`pyro_vae.evaluation.active_directions`); ``None`` in
        records written before it existed.
    :ivar accuracy: the share of images whose most probable class under q(y | x) is their label ± standard error,
        for a model with a classifier (M2); ``None`` otherwise.
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
    bits_rule: str = "discrete"
    active_directions: int | None = None
    accuracy: MeanSE | None = None

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
                    "bits_per_dim": None if b.bits_per_dim is None else b.bits_per_dim.mean,
                    "bits_per_dim_se": None if b.bits_per_dim is None else b.bits_per_dim.se,
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
            "bits_rule": self.bits_rule,
            "accuracy": None if self.accuracy is None else self.accuracy.mean,
            "accuracy_se": None if self.accuracy is None else self.accuracy.se,
        }

    @classmethod
    def from_json(cls, record: dict) -> EvalResult:
        """Inverse of :meth:`to_json` (for comparing saved ``eval.json`` files)."""
        try:
            protocol = Protocol(
                **{f: _recorded(record, Protocol, f) for f in Protocol._fields if f != "ks"}, ks=tuple(record["ks"])
            )
            bounds = tuple(
                IWBound(
                    b["k"],
                    MeanSE(b["log_px"], b["log_px_se"]),
                    None if b["bits_per_dim"] is None else MeanSE(b["bits_per_dim"], b["bits_per_dim_se"]),
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
                bits_rule=_recorded(record, cls, "bits_rule"),
                active_directions=record.get("active_directions"),  # absent from records written before it
                accuracy=None if record.get("accuracy") is None else MeanSE(record["accuracy"], record["accuracy_se"]),
            )
        except (KeyError, TypeError) as err:
            raise DataError(f"not an evaluation record written by EvalResult.to_json: missing or bad {err}") from None

    def rows(self) -> list[tuple[str, str, str]]:
        """``(metric, nats per image, bits per dimension)`` rows of :meth:`table`; the ELBO row names the split, and
        the bits column follows :attr:`bits_rule` (``n/a`` where the rule defines no bits/dim)."""
        elbo_bpd = bits_per_dim(self.elbo, self.input_dim, self.bits_rule)
        bpd = _fmt_bpd
        rows = [
            (f"{self.protocol.split} ELBO", str(self.elbo), bpd(elbo_bpd)),
            ("  reconstruction", str(self.reconstruction), ""),
            (f"  KL ({self.kl_method.replace('_', ' ')})", str(self.kl), ""),
        ]
        target = self.protocol.target
        rows += [(f"{target}, k={b.k}", str(b.log_px), bpd(b.bits_per_dim)) for b in self.bounds]
        rows.append(("NLL" if target == "log p(x)" else f"-{target}", str(self.nll), ""))
        latent_dim = len(self.latent_activity)
        rows.append(("active units", f"{self.active_units} of {latent_dim}", ""))
        directions = "n/a" if self.active_directions is None else f"{self.active_directions} of {latent_dim}"
        rows.append(("active directions", directions, ""))
        if self.accuracy is not None:
            rows.append(("accuracy of q(y|x)", str(self.accuracy), ""))
        return rows

    def table(self) -> str:
        """A printable table of every number, with the protocol underneath."""
        lines = [f"{'metric':<20}{'nats/image':>20}{'bits/dim':>20}"]
        lines += [f"{m:<20}{a:>20}{b:>20}" for m, a, b in self.rows()]
        lines.append(f"(bits/dim: {BITS_RULES[self.bits_rule]})")
        lines.append(f"({self.protocol.describe()}; eval seed {self.seed})")
        return "\n".join(lines)


def _recorded(record: dict, klass, name: str):
    """``record[name]``, or the NamedTuple field's default for a field newer than the record."""
    defaults = klass._field_defaults
    return record.get(name, defaults[name]) if name in defaults else record[name]


def _fmt_bpd(value: MeanSE | None) -> str:
    return "n/a" if value is None else f"{value.mean:.4f} ± {value.se:.4f}"


#: How :func:`bits_per_dim` turns nats per image into bits per dimension, and the note each table prints.
BITS_RULES = {
    "discrete": "-log2 p(x) / D of a discrete likelihood",
    "dequantized": "(-log p(x) + D log 256) / (D log 2): a continuous density on 8-bit data, "
    "the dequantisation offset log 256 per dimension included",
    "off_grid": "not reported: a continuous density on data that are not 8-bit has no bits/dim; see nats",
    "unnormalized": "not reported: the likelihood fits itself to each image (not a normalised density); see nats",
}


def bits_per_dim(log_px: MeanSE, input_dim: int, rule: str) -> MeanSE | None:
    r"""Bits per dimension of a per-image log-likelihood ``log_px`` (nats, mean ± SE), or ``None`` where the rule
    defines none.

    * ``discrete`` (a probability mass function: ``bernoulli``, ``discretized_logistic``):
      :math:`\text{bits/dim} = -\log p(x) / (D \ln 2)`.
    * ``dequantized`` (a density on 8-bit data scaled to [0, 1]): cut [0, 1] into 256 bins of width
      :math:`\Delta = 1/256`; level k (value k/255, which lies in bin k) has probability
      :math:`P(k) = \int_{\text{bin } k} p(y)\,dy \approx p(k/255)\,\Delta` (uniform dequantisation, Theis et al.
      2016: the integral is :math:`\Delta\,\mathbb{E}_{u \sim U[0,1)}[p((k + u)/256)]`, here taken at one point of
      the bin). Over D pixels :math:`-\log P(x) \approx -\log p(x) + D \log 256`, so

      .. math:: \text{bits/dim} = \frac{-\log p(x) + D \log 256}{D \ln 2} = \frac{-\log p(x)}{D \ln 2} + 8.

    * ``off_grid`` (a density on data that are not 8-bit, binary data included) and ``unnormalized``: ``None``.

    The transformation is affine, so the standard error scales by :math:`1 / (D \ln 2)`.

    :param log_px: log p(x) in nats per image, mean ± SE.
    :param int input_dim: D.
    :param str rule: a key of :data:`BITS_RULES`.
    """
    if rule not in BITS_RULES:
        raise ConfigError(f"unknown bits/dim rule {rule!r}; choose one of: {', '.join(BITS_RULES)}")
    if rule in ("off_grid", "unnormalized"):
        return None
    offset = input_dim * math.log(256.0) if rule == "dequantized" else 0.0
    to_bits = 1.0 / (input_dim * math.log(2.0))
    return MeanSE((offset - log_px.mean) * to_bits, log_px.se * to_bits)


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
