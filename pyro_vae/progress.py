"""Progress of long work: a tqdm bar on a terminal, one log line per step of the work otherwise.

:func:`show_bar` is the one place that decides between the two (training's
:class:`~pyro_vae.callbacks.ProgressBar` asks it too): a bar when stderr is a terminal, because a bar redrawn in a
log file or a CI console is noise, and a log line per chunk or run otherwise, so that a job started with
``nohup``/``2> log`` still shows that it is alive. :class:`Progress` follows the decision.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

__all__ = ["Progress", "show_bar"]


def show_bar(show: bool | None = None) -> bool:
    """Whether to draw a progress bar: ``show`` when given, otherwise whether stderr is a terminal."""
    return sys.stderr.isatty() if show is None else bool(show)


class Progress:
    """Progress through ``total`` units of work (images, runs): a tqdm bar when :func:`show_bar` says so, otherwise
    one INFO line on ``logger`` per :meth:`update`, ``"<desc>: <done>/<total> <unit> (<percent>%), <seconds> s
    [<note>]"``.

    :param int total: units in the whole task.
    :param str desc: what is being done, e.g. ``"evaluate"``.
    :param str unit: the unit's name in plural, e.g. ``"images"``.
    :param logging.Logger logger: where the lines go when there is no bar.
    :param show: ``True``/``False`` force the bar on or off; ``None`` (default) asks :func:`show_bar`.
    """

    def __init__(self, total: int, *, desc: str, unit: str, logger: logging.Logger, show: bool | None = None):
        self.total, self.desc, self.unit, self.logger = total, desc, unit, logger
        self.done = 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not show_bar(show), dynamic_ncols=True)

    def update(self, n: int = 1, note: str = "") -> None:
        """Record ``n`` more units done; ``note`` (e.g. the result of a run) goes on the bar or the log line."""
        self.done += n
        if not self.bar.disable:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
            return
        percent = 100.0 * self.done / self.total if self.total else 100.0
        seconds = time.perf_counter() - self.start
        self.logger.info(
            "%s: %d/%d %s (%.0f%%), %.1f s%s",
            self.desc,
            self.done,
            self.total,
            self.unit,
            percent,
            seconds,
            f"; {note}" if note else "",
        )

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
