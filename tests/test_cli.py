"""The command line, run as users run it: in a subprocess."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyro_vae import cli
from pyro_vae.cli.flags import flag_of
from pyro_vae.config import SECTIONS

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


def test_train_on_users_npz_and_evaluate_from_another_directory(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(120, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", x=x, y=rng.integers(0, 10, size=120))
    (tmp_path / "elsewhere").mkdir()  # a decoy of the same name and shape, but 200 images, in another directory
    np.savez(tmp_path / "elsewhere" / "mine.npz", x=rng.integers(0, 256, size=(200, 28, 28), dtype=np.uint8))
    proc = run_cli(
        "train",
        "--data",
        "mine.npz",
        "--epochs",
        "1",
        "--batch-size",
        "20",
        *TINY_NET,
        "--out",
        tmp_path / "run",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["n_train"] + saved["data"]["n_test"] == 120
    assert saved["config"]["data"]["path"] == str((tmp_path / "mine.npz").resolve())
    # Defect 4: evaluate run from the other directory reads the run's file (12 test images), not the decoy (20).
    proc = run_cli("evaluate", tmp_path / "run", "--k", "1", cwd=tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["num_images"] == 12


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["train", "--guide", "mvn_dag"], "did you mean 'mvn_diag'"),
        (["train", "--epochs", "0"], "argument --epochs: epochs must be a positive integer, got 0"),
        (["train", "--lr", "abc"], "argument --lr: lr must be a positive finite number, got 'abc'"),
        (["train", "--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["train", "--likelihood", "gauss"], "unknown likelihood"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, words):
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0]
    assert lines[0].startswith("pyro-vae: error: ")  # one format, for the subcommands too (not "pyro-vae train:")
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
    from pyro_vae.networks import network_names
    from pyro_vae.objectives import objective_names
    from pyro_vae.priors import prior_names
    from pyro_vae.schedules import schedule_names

    assert sorted(cli.GUIDE_CHOICES) == family_names()
    assert sorted(cli.LIKELIHOOD_CHOICES) == likelihood_names()
    assert sorted(cli.OBJECTIVE_CHOICES) == objective_names()
    assert sorted(cli.PRIOR_CHOICES) == prior_names()
    assert sorted(cli.NETWORK_CHOICES) == network_names()
    assert sorted(cli.KL_SCHEDULE_CHOICES) == schedule_names()
    registry_keys = {f.metadata.get("choices") for k in SECTIONS.values() for f in dataclasses.fields(k)} - {None}
    assert {key for key in registry_keys if isinstance(key, str)} == set(cli.REGISTRIES)


def _help(*command):
    proc = run_cli(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    return " ".join(proc.stdout.split())  # argparse wraps the help; compare it unwrapped


@pytest.mark.parametrize(("command", "excluded"), [("train", set()), ("compare", {"guide", "seed"})])
def test_every_config_field_has_a_flag_or_is_excluded(command, excluded):
    """Flags are generated from the config's field metadata: every field has one (with the field's help), or says
    why not; compare leaves out the two fields it sets itself (--guides, --seeds)."""
    text = _help(command)
    for klass in SECTIONS.values():
        for f in dataclasses.fields(klass):
            flag = flag_of(f)
            if flag is None:
                assert f.metadata["reason"], f.name
            elif f.name in excluded:
                assert f"{flag} " not in text, flag
            else:
                assert f"{flag} " in text and f.metadata["help"] in text, (flag, f.metadata["help"])


def test_help_lists_every_registry_name():
    text = _help("train")
    for names in cli.REGISTRIES.values():
        assert f"one of: {', '.join(sorted(names))}" in text


def test_new_training_flags_reach_the_config():
    argv = ["train", "--tensorboard", "--early-stop", "3", "--early-stop-min-delta", "0.5", "--compile"]
    train = cli.config_from_args(cli.build_parser().parse_args(argv)).train
    assert (train.tensorboard, train.early_stop, train.early_stop_min_delta, train.compile) == (True, 3, 0.5, True)
    train = cli.config_from_args(cli.build_parser().parse_args(["train", "--no-tensorboard"])).train
    assert (train.tensorboard, train.early_stop, train.compile) == (False, None, False)


def test_relative_data_path_is_stored_absolute(tmp_path, monkeypatch):
    """Defect 4: the config records the resolved absolute path of --data (and --data-dir), so that a command run from
    another directory reads the same file."""
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(["train", "--data", "sub/../mine.npz", "--data-dir", "."])
    config = cli.config_from_args(args)
    assert config.data.path == str(tmp_path.resolve() / "mine.npz")
    assert config.data.data_dir == str(tmp_path.resolve())


def test_device_auto_resolves():
    from pyro_vae.distributed import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("command", ["train", "compare"])
def test_objective_specs_parse_for_train_and_compare(command, capsys):
    parser = cli.build_parser()
    assert parser.parse_args([command, "--objective", "iwae:5:dreg"]).objective == "iwae:5:dreg"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([command, "--objective", "iwea:5"])
    assert exc.value.code == 2
    assert "iwae" in capsys.readouterr().err  # the close-match hint


# ------------------------------------------------------------------------------------------ sample, in this process

IN_PROCESS = ["--n-train", "64", "--n-test", "40", "--epochs", "1", "--batch-size", "32", "--latent-dim", "2"]
IN_PROCESS += ["--hidden-dims", "16,8", "--threads", "1", "--no-figures", "--no-progress"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "run"
    assert cli.main(["train", *IN_PROCESS, "--out", str(out)]) == 0
    return out


def test_sample_defaults_to_a_new_file_in_the_run_and_never_replaces_one(small_run, capsys):
    assert cli.main(["sample", str(small_run), "--n", "9"]) == 0
    first = (small_run / "samples-9.png").read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["sample", str(small_run), "--n", "9", "--seed", "1"]) == 0
    assert (small_run / "samples-9.png").read_bytes() == first  # the second call chose the next free name
    assert (small_run / "samples-9-2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"to {small_run / 'samples-9-2.png'}" in capsys.readouterr().out


def test_sample_arrays_hold_the_decoder_means_of_the_prior_codes(small_run, tmp_path):
    from pyro_vae.run_dir import load_run

    assert cli.main(["sample", str(small_run), "--n", "12", "--seed", "3", "--out", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as saved:
        x, z, draws = saved["x"], saved["z"], bool(saved["draws"])
    assert x.shape == (12, 1, 28, 28) and z.shape == (12, 2) and not draws
    vae = load_run(small_run).vae
    with torch.no_grad():  # the reference: sigmoid of the decoder's logits at the saved codes
        expected = torch.sigmoid(vae.decoder(torch.from_numpy(z))).reshape(12, 1, 28, 28)
    np.testing.assert_allclose(x, expected.numpy(), rtol=1e-6, atol=1e-7)
    assert cli.main(["sample", str(small_run), "--n", "12", "--seed", "3", "--format", "npy"]) == 0
    np.testing.assert_array_equal(np.load(small_run / "samples-12.npy"), x)  # same seed, same codes and means


def test_sample_draws_are_draws_and_say_so(small_run, tmp_path, monkeypatch):
    import pyro_vae.plotting

    titles = []
    grid = pyro_vae.plotting.image_grid
    monkeypatch.setattr(pyro_vae.plotting, "image_grid", lambda *a, **kw: titles.append(kw["title"]) or grid(*a, **kw))
    assert cli.main(["sample", str(small_run), "--n", "8", "--draws", "--out", str(tmp_path / "d.npz")]) == 0
    with np.load(tmp_path / "d.npz") as saved:
        assert bool(saved["draws"]) and set(np.unique(saved["x"])) <= {0.0, 1.0}  # Bernoulli draws are 0 or 1
    assert cli.main(["sample", str(small_run), "--n", "8", "--draws", "--out", str(tmp_path / "d.png")]) == 0
    assert cli.main(["sample", str(small_run), "--n", "8", "--out", str(tmp_path / "m.png")]) == 0
    assert titles == ["draws x ~ p(x|z), z ~ p(z)", "decoder means E[x|z], z ~ p(z)"]


def test_sample_codes_follow_the_prior(small_run, tmp_path):
    """The codes come from the model's own z site (the standard prior here): with n = 4096 draws of each of the
    L = 2 coordinates, the sample mean has SE 1/64 = 0.0156 and the sample variance SE sqrt(2/4096) = 0.022; 4 SE
    bounds (0.0625, 0.089) fail a correct sampler with probability < 1e-4 per check."""
    out = tmp_path / "z.npz"
    assert cli.main(["sample", str(small_run), "--n", "4096", "--out", str(out)]) == 0
    with np.load(out) as saved:
        z = saved["z"].astype(np.float64)
    assert np.all(np.abs(z.mean(0)) < 4 / 64)
    assert np.all(np.abs(z.var(0, ddof=1) - 1.0) < 4 * np.sqrt(2 / 4096))


def test_sample_takes_no_lock_on_a_run_that_is_training(small_run, tmp_path):
    from pyro_vae.run_dir import RunDir
    from pyro_vae.run_dir.files import lock_holder

    with RunDir(small_run).open("resume"):  # the writer of a run in training holds the lock
        holder = lock_holder(small_run)
        assert holder is not None
        assert cli.main(["sample", str(small_run), "--n", "4", "--out", str(tmp_path / "t.png")]) == 0
        assert lock_holder(small_run) == holder
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--out", "{tmp}/exists.png"], "exists; pass --overwrite"),
        (["--out", "{tmp}/a.npz", "--format", "png"], "is a .npz file but --format is png"),
        (["--out", "{tmp}/a.jpg"], "ends in .jpg; sample writes .png, .npy or .npz"),
        (["--out", "{tmp}/no/such/dir/a.png"], "does not exist"),
        (["--format", "jpeg"], "unknown format 'jpeg'"),
    ],
)
def test_sample_refuses_bad_output_before_loading_the_run(small_run, tmp_path, capsys, monkeypatch, extra, words):
    import pyro_vae.run_dir

    (tmp_path / "exists.png").write_bytes(b"mine")
    monkeypatch.setattr(pyro_vae.run_dir, "load_run", lambda *a, **kw: pytest.fail("the run was loaded"), raising=False)
    argv = ["sample", str(small_run), *(a.format(tmp=tmp_path) for a in extra)]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("pyro-vae: error: ") and words in line
    assert (tmp_path / "exists.png").read_bytes() == b"mine"


def test_sample_replaces_a_named_file_only_with_overwrite(small_run, tmp_path):
    (tmp_path / "exists.png").write_bytes(b"mine")
    assert cli.main(["sample", str(small_run), "--n", "4", "--out", str(tmp_path / "exists.png"), "--overwrite"]) == 0
    assert (tmp_path / "exists.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------------ progress


def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise(monkeypatch, caplog):
    import logging

    from pyro_vae.callbacks import ProgressBar
    from pyro_vae.progress import Progress, show_bar

    log = logging.getLogger("test.progress")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not show_bar() and not ProgressBar().show and show_bar(True)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        with Progress(10, desc="work", unit="images", logger=log) as p:
            p.update(4)
            p.update(6, note="done")
    lines = [r.getMessage() for r in caplog.records if r.name == "test.progress"]
    assert [line.split(",")[0] for line in lines] == ["work: 4/10 images (40%)", "work: 10/10 images (100%)"]
    assert lines[1].endswith("; done")
    caplog.clear()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the one decision, for training's bar too
    assert show_bar() and ProgressBar().show and not show_bar(False)
    with caplog.at_level(logging.INFO, logger="test.progress"), Progress(3, desc="work", unit="runs", logger=log) as p:
        p.update(3, note="x")
        assert p.bar.n == 3 and not p.bar.disable
    assert not [r for r in caplog.records if r.name == "test.progress"]  # a bar, no log lines


def test_evaluate_logs_one_line_per_chunk_off_a_terminal(small_run, caplog, capsys):
    import logging

    # 40 test images, k = 4 particles, 40 particles x images per pass: 10 images per chunk, so 4 chunks
    with caplog.at_level(logging.INFO, logger="pyro_vae.cli.commands"):
        argv = ["evaluate", str(small_run), "--k", "1,4", "--chunk-size", "40", "--out", str(small_run / "e.json")]
        assert cli.main(argv) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluate: ")]
    assert [line.split(" (")[0] for line in lines] == [f"evaluate: {n}/40 images" for n in (10, 20, 30, 40)]
    assert "test ELBO" in capsys.readouterr().out


def test_evaluate_progress_does_not_change_the_numbers(small_run):
    from pyro_vae.evaluation import evaluate
    from pyro_vae.run_dir import load_run

    run = load_run(small_run)
    x = run.test_images()
    seen = []
    with_progress = evaluate(run.vae, x, (1, 4), chunk_size=40, seed=1, progress=seen.append)
    assert seen == [10, 10, 10, 10]
    assert with_progress == evaluate(run.vae, x, (1, 4), chunk_size=40, seed=1)


# ---------------------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [(), ("train",), ("evaluate",), ("sample",), ("compare",)])
def test_every_help_lists_every_registry_name(command):
    parser = cli.build_parser()
    if command:
        parser = parser._subparsers._group_actions[0].choices[command[0]]
    text = " ".join(parser.format_help().split("registered names")[1].split())  # the epilog, unwrapped
    for key, names in cli.REGISTRIES.items():
        assert f"{key.replace('_', ' ')}: {', '.join(sorted(names))}" in text
