"""``pyro-vae plot`` and the figures of a run: what they show of the run's own data, where they are written, and the
one-line refusals that come before any data are read."""

import numpy as np
import pytest

import pyro_vae.run_dir
import pyro_vae.run_dir.run
from pyro_vae import cli
from pyro_vae.cli.parser import PLOT_KINDS as CLI_PLOT_KINDS
from pyro_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.model import VAE
from pyro_vae.plotting import PLOT_KINDS, run_figure, save_run_figures
from pyro_vae.run_dir import RunDir, load_run
from pyro_vae.train import fit

CLASSES = ("circle", "square", "star")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run directory (on a small labelled npz with class names, quick to load again for every plot),
    its model, data and fit result."""
    root = tmp_path_factory.mktemp("plot")
    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 256, size=(140, 28, 28), dtype=np.uint8)
    labels = np.arange(140) % 3
    np.savez(
        root / "d.npz", x=pictures[:100], y=labels[:100], x_test=pictures[100:], y_test=labels[100:], classes=CLASSES
    )
    config = RunConfig(
        data=DataConfig(dataset="npz", path=str(root / "d.npz")),
        model=ModelConfig(latent_dim=3, hidden_dims=(16,)),
        train=TrainConfig(epochs=1, batch_size=50),
    )
    data = load_dataset(config.data)
    vae = VAE.from_config(config.model, data.input_dim)
    result = fit(vae, data, config, out_dir=root / "run")
    return root / "run", vae, data, result


def rows_of(fig, n):
    """The ``n`` 28×28 pictures of each row of an ``image_rows`` figure."""
    return [
        np.stack([np.asarray(ax.images[0].get_array())[:28, c * 29 : c * 29 + 28] for c in range(n)]) for ax in fig.axes
    ]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("pyro-vae: error: ") and "\n" not in err, err
    return err


def test_cli_and_plotting_name_the_same_kinds():
    assert CLI_PLOT_KINDS == PLOT_KINDS


@pytest.mark.slow  # the trained run costs ~10 s on a loaded machine
def test_training_figures_show_the_binarised_input_class_names_and_what_samples_are(trained, monkeypatch):
    out, vae, data, result = trained
    written = {}
    monkeypatch.setattr(RunDir, "write_figure", lambda self, name, fig: written.setdefault(name, fig))
    save_run_figures(vae, data, result, out)
    assert sorted(written) == ["latent.png", "loss.png", "reconstructions.png", "samples.png"]
    recon = written["reconstructions.png"]
    assert [ax.get_ylabel() for ax in recon.axes] == ["original", "model input (binarised)", "reconstruction (mean)"]
    original, seen, _ = rows_of(recon, 8)
    np.testing.assert_array_equal(original, data.x_test[:8].reshape(8, 28, 28).numpy())
    # the run's own evaluation input, by the reader's road (Run.test_images), not the figure's
    np.testing.assert_array_equal(seen, load_run(out).test_images(8).reshape(8, 28, 28).numpy())
    (legend,) = written["latent.png"].legends
    present = sorted(set(data.y_test.tolist()))
    assert [t.get_text() for t in legend.get_texts()] == [CLASSES[k] for k in present]
    assert written["samples.png"].axes[0].get_title() == "decoder means E[x|z], z ~ p(z)"


@pytest.mark.slow  # the trained run costs ~10 s on a loaded machine
def test_plot_writes_each_kind_under_plots_and_leaves_the_training_figures(trained, capsys):
    out, *_ = trained
    for name in ("reconstructions.png", "samples.png", "latent.png"):
        (out / name).write_bytes(b"drawn by training")
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    vae_kinds = [kind for kind in PLOT_KINDS if kind != "classes"]  # the class grid is for cvae/m2 runs only
    for kind, n in zip(vae_kinds, (3, 4, 40, 2, 3), strict=True):
        assert cli.main(["plot", str(out), "--kind", kind, "--n", str(n)]) == 0
        path = out / "plots" / f"{kind}.png"
        assert path.read_bytes()[:8] == PNG
        assert f"wrote {path}" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before
    assert cli.main(["plot", str(out), "--kind", "samples", "--draws", "--out", str(out.parent / "d.png")]) == 0
    assert (out.parent / "d.png").read_bytes()[:8] == PNG


@pytest.mark.slow  # the trained run costs ~10 s on a loaded machine
def test_run_figure_reads_the_run_s_own_test_split(trained):
    out, *_ = trained
    run = load_run(out)
    fig = run_figure(run, "reconstructions", n=4)
    _, seen, recon = rows_of(fig, 4)
    x = run.test_images(4)
    np.testing.assert_array_equal(seen, x.reshape(4, 28, 28).numpy())
    np.testing.assert_array_equal(recon, run.vae.reconstruct(x).reshape(4, 28, 28).numpy())
    traversal = run_figure(run, "traversal", n=2)
    assert len(traversal.axes) == 2 and all(ax.get_ylabel().startswith("z[") for ax in traversal.axes)
    assert run_figure(run, "samples", n=4, draws=True).axes[0].get_title() == "draws x ~ p(x|z), z ~ p(z)"


def test_plot_refuses_an_unknown_kind_with_the_closest_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["plot", str(tmp_path), "--kind", "latnet"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown plot kind 'latnet'" in err and "did you mean 'latent'" in err


@pytest.mark.slow  # the trained run costs ~10 s on a loaded machine
def test_plot_refusals_are_one_line_before_any_data_are_read(trained, tmp_path, capsys, monkeypatch):
    out, *_ = trained

    def no_data(config):
        raise AssertionError("data were read before the refusal")

    monkeypatch.setattr(pyro_vae.run_dir.run, "load_dataset", no_data)
    assert cli.main(["plot", str(tmp_path / "absent"), "--kind", "latent"]) == 2
    assert "is no run directory" in one_error_line(capsys)
    assert not (tmp_path / "absent").exists()
    assert cli.main(["plot", str(out), "--kind", "latent", "--draws"]) == 2
    assert "draws applies to the samples figure only" in one_error_line(capsys)
    assert cli.main(["plot", str(out), "--kind", "latent", "--out", str(tmp_path / "x.jpg")]) == 2
    assert "--out must end in one of .png, .pdf, .svg" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_plot_help_names_the_kinds_and_the_default_file(capsys):
    with pytest.raises(SystemExit):
        cli.main(["plot", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(kind in text for kind in PLOT_KINDS) and "RUN/plots/<kind>.png" in text


@pytest.mark.slow  # the trained run costs ~10 s on a loaded machine
def test_the_samples_figure_needs_no_data(trained, monkeypatch):
    out, *_ = trained
    monkeypatch.setattr(pyro_vae.run_dir.run, "load_dataset", lambda config: pytest.fail("data were read"))
    fig = run_figure(load_run(out), "samples", n=4, seed=1)
    assert fig.axes[0].get_title().startswith("decoder means")
