"""Typed, validated configuration.

Four frozen dataclasses describe a run: :class:`DataConfig`, :class:`ModelConfig`, :class:`TrainConfig`, and the
:class:`RunConfig` that groups them. Each validates itself in ``__post_init__`` and raises
:class:`~pyro_vae.errors.ConfigError` with what was expected, what came, and what to do. Nothing here reads the
environment, touches files, or builds torch objects: configs are plain data that round-trip through
:meth:`RunConfig.to_dict` / :meth:`RunConfig.from_dict` (and hence JSON).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pyro_vae.errors import ConfigError, unknown_choice

DATASETS = ("embedded", "fashion-mnist", "mnist", "npz")
BINARIZATIONS = ("dynamic", "static", "threshold", "none")
DEVICES = ("auto", "cpu", "cuda")
DIST_BACKENDS = ("auto", "gloo", "nccl")
#: What training does on a non-finite loss or gradient (see :class:`pyro_vae.optim.SingleOptimizer`).
NONFINITE_POLICIES = ("raise", "skip")
ACTIVATIONS = ("silu", "relu", "gelu", "tanh", "softplus")

#: Default directory of Debian's ``dataset-fashion-mnist`` package.
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _close(name: str, choices) -> list[str]:
    import difflib

    return difflib.get_close_matches(str(name), sorted(choices), n=1)


def _choice(what: str, value: str, choices) -> None:
    if value not in choices:
        raise unknown_choice(what, value, choices)


def _positive_int(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _positive_float(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")


class ObjectiveSpec(NamedTuple):
    """A parsed objective spec ``name[:k[:estimator]]`` (see :func:`parse_objective_spec`)."""

    name: str
    num_particles: int | None
    estimator: str | None


def parse_objective_spec(spec: str) -> ObjectiveSpec:
    """Split an objective spec such as ``"trace"``, ``"trace:4"``, ``"iwae:5"`` or ``"iwae:5:dreg"``.

    Only the grammar is checked here (config stays free of torch); :func:`pyro_vae.objectives.make_objective`
    checks the names against its registry.

    :param str spec: ``name``, ``name:k`` (k particles per data point) or ``name:k:estimator``.
    :raises ConfigError: if the spec does not have that form or k is not a positive integer.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"an objective must be a non-empty string such as 'trace' or 'iwae:5:dreg', got {spec!r}")
    parts = spec.split(":")
    if len(parts) > 3 or not all(parts):
        raise ConfigError(f"objective {spec!r} is not of the form name[:k[:estimator]]; write e.g. 'iwae:5:dreg'")
    k = None
    if len(parts) > 1:
        try:
            k = int(parts[1])
        except ValueError:
            raise ConfigError(f"in objective {spec!r}, k={parts[1]!r} is not an integer; write e.g. 'iwae:5'") from None
        if k <= 0:
            raise ConfigError(f"in objective {spec!r}, k must be a positive number of particles, got {k}")
    return ObjectiveSpec(parts[0], k, parts[2] if len(parts) == 3 else None)


class ScheduleSpec(NamedTuple):
    """A parsed KL-schedule spec ``name[:number[:number...]]`` (see :func:`parse_schedule_spec`)."""

    name: str
    args: tuple[float, ...]


def parse_schedule_spec(spec: str) -> ScheduleSpec:
    """Split a KL-schedule spec such as ``"constant:0.5"``, ``"linear:10000"``, ``"cyclical:5000:0.5"`` or
    ``"free_bits:0.25"`` into its name and numbers.

    Only the grammar is checked here; :func:`pyro_vae.schedules.make_schedule` checks the name and the arity.

    :raises ConfigError: if the spec is empty or a number is not finite and >= 0.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"a KL schedule must be a non-empty string such as 'linear:10000', got {spec!r}")
    name, *raw = spec.split(":")
    args = []
    for text in raw:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"in KL schedule {spec!r}, {text!r} is not a number; write e.g. 'linear:10000'") from None
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"in KL schedule {spec!r}, every number must be finite and >= 0, got {text!r}")
        args.append(value)
    if not name:
        raise ConfigError(f"KL schedule {spec!r} has no name; write e.g. 'linear:10000'")
    return ScheduleSpec(name, tuple(args))


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are binarised.

    :param str dataset: ``embedded`` (the Fashion-MNIST subset shipped with the package: works offline),
        ``fashion-mnist`` (IDX files in ``data_dir``), ``mnist`` (torchvision, downloads into ``data_dir``), or
        ``npz`` (the user's file at ``path``).
    :param path: the ``.npz`` file for ``dataset="npz"``.
    :param data_dir: directory of the IDX files (default: Debian's ``/usr/share/datasets/fashion-mnist``) or the
        torchvision root for MNIST (default ``./data``).
    :param str binarize: protocol for Bernoulli likelihoods. ``dynamic`` draws Bernoulli(pixel) afresh every epoch
        from a seeded generator (the standard protocol for binarised image VAEs, which regularises);
        ``static`` draws once; ``threshold`` uses ``pixel > threshold``; ``none`` keeps grey levels.
    :param float threshold: cut-off for ``binarize="threshold"``.
    :param float test_fraction: share of an ``.npz`` held out as the test split when the file has no ``x_test``.
    :param n_train: use only the first ``n_train`` training images (quick experiments); ``None`` uses all.
    :param n_test: likewise for the test split.
    """

    dataset: str = "embedded"
    path: str | None = None
    data_dir: str | None = None
    binarize: str = "dynamic"
    threshold: float = 0.5
    test_fraction: float = 0.1
    n_train: int | None = None
    n_test: int | None = None

    def __post_init__(self):
        _choice("dataset", self.dataset, DATASETS)
        _choice("binarization", self.binarize, BINARIZATIONS)
        if self.dataset == "npz" and not self.path:
            raise ConfigError("dataset 'npz' needs a file: pass --data FILE.npz")
        if self.dataset != "npz" and self.path:
            raise ConfigError(
                f"a data file was given ({self.path!r}) but dataset is {self.dataset!r}; use dataset 'npz'"
            )
        if not (0.0 < self.threshold < 1.0):
            raise ConfigError(f"threshold must lie in (0, 1), got {self.threshold!r}")
        if not (0.0 < self.test_fraction < 1.0):
            raise ConfigError(f"test_fraction must lie in (0, 1), got {self.test_fraction!r}")
        _positive_int("n_train", self.n_train, allow_none=True)
        _positive_int("n_test", self.n_test, allow_none=True)


@dataclass(frozen=True)
class ModelConfig:
    """The VAE: latent size, networks, guide family and likelihood.

    :param int latent_dim: dimension L of z.
    :param hidden_dims: encoder hidden widths from the input side; the decoder uses them reversed. The default
        ``(512, 256, 128, 64)`` is the seed network, whose last hidden width is ``512 // 8``.
    :param str activation: non-linearity between layers (SiLU in the seed).
    :param str guide: name of a registered guide family (see :func:`pyro_vae.guides.family_names`).
    :param dict guide_options: keyword options for the family, e.g. ``{"eps": 1e-5}``.
    :param str likelihood: name of a registered likelihood (see :func:`pyro_vae.likelihoods.likelihood_names`).
    """

    latent_dim: int = 16
    hidden_dims: tuple[int, ...] = (512, 256, 128, 64)
    activation: str = "silu"
    guide: str = "mvn_diag"
    guide_options: dict[str, Any] = field(default_factory=dict)
    likelihood: str = "bernoulli"

    def __post_init__(self):
        _positive_int("latent_dim", self.latent_dim)
        object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
        if not self.hidden_dims:
            raise ConfigError("hidden_dims must name at least one hidden layer width, got an empty list")
        for width in self.hidden_dims:
            _positive_int("every hidden width", width)
        _choice("activation", self.activation, ACTIVATIONS)
        if not isinstance(self.guide_options, dict):
            raise ConfigError(f"guide_options must be a dict, got {type(self.guide_options).__name__}")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation.

    :param int epochs: passes over the training split.
    :param int batch_size: images per step (the plate's ``subsample_size``).
    :param float lr: AdamW learning rate.
    :param float weight_decay: AdamW decoupled weight decay; 0 keeps the objective the plain ELBO.
    :param clip_norm: clip the total gradient norm to this value; ``None`` disables clipping.
    :param str objective: ``trace`` (:class:`~pyro.infer.Trace_ELBO`), ``meanfield``
        (:class:`~pyro.infer.TraceMeanField_ELBO`, analytic KL where Pyro has one) or ``iwae`` (the importance-weighted
        bound); ``name:k`` sets k particles and ``iwae:k:estimator`` the gradient estimator (``reparam``, ``stl``,
        ``dreg``). See :func:`pyro_vae.objectives.make_objective`.
    :param int num_particles: samples of z per image per step (vectorised); a k in ``objective`` sets it instead.
    :param kl_schedule: weight of the KL term over training, e.g. ``"linear:10000"`` (warm-up over 10 000 steps),
        ``"cyclical:5000:0.5"``, ``"constant:0.5"`` or ``"free_bits:0.25"``; ``None`` (default) is the plain ELBO.
        See :func:`pyro_vae.schedules.make_schedule`.
    :param int seed: seeds weights, data order, binarisation and the guide's noise.
    :param str device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    :param max_steps: stop after this many optimiser steps in total (``None``: run all epochs).
    :param threads: torch intra-op threads (``None``: leave torch's default). Recorded for reproducibility.
    :param progress: show a tqdm bar; ``None`` shows it only on a terminal.
    :param checkpoint_every: also write a checkpoint every this many steps (``None``: only at the end of each epoch,
        at the end of training and on SIGINT/SIGTERM). Costs one serialisation and fsync per checkpoint.
    :param int keep_last: checkpoints kept in the run directory, newest first: ``last.pt``, ``last.prev.pt``, ...
        The default 2 keeps one good file even if the newest is damaged.
    :param str on_nonfinite: ``raise`` (default) stops on a NaN or infinite loss or gradient, naming the step and the
        site; ``skip`` skips such batches (no step either way).
    :param int max_skips: with ``on_nonfinite="skip"``, the most batches skipped in a run before it stops anyway.
    :param str dist_backend: process-group backend under ``torchrun``: ``auto`` (``nccl`` on CUDA, ``gloo`` on CPU),
        ``gloo`` or ``nccl``. Ignored in a single process. Under torchrun, ``batch_size`` is per process.
    """

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_norm: float | None = None
    objective: str = "trace"
    num_particles: int = 1
    kl_schedule: str | None = None
    seed: int = 0
    device: str = "auto"
    max_steps: int | None = None
    threads: int | None = None
    progress: bool | None = None
    checkpoint_every: int | None = None
    keep_last: int = 2
    on_nonfinite: str = "raise"
    max_skips: int = 10
    dist_backend: str = "auto"

    def __post_init__(self):
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_float("lr", self.lr)
        if (
            isinstance(self.weight_decay, bool)
            or not isinstance(self.weight_decay, (int, float))
            or not (math.isfinite(self.weight_decay) and self.weight_decay >= 0)
        ):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        _positive_float("clip_norm", self.clip_norm, allow_none=True)
        _positive_int("num_particles", self.num_particles)
        spec = parse_objective_spec(self.objective)
        if spec.num_particles is not None and self.num_particles not in (1, spec.num_particles):
            raise ConfigError(
                f"objective {self.objective!r} asks for {spec.num_particles} particles but num_particles is "
                f"{self.num_particles}; give the number once, in the objective or in num_particles"
            )
        if self.kl_schedule is not None:
            parse_schedule_spec(self.kl_schedule)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        _choice("device", self.device, DEVICES)
        _positive_int("max_steps", self.max_steps, allow_none=True)
        _positive_int("threads", self.threads, allow_none=True)
        _positive_int("checkpoint_every", self.checkpoint_every, allow_none=True)
        _positive_int("keep_last", self.keep_last)
        _choice("non-finite policy", self.on_nonfinite, NONFINITE_POLICIES)
        if isinstance(self.max_skips, bool) or not isinstance(self.max_skips, int) or self.max_skips < 0:
            raise ConfigError(f"max_skips must be an integer >= 0, got {self.max_skips!r}")
        _choice("distributed backend", self.dist_backend, DIST_BACKENDS)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run; saved as ``config.json`` in the run directory."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.model.likelihood == "bernoulli" and self.data.binarize == "none":
            raise ConfigError(
                "the bernoulli likelihood needs binary data but binarize is 'none'; "
                "use --likelihood continuous_bernoulli, or --binarize dynamic|static|threshold"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict."""
        out = dataclasses.asdict(self)
        out["model"]["hidden_dims"] = list(self.model.hidden_dims)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        if not isinstance(d, dict):
            raise ConfigError(f"a run config must be a mapping, got {type(d).__name__}")
        unknown = set(d) - {"data", "model", "train"}
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; expected 'data', 'model', 'train'")
        parts = {}
        for name, klass in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)):
            section = d.get(name, {})
            if not isinstance(section, dict):
                raise ConfigError(f"config section {name!r} must be a mapping, got {type(section).__name__}")
            known = {f.name for f in dataclasses.fields(klass)}
            bad = set(section) - known
            if bad:
                hints = [f"{key!r} → {close[0]!r}" for key in sorted(bad) if (close := _close(key, known))]
                raise ConfigError(
                    f"unknown key(s) {sorted(bad)} in config section {name!r}; known: {sorted(known)}"
                    + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                )
            parts[name] = klass(**section)
        return cls(**parts)

    def replace(self, **sections: dict[str, Any]) -> RunConfig:
        """Return a copy with fields of the named sections replaced, e.g. ``cfg.replace(train={"epochs": 2})``."""
        parts = {}
        for name, changes in sections.items():
            current = getattr(self, name)
            parts[name] = dataclasses.replace(current, **changes)
        return dataclasses.replace(self, **parts)
