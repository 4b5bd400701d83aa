"""Command-line flags generated from the config dataclasses' field metadata, and the config they build.

Each field of :class:`~pyro_vae.config.DataConfig`, :class:`~pyro_vae.config.ModelConfig` and
:class:`~pyro_vae.config.TrainConfig` becomes one flag (``--latent-dim``), with its help, its type and its choices
taken from ``field(metadata=...)``; a field whose metadata says ``flag=None`` is set only by a ``--config`` file. The
flag's parser checks the value with the config's own :func:`~pyro_vae.config.check_field`, so a flag and a JSON file
get the same message (and the same did-you-mean hint, from :func:`~pyro_vae.errors.unknown_choice`). Nothing here
imports torch: the registry names are kept as tuples that a test checks against the registries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyro_vae.config import SECTIONS, RunConfig, check_field, check_int
from pyro_vae.errors import ConfigError, unknown_choice

#: The program name every error line starts with: ``pyro-vae: error: <one line>``.
PROG = "pyro-vae"
#: Registered guide families, checked against :func:`pyro_vae.guides.family_names` by a test.
GUIDE_CHOICES = (
    "diag_normal",
    "full_rank",
    "householder",
    "iaf",
    "low_rank",
    "mvn_diag",
    "naf",
    "planar",
    "radial",
    "spline",
    "sylvester",
    "sylvester_householder",
    "sylvester_triangular",
)
#: Registered likelihoods (checked against :func:`pyro_vae.likelihoods.likelihood_names` by a test).
LIKELIHOOD_CHOICES = ("bernoulli", "beta", "continuous_bernoulli", "discretized_logistic", "gaussian")
#: Registered priors (checked against :func:`pyro_vae.priors.prior_names` by a test).
PRIOR_CHOICES = ("flow", "mog", "standard", "vamp")
#: Registered networks (checked against :func:`pyro_vae.networks.network_names` by a test).
NETWORK_CHOICES = ("conv", "mlp")
#: Registered objectives (checked against :func:`pyro_vae.objectives.objective_names` by a test).
OBJECTIVE_CHOICES = ("iwae", "meanfield", "trace")
#: Registered KL schedules (checked against :func:`pyro_vae.schedules.schedule_names` by a test).
KL_SCHEDULE_CHOICES = ("constant", "cyclical", "free_bits", "linear")
#: The registry keys that config metadata names in ``choices``, resolved to their names.
REGISTRIES = {
    "guides": GUIDE_CHOICES,
    "likelihoods": LIKELIHOOD_CHOICES,
    "priors": PRIOR_CHOICES,
    "networks": NETWORK_CHOICES,
    "objectives": OBJECTIVE_CHOICES,
    "kl_schedules": KL_SCHEDULE_CHOICES,
}


def registry_epilog() -> str:
    """The end of every ``--help``: each registry's names, wrapped under its key."""
    width = max(len(key) for key in REGISTRIES) + 4
    lines = [
        textwrap.fill(
            ", ".join(sorted(names)),
            width=100,
            initial_indent=f"  {key.replace('_', ' ') + ':':<{width - 2}}",
            subsequent_indent=" " * width,
        )
        for key, names in REGISTRIES.items()
    ]
    return "registered names (a spec is NAME or NAME:K, see each flag):\n" + "\n".join(lines)


#: The largest ``--config`` file read: a run config is a few hundred bytes, and ``--config /dev/zero`` must not
#: fill the memory.
MAX_CONFIG_BYTES = 1 << 20


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``pyro-vae: error: ...`` on stderr, exit 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message}\n")


def flag_of(f: dataclasses.Field) -> str | None:
    """The flag of a config field: its ``flag`` metadata, by default ``--`` and the name with dashes; ``None`` when
    the field has no flag."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    """The names a field takes: its ``choices`` metadata, a registry key resolved through :data:`REGISTRIES`."""
    choices = f.metadata.get("choices")
    return REGISTRIES[choices] if isinstance(choices, str) else choices


def check_registry(f: dataclasses.Field, value: Any) -> None:
    """Refuse a name that the field's registry does not hold (for a spec such as ``low_rank:4``, its name part)."""
    if value is None or not isinstance(f.metadata.get("choices"), str):
        return
    name = value.partition(":")[0] if f.metadata.get("spec") else value
    if name not in choices_of(f):
        raise unknown_choice(f.metadata["what"], name, choices_of(f))


def check_registry_names(config: RunConfig) -> None:
    """Check every registry name in ``config`` (guide, likelihood, objective, KL schedule) before anything loads."""
    for section, klass in SECTIONS.items():
        for f in dataclasses.fields(klass):
            check_registry(f, getattr(getattr(config, section), f.name))


def _base_type(klass: type, name: str):
    hint = typing.get_type_hints(klass)[name]
    if isinstance(hint, types.UnionType):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _convert(base, name: str, text: str) -> Any:
    """The text of a flag as the field's type; text that is not a number is passed on for check_field to refuse."""
    if base in (int, float):
        try:
            return base(text)
        except ValueError:
            return text
    if typing.get_origin(base) is tuple:
        try:
            return tuple(int(part) for part in text.split(","))
        except ValueError:
            raise ConfigError(f"{name} must be comma-separated integers, got {text!r}") from None
    return text


def field_type(klass: type, name: str) -> Callable[[str], Any]:
    """The argparse ``type`` of a config field: convert the text, then check it as the config does.

    :returns: a function of the text that returns the value or raises :class:`argparse.ArgumentTypeError` with the
        config's one-line message.
    """
    f = {f.name: f for f in dataclasses.fields(klass)}[name]
    base = _base_type(klass, name)

    def parse(text: str) -> Any:
        try:
            value = check_field(klass, name, _convert(base, name, text))
            check_registry(f, value)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text if value is None else value  # "none" (--kl-schedule none) stays given; the config makes it None

    parse.__name__ = name
    return parse


def int_type(name: str, *, low: int = 1, high: int | None = None, why: str = "") -> Callable[[str], int]:
    """The argparse ``type`` of a command's own integer flag (``evaluate --n``), checked by :func:`check_int`."""

    def parse(text: str) -> int:
        try:
            return check_int(name, _convert(int, name, text), low=low, high=high, why=why)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = name
    return parse


def add_config_flags(parser: argparse.ArgumentParser, *, exclude: tuple[str, ...] = ()) -> None:
    """Add ``--config`` and one flag per config field with a flag, except the fields named in ``exclude``."""
    parser.add_argument("--config", type=Path, help="JSON run config (sections data/model/train); flags override it")
    for klass in SECTIONS.values():
        for f in dataclasses.fields(klass):
            flag = flag_of(f)
            if flag is None or f.name in exclude:
                continue
            help_text = f.metadata["help"]
            choices = choices_of(f)
            if choices:
                help_text += f"; one of: {', '.join(sorted(choices))}"
            if f.default not in (None, dataclasses.MISSING) and not isinstance(f.default, bool):
                default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
                help_text += f" (default {default})"
            help_text = help_text.replace("%", "%%")
            if _base_type(klass, f.name) is bool:
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
            else:
                metavar = f.name.upper() if choices else None
                parser.add_argument(flag, dest=f.name, type=field_type(klass, f.name), metavar=metavar, help=help_text)


def read_config_file(path: Path) -> Any:
    """The JSON value in a ``--config`` file, read with a size cap; every failure is one :class:`ConfigError` line."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes; a run config is a small JSON file, "
            "check the path"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 JSON") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise ConfigError(
            f"config file {path} nests too deeply to read; a run config is sections of keys, {{'train': {{...}}}}"
        ) from None
    except ValueError as err:  # JSONDecodeError, and an integer with more digits than Python converts
        raise ConfigError(f"config file {path} is not valid JSON: {err}") from None


def _absolute(config: RunConfig, base: RunConfig | None) -> RunConfig:
    """Store the data paths absolute and resolved, so that a command run from another directory (``evaluate``) reads
    the same file; paths inherited unchanged from ``base`` (a resumed run) stay as recorded."""
    changes = {}
    for key in ("path", "data_dir"):
        value = getattr(config.data, key)
        if value is None or (base is not None and value == getattr(base.data, key)):
            continue
        try:
            changes[key] = str(Path(value).expanduser().resolve())
        except (OSError, ValueError) as err:
            raise ConfigError(f"data {key} {value!r} is not a usable path ({err}); check it") from None
    return config.replace(data=changes) if changes else config


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """The run config: ``base`` (default: the defaults) with the ``--config`` file and then every given flag applied on
    top. With a ``base`` (a resumed run's config), the file changes only the keys it names. Registry names are
    checked here, before any data are loaded."""
    config = base or RunConfig()
    if getattr(args, "config", None) is not None:
        raw = read_config_file(args.config)
        if base is not None and isinstance(raw, dict):
            merged = base.to_dict()
            for section, values in raw.items():
                merged[section] = {**merged.get(section, {}), **values} if isinstance(values, dict) else values
            raw = merged
        config = RunConfig.from_dict(raw)
    changes = {
        section: {
            f.name: value for f in dataclasses.fields(klass) if (value := getattr(args, f.name, None)) is not None
        }
        for section, klass in SECTIONS.items()
    }
    if "path" in changes["data"]:
        if changes["data"].get("dataset", "npz") != "npz":
            raise ConfigError(
                f"--data FILE.npz implies --dataset npz, but --dataset {changes['data']['dataset']} was given"
            )
        changes["data"]["dataset"] = "npz"
    config = _absolute(config.replace(**changes), base)
    check_registry_names(config)
    return config
