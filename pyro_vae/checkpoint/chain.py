"""The rotating checkpoints of one run directory, newest first::

    last.pt, last.prev.pt, last.prev2.pt, ..., last.prev{K-1}.pt        (K = keep_last, default 2)

Each save shifts the files that exist down by one name (oldest first, so no rename overwrites a file that has not
moved on yet; gaps left by a resume close up), then moves the new file into ``last.pt``. Only the files that exist are
touched: the cost of a save does not grow with ``keep_last``. Whatever the moment of a crash, every file of the chain
is complete, and at most one name is missing for an instant (``last.pt`` between the shift and the final rename).
Readers take the newest file that verifies and retry when a file vanishes under them (:meth:`CheckpointDir.newest`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from pyro_vae.checkpoint.files import (
    LAST,
    NO_SPACE,
    TMP_PREFIX,
    _umask,
    chain_files,
    chain_name,
    chain_names,
    chain_of,
    free_space,
    fsync_dir,
    load_checkpoint,
    read_digest,
    serialise,
    sidecar,
    write_all,
    write_sidecar,
)
from pyro_vae.config import check_int
from pyro_vae.errors import CheckpointError

logger = logging.getLogger(__name__)

#: How long a reader keeps retrying while a writer rotates the chain under it.
READ_RETRY_SECONDS = 5.0


class Loaded(NamedTuple):
    """A checkpoint as a reader found it: its path and its payload."""

    path: Path
    payload: dict[str, Any]


class CheckpointDir:
    """The rotating checkpoints of one run directory.

    :param run_dir: the run directory (must exist).
    :param int keep_last: how many checkpoints to keep, newest first: ``last.pt``, ``last.prev.pt``,
        ``last.prev2.pt``, ... (default 2; 1 keeps ``last.pt`` only).

    Typical use::

        ckpts = CheckpointDir(run_dir, keep_last=2)
        ckpts.clean_temp_files()        # leftovers of a process killed while writing
        path = ckpts.latest()           # None for a new run
        ckpts.save(payload)             # rotate and write last.pt
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 2):
        self.keep_last = check_int("keep_last", keep_last, low=1)
        self.run_dir = Path(run_dir)

    @property
    def names(self) -> list[str]:
        """The chain's names for this ``keep_last``, newest first."""
        return chain_names(self.keep_last)

    @property
    def last(self) -> Path:
        """Path of the newest checkpoint, ``run_dir / "last.pt"``."""
        return self.run_dir / LAST

    def existing(self) -> list[Path]:
        """Checkpoint files of the chain that exist, newest first (whatever ``keep_last`` was when they were made)."""
        return chain_files(self.run_dir)

    def latest(self) -> Path | None:
        """The newest checkpoint of the chain that exists, with a warning when it is not ``last.pt`` (a crash fell
        between the rotation and the final rename); ``None`` if the run has no checkpoint."""
        existing = self.existing()
        if not existing:
            return None
        if existing[0] != self.last:
            logger.warning(
                "%s is missing (the previous run stopped while rotating its checkpoints); using %s",
                self.last,
                existing[0],
            )
        return existing[0]

    def newest(self, map_location: Any = "cpu") -> Loaded | None:
        """Load the newest checkpoint that verifies, safe against a writer rotating the chain meanwhile.

        A file that vanishes between the listing and the read, or whose sidecar is being rewritten, is retried on a
        fresh listing for up to :data:`READ_RETRY_SECONDS`; a file that stays damaged is passed over for the next
        older one. ``None`` if the directory holds no checkpoint.

        :raises CheckpointError: if checkpoints exist but none verifies; the message is the newest one's problem.
        """
        deadline = time.monotonic() + READ_RETRY_SECONDS
        while True:
            existing = self.existing()
            if not existing:
                return None
            first_error: CheckpointError | None = None
            for path in existing:
                try:
                    loaded = Loaded(path, load_checkpoint(path, map_location))
                except CheckpointError as err:
                    first_error = first_error or err
                    continue
                if first_error is not None:
                    logger.warning("using %s: a newer checkpoint was passed over (%s)", path, first_error)
                return loaded
            if time.monotonic() > deadline:
                raise first_error
            time.sleep(0.01)  # a rotation is in flight (or every file is damaged): look again

    def clean_temp_files(self) -> list[Path]:
        """Remove the ``.tmp-*`` files that a process killed during a write left behind; returns what was removed."""
        removed = []
        for path in self.run_dir.glob(TMP_PREFIX + "*"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
        if removed:
            logger.info("removed %d stale temporary file(s) from %s", len(removed), self.run_dir)
        return removed

    def save(self, data: bytes | dict[str, Any]) -> Path:
        """Write a checkpoint as the new ``last.pt``, shifting the older checkpoints down the chain.

        The new file is written to a temp file first, so a full disk or a bad payload changes nothing; only then
        are the renames made.

        :param data: the serialised checkpoint, or a payload to serialise.
        :returns: the path of the new checkpoint (``last.pt``).
        :raises CheckpointError: as :func:`~pyro_vae.checkpoint.save_checkpoint`; the previous checkpoints are kept.
        """
        last = self.last
        if not isinstance(data, bytes):
            data = serialise(last, data)
        digest = hashlib.sha256(data).hexdigest()
        # Written under a temp name that clean_temp_files recognises, and complete on disk before any rename.
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + last.name + ".", dir=self.run_dir)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, OSError) and err.errno in NO_SPACE:
                raise CheckpointError(
                    f"no space left while writing {last} ({len(data)} bytes needed; {os.strerror(err.errno)}; "
                    f"{free_space(self.run_dir)}); the previous checkpoints are kept: free some space, then resume "
                    f"with --resume {self.run_dir}"
                ) from err
            raise
        try:
            self._shift()
            os.replace(tmp, last)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        write_sidecar(last, digest, sync_dir=False)
        fsync_dir(self.run_dir)
        return last

    def _shift(self) -> None:
        """Move every existing file j (newest first) to name j + 1, dropping those beyond ``keep_last``.

        Oldest first, so that no rename overwrites a file that has not moved on yet. A file's sidecar is removed
        before the file moves and follows it afterwards: the pair never disagrees, at worst the sidecar is missing.
        """
        existing = self.existing()
        for j in range(len(existing) - 1, -1, -1):
            src = existing[j]
            if j + 1 >= self.keep_last:
                src.unlink(missing_ok=True)
                sidecar(src).unlink(missing_ok=True)
                continue
            dst = self.run_dir / chain_name("last", j + 1)
            if dst != src:
                digest = read_digest(src)
                sidecar(dst).unlink(missing_ok=True)
                os.replace(src, dst)
                if digest:
                    write_sidecar(dst, digest, sync_dir=False)  # rewritten, so that it names the file it belongs to
                sidecar(src).unlink(missing_ok=True)
        sidecar(self.last).unlink(missing_ok=True)

    def set_aside(self, keep: Path) -> list[Path]:
        """Move the chain files newer than ``keep`` (all of them if ``keep`` is not in the chain) out of the chain.

        They become ``last.superseded-<step>.pt`` (then ``-<step>-2``, ``-<step>-3``, ...: never over an earlier one),
        so that resuming from an older checkpoint loses nothing however often it is done. Returns the new paths.
        """
        chain = chain_of(keep)
        # A file outside the chain (best.pt, a superseded one): every file of the chain is set aside.
        index = chain[1] if chain is not None and chain[0] == "last" and keep.parent == self.run_dir else 1 << 62
        moved = []
        for path in self.existing():
            if chain_of(path)[1] >= index:
                break
            try:
                step = f"{int(load_checkpoint(path)['progress']['step'])}"
            except (CheckpointError, KeyError, TypeError, ValueError):
                step = "unreadable"
            target, n = self.run_dir / f"last.superseded-{step}.pt", 1
            while target.exists():
                n += 1
                target = self.run_dir / f"last.superseded-{step}-{n}.pt"
            digest = read_digest(path)
            os.replace(path, target)
            if digest:
                write_sidecar(target, digest, sync_dir=False)
            sidecar(path).unlink(missing_ok=True)
            logger.warning("resuming from %s; the newer %s was moved to %s", keep, path.name, target.name)
            moved.append(target)
        fsync_dir(self.run_dir)
        return moved
