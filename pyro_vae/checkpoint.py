"""One-file checkpoints: state dicts only, atomic writes, a sha256 sidecar, and ``weights_only=True`` loads.

A checkpoint is a dict of tensors and plain Python values (no pickled objects), so it loads with
``torch.load(..., weights_only=True)`` and a malicious file cannot run code. Writes never touch the final path until
the bytes are safely on disk::

    mkstemp in the same directory → torch.save → flush → fsync → os.replace → fsync(directory)

so a crash at any point leaves either the previous checkpoint or the new one, never a torn file. A ``.sha256``
sidecar, written the same way, detects flipped bytes at load time.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from pyro_vae.errors import CheckpointError

FORMAT_VERSION = 1
_TMP_PREFIX = ".tmp-"


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def atomic_write_bytes(path: str | os.PathLike, write) -> None:
    """Write a file atomically: ``write(fileobj)`` fills a temp file in the same directory, which then replaces
    ``path``. On any failure the temp file is removed and ``path`` keeps its previous content.

    :param path: destination.
    :param write: callable that writes the content into a binary file object.
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
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise CheckpointError(
                f"no space left on the device while writing {path}; the previous file is kept"
            ) from err
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Save ``payload`` (tensors and plain values) atomically to ``path`` with a sha256 sidecar.

    :returns: the path written.
    """
    path = Path(path)
    payload = {"format_version": FORMAT_VERSION, **payload}
    try:
        atomic_write_bytes(path, lambda f: torch.save(payload, f))
    except RuntimeError as err:
        # torch.save reports a full disk as "unexpected pos ..."; name the cause.
        raise CheckpointError(f"could not write checkpoint {path}: {err}; the previous file is kept") from err
    digest = sha256_of(path)
    atomic_write_bytes(path.with_name(path.name + ".sha256"), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, verifying its sha256 sidecar.

    Every failure (missing, empty, truncated, not a checkpoint, checksum mismatch, unsafe pickle) raises one
    :class:`~pyro_vae.errors.CheckpointError` that names the file, its size and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    where = f"checkpoint {path} ({size} bytes)"
    if size == 0:
        raise CheckpointError(f"{where} is empty")
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        expected = sidecar.read_text().split()[0] if sidecar.stat().st_size else ""
        actual = sha256_of(path)
        if actual != expected:
            raise CheckpointError(
                f"{where} fails its checksum (sha256 {actual[:12]}… ≠ {expected[:12]}…): it is damaged"
            )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{where} holds objects that are not plain data and was refused: {err}") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{where} is truncated or not a checkpoint: {err or type(err).__name__}") from err
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{where} is not a pyro_vae checkpoint (no format_version)")
    if payload["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format {payload['format_version']}, newer than this pyro_vae reads ({FORMAT_VERSION}); "
            "upgrade pyro_vae"
        )
    return payload
