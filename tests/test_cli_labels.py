"""The command line and the readers for the models with labels (``--model cvae|m2``, issue 14): ``train``,
``evaluate``, ``sample --label``, ``plot --kind classes``, ``compare`` and ``load_run``, on the embedded data and on a
user's labelled npz; and every bad input of the issue as one line on stderr, exit status 2, nothing written."""

import json

import numpy as np
import pytest
import torch

import pyro_vae.cli.commands
from pyro_vae import cli
from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.errors import ConfigError
from pyro_vae.labelled import CVAE, SSVAE, build_model
from pyro_vae.plotting import class_grid, interpolation, labelled_samples, run_figure, sample_grid
from pyro_vae.run_dir import load_run

TINY = ["--n-train", "300", "--n-test", "100", "--epochs", "1", "--batch-size", "100", "--latent-dim", "2"]
TINY_NET = ["--hidden-dims", "32,16"]
#: The embedded data's classes (Fashion-MNIST), which the class grid names its rows after.
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CLASSES = ("circle", "square", "star")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("pyro-vae: error: ") and "\n" not in err, err
    return err


def train(out, *args):
    return cli.main(["train", *TINY, *TINY_NET, "--out", str(out), *map(str, args)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A CVAE and an M2 (100 of 300 images labelled) trained for one epoch on the embedded data."""
    root = tmp_path_factory.mktemp("labels")
    assert train(root / "cvae", "--model", "cvae") == 0
    assert train(root / "m2", "--model", "m2", "--labelled", "100") == 0
    return {"cvae": root / "cvae", "m2": root / "m2"}


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """A user's labelled npz: 100 training and 40 test images of 3 named classes."""
    root = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(140, 28, 28), dtype=np.uint8)
    y = np.arange(140) % 3
    np.savez(root / "mine.npz", x=x[:100], y=y[:100], x_test=x[100:], y_test=y[100:], classes=CLASSES)
    np.savez(root / "unlabelled.npz", x=x[:100], x_test=x[100:])
    np.savez(root / "from1.npz", x=x[:100], y=y[:100] + 1, x_test=x[100:], y_test=y[100:] + 1)  # labels 1..3
    np.savez(root / "negative.npz", x=x[:100], y=y[:100] - 1, x_test=x[100:], y_test=y[100:])
    np.savez(root / "float.npz", x=x[:100], y=y[:100] + 0.5, x_test=x[100:], y_test=y[100:] + 0.5)
    return root


@pytest.mark.slow  # two training runs with their figures: ~10 s
@pytest.mark.parametrize("kind", ["cvae", "m2"])
def test_train_records_the_model_and_its_classes_and_writes_the_class_grid(runs, kind):
    record = json.loads((runs[kind] / "config.json").read_text())
    assert record["config"]["model"]["kind"] == kind
    assert record["config"]["model"]["num_classes"] == 10  # resolved from the data before fit, recorded
    assert (runs[kind] / "classes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = load_run(runs[kind])
    assert isinstance(run.vae, CVAE if kind == "cvae" else SSVAE) and run.vae.num_classes == 10
    (metrics,) = run.metrics
    assert (metrics["accuracy"] is not None) == (kind == "m2")
    labelled = record["labelled"]["n"]
    assert labelled == (300 if kind == "cvae" else 100)


@pytest.mark.slow
def test_evaluate_prints_the_conditional_bounds_of_a_cvae(runs, capsys):
    assert cli.main(["evaluate", str(runs["cvae"]), "--k", "1,10"]) == 0
    out = capsys.readouterr().out
    assert "log p(x | y), k=10" in out and "accuracy" not in out
    record = json.loads((runs["cvae"] / "eval.json").read_text())
    assert record["accuracy"] is None and record["num_images"] == 100


@pytest.mark.slow
def test_evaluate_prints_m2s_accuracy_and_writes_it(runs, capsys):
    assert cli.main(["evaluate", str(runs["m2"]), "--k", "1,10"]) == 0
    out = capsys.readouterr().out
    assert "accuracy of q(y|x)" in out and "log p(x), k=10" in out
    record = json.loads((runs["m2"] / "eval.json").read_text())
    # the reference: the classifier's most probable class against the test labels, in plain torch
    run = load_run(runs["m2"])
    x, y = run.test_images(), run.test_labels()
    with torch.no_grad():
        hits = (run.vae.classifier(x).argmax(-1) == y).double()
    assert record["accuracy"] == pytest.approx(hits.mean().item(), abs=1e-12)
    assert record["accuracy_se"] == pytest.approx((hits.std() / hits.numel() ** 0.5).item(), rel=1e-9)
    assert cli.main(["evaluate", str(runs["m2"]), "--gaps"]) == 2  # the gaps are the plain VAE's
    assert "--gaps measures the inference gaps of a plain VAE" in one_error_line(capsys)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cvae", "m2"])
def test_sample_label_draws_every_image_of_that_class_as_the_python_api_does(runs, kind, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert cli.main(["sample", str(runs[kind]), "--n", "6", "--label", "3", "--seed", "5", "--out", str(out)]) == 0
    assert "of class 3" in capsys.readouterr().out
    saved = np.load(out)
    np.testing.assert_array_equal(saved["y"], np.full(6, 3))
    expected = load_run(runs[kind]).vae.sample(6, generator=torch.Generator().manual_seed(5), label=3)
    np.testing.assert_array_equal(saved["x"].reshape(6, -1), expected.numpy())
    assert cli.main(["sample", str(runs[kind]), "--n", "12", "--out", str(out), "--overwrite"]) == 0
    np.testing.assert_array_equal(np.load(out)["y"], np.arange(12) % 10)  # default: balanced over the classes
    assert (
        cli.main(["sample", str(runs[kind]), "--n", "5", "--label", "1", "--draws", "--out", str(out), "--overwrite"])
        == 0
    )
    drawn = np.load(out)
    assert set(np.unique(drawn["x"])) <= {0.0, 1.0} and bool(drawn["draws"])  # Bernoulli draws x ~ p(x | z, y)
    expected = labelled_samples(load_run(runs[kind]).vae, 5, seed=0, draws=True, label=1)
    np.testing.assert_array_equal(drawn["x"].reshape(5, -1), expected.x.numpy())
    np.testing.assert_array_equal(drawn["z"], expected.z.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cvae", "m2"])
def test_every_plot_kind_draws_for_the_models_with_labels(runs, kind, capsys):
    for plot in ("reconstructions", "samples", "latent", "traversal", "interpolation", "classes"):
        assert cli.main(["plot", str(runs[kind]), "--kind", plot, "--n", "3"]) == 0, plot
        assert (runs[kind] / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_class_grid_has_a_named_row_per_class_holding_that_class_samples(runs):
    run = load_run(runs["cvae"])
    fig = run_figure(run, "classes", n=4, seed=2)
    assert [ax.get_ylabel() for ax in fig.axes] == list(FASHION)
    for k, ax in enumerate(fig.axes):
        row = np.asarray(ax.images[0].get_array())
        pictures = np.stack([row[:28, c * 29 : c * 29 + 28] for c in range(4)])
        expected = run.vae.sample(4, generator=torch.Generator().manual_seed(2), label=k).reshape(4, 28, 28)
        np.testing.assert_allclose(pictures, expected.numpy(), rtol=0, atol=1e-6)  # float32 through matplotlib


@pytest.mark.slow  # three small runs on a user's npz: ~6 s
def test_m2_and_cvae_train_from_a_users_labelled_npz(npz, tmp_path, capsys):
    common = ["--data", str(npz / "mine.npz"), "--epochs", "1", "--batch-size", "20", *TINY_NET, "--latent-dim", "2"]
    assert cli.main(["train", *common, "--model", "m2", "--labelled", "30", "--out", str(tmp_path / "m2")]) == 0
    record = json.loads((tmp_path / "m2" / "config.json").read_text())
    assert record["labelled"]["n"] == 30 and record["config"]["model"]["num_classes"] == 3
    assert cli.main(["train", *common, "--model", "cvae", "--labelled", "30", "--out", str(tmp_path / "cvae")]) == 0
    capsys.readouterr()
    fig = run_figure(load_run(tmp_path / "cvae"), "classes", n=2)
    assert [ax.get_ylabel() for ax in fig.axes] == list(CLASSES)  # the npz's class names
    assert (
        cli.main(["sample", str(tmp_path / "cvae"), "--n", "4", "--label", "2", "--out", str(tmp_path / "s.png")]) == 0
    )


# -- bad input: one line, exit status 2, nothing written ---------------------------------------------------------------
TRAIN_REFUSALS = {
    "cvae on an npz without y": (["--model", "cvae", "--data", "unlabelled.npz"], "has no labels"),
    "m2 on an npz without y": (["--model", "m2", "--data", "unlabelled.npz"], "has no labels"),
    "--labelled above N": (["--model", "m2", "--data", "mine.npz", "--labelled", "101"], "exceeds the 100 training"),
    "--labelled below C": (["--model", "m2", "--data", "mine.npz", "--labelled", "2"], "below the 3 classes"),
    "labels 1..C": (["--model", "cvae", "--data", "from1.npz"], "no training image of class 0"),
    "negative labels": (["--model", "m2", "--data", "negative.npz"], "-1"),
    "float labels": (["--model", "m2", "--data", "float.npz"], "must be integers"),
    "--labelled with the VAE": (["--model", "vae", "--data", "mine.npz", "--labelled", "30"], "the plain VAE reads"),
    "--labelled-batch with cvae": (["--model", "cvae", "--labelled-batch", "4"], "M2's labelled images per step"),
    "--aux-weight with cvae": (["--model", "cvae", "--aux-weight", "1"], "drop --aux-weight"),
}


@pytest.mark.parametrize("case", list(TRAIN_REFUSALS))
def test_train_refuses_bad_label_input_in_one_line_and_writes_nothing(npz, tmp_path, capsys, monkeypatch, case):
    args, words = TRAIN_REFUSALS[case]
    monkeypatch.chdir(npz)
    out = tmp_path / "run"
    code = cli.main(["train", "--epochs", "1", "--batch-size", "20", *TINY_NET, *args, "--out", str(out)])
    assert code == 2
    assert words in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--n-train", "300", "--labelled", "400"], "--labelled 400 exceeds the 300 training images"),
        (["--num-classes", "10", "--labelled", "4"], "--labelled 4 is below the 10 classes"),
    ],
)
def test_labelled_against_other_flags_is_refused_before_the_data_load(tmp_path, capsys, monkeypatch, args, words):
    def no_load(config):
        raise AssertionError("the data were loaded before the refusal")

    monkeypatch.setattr(pyro_vae.data, "load_dataset", no_load)
    assert cli.main(["train", "--model", "m2", *args, "--out", str(tmp_path / "run")]) == 2
    assert words in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def vae_run(npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "run"
    args = ["--data", str(npz / "mine.npz"), "--epochs", "1", "--batch-size", "50", *TINY_NET, "--no-figures"]
    assert cli.main(["train", *args, "--latent-dim", "2", "--out", str(out)]) == 0
    return out


def test_sample_label_refusals_are_one_line_before_the_weights_load(npz, vae_run, tmp_path, capsys, monkeypatch):
    cvae_run = tmp_path / "cvae"
    args = ["--data", str(npz / "mine.npz"), "--epochs", "1", "--batch-size", "50", *TINY_NET, "--no-figures"]
    assert cli.main(["train", "--model", "cvae", *args, "--latent-dim", "2", "--out", str(cvae_run)]) == 0
    capsys.readouterr()

    def no_load(*args, **kwargs):
        raise AssertionError("the run was loaded before the refusal")

    monkeypatch.setattr(pyro_vae.run_dir, "load_run", no_load)
    for run, label, words in [
        (cvae_run, "3", "--label must be at most 2 (the run's model has 3 classes), got 3"),
        (vae_run, "0", "--label chooses the class of a --model cvae or m2 run; this run is a vae"),
    ]:
        out = tmp_path / "s.png"
        assert cli.main(["sample", str(run), "--label", label, "--out", str(out)]) == 2
        assert words in one_error_line(capsys)
        assert not out.exists()
    for label in ("x", "1.5", "-1"):  # argparse's type: one line, exit 2
        with pytest.raises(SystemExit) as stop:
            cli.main(["sample", str(cvae_run), "--label", label])
        assert stop.value.code == 2
        assert "--label must be an integer >= 0" in one_error_line(capsys)


def test_plot_classes_of_a_vae_run_is_one_line_before_the_data_load(vae_run, capsys, monkeypatch):
    def no_data(self, *args, **kwargs):
        raise AssertionError("the data were read before the refusal")

    monkeypatch.setattr(pyro_vae.run_dir.Run, "data", no_data)
    assert cli.main(["plot", str(vae_run), "--kind", "classes"]) == 2
    assert "one row per class of a model with labels" in one_error_line(capsys)
    assert not (vae_run / "plots").exists()


def test_compare_of_a_cvae_on_data_without_labels_is_one_line_and_writes_nothing(npz, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["--model", "cvae", "--data", str(npz / "unlabelled.npz"), "--vary", "guide=mvn_diag,diag_normal"]
    assert cli.main(["compare", *args, "--epochs", "1", "--batch-size", "20", "--out", str(out), "--no-isolate"]) == 2
    assert "has no labels" in one_error_line(capsys)
    assert not out.exists()


def test_compare_refuses_to_vary_the_model_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["compare", "--vary", "model=vae,m2"])
    assert stop.value.code == 2
    assert "--vary model= is not offered" in one_error_line(capsys)


def test_help_shows_the_label_flags(capsys):
    for command, flags in [
        ("train", ("--model", "--labelled", "--labelled-batch", "--aux-weight", "--num-classes")),
        ("sample", ("--label",)),
        ("plot", ("classes",)),
        ("compare", ("--model", "--labelled")),
    ]:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert all(flag in out for flag in flags), (command, flags)


# -- the figures' Python API ------------------------------------------------------------------------------------------
def tiny(kind: str, classes: int = 3):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind=kind, latent_dim=2, hidden_dims=(16,)), 784, (1, 28, 28), classes).eval()


def test_figures_refuse_labels_where_the_model_has_none_and_need_them_for_the_cvae():
    vae = build_model(ModelConfig(latent_dim=2, hidden_dims=(16,)), 784)
    with pytest.raises(ConfigError, match="one row per class of a model with labels"):
        class_grid(vae)
    with pytest.raises(ConfigError, match="the VAE has none"):
        sample_grid(vae, n=4, label=1)
    x = torch.rand(2, 784)
    with pytest.raises(ConfigError, match="the CVAE encodes q"):
        interpolation(tiny("cvae"), x[0], x[1])
    with pytest.raises(ConfigError, match="the model has 3 classes"):
        class_grid(tiny("m2"), classes=[3])


def test_interpolation_of_m2_runs_at_the_classifiers_class_of_the_first_image():
    vae, x = tiny("m2"), torch.rand(2, 784)
    predicted = int(vae.default_labels(x[:1]))
    fig = interpolation(vae, x[0], x[1], steps=3)
    assert fig._suptitle.get_text().endswith(f"y = {predicted}")


def test_compare_trains_a_labelled_base_config_and_reports_accuracy(npz):
    from pyro_vae.compare import compare

    config = RunConfig(
        data=DataConfig(dataset="npz", path=str(npz / "mine.npz"), labelled=30),
        model=ModelConfig(kind="m2", latent_dim=2, hidden_dims=(16,)),
        train=TrainConfig(epochs=1, batch_size=50),
    )
    data = load_dataset(config.data)
    result = compare(["mvn_diag", "diag_normal"], config, [0], data=data, nll_k=None)
    assert [run.accuracy for run in result.runs] == [row.accuracy.mean for row in result.rows]
    assert all(0.0 <= row.accuracy.mean <= 1.0 for row in result.rows)
    assert "accuracy q(y|x)" in result.table() and "--model m2 with 3 classes" in result.protocol()
    assert result.config.model.num_classes == 3
