"""Reading and writing IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions), one big-endian
``uint32`` per dimension, then the values in C order. Only ``uint8`` payloads (dtype code ``0x08``) are supported,
which covers every MNIST-family image and label file. Files ending in ``.gz`` are read with :mod:`gzip` and files
ending in ``.xz`` with :mod:`lzma`; anything else is read as raw bytes.

Every problem with a file (missing, empty, damaged compression, bad header, truncated or over-long payload) raises
:class:`~pyro_vae.errors.DataError` naming the file and its size on disk.
"""

from __future__ import annotations

import gzip
import io
import logging
import lzma
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from pyro_vae.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["decode_idx", "read_idx", "write_idx"]

_UINT8 = 0x08
#: Names of the IDX dtype codes, so that a file with another dtype is refused by name.
_DTYPE_NAMES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
#: ``lzma`` preset for written ``.xz`` files: the embedded data is written once and read often, so pay for size.
XZ_PRESET = 9 | lzma.PRESET_EXTREME


def _describe(source: str, size: int) -> str:
    return f"IDX file {source} ({size} bytes)"


def _decompress(raw: bytes, *, source: str, suffix: str) -> bytes:
    """Undo the compression implied by ``suffix``; damaged streams become :class:`DataError`."""
    what = _describe(source, len(raw))
    try:
        if suffix == ".gz":
            return gzip.decompress(raw)
        if suffix == ".xz":
            return lzma.decompress(raw, format=lzma.FORMAT_XZ)
    except (gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(
            f"{what} is not a valid {suffix} stream ({exc}); the file is damaged or incomplete, replace it"
        ) from exc
    return raw


def decode_idx(raw: bytes, *, source: str, suffix: str | None = None) -> np.ndarray:
    """Decode the bytes of an IDX file (already read from disk or from package data).

    :param bytes raw: the file's contents, compressed or not.
    :param str source: the file's name, used in error messages.
    :param suffix: ``".gz"``, ``".xz"`` or anything else for raw bytes; default: the suffix of ``source``.
    :returns: a writable ``uint8`` array of the shape given in the header.
    :raises DataError: if the bytes are not a well-formed ``uint8`` IDX file.
    """
    if suffix is None:
        suffix = Path(source).suffix
    size = len(raw)
    what = _describe(source, size)
    if size == 0:
        raise DataError(f"{what} is empty; the file is damaged or incomplete, replace it")
    payload = _decompress(raw, source=source, suffix=suffix)
    if len(payload) < 4 or payload[0] != 0 or payload[1] != 0:
        raise DataError(
            f"{what} does not start with the IDX magic number (two zero bytes, dtype, ndim), "
            f"got {payload[:4].hex() or 'nothing'}; it is not an IDX file or is damaged"
        )
    dtype_code, ndim = payload[2], payload[3]
    if dtype_code != _UINT8:
        name = _DTYPE_NAMES.get(dtype_code, f"unknown code 0x{dtype_code:02x}")
        raise DataError(f"{what} holds {name} values but only uint8 (code 0x08) IDX files are supported")
    if ndim == 0:
        raise DataError(f"{what} declares 0 dimensions; an IDX image or label file has at least 1")
    header_len = 4 + 4 * ndim
    if len(payload) < header_len:
        raise DataError(
            f"{what} is truncated inside its header: {ndim} dimensions need {header_len} header bytes "
            f"but the file has {len(payload)}; replace it"
        )
    dims = struct.unpack(f">{ndim}I", payload[4:header_len])
    expected = math.prod(dims)
    actual = len(payload) - header_len
    shape = "x".join(map(str, dims))
    if actual < expected:
        raise DataError(
            f"{what} is truncated: its header declares {shape} = {expected} values but only {actual} follow; "
            "replace the file"
        )
    if actual > expected:
        raise DataError(
            f"{what} has {actual - expected} trailing bytes after the {shape} = {expected} values its header "
            "declares; the file is damaged, replace it"
        )
    # A bytearray makes the array writable, so torch.from_numpy accepts it without a warning.
    return np.frombuffer(bytearray(memoryview(payload)[header_len:]), dtype=np.uint8).reshape(dims)


def read_idx(path: str | os.PathLike, *, missing_hint: str | None = None) -> np.ndarray:
    """Read a ``uint8`` IDX file, raw, gzip-compressed (``.gz``) or xz-compressed (``.xz``).

    :param path: the file; its suffix selects the decompression.
    :param missing_hint: what to tell the user when the file does not exist, e.g. how to install it.
    :returns: a writable ``uint8`` array of the shape given in the header, e.g. ``(60000, 28, 28)``.
    :raises DataError: if the file is missing, unreadable or damaged.
    """
    path = Path(path)
    if not path.is_file():
        message = f"IDX file {path} not found"
        if path.exists():
            message = f"IDX file {path} is not a regular file"
        raise DataError(f"{message}; {missing_hint}" if missing_hint else f"{message}; check the path")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"IDX file {path} cannot be read ({exc.strerror}); check its permissions") from exc
    array = decode_idx(raw, source=str(path), suffix=path.suffix)
    logger.debug("read %s: shape %s", path, array.shape)
    return array


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a ``uint8`` array as an IDX file, compressed according to the suffix of ``path``.

    ``.gz`` files are written with a zero timestamp and ``.xz`` files with preset ``9 | PRESET_EXTREME``, so the
    output bytes depend only on the array. The file is written beside ``path`` and renamed into place.

    :param path: the output file; ``.gz`` or ``.xz`` compress, anything else is written raw.
    :param numpy.ndarray array: ``uint8`` values of any shape with 1 to 255 dimensions, each below ``2**32``.
    :raises TypeError: if ``array`` is not a ``uint8`` array.
    :raises ValueError: if its shape cannot be expressed in an IDX header.
    """
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        raise TypeError(f"write_idx needs a uint8 numpy array, got {getattr(array, 'dtype', type(array).__name__)}")
    if not 1 <= array.ndim <= 255 or any(d >= 2**32 for d in array.shape):
        raise ValueError(f"shape {array.shape} cannot be stored in an IDX header")
    path = Path(path)
    header = bytes([0, 0, _UINT8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array).tobytes()
    if path.suffix == ".gz":
        buffer = io.BytesIO()
        with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as stream:
            stream.write(data)
        data = buffer.getvalue()
    elif path.suffix == ".xz":
        data = lzma.compress(data, format=lzma.FORMAT_XZ, preset=XZ_PRESET)
    # Written beside the target and renamed, so an interrupted run never leaves a half-written file under the name.
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
