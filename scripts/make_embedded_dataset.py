"""Build the Fashion-MNIST subset embedded in ``pyro_vae/data/embedded``.

The subset is stratified and deterministic: for each split, ``numpy.random.default_rng(seed)`` permutes the source
images (training split first, then test split, from the same generator) and the first ``n / 10`` images of each
class in that permuted order are kept, in that order. The four IDX files are written with xz
(``preset 9 | PRESET_EXTREME``) next to a ``manifest.json`` recording the source files' sha256, the seed, the
sizes, the sha256 of the chosen indices (little-endian int64, in output order) and the sha256 of every output file;
:func:`pyro_vae.data.datasets.load_embedded_files` checks those at every load.

Usage::

    python scripts/make_embedded_dataset.py [--source DIR] [--out DIR] [--seed 0] [--n-train 10000] [--n-test 2000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from pyro_vae.config import DEFAULT_FASHION_MNIST_DIR
from pyro_vae.data.datasets import EMBEDDED_FILES, load_embedded_files
from pyro_vae.data.idx import read_idx, write_idx
from pyro_vae.errors import DataError

#: Largest total size of the output files, in bytes, so that the package stays small.
MAX_TOTAL_BYTES = 5_000_000
LICENCE = "MIT (Fashion-MNIST, Zalando Research)"
_SOURCE_STEMS = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _source_file(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}; "
        "install it with: apt-get install dataset-fashion-mnist, or pass --source"
    )


def stratified_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Choose ``n`` positions, the same number from each class, in a random order.

    :param numpy.ndarray labels: ``(N,)`` class labels.
    :param int n: how many to choose; a multiple of the number of classes.
    :param numpy.random.Generator rng: source of the permutation (one ``permutation(N)`` call).
    :returns: ``(n,)`` int64 positions into ``labels``, in permuted order.
    :raises DataError: if ``n`` is not a multiple of the number of classes or a class has too few images.
    """
    classes = np.unique(labels)
    if n % len(classes):
        raise DataError(f"{n} images cannot be split evenly over {len(classes)} classes; pass a multiple of it")
    per_class = n // len(classes)
    perm = rng.permutation(len(labels))
    keep = np.zeros(len(perm), dtype=bool)
    for c in classes:
        positions = np.flatnonzero(labels[perm] == c)
        if len(positions) < per_class:
            raise DataError(f"class {c} has {len(positions)} images but {per_class} were asked for; pass a smaller n")
        keep[positions[:per_class]] = True
    return perm[keep].astype(np.int64)


def build(source: Path, out: Path, *, seed: int, n_train: int, n_test: int) -> dict:
    """Write the subset and its manifest into ``out``.

    :returns: the manifest.
    """
    rng = np.random.default_rng(seed)
    paths = {key: _source_file(source, stem) for key, stem in _SOURCE_STEMS.items()}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    chosen = {
        "train": stratified_subset(arrays["y_train"], n_train, rng),
        "test": stratified_subset(arrays["y_test"], n_test, rng),
    }
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, name in EMBEDDED_FILES.items():
        subset = np.ascontiguousarray(arrays[key][chosen[key.split("_")[1]]])
        write_idx(out / name, subset)
        data = (out / name).read_bytes()
        files[name] = {"sha256": _sha256(data), "bytes": len(data), "shape": list(subset.shape)}
    manifest = {
        "format": 1,
        "description": "Stratified Fashion-MNIST subset embedded in pyro_vae (equal images per class)",
        "licence": LICENCE,
        "source": {
            "dataset": "Fashion-MNIST (https://github.com/zalandoresearch/fashion-mnist)",
            "debian_package": "dataset-fashion-mnist",
            "files": {
                path.name: {"sha256": _sha256(path.read_bytes()), "bytes": path.stat().st_size}
                for path in paths.values()
            },
        },
        "seed": seed,
        "selection": "numpy.random.default_rng(seed).permutation per split (train, then test); "
        "first n/10 of each class in permuted order, kept in that order",
        "n_train": n_train,
        "n_test": n_test,
        "indices_sha256": {split: _sha256(index.astype("<i8").tobytes()) for split, index in chosen.items()},
        "indices_encoding": "source positions as little-endian int64, in output order",
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path(DEFAULT_FASHION_MNIST_DIR), help="Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=Path("pyro_vae/data/embedded"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset permutation")
    parser.add_argument("--n-train", type=int, default=10000, help="training images (multiple of 10)")
    parser.add_argument("--n-test", type=int, default=2000, help="test images (multiple of 10)")
    args = parser.parse_args(argv)
    try:
        manifest = build(args.source, args.out, seed=args.seed, n_train=args.n_train, n_test=args.n_test)
        load_embedded_files(args.out)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    for name, entry in manifest["files"].items():
        print(f"{name}: {entry['bytes']} bytes, sha256 {entry['sha256']}")
    print(f"total {total} bytes")
    if total > MAX_TOTAL_BYTES:
        print(
            f"error: the files total {total} bytes, over the {MAX_TOTAL_BYTES} allowed; pick fewer images",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
