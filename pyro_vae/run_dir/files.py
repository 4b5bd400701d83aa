"""The pieces of a run directory below :class:`~pyro_vae.run_dir.RunDir`: the writer's lock, strict JSON, and the
append-only metrics log.

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``RUN/.lock``, held by the writer for the whole run; the file
records the holder's pid and start time, so that a second writer is told who holds it. The kernel releases the lock
when the holder exits, however it exits. Files here are opened with ``O_NOFOLLOW`` (a planted symbolic link is
refused, never written through) and ``O_NONBLOCK`` (a planted FIFO cannot hang the run).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import secrets
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyro_vae.checkpoint.files import atomic_write, no_space_error, write_all
from pyro_vae.errors import CheckpointError, ConfigError

LOCK = ".lock"
#: How long a writer waits for a lock holder to write its pid before naming it "unknown".
_PID_WAIT_SECONDS = 2.0
_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


#: Marks a ``config.json`` as a pyro_vae run's (with ``run_id``); a file without it is never overwritten.
CONFIG_FORMAT = "pyro_vae.run/1"


def is_run_config(path: Path) -> bool:
    """Whether ``path`` is a pyro_vae run's ``config.json``: stamped with :data:`CONFIG_FORMAT`, or the layout that
    runs wrote before run ids (``config`` with ``data``/``model``/``train`` sections, and ``environment``)."""
    try:
        record = json.loads(path.read_bytes()[: 1 << 20])
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict):
        return False
    legacy = isinstance(record.get("config"), dict) and {"data", "model", "train"} <= set(record["config"])
    return record.get("format") == CONFIG_FORMAT or (legacy and "environment" in record)


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def config_run_id(path: Path) -> str | None:
    try:
        record = json.loads((path / "config.json").read_bytes()[: 1 << 20])
    except (OSError, ValueError):
        return None
    run_id = record.get("run_id") if isinstance(record, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None`` (JSON ``null``): ``json.dumps`` would otherwise
    write bare ``NaN`` / ``Infinity`` tokens, which are not JSON and which strict readers refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: finite_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(value) for value in obj]
    return obj


def json_bytes(obj: Any, *, indent: int | None = 2) -> bytes:
    """Strict JSON (non-finite floats as ``null``); indented and key-sorted unless ``indent=None`` (one line)."""
    text = json.dumps(finite_json(obj), indent=indent, sort_keys=indent is not None, allow_nan=False)
    return (text + "\n").encode()


def open_no_follow(path: Path, flags: int, what: str) -> int:
    """``os.open`` that refuses a symbolic link or anything but a regular file, with one line naming ``path``."""
    try:
        fd = os.open(path, flags | _FLAGS, 0o666)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENXIO):
            raise ConfigError(
                f"{path} is a symbolic link or a special file; pyro_vae never writes through one: remove it"
            ) from None
        raise CheckpointError(f"cannot open {what} {path} ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path} is not a regular file; pyro_vae never writes through one: remove it")
    return fd


def lock_holder(directory: Path) -> str | None:
    """Who holds the writer's lock of ``directory`` (``"process PID (started TIME)"``), or ``None`` if nobody does.
    Creates nothing."""
    try:
        fd = os.open(directory / LOCK, os.O_RDONLY | _FLAGS)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ConfigError(f"cannot check the lock {directory / LOCK} ({err.strerror}); remove it") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe(fd: int) -> str:
    deadline = time.monotonic() + _PID_WAIT_SECONDS
    while True:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
        if len(text) >= 4 and text[0] == "pid":  # "pid PID started TIME"
            return f"process {text[1]} (started {text[3]})"
        if time.monotonic() > deadline:
            return "another process"
        time.sleep(0.01)  # the holder has the lock but has not written its pid yet


def in_use(directory: Path, holder: str) -> ConfigError:
    """The one-line error for a second writer."""
    return ConfigError(f"run directory {directory} is in use by {holder}; wait for it or choose another --out")


def acquire_lock(directory: Path) -> tuple[int, bool]:
    """Take the writer's lock of ``directory``: ``(fd, created)``, ``created`` when this call made ``.lock``.

    :raises ConfigError: naming the holder if another process has it.
    """
    path = directory / LOCK
    while True:
        created = not os.path.lexists(path)
        fd = open_no_follow(path, os.O_RDWR | os.O_CREAT, "lock file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise in_use(directory, holder) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed (a refused run cleaned up) between our open and our lock: retry
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} started {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
    return fd, created


class MetricsLog:
    """``metrics.jsonl``: one strict JSON record per line, each flushed and ``fsync``-ed as it is appended.

    Opened by :meth:`~pyro_vae.run_dir.RunDir.metrics`; a write that fails (a full disk) is cut back, so the file
    keeps exactly its previous lines.
    """

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd = fd
        self._offset = os.lseek(fd, 0, os.SEEK_END)

    @property
    def offset(self) -> int:
        """Bytes written so far: what a checkpoint records, to cut the log back to on resume."""
        return self._offset

    def append(self, record: dict) -> None:
        """Write ``record`` as one line (NaN and infinities as ``null``).

        :raises CheckpointError: on a full disk, naming the file and the free space; the log keeps its lines.
        """
        if self._fd < 0:
            raise CheckpointError(f"{self.path} is closed; open it with RunDir.metrics()")
        line = json_bytes(record, indent=None)
        try:
            write_all(self._fd, line)
            os.fsync(self._fd)
        except OSError as err:
            os.ftruncate(self._fd, self._offset)  # no torn line: the file ends with its last whole record
            error = no_space_error(self.path, err, "its previous lines are kept")
            raise (error or CheckpointError(f"cannot append to {self.path} ({err.strerror})")) from err
        self._offset += len(line)

    def close(self) -> None:
        """Close the file (again: nothing)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _clean_prefix(data: bytes, offset: int, lines: int | None) -> bool:
    """Whether the first ``offset`` bytes of ``data`` are whole JSON lines (``lines`` of them, when given)."""
    if len(data) < offset or (offset and data[offset - 1 : offset] != b"\n"):
        return False
    head = data[:offset].splitlines()
    if lines is not None and len(head) != lines:
        return False
    try:
        return all(isinstance(json.loads(line), dict) for line in head)
    except ValueError:
        return False


def open_metrics(path: Path, offset: int | None, lines: int | None, rebuild: Sequence[dict] | None) -> MetricsLog:
    """Open ``path`` for appending: empty when ``offset`` is ``None``; else cut back to ``offset`` when that is a
    clean cut (whole JSON lines, ``lines`` of them), or rewritten from ``rebuild`` when it is not."""
    if offset is None:
        return MetricsLog(path, open_no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, "log"))
    fd = -1  # a negative offset asks for a rewrite
    if offset >= 0:
        try:
            fd = open_no_follow(path, os.O_RDWR, "metrics log")
        except CheckpointError:
            fd = -1  # missing: rebuilt below
    if fd >= 0:
        data = os.pread(fd, offset + 1, 0)
        if _clean_prefix(data, offset, lines):
            os.ftruncate(fd, offset)
            os.close(fd)
            return MetricsLog(path, open_no_follow(path, os.O_WRONLY | os.O_APPEND, "metrics log"))
        os.close(fd)
    if rebuild is None:
        raise CheckpointError(
            f"{path} does not match the checkpoint (missing, shorter, or cut mid-line at byte {offset}); "
            "pass its records to RunDir.metrics(rebuild=...) to rewrite it"
        )
    atomic_write(path, b"".join(json_bytes(r, indent=None) for r in rebuild))
    return MetricsLog(path, open_no_follow(path, os.O_WRONLY | os.O_APPEND, "metrics log"))
