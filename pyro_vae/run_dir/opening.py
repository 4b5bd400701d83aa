"""Opening the run directory of a :func:`~pyro_vae.train.fit` call, under torchrun too."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from pyro_vae.distributed import barrier
from pyro_vae.errors import ConfigError
from pyro_vae.run_dir.directory import RunDir

__all__ = ["open_run"]


@contextlib.contextmanager
def open_run(
    out_dir: str | os.PathLike | None, resume, overwrite: bool, force: bool, keep_last: int, ctx
) -> Iterator[RunDir | None]:
    """The run directory of this process for fit's ``out_dir``, ``resume`` and ``overwrite`` arguments (``None``
    without one): rank 0 takes the lock and writes; the other ranks of a torchrun job only read it, after rank 0 has
    prepared it (an overwrite removes files first).

    :param ctx: the torchrun context, or ``None``.
    """
    if out_dir is None and resume in (False, None):
        yield None
        return
    path, resume_from = run_target(out_dir, resume)
    mode = "resume" if resume not in (False, None) else ("overwrite" if overwrite else "new")
    if resume not in (False, None) and overwrite:
        raise ConfigError("resume and overwrite contradict each other: resume continues a run, overwrite replaces it")
    run = RunDir(path, keep_last=keep_last)
    if ctx is not None and not ctx.is_main:
        barrier()
        yield run.reader(resuming=mode == "resume", resume_from=resume_from)
        return
    with run.open(mode, resume_from=resume_from, force=force):
        barrier()
        yield run


def run_target(out_dir, resume) -> tuple[Path, Path | None]:
    """``(run directory, checkpoint to resume from or None)`` from fit's ``out_dir`` and ``resume`` arguments."""
    if resume in (False, None, True):
        if out_dir is None:
            raise ConfigError("resume=True needs out_dir, the run directory to continue")
        return Path(out_dir), None
    checkpoint = Path(resume)
    if out_dir is not None and Path(out_dir).resolve() != checkpoint.parent.resolve():
        raise ConfigError(f"checkpoint {checkpoint} is not in the run directory {out_dir}; resume in its own directory")
    return checkpoint.parent, checkpoint
