"""Peak resident memory of this process, the one way the package and the benchmarks measure it.

The figure is Linux's high-water mark ``VmHWM`` from ``/proc/self/status``, reset on entry by writing ``5`` to
``/proc/self/clear_refs``, minus ``VmRSS`` on entry: the growth of the resident set during a block, in MiB. The
alternatives do not work here: ``tracemalloc`` sees only Python's allocator (not torch's), and ``ru_maxrss`` cannot
be reset and is inherited across ``exec`` from the parent. Where ``/proc`` does not offer these fields (macOS,
Windows, some containers) nothing is measured and the figure is ``None``.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

__all__ = ["PeakRSS", "status_mib"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def status_mib(field: str) -> float:
    """A memory field of ``/proc/self/status`` (``"VmRSS"``, ``"VmHWM"``, ...), in MiB.

    :raises OSError: where the file or the field is missing.
    """
    with open(_STATUS) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the kernel reports kB (KiB)
    raise OSError(f"{_STATUS} has no {field}")


class PeakRSS:
    """Resident-set growth over a ``with`` block: ``VmHWM`` (reset on entry) minus ``VmRSS`` on entry, in MiB.

    ``peak_mib`` is set on exit, and stays ``None`` where it cannot be measured (a warning says why, once per block).

    Example::

        with PeakRSS() as memory:
            fit(vae, data, config)
        print(memory.peak_mib)
    """

    def __init__(self) -> None:
        self.peak_mib: float | None = None
        self._start: float | None = None

    def __enter__(self) -> PeakRSS:
        self.peak_mib = None
        try:
            with open(_CLEAR_REFS, "w") as clear:
                clear.write("5")  # 5: reset the peak RSS to the current RSS (proc(5))
            self._start = status_mib("VmRSS")
        except OSError as err:
            logger.warning("peak memory is not measured: resetting the RSS high-water mark failed (%s)", err)
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is not None:
            self.peak_mib = status_mib("VmHWM") - self._start
