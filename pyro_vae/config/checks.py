"""The one validator of config values: :func:`check_int`, :func:`check_float`, and :func:`check_field`, which checks a
config field against its annotation and its ``field(metadata=...)`` (see :mod:`pyro_vae.config`)."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import field
from typing import Any

from pyro_vae.errors import ConfigError, unknown_choice

#: The largest integer any field takes: counters are stored as 64-bit integers in checkpoints and tensors.
INT64_MAX = 2**63 - 1


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


def check_fields(config) -> None:
    """Check every field of the config dataclass instance ``config`` (:func:`check_field`), in ``__post_init__``."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        checked = check_field(type(config), f.name, value)
        if checked is not value:
            object.__setattr__(config, f.name, checked)


def option(default: Any = None, help: str = "", *, factory=None, **meta: Any):
    """A dataclass field with its metadata (``help``, ``flag``, bounds, ``choices``...: see :mod:`pyro_vae.config`)."""
    meta["help"] = help
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)
