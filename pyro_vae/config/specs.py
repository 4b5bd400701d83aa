"""The grammar of the spec strings a config holds: objectives (``iwae:5:dreg``), KL schedules (``linear:10000``) and
registry components (``mog:10``, ``gaussian:learned``). Only the grammar is checked here: config stays free of torch,
and each registry checks its own names."""

from __future__ import annotations

import math
from typing import NamedTuple

from pyro_vae.errors import ConfigError


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


class ComponentSpec(NamedTuple):
    """A parsed registry spec ``name[:option]``, e.g. ``low_rank:4``, ``mog:10``, ``gaussian:learned``."""

    name: str
    option: str | None


def parse_component_spec(spec: str, what: str) -> ComponentSpec:
    """Split a registry spec into its name and its option text: ``"mog:10"`` gives ``("mog", "10")``, ``"standard"``
    gives ``("standard", None)``. Each registry reads the option itself (an integer K, a word such as ``learned``).

    :param str what: how the error names the spec, e.g. ``"prior"``.
    :raises ConfigError: for an empty spec, an empty name or option, or more than one ``:``.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"a {what} must be a non-empty string such as 'name' or 'name:K', got {spec!r}")
    name, sep, option = spec.partition(":")
    if not name or (sep and not option) or ":" in option:
        raise ConfigError(f"{what} {spec!r} is not of the form name[:option]; write e.g. 'name' or 'name:10'")
    return ComponentSpec(name, option if sep else None)


def spec_int(spec: ComponentSpec, what: str, option_name: str, *, low: int = 1) -> int:
    """The integer option of a spec such as ``mog:10``, checked to be an integer ``>= low``.

    :param str option_name: what the number is, e.g. ``"K, the number of components"``.
    :raises ConfigError: naming the spec and what to write.
    """
    text = spec.option
    try:
        value = int(text) if text is not None else None
    except ValueError:
        value = None
    if value is None or value < low:
        raise ConfigError(
            f"in {what} '{spec.name}:{text}', {option_name} must be an integer >= {low}; write e.g. '{spec.name}:10'"
        )
    return value
