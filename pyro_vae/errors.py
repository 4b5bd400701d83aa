"""Exceptions raised by pyro_vae.

Every error a user can cause derives from :class:`PyroVAEError` and carries a message that says what was
expected, what came, and what to do. The command line prints that message on one line and exits with
:attr:`PyroVAEError.exit_code` (2 for usage errors, 1 for runtime errors).
"""


class PyroVAEError(Exception):
    """Base class of every error pyro_vae raises on purpose."""

    exit_code = 1


class ConfigError(PyroVAEError, ValueError):
    """A configuration value or command-line argument is invalid."""

    exit_code = 2


class DataError(PyroVAEError, ValueError):
    """Input data is missing, damaged, or does not fit the chosen model."""

    exit_code = 2


class CheckpointError(PyroVAEError):
    """A checkpoint cannot be written or read."""


class NonFiniteLossError(PyroVAEError, FloatingPointError):
    """The loss or a gradient became NaN or infinite; no optimiser step was taken."""


def unknown_choice(what: str, name: str, choices) -> ConfigError:
    """Build the error for an unknown name, listing the choices and the closest match.

    :param str what: what the name denotes, e.g. ``"guide family"``.
    :param str name: the name the user gave.
    :param choices: the valid names.
    :returns: a :class:`ConfigError` to raise.
    """
    import difflib

    choices = sorted(choices)
    message = f"unknown {what} {name!r}; choose one of: {', '.join(choices)}"
    close = difflib.get_close_matches(str(name), choices, n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    return ConfigError(message)
