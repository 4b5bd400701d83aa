"""Typed, validated configuration.

Four frozen dataclasses describe a run: :class:`DataConfig`, :class:`ModelConfig`, :class:`TrainConfig`, and the
:class:`RunConfig` that groups them. Each field's ``field(metadata=...)`` documents it: ``help`` (one line, also the
flag's help: :mod:`pyro_vae.cli` generates its flags from this metadata), ``flag`` (its name, or ``None`` for a field
only a ``--config`` file sets, with the ``reason``), ``low``/``high`` (bounds; ``open_low``/``open_high`` make them
exclusive; ``why`` says why a bound is the largest), ``choices`` (a tuple of names, or a registry key such as
``"guides"`` that the CLI resolves torch-free) and ``resume: "free"`` (a resumed run may change it, see
:func:`resume_differences`). Every config checks every field in ``__post_init__`` against its annotation and metadata
(:func:`check_field`): a JSON file with ``"threshold": "0.5"`` or ``"guide": 3`` gets one
:class:`~pyro_vae.errors.ConfigError` naming the field, the expected type and the value. Nothing here reads the
environment, touches files or builds torch objects: configs are plain data that round-trip through
:meth:`RunConfig.to_dict` and :meth:`RunConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from pyro_vae.config.checks import INT64_MAX, check_field, check_fields, check_float, check_int, option
from pyro_vae.config.data_kinds import LIKELIHOOD_SUPPORT, check_admits, known_data_kind
from pyro_vae.config.specs import (
    ObjectiveSpec,
    ScheduleSpec,
    parse_component_spec,
    parse_objective_spec,
    parse_schedule_spec,
)
from pyro_vae.errors import ConfigError

__all__ = [
    "ACTIVATIONS",
    "BINARIZATIONS",
    "CLOSED_FORM_KL_PRIORS",
    "DATASETS",
    "DEFAULT_FASHION_MNIST_DIR",
    "DEVICES",
    "DIST_BACKENDS",
    "INT64_MAX",
    "MODEL_KINDS",
    "NONFINITE_POLICIES",
    "SECTIONS",
    "SEED_MAX",
    "DataConfig",
    "ModelConfig",
    "ObjectiveSpec",
    "RunConfig",
    "ScheduleSpec",
    "TrainConfig",
    "check_field",
    "check_float",
    "check_int",
    "parse_objective_spec",
    "parse_schedule_spec",
    "resume_differences",
    "resume_free_fields",
]

DATASETS = ("embedded", "fashion-mnist", "mnist", "npz")
BINARIZATIONS = ("dynamic", "static", "threshold", "none")
DEVICES = ("auto", "cpu", "cuda")
DIST_BACKENDS = ("auto", "gloo", "nccl")
#: What training does on a non-finite loss or gradient (see :class:`pyro_vae.optim.SingleOptimizer`).
NONFINITE_POLICIES = ("raise", "skip")
ACTIVATIONS = ("silu", "relu", "gelu", "tanh", "softplus")
#: The models (``--model``): the VAE, the conditional VAE (Sohn et al. 2015) and the semi-supervised M2 (Kingma et al.
#: 2014); the last two read labels (:mod:`pyro_vae.labelled`).
MODEL_KINDS = ("vae", "cvae", "m2")
#: The priors with a closed-form KL against Gaussian guides, the only ones the ``meanfield`` objective and the
#: ``free_bits`` KL schedule take (those whose class says ``standard_normal``; a test checks this against
#: :mod:`pyro_vae.priors`, which config may not import).
CLOSED_FORM_KL_PRIORS = ("standard",)

#: Default directory of Debian's ``dataset-fashion-mnist`` package.
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: Seeds go to numpy (through :func:`pyro.set_rng_seed`), whose seeds are 32-bit: ``0 <= seed < 2**32``.
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are binarised. ``embedded``: the Fashion-MNIST subset shipped with the
    package (offline); ``fashion-mnist``: IDX files in ``data_dir`` (default: Debian's
    ``/usr/share/datasets/fashion-mnist``); ``mnist``: torchvision, downloaded into ``data_dir`` (default ``./data``);
    ``npz``: the user's file at ``path``. Binarisation (for Bernoulli likelihoods): ``dynamic`` draws Bernoulli(pixel)
    afresh every epoch from a seeded generator (the standard protocol for binarised image VAEs; it regularises),
    ``static`` draws once, ``threshold`` uses ``pixel > threshold``, ``none`` keeps grey levels.
    """

    dataset: str = option("embedded", "data source (embedded works offline)", choices=DATASETS, what="dataset")
    path: str | None = option(
        None, "your .npz file (x, optional y, x_test, y_test, layout); implies --dataset npz", flag="--data"
    )
    data_dir: str | None = option(
        None, "directory of the Fashion-MNIST IDX files, or the MNIST download root", resume="free"
    )
    binarize: str = option("dynamic", "binarisation protocol", choices=BINARIZATIONS, what="binarization")
    threshold: float = option(0.5, "cut-off of --binarize threshold", low=0.0, high=1.0, open_low=True, open_high=True)
    test_fraction: float = option(
        0.1, "share of an .npz without x_test held out", low=0.0, high=1.0, open_low=True, open_high=True
    )
    n_train: int | None = option(None, "use only the first N training images (default: all)", low=1)
    n_test: int | None = option(None, "use only the first N test images (default: all)", low=1)
    labelled: int | None = option(
        None, "--model m2/cvae: keep labels for N training images, stratified per class (default: all)", low=1
    )

    def __post_init__(self):
        check_fields(self)
        if self.dataset == "npz" and not self.path:
            raise ConfigError("dataset 'npz' needs a file: pass --data FILE.npz")
        if self.dataset != "npz" and self.path:
            raise ConfigError(
                f"a data file was given ({self.path!r}) but dataset is {self.dataset!r}; use dataset 'npz'"
            )


@dataclass(frozen=True)
class ModelConfig:
    """The VAE. ``hidden_dims``: encoder widths from the input side, reversed for the decoder; the default
    ``(512, 256, 128, 64)`` is the seed network (last hidden width ``512 // 8``). ``guide``: a family of
    :func:`pyro_vae.guides.family_names` (``name`` or ``name:K``) with keyword ``guide_options`` (e.g.
    ``{"eps": 1e-5}``). ``likelihood``: one of :func:`pyro_vae.likelihoods.likelihood_names` (``name`` or
    ``name:option``). ``prior``: one of :func:`pyro_vae.priors.prior_names` (``name`` or ``name:K``). ``network``: one
    of :func:`pyro_vae.networks.network_names`; ``hidden_dims`` are the ``mlp``'s widths, ``conv_channels`` the
    ``conv``'s (the default ``(32, 64)``: two stride-2 layers, 28×28 → 7×7).
    """

    latent_dim: int = option(
        16, "latent dimension L", low=1, high=4096, why="a full-rank guide emits L(L+3)/2 numbers per image"
    )
    hidden_dims: tuple[int, ...] = option(
        (512, 256, 128, 64),
        "comma-separated encoder widths of --network mlp",
        high=16384,
        why="a 16384² layer is 1 GiB of weights",
    )
    activation: str = option("silu", "non-linearity between layers", choices=ACTIVATIONS, what="activation")
    guide: str = option("mvn_diag", "guide family, name or name:K", choices="guides", what="guide family", spec=True)
    guide_options: dict[str, Any] = option(
        help="keyword options of the guide family", factory=dict, flag=None, reason="a mapping: set it in --config"
    )
    likelihood: str = option(
        "bernoulli", "p(x|z), name or name:option", choices="likelihoods", what="likelihood", spec=True
    )
    prior: str = option(
        "standard", "p(z): standard, or a learned mog:K, vamp:K or flow:K", choices="priors", what="prior", spec=True
    )
    network: str = option("mlp", "encoder and decoder networks", choices="networks", what="network")
    conv_channels: tuple[int, ...] = option(
        (32, 64),
        "comma-separated channel widths of --network conv, one stride-2 layer each",
        high=4096,
        why="a 4096→4096 3×3 layer is 600 MB of weights",
    )
    kind: str = option("vae", "vae, cvae (conditional on labels) or m2 (labels for some images)", choices=MODEL_KINDS,
                       what="model", flag="--model")  # fmt: skip
    num_classes: int | None = option(
        None, "classes of a cvae/m2 (default: from the data's labels)", low=2, high=100_000, why="one-hot inputs"
    )
    aux_weight: float | None = option(
        None, "m2: weight α of the classification loss α·log q(y|x) on labelled images (default 0.1·N)", low=0.0
    )

    def __post_init__(self):
        check_fields(self)
        labelled = self.kind != "vae"
        if self.num_classes is not None and not labelled:
            raise ConfigError("num_classes belongs to --model cvae or m2; a plain VAE has no classes: drop it")
        if self.aux_weight is not None and self.kind != "m2":
            raise ConfigError(f"aux_weight weighs M2's classifier; --model {self.kind} has none: drop --aux-weight")
        if labelled and parse_component_spec(self.prior, "prior").name == "vamp":
            raise ConfigError(
                f"the VampPrior mixes q(z | x) over pseudo-inputs, but --model {self.kind} encodes q(z | x, y); "
                "use --prior standard, mog:K or flow:K"
            )


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation. ``objective``: ``trace``, ``meanfield`` (analytic KL where Pyro has one) or ``iwae``;
    ``name:k`` sets k particles, ``iwae:k:estimator`` the estimator (``reparam``, ``stl``, ``dreg``); see
    :func:`pyro_vae.objectives.make_objective`. ``kl_schedule``: :func:`pyro_vae.schedules.make_schedule` (``None``,
    ``"none"``: the plain ELBO); the default warm-up ends at weight 1 after 1 000 of the quickstart's 1 580 steps
    (benchmarks/README.md, "Defaults"). Under torchrun ``batch_size`` is per process. ``keep_last``: checkpoints kept,
    newest first; 2 keeps a good file if the newest is damaged. ``early_stop``: stop after that many epochs whose test
    ELBO does not beat the best by more than ``early_stop_min_delta`` nats.
    """

    epochs: int = option(20, "passes over the training data", low=1, resume="free")
    batch_size: int = option(128, "images per step", low=1, high=2**20, why="larger batches do not fit in memory")
    lr: float = option(1e-3, "AdamW learning rate", low=0.0, open_low=True)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay (0: the plain ELBO)", low=0.0)
    clip_norm: float | None = option(None, "clip the total gradient norm to this value", low=0.0, open_low=True)
    objective: str = option(
        "trace",
        "ELBO estimator: trace, meanfield, name:K for K particles, or iwae:K[:reparam|stl|dreg]",
        choices="objectives",
        what="objective",
        spec=True,
    )
    num_particles: int = option(
        1, "samples of z per image per step", flag="--particles", low=1, high=4096, why="all are held in memory"
    )
    kl_schedule: str | None = option(
        "linear:1000",
        "KL weight over training: linear:STEPS (warm-up), constant:BETA, cyclical:PERIOD[:RATIO], free_bits:NATS, none",
        choices="kl_schedules",
        what="KL schedule",
        spec=True,
    )
    seed: int = option(
        0, "seed of weights, data order, binarisation and noise", low=0, high=SEED_MAX, why="numpy seeds are 32-bit"
    )
    device: str = option("auto", "auto (CUDA when present), cpu or cuda", choices=DEVICES, what="device")
    max_steps: int | None = option(None, "stop after this many optimiser steps in total", low=1, resume="free")
    threads: int | None = option(
        None, "torch CPU threads (default: torch's)", low=1, high=4096, why="more than any CPU"
    )
    progress: bool | None = option(None, "progress bar (default: on a terminal)", resume="free")
    checkpoint_every: int | None = option(None, "also checkpoint every N steps", low=1, resume="free")
    keep_last: int = option(
        2, "checkpoints kept", low=1, high=100, why="each is a full copy rotated at every save", resume="free"
    )
    on_nonfinite: str = option(
        "raise",
        "on a NaN/inf loss or gradient: raise, or skip the batch",
        choices=NONFINITE_POLICIES,
        what="non-finite policy",
        resume="free",
    )
    max_skips: int = option(10, "with --on-nonfinite skip: the most batches skipped", low=0, resume="free")
    dist_backend: str = option(
        "auto", "under torchrun: auto (nccl on CUDA), gloo or nccl", choices=DIST_BACKENDS, what="distributed backend"
    )
    tensorboard: bool = option(False, "write TensorBoard scalars under RUN/tensorboard/", resume="free")
    early_stop: int | None = option(None, "stop after N epochs without a better test ELBO", low=1, resume="free")
    early_stop_min_delta: float = option(0.0, "the test ELBO gain (nats) that counts as better", low=0.0, resume="free")
    compile: bool = option(False, "compile the training step", resume="free")
    labelled_batch: int | None = option(
        None, "m2: labelled images in every step besides --batch-size unlabelled ones (default batch_size // 4)", low=1
    )

    def __post_init__(self):
        check_fields(self)
        spec = parse_objective_spec(self.objective)
        if spec.num_particles is not None and self.num_particles not in (1, spec.num_particles):
            raise ConfigError(
                f"objective {self.objective!r} asks for {spec.num_particles} particles but num_particles is "
                f"{self.num_particles}; give the number once, in the objective or in num_particles"
            )
        if self.kl_schedule is not None:
            parse_schedule_spec(self.kl_schedule)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run; saved as ``config.json`` in the run directory."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        self._check_labels()
        # The likelihood/data rule of pyro_vae.config.data_kinds, applied where the config alone tells the data's kind
        # (binarised, or a built-in grey data set); an npz file is checked once loaded (check_likelihood_data).
        kind = known_data_kind(self.data.binarize, self.data.dataset)
        support = LIKELIHOOD_SUPPORT.get(self.model.likelihood.partition(":")[0])
        if kind is not None and support is not None:
            check_admits(self.model.likelihood, support, kind, self.data.dataset, error=ConfigError)
        if parse_component_spec(self.model.prior, "prior").name not in CLOSED_FORM_KL_PRIORS:
            standard = " or ".join(CLOSED_FORM_KL_PRIORS)
            if parse_objective_spec(self.train.objective).name == "meanfield":
                raise ConfigError(
                    f"the meanfield objective needs a closed-form KL(q || p), which prior {self.model.prior!r} does "
                    f"not have; use --objective trace (or iwae:K), or --prior {standard}"
                )
            if self.train.kl_schedule is not None and parse_schedule_spec(self.train.kl_schedule).name == "free_bits":
                raise ConfigError(
                    f"the free_bits KL schedule needs the KL of each latent dimension, which prior "
                    f"{self.model.prior!r} does not factorise into; use another --kl-schedule, or --prior {standard}"
                )

    def _check_labels(self) -> None:
        """The options that only a model with labels reads, and what such a model cannot train with."""
        kind = self.model.kind
        if self.data.labelled is not None and kind == "vae":
            raise ConfigError(
                "--labelled chooses the labelled images of a model that reads labels; the plain VAE reads none: "
                "pass --model m2 (or cvae), or drop --labelled"
            )
        if self.train.labelled_batch is not None and kind != "m2":
            raise ConfigError(
                f"--labelled-batch sets M2's labelled images per step; --model {kind} has no such mix: pass "
                "--model m2, or drop --labelled-batch"
            )
        if kind == "m2" and parse_objective_spec(self.train.objective).name != "trace":
            raise ConfigError(
                f"--model m2 sums the unlabelled y out by enumeration (TraceEnum_ELBO), which objective "
                f"{self.train.objective!r} does not do; use --objective trace (or trace:K)"
            )
        schedule = self.train.kl_schedule
        if kind != "vae" and schedule is not None and parse_schedule_spec(schedule).name == "free_bits":
            raise ConfigError(
                f"the free_bits KL schedule is for the plain VAE; with --model {kind} use linear:STEPS, "
                "constant:BETA or cyclical:PERIOD"
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
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; expected 'data', 'model', 'train'")
        parts = {}
        for name, klass in SECTIONS.items():
            section = d.get(name, {})
            if not isinstance(section, dict):
                raise ConfigError(f"config section {name!r} must be a mapping, got {type(section).__name__}")
            known = {f.name for f in dataclasses.fields(klass)}
            bad = set(section) - known
            if bad:
                hints = [
                    f"{key!r} → {close[0]!r}"
                    for key in sorted(bad)
                    if (close := difflib.get_close_matches(key, sorted(known), n=1))
                ]
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


#: The sections of a :class:`RunConfig` and their classes.
SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def resume_free_fields() -> dict[str, frozenset[str]]:
    """Per section, the fields a resumed run may change (``resume: "free"`` in their metadata)."""
    return {
        name: frozenset(f.name for f in dataclasses.fields(klass) if f.metadata.get("resume") == "free")
        for name, klass in SECTIONS.items()
    }


def resume_differences(saved: dict, current: dict) -> list[str]:
    """The determinism-relevant config fields that differ between a checkpoint's config and the current one.

    :param dict saved: ``RunConfig.to_dict()`` stored in the checkpoint.
    :param dict current: the current ``RunConfig.to_dict()``, both resolved (threads and device filled in).
    :returns: ``["train.seed: 0 → 1", ...]``, empty when the run may resume.
    """
    saved = RunConfig.from_dict(saved).to_dict()  # fills fields newer than the checkpoint with their defaults
    out = []
    for section, free in resume_free_fields().items():
        before, after = saved[section], current[section]
        for key in sorted(set(before) | set(after)):
            if key not in free and before.get(key) != after.get(key):
                out.append(f"{section}.{key}: {before.get(key)!r} → {after.get(key)!r}")
    return out
