import gzip
import hashlib
import importlib.resources
import importlib.util
import io
import json
import shutil
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae.config import DataConfig
from pyro_vae.data import (
    Batch,
    Dataset,
    EpochBatches,
    binarize_eval,
    check_batch_size,
    check_dataset,
    check_likelihood_data,
    derive_seed,
    load_dataset,
    read_idx,
    validate_images,
    write_idx,
)
from pyro_vae.data.datasets import EMBEDDED_FILES, load_embedded_files
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.likelihoods import make_likelihood

REPO = Path(__file__).resolve().parents[1]
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def raises_data_error(*words):
    """Context manager: a one-line DataError whose message contains every word."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(DataError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            assert "\n" not in message, message
            for word in words:
                assert word in message, f"{word!r} not in {message!r}"
            return handled

    return _Check()


def images(n, h=4, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


def fake_fashion_dir(root: Path, n_train=30, n_test=10, *, suffixes=(".gz", "", ".gz", "")) -> Path:
    arrays = (
        images(n_train, 28, 28, seed=2),
        (np.arange(n_train) % 10).astype(np.uint8),
        images(n_test, 28, 28, seed=3),
        (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    )
    root.mkdir(parents=True, exist_ok=True)
    for stem, array, suffix in zip(IDX_STEMS, arrays, suffixes, strict=True):
        write_idx(root / f"{stem}{suffix}", array)
    return root


# ----------------------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz"])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5)])
def test_idx_round_trip(tmp_path, suffix, shape):
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / f"a-idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.uint8 and back.shape == shape and back.flags.writeable
    np.testing.assert_array_equal(back, array)
    assert not list(tmp_path.glob(".*partial"))


def test_idx_written_bytes_are_deterministic(tmp_path):
    array = images(5)
    for suffix in (".gz", ".xz"):
        write_idx(tmp_path / f"a{suffix}", array)
        first = (tmp_path / f"a{suffix}").read_bytes()
        write_idx(tmp_path / f"a{suffix}", array)
        assert (tmp_path / f"a{suffix}").read_bytes() == first


def _raw_idx(array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def _flip(data: bytes, position: int) -> bytes:
    data = bytearray(data)
    data[position] ^= 0xFF
    return bytes(data)


def _gz(data):
    return gzip.compress(data, mtime=0)


IDX_DAMAGE = {
    "bad magic": ("x.idx", lambda raw: b"\x01\x02" + raw[2:], ["magic"]),
    "truncated": ("x.idx", lambda raw: raw[:-7], ["truncated", "3x4x5 = 60 values", "53 follow"]),
    "truncated header": ("x.idx", lambda raw: raw[:9], ["truncated inside its header"]),
    "trailing": ("x.idx", lambda raw: raw + b"\x00\x01", ["2 trailing bytes"]),
    "not uint8": ("x.idx", lambda raw: raw[:2] + b"\x0d" + raw[3:], ["float32", "only uint8"]),
    "empty": ("x.idx", lambda raw: b"", ["empty", "(0 bytes)"]),
    "gzip crc": ("x.gz", lambda raw: _flip(_gz(raw), -6), ["not a valid .gz stream"]),
    "gzip payload": ("x.gz", lambda raw: _flip(_gz(raw), 30), ["not a valid .gz stream"]),
    "gzip eof": ("x.gz", lambda raw: _gz(raw)[:-12], ["not a valid .gz stream"]),
    "gzip garbage": ("x.gz", lambda raw: b"hello world", ["not a valid .gz stream"]),
    "xz damaged": ("x.xz", lambda raw: b"\xfd7zXZ\x00" + b"\x00" * 40, ["not a valid .xz stream"]),
}


@pytest.mark.parametrize("case", list(IDX_DAMAGE))
def test_idx_damage_is_a_data_error(tmp_path, case):
    name, damage, words = IDX_DAMAGE[case]
    path = tmp_path / name
    path.write_bytes(damage(_raw_idx(images(3))))
    with raises_data_error(str(path), f"({path.stat().st_size} bytes)", *words) as info:
        read_idx(path)
    if case.startswith("gzip"):
        assert info.value.__cause__ is not None


def test_idx_missing_file_carries_the_hint(tmp_path):
    with raises_data_error("not found", "check the path"):
        read_idx(tmp_path / "nope.gz")
    with raises_data_error("nope.gz", "apt-get install dataset-fashion-mnist", "--data-dir"):
        read_idx(
            tmp_path / "nope.gz",
            missing_hint="install it with: apt-get install dataset-fashion-mnist, or pass --data-dir",
        )


def test_write_idx_refuses_other_dtypes(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        write_idx(tmp_path / "a", np.zeros(3, dtype=np.int64))


# ------------------------------------------------------------------------------------------------------ embedded


@pytest.fixture(scope="module")
def embedded():
    return load_dataset(DataConfig())


def test_embedded_dataset_loads(embedded):
    d = embedded
    assert d.name == "embedded-fashion-mnist"
    assert d.x_train.shape == (10000, 784) and d.x_test.shape == (2000, 784) and d.input_dim == 784
    assert d.image_shape == (1, 28, 28) and not d.binary
    for x in (d.x_train, d.x_test):
        assert x.dtype == torch.float32 and x.is_contiguous()
        assert 0.0 <= x.min().item() and x.max().item() <= 1.0
    assert d.y_train.dtype == torch.int64
    assert torch.equal(d.y_train.bincount(), torch.full((10,), 1000))
    assert torch.equal(d.y_test.bincount(), torch.full((10,), 200))
    assert "10000" in repr(d) and "tensor" not in repr(d)


def test_embedded_files_match_manifest():
    directory = importlib.resources.files("pyro_vae.data") / "embedded"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["licence"] == "MIT (Fashion-MNIST, Zalando Research)"
    assert (manifest["seed"], manifest["n_train"], manifest["n_test"]) == (0, 10000, 2000)
    total = 0
    for name in EMBEDDED_FILES.values():
        data = (directory / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest["files"][name]["sha256"]
        total += len(data)
    assert total <= 5_000_000


def test_damaged_embedded_data_says_reinstall(tmp_path):
    source = Path(str(importlib.resources.files("pyro_vae.data") / "embedded"))
    copy = tmp_path / "embedded"
    shutil.copytree(source, copy)
    name = EMBEDDED_FILES["y_test"]
    (copy / name).write_bytes(_flip((copy / name).read_bytes(), 100))
    with raises_data_error(name, "sha256", "reinstall pyro_vae"):
        load_embedded_files(copy)
    (copy / name).unlink()
    with raises_data_error(name, "reinstall pyro_vae"):
        load_embedded_files(copy)
    (copy / "manifest.json").write_text("{not json")
    with raises_data_error("manifest", "reinstall pyro_vae"):
        load_embedded_files(copy)


def _load_script():
    spec = importlib.util.spec_from_file_location("make_embedded_dataset", REPO / "scripts/make_embedded_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_embedded_dataset_script(tmp_path, capsys):
    script = _load_script()
    source = fake_fashion_dir(tmp_path / "src", n_train=40, n_test=30, suffixes=(".gz", ".gz", "", ""))
    args = ["--source", str(source), "--n-train", "20", "--n-test", "10"]
    assert script.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert script.main([*args, "--out", str(tmp_path / "b")]) == 0
    manifest = json.loads((tmp_path / "a/manifest.json").read_text())
    assert manifest == json.loads((tmp_path / "b/manifest.json").read_text())
    arrays = load_embedded_files(tmp_path / "a")
    assert arrays["x_train"].shape == (20, 28, 28) and arrays["x_test"].shape == (10, 28, 28)
    assert np.bincount(arrays["y_train"]).tolist() == [2] * 10
    assert np.bincount(arrays["y_test"]).tolist() == [1] * 10
    assert script.main([*args, "--n-train", "25", "--out", str(tmp_path / "c")]) == 2
    assert "multiple" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_loader_reads_raw_and_gz(tmp_path):
    directory = fake_fashion_dir(tmp_path / "fm")
    d = load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(directory)))
    assert d.name == "fashion-mnist" and d.x_train.shape == (30, 784) and d.x_test.shape == (10, 784)
    expected = read_idx(directory / "train-images-idx3-ubyte.gz").reshape(30, -1) / 255.0
    torch.testing.assert_close(d.x_train, torch.from_numpy(expected).float())
    assert d.y_train.tolist() == [i % 10 for i in range(30)]

    small = load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(directory), n_train=5, n_test=3))
    assert torch.equal(small.x_train, d.x_train[:5]) and torch.equal(small.y_test, d.y_test[:3])
    with raises_data_error("n_train=31", "30 training images", "--n-train 30"):
        load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(directory), n_train=31))


def test_fashion_mnist_missing_files_give_the_apt_hint(tmp_path):
    with raises_data_error("train-images-idx3-ubyte", str(tmp_path), "apt-get install dataset-fashion-mnist"):
        load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path)))


def test_fashion_mnist_label_count_mismatch(tmp_path):
    directory = fake_fashion_dir(tmp_path / "fm")
    write_idx(directory / "t10k-labels-idx1-ubyte", np.zeros(9, dtype=np.uint8))
    with raises_data_error("9 labels", "10 images", "t10k-images-idx3-ubyte"):
        load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(directory)))


# ----------------------------------------------------------------------------------------------------------- npz


def load_npz(path, **config):
    return load_dataset(DataConfig(dataset="npz", path=str(path), **config))


def test_npz_uint8_images_with_labels_hold_out_a_test_split(tmp_path):
    x = images(20, 28, 28)
    y = np.arange(20) % 10
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = load_npz(tmp_path / "d.npz")
    assert d.name == "npz:d.npz" and d.image_shape == (1, 28, 28)
    assert d.x_train.shape == (18, 784) and d.x_test.shape == (2, 784)
    again = load_npz(tmp_path / "d.npz")
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.y_test, again.y_test)
    # Every image lands in exactly one split, with its own label.
    flat = torch.from_numpy(x.reshape(20, -1) / 255.0).float()
    rows = torch.cat([d.x_train, d.x_test])
    labels = torch.cat([d.y_train, d.y_test])
    match = (rows[:, None, :] == flat[None, :, :]).all(-1).float().argmax(1)
    assert sorted(match.tolist()) == list(range(20))
    assert torch.equal(labels, torch.from_numpy(y)[match])
    assert load_npz(tmp_path / "d.npz", test_fraction=0.5).x_test.shape == (10, 784)


def test_npz_float_nchw_without_labels(tmp_path):
    x = np.random.default_rng(0).random((12, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    d = load_npz(tmp_path / "d.npz")
    assert d.y_train is None and d.y_test is None and d.image_shape == (1, 28, 28)
    assert d.x_train.shape == (11, 784) and d.x_test.shape == (1, 784) and not d.binary


def test_npz_flat_with_explicit_test_split(tmp_path):
    x = np.random.default_rng(0).random((8, 6))
    x_test = np.random.default_rng(1).random((3, 6))
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(8), x_test=x_test, y_test=np.arange(3))
    d = load_npz(tmp_path / "d.npz")
    assert d.image_shape is None and d.input_dim == 6
    torch.testing.assert_close(d.x_train, torch.from_numpy(x).float())
    torch.testing.assert_close(d.x_test, torch.from_numpy(x_test).float())
    assert d.y_test.tolist() == [0, 1, 2]
    np.savez(tmp_path / "e.npz", x=x, x_test=x_test)
    assert load_npz(tmp_path / "e.npz").y_train is None


def test_npz_bool_images_are_binary(tmp_path):
    np.savez(tmp_path / "d.npz", x=images(10) > 127)
    d = load_npz(tmp_path / "d.npz")
    assert d.binary and set(d.x_train.unique().tolist()) <= {0.0, 1.0}


def _nan_images():
    x = np.random.default_rng(0).random((10, 4, 4))
    x[3, 1, 1] = np.nan
    x[5, 0, 0] = np.nan
    return x


def _inf_images():
    x = np.random.default_rng(0).random((10, 4, 4))
    x[7, 2, 2] = np.inf
    return x


NPZ_BAD = {
    "empty": ({"x": np.zeros((0, 28, 28), np.uint8)}, ["x is empty"]),
    "wrong ndim": ({"x": np.zeros(10, np.uint8)}, ["shape (10,)", "(N, H, W)"]),
    "two channels": ({"x": np.zeros((4, 2, 8, 8), np.uint8)}, ["(4, 2, 8, 8)", "neither 2", "nor 8", "RGB"]),
    "rgba": ({"x": np.zeros((4, 8, 8, 4), np.uint8)}, ["(4, 8, 8, 4)", "alpha", "x[..., :3]"]),
    "ambiguous": (
        {"x": np.zeros((4, 3, 32, 3), np.uint8)},
        ["(4, 3, 32, 3)", "(N, C, H, W) = 3 channel(s) of 32×3", "(N, H, W, C) = 3×32 images", "layout='NCHW'"],
    ),
    "layout not a string": ({"x": images(10), "layout": np.arange(2)}, ["layout of", "'NCHW'", "'NHWC'"]),
    "layout unknown": ({"x": np.zeros((4, 8, 8, 3), np.uint8), "layout": "CHW"}, ["layout of", "'NHWC'"]),
    "layout on 3-d x": ({"x": images(10), "layout": "NHWC"}, ["shape (10, 4, 5)", "layout (NHWC)", "4-d"]),
    "layout with 5 channels": (
        {"x": np.zeros((4, 5, 8, 3), np.uint8), "layout": "NCHW"},
        ["5 channels in layout NCHW", "check the layout"],
    ),
    "float over 1": ({"x": images(10).astype(np.float32)}, ["x has values up to", "[0, 1]", "divide by 255"]),
    "negative": ({"x": np.full((10, 4), -0.5)}, ["down to -0.5"]),
    "nan": ({"x": _nan_images()}, ["2 NaN", "first in image 3"]),
    "inf": ({"x": _inf_images()}, ["1 infinite", "first in image 7"]),
    "int64": ({"x": images(10).astype(np.int64)}, ["int64", "uint8", "divide by 255"]),
    "complex": ({"x": np.zeros((10, 4), np.complex64)}, ["complex64"]),
    "missing x": ({"images": images(10), "y": np.arange(10)}, ["no array 'x'", "images, y"]),
    "labels length": ({"x": images(10), "y": np.arange(9)}, ["y has 9 labels", "x has 10 images"]),
    "labels float": ({"x": images(10), "y": np.arange(10.0)}, ["y has dtype float64", "integers"]),
    "labels 2d": ({"x": images(10), "y": np.zeros((10, 1), int)}, ["(10, 1)", "flatten"]),
    "too few for hold-out": ({"x": images(1)}, ["1 images", "x_test"]),
    "y_test alone": ({"x": images(10), "y_test": np.arange(3)}, ["y_test but no x_test"]),
    "unpaired labels": ({"x": images(10), "y": np.arange(10), "x_test": images(3)}, ["has y but no y_test"]),
    "test shape": ({"x": images(10), "x_test": images(3, 5, 4)}, ["same image shape"]),
    "test nan": ({"x": images(10), "x_test": _nan_images()}, ["x_test contains"]),
}


@pytest.mark.parametrize("case", list(NPZ_BAD))
def test_npz_bad_input_is_a_data_error(tmp_path, case):
    arrays, words = NPZ_BAD[case]
    np.savez(tmp_path / "bad.npz", **arrays)
    with raises_data_error(*words):
        load_npz(tmp_path / "bad.npz")


def test_npz_that_is_not_an_npz(tmp_path):
    (tmp_path / "text.npz").write_text("hello, world\n")
    with raises_data_error("text.npz", "not a numpy .npz archive", "numpy.savez"):
        load_npz(tmp_path / "text.npz")
    np.save(tmp_path / "single.npy", images(3))
    with raises_data_error("single array"):
        load_npz(tmp_path / "single.npy")
    with raises_data_error("not found"):
        load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "objects.npz", x=np.array([None, 1], dtype=object))
    with raises_data_error("'x'", "cannot be read"):
        load_npz(tmp_path / "objects.npz")


def _colour(n, c=3, h=16, w=12, seed=0):
    """uint8 images (N, C, H, W) whose every pixel of every channel differs, so a wrong transpose cannot agree."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


@pytest.mark.parametrize("c", [1, 3])
def test_channels_last_equals_channels_first_after_transpose(tmp_path, caplog, c):
    """Issue 13 part 4: (N, H, W, C) is detected, said in one INFO line, and stored exactly as the channel-first
    (N, C, H, W) file; (N, 1, H, W) and (N, H, W) agree too. Rows are the channel-first flattening, D = C·H·W."""
    first = _colour(10, c)
    np.savez(tmp_path / "first.npz", x=first, x_test=first[:3])
    np.savez(tmp_path / "last.npz", x=first.transpose(0, 2, 3, 1), x_test=first[:3].transpose(0, 2, 3, 1))
    a = load_npz(tmp_path / "first.npz")
    with caplog.at_level("INFO", logger="pyro_vae.data.images"):
        b = load_npz(tmp_path / "last.npz")
    assert a.image_shape == b.image_shape == (c, 16, 12)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
    expected = torch.from_numpy(first.reshape(10, -1).astype(np.float32) / np.float32(255.0))
    assert torch.equal(a.x_train, expected)  # uint8 scaled to [0, 1], channel-first
    lines = [r.getMessage() for r in caplog.records if r.name == "pyro_vae.data.images"]
    assert lines == [
        f"{what} has shape {(n, 16, 12, c)}: read as channels-last (N, H, W, C) images, stored as (C, H, W) = "
        f"{(c, 16, 12)}"
        for what, n in (("x", 10), ("x_test", 3))
    ]
    if c == 1:
        np.savez(tmp_path / "grey.npz", x=first[:, 0], x_test=first[:3, 0])
        g = load_npz(tmp_path / "grey.npz")
        assert g.image_shape == (1, 16, 12) and torch.equal(g.x_train, a.x_train)


def test_layout_settles_an_ambiguous_shape(tmp_path):
    """(N, 3, 16, 3) reads both ways: the layout entry picks one, and the two readings store different rows."""
    x = np.random.default_rng(0).integers(0, 256, size=(6, 3, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "nchw.npz", x=x, x_test=x[:2], layout="NCHW")
    np.savez(tmp_path / "nhwc.npz", x=x, x_test=x[:2], layout=np.array("NHWC"))
    first, last = load_npz(tmp_path / "nchw.npz"), load_npz(tmp_path / "nhwc.npz")
    assert first.image_shape == (3, 16, 3) and last.image_shape == (3, 3, 16)
    assert torch.equal(first.x_train, torch.from_numpy(x.reshape(6, -1) / np.float32(255.0)))
    moved = x.transpose(0, 3, 1, 2).reshape(6, -1)
    assert torch.equal(last.x_train, torch.from_numpy(moved / np.float32(255.0)))
    assert not torch.equal(first.x_train, last.x_train)


def test_channels_last_grey_is_not_called_many_channels(tmp_path):
    """Defect 13: (N, 28, 28, 1) used to be reported as "28 channels"; now it is one grey channel stored last."""
    np.savez(tmp_path / "cl.npz", x=np.zeros((4, 28, 28, 1), np.uint8))
    assert load_npz(tmp_path / "cl.npz").image_shape == (1, 28, 28)


def _npz_with_header(path, shape, payload=b"\0" * 64, *, compression=zipfile.ZIP_STORED, file_size=None):
    """An .npz whose x.npy header claims ``shape`` (uint8) but holds only ``payload``."""
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})
    member.write(payload)
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("x.npy", member.getvalue())
    return path


def test_npz_header_claiming_a_huge_array_is_refused_before_allocating(tmp_path):
    """Defect 8: a header claiming 10**12 elements used to reach numpy's allocation (MemoryError)."""
    path = _npz_with_header(tmp_path / "huge.npz", (10**12,))
    with raises_data_error("array 'x'", "claims shape (1000000000000,)", "holds at most 64 bytes"):
        load_npz(path)
    # Compressed, the bound is deflate's largest expansion (1032-fold), whatever the directory claims.
    path = _npz_with_header(tmp_path / "huge_z.npz", (10**12,), compression=zipfile.ZIP_DEFLATED)
    with raises_data_error("claims shape (1000000000000,)"):
        load_npz(path)


def test_npz_header_check_accepts_what_numpy_writes(tmp_path):
    """The header check does not refuse real files: highly compressible data near deflate's limit loads."""
    x = np.zeros((3000, 784), np.uint8)
    np.savez_compressed(tmp_path / "zeros.npz", x=x)
    data = load_npz(tmp_path / "zeros.npz")
    assert data.x_train.shape[0] + data.x_test.shape[0] == 3000


def _hand_made(x_train, x_test=None):
    x_test = x_train[:2] if x_test is None else x_test
    return Dataset("hand-made", x_train, None, x_test, None, None, False)


@pytest.mark.parametrize(
    ("x", "words"),
    [
        (
            torch.zeros(4, 3, dtype=torch.int64),
            ["data.x_train is a torch.int64 tensor of shape (4, 3)", "float (N, D)"],
        ),
        (torch.zeros(4, 2, 2), ["data.x_train", "shape (4, 2, 2)"]),
        (torch.zeros(0, 3), ["shape (0, 3)", "N >= 1"]),
        (torch.tensor([[0.5, float("nan")], [0.1, 0.2]]), ["data.x_train contains 1 NaN values (first in image 0)"]),
        (torch.tensor([[0.5, 0.1], [0.1, float("inf")]]), ["1 infinite values (first in image 1)"]),
        (torch.tensor([[0.5, 200.0]]), ["data.x_train has values up to 200.0", "divide by 255"]),
        (torch.tensor([[0.5, -1.0]]), ["data.x_train has values down to -1.0", "rescale them to [0, 1]"]),
    ],
)
def test_check_dataset_refuses_hand_made_data(x, words):
    with raises_data_error(*words):
        check_dataset(_hand_made(x, x_test=torch.rand(2, x.shape[-1]) if x.ndim == 2 else None))


def test_check_dataset_names_the_test_split_and_passes_good_data():
    good = torch.rand(5, 3, generator=torch.Generator().manual_seed(0))
    check_dataset(_hand_made(good))  # no error
    with raises_data_error("data.x_test has values up to 2.0"):
        check_dataset(_hand_made(good, x_test=torch.tensor([[0.0, 2.0, 1.0]])))


def test_validate_images_accepts_tensors_and_read_only_arrays():
    x = images(4)
    x.flags.writeable = False
    out = validate_images(x, what="x")
    assert out.shape == (4, 20) and out.dtype == torch.float32
    out[0, 0] = 5.0  # the result owns its memory
    assert x[0, 0, 0] != 5
    t = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    assert validate_images(t, what="t").shape == (3, 4)
    with raises_data_error("t has values up to"):
        validate_images(t * 2 + 1, what="t")


# --------------------------------------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://x/, got:\n<urlopen error>\n"),
        urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
    ],
)
def test_mnist_offline_is_a_one_line_data_error(tmp_path, monkeypatch, error):
    def offline(*args, **kwargs):
        raise error

    monkeypatch.setattr("torchvision.datasets.MNIST", offline)
    root = tmp_path / "mnist"
    with raises_data_error(f"could not download MNIST into {root}", "no network?", "--data-dir", "--dataset embedded"):
        load_dataset(DataConfig(dataset="mnist", data_dir=str(root)))


def test_mnist_loader_converts_torchvision_data(monkeypatch):
    class FakeMNIST:
        def __init__(self, root, train, download):
            assert root == "./data" and download
            n = 6 if train else 4
            self.data = torch.from_numpy(images(n, 28, 28))
            self.targets = torch.arange(n)

    monkeypatch.setattr("torchvision.datasets.MNIST", FakeMNIST)
    d = load_dataset(DataConfig(dataset="mnist"))
    assert d.name == "mnist" and d.x_train.shape == (6, 784) and d.x_test.shape == (4, 784)
    assert d.y_test.tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------------------- batches


N, D = 103, 6


@pytest.fixture
def x():
    return torch.rand(N, D, generator=torch.Generator().manual_seed(0))


def collect(batches):
    return list(batches)


def test_order_is_a_pure_function_of_seed_and_epoch(x):
    a = EpochBatches(x, batch_size=10, seed=3, binarize="none")
    b = EpochBatches(x, batch_size=10, seed=3, binarize="none")
    for epoch in (0, 1, 7):
        assert torch.equal(a.order(epoch), b.order(epoch))
    assert not torch.equal(a.order(0), a.order(1))
    assert not torch.equal(a.order(0), EpochBatches(x, batch_size=10, seed=4, binarize="none").order(0))
    assert torch.equal(EpochBatches(x, batch_size=10, seed=3, binarize="none", shuffle=False).order(5), torch.arange(N))


def test_each_epoch_covers_every_index_once(x):
    loader = EpochBatches(x, batch_size=10, seed=0, binarize="none")
    batches = collect(loader.batches(2))
    assert len(batches) == len(loader) == loader.len_per_epoch() == 11
    assert all(isinstance(b, Batch) and b.epoch == 2 for b in batches)
    assert [b.step for b in batches] == list(range(11))
    assert [len(b.index) for b in batches] == [10] * 10 + [3]
    assert torch.equal(torch.cat([b.index for b in batches]).sort().values, torch.arange(N))
    for b in batches:
        assert b.index.dtype == torch.int64 and torch.equal(b.x, x[b.index])
    dropped = EpochBatches(x, batch_size=10, seed=0, binarize="none", drop_last=True)
    assert len(dropped) == 10 and all(len(b.index) == 10 for b in dropped.batches(0))


@pytest.mark.parametrize("binarize", ["dynamic", "static", "threshold", "none"])
def test_resume_mid_epoch_is_bit_exact(x, binarize):
    full = collect(EpochBatches(x, batch_size=8, seed=1, binarize=binarize).batches(4))
    for start in (1, 5, len(full)):
        tail = collect(EpochBatches(x, batch_size=8, seed=1, binarize=binarize).batches(4, start=start))
        assert len(tail) == len(full) - start
        for got, want in zip(tail, full[start:], strict=True):
            assert torch.equal(got.index, want.index) and torch.equal(got.x, want.x) and got.step == want.step
    with pytest.raises(ConfigError, match=rf"^start must be at most {len(full)} \(the batches in an epoch\)"):
        EpochBatches(x, batch_size=8, seed=1, binarize=binarize).batches(4, start=len(full) + 1)


@pytest.mark.parametrize("n", [100, N])
def test_two_ranks_share_the_data(x, n):
    x = x[:n]
    ranks = [EpochBatches(x, batch_size=7, seed=0, binarize="dynamic", rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    shards = [torch.cat([b.index for b in loader.batches(3)]) for loader in ranks]
    assert len(shards[0]) == len(shards[1]) == -(-n // 2)
    everything = torch.cat(shards)
    assert torch.equal(everything.unique(), torch.arange(n))
    assert len(everything) - n == n % 2  # only the wrap-around padding repeats an image
    # The ranks draw different binarisations (the step seeds include the rank).
    assert not torch.equal(next(ranks[0].batches(0)).x, next(ranks[1].batches(0)).x)
    dropped = [
        torch.cat(
            [
                b.index
                for b in EpochBatches(
                    x, batch_size=5, seed=0, binarize="none", rank=r, world_size=2, drop_last=True
                ).batches(0)
            ]
        )
        for r in (0, 1)
    ]
    assert len(set(dropped[0].tolist()) & set(dropped[1].tolist())) == 0


def _by_index(batches):
    batches = list(batches)
    index = torch.cat([b.index for b in batches])
    values = torch.cat([b.x for b in batches])
    return values[index.argsort()]


def test_dynamic_binarisation_is_fresh_each_epoch_and_reproducible(x):
    loader = EpochBatches(x, batch_size=16, seed=0, binarize="dynamic")
    e0, e1 = _by_index(loader.batches(0)), _by_index(loader.batches(1))
    assert set(e0.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(e0, e1)
    assert torch.equal(e0, _by_index(EpochBatches(x, batch_size=16, seed=0, binarize="dynamic").batches(0)))
    assert abs(e0.mean().item() - x.mean().item()) < 0.05


def test_static_threshold_and_none(x):
    static = EpochBatches(x, batch_size=16, seed=0, binarize="static")
    s0 = _by_index(static.batches(0))
    assert set(s0.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(s0, _by_index(static.batches(5)))
    assert torch.equal(s0, _by_index(EpochBatches(x, batch_size=9, seed=0, binarize="static").batches(1)))
    threshold = EpochBatches(x, batch_size=16, seed=0, binarize="threshold", threshold=0.3)
    assert torch.equal(_by_index(threshold.batches(0)), (x > 0.3).float())
    assert torch.equal(_by_index(EpochBatches(x, batch_size=16, seed=0, binarize="none").batches(0)), x)


def test_global_rng_is_not_consumed(x):
    state = torch.get_rng_state()
    for binarize in ("dynamic", "static", "threshold", "none"):
        for _ in EpochBatches(x, batch_size=16, seed=0, binarize=binarize).batches(0):
            pass
    binarize_eval(x, "dynamic", seed=0)
    assert torch.equal(state, torch.get_rng_state())


def test_batch_size_larger_than_the_data(x):
    with raises_data_error("batch size 512 exceeds the 103 training images", "--batch-size 103"):
        EpochBatches(x, batch_size=512, seed=0, binarize="none")
    with raises_data_error("batch size 60", "52 training images each of the 2 processes", "--batch-size 52"):
        EpochBatches(x, batch_size=60, seed=0, binarize="none", world_size=2, rank=1)
    with raises_data_error("batch size 512 exceeds the 300 training images; use --batch-size 300 or less"):
        check_batch_size(300, 512)
    check_batch_size(300, 300)


def test_bad_constructor_arguments(x):
    with pytest.raises(ConfigError, match="did you mean 'dynamic'"):
        EpochBatches(x, batch_size=4, seed=0, binarize="dynamc")
    with pytest.raises(ConfigError, match=r"^rank must be at most 1 \(ranks count from 0 in a world of 2\), got 2$"):
        EpochBatches(x, batch_size=4, seed=0, binarize="none", rank=2, world_size=2)
    with pytest.raises(ConfigError, match=r"^threshold must be a number in \(0.0, 1.0\), got 1.0$"):
        EpochBatches(x, batch_size=4, seed=0, binarize="threshold", threshold=1.0)
    with pytest.raises(ConfigError, match="^seed must be an integer >= 0, got True$"):
        EpochBatches(x, batch_size=4, seed=True, binarize="none")
    with pytest.raises(TypeError, match="float"):
        EpochBatches(x.long(), batch_size=4, seed=0, binarize="none")


def test_binarize_eval(x):
    a = binarize_eval(x, "static", seed=2)
    assert torch.equal(a, binarize_eval(x, "dynamic", seed=2)) and set(a.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(a, binarize_eval(x, "static", seed=3))
    assert torch.equal(binarize_eval(x, "threshold", seed=0, threshold=0.7), (x > 0.7).float())
    assert binarize_eval(x, "none", seed=0) is x
    with pytest.raises(ConfigError):
        binarize_eval(x, "sometimes", seed=0)


def test_derive_seed():
    seeds = {derive_seed("dynamic", 0, epoch, step, 0) for epoch in range(20) for step in range(20)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed("order", 1, 0) == derive_seed("order", 1, 0) != derive_seed("order", 0, 1)


def _dataset(x):
    return Dataset("t", x, None, x[:2], None, None, binary=bool(((x == 0) | (x == 1)).all()))


def test_bernoulli_needs_binary_data_without_binarisation(x):
    with raises_data_error("bernoulli", "continuous_bernoulli", "--binarize dynamic/static/threshold"):
        check_likelihood_data(_dataset(x), "none", make_likelihood("bernoulli"))
    check_likelihood_data(_dataset(x), "none", make_likelihood("continuous_bernoulli"))
    check_likelihood_data(_dataset(x), "dynamic", make_likelihood("bernoulli"))
    check_likelihood_data(_dataset((x > 0.5).float()), "none", make_likelihood("bernoulli"))
    with pytest.raises(ConfigError):
        check_likelihood_data(_dataset(x), "never", make_likelihood("bernoulli"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_on_cuda_are_resumable_and_stay_on_the_device(x):
    x = x.cuda()
    for binarize in ("dynamic", "static"):
        full = collect(EpochBatches(x, batch_size=8, seed=1, binarize=binarize).batches(2))
        tail = collect(EpochBatches(x, batch_size=8, seed=1, binarize=binarize).batches(2, start=3))
        assert all(b.x.is_cuda and b.index.is_cuda for b in full)
        for got, want in zip(tail, full[3:], strict=True):
            assert torch.equal(got.x, want.x)
    state = torch.cuda.get_rng_state()
    binarize_eval(x, "static", seed=0)
    assert torch.equal(state, torch.cuda.get_rng_state())
