"""One-file checkpoints: state dicts only, atomic writes, a sha256 sidecar, ``weights_only=True`` loads, rotation.

A checkpoint is a dict of tensors and plain Python values (no pickled objects), so it loads with
``torch.load(..., weights_only=True)`` and a malicious file cannot run code; :func:`save_checkpoint` refuses any
other value before it writes. Writes never touch the final path until the bytes are safely on disk::

    torch.save into memory → mkstemp in the same directory → write → flush → fsync → os.replace → fsync(directory)

so a crash at any point leaves either the previous checkpoint or the new one, never a torn file. A ``.sha256``
sidecar, written the same way, detects flipped bytes at load time. Serialising into memory first means that a full
disk surfaces as the ``OSError`` of our own ``write`` (``torch.save`` onto a file reports it as a cryptic
``RuntimeError: ... unexpected pos ...``), and becomes a :class:`~pyro_vae.errors.CheckpointError` that keeps the
previous file.

A run directory keeps its most recent checkpoints in a chain, newest first (:class:`CheckpointDir`)::

    last.pt, last.prev.pt, last.prev2.pt, ..., last.prev{K-1}.pt        (K = keep_last, default 2)

Each save shifts the chain by one rename per file, then moves the new file into ``last.pt``. Whatever the moment of a
crash, every file of the chain is complete, and at most one name is missing for an instant (``last.pt`` between the
shift and the final rename), in which case :meth:`CheckpointDir.latest` falls back to ``last.prev.pt`` and says so.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from pyro_vae.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "LAST",
    "CheckpointDir",
    "atomic_write_bytes",
    "chain_names",
    "load_checkpoint",
    "safe_name",
    "save_checkpoint",
    "sha256_of",
]

#: Version of the payload layout; :func:`load_checkpoint` refuses newer files. Version 2 added the RNG states, the
#: progress within an epoch, the loss history and the metrics-file position needed for a bit-exact resume.
FORMAT_VERSION = 2
#: Name of the newest checkpoint of a run.
LAST = "last.pt"
_TMP_PREFIX = ".tmp-"
_SIDECAR = ".sha256"
#: Errors that mean "the device is full" (or a quota or file-size limit was hit): the fix is the same.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
#: Leaf types that ``torch.load(weights_only=True)`` reconstructs without running code. Exact types for the
#: Python scalars: a ``str`` subclass such as ``torch.__version__`` (a ``TorchVersion``) is pickled as its class.
_PLAIN_EXACT = (str, int, float, bool, type(None))
_PLAIN_SUBCLASSES = (torch.Tensor, torch.dtype, torch.device, torch.Size)


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_name(name: str, *, what: str = "file name") -> str:
    """Check a name that will be joined to a run directory: a relative path without ``..``, NUL or an absolute part.

    ``Path(run_dir) / "/etc/passwd"`` is ``/etc/passwd`` and ``run_dir / "../x"`` leaves the directory, so every
    output name derived from user input passes through here.

    :param str name: the name, e.g. ``"samples.png"`` or ``"figures/loss.png"``.
    :param str what: how to call it in the error message.
    :returns: ``name`` unchanged.
    :raises ConfigError: if the name is empty, absolute, contains a ``..`` component or a NUL byte.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what} must be a non-empty relative name, got {name!r}")
    if "\0" in name:
        raise ConfigError(f"{what} {name!r} contains a NUL byte; use a plain file name")
    parts = Path(name).parts
    if Path(name).is_absolute() or name.startswith(("/", "\\")):
        raise ConfigError(f"{what} {name!r} is absolute but must stay inside the run directory; use a relative name")
    if ".." in parts:
        raise ConfigError(f"{what} {name!r} contains '..' and would leave the run directory; use a plain file name")
    return name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_bytes(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free} bytes free"
    except OSError:
        return "free space unknown"


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, sync_dir: bool = True) -> None:
    """Write a file atomically: ``write(fileobj)`` fills a temp file in the same directory, which then replaces
    ``path``. On any failure (an exception, or ``KeyboardInterrupt``) the temp file is removed and ``path`` keeps its
    previous content; a process killed outright leaves a ``.tmp-*`` file that :meth:`CheckpointDir.clean_temp_files`
    removes.

    :param path: destination.
    :param write: callable that writes the content into a binary file object.
    :param bool sync_dir: ``fsync`` the directory afterwards, which makes the rename itself durable (default).
    :raises CheckpointError: if the device is full (``ENOSPC``), a quota is exceeded (``EDQUOT``) or the file-size
        limit is hit (``EFBIG``); the message names the file and the free space.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            raise CheckpointError(
                f"no space left while writing {path} ({os.strerror(err.errno)}; {_free_bytes(path.parent)}); "
                "the previous file is kept: free some space, then resume"
            ) from err
        raise
    if sync_dir:
        _fsync_dir(path.parent)


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything that ``torch.load(weights_only=True)`` could not read back."""
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise CheckpointError(f"checkpoint key {key!r} at {where or 'top level'} is not a str or int")
            _check_plain(item, f"{where}.{key}" if where else str(key))
    elif type(value) in (list, tuple, torch.Size):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif type(value) not in _PLAIN_EXACT and not isinstance(value, _PLAIN_SUBCLASSES):
        raise CheckpointError(
            f"checkpoint value at {where or 'top level'} is a {type(value).__name__}; only tensors and plain Python "
            "values (dict, list, str, int, float, bool, None) load with weights_only=True"
        )


def _serialise(path: Path, payload: dict[str, Any]) -> bytes:
    payload = {"format_version": FORMAT_VERSION, **payload}
    try:
        _check_plain(payload, "")
    except CheckpointError as err:
        raise CheckpointError(f"could not write checkpoint {path}: {err}; the previous file is kept") from None
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + _SIDECAR)


def _write_sidecar(path: Path, digest: str, *, sync_dir: bool = True) -> None:
    line = f"{digest}  {path.name}\n".encode()
    atomic_write_bytes(_sidecar(path), lambda f: f.write(line), sync_dir=sync_dir)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Save ``payload`` (tensors and plain values) atomically to ``path`` with a sha256 sidecar.

    The sidecar is removed before the file is replaced and rewritten afterwards, so a crash in between leaves a
    complete file without a sidecar (loaded unverified, with a warning), never a file whose sidecar disagrees.

    :returns: the path written.
    :raises CheckpointError: if the payload holds other objects than tensors and plain values, or the device is full;
        the previous file is kept.
    """
    path = Path(path)
    data = _serialise(path, payload)
    digest = hashlib.sha256(data).hexdigest()
    _sidecar(path).unlink(missing_ok=True)
    atomic_write_bytes(path, lambda f: f.write(data), sync_dir=False)
    _write_sidecar(path, digest)
    return path


def _read_digest(sidecar: Path) -> str:
    """The hex digest a sidecar records, or ``""`` if it is missing or empty."""
    try:
        fields = sidecar.read_text(errors="replace").split()
    except FileNotFoundError:
        return ""
    return fields[0] if fields else ""


def _verify(path: Path) -> tuple[int, str | None]:
    """``(size, problem)`` of a checkpoint file, checked against its sidecar without unpickling it."""
    if not path.is_file():
        return 0, "does not exist"
    size = path.stat().st_size
    if size == 0:
        return 0, "is empty"
    sidecar = _sidecar(path)
    if sidecar.is_file():
        expected = _read_digest(sidecar)
        actual = sha256_of(path)
        if actual != expected:
            return size, f"fails its checksum (sha256 {actual[:12]}… ≠ {expected[:12] or 'nothing'}…): it is damaged"
    return size, None


def _chain_of(path: Path) -> tuple[str, int] | None:
    """``("last", i)`` if ``path`` is the i-th file of a rotation chain (``last.pt`` is 0), else ``None``."""
    match = re.fullmatch(r"(.+?)(\.prev([2-9]|[1-9]\d+)?)?\.pt", path.name)
    if match is None:
        return None
    stem, prev, index = match.groups()
    if prev is None:
        return stem, 0
    return stem, int(index) if index else 1


def _chain_name(stem: str, index: int) -> str:
    return f"{stem}.pt" if index == 0 else f"{stem}.prev{'' if index == 1 else index}.pt"


def chain_names(keep_last: int, stem: str = "last") -> list[str]:
    """Names of a rotation chain of ``keep_last`` checkpoints, newest first: ``last.pt``, ``last.prev.pt``,
    ``last.prev2.pt``, ..."""
    return [_chain_name(stem, i) for i in range(keep_last)]


def _previous_good(path: Path) -> str:
    """A pointer to the newest older checkpoint of ``path``'s chain that verifies, for error messages."""
    chain = _chain_of(path)
    if chain is None:
        return ""
    stem, index = chain
    for older in range(index + 1, index + 100):
        candidate = path.with_name(_chain_name(stem, older))
        if not candidate.is_file():
            continue
        size, problem = _verify(candidate)
        if problem is None:
            return (
                f"; the previous checkpoint {candidate} ({size} bytes) verifies: "
                f"resume from it with --resume {candidate}"
            )
    return "; no older checkpoint of this run verifies"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, verifying its sha256 sidecar.

    Every failure (missing, empty, truncated, not a checkpoint, checksum mismatch, unsafe pickle, newer format)
    raises one :class:`~pyro_vae.errors.CheckpointError` that names the file, its size and what is wrong, and points
    to the previous checkpoint of the run when one verifies.
    """
    path = Path(path)
    size, problem = _verify(path)
    if problem is not None:
        where = f"checkpoint {path}" + (f" ({size} bytes)" if problem != "does not exist" else "")
        raise CheckpointError(f"{where} {problem}{_previous_good(path)}")
    where = f"checkpoint {path} ({size} bytes)"
    if not _sidecar(path).is_file():
        logger.warning("%s has no %s sidecar; loading it without verifying its checksum", where, _SIDECAR)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{where} holds objects that are not plain data and was refused ({first}){_previous_good(path)}"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{where} is truncated or not a checkpoint ({first}){_previous_good(path)}") from err
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{where} is not a pyro_vae checkpoint (no format_version){_previous_good(path)}")
    if not isinstance(payload["format_version"], int) or payload["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format {payload['format_version']!r}, newer than this pyro_vae reads ({FORMAT_VERSION}); "
            "upgrade pyro_vae"
        )
    return payload


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
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ConfigError(f"keep_last must be a positive integer, got {keep_last!r}")
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.names = chain_names(keep_last)

    @property
    def last(self) -> Path:
        """Path of the newest checkpoint, ``run_dir / "last.pt"``."""
        return self.run_dir / LAST

    def existing(self) -> list[Path]:
        """Checkpoint files of the chain that exist, newest first (whatever ``keep_last`` was when they were made)."""
        found = []
        for path in self.run_dir.glob("last*.pt"):
            chain = _chain_of(path)
            if chain is not None and chain[0] == "last":
                found.append((chain[1], path))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint to resume from: ``last.pt``; or, if a crash fell between the rotation and the final rename
        (``last.pt`` missing), the newest older one, with a warning; ``None`` if the run has no checkpoint."""
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

    def clean_temp_files(self) -> list[Path]:
        """Remove the ``.tmp-*`` files that a process killed during a write left behind; returns what was removed."""
        removed = []
        for path in self.run_dir.glob(_TMP_PREFIX + "*"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
        if removed:
            logger.info("removed %d stale temporary file(s) from %s", len(removed), self.run_dir)
        return removed

    def save(self, payload: dict[str, Any]) -> Path:
        """Write ``payload`` as the new ``last.pt``, shifting the older checkpoints down the chain.

        The new file is serialised and written to a temp file first, so a full disk or a bad payload changes
        nothing; only then are the renames made.

        :returns: the path of the new checkpoint (``last.pt``).
        :raises CheckpointError: as :func:`save_checkpoint`; the previous checkpoints are kept.
        """
        last = self.last
        data = _serialise(last, payload)
        digest = hashlib.sha256(data).hexdigest()
        # Written under a temp name that clean_temp_files recognises, and complete on disk before any rename.
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + last.name + ".", dir=self.run_dir)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, OSError) and err.errno in _NO_SPACE:
                raise CheckpointError(
                    f"no space left while writing {last} ({len(data)} bytes needed; {os.strerror(err.errno)}; "
                    f"{_free_bytes(self.run_dir)}); the previous checkpoints are kept: free some space, then resume "
                    f"with --resume {self.run_dir}"
                ) from err
            raise
        try:
            self._shift()
            os.replace(tmp, last)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _write_sidecar(last, digest, sync_dir=False)
        self._drop_beyond()
        _fsync_dir(self.run_dir)
        return last

    def _shift(self) -> None:
        # Oldest first, so that no rename overwrites a file that has not moved on yet. A file's sidecar is removed
        # before the file moves and follows it afterwards: the pair never disagrees, at worst the sidecar is missing.
        for i in range(self.keep_last - 2, -1, -1):
            src, dst = self.run_dir / self.names[i], self.run_dir / self.names[i + 1]
            if not src.exists():
                continue
            digest = _read_digest(_sidecar(src))
            _sidecar(dst).unlink(missing_ok=True)
            os.replace(src, dst)
            if digest:
                _write_sidecar(dst, digest, sync_dir=False)  # rewritten, so that it names the file it belongs to
            _sidecar(src).unlink(missing_ok=True)
        _sidecar(self.last).unlink(missing_ok=True)

    def _drop_beyond(self) -> None:
        """Remove chain files beyond ``keep_last`` (left by an earlier run with a larger ``keep_last``)."""
        for path in self.existing():
            chain = _chain_of(path)
            if chain is not None and chain[1] >= self.keep_last:
                path.unlink(missing_ok=True)
                _sidecar(path).unlink(missing_ok=True)
