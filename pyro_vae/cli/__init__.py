"""The ``pyro-vae`` command line: ``train``, ``evaluate``, ``sample`` and ``compare``.

* :mod:`pyro_vae.cli.flags` generates the data, model and training flags from the config dataclasses' field
  metadata (help, type, choices, bounds), so config, CLI and README cannot drift;
* :mod:`pyro_vae.cli.parser` adds each command's own flags; every ``--help`` ends with each registry's names;
* :mod:`pyro_vae.cli.checks` checks what the flags alone cannot (KL schedule values, the device, the batch against
  ``--n-train``, the likelihood against the binarisation) before any data are loaded;
* :mod:`pyro_vae.cli.sampling` draws and writes ``sample``'s grid or arrays;
* :mod:`pyro_vae.cli.commands` runs the commands, with heavy imports (torch, Pyro, matplotlib) inside them, so
  ``pyro-vae --help`` answers at once. ``evaluate`` and ``compare`` show progress through
  :class:`pyro_vae.progress.Progress` (a bar on a terminal, a log line per chunk or run otherwise).

Every error is one line on stderr, ``pyro-vae: error: <what, what came, what to do>``, with exit status 2 for usage
errors (raised before any data are loaded) and 1 for runtime errors; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import sys

from pyro_vae.cli.flags import (
    GUIDE_CHOICES,
    KL_SCHEDULE_CHOICES,
    LIKELIHOOD_CHOICES,
    NETWORK_CHOICES,
    OBJECTIVE_CHOICES,
    PRIOR_CHOICES,
    PROG,
    REGISTRIES,
    config_from_args,
)
from pyro_vae.cli.parser import DEFAULT_COMPARE_GUIDES, build_parser
from pyro_vae.errors import PyroVAEError

__all__ = [
    "DEFAULT_COMPARE_GUIDES",
    "GUIDE_CHOICES",
    "KL_SCHEDULE_CHOICES",
    "LIKELIHOOD_CHOICES",
    "NETWORK_CHOICES",
    "OBJECTIVE_CHOICES",
    "PRIOR_CHOICES",
    "REGISTRIES",
    "build_parser",
    "config_from_args",
    "main",
]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pyro-vae`` and ``python -m pyro_vae``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except PyroVAEError as err:
        if args.debug:
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
