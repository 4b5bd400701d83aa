"""Bad input everywhere: each gives one line that names the value, what was expected and the fix, exit 2 for usage
errors (1 for runtime errors), no traceback (``--debug`` shows it), and is raised before anything is trained or
written: the ``--out`` directory of a refused run is never created.

The command line runs in this process (``cli.main``, as the ``pyro-vae`` script calls it), except for the checks
that need a process of their own: ``python -O`` (no asserts to lean on), and torchvision without a network.
"""

import json
import logging
import os
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from pyro_vae import cli
from pyro_vae.data import write_idx
from pyro_vae.errors import ConfigError, DataError

TINY = ["--n-train", "64", "--n-test", "32", "--epochs", "1", "--batch-size", "32", "--latent-dim", "2"]
TINY_NET = ["--hidden-dims", "32,16", "--threads", "1", "--no-figures"]


def run(capsys, *argv):
    """``pyro-vae ARGV`` in this process: (exit code, stderr lines)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse exits by itself
        code = exit_.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_one_line(lines, *words):
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("pyro-vae: error: "), line  # one format everywhere, subcommands included
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    return line


# --------------------------------------------------------------------------------------------------------- data


def rng_images(n, *shape, dtype=np.uint8):
    return np.random.default_rng(0).integers(0, 256, size=(n, *shape)).astype(dtype)


def with_nan():
    x = np.random.default_rng(0).random((20, 28, 28))
    x[4, 3, 3] = np.nan
    return x


def with_inf():
    x = np.random.default_rng(0).random((20, 28, 28), dtype=np.float32)
    x[7, 0, 0] = np.inf
    return x


NPZ = {
    "wrong shape": ({"x": np.zeros(10, np.uint8)}, ["x has shape (10,)", "(N, H, W)", "reshape it"]),
    "two channels": ({"x": rng_images(4, 2, 8, 8)}, ["shape (4, 2, 8, 8)", "C = 1 (grey) or 3 (RGB)"]),
    "ambiguous channels": ({"x": rng_images(4, 3, 8, 3)}, ["shape (4, 3, 8, 3)", "reads both as", "layout='NHWC'"]),
    "wrong dtype": ({"x": rng_images(20, 28, 28, dtype=np.int64)}, ["dtype int64", "x.astype(numpy.uint8)"]),
    "forgot /255": ({"x": rng_images(20, 28, 28, dtype=np.float32)}, ["values up to 25", "[0, 1]", "divide by 255"]),
    "negative": ({"x": np.full((20, 16), -0.5)}, ["values down to -0.5", "rescale them to [0, 1]"]),
    "NaN pixels": ({"x": with_nan()}, ["1 NaN values (first in image 4)", "remove or replace those images"]),
    "inf pixels": ({"x": with_inf()}, ["1 infinite values (first in image 7)"]),
    "empty": ({"x": np.zeros((0, 28, 28), np.uint8)}, ["x is empty", "at least one image"]),
    "labels mismatch": ({"x": rng_images(20, 28, 28), "y": np.arange(19)}, ["y has 19 labels", "x has 20 images"]),
}


@pytest.mark.parametrize("case", list(NPZ))
def test_bad_npz_data(capsys, tmp_path, case):
    arrays, words = NPZ[case]
    np.savez(tmp_path / "bad.npz", **arrays)
    code, lines = run(capsys, "train", "--data", tmp_path / "bad.npz", *TINY_NET, "--out", tmp_path / "run")
    assert code == 2
    assert_one_line(lines, "pyro-vae: error: ", *words)
    assert not (tmp_path / "run").exists()


def test_a_file_that_is_not_data(capsys, tmp_path):
    (tmp_path / "notes.npz").write_text("not an archive")
    code, lines = run(capsys, "train", "--data", tmp_path / "notes.npz", "--out", tmp_path / "run")
    assert code == 2
    assert_one_line(lines, "notes.npz", "is not a numpy .npz archive", "numpy.savez")
    code, lines = run(capsys, "train", "--data", tmp_path / "missing.npz", "--out", tmp_path / "run")
    assert code == 2
    assert_one_line(lines, "missing.npz not found", "check the path")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["--batch-size", "500", "--n-train", "300"],
            ["batch size 500 exceeds the 300 training images", "--batch-size 300 or less"],
        ),
        (["--n-train", "20000"], ["n_train=20000 exceeds the 10000 training images", "--n-train 10000 or less"]),
    ],
    ids=["batch larger than N", "more images than there are"],
)
def test_sizes_that_do_not_fit_the_data(capsys, tmp_path, args, words):
    code, lines = run(capsys, "train", "--epochs", "1", *TINY_NET, *args, "--out", tmp_path / "run")
    assert code == 2
    assert_one_line(lines, *words)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------- arguments

ARGUMENTS = {
    "epochs 0": (["--epochs", "0"], ["argument --epochs: epochs must be a positive integer, got 0"]),
    "epochs negative": (["--epochs", "-3"], ["epochs must be a positive integer, got -3"]),
    "lr 0": (["--lr", "0"], ["argument --lr: lr must be a positive finite number, got 0.0"]),
    "lr nan": (["--lr", "nan"], ["lr must be a positive finite number, got nan"]),
    "lr text": (["--lr", "fast"], ["lr must be a positive finite number, got 'fast'"]),
    "latent_dim 0": (["--latent-dim", "0"], ["argument --latent-dim: latent_dim must be a positive integer"]),
    "latent_dim huge": (["--latent-dim", "1000000000"], ["latent_dim must be at most 4096", "got 1000000000"]),
    "hidden width huge": (["--hidden-dims", "64,100000000"], ["every entry of hidden_dims must be at most 16384"]),
    "batch huge": (["--batch-size", "1000000000000"], ["batch_size must be at most 1048576"]),
    "particles 0": (["--particles", "0"], ["argument --particles: num_particles must be a positive integer"]),
    "particles huge": (["--particles", "100000000"], ["num_particles must be at most 4096"]),
    "batch size 0": (["--batch-size", "0"], ["argument --batch-size: batch_size must be a positive integer"]),
    "keep_last 0": (["--keep-last", "0"], ["argument --keep-last: keep_last must be a positive integer"]),
    "keep_last huge": (["--keep-last", "1000000"], ["keep_last must be at most 100"]),
    "max_skips negative": (["--max-skips", "-1"], ["max_skips must be an integer >= 0, got -1"]),
    "seed 2**32": (["--seed", "4294967296"], ["seed must be at most 4294967295 (numpy seeds are 32-bit)"]),
    "seed 1e23": (["--seed", "1e23"], ["argument --seed: seed must be an integer >= 0, got '1e23'"]),
    "early stop 0": (["--early-stop", "0"], ["argument --early-stop: early_stop must be a positive integer, got 0"]),
    "early stop delta": (["--early-stop-min-delta", "-1"], ["early_stop_min_delta must be a finite number >= 0"]),
    "hidden dims": (["--hidden-dims", "32,x"], ["hidden_dims must be comma-separated integers, got '32,x'"]),
    "guide": (["--guide", "mvn_dag"], ["unknown guide family 'mvn_dag'", "did you mean 'mvn_diag'?"]),
    "likelihood": (["--likelihood", "bernouli"], ["unknown likelihood 'bernouli'", "did you mean 'bernoulli'?"]),
    "objective": (["--objective", "trce"], ["unknown objective 'trce'", "did you mean 'trace'?"]),
    "dataset": (["--dataset", "fashion"], ["unknown dataset 'fashion'", "did you mean 'fashion-mnist'?"]),
    "binarize": (["--binarize", "dynamc"], ["unknown binarization 'dynamc'", "did you mean 'dynamic'?"]),
    "device": (["--device", "cuda0"], ["unknown device 'cuda0'", "did you mean 'cuda'?"]),
    "on_nonfinite": (["--on-nonfinite", "skp"], ["unknown non-finite policy 'skp'", "did you mean 'skip'?"]),
    "grey levels for bernoulli": (
        ["--binarize", "none"],
        ["bernoulli likelihood needs binary data", "continuous_bernoulli"],
    ),
    "npz and dataset": (["--data", "x.npz", "--dataset", "mnist"], ["--data FILE.npz implies --dataset npz"]),
    "force without resume": (["--force-resume"], ["--force-resume only applies with --resume DIR"]),
}


@pytest.mark.parametrize("case", list(ARGUMENTS))
def test_bad_arguments(capsys, tmp_path, case):
    args, words = ARGUMENTS[case]
    code, lines = run(capsys, "train", *args, "--out", tmp_path / "run")
    assert code == 2
    assert_one_line(lines, *words)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------- config files

CONFIGS = {
    "not JSON": ("{'train': }", ["is not valid JSON", "line 1 column 2"]),
    "not a mapping": ("[1, 2]", ["a run config must be a mapping, got list"]),
    "unknown section": (json.dumps({"trian": {}}), ["unknown config section(s) ['trian']", "'data', 'model', 'train'"]),
    "unknown key": (
        json.dumps({"train": {"epoch": 3}}),
        ["unknown key(s) ['epoch']", "did you mean 'epoch' → 'epochs'?"],
    ),
    "section not a mapping": (json.dumps({"train": 3}), ["config section 'train' must be a mapping, got int"]),
    "wrong type": (json.dumps({"train": {"epochs": "3"}}), ["epochs must be a positive integer, got '3'"]),
    "non-positive lr": (json.dumps({"train": {"lr": -1}}), ["lr must be a positive finite number, got -1"]),
    "unknown guide": (json.dumps({"model": {"guide": "ful_rank"}}), ["did you mean 'full_rank'?"]),
    "unknown dataset": (json.dumps({"data": {"dataset": "fashion"}}), ["did you mean 'fashion-mnist'?"]),
    "threshold as text": (json.dumps({"data": {"threshold": "0.5"}}), ["threshold must be a number", "got '0.5'"]),
    "hidden_dims null": (json.dumps({"model": {"hidden_dims": None}}), ["hidden_dims must be a list of integers"]),
    "guide number": (json.dumps({"model": {"guide": 3}}), ["guide must be a string, got 3"]),
    "likelihood null": (json.dumps({"model": {"likelihood": None}}), ["likelihood must be a string, got null"]),
    "progress text": (json.dumps({"train": {"progress": "no"}}), ["progress must be true, false or null, got 'no'"]),
    "seed too large": (json.dumps({"train": {"seed": 2**32}}), ["seed must be at most 4294967295"]),
    "latent huge": (json.dumps({"model": {"latent_dim": 10**12}}), ["latent_dim must be at most 4096"]),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, ["nests too deeply to read"]),
    "huge integer": ('{"train": {"epochs": ' + "9" * 5000 + "}}", ["is not valid JSON", "digits"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_config_files(capsys, tmp_path, case):
    text, words = CONFIGS[case]
    (tmp_path / "c.json").write_text(text)
    code, lines = run(capsys, "train", "--config", tmp_path / "c.json", "--out", tmp_path / "run")
    assert code == 2
    assert_one_line(lines, "pyro-vae: error: ", *words)
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_is_not_utf8(capsys, tmp_path):
    (tmp_path / "c.json").write_bytes(b'{"model": {"guide": "caf\xe9"}}')
    code, lines = run(capsys, "train", "--config", tmp_path / "c.json", "--out", tmp_path / "run")
    assert code == 2
    assert_one_line(lines, "is not UTF-8 text (byte 24)", "save it as UTF-8 JSON")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_config_file_without_end(capsys, tmp_path):
    """--config /dev/zero reads at most 1 MiB (it used to read until a MemoryError)."""
    code, lines = run(capsys, "train", "--config", "/dev/zero", "--out", tmp_path / "run")
    assert code == 2
    assert_one_line(lines, "config file /dev/zero is larger than 1048576 bytes")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["evaluate", "sample"])
@pytest.mark.parametrize("seed", ["4294967296", "1e23", "-1"])
def test_bad_seeds_of_evaluate_and_sample(capsys, tmp_path, command, seed):
    """Seeds are 0 <= seed < 2**32 everywhere; refused before the run directory is even looked at."""
    extra = ["--out", tmp_path / "s.png"] if command == "sample" else []
    code, lines = run(capsys, command, tmp_path / "no-run", "--seed", seed, *extra)
    assert code == 2
    assert_one_line(lines, "argument --seed: seed must be", seed)


def test_a_missing_config_file(capsys, tmp_path):
    code, lines = run(capsys, "train", "--config", tmp_path / "nope.json", "--out", tmp_path / "run")
    assert code == 2
    assert_one_line(lines, f"cannot read config file {tmp_path / 'nope.json'}: No such file or directory")


# -------------------------------------------------------------------------------------------------- out paths


def test_unusable_output_paths(capsys, tmp_path):
    (tmp_path / "file").write_text("mine")
    cases = [
        (tmp_path / "file", ["exists and is not a directory", "choose another --out"]),
        (tmp_path / "file" / "run", ["cannot create run directory", "file is not a directory", "choose another --out"]),
        (tmp_path / "a" / ".." / "run", ["must not contain '..' or NUL"]),
        (f"{tmp_path}/nul\0run", ["must not contain '..' or NUL"]),
    ]
    for out, words in cases:
        code, lines = run(capsys, "train", *TINY, *TINY_NET, "--out", out)
        assert code == 2, lines
        assert_one_line(lines, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "mine"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into a read-only directory")
def test_a_read_only_directory(capsys, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    code, lines = run(capsys, "train", *TINY, *TINY_NET, "--out", tmp_path / "ro" / "run")
    assert code == 2
    assert_one_line(lines, "cannot create run directory", "is not writable", "choose another --out")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", *TINY, *TINY_NET, "--out", str(out)]) == 0
    return out


def test_a_directory_that_holds_a_run_is_not_touched(capsys, finished_run, tmp_path):
    capsys.readouterr()

    def files():  # .lock is the writer lock's own file: a refused resume held the lock while it checked
        return {p.name: p.read_bytes() for p in finished_run.iterdir() if p.name != ".lock"}

    before = files()
    code, lines = run(capsys, "train", *TINY, *TINY_NET, "--out", finished_run)
    assert code == 2
    assert_one_line(lines, "already holds a run", f"--resume {finished_run}", "--overwrite")
    code, lines = run(capsys, "train", "--resume", finished_run, "--overwrite")
    assert code == 2
    assert_one_line(lines, "--resume continues a run and --overwrite replaces it")
    code, lines = run(capsys, "train", "--resume", finished_run, "--seed", "3")
    assert code == 2
    assert_one_line(lines, "cannot resume", "train.seed: 0 → 3", "--force-resume")
    code, lines = run(capsys, "train", "--resume", tmp_path / "nothing")
    assert code == 2
    assert_one_line(lines, "holds no run to resume; start one with --out")
    assert files() == before


def test_a_damaged_checkpoint_is_a_runtime_error_that_points_to_the_previous_one(
    capsys, caplog, finished_run, tmp_path
):
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    for path in finished_run.iterdir():
        (run_dir / path.name).write_bytes(path.read_bytes())
    (run_dir / "last.pt").write_bytes((run_dir / "last.pt").read_bytes()[:1000])
    code, lines = run(capsys, "train", "--resume", run_dir)
    assert code == 1
    assert_one_line(lines, f"checkpoint {run_dir / 'last.pt'} (1000 bytes) fails its checksum", "--resume")
    assert f"resume from it with --resume {run_dir / 'last.prev.pt'}" in lines[0]
    # A reader takes the newest checkpoint that verifies, and says which one it passed over.
    with caplog.at_level(logging.WARNING, logger="pyro_vae.checkpoint.chain"):
        code, lines = run(capsys, "evaluate", run_dir, "--k", "1", "--n", "8")
    assert code == 0
    assert any("last.prev.pt" in r.message and "fails its checksum" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------------------ IDX and gzip files

IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


def fashion_dir(root):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 64, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (32, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 32, dtype=np.uint8),
    }
    root.mkdir()
    for key, name in IDX_NAMES.items():
        write_idx(root / name, arrays[key])
    return root


def flip(path, position):
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def raw_idx_over(path, array):
    """Replace a .gz file by its uncompressed twin with a damaged header (bad magic)."""
    path.unlink()
    raw = path.with_suffix("")
    write_idx(raw, array)
    data = bytearray(raw.read_bytes())
    data[0] = 0x08
    raw.write_bytes(bytes(data))


IDX_DAMAGE = {
    "bad magic": (
        lambda d: raw_idx_over(d / IDX_NAMES["x_train"], np.zeros((4, 28, 28), np.uint8)),
        ["does not start with the IDX magic number"],
    ),
    "truncated": (
        lambda d: (d / IDX_NAMES["x_test"]).write_bytes((d / IDX_NAMES["x_test"]).read_bytes()[:-20]),
        ["not a valid .gz stream"],
    ),
    "CRC failure": (lambda d: flip(d / IDX_NAMES["y_train"], -6), ["not a valid .gz stream", "CRC check failed"]),
    "empty file": (lambda d: (d / IDX_NAMES["y_test"]).write_bytes(b""), ["(0 bytes) is empty", "replace it"]),
    "count mismatch": (
        lambda d: write_idx(d / IDX_NAMES["y_train"], np.zeros(63, np.uint8)),
        ["has 63 labels", "has 64 images"],
    ),
    "missing file": (
        lambda d: (d / IDX_NAMES["x_test"]).unlink(),
        ["t10k-images-idx3-ubyte[.gz] not found", "apt-get install dataset-fashion-mnist"],
    ),
}


@pytest.mark.parametrize("case", list(IDX_DAMAGE))
def test_damaged_fashion_mnist_files(capsys, tmp_path, case):
    damage, words = IDX_DAMAGE[case]
    root = fashion_dir(tmp_path / "fm")
    damage(root)
    args = ["--dataset", "fashion-mnist", "--data-dir", root, "--epochs", "1", "--batch-size", "32", *TINY_NET]
    code, lines = run(capsys, "train", *args, "--out", tmp_path / "run")
    assert code == 2
    assert_one_line(lines, *words)
    assert not (tmp_path / "run").exists()


def test_the_fake_fashion_mnist_directory_itself_trains(capsys, tmp_path):
    """The damage above is what fails: the undamaged directory trains."""
    root = fashion_dir(tmp_path / "fm")
    args = ["--dataset", "fashion-mnist", "--data-dir", root, "--epochs", "1", "--batch-size", "32", *TINY_NET]
    code, lines = run(capsys, "train", *args, "--latent-dim", "2", "--out", tmp_path / "run")
    assert code == 0, lines
    assert (tmp_path / "run" / "last.pt").is_file()


# ---------------------------------------------------------------------------------------- separate processes


def test_bad_input_under_python_O_is_still_refused(tmp_path):
    """Validation never relies on assert: under ``python -O`` (asserts stripped) a NaN pixel is still refused."""
    np.savez(tmp_path / "nan.npz", x=with_nan())
    proc = subprocess.run(
        [
            sys.executable,
            "-O",
            "-m",
            "pyro_vae",
            "train",
            "--data",
            str(tmp_path / "nan.npz"),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("pyro-vae")]
    assert line == "pyro-vae: error: x contains 1 NaN values (first in image 4); remove or replace those images"
    assert not (tmp_path / "run").exists()


def test_torchvision_offline(capsys, tmp_path, monkeypatch):
    """MNIST with no network: urllib's opener goes through a proxy on a closed local port, so every download that
    torchvision tries fails at once, as it does offline."""
    pytest.importorskip("torchvision")
    closed = "http://127.0.0.1:9"
    monkeypatch.setattr(urllib.request, "_opener", None)  # install_opener's slot, restored after the test
    urllib.request.install_opener(
        urllib.request.build_opener(urllib.request.ProxyHandler({"http": closed, "https": closed}))
    )
    root = tmp_path / "mnist"
    code, lines = run(capsys, "train", "--dataset", "mnist", "--data-dir", root, "--out", tmp_path / "run")
    assert code == 2
    line = assert_one_line(lines, f"pyro-vae: error: could not download MNIST into {root} (no network?")
    assert "--data-dir" in line and "--dataset embedded" in line
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(capsys, tmp_path):
    np.savez(tmp_path / "nan.npz", x=with_nan())
    with pytest.raises(DataError, match="1 NaN values"):
        cli.main(["--debug", "train", "--data", str(tmp_path / "nan.npz"), "--out", str(tmp_path / "run")])
    with pytest.raises(ConfigError, match="epochs must be a positive integer"):
        (tmp_path / "c.json").write_text(json.dumps({"train": {"epochs": 0}}))
        cli.main(["--debug", "train", "--config", str(tmp_path / "c.json")])


# ------------------------------------------------------------------------------------ before any data are loaded

BEFORE_LOAD = {
    "batch above --n-train": (
        ["train", "--batch-size", "100", "--n-train", "50"],
        ["batch size 100 exceeds the 50 training images"],
    ),
    "kl schedule value": (["train", "--kl-schedule", "linear:0"], ["warm-up length must be a positive"]),
    "vary: unknown field": (
        ["compare", "--vary", "likelyhood=bernoulli"],
        ["argument --vary: unknown option to vary 'likelyhood'", "did you mean 'likelihood'?"],
    ),
    "vary: unknown value": (
        ["compare", "--vary", "likelihood=bernoulli,continous_bernoulli"],
        ["unknown likelihood 'continous_bernoulli'", "did you mean 'continuous_bernoulli'?"],
    ),
    "vary: objective spec": (["compare", "--vary", "objective=trace,iwae:0"], ["k must be a positive number"]),
    "vary: guide spec": (["compare", "--vary", "guide=mvn_diag,low_rank:0"], ["rank must be a positive integer"]),
    "vary: no values": (["compare", "--vary", "likelihood"], ["expected FIELD=V1,V2,..."]),
    "vary: empty value": (["compare", "--vary", "likelihood=bernoulli,"], ["comma-separated values of likelihood"]),
    "vary: twice": (
        ["compare", "--vary", "likelihood=bernoulli,continuous_bernoulli", "--likelihood", "bernoulli"],
        ["--likelihood and --vary likelihood=... both set the likelihood"],
    ),
    "vary and guides": (["compare", "--vary", "objective=trace", "--guides", "iaf"], ["not allowed with"]),
    "vary: bernoulli on grey levels": (
        ["compare", "--vary", "likelihood=continuous_bernoulli,bernoulli", "--binarize", "none"],
        ["bernoulli likelihood needs binary data"],
    ),
    "guides: spec": (["compare", "--guides", "mvn_diag,low_rank:0"], ["rank must be a positive integer"]),
}


@pytest.mark.parametrize("case", list(BEFORE_LOAD))
def test_config_errors_come_before_any_data_load(capsys, tmp_path, monkeypatch, case):
    import pyro_vae.compare
    import pyro_vae.data

    def no_load(*args, **kwargs):
        raise AssertionError("the data were loaded before the config was checked")

    monkeypatch.setattr(pyro_vae.data, "load_dataset", no_load)
    monkeypatch.setattr(pyro_vae.compare, "load_dataset", no_load)
    args, words = BEFORE_LOAD[case]
    code, lines = run(capsys, *args, "--out", tmp_path / "out")
    assert code == 2
    assert_one_line(lines, *words)
    assert not (tmp_path / "out").exists()


def test_a_missing_device_is_refused_before_the_data_load(capsys, tmp_path, monkeypatch):
    import torch

    import pyro_vae.data

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(pyro_vae.data, "load_dataset", lambda *a, **kw: pytest.fail("the data were loaded"))
    code, lines = run(capsys, "train", "--device", "cuda", "--out", tmp_path / "out")
    assert code == 2
    assert_one_line(lines, "--device cuda was asked for but torch sees no CUDA device")


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "RUN", "--n", "0"],
        ["evaluate", "RUN", "--k", "0"],
        ["compare", "--seeds", "0"],
        ["compare", "--frobnicate"],
        ["sample"],
        ["evaluate", "RUN", "--chunk-size"],
    ],
    ids=" ".join,
)
def test_one_error_format_for_every_command(capsys, argv):
    code, lines = run(capsys, *argv)
    assert code == 2
    assert_one_line(lines)


# ------------------------------------------------------------------------------- likelihood and binarisation


def test_a_grey_level_likelihood_on_binarised_data_gets_one_warning_line(capsys, tmp_path, monkeypatch, caplog):
    import logging

    import pyro_vae.data

    def stop(*args, **kwargs):
        raise DataError("stopped at the data load")

    monkeypatch.setattr(pyro_vae.data, "load_dataset", stop)
    with caplog.at_level(logging.WARNING):
        code, lines = run(capsys, "train", "--likelihood", "continuous_bernoulli", "--out", tmp_path / "out")
    assert code != 0 and lines == ["pyro-vae: error: stopped at the data load"]  # legal: it went on to the data
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.getMessage() == (
        "the continuous_bernoulli likelihood models grey levels, but --binarize dynamic turns the data into 0/1 "
        "before it sees them; pass --binarize none to model the grey levels"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run(capsys, "train", "--likelihood", "continuous_bernoulli", "--binarize", "none", "--out", tmp_path / "o")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    import pyro_vae.compare

    monkeypatch.setattr(pyro_vae.compare, "load_dataset", stop)
    with caplog.at_level(logging.WARNING):  # compare: once, not once per value
        argv = ["compare", "--vary", "guide=mvn_diag,iaf:2", "--likelihood", "continuous_bernoulli"]
        code, lines = run(capsys, *argv, "--out", tmp_path / "c")
    assert lines == ["pyro-vae: error: stopped at the data load"]
    assert len([r for r in caplog.records if "pass --binarize none" in r.getMessage()]) == 1


def test_the_binarisation_hint_follows_each_likelihood_s_support():
    """The hint comes from the likelihood's declared support (the table the admission rule reads), not from names:
    every registered likelihood that admits more than 0/1 data gets it under a binarisation, and none gets it with
    --binarize none."""
    from pyro_vae.config.data_kinds import binarization_hint
    from pyro_vae.likelihoods import likelihood_class, likelihood_names

    for name in likelihood_names():
        grey = likelihood_class(name).support != "binary"
        for binarize in ("dynamic", "static", "threshold"):
            hint = binarization_hint(name, binarize)
            assert (hint is not None) == grey, (name, binarize)
            assert hint is None or f"--binarize {binarize}" in hint and "pass --binarize none" in hint
        assert binarization_hint(name, "none") is None
