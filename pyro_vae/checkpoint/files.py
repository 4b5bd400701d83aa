"""Atomic files and one-file checkpoints: state dicts only, a sha256 sidecar, ``weights_only=True`` loads.

Writes never touch the final path until the bytes are safely on disk::

    serialise into memory → mkstemp in the same directory → write → fsync → os.replace → fsync(directory)

so a crash at any point leaves either the previous file or the new one, never a torn file, and ``os.replace`` puts a
new file in place of a symbolic link instead of writing through it. Serialising into memory first means that a full
disk surfaces as the ``OSError`` of our own ``write`` and becomes a :class:`~pyro_vae.errors.CheckpointError` that
names the file and the free space and keeps the previous file.
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

#: Version of the payload layout; :func:`load_checkpoint` refuses newer files. Version 2 added the RNG states, the
#: progress within an epoch, the loss history and the metrics-file position needed for a bit-exact resume; version 3
#: added the run id, the world size, the global batch, the data's absolute path and the callbacks' state.
FORMAT_VERSION = 3
#: Name of the newest checkpoint of a run.
LAST = "last.pt"
TMP_PREFIX = ".tmp-"
SIDECAR = ".sha256"
#: Errors that mean "the device is full" (or a quota or file-size limit was hit): the fix is the same.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
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


def fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_space(directory: Path) -> str:
    """``"N bytes free"`` on the device of ``directory``, for error messages."""
    try:
        return f"{shutil.disk_usage(directory).free} bytes free"
    except OSError:
        return "free space unknown"


def no_space_error(path: Path, err: OSError, keep: str = "the previous file is kept") -> CheckpointError | None:
    """The one-line error for a full device (``ENOSPC``, ``EDQUOT``, ``EFBIG``) while writing ``path``; ``None``
    for any other ``OSError``."""
    if err.errno not in NO_SPACE:
        return None
    return CheckpointError(
        f"no space left while writing {path} ({os.strerror(err.errno)}; {free_space(path.parent)}); "
        f"{keep}: free some space, then resume"
    )


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte of ``data`` is written (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, sync_dir: bool = True) -> None:
    """Write a file atomically: ``write(fileobj)`` fills a temp file in the same directory, which then replaces
    ``path``. On any failure (an exception, or ``KeyboardInterrupt``) the temp file is removed and ``path`` keeps its
    previous content; a process killed outright leaves a ``.tmp-*`` file that
    :meth:`~pyro_vae.checkpoint.CheckpointDir.clean_temp_files` removes.

    :param path: destination; a symbolic link there is replaced, never written through.
    :param write: callable that writes the content into a binary file object.
    :param bool sync_dir: ``fsync`` the directory afterwards, which makes the rename itself durable (default).
    :raises CheckpointError: if the device is full (``ENOSPC``), a quota is exceeded (``EDQUOT``) or the file-size
        limit is hit (``EFBIG``); the message names the file and the free space.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and (error := no_space_error(path, err)) is not None:
            raise error from err
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes, *, sync_dir: bool = True) -> None:
    """:func:`atomic_write_bytes` of ready bytes, written with ``os.write``."""

    def fill(f: IO[bytes]) -> None:
        f.flush()
        write_all(f.fileno(), data)

    atomic_write_bytes(path, fill, sync_dir=sync_dir)


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


def serialise(path: Path, payload: dict[str, Any]) -> bytes:
    """The bytes of a checkpoint, stamped with :data:`FORMAT_VERSION`, after checking that they hold plain data."""
    payload = {"format_version": FORMAT_VERSION, **payload}
    try:
        _check_plain(payload, "")
    except CheckpointError as err:
        raise CheckpointError(f"could not write checkpoint {path}: {err}; the previous file is kept") from None
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def sidecar(path: Path) -> Path:
    """The ``.sha256`` file next to checkpoint ``path``."""
    return path.with_name(path.name + SIDECAR)


def write_sidecar(path: Path, digest: str, *, sync_dir: bool = True) -> None:
    """Write the sidecar of ``path`` recording ``digest``, atomically."""
    atomic_write(sidecar(path), f"{digest}  {path.name}\n".encode(), sync_dir=sync_dir)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Save ``payload`` (tensors and plain values) atomically to ``path`` with a sha256 sidecar.

    The sidecar is removed before the file is replaced and rewritten afterwards, so a crash in between leaves a
    complete file without a sidecar (loaded unverified, with a warning), never a file whose sidecar disagrees.

    :returns: the path written.
    :raises CheckpointError: if the payload holds other objects than tensors and plain values, or the device is full;
        the previous file is kept.
    """
    path = Path(path)
    data = serialise(path, payload)
    digest = hashlib.sha256(data).hexdigest()
    sidecar(path).unlink(missing_ok=True)
    atomic_write(path, data, sync_dir=False)
    write_sidecar(path, digest)
    return path


def read_digest(path: Path) -> str:
    """The hex digest that the sidecar of ``path`` records, or ``""`` if it is missing or empty."""
    try:
        fields = sidecar(path).read_text(errors="replace").split()
    except FileNotFoundError:
        return ""
    return fields[0] if fields else ""


def read_verified(path: Path) -> tuple[bytes, str | None]:
    """``(bytes, problem)``: the file read once, and what is wrong with it (``None`` if it matches its sidecar or has
    none). Hashing the bytes that will be unpickled, not a second read, keeps a concurrent rotation from slipping an
    unverified file in between.

    :raises FileNotFoundError: if ``path`` does not exist (or vanished while being opened).
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        return data, "is empty"
    expected = read_digest(path)
    actual = hashlib.sha256(data).hexdigest()
    if sidecar(path).is_file() and actual != expected:
        return data, f"fails its checksum (sha256 {actual[:12]}… ≠ {expected[:12] or 'nothing'}…): it is damaged"
    return data, None


_CHAIN = re.compile(r"(.+?)(\.prev([2-9]|[1-9]\d+)?)?\.pt")


def chain_of(path: Path) -> tuple[str, int] | None:
    """``("last", i)`` if ``path`` is the i-th file of a rotation chain (``last.pt`` is 0), else ``None``."""
    match = _CHAIN.fullmatch(path.name)
    if match is None:
        return None
    stem, prev, index = match.groups()
    if prev is None:
        return stem, 0
    return stem, int(index) if index else 1


def chain_name(stem: str, index: int) -> str:
    """The name of file ``index`` of chain ``stem``: ``last.pt``, ``last.prev.pt``, ``last.prev2.pt``, ..."""
    return f"{stem}.pt" if index == 0 else f"{stem}.prev{'' if index == 1 else index}.pt"


def chain_names(keep_last: int, stem: str = "last") -> list[str]:
    """Names of a rotation chain of ``keep_last`` checkpoints, newest first: ``last.pt``, ``last.prev.pt``,
    ``last.prev2.pt``, ..."""
    return [chain_name(stem, i) for i in range(keep_last)]


def chain_files(directory: Path, stem: str = "last") -> list[Path]:
    """The files of chain ``stem`` that exist in ``directory``, newest first (one directory listing)."""
    found = []
    for path in directory.glob(f"{stem}*.pt"):
        chain = chain_of(path)
        if chain is not None and chain[0] == stem:
            found.append((chain[1], path))
    return [path for _, path in sorted(found)]


def _previous_good(path: Path) -> str:
    """A pointer to the newest older checkpoint of ``path``'s chain that verifies, for error messages."""
    chain = chain_of(path)
    if chain is None:
        return ""
    for candidate in chain_files(path.parent, chain[0]):
        if chain_of(candidate)[1] <= chain[1]:
            continue
        try:
            data, problem = read_verified(candidate)
        except OSError:
            continue
        if problem is None:
            return (
                f"; the previous checkpoint {candidate} ({len(data)} bytes) verifies: "
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
    try:
        data, problem = read_verified(path)
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"checkpoint {path} does not exist{_previous_good(path)}") from None
    where = f"checkpoint {path} ({len(data)} bytes)"
    if problem is not None:
        raise CheckpointError(f"{where} {problem}{_previous_good(path)}")
    if not sidecar(path).is_file():
        logger.warning("%s has no %s sidecar; loading it without verifying its checksum", where, SIDECAR)
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
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
