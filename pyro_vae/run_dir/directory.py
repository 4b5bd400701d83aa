""":class:`RunDir`: the one owner of a run directory.

A writer opens it in one of three modes::

    with RunDir(out, keep_last=2).open("new") as run:          # or "resume" / "overwrite"
        state = run.resume_state()                              # "resume" only
        run.write_config({...}); log = run.metrics()
        ... log.append(record); run.save_checkpoint(state) ...

``open`` first checks the path without creating anything, then creates the directory, takes the lock (a second
writer gets one line naming the holder) and checks again under it, then prepares: ``overwrite`` removes exactly the
files a run writes (:data:`RUN_FILES`, plus the names listed in ``.run-files``). If the body of the ``with`` raises
before the first checkpoint, everything this session wrote is removed again (and the directory, if ``open`` made it):
a refused run leaves nothing behind.

Every run has a ``run_id``, stamped in ``config.json`` and in every checkpoint; a checkpoint whose id differs from the
directory's was copied from another run and is refused (``force=True`` adopts it: the run keeps the directory's id,
and the metrics log is rebuilt from the checkpoint's records rather than cut at the other run's offset).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyro_vae.checkpoint import CheckpointDir, TrainingState, load_checkpoint, safe_name, save_checkpoint
from pyro_vae.checkpoint.files import atomic_write, chain_of, serialise, sidecar
from pyro_vae.errors import CheckpointError, ConfigError
from pyro_vae.run_dir.files import (
    CONFIG_FORMAT,
    LOCK,
    MetricsLog,
    acquire_lock,
    config_run_id,
    in_use,
    is_run_config,
    json_bytes,
    lock_holder,
    new_run_id,
    open_metrics,
)

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_FORMAT", "MODES", "RUN_FILES", "RunDir", "is_run_config"]

MODES = ("new", "resume", "overwrite")
#: Every file and directory a run writes (glob patterns); ``overwrite`` removes these and nothing else, plus the
#: extra names that :meth:`RunDir.write_json` and friends listed in ``.run-files``.
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "eval.json",
    "last*.pt",
    "last*.pt.sha256",
    "best.pt",
    "best.pt.sha256",
    "reconstructions.png",
    "samples.png",
    "loss.png",
    "latent.png",
    "tensorboard",
    ".run-files",
)
_MANIFEST = ".run-files"


class RunDir:
    """One owner for a run directory: path checks, an exclusive lock, layout, atomic writes, the metrics log, the
    checkpoint chain and the run id.

    :param path: the run directory.
    :param int keep_last: checkpoints kept in the chain (``last.pt``, ``last.prev.pt``, ...; default 2). Saving costs
        the same for any value: only the files that exist are touched.

    :ivar Path path: the run directory.
    :ivar run_id: the run's id once :meth:`open` has run (``None`` before).
    """

    def __init__(self, path: str | os.PathLike, *, keep_last: int = 2):
        if "\0" in os.fspath(path) or ".." in Path(os.fspath(path)).parts:
            raise ConfigError(
                f"run directory {os.fspath(path)!r} must not contain '..' or NUL; give the run directory plainly"
            )
        self.path = Path(path)
        self.chain = CheckpointDir(self.path, keep_last=keep_last)
        self.run_id: str | None = None
        self.mode: str | None = None
        self._lock_fd = -1
        self._made: list[Path] = []  # directories open() created, outermost first
        self._lock_made = False
        self._written: set[Path] = set()  # files this session created (removed if it fails before a checkpoint)
        self._saved = False
        self._force = False
        self._resume_from: Path | None = None
        self._state: TrainingState | None = None
        self._source: Path | None = None
        self._adopted = False

    # ------------------------------------------------------------------------------------------------- opening

    def open(self, mode: str, *, resume_from: str | os.PathLike | None = None, force: bool = False) -> RunDir:
        """Check the path, create the directory, take the lock and prepare it for ``mode``.

        :param str mode: ``"new"`` (the directory must not hold a run), ``"resume"`` (it must hold a checkpoint) or
            ``"overwrite"`` (its run's files are removed; other files stay).
        :param resume_from: with ``"resume"``, a checkpoint file of this directory (e.g. ``last.prev.pt``); default:
            the newest that verifies.
        :param bool force: with ``"resume"``, adopt a checkpoint copied from another run.
        :returns: ``self``, a context manager that releases the lock on exit.
        :raises ConfigError: one line, before anything is created, for a bad path, a run in the way or missing, a
            foreign ``config.json``, or a directory in use by another writer (named by pid).
        """
        if self._lock_fd >= 0:
            raise ConfigError(f"{self.path} is already open in this process; close it first")
        if mode not in MODES:
            raise ConfigError(f"run directory mode must be one of {', '.join(MODES)}, got {mode!r}")
        if resume_from is not None and mode != "resume":
            raise ConfigError(f"resume_from applies to mode 'resume' only, not {mode!r}")
        source = self.check(mode, resume_from)
        self._make_dirs()
        try:
            self._lock_fd, self._lock_made = acquire_lock(self.path)
            self.check(mode, resume_from)  # again under the lock: another writer may have finished meanwhile
            self._prepare(mode)
        except BaseException:
            self._discard()
            raise
        self.mode, self._force, self._resume_from = mode, force, source
        self.run_id = new_run_id() if mode != "resume" else config_run_id(self.path)
        return self

    def reader(self, *, resuming: bool, resume_from: str | os.PathLike | None = None) -> RunDir:
        """This run directory for the ranks of a torchrun job other than rank 0 (which holds the lock and writes):
        no lock and every write refused; when ``resuming``, :meth:`resume_state` loads ``resume_from`` or the newest
        good checkpoint, the one rank 0 resumes from."""
        self.mode = "read" if resuming else "watch"
        self._resume_from = None if resume_from is None else Path(resume_from)
        return self

    @property
    def resuming(self) -> bool:
        """Whether this run continues from a checkpoint (mode ``resume``, or a reader of one)."""
        return self.mode in ("resume", "read")

    @property
    def source(self) -> Path | None:
        """The checkpoint :meth:`resume_state` loaded, once it has."""
        return self._source

    def check(self, mode: str, resume_from: str | os.PathLike | None = None) -> Path | None:
        """The checks :meth:`open` makes first, creating nothing: a command line calls it before loading any data.

        :returns: the checkpoint to resume from, or ``None`` (the newest).
        :raises ConfigError: one line, as :meth:`open`.
        """
        path = self.path
        if path.exists() and not path.is_dir():
            raise ConfigError(f"run directory {path} exists and is not a directory; choose another --out")
        if not path.is_dir():
            if mode == "resume":
                raise ConfigError(f"{path} holds no run to resume; start one with --out {path}")
            parent = next(p for p in path.absolute().parents if p.exists())
            if not parent.is_dir():
                raise ConfigError(
                    f"cannot create run directory {path}: {parent} is not a directory; choose another --out"
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"cannot create run directory {path}: {parent} is not writable; choose another --out")
            return None
        holder = lock_holder(path) if self._lock_fd < 0 else None
        if holder is not None:
            raise in_use(path, holder)
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"run directory {path} is not writable; choose another --out")
        config = path / "config.json"
        if os.path.lexists(config) and not is_run_config(config):
            raise ConfigError(
                f"{config} is not a pyro_vae run config; pyro_vae will not replace it: move it away or choose "
                "another --out"
            )
        checkpoints = self.chain.existing()
        if mode == "new" and (checkpoints or config.exists()):
            raise ConfigError(
                f"{path} already holds a run; pass --resume {path} to continue it, --overwrite to replace it, or "
                "choose another --out"
            )
        if mode == "resume":
            return self._check_resume(checkpoints, resume_from)
        return None

    def _check_resume(self, checkpoints: list[Path], resume_from: str | os.PathLike | None) -> Path | None:
        if not checkpoints:
            raise ConfigError(
                f"cannot resume: {self.path} holds no checkpoint (the run stopped before its first one); "
                f"start it again with --out {self.path} --overwrite"
            )
        if resume_from is None:
            return None
        source = Path(resume_from)
        if not source.is_file():
            raise ConfigError(f"cannot resume from {source}: no such checkpoint file")
        if source.parent.resolve() != self.path.resolve():
            raise ConfigError(
                f"checkpoint {source} is not in the run directory {self.path}; resume in its own directory"
            )
        return self.path / source.name

    def _make_dirs(self) -> None:
        missing = [p for p in [self.path, *self.path.parents] if not p.exists()]
        for directory in reversed(missing):
            try:
                directory.mkdir()
            except FileExistsError:
                continue  # made by a concurrent writer: not ours to remove
            except OSError as err:
                self._discard()
                raise ConfigError(
                    f"cannot create run directory {self.path} ({err.strerror}); choose another --out"
                ) from None
            self._made.append(directory)

    def _prepare(self, mode: str) -> None:
        self.chain.clean_temp_files()
        if mode != "overwrite":
            return
        for path in self._run_files():
            if path.is_dir() and not path.is_symlink():
                for inner in sorted(path.rglob("*"), reverse=True):
                    inner.rmdir() if inner.is_dir() and not inner.is_symlink() else inner.unlink()
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        logger.info("overwriting the run in %s", self.path)

    def _run_files(self) -> list[Path]:
        found = {p for pattern in RUN_FILES for p in self.path.glob(pattern)}
        try:
            names = (self.path / _MANIFEST).read_text().split("\n")
        except (OSError, UnicodeDecodeError):
            names = []
        for name in filter(None, names):
            try:
                found.add(self.path / safe_name(name))
            except ConfigError:
                logger.warning("ignoring %r in %s: not a plain name inside the run directory", name, _MANIFEST)
        return sorted(p for p in found if os.path.lexists(p))

    # --------------------------------------------------------------------------------------------- life cycle

    def __enter__(self) -> RunDir:
        if self._lock_fd < 0:
            raise ConfigError(f"open {self.path} first: `with RunDir(path).open('new') as run:`")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._saved:
            logger.info("the run in %s stopped before its first checkpoint; removing what it wrote", self.path)
            self._discard()
        self.close()

    def close(self) -> None:
        """Release the lock (again: nothing). The files stay."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _discard(self) -> None:
        """Remove what this session created (files, ``.lock``, directories), newest first; other files stay."""
        for path in sorted(self._written, reverse=True):
            path.unlink(missing_ok=True)
        self._written.clear()
        if self._lock_made:
            (self.path / LOCK).unlink(missing_ok=True)  # while still holding it: see acquire_lock's inode check
            self._lock_made = False
        self.close()
        for directory in reversed(self._made):
            try:
                directory.rmdir()
            except OSError:
                break  # not empty: someone else's files are in it
        self._made = []

    def _need_lock(self, what: str) -> None:
        if self._lock_fd < 0:
            raise ConfigError(f"{what} writes into {self.path}, which must be opened first (RunDir.open)")

    # ------------------------------------------------------------------------------------------------- writing

    def _target(self, name: str) -> Path:
        path = self.path / safe_name(name)
        root = self.path.resolve()
        if path.parent.resolve() != root and root not in path.parent.resolve().parents:
            raise ConfigError(f"{path} leaves the run directory through a symbolic link; use a plain name")
        return path

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write ``data`` to ``name`` in the run directory atomically (a symbolic link there is replaced, never
        followed). Readers may call it without opening the directory (e.g. ``eval.json``).

        :raises CheckpointError: on a full disk (naming the file and the free space) or another write error; the
            previous file is kept.
        """
        path = self._target(name)
        existed = os.path.lexists(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, data)
        except OSError as err:
            raise CheckpointError(f"cannot write {path} ({err.strerror}); the previous file is kept") from None
        if not existed:
            if self._lock_fd >= 0:
                self._written.add(path)
            if not any(path.match(pattern) for pattern in RUN_FILES):
                self._list(name)
        return path

    def _list(self, name: str) -> None:
        """Record ``name`` in ``.run-files``, so that ``overwrite`` knows it for this run's."""
        manifest = self.path / _MANIFEST
        try:
            names = manifest.read_text().split("\n")
        except FileNotFoundError:
            names = []
        if name not in names:
            atomic_write(manifest, "\n".join([*filter(None, names), name, ""]).encode())

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as indented, key-sorted, strict JSON (NaN and infinities as ``null``), atomically."""
        return self.write_bytes(name, json_bytes(obj))

    def write_figure(self, name: str, fig, *, dpi: int = 100) -> Path:
        """Render a matplotlib figure in memory, then write it atomically: a full disk leaves the previous file,
        never a 0-byte image. The format comes from the name's suffix (default PNG)."""
        buffer = io.BytesIO()
        fig.savefig(buffer, format=Path(name).suffix.lstrip(".").lower() or "png", dpi=dpi)
        return self.write_bytes(name, buffer.getvalue())

    def write_config(self, record: dict) -> None:
        """Write ``config.json``: ``record`` stamped with :data:`CONFIG_FORMAT` and the run id."""
        self._need_lock("write_config")
        if self.mode == "resume":
            self.resume_state()  # settles the run id (config.json's, or the checkpoint's for older runs)
        self.write_json("config.json", {**record, "format": CONFIG_FORMAT, "run_id": self.run_id})

    def metrics(self, offset: int | None = None, *, rebuild: Sequence[dict] | None = None) -> MetricsLog:
        """Open ``metrics.jsonl`` for appending (refusing a symbolic link).

        :param offset: ``None`` starts an empty log; a checkpoint's ``metrics_offset`` cuts the log back to it when
            that is a clean cut (whole lines, as many as the resumed state has records), else the log is rewritten
            from ``rebuild``; after a forced adoption it is always rewritten.
        :param rebuild: the records to write when the log must be rewritten (what ``append`` would have written).
        :raises CheckpointError: if the log must be rewritten and ``rebuild`` is ``None``.
        """
        self._need_lock("metrics")
        path = self.path / "metrics.jsonl"
        existed = os.path.lexists(path)
        lines = None if self._state is None else len(self._state.records)
        if self._adopted and offset is not None:
            offset = -1  # the other run's offset means nothing here: rewrite from the records
        log = open_metrics(path, offset, lines, rebuild)
        if not existed:
            self._written.add(path)
        return log

    # ----------------------------------------------------------------------------------------------- checkpoints

    def resume_state(self, *, map_location: Any = "cpu") -> TrainingState:
        """The state to resume from (``resume_from``, else the newest checkpoint that verifies), loaded, hashed and
        checked once; later calls return the same object.

        A checkpoint whose run id differs from ``config.json``'s was copied from another run: refused with one line
        naming both ids and both files, unless ``open(..., force=True)``, which adopts it under this directory's id.

        :raises CheckpointError: for a damaged, crafted or foreign checkpoint.
        """
        if self._state is not None:
            return self._state
        if self.mode not in ("resume", "read"):
            raise ConfigError(f"resume_state needs {self.path} opened with mode 'resume', not {self.mode!r}")
        # A writer resumes from exactly the newest checkpoint (the lock keeps the chain still): a damaged one is
        # refused with a pointer to the previous good file, never passed over in silence as a reader may.
        source = self._resume_from or self.chain.latest()
        payload = load_checkpoint(source, map_location)
        state = TrainingState.from_payload(payload, source=str(source))
        self._adopt(state, source)
        self._state, self._source = state, source
        return state

    def _adopt(self, state: TrainingState, source: Path) -> None:
        mine, theirs = self.run_id, state.run_id
        if mine and theirs and mine != theirs:
            if not self._force:
                raise CheckpointError(
                    f"checkpoint {source} belongs to run {theirs}, but {self.path / 'config.json'} is run {mine}: it "
                    "was copied from another run; resume that run in its own directory, or pass --force-resume to "
                    "adopt it"
                )
            logger.warning("adopting checkpoint %s of run %s into run %s (forced)", source, theirs, mine)
            self._adopted = True
        self.run_id = mine or theirs or new_run_id()

    def save_checkpoint(self, state: TrainingState) -> Path:
        """Write ``state`` (stamped with the run id) as the newest checkpoint of the chain.

        The first save after resuming from an older file (``last.prev.pt``) first moves the newer files aside as
        ``last.superseded-<step>.pt`` (``-2``, ``-3``, ... if taken), so resuming from an old file twice loses
        nothing.

        :raises CheckpointError: on a full disk or an unsaveable state; the previous checkpoints are kept.
        """
        self._need_lock("save_checkpoint")
        data = serialise(self.chain.last, dataclasses.replace(state, run_id=self.run_id).to_payload())
        source = self._source or self._resume_from
        if not self._saved and source is not None and source.exists() and chain_of(source) != ("last", 0):
            self.chain.set_aside(source)
        path = self.chain.save(data)
        self._saved = True
        return path

    def save_best(self, state: TrainingState) -> Path:
        """Write ``state`` (stamped with the run id) as ``best.pt`` with its sidecar, atomically."""
        self._need_lock("save_best")
        path = self.path / "best.pt"
        existed = path.exists()
        save_checkpoint(path, dataclasses.replace(state, run_id=self.run_id).to_payload())
        if not existed:
            self._written.update((path, sidecar(path)))
        return path

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies (``None`` if there is none); safe while a writer rotates the chain."""
        loaded = self.chain.newest()
        return None if loaded is None else loaded.path
