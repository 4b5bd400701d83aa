"""Class names reach the Dataset: fixed for the built-in sources, from a ``classes`` array for npz files, and every
bad ``classes`` array is one line."""

import logging

import numpy as np
import pytest

from pyro_vae.config import DataConfig
from pyro_vae.data import load_dataset
from pyro_vae.data.classes import FASHION_MNIST_CLASSES, MNIST_CLASSES
from pyro_vae.errors import DataError


def npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return DataConfig(dataset="npz", path=str(path))


def images(n):
    return np.random.default_rng(0).integers(0, 256, size=(n, 4, 4), dtype=np.uint8)


def test_builtin_sources_name_their_classes():
    data = load_dataset(DataConfig(n_train=10, n_test=10))
    assert data.class_names == FASHION_MNIST_CLASSES
    assert data.class_names[7] == "Sneaker" and len(FASHION_MNIST_CLASSES) == 10
    assert MNIST_CLASSES == ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")


def test_npz_classes_name_the_labels(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        data = load_dataset(npz(tmp_path, x=images(10), y=np.arange(10) % 3, classes=np.array(["cat", "dog", "emu"])))
    assert data.class_names == ("cat", "dog", "emu")
    assert "ignoring" not in caplog.text
    as_bytes = load_dataset(npz(tmp_path, x=images(10), y=np.arange(10) % 2, classes=np.array([b"a", b"b"])))
    assert as_bytes.class_names == ("a", "b")
    y, y_test = np.arange(6) % 2, np.array([0, 1])
    split = npz(tmp_path, x=images(6), y=y, x_test=images(2), y_test=y_test, classes=["a", "b"])
    assert load_dataset(split).class_names == ("a", "b")
    assert load_dataset(npz(tmp_path, x=images(10), y=np.arange(10) % 2)).class_names is None


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": np.arange(10) % 3, "classes": np.array(["a", "b"])}, "classes has 2 names but the labels go up to 2"),
        ({"classes": np.array(["a", "b"])}, "the data have classes but no labels y"),
        ({"y": np.arange(10) % 2, "classes": np.array([[b"a"], [b"b"]])}, "must be a non-empty 1-d array of strings"),
        ({"y": np.arange(10) % 2, "classes": np.array([1, 2])}, "must be a non-empty 1-d array of strings"),
        ({"y": np.arange(10) % 2, "classes": np.array(["a", "a"])}, "names a class twice"),
        ({"y": np.arange(10) % 2, "classes": np.array([b"\xff", b"b"])}, "not UTF-8"),
        ({"y": np.arange(10) % 2, "classes": np.array(["a", "b"], dtype=object)}, "cannot be read"),
    ],
)
def test_bad_class_names_are_one_line(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message) as info:
        load_dataset(npz(tmp_path, x=images(10), **arrays))
    assert "\n" not in str(info.value)
