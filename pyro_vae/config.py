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
import functools
import math
import types
import typing
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
#: The largest integer any field takes: counters are stored as 64-bit integers in checkpoints and tensors.
INT64_MAX = 2**63 - 1
#: Seeds go to numpy (through :func:`pyro.set_rng_seed`), whose seeds are 32-bit: ``0 <= seed < 2**32``.
SEED_MAX = 2**32 - 1


def check_int(
    name: str, value: Any, *, low: int | None = None, high: int | None = None, why: str = "", allow_none: bool = False
) -> int | None:
    """The one integer check: ``value`` must be an ``int`` (not a ``bool``) with ``low <= value <= high``.

    :param str name: how the error names the value, e.g. ``"latent_dim"``.
    :param low: the smallest allowed value; ``high`` the largest, and ``why`` says why (``None``: no bound).
    :param bool allow_none: whether ``None`` passes. :returns: ``value``.
    :raises ConfigError: ``"<name> must be a positive integer, got '3'"`` and the like, on one line.
    """
    if value is None and allow_none:
        return None
    words = {None: "an integer", 0: "an integer >= 0", 1: "a positive integer"}.get(low, f"an integer >= {low}")
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise ConfigError(f"{name} must be {words}" + (" or None" if allow_none else "") + f", got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{name} must be at most {high}" + (f" ({why})" if why else "") + f", got {value!r}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    allow_none: bool = False,
) -> float | None:
    """The one number check: ``value`` must be a finite ``int`` or ``float`` (not a ``bool``) in the interval from
    ``low`` to ``high``, each end closed unless ``open_low`` / ``open_high``.

    :returns: ``value``.
    :raises ConfigError: ``"lr must be a positive finite number, got -1"`` and the like, on one line.
    """
    if value is None and allow_none:
        return None
    if low is not None and high is not None:
        words = f"a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    elif low == 0:
        words = "a positive finite number" if open_low else "a finite number >= 0"
    else:
        words = "a finite number" + (f" {'>' if open_low else '>='} {low}" if low is not None else "")
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        raise ConfigError(f"{name} must be {words}" + (" or None" if allow_none else "") + f", got {value!r}")
    return value


def _kind(hint) -> tuple[Any, bool]:
    """``(base type, allows None)`` of an annotation such as ``int | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_field(cls: type, name: str, value: Any) -> Any:
    """Check ``value`` for the field ``name`` of the config class ``cls`` against its annotation and metadata.

    Registry names (choices given by a key such as ``"guides"``) are checked by :mod:`pyro_vae.cli` and the registry.

    :returns: the value, normalised (a list of hidden widths becomes a tuple).
    :raises ConfigError: one line naming the field, what was expected and the value.
    """
    spec = {f.name: f for f in dataclasses.fields(cls)}[name].metadata
    base, allow_none = _kind(_hints(cls)[name])
    if value is None or (value == "none" and allow_none and spec.get("spec")):  # "none": --kl-schedule none
        if allow_none:
            return None
        words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        expected = words.get(base, "a mapping" if typing.get_origin(base) is dict else "a list of integers")
        raise ConfigError(f"{name} must be {expected}, got null (None)")
    bounds = {"low": spec.get("low"), "high": spec.get("high", INT64_MAX), "why": spec.get("why", "")}
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(
                f"{name} must be {'true, false or null' if allow_none else 'true or false'}, got {value!r}"
            )
    elif base is int:
        check_int(name, value, **bounds)
    elif base is float:
        keys = ("low", "high", "open_low", "open_high")
        check_float(name, value, **{key: spec[key] for key in keys if spec.get(key) is not None})
    elif base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        if isinstance(spec.get("choices"), tuple):
            if value not in spec["choices"]:
                raise unknown_choice(spec.get("what", name), value, spec["choices"])
    elif typing.get_origin(base) is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{name} must be a non-empty list of integers, got {value!r}")
        for item in value:
            check_int(f"every entry of {name}", item, low=1, **{k: bounds[k] for k in ("high", "why")})
        return tuple(value)
    elif typing.get_origin(base) is dict and not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping, got {type(value).__name__} {value!r}")
    return value


def _check_fields(config) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        checked = check_field(type(config), f.name, value)
        if checked is not value:
            object.__setattr__(config, f.name, checked)


def _opt(default: Any = None, help: str = "", *, factory=None, **meta: Any):
    """A config field with its metadata (see the module docstring)."""
    meta["help"] = help
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class ObjectiveSpec(NamedTuple):
    """A parsed objective spec ``name[:k[:estimator]]`` (see :func:`parse_objective_spec`)."""

    name: str
    num_particles: int | None
    estimator: str | None


def parse_objective_spec(spec: str) -> ObjectiveSpec:
    """Split an objective spec such as ``"trace"``, ``"trace:4"``, ``"iwae:5"`` or ``"iwae:5:dreg"``. Only the grammar
    is checked here (config stays free of torch); :func:`pyro_vae.objectives.make_objective` checks the names.

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
    ``"free_bits:0.25"`` into its name and numbers. Only the grammar is checked here;
    :func:`pyro_vae.schedules.make_schedule` checks the name and the arity.

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
    """Where the images come from and how they are binarised. ``embedded``: the Fashion-MNIST subset shipped with the
    package (offline); ``fashion-mnist``: IDX files in ``data_dir`` (default: Debian's
    ``/usr/share/datasets/fashion-mnist``); ``mnist``: torchvision, downloaded into ``data_dir`` (default ``./data``);
    ``npz``: the user's file at ``path``. Binarisation (for Bernoulli likelihoods): ``dynamic`` draws Bernoulli(pixel)
    afresh every epoch from a seeded generator (the standard protocol for binarised image VAEs; it regularises),
    ``static`` draws once, ``threshold`` uses ``pixel > threshold``, ``none`` keeps grey levels.
    """

    dataset: str = _opt("embedded", "data source (embedded works offline)", choices=DATASETS, what="dataset")
    path: str | None = _opt(
        None, "your .npz file (x, optional y, x_test, y_test); implies --dataset npz", flag="--data"
    )
    data_dir: str | None = _opt(
        None, "directory of the Fashion-MNIST IDX files, or the MNIST download root", resume="free"
    )
    binarize: str = _opt("dynamic", "binarisation protocol", choices=BINARIZATIONS, what="binarization")
    threshold: float = _opt(0.5, "cut-off of --binarize threshold", low=0.0, high=1.0, open_low=True, open_high=True)
    test_fraction: float = _opt(
        0.1, "share of an .npz without x_test held out", low=0.0, high=1.0, open_low=True, open_high=True
    )
    n_train: int | None = _opt(None, "use only the first N training images (default: all)", low=1)
    n_test: int | None = _opt(None, "use only the first N test images (default: all)", low=1)

    def __post_init__(self):
        _check_fields(self)
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
    ``{"eps": 1e-5}``). ``likelihood``: one of :func:`pyro_vae.likelihoods.likelihood_names`.
    """

    latent_dim: int = _opt(
        16, "latent dimension L", low=1, high=4096, why="a full-rank guide emits L(L+3)/2 numbers per image"
    )
    hidden_dims: tuple[int, ...] = _opt(
        (512, 256, 128, 64), "comma-separated encoder widths", high=16384, why="a 16384² layer is 1 GiB of weights"
    )
    activation: str = _opt("silu", "non-linearity between layers", choices=ACTIVATIONS, what="activation")
    guide: str = _opt("mvn_diag", "guide family, name or name:K", choices="guides", what="guide family", spec=True)
    guide_options: dict[str, Any] = _opt(
        help="keyword options of the guide family", factory=dict, flag=None, reason="a mapping: set it in --config"
    )
    likelihood: str = _opt("bernoulli", "p(x|z)", choices="likelihoods", what="likelihood")

    def __post_init__(self):
        _check_fields(self)


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

    epochs: int = _opt(20, "passes over the training data", low=1, resume="free")
    batch_size: int = _opt(128, "images per step", low=1, high=2**20, why="larger batches do not fit in memory")
    lr: float = _opt(1e-3, "AdamW learning rate", low=0.0, open_low=True)
    weight_decay: float = _opt(0.0, "AdamW decoupled weight decay (0: the plain ELBO)", low=0.0)
    clip_norm: float | None = _opt(None, "clip the total gradient norm to this value", low=0.0, open_low=True)
    objective: str = _opt(
        "trace",
        "ELBO estimator: trace, meanfield, name:K for K particles, or iwae:K[:reparam|stl|dreg]",
        choices="objectives",
        what="objective",
        spec=True,
    )
    num_particles: int = _opt(
        1, "samples of z per image per step", flag="--particles", low=1, high=4096, why="all are held in memory"
    )
    kl_schedule: str | None = _opt(
        "linear:1000",
        "KL weight over training: linear:STEPS (warm-up), constant:BETA, cyclical:PERIOD[:RATIO], free_bits:NATS, none",
        choices="kl_schedules",
        what="KL schedule",
        spec=True,
    )
    seed: int = _opt(
        0, "seed of weights, data order, binarisation and noise", low=0, high=SEED_MAX, why="numpy seeds are 32-bit"
    )
    device: str = _opt("auto", "auto (CUDA when present), cpu or cuda", choices=DEVICES, what="device")
    max_steps: int | None = _opt(None, "stop after this many optimiser steps in total", low=1, resume="free")
    threads: int | None = _opt(None, "torch CPU threads (default: torch's)", low=1, high=4096, why="more than any CPU")
    progress: bool | None = _opt(None, "progress bar (default: on a terminal)", resume="free")
    checkpoint_every: int | None = _opt(None, "also checkpoint every N steps", low=1, resume="free")
    keep_last: int = _opt(
        2, "checkpoints kept", low=1, high=100, why="each is a full copy rotated at every save", resume="free"
    )
    on_nonfinite: str = _opt(
        "raise",
        "on a NaN/inf loss or gradient: raise, or skip the batch",
        choices=NONFINITE_POLICIES,
        what="non-finite policy",
        resume="free",
    )
    max_skips: int = _opt(10, "with --on-nonfinite skip: the most batches skipped", low=0, resume="free")
    dist_backend: str = _opt(
        "auto", "under torchrun: auto (nccl on CUDA), gloo or nccl", choices=DIST_BACKENDS, what="distributed backend"
    )
    tensorboard: bool = _opt(False, "write TensorBoard scalars under RUN/tensorboard/", resume="free")
    early_stop: int | None = _opt(None, "stop after N epochs without a better test ELBO", low=1, resume="free")
    early_stop_min_delta: float = _opt(0.0, "the test ELBO gain (nats) that counts as better", low=0.0, resume="free")
    compile: bool = _opt(False, "compile the training step", resume="free")

    def __post_init__(self):
        _check_fields(self)
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
