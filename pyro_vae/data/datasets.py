"""Image datasets: loading, validation, and the :class:`Dataset` record.

:func:`load_dataset` turns a :class:`~pyro_vae.config.DataConfig` into a :class:`Dataset` whose images are float32
``(N, D)`` tensors in ``[0, 1]``. The sources are

* ``embedded``: the Fashion-MNIST subset shipped in ``pyro_vae/data/embedded`` (10000 training and 2000 test
  images, 1000 and 200 per class), checked against the sha256 sums in its ``manifest.json`` at every load;
* ``fashion-mnist``: the four IDX files (raw, ``.gz`` or ``.xz``) in ``data_dir``, by default where Debian's
  ``dataset-fashion-mnist`` package installs them;
* ``mnist``: :class:`torchvision.datasets.MNIST`, downloaded into ``data_dir`` (default ``./data``);
* ``npz``: the user's ``.npz`` file (see :func:`load_dataset`).

All images pass through :func:`~pyro_vae.data.images.validate_images` once, at load; anything unusable is a
:class:`~pyro_vae.errors.DataError` that says what was found and what to do.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import math
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from pyro_vae.config import DEFAULT_FASHION_MNIST_DIR, DataConfig
from pyro_vae.data.classes import FASHION_MNIST_CLASSES, MNIST_CLASSES, class_names_from_array
from pyro_vae.data.idx import decode_idx, read_idx
from pyro_vae.data.images import check_image_tensor, images_and_shape, labels, read_layout, validate_images
from pyro_vae.errors import DataError, unknown_choice

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_FILES",
    "FASHION_MNIST_HINT",
    "HOLDOUT_SEED",
    "Dataset",
    "check_dataset",
    "load_dataset",
    "load_embedded_files",
    "validate_images",
]

#: What to tell a user whose Fashion-MNIST files are missing.
FASHION_MNIST_HINT = "install it with: apt-get install dataset-fashion-mnist, or pass --data-dir"
#: Seed of the permutation that holds out the test split of an ``.npz`` file without ``x_test``.
HOLDOUT_SEED = 0
#: File of each split in the embedded data directory, in the order the manifest lists them.
EMBEDDED_FILES = {
    "x_train": "train-images-idx3-ubyte.xz",
    "y_train": "train-labels-idx1-ubyte.xz",
    "x_test": "t10k-images-idx3-ubyte.xz",
    "y_test": "t10k-labels-idx1-ubyte.xz",
}
_IDX_STEMS = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_NPZ_KEYS = ("x", "y", "x_test", "y_test", "layout", "classes")
_SAVE_HINT = "save the images with numpy.savez(path, x=images, y=labels)"


@dataclass(frozen=True, repr=False)
class Dataset:
    """A train/test pair of image sets, validated and ready for a model.

    :param str name: where the data came from: ``"embedded-fashion-mnist"``, ``"fashion-mnist"``, ``"mnist"``, or
        ``"npz:<file name>"``.
    :param torch.Tensor x_train: ``(N, D)`` contiguous float32 images with values in ``[0, 1]``.
    :param y_train: ``(N,)`` int64 labels, or ``None`` when the source has none.
    :param torch.Tensor x_test: ``(M, D)`` contiguous float32 images with values in ``[0, 1]``.
    :param y_test: ``(M,)`` int64 labels, or ``None``.
    :param image_shape: ``(C, H, W)`` with ``C * H * W == D`` (grey: ``C = 1``; rows are flattened channel-first)
        when the source gave images, so networks and plots can reshape rows; ``None`` when it gave flat ``(N, D)``.
    :param bool binary: whether every value of both splits is exactly 0 or 1.
    :param class_names: the name of each label ``0..C-1`` where the source has them (Fashion-MNIST, MNIST, an npz
        ``classes`` array), so that figures can name classes; ``None`` otherwise.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_test: torch.Tensor
    y_test: torch.Tensor | None
    image_shape: tuple[int, ...] | None
    binary: bool
    class_names: tuple[str, ...] | None = None

    @property
    def input_dim(self) -> int:
        """D, the number of values per image."""
        return self.x_train.shape[1]

    def __repr__(self) -> str:
        # The default repr would print every pixel.
        labelled = "labelled" if self.y_train is not None else "unlabelled"
        return (
            f"Dataset(name={self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
            f"image_shape={self.image_shape}, binary={self.binary}, {labelled})"
        )


def check_dataset(data: Dataset) -> None:
    """Refuse a :class:`Dataset` whose images are not float ``(N, D)``, finite and in ``[0, 1]``.

    :func:`load_dataset` validates what it loads; this catches a :class:`Dataset` built by hand before training, where
    one NaN pixel turns every weight into NaN in a single step.

    :raises DataError: naming the split (``data.x_train`` or ``data.x_test``), what was found and what to do.
    """
    for what, x in (("data.x_train", data.x_train), ("data.x_test", data.x_test)):
        check_image_tensor(x, what=what)


class _Loaded(NamedTuple):
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_test: torch.Tensor
    y_test: torch.Tensor | None
    image_shape: tuple[int, ...] | None
    class_names: tuple[str, ...] | None = None


def _split(
    name: str,
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    *,
    what: tuple[str, str, str, str],
    layout: str | None = None,
) -> _Loaded:
    """Validate both splits of a source; ``what`` names x_train, y_train, x_test, y_test in messages; ``layout``
    (``"NCHW"``/``"NHWC"``) settles 4-d images whose channel axis reads both ways."""
    xt, shape_train = images_and_shape(x_train, what[0], layout)
    xs, shape_test = images_and_shape(x_test, what[2], layout)
    if xt.shape[1] != xs.shape[1] or shape_train != shape_test:
        raise DataError(
            f"{what[0]} holds images of shape {shape_train or xt.shape[1]} but {what[2]} of shape "
            f"{shape_test or xs.shape[1]}; both splits must have the same image shape"
        )
    yt = None if y_train is None else labels(y_train, len(xt), what=what[1], images=what[0])
    ys = None if y_test is None else labels(y_test, len(xs), what=what[3], images=what[2])
    return _Loaded(name, xt, yt, xs, ys, shape_train)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_embedded_files(directory: Traversable | Path) -> dict[str, np.ndarray]:
    """Read and verify the embedded IDX files in ``directory`` against its ``manifest.json``.

    :param directory: a directory holding ``manifest.json`` and the files of :data:`EMBEDDED_FILES`.
    :returns: ``{"x_train": uint8 (N, 28, 28), "y_train": uint8 (N,), "x_test": ..., "y_test": ...}``.
    :raises DataError: if a file is missing, or its sha256 or shape differs from the manifest.
    """
    fix = "the package data is damaged; reinstall pyro_vae"
    manifest_file = directory / "manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        entries = {key: manifest["files"][name] for key, name in EMBEDDED_FILES.items()}
        counts = {"train": manifest["n_train"], "test": manifest["n_test"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"embedded data manifest {manifest_file} cannot be read ({exc!r}); {fix}") from exc
    arrays = {}
    for key, name in EMBEDDED_FILES.items():
        source = directory / name
        try:
            raw = source.read_bytes()
        except OSError as exc:
            raise DataError(f"embedded data file {source} cannot be read ({exc.strerror}); {fix}") from exc
        digest = _sha256(raw)
        if digest != entries[key].get("sha256"):
            raise DataError(
                f"embedded data file {source} ({len(raw)} bytes) has sha256 {digest[:16]}... but the manifest "
                f"records {str(entries[key].get('sha256'))[:16]}...; {fix}"
            )
        arrays[key] = decode_idx(raw, source=str(source), suffix=".xz")
        n = counts[key.split("_")[1]]
        if arrays[key].shape[0] != n or list(arrays[key].shape) != entries[key].get("shape"):
            raise DataError(
                f"embedded data file {source} holds shape {arrays[key].shape} but the manifest records "
                f"{entries[key].get('shape')} with {n} images; {fix}"
            )
    return arrays


def _load_embedded(config: DataConfig) -> _Loaded:
    if config.data_dir:
        logger.warning("data_dir %r is ignored: dataset 'embedded' is read from the package", config.data_dir)
    arrays = load_embedded_files(importlib.resources.files("pyro_vae.data") / "embedded")
    return _split(
        "embedded-fashion-mnist",
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        what=tuple(f"embedded {EMBEDDED_FILES[key]}" for key in ("x_train", "y_train", "x_test", "y_test")),
    )._replace(class_names=FASHION_MNIST_CLASSES)


def _find_idx(directory: Path, stem: str) -> Path:
    for suffix in ("", ".gz", ".xz"):
        candidate = directory / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {directory}; {FASHION_MNIST_HINT}")


def _load_fashion_mnist(config: DataConfig) -> _Loaded:
    directory = Path(config.data_dir or DEFAULT_FASHION_MNIST_DIR)
    paths = {key: _find_idx(directory, stem) for key, stem in _IDX_STEMS.items()}
    arrays = {key: read_idx(path, missing_hint=FASHION_MNIST_HINT) for key, path in paths.items()}
    for key in ("x_train", "x_test"):
        if arrays[key].ndim != 3:
            raise DataError(
                f"{paths[key]} holds an array of shape {arrays[key].shape} but an IDX image file is (N, H, W); "
                "check that the file names are not swapped"
            )
    return _split(
        "fashion-mnist",
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        what=tuple(str(paths[key]) for key in ("x_train", "y_train", "x_test", "y_test")),
    )._replace(class_names=FASHION_MNIST_CLASSES)


def _load_mnist(config: DataConfig) -> _Loaded:
    # torchvision takes seconds to import and only this source needs it.
    from torchvision import datasets

    root = config.data_dir or "./data"
    parts = []
    for train in (True, False):
        try:
            mnist = datasets.MNIST(root=root, train=train, download=True)
        except (RuntimeError, OSError) as exc:
            lines = str(exc).strip().splitlines()
            cause = lines[0].rstrip(":") if lines else type(exc).__name__
            raise DataError(
                f"could not download MNIST into {root} (no network? {cause}); pass --data-dir with the MNIST files, "
                "or use --dataset embedded / fashion-mnist"
            ) from exc
        parts += [mnist.data, mnist.targets]
    return _split(
        "mnist",
        *parts,
        what=("MNIST training images", "MNIST training labels", "MNIST test images", "MNIST test labels"),
    )._replace(class_names=MNIST_CLASSES)


def _check_npz_sizes(path: Path, keys: list[str]) -> None:
    """Read the ``.npy`` header of each array in the archive and refuse one that claims more bytes than its member
    holds, before numpy allocates the array it claims (a header saying 10**12 elements is a MemoryError)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for key in keys:
                info = archive.getinfo(f"{key}.npy")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = {
                        (1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0,
                    }.get(version)
                    if read_header is None:
                        raise DataError(
                            f"array {key!r} of data file {path} is in .npy format version {version}, which pyro_vae "
                            f"does not read; {_SAVE_HINT}"
                        )
                    shape, _, dtype = read_header(member)
                    if dtype.hasobject:
                        continue  # refused when read, since pickles are never loaded
                    claimed = math.prod(shape) * dtype.itemsize
                    held = info.file_size - member.tell()
                    if info.compress_type == zipfile.ZIP_DEFLATED:
                        # The directory's file_size can lie too; deflate cannot expand a byte more than 1032-fold.
                        held = min(held, 1032 * info.compress_size)
                    if claimed > held:
                        raise DataError(
                            f"array {key!r} of data file {path} claims shape {shape} of {dtype} ({claimed} bytes) but "
                            f"holds at most {held} bytes; the file is damaged, {_SAVE_HINT}"
                        )
    except DataError:
        raise
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"data file {path} cannot be read as an .npz archive ({exc}); {_SAVE_HINT}") from exc


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays x, y, x_test and y_test that the ``.npz`` file holds, each checked against its header first."""
    if not path.is_file():
        raise DataError(f"data file {path} not found; check the path given with --data")
    size = path.stat().st_size
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"data file {path} ({size} bytes) is not a numpy .npz archive ({exc}); {_SAVE_HINT}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"data file {path} holds a single array (.npy), not an .npz archive; {_SAVE_HINT}")
    with archive:
        keys = list(archive.files)
        if "x" not in keys:
            raise DataError(
                f"data file {path} has no array 'x' (it has: {', '.join(keys) or 'no arrays'}); {_SAVE_HINT}"
            )
        ignored = sorted(set(keys) - set(_NPZ_KEYS))
        if ignored:
            logger.warning("ignoring arrays %s in %s: only %s are read", ignored, path, ", ".join(_NPZ_KEYS))
        _check_npz_sizes(path, [key for key in _NPZ_KEYS if key in keys])
        arrays = {}
        for key in _NPZ_KEYS:
            if key not in keys:
                continue
            try:
                arrays[key] = archive[key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise DataError(f"array {key!r} of data file {path} cannot be read ({exc}); {_SAVE_HINT}") from exc
    return arrays


def _load_npz(config: DataConfig) -> _Loaded:
    arrays = _read_npz(Path(config.path))
    loaded = _load_npz_images(config, arrays)
    if "classes" not in arrays:
        return loaded
    return loaded._replace(class_names=class_names_from_array(arrays["classes"], (loaded.y_train, loaded.y_test)))


def _load_npz_images(config: DataConfig, arrays: dict[str, np.ndarray]) -> _Loaded:
    path = Path(config.path)
    if "y_test" in arrays and "x_test" not in arrays:
        raise DataError(f"data file {path} has y_test but no x_test; add the test images or drop y_test")
    if "x_test" in arrays and ("y" in arrays) != ("y_test" in arrays):
        have, lack = ("y", "y_test") if "y" in arrays else ("y_test", "y")
        raise DataError(f"data file {path} has {have} but no {lack}; give labels for both splits or for neither")
    name = f"npz:{path.name}"
    layout = read_layout(arrays.get("layout"), f"layout of {path}")
    if "x_test" in arrays:
        return _split(
            name,
            arrays["x"],
            arrays.get("y"),
            arrays["x_test"],
            arrays.get("y_test"),
            what=("x", "y", "x_test", "y_test"),
            layout=layout,
        )
    x, image_shape = images_and_shape(arrays["x"], "x", layout)
    y = labels(arrays["y"], len(x), what="y", images="x") if "y" in arrays else None
    n = len(x)
    n_test = max(1, round(n * config.test_fraction))
    if n_test >= n:
        raise DataError(
            f"x has {n} images, too few to hold out test_fraction {config.test_fraction} and keep at least one "
            "image in each split; add images, change test_fraction, or give x_test"
        )
    perm = torch.from_numpy(np.random.default_rng(HOLDOUT_SEED).permutation(n))
    test, train = perm[:n_test], perm[n_test:]
    return _Loaded(
        name,
        x[train],
        None if y is None else y[train],
        x[test],
        None if y is None else y[test],
        image_shape,
    )


_LOADERS: dict[str, Callable[[DataConfig], _Loaded]] = {
    "embedded": _load_embedded,
    "fashion-mnist": _load_fashion_mnist,
    "mnist": _load_mnist,
    "npz": _load_npz,
}


def _first(x: torch.Tensor, y: torch.Tensor | None, n: int | None, *, split: str, name: str):
    if n is None or n == len(x):
        return x, y
    if n > len(x):
        words = {"train": "training", "test": "test"}[split]
        raise DataError(
            f"n_{split}={n} exceeds the {len(x)} {words} images of {name}; use --n-{split} {len(x)} or less"
        )
    # clone() lets the full split be freed instead of staying alive behind a view.
    return x[:n].clone(), None if y is None else y[:n].clone()


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def load_dataset(config: DataConfig) -> Dataset:
    """Load and validate the images a :class:`~pyro_vae.config.DataConfig` names.

    ``n_train`` / ``n_test`` keep the first images of each split. For ``npz``, the file at ``config.path`` must
    hold ``x`` (``uint8`` 0..255, ``bool``, or float in ``[0, 1]``; shaped ``(N, H, W)``, ``(N, C, H, W)``,
    ``(N, H, W, C)`` with C = 1 or 3, or flat ``(N, D)``) and may hold integer labels ``y``, a test split
    ``x_test`` / ``y_test``, a 1-d string array ``classes`` naming labels 0, 1, ..., and a ``layout`` string
    (``"NCHW"`` or ``"NHWC"``) for a 4-d ``x`` whose shape reads both ways (channels-last is otherwise detected and
    logged). Without ``x_test``, a permutation seeded with :data:`HOLDOUT_SEED` holds out ``round(N * test_fraction)``
    images (at least one) as the test split; both splits keep that permuted order. Other arrays in the file are
    ignored with a warning.

    :param DataConfig config: the data section of the run configuration.
    :returns: the validated :class:`Dataset`, on the CPU.
    :raises DataError: if the data is missing, damaged, or not usable as images (see :func:`validate_images`), or
        ``n_train`` / ``n_test`` exceed the split.
    :raises ConfigError: if ``config.dataset`` names no known source.
    """
    loader = _LOADERS.get(config.dataset)
    if loader is None:
        raise unknown_choice("dataset", config.dataset, _LOADERS)
    loaded = loader(config)
    x_train, y_train = _first(loaded.x_train, loaded.y_train, config.n_train, split="train", name=loaded.name)
    x_test, y_test = _first(loaded.x_test, loaded.y_test, config.n_test, split="test", name=loaded.name)
    dataset = Dataset(
        name=loaded.name,
        x_train=x_train.contiguous(),
        y_train=y_train,
        x_test=x_test.contiguous(),
        y_test=y_test,
        image_shape=loaded.image_shape,
        binary=_is_binary(x_train) and _is_binary(x_test),
        class_names=loaded.class_names,
    )
    logger.info("loaded %r", dataset)
    return dataset
