"""The command line, run as users run it: in a subprocess."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyro_vae import cli

TINY = ["--n-train", "300", "--n-test", "100", "--epochs", "1", "--batch-size", "100", "--latent-dim", "2"]
TINY_NET = ["--hidden-dims", "32,16"]


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "pyro_vae", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "seed"
    proc = run_cli("train", *TINY, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_train_on_embedded_data_writes_the_run(trained_run):
    out, proc = trained_run
    for name in ("config.json", "metrics.jsonl", "last.pt", "last.pt.sha256"):
        assert (out / name).is_file(), name
    for name in ("reconstructions.png", "samples.png", "loss.png", "latent.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "test ELBO" in proc.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and np.isfinite(metrics[0]["test_elbo"])


def test_evaluate_and_sample(trained_run, tmp_path):
    out, _ = trained_run
    proc = run_cli("evaluate", out, "--k", "1,10")  # the default K = 1000 costs seconds; the code path is the same
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "eval.json").read_text())
    assert record["num_images"] == 100 and record["binarize"] == "dynamic"
    assert "test ELBO" in proc.stdout
    png = tmp_path / "s.png"
    proc = run_cli("sample", out, "--n", "16", "--out", png)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_existing_run_is_not_touched_without_overwrite(trained_run):
    out, _ = trained_run
    before = (out / "last.pt").read_bytes()
    proc = run_cli("train", *TINY, "--out", out)
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "--overwrite" in proc.stderr
    assert (out / "last.pt").read_bytes() == before


def test_train_on_users_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(120, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", x=x, y=rng.integers(0, 10, size=120))
    proc = run_cli(
        "train",
        "--data",
        tmp_path / "mine.npz",
        "--epochs",
        "1",
        "--batch-size",
        "20",
        *TINY_NET,
        "--out",
        tmp_path / "run",
    )
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["n_train"] + saved["data"]["n_test"] == 120


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["train", "--guide", "mvn_dag"], "did you mean 'mvn_diag'"),
        (["train", "--epochs", "0"], "expected a positive int"),
        (["train", "--lr", "abc"], "expected a positive float"),
        (["train", "--dataset", "cifar"], "invalid choice"),
        (["train", "--likelihood", "gauss"], "unknown likelihood"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, words):
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["train", "--batch-size", "500", "--n-train", "300", "--epochs", "1"], "batch size 500"),
        (["train", "--binarize", "none"], "continuous_bernoulli"),
        (["train", "--data", "missing.npz"], "missing.npz"),
        (["train", "--config", "nope.json"], "cannot read config file"),
        (["evaluate", "."], "holds no checkpoint"),
    ],
)
def test_bad_input_gives_one_line_without_traceback(args, words, tmp_path):
    proc = run_cli(*args, "--out", tmp_path / "r") if args[0] == "train" else run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if "error" in line]
    assert error.startswith("pyro-vae: error: ") and words in error


def test_config_file_and_override(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"train": {"epochs": 7, "batch_size": 50}, "model": {"latent_dim": 3}}))
    args = cli.build_parser().parse_args(["train", "--config", str(tmp_path / "c.json"), "--epochs", "2"])
    config = cli.config_from_args(args)
    assert (config.train.epochs, config.train.batch_size, config.model.latent_dim) == (2, 50, 3)


def test_help_does_not_import_torch():
    code = "import sys; from pyro_vae import cli; cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_choices_equal_the_registries():
    from pyro_vae.guides import family_names
    from pyro_vae.likelihoods import likelihood_names
    from pyro_vae.objectives import objective_names

    assert sorted(cli.GUIDE_CHOICES) == family_names()
    assert sorted(cli.LIKELIHOOD_CHOICES) == likelihood_names()
    assert sorted(cli.OBJECTIVE_CHOICES) == objective_names()


def test_device_auto_resolves():
    from pyro_vae.train import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("command", ["train", "compare"])
def test_objective_specs_parse_for_train_and_compare(command, capsys):
    parser = cli.build_parser()
    assert parser.parse_args([command, "--objective", "iwae:5:dreg"]).objective == "iwae:5:dreg"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([command, "--objective", "iwea:5"])
    assert exc.value.code == 2
    assert "iwae" in capsys.readouterr().err  # the close-match hint
